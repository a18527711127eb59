//! layercache as a pull-through mirror of a registry under the test's control: the
//! Debian `docker-registry` (distribution) over TLS with a CA the test makes and htpasswd
//! auth, holding images skopeo put there. Pulled through layercache by a dockerd with
//! `registry-mirrors`, by BuildKit building `FROM` a mirrored image, and by skopeo under
//! an explicit `HOST/docker.io/…` name, everything is byte-identical with the upstream;
//! names without an upstream's prefix stay usable for the server's own repositories.
//! With the upstream stopped, what was pulled is still served, and an uncached tag gets a
//! clear error; a moved tag is picked up after `tag_ttl` (and not before, on the
//! defaults); 16 concurrent pulls of one uncached 256 MiB blob make one upstream fetch;
//! a blob whose bytes upstream do not match its digest is never stored or served whole.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::upstream::{self, Dockerd, Image, Layer, Upstream};
use futures::StreamExt;
use sha2::Digest as _;

/// The tag lifetime of the test's mirror (the default is 10 minutes: see
/// `a_tag_is_kept_for_the_default_ttl`).
const TAG_TTL: &str = "2s";
const BIG: u64 = 256 << 20;
const PASSWORD_VAR: &str = "MIRROR_TEST_UPSTREAM_PASSWORD";

/// A layercache whose `docker.io` upstream is `upstream`, with `tag_ttl` if given.
fn mirror(upstream: &Upstream, dir: &Path, tag_ttl: Option<&str>) -> common::Server {
    let config = dir.join(format!("mirror-{}.toml", tag_ttl.unwrap_or("default")));
    let ttl = tag_ttl.map_or(String::new(), |t| format!("tag_ttl = \"{t}\"\n"));
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\nca_file = \"{}\"\n{ttl}\
             credentials = {{ username = \"{}\", password_env = \"{PASSWORD_VAR}\" }}\n",
            upstream.url,
            upstream.ca_file().display(),
            upstream::USER,
        ),
    )
    .unwrap();
    common::Server::start_with_env(&[
        ("LAYERCACHE_CONFIG", config.to_str().unwrap()),
        (PASSWORD_VAR, upstream::PASSWORD),
    ])
}

/// The manifest `reference` (`HOST/repo:tag`) names, as skopeo reads it without TLS.
fn raw_manifest(reference: &str) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

/// Status, headers and body of `GET url`.
fn get(url: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    block_on(async {
        let response = reqwest::get(url).await.unwrap();
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (
            status,
            headers,
            response.bytes().await.unwrap_or_default().to_vec(),
        )
    })
}

/// A GET of a manifest, accepting OCI manifests.
fn get_manifest(url: &str) -> reqwest::Response {
    block_on(async {
        reqwest::Client::new()
            .get(url)
            .header("accept", upstream::OCI_MANIFEST)
            .send()
            .await
            .unwrap()
    })
}

/// The file layercache would keep blob `digest` in.
fn blob_file(server: &common::Server, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    server
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

#[test]
fn a_pull_through_mirror_serves_dockerd_buildkit_and_skopeo_byte_for_byte() {
    for tool in [
        "docker-registry",
        "skopeo",
        "openssl",
        "htpasswd",
        "/usr/sbin/dockerd",
    ] {
        if !common::require_tool(tool) {
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut upstream = Upstream::start();
    let base = upstream::busybox_image(&upstream, "library/base:1");
    let tool = upstream::busybox_image(&upstream, "library/tool:1");
    // The upstream really wants its CA and credentials.
    let anonymous = Command::new("skopeo")
        .args(["inspect", "--raw", "--cert-dir"])
        .arg(upstream.cert_dir())
        .arg(format!("docker://{}/library/base:1", upstream.host))
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "the upstream served without credentials"
    );
    let untrusted = Command::new("skopeo")
        .args(["inspect", "--raw", "--creds"])
        .arg(format!("{}:{}", upstream::USER, upstream::PASSWORD))
        .arg(format!("docker://{}/library/base:1", upstream.host))
        .output()
        .unwrap();
    assert!(
        !untrusted.status.success(),
        "the upstream's certificate was trusted without its CA"
    );
    let server = mirror(&upstream, tmp.path(), Some(TAG_TTL));
    let on_defaults = mirror(&upstream, tmp.path(), None);

    // skopeo through the explicit name: the manifest and every blob, byte for byte.
    let explicit = format!("{}/docker.io/library/base:1", server.host);
    assert_eq!(sha256(&raw_manifest(&explicit)), base.manifest_digest);
    let copied = tmp.path().join("copied");
    common::run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{explicit}"),
        &format!("dir:{}", copied.display()),
    ]));
    for blob in base.layers.iter().chain([&base.config]) {
        let hex = blob.digest.trim_start_matches("sha256:");
        let bytes = std::fs::read(copied.join(hex)).unwrap();
        assert_eq!(sha256(&bytes), blob.digest);
    }
    assert_eq!(
        raw_manifest(&format!("{}/docker.io/library/base:1", on_defaults.host)),
        base.manifest
    );

    // A name without an upstream's prefix is also this server's own: a first push there
    // works, and reads of it stay here.
    common::run_ok(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("dir:{}", copied.display()),
        &format!("docker://{}/mine/app:1", server.host),
    ]));
    assert_eq!(
        sha256(&raw_manifest(&format!("{}/mine/app:1", server.host))),
        base.manifest_digest
    );

    // dockerd with registry-mirrors pulls `base:1` (docker.io/library/base:1) through it.
    let daemon = Dockerd::start(&server.url);
    common::run_ok(&mut daemon.docker(&["pull", "base:1"]));
    let id = common::run_ok(&mut daemon.docker(&["image", "inspect", "-f", "{{.Id}}", "base:1"]));
    assert_eq!(id.trim(), base.config.digest, "the image's config differs");
    let ran = common::run_ok(&mut daemon.docker(&[
        "run",
        "--rm",
        "--network=none",
        "base:1",
        "/bin/busybox",
        "echo",
        "ran",
    ]));
    assert_eq!(ran.trim(), "ran");

    // BuildKit builds FROM a mirrored image it has never pulled.
    let context = tmp.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM tool:1\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo built > /x\"]\n",
    )
    .unwrap();
    let fills_before = upstream.requests("GET", &format!("/blobs/{}", tool.layers[0].digest));
    let build = common::run_ok(
        daemon
            .docker(&[
                "build",
                "--network=none",
                "--progress=plain",
                "-t",
                "built:1",
            ])
            .arg(&context),
    );
    assert!(
        build.contains("FROM docker.io/library/tool:1") || build.contains("tool:1"),
        "{build}"
    );
    assert!(
        upstream.requests("GET", "/v2/library/tool/manifests/") >= 1,
        "BuildKit's FROM did not come through layercache"
    );
    let x = common::run_ok(&mut daemon.docker(&[
        "run",
        "--rm",
        "--network=none",
        "built:1",
        "/bin/busybox",
        "cat",
        "/x",
    ]));
    assert_eq!(x.trim(), "built");
    // Its layer came from the upstream through layercache (the tool image shares the
    // busybox layer with base, already on layercache's disk: no second fetch).
    assert_eq!(
        upstream.requests("GET", &format!("/blobs/{}", tool.layers[0].digest)),
        fills_before,
        "a blob layercache holds was fetched again"
    );
    let metrics = get(&server.at("/metrics")).2;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics
            .contains("layercache_upstream_fills_total{upstream=\"docker.io\",kind=\"manifest\"}"),
        "{metrics}"
    );

    // The upstream stops: what was pulled is still served, stale tags with a warning.
    upstream.stop();
    common::run_ok(&mut daemon.docker(&["image", "rm", "-f", "base:1", "built:1", "tool:1"]));
    common::run_ok(&mut daemon.docker(&["builder", "prune", "-af"]));
    let deadline = Instant::now() + Duration::from_secs(5);
    let stale = loop {
        // Past the tag's lifetime the revalidation fails: served stale.
        let response = get_manifest(&server.at("/v2/docker.io/library/base/manifests/1"));
        if response.headers().contains_key("warning") || Instant::now() > deadline {
            break response;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stale.status(), 200);
    assert!(
        stale.headers()["warning"]
            .to_str()
            .unwrap()
            .contains("stale")
    );
    common::run_ok(&mut daemon.docker(&["pull", "base:1"]));
    let id = common::run_ok(&mut daemon.docker(&["image", "inspect", "-f", "{{.Id}}", "base:1"]));
    assert_eq!(id.trim(), base.config.digest);
    assert_eq!(sha256(&raw_manifest(&explicit)), base.manifest_digest);
    // A name of this server's own that does not exist is a plain miss, upstream or not.
    let (status, _, body) = get(&server.at("/v2/mine/other/manifests/1"));
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    // Never pulled: a clear error, not a hang or a 500.
    let (status, _, body) = get(&server.at("/v2/docker.io/library/never/manifests/1"));
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("\"code\":\"UNAVAILABLE\""));
    let metrics = String::from_utf8(get(&server.at("/metrics")).2).unwrap();
    assert!(
        metrics.contains("layercache_upstream_stale_total{upstream=\"docker.io\"}"),
        "{metrics}"
    );
    drop(daemon);

    // The tag moves upstream: picked up once older than tag_ttl; kept on the defaults.
    upstream.start_again();
    let moved = upstream::push_image(
        &upstream,
        "library/base:1",
        &[
            Layer::Busybox,
            Layer::Files(vec![("moved".into(), b"v2".to_vec())]),
        ],
    );
    assert_ne!(moved.manifest_digest, base.manifest_digest);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = sha256(&raw_manifest(&explicit));
        if now == moved.manifest_digest {
            break;
        }
        assert_eq!(now, base.manifest_digest);
        assert!(Instant::now() < deadline, "the moved tag was not picked up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let kept = raw_manifest(&format!("{}/docker.io/library/base:1", on_defaults.host));
    assert_eq!(
        sha256(&kept),
        base.manifest_digest,
        "revalidated before the default 10 minutes"
    );

    one_fetch_for_sixteen_pulls(&upstream, &server);
    corrupt_bytes_are_refused(&upstream, &server);
    mirrored_content_is_evicted_like_any_root(&upstream, tmp.path());
}

/// Mirrored images past a small quota: eviction removes the least recently pulled ones
/// and the disk comes back under the quota by itself (the windows shortened to a
/// second); an evicted image is filled again on its next pull.
fn mirrored_content_is_evicted_like_any_root(upstream: &Upstream, dir: &Path) {
    const LAYER: u64 = 30 << 20;
    let images: Vec<Image> = (0..4)
        .map(|i| {
            let layer = Layer::Random {
                path: "big.bin".into(),
                seed: 100 + i,
                len: LAYER,
            };
            upstream::push_image(upstream, &format!("library/quota{i}:1"), &[layer])
        })
        .collect();
    let config = dir.join("quota.toml");
    std::fs::write(
        &config,
        format!(
            "[store.eviction]\nmax_size = \"100MiB\"\nin_use = \"1s\"\npush_window = \"1s\"\n\
             grace = \"1s\"\ninterval = \"1h\"\n\
             [[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\nca_file = \"{}\"\n\
             credentials = {{ username = \"{}\", password_env = \"{PASSWORD_VAR}\" }}\n",
            upstream.url,
            upstream.ca_file().display(),
            upstream::USER,
        ),
    )
    .unwrap();
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_CONFIG", config.to_str().unwrap()),
        (PASSWORD_VAR, upstream::PASSWORD),
    ]);
    let pull = |image: &Image| {
        let target = tempfile::tempdir().unwrap();
        common::run_ok(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/docker.io/{}", server.host, image.reference()),
            &format!("dir:{}", target.path().display()),
        ]));
        let layer = std::fs::read(
            target
                .path()
                .join(image.layers[0].digest.trim_start_matches("sha256:")),
        )
        .unwrap();
        assert_eq!(sha256(&layer), image.layers[0].digest);
    };
    for image in &images {
        pull(image);
        // Last use is kept in seconds: one pull per second orders them.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let gc = |dry_run: bool| -> serde_json::Value {
        block_on(async {
            let url = server.at(&format!("/api/v1/gc?dry_run={dry_run}"));
            let response = reqwest::Client::new().post(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json().await.unwrap()
        })
    };
    // The passes the fills start bring the disk back under the quota by themselves,
    // evicting the oldest pulls.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let blobs = common::registry::disk_usage(&server.data_dir().join("blobs")).0;
        if blobs <= 100 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{blobs} bytes of blobs on disk over a 100 MiB quota: {:#}",
            gc(false)
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
    let oldest = blob_file(&server, &images[0].layers[0].digest);
    assert!(!oldest.exists(), "the least recently pulled image was kept");
    let newest = blob_file(&server, &images[3].layers[0].digest);
    assert!(newest.exists(), "the newest pull was evicted");
    // The evicted image is fetched again on its next pull, byte for byte.
    let fetches = upstream.requests("GET", &format!("/blobs/{}", images[0].layers[0].digest));
    pull(&images[0]);
    assert_eq!(
        upstream.requests("GET", &format!("/blobs/{}", images[0].layers[0].digest)),
        fetches + 1
    );
}

/// 16 clients pull one uncached 256 MiB blob at once (one of them leaves early): every
/// one that stays gets the whole blob, and the upstream served it once.
fn one_fetch_for_sixteen_pulls(upstream: &Upstream, server: &common::Server) {
    let image = upstream::push_image(
        upstream,
        "library/big:1",
        &[Layer::Random {
            path: "big.bin".into(),
            seed: 7,
            len: BIG,
        }],
    );
    let layer = image.layers[0].clone();
    let url = server.at(&format!("/v2/docker.io/library/big/blobs/{}", layer.digest));
    let results = block_on(async {
        let client = reqwest::Client::new();
        let pulls = (0..16).map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let mut body = response.bytes_stream();
                let mut hasher = sha2::Sha256::new();
                let mut len = 0u64;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.unwrap();
                    len += chunk.len() as u64;
                    hasher.update(&chunk);
                    if i == 0 && len > 1 << 20 {
                        // This one leaves: the others must not notice.
                        return None;
                    }
                }
                Some((len, format!("sha256:{}", hex::encode(hasher.finalize()))))
            })
        });
        futures::future::join_all(pulls).await
    });
    let finished: Vec<_> = results.into_iter().filter_map(|r| r.unwrap()).collect();
    assert_eq!(finished.len(), 15);
    for (len, digest) in finished {
        assert_eq!((len, digest.as_str()), (layer.size, layer.digest.as_str()));
    }
    let fetches = upstream.requests("GET", &format!("/blobs/{}", layer.digest));
    assert_eq!(fetches, 1, "16 pulls made {fetches} upstream fetches");
    let stored = std::fs::read(blob_file(server, &layer.digest)).unwrap();
    assert_eq!(sha256(&stored), layer.digest);
}

/// The upstream's copy of a layer is damaged on its disk: layercache never completes a
/// response with it, never stores it, and says so again on the next pull.
fn corrupt_bytes_are_refused(upstream: &Upstream, server: &common::Server) {
    let image: Image = upstream::push_image(
        upstream,
        "library/bad:1",
        &[Layer::Random {
            path: "bad.bin".into(),
            seed: 11,
            len: 8 << 20,
        }],
    );
    let layer = &image.layers[0];
    let hex = layer.digest.trim_start_matches("sha256:");
    let data = upstream
        .dir()
        .join("storage/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[4 << 20] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let url = server.at(&format!("/v2/docker.io/library/bad/blobs/{}", layer.digest));
    for attempt in 0..2 {
        let received = block_on(async {
            let response = reqwest::get(&url).await.unwrap();
            if response.status() != 200 {
                return Err(response.status().as_u16());
            }
            let mut body = response.bytes_stream();
            let mut got = Vec::new();
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(chunk) => got.extend_from_slice(&chunk),
                    Err(_) => return Ok((got, false)),
                }
            }
            Ok((got, true))
        });
        match received {
            // Refused before the body: the error is the upstream's corrupt content.
            Err(status) => assert!(status >= 400, "attempt {attempt}: {status}"),
            Ok((got, complete)) => {
                assert!(
                    !complete || got.len() as u64 != layer.size,
                    "attempt {attempt}: a complete {} byte body",
                    got.len()
                );
                assert!((got.len() as u64) < layer.size);
            }
        }
        assert!(
            !blob_file(server, &layer.digest).exists(),
            "the corrupt blob was stored"
        );
    }
    let metrics = String::from_utf8(get(&server.at("/metrics")).2).unwrap();
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("layercache_upstream_failures_total{upstream=\"docker.io\"} "))
        .unwrap_or_else(|| panic!("no failure count:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(
        failures >= 2,
        "{failures} failures counted for two corrupt fills"
    );
}
