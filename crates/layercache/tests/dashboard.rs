//! The dashboard at `/ui` in a real headless browser (Debian `chromium`): after a real
//! build's traffic (dockerd's BuildKit: a cold build pushed with the inline cache, then
//! a rebuild on a wiped daemon importing it), the page shows that build's sessions, the
//! repository it used, and plots with data; a screenshot is taken and kept as
//! `target/dashboard.png`.
//!
//! dockerd is one shared daemon, so everything touching it lives in one test function.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The Debian docker.io client: newer clients without buildx refuse `DOCKER_BUILDKIT=1`.
const DOCKER: &str = "/usr/bin/docker";
/// Debian's Chromium.
const CHROMIUM: &str = "chromium";

/// Two layers of random bytes: a step that runs again cannot produce the same layer.
const DOCKERFILE: &str = r#"FROM scratch
COPY nonce /nonce
COPY busybox /bin/busybox
SHELL ["/bin/busybox", "sh", "-c"]
RUN /bin/busybox mkdir -p /data && /bin/busybox dd if=/dev/urandom of=/data/a.bin bs=1M count=8
RUN /bin/busybox dd if=/dev/urandom of=/data/b.bin bs=1M count=4
"#;

/// Remove the image and all build cache.
fn wipe(tag: &str) {
    let (pruned, out) = common::run(&mut common::docker(&["builder", "prune", "-af"]));
    assert!(pruned, "docker builder prune failed:\n{out}");
    common::run(&mut common::docker(&["image", "rm", "-f", tag]));
}

/// Leaves the daemon without this test's image and build cache, also on failure.
struct Cleanup<'a>(&'a str);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        common::run(&mut common::docker(&["builder", "prune", "-af"]));
        common::run(&mut common::docker(&["image", "rm", "-f", self.0]));
    }
}

/// `GET` a JSON document from the server.
fn get_json(server: &common::Server, path: &str) -> Value {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let response = reqwest::get(server.at(path)).await.unwrap();
            assert_eq!(response.status(), 200, "GET {path}");
            response.json().await.unwrap()
        })
}

/// Headless Chromium on `url` with `args`, given its own profile; its standard output.
fn chromium(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("timeout")
        .args(["120", CHROMIUM])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("spawn {CHROMIUM}: {e}"));
    assert!(
        output.status.success(),
        "{CHROMIUM} {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The start tag of the element with `id` in `dom`.
fn start_tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id} in the page:\n{dom}"));
    let open = dom[..at].rfind('<').unwrap();
    let close = at + dom[at..].find('>').unwrap();
    &dom[open..=close]
}

/// The value of `attribute` in the start tag of the element with `id`.
fn attribute(dom: &str, id: &str, attribute: &str) -> Option<String> {
    let tag = start_tag(dom, id);
    let at = tag.find(&format!(" {attribute}=\""))? + attribute.len() + 3;
    Some(tag[at..].split('"').next()?.to_owned())
}

/// The markup of the element with `id` (up to its closing tag named `name`).
fn element<'a>(dom: &'a str, id: &str, name: &str) -> &'a str {
    let tag = start_tag(dom, id);
    let open = dom.find(tag).unwrap();
    let close = open + dom[open..].find(&format!("</{name}>")).unwrap();
    &dom[open..close]
}

/// Where the test binaries' `target` directory is (`target/release/layercache` → `target`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_layercache"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

#[test]
fn the_dashboard_shows_a_real_builds_sessions_and_plots_in_a_headless_browser() {
    if !common::require_tool(CHROMIUM) || !common::require_tool(DOCKER) {
        return;
    }
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );

    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_SERVER__SESSIONS__IDLE_GAP", "2s"),
        // A quota near what the build stores, so the plot shows both.
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "64MiB"),
    ]);
    let repo = "dash/app";
    let tag = format!("{}/{repo}:v1", server.host);
    let _cleanup = Cleanup(&tag);
    let context = common::busybox_context(&server, "Dockerfile", DOCKERFILE);

    // A real build's traffic: cold build and push with the inline cache, then a rebuild
    // on a wiped daemon that imports it (manifest hits, layers read).
    wipe(&tag);
    common::docker_build(context.path(), &tag, true, None);
    common::run_ok(&mut common::docker(&["push", &tag]));
    wipe(&tag);
    let warm = common::docker_build(context.path(), &tag, true, Some(&tag));
    assert!(
        warm.contains(&format!("importing cache manifest from {tag}")),
        "{warm}"
    );

    // The API the page reads agrees that the build happened.
    let sessions = get_json(&server, "/api/v1/sessions");
    let sessions = sessions.as_array().unwrap();
    let ours: Vec<&Value> = sessions
        .iter()
        .filter(|s| {
            s["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == repo)
        })
        .collect();
    assert!(!ours.is_empty(), "no session of {repo}: {sessions:#?}");
    let hits: u64 = ours
        .iter()
        .map(|s| s["manifest_hits"].as_u64().unwrap())
        .sum();
    assert!(hits > 0, "the rebuild found no manifest: {ours:#?}");
    let repositories = get_json(&server, "/api/v1/repositories");
    let stats = repositories
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repo"] == repo)
        .unwrap_or_else(|| panic!("{repo} not in {repositories:#}"));
    assert!(
        stats["stored_bytes"].as_u64().unwrap() > 12 << 20,
        "{stats:#}"
    );
    assert!(stats["bytes_served"].as_u64().unwrap() > 0, "{stats:#}");
    let ratios = get_json(&server, "/api/v1/hit-ratio");
    assert_eq!(ratios["repositories"][0]["repo"], repo, "{ratios:#}");
    let history = get_json(&server, "/api/v1/usage/history");
    assert!(!history.as_array().unwrap().is_empty(), "{history:#}");

    // The page, as a browser renders it.
    let url = server.at("/ui");
    let dom = chromium(&url, &["--dump-dom"]);
    assert!(
        dom.contains("<h1>layercache</h1>"),
        "not the dashboard:\n{dom}"
    );
    let status = element(&dom, "status", "div");
    assert!(
        status.contains("updated"),
        "the page did not load: {status}"
    );
    let table = element(&dom, "sessions", "table");
    for session in sessions.iter().take(25) {
        let id = session["id"].as_str().unwrap();
        assert!(
            table.contains(&format!("data-session=\"{id}\"")),
            "session {id} is not in the table:\n{table}"
        );
    }
    assert!(
        table.contains(repo),
        "{repo} is not in the sessions:\n{table}"
    );
    for id in ["largest", "most-read"] {
        let table = element(&dom, id, "table");
        assert!(
            table.contains(&format!("data-repo=\"{repo}\"")),
            "{repo} is not in {id}:\n{table}"
        );
    }
    for (plot, series) in [("usage-plot", 3), ("hits-plot", 1)] {
        let points: usize = attribute(&dom, plot, "data-points")
            .unwrap_or_else(|| panic!("{plot} was not drawn:\n{dom}"))
            .parse()
            .unwrap();
        let drawn: usize = attribute(&dom, plot, "data-series")
            .unwrap()
            .parse()
            .unwrap();
        let svg = element(&dom, plot, "svg");
        assert!(
            points > 0 && drawn >= series && svg.contains("<path"),
            "{plot} has no data: {points} points in {drawn} series\n{svg}"
        );
    }
    assert!(
        element(&dom, "hits-plot", "svg").contains(&format!("data-name=\"{repo}\"")),
        "no hit-ratio line for {repo}"
    );

    // And how it looks.
    let shots = tempfile::tempdir().unwrap();
    let shot = shots.path().join("dashboard.png");
    chromium(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600",
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot: {e}"));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 20_000, "a blank page? {} bytes", png.len());
    let kept = target_dir().join("dashboard.png");
    std::fs::copy(&shot, &kept).unwrap();
    println!(
        "dashboard screenshot: {} ({} bytes)",
        kept.display(),
        png.len()
    );
}
