//! `layercache gc`: a dry run changes nothing, a pass evicts what a rule's maximum age
//! says, and pinned tags stay; `serve` refuses a data directory another server holds.

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

    let status: Value = client
        .get(server.at("/api/v1/gc"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["last_pass"]["trigger"], "manual", "{status:#}");
    assert_eq!(status["last_pass"]["evicted"].as_array().unwrap().len(), 2);
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
