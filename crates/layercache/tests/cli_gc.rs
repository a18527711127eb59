//! `layercache gc`: a dry run changes nothing, a pass evicts what a rule's maximum age
//! says, and pinned tags stay; a quota that cannot be met because every root left is in
//! use or pinned is said once (log, metric, report, usage history) and nothing in use is
//! evicted, and commits do not start a pass each while it cannot be met; `serve` refuses
//! a data directory another server holds.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

/// Push a one-layer image as `repo:tag`.
async fn push(client: &reqwest::Client, server: &common::Server, repo: &str, tag: &str) {
    let layer = format!("layer of {repo}:{tag}").into_bytes();
    let config = format!("{{\"image\":\"{repo}:{tag}\"}}").into_bytes();
    for blob in [&layer, &config] {
        let digest = common::digest_of(blob);
        let r = client
            .post(server.at(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": common::digest_of(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": common::digest_of(&layer),
            "size": layer.len(),
        }],
    });
    let r = client
        .put(server.at(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

async fn tags(client: &reqwest::Client, server: &common::Server, repo: &str) -> Vec<String> {
    let list: Value = client
        .get(server.at(&format!("/v2/{repo}/tags/list")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut tags: Vec<String> = list["tags"]
        .as_array()
        .map(|t| t.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    tags.sort();
    tags
}

fn gc(server: &common::Server, args: &[&str]) -> String {
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_layercache"))
            .args(["gc", "--server", &server.url])
            .args(args),
    )
}

#[tokio::test]
async fn gc_dry_run_changes_nothing_and_a_pass_follows_the_rules() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[store.eviction]\ninterval = \"1h\"\n\n\
         [[store.eviction.rules]]\nrepositories = \"cache/*\"\npin_tags = [\"main\"]\nmax_age = \"1s\"\n",
    )
    .unwrap();
    let server =
        common::Server::start_with_env(&[("LAYERCACHE_CONFIG", config.path().to_str().unwrap())]);
    let client = reqwest::Client::new();
    for tag in ["main", "pr-1", "pr-2"] {
        push(&client, &server, "cache/app", tag).await;
    }
    push(&client, &server, "other/app", "old").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let dry: Value = serde_json::from_str(&gc(&server, &["--dry-run", "--json"])).unwrap();
    assert_eq!(dry["dry_run"], true);
    let mut would: Vec<String> = dry["evicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tags"][0].as_str().unwrap().to_owned())
        .collect();
    would.sort();
    assert_eq!(would, ["pr-1", "pr-2"], "{dry:#}");
    assert_eq!(dry["kept_pinned"], 1, "{dry:#}");
    assert_eq!(
        tags(&client, &server, "cache/app").await,
        ["main", "pr-1", "pr-2"]
    );

    let text = gc(&server, &[]);
    assert!(text.starts_with("evicted 2 image(s)"), "{text}");
    assert!(text.contains("cache/app:pr-1"), "{text}");
    assert_eq!(tags(&client, &server, "cache/app").await, ["main"]);
    // Outside the rule's repositories nothing is old enough to go, whatever its age.
    assert_eq!(tags(&client, &server, "other/app").await, ["old"]);

    let status: Value = common::registry::get_json(&client, &server.at("/api/v1/gc")).await;
    assert_eq!(status["last_pass"]["trigger"], "manual", "{status:#}");
    assert_eq!(status["last_pass"]["evicted"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_quota_that_cannot_be_met_is_said_once_and_nothing_in_use_is_evicted() {
    const MIB: u64 = 1 << 20;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[store.eviction]\nmax_size = \"8MiB\"\nmin_free = 0\n\n\
         [[store.eviction.rules]]\nrepositories = \"pinned/*\"\npin_tags = [\"v1\"]\n",
    )
    .unwrap();
    // The default in-use window (an hour) and push window.
    let server =
        common::Server::start_logged(&[("LAYERCACHE_CONFIG", config.path().to_str().unwrap())]);
    let client = reqwest::Client::new();
    let mut images = Vec::new();
    // The pulled ones first: each is in use before the quota is passed, and a pinned tag
    // is pinned as its manifest arrives.
    for (i, repo) in ["used/a", "used/b", "pinned/c", "pinned/d"]
        .into_iter()
        .enumerate()
    {
        let layer = common::registry::random_bytes(0x5407 + i as u64, 3 * MIB);
        images.push(common::registry::push_image(&client, &server, repo, layer).await);
        if repo.starts_with("used/") {
            // Pulled: in use for the next hour.
            common::registry::assert_intact(&client, &server, &images[i]).await;
        }
    }
    let mut reports = Vec::new();
    for _ in 0..3 {
        let report: Value = serde_json::from_str(&gc(&server, &["--json"])).unwrap();
        assert_eq!(
            report["evicted"],
            json!([]),
            "evicted what is in use or pinned: {report:#}"
        );
        assert_eq!(
            (
                report["kept_in_use"].as_u64(),
                report["kept_pinned"].as_u64()
            ),
            (Some(2), Some(2)),
            "{report:#}\n{}",
            server.log()
        );
        reports.push(report);
    }
    let shortfall = reports[2]["shortfall"].as_u64().unwrap();
    let over_low = reports[2]["usage_before"]["total"].as_u64().unwrap()
        - reports[2]["quota"]["low"].as_u64().unwrap();
    assert_eq!(shortfall, over_low, "{:#}", reports[2]);
    // The metric is the last pass's figure (read before another pass changes it).
    let metrics = common::registry::get_text(&client, &server.at("/metrics")).await;
    assert!(
        metrics.contains(&format!("layercache_eviction_shortfall_bytes {shortfall}")),
        "{metrics}"
    );
    for image in &images {
        common::registry::assert_intact(&client, &server, image).await;
    }
    let text = gc(&server, &[]);
    assert!(text.contains("the quota cannot be met"), "{text}");
    // The usage history (the dashboard's quota plot) marks it from its next sample.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let history: Value =
            common::registry::get_json(&client, &server.at("/api/v1/usage/history")).await;
        if history
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["shortfall"].as_u64() > Some(0))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the usage history does not show it: {history:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let said = |what: &str| server.log().matches(what).count();
    assert_eq!(said("the quota cannot be met"), 1, "{}", server.log());

    // Once the pinned images are deleted, what they release counts as freed: met again,
    // said once, and still nothing in use evicted.
    for image in &images[2..] {
        common::registry::delete_image(&client, &server, image).await;
    }
    for _ in 0..2 {
        let report: Value = serde_json::from_str(&gc(&server, &["--json"])).unwrap();
        assert_eq!(report["shortfall"], 0, "{report:#}");
        assert_eq!(report["evicted"], json!([]), "{report:#}");
        assert!(
            report["released_bytes"].as_u64() >= Some(6 * MIB),
            "{report:#}"
        );
    }
    for image in &images[..2] {
        common::registry::assert_intact(&client, &server, image).await;
    }
    assert_eq!(said("the quota cannot be met"), 1, "{}", server.log());
    assert_eq!(said("the quota is met again"), 1, "{}", server.log());
}

/// The value of the unlabelled metric `name` in `/metrics`.
async fn metric(client: &reqwest::Client, server: &common::Server, name: &str) -> u64 {
    let text = common::registry::get_text(client, &server.at("/metrics")).await;
    common::registry::sample(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
}

#[tokio::test]
async fn a_quota_that_cannot_be_met_is_not_checked_again_on_every_commit() {
    // Every other setting is the default.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[store.eviction]\nmax_size = \"1MiB\"\nmin_free = 0\n",
    )
    .unwrap();
    let server =
        common::Server::start_with_env(&[("LAYERCACHE_CONFIG", config.path().to_str().unwrap())]);
    let client = reqwest::Client::new();
    let push_blob = |seed: u64, len: u64| {
        let (client, server) = (&client, &server);
        async move {
            let blob = common::registry::random_bytes(seed, len);
            let r = common::registry::upload(client, server, "burst/app", blob).await;
            assert_eq!(r.status(), 201);
        }
    };
    // Young blobs nothing references: over the quota, and nothing may go.
    push_blob(1, 2 << 20).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(&client, &server, "layercache_eviction_shortfall_bytes").await == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let before = metric(&client, &server, "layercache_eviction_passes_total").await;
    let started = std::time::Instant::now();
    for seed in 2..302 {
        push_blob(seed, 4096).await;
    }
    let seconds = started.elapsed().as_secs();
    let passes = metric(&client, &server, "layercache_eviction_passes_total").await - before;
    // One pass a second at most, and one more the window may cut in two.
    assert!(
        passes <= seconds + 2,
        "{passes} passes during 300 commits in {seconds} s"
    );
    assert!(metric(&client, &server, "layercache_eviction_shortfall_bytes").await > 0);
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let server = common::Server::start();
    let (ok, output) = common::run(
        Command::new(env!("CARGO_BIN_EXE_layercache"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(server.data_dir()),
    );
    assert!(!ok, "a second server started: {output}");
    assert!(
        output.contains("another layercache process is using"),
        "{output}"
    );
}
