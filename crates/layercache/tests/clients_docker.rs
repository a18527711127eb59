//! dockerd's BuildKit against layercache: a multi-stage image built with the inline
//! cache and pushed is, on a daemon wiped of every image and all build cache, rebuilt
//! with every step CACHED and pulled back as the very same image.
//!
//! dockerd is one shared daemon, so everything touching it lives in one test function.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

/// The Debian docker.io client: newer clients without buildx refuse `DOCKER_BUILDKIT=1`.
const DOCKER: &str = "/usr/bin/docker";

/// Steps in three stages; the final stage takes a file from `builder`. Every `RUN`
/// writes tens of MiB of random bytes, so a step that runs again cannot produce the
/// same layer.
const DOCKERFILE: &str = r#"FROM scratch AS base
COPY nonce /nonce
COPY busybox /bin/busybox
SHELL ["/bin/busybox", "sh", "-c"]
RUN /bin/busybox mkdir -p /data /tmp && /bin/busybox dd if=/dev/urandom of=/data/base.bin bs=1M count=24

FROM base AS builder
RUN /bin/busybox dd if=/dev/urandom of=/data/tool.bin bs=1M count=24

FROM base
RUN /bin/busybox dd if=/dev/urandom of=/data/a.bin bs=1M count=32
COPY --from=builder /data/tool.bin /data/tool.bin
RUN /bin/busybox dd if=/dev/urandom of=/data/b.bin bs=1M count=32
RUN /bin/busybox dd if=/dev/urandom of=/data/c.bin bs=1M count=32
"#;

fn image_id(reference: &str) -> String {
    common::run_ok(&mut common::docker(&[
        "image", "inspect", "--format", "{{.Id}}", reference,
    ]))
    .trim()
    .to_owned()
}

/// Remove the images and all build cache; how the build cache prune went.
fn remove(tag: &str, ids: &[&str]) -> (bool, String) {
    let pruned = common::run(&mut common::docker(&["builder", "prune", "-af"]));
    for image in ids.iter().chain([&tag]) {
        common::run(&mut common::docker(&["image", "rm", "-f", image]));
    }
    pruned
}

/// [`remove`], then check that the images are gone.
fn wipe(tag: &str, ids: &[&str]) {
    let (pruned, out) = remove(tag, ids);
    assert!(pruned, "docker builder prune failed:\n{out}");
    let images = common::run_ok(&mut common::docker(&[
        "images",
        "-a",
        "--no-trunc",
        "--format",
        "{{.Repository}}:{{.Tag}} {{.ID}}",
    ]));
    for gone in ids.iter().chain([&tag]) {
        assert!(
            !images.contains(gone),
            "{gone} survived the wipe:\n{images}"
        );
    }
}

/// Leaves the daemon without this test's images and build cache, also on failure.
struct Cleanup<'a> {
    tag: &'a str,
    ids: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let ids: Vec<&str> = self.ids.iter().map(String::as_str).collect();
        remove(self.tag, &ids);
    }
}

#[test]
fn inline_cache_makes_every_step_cached_on_a_wiped_daemon_and_the_pull_is_the_same_image() {
    if !common::require_tool(DOCKER) {
        return;
    }
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );

    let server = common::Server::start();
    let context = common::busybox_context(&server, "Dockerfile", DOCKERFILE);
    let tag = format!("{}/cache/app:v1", server.host);
    let mut cleanup = Cleanup {
        tag: &tag,
        ids: Vec::new(),
    };
    wipe(&tag, &[]);

    // Cold build on an empty builder: every step runs.
    let cold = common::docker_build(context.path(), &tag, true, None);
    let cold_steps = common::step_outcomes(&cold);
    let instructions = DOCKERFILE
        .lines()
        .filter(|l| l.starts_with("RUN ") || l.starts_with("COPY "))
        .count();
    assert_eq!(
        cold_steps.len(),
        instructions,
        "steps: {cold_steps:#?}\n{cold}"
    );
    for (step, end) in &cold_steps {
        assert!(
            end.starts_with("DONE"),
            "cold build: {step} ended {end}\n{cold}"
        );
    }
    let built = image_id(&tag);
    cleanup.ids.push(built.clone());
    let push = common::run_ok(&mut common::docker(&["push", &tag]));
    let pushed_digest = push
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in the push output:\n{push}"))
        .to_owned();

    // Warm build on a wiped daemon, importing the inline cache: nothing runs.
    wipe(&tag, &[&built]);
    let warm = common::docker_build(context.path(), &tag, true, Some(&tag));
    assert!(
        warm.contains(&format!("importing cache manifest from {tag}")),
        "{warm}"
    );
    common::assert_same_steps_all_cached(&cold_steps, &warm);
    assert_eq!(
        image_id(&tag),
        built,
        "the cached rebuild is a different image"
    );

    // Pull on a wiped daemon: the image built first, under the digest pushed.
    wipe(&tag, &[&built]);
    common::run_ok(&mut common::docker(&["pull", &tag]));
    assert_eq!(image_id(&tag), built);
    let repo_digests = common::run_ok(&mut common::docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &tag,
    ]));
    assert!(
        repo_digests.contains(&pushed_digest),
        "{pushed_digest} not in {repo_digests}"
    );
}
