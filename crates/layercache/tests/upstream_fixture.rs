//! The upstream fixture (`common::upstream`) on its own: a TLS, htpasswd-protected
//! distribution registry takes a busybox image and a two-layer image with a 32 MiB layer
//! from skopeo, serves them back only to a client with the CA and the credentials,
//! counts the blob downloads it answers, serves again after a stop and a start on the
//! same port and storage; and a second dockerd pulls an image and builds `FROM` it with
//! BuildKit through a plain HTTP stand-in mirror.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;

use common::upstream::{self, Dockerd, Layer, Upstream};
use serde_json::Value;

fn skopeo(args: &[&str]) -> Command {
    let mut command = Command::new("skopeo");
    command.args(args);
    command
}

fn json_of(text: &str) -> Value {
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap_or_else(|e| panic!("bad JSON ({e}) in {text}"))
}

/// `skopeo inspect` of `reference` in `upstream` with its CA and credentials.
fn inspect(upstream: &Upstream, reference: &str) -> Value {
    let out = common::run_ok(
        skopeo(&["inspect"])
            .args(upstream.skopeo_args())
            .arg(format!("docker://{}/{reference}", upstream.host)),
    );
    json_of(&out)
}

#[test]
fn upstream_serves_tls_with_auth_counts_requests_restarts_and_dockerd_pulls_through_a_mirror() {
    for tool in [
        "docker-registry",
        "skopeo",
        "openssl",
        "htpasswd",
        "curl",
        "dockerd",
    ] {
        if !common::require_tool(tool) {
            return;
        }
    }
    let mut upstream = Upstream::start();
    assert!(
        upstream.url.starts_with("https://127.0.0.1:"),
        "{}",
        upstream.url
    );

    let base = upstream::busybox_image(&upstream, "library/base:1");
    assert_eq!(base.layers.len(), 1);
    let big = upstream::push_image(
        &upstream,
        "test/big:1",
        &[
            Layer::Busybox,
            Layer::Random {
                path: "data/big.bin".into(),
                seed: 7,
                len: 32 << 20,
            },
        ],
    );
    // Layers are deterministic: the busybox layer is the same blob in both images.
    assert_eq!(big.layers[0], base.layers[0]);
    assert!(big.layers[1].size > 32 << 20, "{:?}", big.layers);

    // skopeo reads it back with the CA and the credentials, and only with both.
    let inspected = inspect(&upstream, "test/big:1");
    assert_eq!(inspected["Digest"], big.manifest_digest.as_str());
    let layers: Vec<&str> = big.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(inspected["Layers"], serde_json::json!(layers));
    assert_eq!(inspected["Architecture"], "amd64");
    let image = format!("docker://{}/test/big:1", upstream.host);
    let (ok, out) = common::run(
        skopeo(&["inspect", "--creds"])
            .arg(format!("{}:{}", upstream::USER, upstream::PASSWORD))
            .arg(&image),
    );
    assert!(!ok && out.contains("certificate"), "no CA, yet: {out}");
    let cert_dir = format!("--cert-dir={}", upstream.cert_dir().display());
    let (ok, out) = common::run(skopeo(&["inspect", &cert_dir]).arg(&image));
    assert!(
        !ok && out.contains("unauthorized"),
        "no credentials, yet: {out}"
    );

    // One download of the big layer is one answered GET of it.
    let digest = &big.layers[1].digest;
    let blob = format!("/blobs/{digest}");
    assert_eq!(upstream.requests("GET", &blob), 0);
    let tmp = tempfile::tempdir().unwrap();
    let downloaded = tmp.path().join("blob");
    common::run_ok(
        Command::new("curl")
            .args(["-sSf", "-o"])
            .arg(&downloaded)
            .arg("--cacert")
            .arg(upstream.ca_file())
            .args(["-u", &format!("{}:{}", upstream::USER, upstream::PASSWORD)])
            .arg(upstream.blob_url("test/big", digest)),
    );
    assert_eq!(file_digest(&downloaded), *digest);
    assert_eq!(
        upstream.requests("GET", &blob),
        1,
        "{:#?}",
        upstream.answered()
    );

    // Stopped, it answers nothing; started again, it serves what it had, on the same port.
    let host = upstream.host.clone();
    upstream.stop();
    let (ok, _) = common::run(
        Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(upstream.ca_file())
            .arg(upstream.at("/v2/")),
    );
    assert!(!ok, "the stopped upstream answered");
    assert_eq!(
        upstream.requests("GET", &blob),
        1,
        "the log outlives the process"
    );
    upstream.start_again();
    assert_eq!(upstream.host, host);
    assert_eq!(
        inspect(&upstream, "library/base:1")["Digest"],
        base.manifest_digest.as_str()
    );
    assert_eq!(upstream.requests("GET", &blob), 1);

    // A second dockerd pulls Docker Hub's `base:1` through a plain HTTP stand-in mirror
    // (no internet here), and a BuildKit build `FROM` it pulls through it too.
    let mirror = Upstream::start_plain();
    let mirrored = upstream::busybox_image(&mirror, "library/base:1");
    assert_eq!(mirrored.manifest_digest, base.manifest_digest);
    let layer = format!("/blobs/{}", mirrored.layers[0].digest);
    let dockerd = Dockerd::start(&mirror.url);
    let out = common::run_ok(&mut dockerd.docker(&["pull", "base:1"]));
    assert!(out.contains(&mirrored.manifest_digest), "{out}");
    assert_eq!(
        mirror.requests("GET", &layer),
        1,
        "{:#?}",
        mirror.answered()
    );
    let out = common::run_ok(&mut dockerd.docker(&[
        "run",
        "--rm",
        "--network=none",
        "base:1",
        "/bin/busybox",
        "sh",
        "-c",
        "echo ran",
    ]));
    assert_eq!(out.trim(), "ran");

    // BuildKit keeps its own content store: without the image, it must fetch the layer.
    common::run_ok(&mut dockerd.docker(&["rmi", "base:1"]));
    let context = tempfile::tempdir().unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM base:1\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo hi > /x\"]\n",
    )
    .unwrap();
    let out = common::run_ok(
        dockerd
            .docker(&[
                "build",
                "--network=none",
                "--progress=plain",
                "-t",
                "built:1",
            ])
            .arg(context.path()),
    );
    assert!(out.contains("FROM docker.io/library/base:1"), "{out}");
    // BuildKit's resolver asks the mirror with `?ns=docker.io`; the classic pull does not.
    let buildkit: Vec<_> = mirror
        .answered()
        .into_iter()
        .filter(|r| r.uri.contains("ns=docker.io"))
        .collect();
    assert!(
        buildkit
            .iter()
            .any(|r| r.method == "GET" && r.uri.contains(&layer)),
        "BuildKit did not fetch the layer through the mirror: {buildkit:#?}\n{out}"
    );
    let out = common::run_ok(&mut dockerd.docker(&[
        "run",
        "--rm",
        "--network=none",
        "built:1",
        "/bin/busybox",
        "cat",
        "/x",
    ]));
    assert_eq!(out.trim(), "hi");
}

fn file_digest(path: &std::path::Path) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut hasher).unwrap();
    format!("sha256:{}", hex::encode(hasher.finalize()))
}
