//! `layercache explain` end to end: real BuildKit builds pushed to a layercache started
//! by the test (the first changed step and the bytes rebuilt after it; which image can
//! serve `--cache-from`, checked against what BuildKit then actually reuses; a build
//! session's missing `--cache-from` tag), BuildKit-shaped cache exports in both forms
//! pushed through the registry API and read from an OCI layout, and bad input.
//!
//! dockerd is one shared daemon and `docker builder prune` wipes all of its build cache,
//! so the tests that use it take [`daemon`] first.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod conformance_support;

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use common::{Server, digest_of};
use conformance_support::*;
use serde_json::{Value, json};

/// The Debian docker.io client: newer clients without buildx refuse `DOCKER_BUILDKIT=1`.
const DOCKER: &str = "/usr/bin/docker";

/// Steps before and after `COPY app.txt`; each `RUN` writes random bytes, so a step that
/// runs again cannot produce the same layer.
const DOCKERFILE: &str = r#"FROM scratch
COPY nonce /nonce
COPY busybox /bin/busybox
SHELL ["/bin/busybox", "sh", "-c"]
RUN /bin/busybox mkdir -p /data /app && /bin/busybox dd if=/dev/urandom of=/data/base.bin bs=1k count=256
ENV STAGE=test
COPY app.txt /app/
RUN /bin/busybox dd if=/dev/urandom of=/data/build.bin bs=1k count=512
RUN /bin/busybox cat /app/app.txt > /app/copy.txt
"#;

static DAEMON: Mutex<()> = Mutex::new(());

/// Exclusive use of dockerd within this test binary.
fn daemon() -> Option<MutexGuard<'static, ()>> {
    if !common::require_tool(DOCKER) {
        return None;
    }
    let guard = DAEMON.lock().unwrap_or_else(|p| p.into_inner());
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );
    Some(guard)
}

/// A build context of [`DOCKERFILE`] with `app.txt` holding `app`.
fn context(server: &Server, app: &str) -> tempfile::TempDir {
    let context = common::busybox_context(server, "Dockerfile", DOCKERFILE);
    std::fs::write(context.path().join("app.txt"), app).unwrap();
    context
}

/// Remove `tags` and all build cache from the daemon.
fn wipe(tags: &[&str]) {
    let (pruned, out) = common::run(&mut common::docker(&["builder", "prune", "-af"]));
    assert!(pruned, "docker builder prune failed:\n{out}");
    for tag in tags {
        common::run(&mut common::docker(&["image", "rm", "-f", tag]));
    }
}

/// Leaves the daemon without this test's images and build cache, also on failure.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::run(&mut common::docker(&["builder", "prune", "-af"]));
        for tag in &self.0 {
            common::run(&mut common::docker(&["image", "rm", "-f", tag]));
        }
    }
}

/// What `layercache explain ARGS` did.
struct Explained {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Explained {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }

    /// Succeeded with exit status 0.
    fn ok(self) -> Explained {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Failed cleanly: a non-zero status, a message, no panic.
    fn failed(self) -> Explained {
        assert_ne!(self.code, 0, "stdout:\n{}", self.stdout);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }
}

fn explain(args: &[&str]) -> Explained {
    let out = Command::new(env!("CARGO_BIN_EXE_layercache"))
        .arg("explain")
        .args(args)
        .env_remove("LAYERCACHE_SERVER")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    Explained {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// The image manifest of `repo:tag` and its config.
async fn manifest_and_config(api: &Api, repo: &str, tag: &str) -> (Value, Value) {
    let response = api
        .request(reqwest::Method::GET, &format!("/v2/{repo}/manifests/{tag}"))
        .header("accept", format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}"))
        .send()
        .await
        .unwrap();
    let manifest = json_ok(response).await;
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = json_ok(api.get(&format!("/v2/{repo}/blobs/{config_digest}")).await).await;
    (manifest, config)
}

#[test]
fn explain_names_the_changed_copy_of_two_real_builds_and_the_bytes_rebuilt_after_it() {
    let Some(_daemon) = daemon() else { return };
    let server = Server::start();
    let ctx = context(&server, "first version\n");
    let a = format!("{}/explain/app:a", server.host);
    let b = format!("{}/explain/app:b", server.host);
    let _cleanup = Cleanup(vec![a.clone(), b.clone()]);
    wipe(&[&a, &b]);

    common::docker_build(ctx.path(), &a, false, None);
    common::run_ok(&mut common::docker(&["push", &a]));
    std::fs::write(ctx.path().join("app.txt"), "second version\n").unwrap();
    let second = common::docker_build(ctx.path(), &b, false, None);
    // The steps before the COPY come from the builder's cache, so their layers are A's.
    let steps = common::step_outcomes(&second);
    let cached = steps.values().filter(|end| *end == "CACHED").count();
    assert_eq!(cached, 3, "{steps:#?}\n{second}");
    common::run_ok(&mut common::docker(&["push", &b]));

    // What the registry holds: B's layers from the one COPY app.txt made on.
    let api = Api::new(&server);
    let (manifest, config) = block_on(manifest_and_config(&api, "explain/app", "b"));
    let producing: Vec<&str> = config["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .map(|h| h["created_by"].as_str().unwrap())
        .collect();
    let copy = producing
        .iter()
        .position(|c| c.starts_with("COPY app.txt"))
        .unwrap();
    let sizes: Vec<u64> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes.len(), producing.len());
    let rebuilt: u64 = sizes[copy..].iter().sum();

    let text = explain(&[&a, &b]).ok().stdout;
    assert!(
        text.contains("First difference: step 6: COPY app.txt /app/"),
        "{text}"
    );
    assert!(text.contains(&format!("({rebuilt} bytes)")), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("<- first difference"))
        .unwrap();
    assert!(row.contains("COPY app.txt /app/"), "{text}");

    let json = explain(&[&a, &b, "--json"]).ok().json();
    assert_eq!(json["identical"], false);
    assert_eq!(
        json["first_difference"]["instruction"],
        "COPY app.txt /app/"
    );
    assert_eq!(json["first_difference"]["step"], 6);
    assert_eq!(json["rebuilt_bytes"].as_u64(), Some(rebuilt));
    assert_eq!(
        json["rebuilt_layers"].as_u64(),
        Some((sizes.len() - copy) as u64)
    );
    let statuses: Vec<&str> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "same", "same", "same", "same", "same", "differs", "differs", "differs"
        ],
        "{json:#}"
    );

    // An image against itself.
    let same = explain(&[&a, &a]).ok().stdout;
    assert!(same.contains("identical"), "{same}");
}

#[test]
fn cache_from_check_matches_what_buildkit_actually_reuses() {
    let Some(_daemon) = daemon() else { return };
    let server = Server::start();
    let ctx = context(&server, "cache me\n");
    let plain = format!("{}/explain/plain:v1", server.host);
    let inline = format!("{}/explain/inline:v1", server.host);
    let check = format!("{}/explain/check:v1", server.host);
    let _cleanup = Cleanup(vec![plain.clone(), inline.clone(), check.clone()]);

    // The same context built twice on a wiped builder: once pushed without cache
    // metadata, once with the inline cache.
    wipe(&[&plain, &inline, &check]);
    common::docker_build(ctx.path(), &plain, false, None);
    common::run_ok(&mut common::docker(&["push", &plain]));
    wipe(&[&plain]);
    common::docker_build(ctx.path(), &inline, true, None);
    common::run_ok(&mut common::docker(&["push", &inline]));

    let verdict = explain(&["--cache-from", &plain]);
    assert_eq!(verdict.code, 1, "{}\n{}", verdict.stdout, verdict.stderr);
    assert!(verdict.stdout.contains("NOT usable"), "{}", verdict.stdout);
    assert!(
        verdict.stdout.contains("moby.buildkit.cache.v0"),
        "{}",
        verdict.stdout
    );
    assert!(
        verdict
            .stdout
            .contains("--build-arg BUILDKIT_INLINE_CACHE=1"),
        "{}",
        verdict.stdout
    );
    assert!(
        verdict.stdout.contains("--cache-to type=registry,ref="),
        "{}",
        verdict.stdout
    );
    let json = explain(&["--cache-from", &plain, "--json"]);
    assert_eq!(json.code, 1);
    assert_eq!(json.json()["usable"], false);

    let verdict = explain(&["--cache-from", &inline]).ok();
    assert!(
        verdict.stdout.starts_with("usable as a cache"),
        "{}",
        verdict.stdout
    );
    assert!(
        verdict.stdout.contains("COPY app.txt /app/"),
        "{}",
        verdict.stdout
    );
    let json = explain(&["--cache-from", &inline, "--json"]).ok().json();
    assert_eq!(json["usable"], true);
    assert_eq!(json["kind"], "inline");

    // What BuildKit does with each on a wiped builder.
    wipe(&[&plain, &inline, &check]);
    let from_plain = common::docker_build(ctx.path(), &check, false, Some(&plain));
    let steps = common::step_outcomes(&from_plain);
    assert!(!steps.is_empty(), "{from_plain}");
    assert!(
        steps.values().all(|end| end != "CACHED"),
        "the image without cache metadata gave CACHED steps: {steps:#?}\n{from_plain}"
    );
    wipe(&[&check]);
    let from_inline = common::docker_build(ctx.path(), &check, false, Some(&inline));
    let steps = common::step_outcomes(&from_inline);
    let ran: Vec<_> = steps.iter().filter(|(_, end)| *end != "CACHED").collect();
    assert!(
        ran.is_empty(),
        "steps not CACHED from the inline cache: {ran:#?}\n{from_inline}"
    );
}

#[test]
fn session_names_the_existing_nearest_tag_for_a_missing_cache_from() {
    let Some(_daemon) = daemon() else { return };
    let server = Server::start();
    let ctx = context(&server, "branch\n");
    let main = format!("{}/cache/app:main", server.host);
    let wanted = format!("{}/cache/app:pr-12", server.host);
    let built = format!("{}/explain/pr:12", server.host);
    let _cleanup = Cleanup(vec![main.clone(), built.clone()]);

    wipe(&[&main, &built]);
    common::docker_build(ctx.path(), &main, true, None);
    common::run_ok(&mut common::docker(&["push", &main]));
    wipe(&[&main]);
    // A pull request's first build: its own cache tag does not exist yet.
    common::docker_build(ctx.path(), &built, false, Some(&wanted));

    let sessions: Vec<server::sessions::Session> = block_on(async {
        reqwest::Client::new()
            .get(server.at("/api/v1/sessions"))
            .query(&[("since", "0"), ("repo", "cache/app")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let session = sessions
        .iter()
        .find(|s| s.missed.iter().any(|m| m == "cache/app:pr-12"))
        .unwrap_or_else(|| panic!("no session missed cache/app:pr-12: {sessions:#?}"));

    let text = explain(&["--session", &session.id, "--server", &server.url])
        .ok()
        .stdout;
    assert!(text.contains("cache/app:pr-12"), "{text}");
    // The flag of the client that built (dockerd), with the host it used.
    assert!(
        text.contains(&format!(
            "add `--cache-from {}/cache/app:main` (docker build) as a second cache import",
            server.host
        )),
        "{text}"
    );
    let json = explain(&["--session", &session.id, "--server", &server.url, "--json"])
        .ok()
        .json();
    let miss = json["missed_refs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["reference"] == "cache/app:pr-12")
        .unwrap_or_else(|| panic!("{json:#}"));
    assert_eq!(miss["repository_exists"], true);
    assert_eq!(miss["nearest"][0], "cache/app:main");
}

#[tokio::test]
async fn session_reports_evicted_refs_and_uploads_another_repository_already_held() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[store.eviction]\ninterval = \"1h\"\n\n\
         [[store.eviction.rules]]\nrepositories = \"cache/*\"\npin_tags = [\"main\"]\nmax_age = \"1s\"\n",
    )
    .unwrap();
    let server = Server::start_with_env(&[("LAYERCACHE_CONFIG", config.path().to_str().unwrap())]);
    let api = Api::new(&server);
    api.push_image("cache/app", "main", 1).await;
    api.push_image("cache/app", "pr-7", 2).await;
    // base/img holds an image whose layer the build will upload again elsewhere.
    let shared = pseudo_random(3, 0, 4096);
    let shared_digest = api.push_blob("base/img", &shared).await;
    let base_config = descriptor(OCI_CONFIG, br#"{"architecture":"amd64","os":"linux"}"#);
    api.push_blob("base/img", &base_config.bytes).await;
    let base = image_manifest(
        OCI_MANIFEST,
        &base_config,
        &[descriptor(OCI_LAYER, &shared)],
        None,
    );
    api.push_manifest("base/img", "v1", OCI_MANIFEST, &base)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let pass = api
        .request(reqwest::Method::POST, "/api/v1/gc")
        .send()
        .await
        .unwrap();
    let pass = json_ok(pass).await;
    assert_eq!(pass["evicted"].as_array().unwrap().len(), 1, "{pass:#}");

    // Build `run-9` asks for the evicted tag, then uploads a blob base/img holds.
    let named = |method: reqwest::Method, path: &str| {
        api.request(method, path)
            .header("x-layercache-session", "run-9")
    };
    let miss = named(reqwest::Method::GET, "/v2/cache/app/manifests/pr-7")
        .send()
        .await
        .unwrap();
    assert_eq!(miss.status(), 404);
    let start = named(reqwest::Method::POST, "/v2/app/img/blobs/uploads/")
        .send()
        .await
        .unwrap();
    let location = header(&start, "location");
    let put = named(
        reqwest::Method::PUT,
        &with_query(&location, "digest", &shared_digest),
    )
    .body(shared.clone())
    .send()
    .await
    .unwrap();
    assert_eq!(put.status(), 201);

    let text = explain(&["--session", "run-9", "--server", &server.url])
        .ok()
        .stdout;
    assert!(
        text.contains("cache/app:pr-7 was evicted by the last eviction pass"),
        "{text}"
    );
    assert!(text.contains("pin_tags"), "{text}");
    assert!(text.contains("already held them"), "{text}");
    assert!(text.contains("in base/img"), "{text}");
    // Twice: explain's own blob checks must not count as the blob arriving later.
    let json = explain(&["--session", "run-9", "--server", &server.url, "--json"])
        .ok()
        .json();
    let miss = &json["missed_refs"][0];
    assert_eq!(miss["reference"], "cache/app:pr-7");
    assert_eq!(miss["evicted"]["tags"][0], "pr-7");
    assert_eq!(miss["nearest"][0], "cache/app:main");
    let elsewhere = &json["uploaded_elsewhere"][0];
    assert_eq!(elsewhere["digest"], shared_digest);
    assert_eq!(elsewhere["repositories"][0], "base/img");
    assert_eq!(elsewhere["size"], 4096);
    assert_eq!(json["uploaded_elsewhere_bytes"], 4096);
}

/// A BuildKit-shaped cache: four layers and six records (a source, three steps, the
/// checksum of `app.txt`, which `COPY app.txt` reads), as `(config, layers)`. Builds
/// with different `app` differ in the checksum record and the layers from the COPY on.
fn cache_export(app: u8) -> (Blob, Vec<Blob>) {
    let layer = |stream: u8, len: usize| descriptor(OCI_LAYER, &pseudo_random(app, stream, len));
    let layers = vec![
        descriptor(OCI_LAYER, &pseudo_random(1, 1, 3000)),
        descriptor(OCI_LAYER, &pseudo_random(1, 2, 2000)),
        layer(3, 500),
        layer(4, 1500),
    ];
    let record = |name: &str| digest_of(name.as_bytes());
    // Records in digest order, as BuildKit sorts them; links are indexes into this list.
    let mut named = [
        ("source", json!({ "digest": record("source") })),
        (
            "sum",
            json!({ "digest": record(&format!("app.txt {app}")) }),
        ),
        (
            "busybox",
            json!({ "digest": record("copy busybox"), "inputs": [[{"link": "source"}]], "layers": [{"layer": 0}] }),
        ),
        (
            "setup",
            json!({ "digest": record("run setup"), "inputs": [[{"link": "busybox"}]], "layers": [{"layer": 1}] }),
        ),
        (
            "copy",
            json!({ "digest": record("copy app.txt"), "inputs": [[{"link": "setup"}], [{"link": "sum", "selector": "/app.txt"}]], "layers": [{"layer": 2}] }),
        ),
        (
            "build",
            json!({ "digest": record("run build"), "inputs": [[{"link": "copy"}]], "layers": [{"layer": 3}] }),
        ),
    ];
    named.sort_by(|x, y| x.1["digest"].as_str().cmp(&y.1["digest"].as_str()));
    let index_of = |name: &str| named.iter().position(|(n, _)| *n == name).unwrap();
    let records: Vec<Value> = named
        .iter()
        .map(|(_, r)| {
            let mut r = r.clone();
            if let Some(inputs) = r.get_mut("inputs") {
                for slot in inputs.as_array_mut().unwrap() {
                    for input in slot.as_array_mut().unwrap() {
                        let target = input["link"].as_str().unwrap().to_owned();
                        input["link"] = json!(index_of(&target));
                    }
                }
            }
            r
        })
        .collect();
    let config = json!({
        "layers": [
            { "blob": layers[0].digest, "parent": -1 },
            { "blob": layers[1].digest },
            { "blob": layers[2].digest, "parent": 1 },
            { "blob": layers[3].digest, "parent": 2 },
        ],
        "records": records,
    });
    let config = descriptor(BUILDKIT_CACHE_CONFIG, &serde_json::to_vec(&config).unwrap());
    (config, layers)
}

/// What the steps of [`cache_export`]'s layers were.
const DESCRIPTIONS: [&str; 4] = [
    "COPY busybox /bin/busybox",
    "RUN setup",
    "COPY app.txt /app/",
    "RUN build",
];

/// Layer descriptors with BuildKit's `buildkit/description` annotation.
fn described(layers: &[Blob]) -> Vec<Value> {
    layers
        .iter()
        .zip(DESCRIPTIONS)
        .map(|(l, d)| {
            let mut v = l.json();
            v["annotations"] = json!({ "buildkit/description": d });
            v
        })
        .collect()
}

/// Push `cache_export(app)` as an index (`image_manifest` false) or as an image manifest.
async fn push_cache(api: &Api, repo: &str, tag: &str, app: u8, image_manifest: bool) {
    let (config, layers) = cache_export(app);
    for blob in layers.iter().chain([&config]) {
        api.push_blob(repo, &blob.bytes).await;
    }
    if image_manifest {
        let mut body = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.json(),
            "layers": described(&layers),
        });
        body["config"]["mediaType"] = json!(BUILDKIT_CACHE_CONFIG);
        api.push_manifest(repo, tag, OCI_MANIFEST, &serde_json::to_vec(&body).unwrap())
            .await;
    } else {
        let mut manifests = described(&layers);
        manifests.push(config.json());
        api.push_manifest(repo, tag, OCI_INDEX, &index(OCI_INDEX, &manifests, None))
            .await;
    }
}

/// Write `cache_export(app)` as an OCI layout (image-manifest form) tagged `tag`.
fn write_layout(dir: &Path, tag: &str, app: u8) {
    let (config, layers) = cache_export(app);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.json(),
        "layers": described(&layers),
    }))
    .unwrap();
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for bytes in layers
        .iter()
        .chain([&config])
        .map(|b| &b.bytes)
        .chain([&manifest])
    {
        let digest = digest_of(bytes);
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes).unwrap();
    }
    let mut entry = manifest_descriptor(OCI_MANIFEST, &manifest);
    entry["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [entry] })).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[tokio::test]
async fn cache_exports_in_both_forms_list_records_in_build_order_and_against_names_the_first_new_record()
 {
    let server = Server::start();
    let api = Api::new(&server);
    push_cache(&api, "cache/app", "old", 1, false).await;
    push_cache(&api, "cache/app", "new", 2, true).await;
    let old = format!("{}/cache/app:old", server.host);
    let new = format!("{}/cache/app:new", server.host);

    let listed = explain(&["--cache", &old, "--json"]).ok().json();
    assert_eq!(listed["cache"]["form"], "index");
    let order: Vec<&str> = listed["cache"]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["description"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "source or file checksum (no layer)",
            "COPY busybox /bin/busybox",
            "RUN setup",
            "source or file checksum (no layer)",
            "COPY app.txt /app/",
            "RUN build"
        ]
    );
    let layers: Vec<u64> = listed["cache"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["depth"].as_u64().unwrap())
        .collect();
    assert_eq!(layers, [0, 1, 2, 3]);
    let text = explain(&["--cache", &new]).ok().stdout;
    assert!(text.contains("image-manifest=true"), "{text}");
    assert!(text.contains("6 record(s), 4 layer(s)"), "{text}");

    let compared = explain(&["--cache", &new, "--against", &old, "--json"])
        .ok()
        .json();
    let c = &compared["comparison"];
    assert_eq!(
        (c["reused"].as_u64(), c["new"].as_u64()),
        (Some(3), Some(3)),
        "{c:#}"
    );
    assert_eq!(c["first_new"], 4, "{c:#}");
    assert_eq!(c["first_new_step"], 5, "{c:#}");
    assert_eq!(c["new_layers"], 2);
    assert_eq!(c["new_layer_bytes"], 500 + 1500);
    let first_new = &compared["cache"]["records"][3];
    assert_eq!(first_new["digest"], digest_of(b"app.txt 2"));
    let text = explain(&["--cache", &new, "--against", &old]).ok().stdout;
    assert!(text.contains("3 record(s) reused, 3 new"), "{text}");
    assert!(text.contains("First new record: #4"), "{text}");
    assert!(text.contains("First new step: #5"), "{text}");
    assert!(text.contains("(COPY app.txt /app/)"), "{text}");

    // Two caches given as A and B compare the same way.
    let ab = explain(&[&old, &new, "--json"]).ok().json();
    assert_eq!(ab["comparison"]["first_new_step"], 5);

    // The same export as an OCI layout on disk.
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), "buildcache", 2);
    let layout = format!("oci:{}:buildcache", dir.path().display());
    let compared = explain(&["--cache", &layout, "--against", &old, "--json"])
        .ok()
        .json();
    assert_eq!(compared["comparison"]["first_new"], 4);
    assert_eq!(compared["cache"]["form"], "image_manifest");

    // A registry export is a usable --cache-from.
    let verdict = explain(&["--cache-from", &old, "--json"]).ok().json();
    assert_eq!(verdict["usable"], true);
    assert_eq!(verdict["kind"], "registry_export");
}

/// An OCI image (config with `history`) of one layer, under `repo:tag`; returns the
/// manifest.
async fn push_small_image(api: &Api, repo: &str, tag: &str, config: &[u8]) -> Vec<u8> {
    let layer = descriptor(OCI_LAYER, &pseudo_random(9, 9, 100));
    api.push_blob(repo, &layer.bytes).await;
    let config = descriptor(OCI_CONFIG, config);
    api.push_blob(repo, &config.bytes).await;
    let manifest = image_manifest(OCI_MANIFEST, &config, &[layer], None);
    api.push_manifest(repo, tag, OCI_MANIFEST, &manifest).await;
    manifest
}

#[tokio::test]
async fn indexes_resolve_to_the_platform_asked_for() {
    let server = Server::start();
    let api = Api::new(&server);
    let config = |arch: &str| {
        format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}},
            "history":[{{"created_by":"COPY {arch} / # buildkit"}}]}}"#,
            "1".repeat(64)
        )
    };
    let amd64 = push_small_image(&api, "multi/app", "amd64", config("amd64").as_bytes()).await;
    let arm64 = push_small_image(&api, "multi/app", "arm64", config("arm64").as_bytes()).await;
    let mut entries = vec![
        manifest_descriptor(OCI_MANIFEST, &amd64),
        manifest_descriptor(OCI_MANIFEST, &arm64),
    ];
    entries[0]["platform"] = json!({ "os": "linux", "architecture": "amd64" });
    entries[1]["platform"] = json!({ "os": "linux", "architecture": "arm64" });
    api.push_manifest(
        "multi/app",
        "v1",
        OCI_INDEX,
        &index(OCI_INDEX, &entries, None),
    )
    .await;
    let reference = format!("{}/multi/app:v1", server.host);
    let amd = format!("{}/multi/app:amd64", server.host);

    let json = explain(&[&reference, &amd, "--json"]).ok().json();
    assert_eq!(json["identical"], true, "linux/amd64 by default: {json:#}");
    let json = explain(&[&reference, &amd, "--platform", "linux/arm64", "--json"])
        .ok()
        .json();
    assert_eq!(json["first_difference"]["instruction"], "COPY amd64 /");
    assert_eq!(json["first_difference"]["instruction_a"], "COPY arm64 /");
    let missing = explain(&[&reference, &amd, "--platform", "linux/s390x"]).failed();
    assert!(
        missing.stderr.contains("linux/amd64, linux/arm64"),
        "{}",
        missing.stderr
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_a_non_zero_exit_never_a_panic() {
    let server = Server::start();
    let api = Api::new(&server);
    let host = &server.host;

    // An unknown reference.
    let unknown = explain(&[
        &format!("{host}/nope/app:v1"),
        &format!("{host}/nope/app:v2"),
    ])
    .failed();
    assert!(unknown.stderr.contains("no manifest"), "{}", unknown.stderr);
    assert!(unknown.stderr.contains("nope/app:v1"), "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("there is no repository nope/app"),
        "{}",
        unknown.stderr
    );

    // Not an image: an artifact whose config is the empty descriptor.
    let empty = descriptor(OCI_EMPTY, b"{}");
    api.push_blob("things/sbom", &empty.bytes).await;
    let artifact = image_manifest(
        OCI_MANIFEST,
        &empty,
        &[],
        Some(json!({"artifactType": "application/spdx+json"})),
    );
    api.push_manifest("things/sbom", "v1", OCI_MANIFEST, &artifact)
        .await;
    let not_image = explain(&["--cache-from", &format!("{host}/things/sbom:v1")]).failed();
    assert!(
        not_image.stderr.contains("not a container image"),
        "{}",
        not_image.stderr
    );
    assert!(
        not_image.stderr.contains("application/spdx+json"),
        "{}",
        not_image.stderr
    );

    // A malformed image config, and one that is valid JSON but not a config.
    push_small_image(&api, "broken/app", "json", b"{\"architecture\": ").await;
    // A tag that is not there: the nearest that are.
    let typo = explain(&["--cache-from", &format!("{host}/broken/app:jsn")]).failed();
    assert!(
        typo.stderr
            .contains("broken/app has no tag jsn; its nearest tags: json"),
        "{}",
        typo.stderr
    );
    push_small_image(
        &api,
        "broken/app",
        "shape",
        br#"{"architecture":"amd64","os":"linux"}"#,
    )
    .await;
    for tag in ["json", "shape"] {
        let image = format!("{host}/broken/app:{tag}");
        let broken = explain(&[&image, &image]).failed();
        assert!(
            broken.stderr.contains("the image config is malformed"),
            "{tag}: {}",
            broken.stderr
        );
        let broken = explain(&["--cache-from", &image]).failed();
        assert!(broken.stderr.contains("malformed"), "{}", broken.stderr);
    }

    // A cache export whose config links to a record that is not there.
    let config = descriptor(
        BUILDKIT_CACHE_CONFIG,
        br#"{"records":[{"digest":"sha256:x","inputs":[[{"link":9}]]}]}"#,
    );
    api.push_blob("broken/cache", &config.bytes).await;
    api.push_manifest(
        "broken/cache",
        "v1",
        OCI_INDEX,
        &index(OCI_INDEX, &[config.json()], None),
    )
    .await;
    let broken = explain(&["--cache", &format!("{host}/broken/cache:v1")]).failed();
    assert!(
        broken.stderr.contains("cache config is malformed"),
        "{}",
        broken.stderr
    );

    // An image without cache metadata given to --cache.
    let plain =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_small_image(&api, "plain/app", "v1", plain).await;
    let no_cache = explain(&["--cache", &format!("{host}/plain/app:v1")]).failed();
    assert!(
        no_cache.stderr.contains("without cache metadata"),
        "{}",
        no_cache.stderr
    );

    // References that do not parse, layouts that are not, servers that do not answer.
    let bad = explain(&["Not A Ref", &format!("{host}/plain/app:v1")]).failed();
    assert!(
        bad.stderr.contains("not an image reference"),
        "{}",
        bad.stderr
    );
    let dir = tempfile::tempdir().unwrap();
    let layout = explain(&["--cache", &format!("oci:{}", dir.path().display())]).failed();
    assert!(
        layout.stderr.contains("not an OCI image layout"),
        "{}",
        layout.stderr
    );
    let down = explain(&["--session", "run-1", "--server", "http://127.0.0.1:9"]).failed();
    assert!(
        down.stderr.contains("reaching layercache"),
        "{}",
        down.stderr
    );
    let unknown = explain(&["--session", "run-404", "--server", &server.url]).failed();
    assert!(
        unknown.stderr.contains("no build session"),
        "{}",
        unknown.stderr
    );
    let unreachable = explain(&["--cache-from", "127.0.0.1:9/app:v1"]).failed();
    assert!(
        unreachable.stderr.contains("cannot reach"),
        "{}",
        unreachable.stderr
    );

    // Usage errors are clap's.
    assert_eq!(explain(&[&format!("{host}/plain/app:v1")]).code, 2);
    assert_eq!(explain(&[]).code, 2);
}

/// A registry cache export in BuildKit's default shape names no step; the image the
/// same build pushed (same layers) names them through its history: found in the same
/// registry, or given with `--image`. The server says which manifest carries cache.
#[tokio::test]
async fn a_cache_export_names_its_steps_from_the_history_of_an_image_of_the_same_build() {
    let server = Server::start();
    let api = Api::new(&server);
    let (config, layers) = cache_export(1);
    for blob in layers.iter().chain([&config]) {
        api.push_blob("cache/app", &blob.bytes).await;
    }
    let mut manifests: Vec<Value> = layers.iter().map(|l| l.json()).collect();
    manifests.push(config.json());
    let bare = index(OCI_INDEX, &manifests, None);
    api.push_manifest("cache/app", "bare", OCI_INDEX, &bare)
        .await;
    let history: Vec<Value> = DESCRIPTIONS
        .iter()
        .map(|d| json!({ "created_by": format!("{d} # buildkit") }))
        .collect();
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let image_config = json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": history,
    });
    let image_config = descriptor(OCI_CONFIG, &serde_json::to_vec(&image_config).unwrap());
    for blob in layers.iter().chain([&image_config]) {
        api.push_blob("team/app", &blob.bytes).await;
    }
    let image = image_manifest(OCI_MANIFEST, &image_config, &layers, None);
    api.push_manifest("team/app", "v1", OCI_MANIFEST, &image)
        .await;

    let cache = format!("{}/cache/app:bare", server.host);
    let image = format!("{}/team/app:v1", server.host);
    let descriptions = |json: &Value| -> Vec<String> {
        json["cache"]["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["description"].as_str().unwrap().to_owned())
            .collect()
    };
    let named = |step: &str| format!("{step}  (history of {image})");
    let expected = [
        "source or file checksum (no layer)".to_owned(),
        named("COPY busybox /bin/busybox"),
        named("RUN setup"),
        "source or file checksum (no layer)".to_owned(),
        named("COPY app.txt /app/"),
        named("RUN build"),
    ];
    let found = explain(&["--cache", &cache, "--json"]).ok().json();
    assert_eq!(descriptions(&found), expected);
    let given = explain(&["--cache", &cache, "--image", &image, "--json"])
        .ok()
        .json();
    assert_eq!(descriptions(&given), expected);

    let records = |repo: &str, tag: &str| {
        let url = server.at(&format!("/v2/{repo}/manifests/{tag}"));
        async move {
            let response = reqwest::Client::new()
                .head(url)
                .header("accept", format!("{OCI_INDEX}, {OCI_MANIFEST}"))
                .send()
                .await
                .unwrap();
            let value = response.headers().get("layercache-cache-records").cloned();
            value.map(|v| v.to_str().unwrap().to_owned())
        }
    };
    assert_eq!(
        records("cache/app", "bare").await.as_deref(),
        Some("export")
    );
    assert_eq!(records("team/app", "v1").await.as_deref(), Some("none"));
}
