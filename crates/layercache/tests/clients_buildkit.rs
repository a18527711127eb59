//! BuildKit's own daemon (`buildkitd`, driven by `buildctl`) against layercache with its
//! registry cache exporter: a multi-stage image is pushed and its cache exported to a
//! reference of its own with `mode=max`; on a fresh buildkitd (nothing built, nothing
//! cached) the image is rebuilt from that reference alone with every step `CACHED`,
//! and so is an intermediate stage that only `mode=max` exports; the rebuilt image's
//! layers, read back from layercache, are the pushed ones byte for byte; and `expect`
//! judges the two builds' sessions as what they were: a cold build that only wrote, and a
//! warm one that imported the cache and missed nothing.
//!
//! Debian packages neither buildkitd nor buildctl and no registry this project reaches
//! ships them, so the test runs where both are on `PATH` (the README says how to build
//! them) and is skipped elsewhere, with `CI=true` too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// An intermediate stage (`tool`) whose layer is not in the final image (which copies
/// one of its two files): only a `mode=max` export carries its cache. Every `RUN` writes random bytes, so a step that
/// runs again cannot produce the same layer.
const DOCKERFILE: &str = r#"FROM scratch AS base
COPY nonce /nonce
COPY busybox /bin/busybox
SHELL ["/bin/busybox", "sh", "-c"]
RUN /bin/busybox mkdir -p /data && /bin/busybox dd if=/dev/urandom of=/data/base.bin bs=1M count=16

FROM base AS tool
RUN /bin/busybox dd if=/dev/urandom of=/data/tool.bin bs=1M count=16 && /bin/busybox dd if=/dev/urandom of=/data/objects.bin bs=1M count=4

FROM base
COPY --from=tool /data/tool.bin /data/tool.bin
RUN /bin/busybox dd if=/dev/urandom of=/data/app.bin bs=1M count=16
"#;

/// The media type of BuildKit's cache configuration in a registry cache index.
const CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";

/// A buildkitd with its state in a directory of its own, stopped when dropped.
struct Buildkitd {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Buildkitd {
    /// Start one that reaches `registry` over plain HTTP, and wait until it answers.
    fn start(registry: &str) -> Buildkitd {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("buildkitd.toml");
        std::fs::write(&config, format!("[registry.\"{registry}\"]\nhttp = true\n")).unwrap();
        let addr = format!("unix://{}", dir.path().join("buildkitd.sock").display());
        let log = std::fs::File::create(dir.path().join("buildkitd.log")).unwrap();
        let child = Command::new("buildkitd")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--addr", &addr, "--oci-worker-net=host"])
            .args(["--oci-worker=true", "--containerd-worker=false"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting buildkitd");
        let mut daemon = Buildkitd { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("buildkitd exited with {status}: {}", daemon.log());
            }
            if common::run(&mut daemon.buildctl(&["debug", "workers"])).0 {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "buildkitd did not answer: {}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("buildkitd.log")).unwrap_or_default()
    }

    fn buildctl(&self, args: &[&str]) -> Command {
        let mut command = Command::new("buildctl");
        command.args(["--addr", &self.addr]).args(args);
        command
    }

    /// `buildctl build` of the Dockerfile in `context` with `args`; the progress output.
    fn build(&self, context: &Path, args: &[&str]) -> String {
        let local = |name: &str| format!("{name}={}", context.display());
        let mut command = self.buildctl(&["build", "--progress=plain"]);
        command
            .args(["--frontend", "dockerfile.v0"])
            .args([
                "--local",
                &local("context"),
                "--local",
                &local("dockerfile"),
            ])
            .args(args);
        common::run_ok(&mut command)
    }
}

impl Drop for Buildkitd {
    fn drop(&mut self) {
        // A graceful stop unmounts its snapshots before the directory goes.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The raw manifest or index at `reference`, as skopeo reads it from the registry.
fn raw_manifest(reference: &str) -> Value {
    let out = common::run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The digests of the entries of `list` (`layers` or `manifests`) whose media type is
/// `CACHE_CONFIG` if `config`, and any other if not.
fn digests(doc: &Value, list: &str, config: bool) -> BTreeSet<String> {
    doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {doc}"))
        .iter()
        .filter(|d| (d["mediaType"] == CACHE_CONFIG) == config)
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// `layercache expect` for `cache/app` since `since` with `checks`: whether it passed,
/// and what it printed.
fn expect(server: &common::Server, since: u64, checks: &[&str]) -> (bool, String) {
    let out = common::expect(server, "cache/app", &since.to_string(), checks);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn registry_cache_mode_max_rebuilds_every_stage_cached_on_a_fresh_buildkitd() {
    if !(common::on_path("buildkitd") && common::on_path("buildctl")) {
        eprintln!("SKIPPED: buildkitd and buildctl are not on PATH (Debian packages neither)");
        return;
    }
    if !common::require_tool("skopeo") {
        return;
    }
    let server = common::Server::start();
    let cold_since = now_secs();
    let context = common::busybox_context(&server, "Dockerfile", DOCKERFILE);
    let image = format!("{}/cache/app:v1", server.host);
    let cache = format!("{}/cache/app:buildcache", server.host);
    let export = format!("type=registry,ref={cache},mode=max,oci-mediatypes=true");
    let import = format!("type=registry,ref={cache}");

    // Cold, on an empty builder: every step runs; the image is pushed and the cache
    // exported beside it.
    let cold = {
        let builder = Buildkitd::start(&server.host);
        builder.build(
            context.path(),
            &[
                "--output",
                &format!("type=image,name={image},push=true"),
                "--export-cache",
                &export,
            ],
        )
    };
    let cold_steps = common::step_outcomes(&cold);
    let instructions = DOCKERFILE
        .lines()
        .filter(|l| l.starts_with("RUN ") || l.starts_with("COPY "))
        .count();
    assert_eq!(cold_steps.len(), instructions, "{cold_steps:#?}\n{cold}");
    assert!(
        cold_steps.values().all(|end| end.starts_with("DONE")),
        "{cold}"
    );

    // Its build session wrote to the cache and read nothing from it (judged before the
    // reads below, which are a client's reads like any other).
    let (passed, out) = expect(&server, cold_since, &["--writes"]);
    assert!(passed, "{out}");
    let (passed, out) = expect(&server, cold_since, &["--reads"]);
    assert!(!passed, "a cold build passed --reads:\n{out}");

    // The cache is an OCI index of BuildKit's cache config and every layer: the image's,
    // and the `tool` stage's, which the image does not hold.
    let pushed = raw_manifest(&image);
    let image_layers = digests(&pushed, "layers", false);
    assert!(!image_layers.is_empty(), "{pushed}");
    let index = raw_manifest(&cache);
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    assert_eq!(digests(&index, "manifests", true).len(), 1, "{index}");
    let cache_layers = digests(&index, "manifests", false);
    assert!(
        cache_layers.is_superset(&image_layers) && cache_layers.len() > image_layers.len(),
        "mode=max exported {cache_layers:?}; the image has {image_layers:?}"
    );

    // Warm, on a fresh builder importing the cache alone: every step CACHED, and the
    // image's layers come from layercache as pushed.
    let warm_since = now_secs();
    let archive_dir = tempfile::tempdir().unwrap();
    let archive = archive_dir.path().join("image.tar");
    let warm = {
        let builder = Buildkitd::start(&server.host);
        builder.build(
            context.path(),
            &[
                "--import-cache",
                &import,
                "--output",
                &format!("type=oci,dest={}", archive.display()),
            ],
        )
    };
    assert!(
        warm.contains(&format!("importing cache manifest from {cache}")),
        "{warm}"
    );
    assert_nothing_ran(&cold_steps, &warm);
    let layout: PathBuf = archive_dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    common::run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    );
    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let oci_index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let read = |digest: &str| -> Value {
        serde_json::from_slice(&std::fs::read(blob(digest)).unwrap()).unwrap()
    };
    let manifest = read(oci_index["manifests"][0]["digest"].as_str().unwrap());
    assert_eq!(digests(&manifest, "layers", false), image_layers);
    for layer in &image_layers {
        assert_eq!(
            &common::file_digest(&blob(layer)),
            layer,
            "layer bytes differ"
        );
    }
    // Its build session imported the cache and missed nothing.
    let (passed, out) = expect(&server, warm_since, &["--reads", "--min-hit-ratio", "0.9"]);
    assert!(passed && out.contains(" 0 miss(es)"), "{out}");

    // The intermediate stage alone, on another fresh builder: cached too, which only
    // the mode=max export makes possible.
    let tool = {
        let builder = Buildkitd::start(&server.host);
        builder.build(
            context.path(),
            &["--opt", "target=tool", "--import-cache", &import],
        )
    };
    let tool_steps = common::step_outcomes(&tool);
    assert!(
        tool_steps.keys().any(|step| step.contains("[tool ")),
        "{tool}"
    );
    assert_nothing_ran(&tool_steps, &tool);
}

/// Assert that the build that printed `warm` went through the steps `expected` and ran
/// none of them: each is `CACHED`, except that BuildKit 0.11 reports a target's last
/// step `DONE` when all it did was fetch the step's imported layers for the export. Its
/// process did not run, so it printed nothing, while every `RUN` here prints when it
/// runs (`dd` its record counts).
fn assert_nothing_ran(expected: &BTreeMap<String, String>, warm: &str) {
    let steps = common::step_outcomes(warm);
    assert_eq!(
        steps.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{warm}"
    );
    assert!(!warm.contains("records in"), "a RUN ran again:\n{warm}");
    let ran: Vec<_> = steps
        .iter()
        .filter(|(name, end)| *end != "CACHED" && !name.contains("] RUN "))
        .collect();
    assert!(ran.is_empty(), "steps not CACHED: {ran:#?}\n{warm}");
}
