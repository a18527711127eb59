//! What authentication costs: a second layercache in `token` mode, read as every
//! registry client reads it (a bearer token from `/token`, fetched once with the
//! credential as Basic), under the same HEAD and manifest GET loads as the open one. The
//! figures are its rates; their limit is the open server's in the same run.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};

use crate::registry::Registry;
use crate::servers::Server;
use crate::workloads::{REPO_BLOBS, REPO_CACHE, REPO_MANIFESTS};

/// The server in `token` mode, and a registry client holding a bearer token for it.
pub struct Guarded {
    /// The server.
    pub server: Server,
    /// A client that sends the bearer token with every request.
    pub registry: Registry,
}

/// Start layercache in `token` mode in `dir` and log in to it with a credential that
/// may push and pull everything.
pub async fn start(bin: &Path, dir: &Path) -> Result<Guarded> {
    let env = [
        ("LAYERCACHE_SERVER__AUTH__MODE", "token"),
        // One token for the whole run, as a client re-fetching it would hold.
        ("LAYERCACHE_SERVER__AUTH__TOKEN_TTL", "6h"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let mut server = Server::start_layercache_with(bin, dir, &env)?;
    let out = Command::new(bin)
        .args(["token", "--data-dir"])
        .arg(&server.data_dir)
        .args(["--push", "**", "--ttl", "6h"])
        .output()
        .with_context(|| format!("running {} token", bin.display()))?;
    ensure!(out.status.success(), "`layercache token` failed");
    let credential = String::from_utf8(out.stdout)?.trim().to_owned();
    // A token covers the repositories its request names, as a client asks for them.
    let scopes = [REPO_BLOBS, REPO_CACHE, REPO_MANIFESTS]
        .map(|repo| ("scope", format!("repository:{repo}:pull,push")));
    let answer: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/token?service=layercache", server.url))
        .query(&scopes)
        .basic_auth("bench", Some(&credential))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let bearer = answer
        .get("token")
        .and_then(|t| t.as_str())
        .context("the token endpoint answered no token")?;
    let authorization = format!("Bearer {bearer}");
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_str(&authorization)?);
    let client = crate::registry::http_client_with(headers)?;
    let registry = Registry::new(client, &server.url)?.with_authorization(authorization);
    server.wait_ready(&registry).await?;
    Ok(Guarded { server, registry })
}
