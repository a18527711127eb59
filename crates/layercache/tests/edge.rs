//! An edge in front of a central layercache (two processes, the centre in `token` mode
//! and the edge holding a token minted there), driven by dockerd's BuildKit: an image
//! pushed through the edge is pullable from the centre; a warm build through a cold edge
//! is fully cached and fills the edge from the centre; the next warm build is served from
//! the edge's own disk, with no fill in its session.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;

use serde_json::Value;

const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/big bs=1M count=24"]
COPY nonce /nonce
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox cat /nonce /nonce > /twice"]
"#;

/// Removes the test's images and the builder's cache, also on failure.
struct Wipe(Vec<String>);

impl Wipe {
    fn now(&self) {
        common::run(&mut common::docker(&["builder", "prune", "-af"]));
        for tag in &self.0 {
            common::run(&mut common::docker(&["image", "rm", "-f", tag]));
        }
    }
}

impl Drop for Wipe {
    fn drop(&mut self) {
        self.now();
    }
}

/// `docker login` as `user` (any password names the build session) until dropped.
struct Login(String);

impl Login {
    fn new(host: &str, user: &str) -> Login {
        let out = common::run_ok(&mut common::docker(&[
            "login", "-u", user, "-p", "any", host,
        ]));
        assert!(out.contains("Login Succeeded"), "{out}");
        Login(host.to_owned())
    }
}

impl Drop for Login {
    fn drop(&mut self) {
        common::run(&mut common::docker(&["logout", &self.0]));
    }
}

/// An edge in front of `centre`, presenting `token_file`'s token.
fn edge(centre: &common::Server, token_file: &std::path::Path) -> common::Server {
    common::Server::start_with_env(&[
        ("LAYERCACHE_UPSTREAM", &centre.url),
        (
            "LAYERCACHE_UPSTREAM_TOKEN_FILE",
            token_file.to_str().unwrap(),
        ),
        ("LAYERCACHE_SERVER__SESSIONS__ASK_CREDENTIALS", "true"),
    ])
}

/// Every build step ended `CACHED`.
fn assert_all_cached(output: &str) {
    let steps = common::step_outcomes(output);
    assert!(steps.len() >= 4, "{output}");
    for (step, end) in &steps {
        assert_eq!(end, "CACHED", "{step} ran:\n{output}");
    }
}

/// The session named `name` (its counts are fields of it; the API reports it open or
/// closed).
fn session(server: &common::Server, name: &str) -> Value {
    let sessions: Vec<Value> =
        serde_json::from_str(&get(server, "/api/v1/sessions?since=0")).unwrap();
    let found = sessions
        .into_iter()
        .find(|s| s["name"].as_str() == Some(name));
    found.unwrap_or_else(|| panic!("no session {name}"))
}

/// The body of `GET path`.
fn get(server: &common::Server, path: &str) -> String {
    let url = server.at(path);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let response = reqwest::get(url).await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    })
}

fn count(counts: &Value, field: &str) -> u64 {
    counts[field].as_u64().unwrap_or(0)
}

#[test]
fn an_edge_fills_from_its_centre_keeps_a_copy_and_passes_pushes_through() {
    if !common::require_tool("/usr/bin/docker") {
        return;
    }
    let centre = common::Server::start_with_env(&[("LAYERCACHE_SERVER__AUTH__MODE", "token")]);
    let token = common::mint_token(
        centre.data_dir(),
        &["--pull", "edge/**", "--push", "edge/**"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &token).unwrap();

    // Push through a first edge.
    let first = edge(&centre, &token_file);
    let context = common::busybox_context(&first, "Dockerfile", DOCKERFILE);
    let pushed = format!("{}/edge/app:1", first.host);
    let mut wipe = Wipe(vec![pushed.clone()]);
    wipe.now();
    let cold = {
        let _login = Login::new(&first.host, "cold");
        let cold = common::docker_build(context.path(), &pushed, true, None);
        common::run_ok(&mut common::docker(&["push", &pushed]));
        cold
    };
    assert!(
        common::step_outcomes(&cold)
            .values()
            .any(|e| e.starts_with("DONE"))
    );
    let pushed_counts = session(&first, "cold");
    assert!(
        count(&pushed_counts, "manifests_written") >= 1,
        "{pushed_counts}"
    );

    // The centre holds the same image.
    let inspect = |host: &str| {
        let out = common::run_ok(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &format!("edge:{token}"),
            &format!("docker://{host}/edge/app:1"),
        ]));
        common::digest_of(out.as_bytes())
    };
    let at_edge = inspect(&first.host);
    assert_eq!(
        inspect(&centre.host),
        at_edge,
        "the centre's manifest differs"
    );
    let copied = tmp.path().join("from-centre");
    common::run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &format!("edge:{token}"),
        &format!("docker://{}/edge/app:1", centre.host),
        &format!("dir:{}", copied.display()),
    ]));
    drop(first);

    // A cold edge: a warm build fills it from the centre, and is fully cached.
    let second = edge(&centre, &token_file);
    let cache = format!("{}/edge/app:1", second.host);
    wipe.0.push(cache.clone());
    wipe.now();
    let warm = {
        let _login = Login::new(&second.host, "warm-1");
        common::docker_build(context.path(), &cache, true, Some(&cache))
    };
    assert_all_cached(&warm);
    let filled = session(&second, "warm-1");
    assert!(count(&filled, "blobs_filled") >= 2, "{filled}");
    assert!(count(&filled, "manifests_filled") >= 1, "{filled}");
    assert_eq!(
        count(&filled, "bytes_filled"),
        count(&filled, "bytes_served"),
        "a cold edge sends only what it fills: {filled}"
    );

    // Again on a wiped builder: the edge's own disk serves it.
    wipe.now();
    let again = {
        let _login = Login::new(&second.host, "warm-2");
        common::docker_build(context.path(), &cache, true, Some(&cache))
    };
    assert_all_cached(&again);
    let hits = session(&second, "warm-2");
    assert!(count(&hits, "blobs_served") >= 2, "{hits}");
    assert!(count(&hits, "bytes_served") > 24 << 20, "{hits}");
    assert_eq!(count(&hits, "blobs_filled"), 0, "{hits}");
    assert_eq!(count(&hits, "manifests_filled"), 0, "{hits}");
    assert_eq!(count(&hits, "bytes_filled"), 0, "{hits}");
    let report = common::layercache(&["report", "--server", &second.url, "--since", "10m"]);
    let report = String::from_utf8(report.stdout).unwrap();
    let centre_row = report
        .lines()
        .skip_while(|l| !l.starts_with("upstreams, since the server started"))
        .find(|l| l.starts_with("centre"))
        .unwrap_or_else(|| panic!("no upstream row in the report:\n{report}"));
    assert!(centre_row.contains(&centre.url), "{centre_row}");
    let metrics = get(&second, "/metrics");
    assert!(
        metrics.contains("layercache_upstream_hits_total{upstream=\"centre\",kind=\"blob\"}"),
        "{metrics}"
    );
}
