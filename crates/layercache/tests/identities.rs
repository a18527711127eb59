//! Identities other than minted credentials, with real clients: static users with
//! `htpasswd -B` and argon2 hashes, and CI identity tokens from a test issuer whose
//! claims rules map to registry and Actions cache scopes alike.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::Server;
use common::jwt::{rsa_key, sign};

const ISSUER: &str = "https://ci.example";
const AUDIENCE: &str = "layercache";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A server in `token` mode configured by `toml` (appended to `[server.auth]`).
fn server_with(dir: &Path, toml: &str) -> Server {
    let config = dir.join("layercache.toml");
    std::fs::write(&config, format!("[server.auth]\nmode = \"token\"\n{toml}")).unwrap();
    Server::start_with_env(&[("LAYERCACHE_CONFIG", config.to_str().unwrap())])
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A manifest pushed with `authorization` to `repo:tag` over the raw API: the status.
async fn push_manifest(server: &Server, authorization: &str, repo: &str, tag: &str) -> u16 {
    let client = reqwest::Client::new();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let digest = common::digest_of(config);
    let r = client
        .post(server.at(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .header("authorization", authorization)
        .body(config.to_vec())
        .send()
        .await
        .unwrap();
    if r.status() != 201 {
        let status = r.status().as_u16();
        eprintln!("upload to {repo}: {status} {}", r.text().await.unwrap());
        return status;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": config.len()},
        "layers": [],
    });
    client
        .put(server.at(&format!("/v2/{repo}/manifests/{tag}")))
        .header("authorization", authorization)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

#[test]
fn static_users_log_in_with_bcrypt_and_argon2_hashes() {
    if !common::require_tool("htpasswd") || !common::require_tool("argon2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("htpasswd")
        .args(["-nbB", "ci", "s3cret"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = text(&out.stdout).trim().to_owned();
    let out = common::output_with_input(
        Command::new("argon2").args(["saltsaltsalt", "-id", "-e"]),
        b"bot-pass",
    );
    assert!(out.status.success());
    let argon = text(&out.stdout).trim().to_owned();
    let server = server_with(
        dir.path(),
        &format!(
            "[[server.auth.users]]\nhtpasswd = '{line}'\npull = [\"cache/**\"]\npush = [\"cache/team/**\"]\n\
             [[server.auth.users]]\nname = \"bot\"\npassword = '{argon}'\npull = [\"cache/team/**\"]\n"
        ),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ci = basic("ci", "s3cret");
    assert_eq!(
        rt.block_on(push_manifest(&server, &ci, "cache/team/app", "v1")),
        201
    );
    assert_eq!(
        rt.block_on(push_manifest(&server, &ci, "cache/other/app", "v1")),
        403,
        "outside its push globs: DENIED"
    );
    for wrong in [
        basic("ci", "S3cret"),
        basic("nobody", "s3cret"),
        basic("bot", "s3cret"),
    ] {
        let status = rt.block_on(status_of(
            reqwest::Client::new()
                .get(server.at("/v2/cache/team/app/tags/list"))
                .header("authorization", &wrong),
        ));
        assert_eq!(status, 401, "{wrong}");
    }
    let bot = basic("bot", "bot-pass");
    let status = rt.block_on(status_of(
        reqwest::Client::new()
            .get(server.at("/v2/cache/team/app/tags/list"))
            .header("authorization", &bot),
    ));
    assert_eq!(status, 200);
    assert_eq!(
        rt.block_on(push_manifest(&server, &bot, "cache/team/app", "v2")),
        403
    );

    // Real clients, unchanged: skopeo pushes and pulls with the user's password.
    if !common::require_tool("skopeo") {
        return;
    }
    let image = dir.path().join("image");
    common::run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--src-creds", "ci:s3cret"])
            .arg(format!("docker://{}/cache/team/app:v1", server.host))
            .arg(format!("oci:{}", image.display())),
    );
    let push_as = |creds: &str, repo: &str| {
        common::run(
            Command::new("skopeo")
                .args(["copy", "--dest-tls-verify=false", "--dest-creds", creds])
                .arg(format!("oci:{}", image.display()))
                .arg(format!("docker://{}/{repo}", server.host)),
        )
    };
    let (copied, out) = push_as("ci:s3cret", "cache/team/copy:v1");
    assert!(copied, "{out}");
    let (copied, out) = push_as("bot:bot-pass", "cache/team/bot:v1");
    assert!(!copied && out.to_lowercase().contains("denied"), "{out}");

    // And docker: login, push, pull.
    if !common::require_tool("/usr/bin/docker") {
        return;
    }
    let config = tempfile::tempdir().unwrap();
    let docker = |args: &[&str]| {
        let mut command = common::docker(args);
        command.env("DOCKER_CONFIG", config.path());
        command
    };
    let out = common::output_with_input(
        &mut docker(&["login", &server.host, "-u", "ci", "--password-stdin"]),
        b"s3cret",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tag = format!("{}/cache/team/docker:v1", server.host);
    common::run_ok(&mut docker(&[
        "pull",
        &format!("{}/cache/team/copy:v1", server.host),
    ]));
    common::run_ok(&mut docker(&[
        "tag",
        &format!("{}/cache/team/copy:v1", server.host),
        &tag,
    ]));
    common::run_ok(&mut docker(&["push", &tag]));
    for image in [tag.clone(), format!("{}/cache/team/copy:v1", server.host)] {
        common::run(&mut docker(&["image", "rm", "-f", &image]));
    }
}

#[tokio::test]
async fn password_guessing_gets_ten_tries_a_minute_per_address() {
    if !common::require_tool("htpasswd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let user = |name: &str, password: &str| {
        let out = Command::new("htpasswd")
            .args(["-nbB", name, password])
            .output()
            .unwrap();
        let line = text(&out.stdout).trim().to_owned();
        format!("[[server.auth.users]]\nhtpasswd = '{line}'\npull = [\"cache/**\"]\nview = true\n")
    };
    let server = server_with(
        dir.path(),
        &(user("ci", "s3cret") + &user("bot", "bot-pass")),
    );
    let minted = common::mint_token(server.data_dir(), &["--pull", "cache/**"]);
    let client = reqwest::Client::new();
    let tags = |authorization: String| {
        client
            .get(server.at("/v2/cache/app/tags/list"))
            .header("authorization", authorization)
            .send()
    };
    // A login that succeeded before is remembered, not checked again.
    assert_eq!(tags(basic("ci", "s3cret")).await.unwrap().status(), 404);
    // Ten wrong passwords, for a user that exists or not, are refused as such.
    for attempt in 0..10 {
        let user = if attempt % 2 == 0 { "ci" } else { "nobody" };
        let r = tags(basic(user, &format!("guess-{attempt}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "attempt {attempt}");
    }
    // Then no password from this address is checked, the right one included, on the
    // registry, the token endpoint and the API alike, until the minute is over.
    let r = tags(basic("ci", "guess-10")).await.unwrap();
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
    let right_form = client
        .post(server.at("/token"))
        .form(&[
            ("grant_type", "password"),
            ("username", "bot"),
            ("password", "bot-pass"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(right_form.status(), 429);
    let api = client
        .get(server.at("/api/v1/sessions"))
        .header("authorization", basic("bot", "bot-pass"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 429);
    // What is not a password is not held up: the remembered login, a minted credential.
    assert_eq!(tags(basic("ci", "s3cret")).await.unwrap().status(), 404);
    assert_eq!(tags(basic("ci", &minted)).await.unwrap().status(), 404);
}

/// The rules of a repository's CI: the default branch writes its namespace and its
/// Actions scope; a pull request reads them and writes only its own.
const RULES: &str = r#"
[[server.auth.rules]]
claims = { repository = "org/app", ref = "refs/heads/main" }
pull = ["cache/{repository}/**"]
push = ["cache/{repository}/**"]
actions_write = "{ref}"

[[server.auth.rules]]
claims = { repository = "org/app", ref = 'refs/pull/(?<pr>\d+)/merge' }
pull = ["cache/{repository}/**"]
push = ["cache/{repository}/pr-{pr}/**"]
actions_read = ["refs/heads/{base_ref}"]
actions_write = "{ref}"
"#;

/// The claims of a job of `org/app` on `git_ref`.
fn job(git_ref: &str) -> serde_json::Value {
    let now = now();
    serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE,
        "sub": format!("repo:org/app:ref:{git_ref}"),
        "repository": "org/app", "repository_id": "4242",
        "ref": git_ref, "base_ref": "main", "run_id": "99",
        "iat": now, "nbf": now - 5, "exp": now + 600,
    })
}

/// An Actions cache v2 call with `token`: the status and body.
async fn twirp(
    server: &Server,
    token: &str,
    method: &str,
    body: serde_json::Value,
) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(server.at(&format!(
            "/twirp/github.actions.results.api.v1.CacheService/{method}"
        )))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An issuer without an audience would take a job's token requested for any other
/// service (a cloud, a vault) as a credential here: the server refuses to start.
#[test]
fn an_issuer_without_an_audience_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("layercache.toml");
    std::fs::write(
        &config,
        format!(
            "[server.auth]\nmode = \"token\"\n[[server.auth.issuers]]\nissuer = \"{ISSUER}\"\n\
             jwks = \"{}\"\n{RULES}",
            dir.path().join("jwks.json").display()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = common::serve_refused(&config, &data);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("set `audience`"), "{said}");
}

#[test]
fn ci_identity_tokens_get_the_same_rights_on_the_registry_and_the_actions_cache() {
    if !common::require_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = rsa_key(dir.path(), "k1");
    let elsewhere = tempfile::tempdir().unwrap();
    let other = rsa_key(elsewhere.path(), "k1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, &key.jwks).unwrap();
    let server = server_with(
        dir.path(),
        &format!(
            "[[server.auth.issuers]]\nissuer = \"{ISSUER}\"\njwks = \"{}\"\naudience = \"{AUDIENCE}\"\n{RULES}",
            jwks.display()
        ),
    );
    let main = sign(&key, "k1", job("refs/heads/main"));
    let pr = sign(&key, "k1", job("refs/pull/7/merge"));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Registry: the default branch writes its cache; the pull request reads it, writes
    // its own namespace, and is DENIED the default branch's.
    let as_oidc = |token: &str| basic("oidc", token);
    assert_eq!(
        rt.block_on(push_manifest(
            &server,
            &as_oidc(&main),
            "cache/org/app/main",
            "v1"
        )),
        201
    );
    assert_eq!(
        rt.block_on(status_of(
            reqwest::Client::new()
                .get(server.at("/v2/cache/org/app/main/manifests/v1"))
                .header("authorization", as_oidc(&pr)),
        )),
        200
    );
    assert_eq!(
        rt.block_on(push_manifest(
            &server,
            &as_oidc(&pr),
            "cache/org/app/pr-7/x",
            "v1"
        )),
        201
    );
    assert_eq!(
        rt.block_on(push_manifest(
            &server,
            &as_oidc(&pr),
            "cache/org/app/main",
            "v1"
        )),
        403
    );
    assert_eq!(
        rt.block_on(push_manifest(
            &server,
            &as_oidc(&pr),
            "cache/org/app/pr-8/x",
            "v1"
        )),
        403,
        "another pull request's namespace"
    );

    // The token endpoint's bearer never outlives the identity token.
    let mut claims = job("refs/heads/main");
    claims["exp"] = (now() + 30).into();
    let short = sign(&key, "k1", claims);
    let answer: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .get(
                server
                    .at("/token?service=layercache&scope=repository:cache/org/app/main:pull,push"),
            )
            .header("authorization", as_oidc(&short))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    let bearer = answer["token"].as_str().unwrap();
    let payload = bearer.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert!(claims["exp"].as_u64().unwrap() <= now() + 30, "{claims}");
    assert_eq!(claims["sub"], "repo:org/app:ref:refs/heads/main");
    assert_eq!(
        claims["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );

    // Refused: expired, signed by another key, another audience, unsigned, an
    // untrusted issuer.
    let mut expired = job("refs/heads/main");
    expired["exp"] = (now() - 3600).into();
    let mut audience = job("refs/heads/main");
    audience["aud"] = "someone-else".into();
    let mut issuer = job("refs/heads/main");
    issuer["iss"] = "https://elsewhere.example".into();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(job("refs/heads/main").to_string())
    );
    let refused = [
        ("expired", sign(&key, "k1", expired)),
        ("another key", sign(&other, "k1", job("refs/heads/main"))),
        ("another audience", sign(&key, "k1", audience)),
        ("unsigned", unsigned),
        ("untrusted issuer", sign(&key, "k1", issuer)),
    ];
    for (what, token) in &refused {
        assert_eq!(
            rt.block_on(push_manifest(
                &server,
                &as_oidc(token),
                "cache/org/app/main",
                "v2"
            )),
            401,
            "{what}"
        );
        let (status, body) = rt.block_on(twirp(
            &server,
            token,
            "CreateCacheEntry",
            serde_json::json!({"key": "k", "version": "v"}),
        ));
        assert_eq!(status, 401, "{what}: {body}");
    }

    // Actions cache: the same tokens as runtime tokens. The default branch saves; the
    // pull request restores it, saves into its own scope, and never into main's.
    rt.block_on(async {
        let cache = common::actions::Client::new(&server.url, main.clone());
        let entry = common::actions::Entry::new("deps-main".into(), b"from main".to_vec());
        cache.v2_save(&entry).await;
        let pr_cache = common::actions::Client::new(&server.url, pr.clone());
        pr_cache.v2_restores(&entry).await;
        let own = common::actions::Entry::new("deps-pr".into(), b"from pr".to_vec());
        pr_cache.v2_save(&own).await;
        pr_cache.v2_restores(&own).await;
        // The default branch never reads a pull request's entries.
        cache.v2_miss("deps-pr", &[]).await;
    });
}
