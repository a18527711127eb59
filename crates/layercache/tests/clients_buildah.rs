//! buildah against layercache: `bud --layers --cache-to/--cache-from` pushes one cache
//! image per step; a build on empty local storage pulls every step from layercache
//! instead of running it, and produces the same image.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

/// Each `RUN` writes MiBs of random bytes, so a step that runs again cannot produce the
/// same layer. Exec form: buildah ignores `SHELL` for OCI images.
const CONTAINERFILE: &str = r#"FROM scratch
COPY nonce /nonce
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /data && /bin/busybox dd if=/dev/urandom of=/data/a.bin bs=1M count=16"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/data/b.bin bs=1M count=16"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/data/c.bin bs=1M count=16"]
"#;

/// Build `context` with vfs storage under `storage` (empty: a clean machine), exporting
/// and importing the layer cache at `cache`. Returns the output and the image id.
fn build(context: &Path, storage: &Path, cache: &str) -> (String, String) {
    let iid = storage.join("iid");
    let output = common::run_ok(
        Command::new("buildah")
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("runroot"))
            .args(["--storage-driver", "vfs", "bud", "--isolation", "chroot"])
            .args(["--layers", "--tls-verify=false", "--cache-to", cache])
            .args(["--cache-from", cache, "--iidfile"])
            .arg(&iid)
            .args(["-t", "localhost/layercache-buildah:test"])
            .arg(context),
    );
    let id = std::fs::read_to_string(&iid).unwrap().trim().to_owned();
    (output, id)
}

/// The output of each `STEP i/n: INSTRUCTION` after `FROM`, headed by its instruction.
fn steps(output: &str) -> Vec<&str> {
    output
        .split("STEP ")
        .skip(1)
        .filter(|step| !step.contains(": FROM "))
        .collect()
}

#[test]
fn a_build_on_empty_storage_uses_every_step_from_the_remote_layer_cache() {
    if !common::require_tool("buildah") {
        return;
    }
    let server = common::Server::start();
    let context = common::busybox_context(&server, "Containerfile", CONTAINERFILE);
    let cache = format!("{}/cache/buildah", server.host);
    let instructions = CONTAINERFILE.lines().count() - 1;

    // Cold: every step runs and pushes its cache image.
    let first_storage = tempfile::tempdir().unwrap();
    let (cold, built) = build(context.path(), first_storage.path(), &cache);
    let cold_steps = steps(&cold);
    assert_eq!(cold_steps.len(), instructions, "{cold}");
    for step in &cold_steps {
        assert!(
            step.contains(&format!("--> Pushing cache {cache}:")),
            "no cache pushed for STEP {step}\n{cold}"
        );
        assert!(!step.contains("Using cache"), "STEP {step}\n{cold}");
    }
    let runs = CONTAINERFILE
        .lines()
        .filter(|l| l.starts_with("RUN "))
        .count();
    assert_eq!(cold.matches("records in").count(), runs, "{cold}");
    drop(first_storage);

    // Warm, on new empty storage: every step is pulled from layercache, none runs.
    let second_storage = tempfile::tempdir().unwrap();
    let (warm, rebuilt) = build(context.path(), second_storage.path(), &cache);
    let warm_steps = steps(&warm);
    assert_eq!(warm_steps.len(), instructions, "{warm}");
    for step in &warm_steps {
        assert!(
            step.contains(&format!("--> Cache pulled from remote {cache}:")),
            "STEP {step} was not pulled from the cache\n{warm}"
        );
        assert!(step.contains("--> Using cache"), "STEP {step}\n{warm}");
    }
    assert!(!warm.contains("records in"), "a RUN step ran:\n{warm}");
    assert_eq!(rebuilt, built, "the cached build is a different image");
}
