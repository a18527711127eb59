//! The audit log against what really happened: a token-mode server takes a real skopeo
//! push (and a docker push when a daemon runs), a push the credential may not make, a
//! mount, a manifest delete, failed credentials, Actions cache saves and refusals, and an
//! eviction pass; `layercache audit` must report exactly those, with who made them, by
//! the digests the registry serves and the requests its own request log shows. With tiny
//! files and `keep = 2`, rotation removes old files and the log still reads as one
//! gapless run of the newest lines.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use base64::Engine;
use common::Server;
use common::actions::{Client, Entry};
use serde_json::{Value, json};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A credential minted for `server` with `scopes` (`--pull GLOB`, ...).
fn credential(server: &Server, scopes: &[&str]) -> String {
    common::mint_token(server.data_dir(), scopes)
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// `layercache audit ARGS… --since 0` against `server`, logged in with `credential`.
fn audit_command(server: &Server, credential: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_layercache"))
        .arg("audit")
        .args(args)
        .args(["--since", "0", "--server", &server.url])
        .env("LAYERCACHE_CREDENTIAL", credential)
        .output()
        .unwrap()
}

/// The audit log's lines through `layercache audit --json`, parsed.
fn audit_lines(server: &Server, credential: &str) -> Vec<Value> {
    let out = audit_command(server, credential, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// One request as the server's own request log shows it.
#[derive(Debug, Clone)]
struct Served {
    method: String,
    path: String,
    endpoint: Option<String>,
    status: u16,
}

impl Served {
    fn request(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Every request in the log of a server started with [`Server::start_logged`].
fn served(server: &Server) -> Vec<Served> {
    let field = common::log_field;
    server
        .log()
        .lines()
        .filter(|l| l.contains(" served "))
        .map(|l| Served {
            method: field(l, "method").unwrap(),
            path: field(l, "path").unwrap(),
            endpoint: field(l, "endpoint"),
            status: field(l, "status").unwrap().parse().unwrap(),
        })
        .collect()
}

/// `(request, status)` of each item, counted.
fn tally<'a>(items: impl Iterator<Item = (String, u16)> + 'a) -> BTreeMap<(String, u16), usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
}

/// An OCI image layout in `dir` tagged `v1`: a config and one tar layer unique to `seed`.
fn layout(dir: &Path, seed: &str) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let add = |bytes: &[u8]| {
        let digest = common::digest_of(bytes);
        let hex = digest.trim_start_matches("sha256:");
        std::fs::write(dir.join("blobs/sha256").join(hex), bytes).unwrap();
        (digest, bytes.len())
    };
    let content = format!("audited {seed}\n");
    let mut tar = common::tar_header("audited", content.len() as u64).to_vec();
    tar.extend(content.as_bytes());
    tar.resize(tar.len().next_multiple_of(512) + 1024, 0);
    let (layer, layer_len) = add(&tar);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [layer] },
    }))
    .unwrap();
    let (config, config_len) = add(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config, "size": config_len,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer, "size": layer_len,
        }],
    }))
    .unwrap();
    let (manifest, manifest_len) = add(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest, "size": manifest_len,
            "annotations": { "org.opencontainers.image.ref.name": "v1" },
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// `skopeo copy` of the layout in `dir` to `dest` with `creds`: whether it succeeded.
fn skopeo_push(dir: &Path, dest: &str, creds: &str) -> (bool, String) {
    common::run(
        Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--dest-creds", creds])
            .arg(format!("oci:{}:v1", dir.display()))
            .arg(format!("docker://{dest}")),
    )
}

/// Whether a docker daemon answers (a test needing one must fail rather than skip when
/// `REQUIRE_REAL_CLIENTS=1`).
fn docker_daemon() -> bool {
    if !common::require_tool("/usr/bin/docker") {
        return false;
    }
    let up = Command::new("/usr/bin/docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        let required = std::env::var("REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1");
        assert!(!required, "a docker daemon is required but none answers");
        eprintln!("SKIPPED: docker push (no docker daemon)");
    }
    up
}

/// The lines of `lines` with `action`.
fn with_action<'a>(lines: &'a [Value], action: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["action"] == action).collect()
}

#[tokio::test]
async fn writes_deletes_cache_saves_and_denials_are_logged_with_who_made_them() {
    if !common::require_tool("skopeo") {
        return;
    }
    let server = Server::start_logged(&[("LAYERCACHE_SERVER__AUTH__MODE", "token")]);
    let host = &server.host;
    let pr = credential(
        &server,
        &[
            "--pull",
            "cache/app/**",
            "--push",
            "cache/app/pr-7/**",
            "--delete",
            "cache/app/pr-7/**",
        ],
    );
    let admin = credential(&server, &["--admin"]);
    let viewer = credential(&server, &["--view"]);
    let http = reqwest::Client::new();
    let as_pr = basic("pr-7", &pr);
    // The login name labels the credential, which is what identifies: its fingerprint.
    let pr_7 = format!(
        "pr-7 (credential {})",
        &common::digest_of(pr.as_bytes())[7..19]
    );

    // A real push, then one the credential may not make.
    let images = tempfile::tempdir().unwrap();
    layout(images.path(), host);
    let creds = format!("pr-7:{pr}");
    let (pushed, out) = skopeo_push(
        images.path(),
        &format!("{host}/cache/app/pr-7/app:v1"),
        &creds,
    );
    assert!(pushed, "{out}");
    let (pushed, out) = skopeo_push(images.path(), &format!("{host}/cache/app/main:v1"), &creds);
    assert!(!pushed && out.to_lowercase().contains("denied"), "{out}");

    // What the registry holds, by its own answer.
    let manifest = http
        .get(server.at("/v2/cache/app/pr-7/app/manifests/v1"))
        .header("authorization", &as_pr)
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    let manifest_digest = manifest.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    // (skopeo compresses the layer on the way: the registry's digests are the truth.)
    let body: Value = manifest.json().await.unwrap();
    let config = body["config"]["digest"].as_str().unwrap().to_owned();
    let layer = body["layers"][0]["digest"].as_str().unwrap().to_owned();

    // A docker push of the same image, when a daemon runs.
    let docker_image = format!("{host}/cache/app/pr-7/docker:v1");
    let docker_config = tempfile::tempdir().unwrap();
    let docker = |args: &[&str]| {
        let mut command = common::docker(args);
        command.env("DOCKER_CONFIG", docker_config.path());
        command
    };
    let with_docker = docker_daemon();
    if with_docker {
        common::run_ok(
            Command::new("skopeo")
                .arg("copy")
                .arg(format!("oci:{}:v1", images.path().display()))
                .arg(format!("docker-daemon:{docker_image}")),
        );
        let out = common::output_with_input(
            &mut docker(&["login", host, "-u", "pr-7", "--password-stdin"]),
            pr.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        common::run_ok(&mut docker(&["push", &docker_image]));
        common::run(&mut docker(&["image", "rm", "-f", &docker_image]));
    }

    // A cross-repository mount, a manifest delete, credentials that fail.
    let mount = http
        .post(server.at(&format!(
            "/v2/cache/app/pr-7/copy/blobs/uploads/?mount={layer}&from=cache/app/pr-7/app"
        )))
        .header("authorization", &as_pr)
        .send()
        .await
        .unwrap();
    assert_eq!(mount.status(), 201);
    let delete = http
        .delete(server.at(&format!(
            "/v2/cache/app/pr-7/app/manifests/{manifest_digest}"
        )))
        .header("authorization", &as_pr)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 202);
    let failed = http
        .get(server.at("/v2/cache/app/pr-7/app/tags/list"))
        .header("authorization", basic("pr-7", "not-a-credential"))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 401);
    // A valid bearer token used on a repository it was not issued for: the token flow
    // asks for another token; no refusal of the identity, so nothing is audited.
    let answer: Value = http
        .get(server.at("/token?service=layercache&scope=repository:cache/app/pr-7/app:pull"))
        .header("authorization", &as_pr)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let elsewhere = http
        .get(server.at("/v2/cache/app/pr-7/other/tags/list"))
        .bearer_auth(answer["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 401);

    // Actions cache: a save with a minted token; a read-only token's save and a forged
    // token's are refused.
    let writer = common::mint_token(
        server.data_dir(),
        &["--write", "refs/pull/7/merge", "--read", "refs/heads/main"],
    );
    let entry = Entry::new("audit-key".to_owned(), common::actions::data(7, 100_000));
    Client::new(&server.url, writer).v2_save(&entry).await;
    let reader = common::mint_token(server.data_dir(), &["--read", "refs/heads/main"]);
    let (status, body) = Client::new(&server.url, reader)
        .twirp(
            "CreateCacheEntry",
            json!({"key": "denied-key", "version": common::actions::version()}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["ok"]),
        (200, &Value::Null),
        "{body}"
    );
    let (status, _) = Client::new(&server.url, "forged".to_owned())
        .twirp(
            "CreateCacheEntry",
            json!({"key": "forged-key", "version": common::actions::version()}),
        )
        .await;
    assert_eq!(status, 401);

    // An eviction pass, by an administrator.
    let gc = http
        .post(server.at("/api/v1/gc?dry_run=true"))
        .header("authorization", basic("admin", &admin))
        .send()
        .await
        .unwrap();
    assert_eq!(gc.status(), 200);

    let lines = audit_lines(&server, &admin);
    let requests = served(&server);

    // Exactly the writes, deletes and denials the server's request log shows, each once
    // with its status.
    let writes = [
        "put_manifest",
        "finish_upload",
        "delete_manifest",
        "delete_blob",
    ];
    let expected = requests.iter().filter(|r| {
        let endpoint = r.endpoint.as_deref().unwrap_or("");
        writes.contains(&endpoint)
            || (endpoint == "start_upload" && r.status == 201)
            || r.status == 403
            || r.path.ends_with("/CreateCacheEntry")
            || r.path.ends_with("/FinalizeCacheEntryUpload")
            || r.path == "/api/v1/gc" && r.method == "POST"
            // The one request with credentials that failed (the clients' first,
            // anonymous tries are challenged, not audited).
            || r.path == "/v2/cache/app/pr-7/app/tags/list" && r.status == 401
    });
    let expected = tally(expected.map(|r| (r.request(), r.status)));
    let logged = tally(lines.iter().map(|l| {
        (
            l["request"].as_str().unwrap().to_owned(),
            l["status"].as_u64().unwrap() as u16,
        )
    }));
    assert_eq!(logged, expected, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l["client"] == "127.0.0.1"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["time"].as_str().unwrap().len() == 24),
        "RFC 3339 with milliseconds: {lines:#?}"
    );

    // Who pushed what: the blobs and the tag the registry serves, by the login.
    let in_app = |l: &&Value| l["repository"] == "cache/app/pr-7/app";
    let mut pushed: Vec<&str> = with_action(&lines, "push")
        .into_iter()
        .filter(in_app)
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    pushed.sort();
    let mut blobs = vec![layer.as_str(), config.as_str()];
    blobs.sort();
    assert_eq!(pushed, blobs, "{lines:#?}");
    let tags: Vec<&Value> = with_action(&lines, "tag")
        .into_iter()
        .filter(in_app)
        .collect();
    assert_eq!(tags.len(), 1, "{lines:#?}");
    assert_eq!(tags[0]["reference"], "v1");
    assert_eq!(tags[0]["digest"], manifest_digest.as_str());
    for line in with_action(&lines, "push")
        .into_iter()
        .chain(with_action(&lines, "tag"))
    {
        assert_eq!(line["identity"], pr_7.as_str(), "{line}");
        assert_eq!(
            line["grounds"]["push"],
            json!(["cache/app/pr-7/**"]),
            "{line}"
        );
    }
    if with_docker {
        let docker_tags = with_action(&lines, "tag")
            .into_iter()
            .filter(|l| l["repository"] == "cache/app/pr-7/docker")
            .count();
        assert_eq!(docker_tags, 1, "{lines:#?}");
    }

    // The push to the default branch's repository: denied, on that repository, by whom.
    let denied_main: Vec<&Value> = with_action(&lines, "denied")
        .into_iter()
        .filter(|l| l["status"] == 403)
        .collect();
    assert!(!denied_main.is_empty(), "{lines:#?}");
    for line in &denied_main {
        assert_eq!(line["repository"], "cache/app/main", "{line}");
        assert_eq!(line["identity"], pr_7.as_str(), "{line}");
        assert!(
            line["reason"].as_str().unwrap().contains("denied"),
            "{line}"
        );
    }

    // The mount, the delete, the failed credentials.
    let mounts: Vec<&Value> = with_action(&lines, "mount")
        .into_iter()
        .filter(|l| l["repository"] == "cache/app/pr-7/copy")
        .collect();
    assert_eq!(mounts.len(), 1, "{lines:#?}");
    assert_eq!(mounts[0]["digest"], layer.as_str());
    assert_eq!(mounts[0]["repository"], "cache/app/pr-7/copy");
    assert_eq!(mounts[0]["detail"]["from"], "cache/app/pr-7/app");
    let deletes = with_action(&lines, "delete");
    assert_eq!(deletes.len(), 1, "{lines:#?}");
    assert_eq!(deletes[0]["digest"], manifest_digest.as_str());
    assert_eq!(deletes[0]["status"], 202);
    assert_eq!(deletes[0]["identity"], pr_7.as_str());
    let failed: Vec<&Value> = with_action(&lines, "denied")
        .into_iter()
        .filter(|l| l["status"] == 401 && l["request"].as_str().unwrap().starts_with("GET /v2/"))
        .collect();
    assert_eq!(failed.len(), 1, "{lines:#?}");
    assert_eq!(failed[0]["identity"], Value::Null);
    assert_eq!(failed[0]["repository"], "cache/app/pr-7/app");
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown user or wrong password"),
        "{:?}",
        failed[0]["reason"]
    );

    // The cache save, and the refused saves.
    let created = with_action(&lines, "cache.create");
    let saved = with_action(&lines, "cache.save");
    assert_eq!((created.len(), saved.len()), (1, 1), "{lines:#?}");
    for line in [created[0], saved[0]] {
        assert_eq!(line["reference"], "audit-key");
        assert_eq!(line["detail"]["scope"], "refs/pull/7/merge");
        assert_eq!(line["grounds"]["write"], "refs/pull/7/merge");
        assert_eq!(line["identity"], "token");
    }
    assert_eq!(saved[0]["detail"]["size"], entry.bytes.len());
    let refused: Vec<&Value> = with_action(&lines, "denied")
        .into_iter()
        .filter(|l| {
            l["request"]
                .as_str()
                .unwrap()
                .ends_with("/CreateCacheEntry")
        })
        .collect();
    assert_eq!(refused.len(), 2, "{lines:#?}");
    let write_denied = refused.iter().find(|l| l["status"] == 200).unwrap();
    assert_eq!(write_denied["reference"], "denied-key");
    assert_eq!(write_denied["grounds"]["read"], json!(["refs/heads/main"]));
    assert!(
        write_denied["reason"]
            .as_str()
            .unwrap()
            .starts_with("cache write denied")
    );
    let forged = refused.iter().find(|l| l["status"] == 401).unwrap();
    assert_eq!(forged["identity"], Value::Null);

    // The pass, by the administrator.
    let passes = with_action(&lines, "gc");
    assert_eq!(passes.len(), 1, "{lines:#?}");
    assert_eq!(
        passes[0]["identity"],
        format!(
            "admin (credential {})",
            &common::digest_of(admin.as_bytes())[7..19]
        )
    );
    assert_eq!(passes[0]["grounds"]["admin"], true);
    assert_eq!(passes[0]["detail"]["dry_run"], true);

    // No successful read is logged.
    assert!(
        !lines.iter().any(|l| {
            let request = l["request"].as_str().unwrap();
            (request.starts_with("GET ") || request.starts_with("HEAD "))
                && l["status"].as_u64().unwrap() < 300
        }),
        "{lines:#?}"
    );

    // The table lists the same lines.
    let out = audit_command(&server, &admin, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), lines.len() + 1, "{table}");
    for header in [
        "TIME",
        "IDENTITY",
        "ACTION",
        "REPOSITORY",
        "REF/DIGEST",
        "CLIENT",
        "STATUS",
        "REASON",
    ] {
        assert!(rows[0].contains(header), "{table}");
    }
    for (row, line) in rows[1..].iter().zip(&lines) {
        assert!(row.starts_with(line["time"].as_str().unwrap()), "{row}");
        assert!(row.contains(line["action"].as_str().unwrap()), "{row}");
        if let Some(digest) = line["digest"].as_str() {
            assert!(row.contains(&digest[..19]), "{row} lacks {digest}");
        }
    }

    // The log is for administrators: a viewer is refused, and the refusal is logged.
    let refused = http
        .get(server.at("/api/v1/audit"))
        .header("authorization", basic("viewer", &viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let out = audit_command(&server, &viewer, &["--json"]);
    assert!(!out.status.success());
    let after = audit_lines(&server, &admin);
    assert_eq!(after[..lines.len()], lines[..]);
    let new: Vec<&Value> = after[lines.len()..].iter().collect();
    assert_eq!(new.len(), 2, "{new:#?}");
    // (The command logs in with the user name `layercache`.)
    let fingerprint = &common::digest_of(viewer.as_bytes())[7..19];
    for (line, user) in new.into_iter().zip(["viewer", "layercache"]) {
        assert_eq!(line["action"], "denied");
        assert_eq!(
            line["identity"],
            format!("{user} (credential {fingerprint})")
        );
        assert_eq!(line["request"], "GET /api/v1/audit");
        assert_eq!(line["grounds"]["view"], true);
    }
}

#[tokio::test]
async fn rotated_files_are_read_across_and_nothing_between_them_is_lost() {
    let server = Server::start_with_env(&[
        ("LAYERCACHE_SERVER__AUDIT__MAX_FILE_SIZE", "2048"),
        ("LAYERCACHE_SERVER__AUDIT__KEEP", "2"),
    ]);
    let http = reqwest::Client::new();
    let total = 40;
    let mut digests = Vec::new();
    for n in 0..total {
        let blob = format!("blob number {n}");
        let digest = common::digest_of(blob.as_bytes());
        let r = http
            .post(server.at(&format!("/v2/cache/rotated/blobs/uploads/?digest={digest}")))
            .body(blob)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        digests.push(digest);
    }
    let lines = audit_lines(&server, "");
    // Old files were removed: fewer lines than pushes, and only the current file and
    // the two newest rotated ones remain, none past the size.
    assert!(lines.len() < total, "{}", lines.len());
    let dir = server.data_dir().join("audit");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "the audit directory is the server's only"
    );
    assert!(files.contains(&"audit.log".to_owned()), "{files:?}");
    assert!(!files.contains(&"audit.000001.log".to_owned()), "{files:?}");
    let on_disk: usize = files
        .iter()
        .map(|f| {
            let path = dir.join(f);
            let meta = std::fs::metadata(&path).unwrap();
            assert!(meta.len() <= 2048, "{f}");
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "{f}: the server's only"
            );
            std::fs::read_to_string(path).unwrap().lines().count()
        })
        .sum();
    // The API reads every line the files hold: the newest pushes, in order, no gap.
    assert_eq!(lines.len(), on_disk);
    assert!(lines.len() >= 6, "{}", lines.len());
    let logged: Vec<&str> = lines
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(logged, digests[total - lines.len()..]);
    for line in &lines {
        assert_eq!(line["action"], "push");
        assert_eq!(
            line["identity"],
            Value::Null,
            "open mode: the address identifies"
        );
        assert_eq!(line["client"], "127.0.0.1");
        assert_eq!(line["status"], 201);
    }
    // A limit keeps the newest.
    let out = audit_command(&server, "", &["--json", "--limit", "3"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(last, lines[lines.len() - 3..]);
}

/// A client sending refused requests in a loop cannot rotate the history out of the log:
/// requests that present no credentials are not recorded (as a registry's first,
/// credential-less attempt is not), denials from one address are recorded at a bounded
/// rate (the rest counted as lost), and a long path is cut.
#[tokio::test]
async fn refusals_in_a_loop_cannot_rotate_the_history_out() {
    let server = Server::start_with_env(&[
        ("LAYERCACHE_SERVER__AUDIT__MAX_FILE_SIZE", "256KiB"),
        ("LAYERCACHE_SERVER__AUDIT__KEEP", "1"),
    ]);
    let http = reqwest::Client::new();
    let blob = b"written before the flood";
    let digest = common::digest_of(blob);
    let r = http
        .post(server.at(&format!("/v2/cache/kept/blobs/uploads/?digest={digest}")))
        .body(&blob[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let path = format!("/_apis/artifactcache/{}", "a".repeat(4000));
    let flood = |authorization: Option<&'static str>| {
        let (http, url) = (http.clone(), server.at(&path));
        async move {
            for _ in 0..1000 {
                let mut request = http.get(&url);
                if let Some(authorization) = authorization {
                    request = request.header("authorization", authorization);
                }
                assert_eq!(request.send().await.unwrap().status(), 401);
            }
        }
    };
    flood(None).await;
    let lines = audit_lines(&server, "");
    assert_eq!(
        lines.len(),
        1,
        "nothing presented, nothing recorded: {lines:#?}"
    );

    let started = std::time::Instant::now();
    flood(Some("Bearer not-a-token")).await;
    let elapsed = started.elapsed().as_secs_f64();
    let lines = audit_lines(&server, "");
    assert_eq!(
        lines[0]["digest"],
        digest.as_str(),
        "the history is still there"
    );
    let denied = with_action(&lines, "denied");
    let bound = 100.0 + 10.0 * (elapsed + 1.0);
    assert!(
        !denied.is_empty() && (denied.len() as f64) <= bound,
        "{} denials recorded in {elapsed:.1} s",
        denied.len()
    );
    for line in &denied {
        let request = line["request"].as_str().unwrap();
        assert!(
            request.len() <= 4 + 512 + 3 && request.ends_with('…'),
            "{request}"
        );
    }
    let metrics = common::registry::get_text(&http, &server.at("/metrics")).await;
    let lost = common::registry::sample(&metrics, "layercache_audit_dropped_total").unwrap();
    assert_eq!(lost as usize, 1000 - denied.len(), "{metrics}");
}
