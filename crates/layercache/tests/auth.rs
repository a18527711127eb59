//! The registry token flow in `token` mode, with real clients: docker login, push and
//! pull, BuildKit importing with the login's credentials, skopeo and buildah with
//! `--creds`; a pull-request credential reads the default branch's cache and is
//! `DENIED` writing it; bad credentials of every kind are refused; one credential
//! carries registry and Actions cache scopes alike.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use base64::Engine;
use common::{Server, layercache};
use sha2::{Digest, Sha256};

/// One docker build at a time: the daemon's build cache is shared.
static DAEMON: Mutex<()> = Mutex::new(());

const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
COPY nonce /nonce
RUN ["/bin/busybox", "sh", "-c", "echo built > /built"]
"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A server in `token` mode.
fn token_server() -> Server {
    Server::start_logged(&[("LAYERCACHE_SERVER__AUTH__MODE", "token")])
}

/// A credential minted for `server` with `scopes` (`--pull GLOB`, ...).
fn credential(server: &Server, scopes: &[&str]) -> String {
    let data_dir = server.data_dir().to_str().unwrap().to_owned();
    let out = layercache(&[&["token", "--data-dir", &data_dir], scopes].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// `docker` with its own client configuration (so logins do not meet other tests').
fn docker(config: &Path, args: &[&str]) -> Command {
    let mut command = common::docker(args);
    command.env("DOCKER_CONFIG", config);
    command
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

#[test]
fn an_address_off_loopback_needs_auth_or_saying_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = layercache(&["serve", "--listen", "0.0.0.0:0", "--data-dir", data]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = text(&out.stderr);
    assert!(
        said.contains("mode = \"token\"") && said.contains("--open"),
        "{said}"
    );
    // Said explicitly, it serves (and warns).
    let open = Server::start_on_with_env(
        &dir.path().join("open"),
        "0.0.0.0:0",
        &[("LAYERCACHE_SERVER__AUTH__MODE", "open")],
    );
    let port = open.host.rsplit(':').next().unwrap();
    let status = block_on(reqwest::get(format!("http://127.0.0.1:{port}/v2/")))
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

/// An auth configuration that cannot be used is refused before the server says it
/// listens: a supervisor or script waiting for the "listening" line never sees it, and
/// the process exits 1 with the reason.
#[test]
fn a_bad_auth_configuration_is_refused_before_the_server_says_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let refused = [
        (
            "a user's password that is not a hash",
            "[[server.auth.users]]\nname = \"ci\"\npassword = \"plain text\"\npull = [\"**\"]\n",
            "bcrypt",
        ),
        (
            "an issuer without an audience",
            "[[server.auth.issuers]]\nissuer = \"https://ci.example\"\njwks = \"/nonexistent\"\n",
            "set `audience`",
        ),
        (
            "a rule whose claim pattern is no regular expression",
            "[[server.auth.rules]]\nclaims = { repository = \"(\" }\npull = [\"**\"]\n",
            "claim repository",
        ),
    ];
    for (i, (what, auth, reason)) in refused.iter().enumerate() {
        let config = dir.path().join(format!("layercache-{i}.toml"));
        std::fs::write(&config, format!("[server.auth]\nmode = \"token\"\n{auth}")).unwrap();
        let data = dir.path().join(format!("data-{i}"));
        let out = common::serve_refused(&config, &data);
        assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
        let (said, printed) = (text(&out.stderr), text(&out.stdout));
        assert!(said.contains(reason), "{what}: {said}");
        assert!(
            !printed.contains("listening"),
            "{what}: printed {printed:?}"
        );
        assert!(!said.contains("layercache serving"), "{what}: {said}");
    }
}

#[tokio::test]
async fn requests_without_or_with_bad_credentials_are_refused() {
    let server = token_server();
    let client = reqwest::Client::new();
    // Anonymous: the challenge, naming the token endpoint and the scope.
    let r = client
        .post(server.at("/v2/cache/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"http://{}/token\",service=\"layercache\",scope=\"repository:cache/app:pull,push\"",
            server.host
        )
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");

    // A credential from another server's key, an expired one, an unsigned one, and a
    // signed URL of this server's Actions cache: all refused.
    let other = token_server();
    let foreign = credential(&other, &["--push", "**"]);
    let expired = sign(
        &server,
        serde_json::json!({"iss": "layercache", "exp": 1_000_000_000u64, "reg": {"push": ["**"]}}),
    );
    let header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(r#"{"iss":"layercache","exp":4102444800,"reg":{"push":["**"]}}"#);
    let unsigned = format!("{header}.{payload}.");
    let wrong_audience = sign(
        &server,
        serde_json::json!({"iss": "layercache", "aud": "layercache-url", "exp": 4_102_444_800u64, "reg": {"push": ["**"]}}),
    );
    for (what, password) in [
        ("foreign", foreign.as_str()),
        ("expired", expired.as_str()),
        ("alg none", unsigned.as_str()),
        ("wrong audience", wrong_audience.as_str()),
        ("garbage", "not-a-token"),
    ] {
        let token = "/token?service=layercache&scope=repository:cache/app:pull";
        for (path, authorization) in [
            ("/v2/", basic("ci", password)),
            ("/v2/cache/app/tags/list", basic("ci", password)),
            (token, basic("ci", password)),
            ("/v2/cache/app/tags/list", format!("Bearer {password}")),
        ] {
            let r = client
                .get(server.at(path))
                .header("authorization", &authorization)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{what} on {path} ({authorization:.6})");
        }
    }
}

/// A JWT of `claims` signed with `server`'s key.
fn sign(server: &Server, claims: serde_json::Value) -> String {
    let key = std::fs::read_to_string(server.data_dir().join("actions.key")).unwrap();
    let key = hex::decode(key.trim()).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )
    .unwrap()
}

#[tokio::test]
async fn the_token_endpoint_speaks_both_forms_and_grants_only_what_the_identity_has() {
    let server = token_server();
    let pr = credential(
        &server,
        &["--pull", "cache/app/**", "--push", "cache/app/pr-7/**"],
    );
    let client = reqwest::Client::new();
    // GET with Basic, as docker does; POST with the OAuth2 form, as containerd does.
    let get = client
        .get(server.at("/token?service=layercache&scope=repository:cache/app/main:pull,push"))
        .header("authorization", basic("ci", &pr))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let get: serde_json::Value = get.json().await.unwrap();
    let post = client
        .post(server.at("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "ci"),
            ("password", pr.as_str()),
            ("service", "layercache"),
            ("scope", "repository:cache/app/main:pull,push"),
            ("client_id", "buildkit"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    let post: serde_json::Value = post.json().await.unwrap();
    // The password in the URL instead of the form: refused (a URL ends up in logs).
    let in_query = client
        .post(server.at(&format!(
            "/token?grant_type=password&username=ci&password={pr}&service=layercache"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(in_query.status(), 401);
    for answer in [&get, &post] {
        let token = answer["access_token"].as_str().unwrap();
        assert_eq!(answer["token"], token);
        assert!(answer["expires_in"].as_u64().unwrap() > 0);
        // Pull granted, push denied.
        let payload = token.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
        let r = client
            .get(server.at("/v2/cache/app/main/tags/list"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "pull is allowed (the repository is empty)");
        // The credential may pull cache/app/other too, but this token was not issued
        // for it: the challenge names the scope to ask a token for.
        let r = client
            .get(server.at("/v2/cache/app/other/tags/list"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let challenge = r.headers()["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("scope=\"repository:cache/app/other:pull\"")
                && challenge.ends_with(",error=\"insufficient_scope\""),
            "{challenge}"
        );
        let r = client
            .post(server.at("/v2/cache/app/main/blobs/uploads/"))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED");
    }
    let bad = client
        .post(server.at("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "ci"),
            ("password", "x"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
}

#[tokio::test]
async fn a_bearer_token_grants_only_the_repositories_its_request_named() {
    let server = token_server();
    let client = reqwest::Client::new();
    let status = |path: &str, authorization: String| {
        let request = client
            .get(server.at(path))
            .header("authorization", authorization);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let token = |credential: String, scope: &'static str| {
        let request = client
            .get(server.at(&format!("/token?service=layercache&scope={scope}")))
            .header("authorization", basic("ci", &credential));
        async move {
            let answer: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
            format!("Bearer {}", answer["token"].as_str().unwrap())
        }
    };
    let team = credential(&server, &["--pull", "team/*", "--view"]);
    let team_a = token(team.clone(), "repository:team/a:pull").await;
    // Named: allowed (404: nothing is there yet).
    assert_eq!(status("/v2/team/a/tags/list", team_a.clone()).await, 404);
    // The credential may, the token may not: 401, asking for a token that covers it.
    assert_eq!(status("/v2/team/b/tags/list", team_a.clone()).await, 401);
    // The credential may not: 403, as before.
    assert_eq!(status("/v2/team/a/b/tags/list", team_a.clone()).await, 403);
    // A name that reads as a glob is not a repository name: it grants nothing.
    let glob = token(team.clone(), "repository:team/**:pull").await;
    assert_eq!(status("/v2/team/a/tags/list", glob.clone()).await, 401);
    assert_eq!(status("/v2/team/a/b/tags/list", glob).await, 403);
    // The catalog needs its own scope and pull on everything.
    let catalog = token(team.clone(), "registry:catalog:*").await;
    assert_eq!(status("/v2/_catalog", catalog).await, 403);
    let everything = credential(&server, &["--pull", "**"]);
    let catalog = token(everything.clone(), "registry:catalog:*").await;
    assert_eq!(status("/v2/_catalog", catalog).await, 200);
    let repository = token(everything, "repository:team/a:pull").await;
    assert_eq!(status("/v2/_catalog", repository).await, 401);
    // A bearer token is for the registry; the same credential views the API.
    assert_eq!(status("/api/v1/sessions", team_a).await, 403);
    assert_eq!(status("/api/v1/sessions", basic("ci", &team)).await, 200);
}

#[tokio::test]
async fn a_page_on_another_site_cannot_write_the_cache_or_run_a_pass() {
    let open = Server::start();
    let token = token_server();
    let admin = credential(&token, &["--admin", "--push", "**"]);
    let client = reqwest::Client::new();
    for (server, authorization) in [(&open, None), (&token, Some(basic("admin", &admin)))] {
        let post = |path: &str, origin: Option<String>| {
            let mut request = client.post(server.at(path));
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            if let Some(authorization) = &authorization {
                request = request.header("authorization", authorization);
            }
            async move { request.send().await.unwrap() }
        };
        // A browser sends its page's origin: another site's is refused.
        for origin in ["https://evil.example", "null", "http://127.0.0.1"] {
            for path in ["/api/v1/gc?dry_run=true", "/v2/cache/app/blobs/uploads/"] {
                let r = post(path, Some(origin.into())).await;
                assert_eq!(r.status(), 403, "{origin} {path}");
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["errors"][0]["code"], "DENIED", "{origin} {path}");
            }
        }
        // The server's own page, and clients that send no Origin, are served.
        let own = format!("http://{}", server.host);
        for origin in [Some(own), None] {
            assert_eq!(
                post("/api/v1/gc?dry_run=true", origin.clone())
                    .await
                    .status(),
                200
            );
            let r = post("/v2/cache/app/blobs/uploads/", origin.clone()).await;
            assert_eq!(r.status(), 202, "{origin:?}");
        }
        // Reading is not a request forgery can use: GETs are served whatever their Origin.
        let r = client
            .get(server.at("/v2/"))
            .header("origin", "https://evil.example")
            .header("authorization", authorization.clone().unwrap_or_default())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[test]
fn real_clients_push_their_own_namespace_and_are_denied_the_default_branch() {
    let _daemon = DAEMON.lock().unwrap_or_else(|p| p.into_inner());
    if !common::require_tool("/usr/bin/docker") {
        return;
    }
    let server = token_server();
    let main = credential(&server, &["--pull", "cache/**", "--push", "cache/app/main"]);
    let pr = credential(
        &server,
        &["--pull", "cache/app/**", "--push", "cache/app/pr-7/**"],
    );
    let host = &server.host;
    let main_image = format!("{host}/cache/app/main:v1");
    let pr_image = format!("{host}/cache/app/pr-7/app:v1");
    let config = tempfile::tempdir().unwrap();
    let config = config.path();
    let context = common::busybox_context(&server, "Dockerfile", DOCKERFILE);
    let cleanup = |tags: &[&str]| {
        common::run(&mut docker(config, &["builder", "prune", "-af"]));
        for tag in tags {
            common::run(&mut docker(config, &["image", "rm", "-f", tag]));
        }
    };
    cleanup(&[&main_image, &pr_image]);

    // The default branch's build pushes its image with inline cache.
    let login = |user: &str, password: &str| {
        let mut command = docker(config, &["login", host, "-u", user, "--password-stdin"]);
        let out = common::output_with_input(&mut command, password.as_bytes());
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    login("main-build", &main);
    common::run_ok(
        docker(
            config,
            &[
                "build",
                "--network=none",
                "--progress=plain",
                "-t",
                &main_image,
            ],
        )
        .args(["--build-arg", "BUILDKIT_INLINE_CACHE=1"])
        .arg(context.path()),
    );
    common::run_ok(&mut docker(config, &["push", &main_image]));
    cleanup(&[&main_image]);

    // The pull request's build imports it with its own login: every step CACHED.
    login("pr-7", &pr);
    let warm = common::run_ok(
        docker(config, &["build", "--network=none", "--progress=plain"])
            .args(["--cache-from", &main_image, "-t", &pr_image])
            .arg(context.path()),
    );
    let steps = common::step_outcomes(&warm);
    assert!(!steps.is_empty(), "{warm}");
    assert!(
        steps.values().all(|end| end == "CACHED"),
        "{steps:#?}\n{warm}"
    );
    common::run_ok(&mut docker(config, &["push", &pr_image]));
    // Its layers are mounted from the default branch's repository, which its credential
    // may pull: docker asks for a token covering both.
    let mounted = server
        .log()
        .lines()
        .filter(|l| l.contains("method=POST path=/v2/cache/app/pr-7/app/blobs/uploads/ "))
        .filter(|l| common::log_field(l, "status").as_deref() == Some("201"))
        .count();
    assert!(mounted > 0, "nothing mounted into cache/app/pr-7/app");
    // Its push over the default branch's cache is denied.
    common::run_ok(&mut docker(config, &["tag", &pr_image, &main_image]));
    let (pushed, out) = common::run(&mut docker(config, &["push", &main_image]));
    assert!(!pushed, "{out}");
    assert!(out.contains("denied"), "{out}");

    // Into a repository whose credential may not pull where the layers are: docker's
    // mounts from there are answered with upload sessions, and it uploads instead.
    let other_image = format!("{host}/other/app:v1");
    login("other", &credential(&server, &["--push", "other/**"]));
    common::run_ok(&mut docker(config, &["tag", &pr_image, &other_image]));
    common::run_ok(&mut docker(config, &["push", &other_image]));
    let log = server.log();
    let started: Vec<String> = log
        .lines()
        .filter(|l| l.contains("method=POST path=/v2/other/app/blobs/uploads/ "))
        .filter_map(|l| common::log_field(l, "status"))
        .collect();
    assert!(
        !started.is_empty() && started.iter().all(|s| s == "202"),
        "nothing mounted: {started:?}"
    );
    common::run(&mut docker(config, &["image", "rm", "-f", &other_image]));

    // explain reads with a credential that may pull, and says which one it needs.
    let explain = |credential: &str| {
        Command::new(env!("CARGO_BIN_EXE_layercache"))
            .args(["explain", "--cache-from", &main_image])
            .env("LAYERCACHE_CREDENTIAL", credential)
            .output()
            .unwrap()
    };
    let out = explain(&pr);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = explain("");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("LAYERCACHE_CREDENTIAL"),
        "{}",
        text(&out.stderr)
    );

    // Sessions are named by the logins, without asking for a name.
    let viewer = credential(&server, &["--view"]);
    let sessions: Vec<serde_json::Value> = block_on(async {
        let response = reqwest::Client::new()
            .get(server.at("/api/v1/sessions?since=0"))
            .header("authorization", basic("viewer", &viewer))
            .send()
            .await;
        response.unwrap().json().await.unwrap()
    });
    let names: Vec<&str> = sessions.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(
        names.contains(&"main-build") && names.contains(&"pr-7"),
        "{names:?}"
    );
    cleanup(&[&main_image, &pr_image]);

    // skopeo and buildah with --creds: the same rights.
    if !common::require_tool("skopeo") || !common::require_tool("buildah") {
        return;
    }
    let creds = format!("pr-7:{pr}");
    let skopeo = |dest: &str| {
        common::run(
            Command::new("skopeo")
                .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
                .args(["--src-creds", &creds, "--dest-creds", &creds])
                .arg(format!("docker://{pr_image}"))
                .arg(format!("docker://{dest}")),
        )
    };
    let (copied, out) = skopeo(&format!("{host}/cache/app/pr-7/copy:v1"));
    assert!(copied, "{out}");
    let (copied, out) = skopeo(&format!("{host}/cache/app/main:copied"));
    assert!(!copied && out.to_lowercase().contains("denied"), "{out}");
    let storage = tempfile::tempdir().unwrap();
    let buildah = |args: &[&str]| {
        common::run(
            Command::new("buildah")
                .arg("--root")
                .arg(storage.path().join("root"))
                .arg("--runroot")
                .arg(storage.path().join("runroot"))
                .args(["--storage-driver", "vfs"])
                .args(args),
        )
    };
    let with_creds = ["--tls-verify=false", "--creds", &creds];
    let source = format!("docker://{pr_image}");
    let (pulled, out) = buildah(&[&["pull"], &with_creds[..], &[&source]].concat());
    assert!(pulled, "{out}");
    let push_to = |dest: &str| {
        let dest = format!("docker://{host}/{dest}");
        buildah(&[&["push"], &with_creds[..], &[&pr_image, &dest]].concat())
    };
    let (pushed, out) = push_to("cache/app/pr-7/buildah:v1");
    assert!(pushed, "{out}");
    let (pushed, out) = push_to("cache/app/main:buildah");
    assert!(!pushed && out.to_lowercase().contains("denied"), "{out}");
}

#[tokio::test]
async fn one_credential_carries_registry_and_actions_cache_scopes() {
    let server = token_server();
    let both = credential(
        &server,
        &[
            "--pull",
            "cache/app/**",
            "--read",
            "refs/heads/main",
            "--write",
            "refs/pull/7/merge",
        ],
    );
    let client = reqwest::Client::new();
    let r = client
        .get(server.at("/v2/cache/app/main/tags/list"))
        .header("authorization", basic("ci", &both))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "pull allowed, the repository is empty");
    let r = client
        .post(
            server.at("/twirp/github.actions.results.api.v1.CacheService/GetCacheEntryDownloadURL"),
        )
        .header("authorization", format!("Bearer {both}"))
        .header("content-type", "application/json")
        .body(r#"{"key":"k","restore_keys":[],"version":"v"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// A cross-repository mount moves no bytes, so it must not move rights either: a caller
/// that may push `team-b` but not pull `team-a` gets an upload session (202), as
/// distribution answers, not `team-a`'s blob; nor does leaving out `from` find it.
#[tokio::test]
async fn a_mount_takes_blobs_only_from_repositories_the_caller_may_pull() {
    let server = token_server();
    let owner = credential(&server, &["--push", "team-a/**"]);
    let outsider = credential(&server, &["--push", "team-b/**"]);
    let reader = credential(&server, &["--pull", "team-a/**", "--push", "team-b/**"]);
    let everywhere = credential(&server, &["--push", "**"]);
    let client = reqwest::Client::new();
    let secret = b"team-a's layer";
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(secret)));
    let pushed = client
        .post(server.at(&format!("/v2/team-a/app/blobs/uploads/?digest={digest}")))
        .header("authorization", basic("a", &owner))
        .body(&secret[..])
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 201);

    let mount = |password: &str, into: &str, from: Option<&str>| {
        let from = from.map(|f| format!("&from={f}")).unwrap_or_default();
        client
            .post(server.at(&format!("/v2/{into}/blobs/uploads/?mount={digest}{from}")))
            .header("authorization", basic("ci", password))
            .send()
    };
    let read = |password: &str, repo: &str| {
        client
            .get(server.at(&format!("/v2/{repo}/blobs/{digest}")))
            .header("authorization", basic("ci", password))
            .send()
    };
    for (into, from) in [("team-b/q", Some("team-a/app")), ("team-b/r", None)] {
        let r = mount(&outsider, into, from).await.unwrap();
        assert_eq!(r.status(), 202, "{into} from {from:?}");
        assert!(
            r.headers()["location"]
                .to_str()
                .unwrap()
                .contains("/blobs/uploads/")
        );
        let r = read(&outsider, into).await.unwrap();
        assert_eq!(r.status(), 404, "{into}: nothing was linked");
    }
    // With pull on the source it mounts; leaving out `from` needs pull on everything.
    let r = mount(&reader, "team-b/q", Some("team-a/app"))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        read(&reader, "team-b/q")
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        &secret[..]
    );
    let r = mount(&reader, "team-b/r", None).await.unwrap();
    assert_eq!(r.status(), 202);
    let r = mount(&everywhere, "team-c/s", None).await.unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn anonymous_pulls_when_allowed_and_is_asked_to_log_in_to_push() {
    let server = Server::start_with_env(&[
        ("LAYERCACHE_SERVER__AUTH__MODE", "token"),
        ("LAYERCACHE_SERVER__AUTH__ANONYMOUS", "pull"),
    ]);
    let client = reqwest::Client::new();
    let pull = client
        .get(server.at("/v2/cache/app/main/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(pull.status(), 404, "allowed; the repository is empty");
    // An anonymous token pulls too, and is asked to log in to push.
    let token: serde_json::Value = client
        .get(server.at("/token?service=layercache&scope=repository:cache/app/main:pull,push"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap();
    for authorization in [None, Some(format!("Bearer {token}"))] {
        let mut request = client.post(server.at("/v2/cache/app/main/blobs/uploads/"));
        if let Some(authorization) = &authorization {
            request = request.header("authorization", authorization);
        }
        let push = request.send().await.unwrap();
        assert_eq!(push.status(), 401, "{authorization:?}");
        assert!(push.headers().contains_key("www-authenticate"));
    }
}

#[tokio::test]
async fn the_api_metrics_and_dashboard_need_a_viewer_and_gc_an_admin() {
    let server = token_server();
    let pull = credential(&server, &["--pull", "**"]);
    let view = credential(&server, &["--view"]);
    let admin = credential(&server, &["--admin"]);
    let client = reqwest::Client::new();
    let status = |method: reqwest::Method, path: &str, password: Option<&str>| {
        let mut request = client.request(method, server.at(path));
        if let Some(password) = password {
            request = request.header("authorization", basic("ci", password));
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method;
    for path in ["/api/v1/sessions", "/api/v1/gc", "/metrics", "/ui"] {
        let anonymous = client.get(server.at(path)).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path}");
        assert_eq!(
            anonymous.headers()["www-authenticate"],
            "Basic realm=\"layercache\""
        );
        assert_eq!(status(Method::GET, path, Some(&pull)).await, 403, "{path}");
        assert_eq!(status(Method::GET, path, Some(&view)).await, 200, "{path}");
    }
    assert_eq!(status(Method::POST, "/api/v1/gc", Some(&view)).await, 403);
    assert_eq!(status(Method::POST, "/api/v1/gc", Some(&admin)).await, 200);

    // The commands log in with LAYERCACHE_CREDENTIAL.
    let report = |credential: &str| {
        Command::new(env!("CARGO_BIN_EXE_layercache"))
            .args(["report", "--server", &server.url])
            .env("LAYERCACHE_CREDENTIAL", credential)
            .output()
            .unwrap()
    };
    let out = report(&view);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = report("");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
}
