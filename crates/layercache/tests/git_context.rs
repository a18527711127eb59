//! What a git build context does to the cache, from BuildKit's own CACHED markers: the
//! ground truth behind `lint` saying nothing of `docker/bake-action` steps without
//! `source:`. A build of the next commit, on a daemon wiped of all build cache, imports
//! the first commit's inline cache and reuses every step before the whole-context
//! `COPY`; only that copy and what follows it run again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
COPY nonce deps.txt /
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox cat /deps.txt > /installed"]
COPY . /src
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox ls /src > /built"]
"#;

/// `git-daemon` serving a directory, stopped on drop.
struct GitDaemon(Child);

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    common::run_ok(
        Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.name=ci", "-c", "user.email=ci@localhost"])
            .args(args),
    )
}

#[test]
fn a_git_context_at_the_next_commit_reuses_the_steps_before_the_whole_context_copy() {
    if !common::require_tool("dockerd") || !common::require_tool("git") {
        return;
    }
    let server = common::Server::start();
    let base = tempfile::tempdir().unwrap();
    let work = base.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let context = common::busybox_context(&server, "deps.txt", "deps v1\n");
    for name in ["busybox", "nonce", "deps.txt"] {
        std::fs::copy(context.path().join(name), work.join(name)).unwrap();
    }
    std::fs::write(work.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(work.join("code.txt"), "code v1\n").unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-qm", "one"]);
    let first = git(&work, &["rev-parse", "HEAD"]).trim().to_owned();
    std::fs::write(work.join("code.txt"), "code v2\n").unwrap();
    git(&work, &["commit", "-qam", "two"]);
    let second = git(&work, &["rev-parse", "HEAD"]).trim().to_owned();
    git(base.path(), &["clone", "-q", "--bare", "work", "repo.git"]);

    let port = common::free_port();
    // The daemon itself, not `git daemon`, which would leave it running when killed.
    let exec_path = git(base.path(), &["--exec-path"]);
    let daemon = Command::new(Path::new(exec_path.trim()).join("git-daemon"))
        .args(["--export-all", "--reuseaddr", "--listen=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.path().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git-daemon");
    let _daemon = GitDaemon(daemon);
    let remote = format!("git://127.0.0.1:{port}/repo.git");
    let url = |commit: &str| format!("{remote}#{commit}");
    // Ready when the repository answers.
    let ready = (0..100).any(|_| {
        common::run(Command::new("git").args(["ls-remote", &remote])).0 || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            false
        }
    });
    assert!(ready, "git-daemon did not answer");

    let tag = format!("{}/gitctx/app:cache", server.host);
    let prune = || common::run_ok(&mut common::docker(&["builder", "prune", "-af"]));
    prune();
    let cold = common::docker_build(Path::new(&url(&first)), &tag, true, None);
    let cold_steps = common::step_outcomes(&cold);
    assert!(
        cold_steps.values().all(|end| end != "CACHED"),
        "the first build ran cold:\n{cold}"
    );
    common::run_ok(&mut common::docker(&["push", &tag]));
    prune();
    common::run(&mut common::docker(&["image", "rm", "-f", &tag]));

    let warm = common::docker_build(
        Path::new(&url(&second)),
        "gitctx-next:latest",
        false,
        Some(&tag),
    );
    let steps = common::step_outcomes(&warm);
    let outcome = |prefix: &str| {
        steps
            .iter()
            .find(|(name, _)| name.contains(prefix))
            .map(|(_, end)| end.as_str())
            .unwrap_or_else(|| panic!("no step {prefix}:\n{warm}"))
    };
    assert_eq!(outcome("[1/5] COPY busybox"), "CACHED", "{warm}");
    assert_eq!(outcome("[2/5] COPY nonce deps.txt"), "CACHED", "{warm}");
    assert_eq!(outcome("[3/5] RUN"), "CACHED", "{warm}");
    assert_ne!(outcome("[4/5] COPY . /src"), "CACHED", "{warm}");
    assert_ne!(outcome("[5/5] RUN"), "CACHED", "{warm}");

    prune();
    common::run(&mut common::docker(&[
        "image",
        "rm",
        "-f",
        "gitctx-next:latest",
    ]));
}
