//! The subcommands that talk to a running server.

pub mod audit;
pub mod expect;
pub mod explain;
pub mod gc;
pub mod health;
pub mod lint;
pub mod report;
pub mod tls;
pub mod token;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use diagnose::explain::session::Builder;
use server::sessions::Session;

/// `--since` as seconds since the epoch: a duration ago ("15m"), a time
/// ("2026-11-23T12:03:00Z") or a number of seconds since the epoch.
pub fn since(text: &str) -> anyhow::Result<i64> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds);
    }
    let at = match humantime::parse_duration(text) {
        Ok(ago) => SystemTime::now()
            .checked_sub(ago)
            .context("--since reaches before the epoch")?,
        Err(_) => humantime::parse_rfc3339_weak(text).with_context(|| {
            format!(
                "--since {text:?} is neither a duration (15m) nor a time (2026-11-23T12:03:00Z)"
            )
        })?,
    };
    Ok(at.duration_since(UNIX_EPOCH)?.as_secs() as i64)
}

/// A time in seconds since the epoch, for people (UTC, to the second).
pub fn clock(seconds: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `rows` under `header`, each column as wide as its widest cell, two spaces apart.
pub fn aligned(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain([header.get(i).map_or(0, |h| h.len())])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The environment variable holding the credential the commands log in with.
pub const CREDENTIAL_VAR: &str = "LAYERCACHE_CREDENTIAL";

/// The credential the commands log in with (`LAYERCACHE_CREDENTIAL`: one from
/// `layercache token`), if set.
pub fn credential() -> Option<String> {
    std::env::var(CREDENTIAL_VAR).ok().filter(|c| !c.is_empty())
}

/// `request` carrying the credential as Basic authentication, when one is set.
pub fn with_credential(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match credential() {
        Some(credential) => request.basic_auth("layercache", Some(credential)),
        None => request,
    }
}

/// The build tool that made the requests of `sessions`, by their user agents.
pub fn builder_of(sessions: &[Session]) -> Builder {
    Builder::of(
        sessions
            .iter()
            .flat_map(|s| s.user_agents.iter().chain([&s.user_agent]))
            .map(String::as_str),
    )
}

/// The registry host the clients of `sessions` addressed, when one was recorded.
pub fn host_of(sessions: &[Session]) -> Option<String> {
    sessions.iter().find_map(|s| s.host.clone())
}

/// The build sessions a server recorded, filtered.
pub async fn sessions(
    server: &str,
    since: i64,
    repo: Option<&str>,
    session: Option<&str>,
) -> anyhow::Result<Vec<Session>> {
    let mut query = vec![("since", since.to_string())];
    query.extend(repo.map(|r| ("repo", r.to_owned())));
    query.extend(session.map(|s| ("session", s.to_owned())));
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/sessions", server.trim_end_matches('/'));
    let body = call(server, client.get(&url).query(&query)).await?;
    serde_json::from_str(&body).context("parsing the server's sessions")
}

/// Send `request` to the server at `server` with the credential: the body of a
/// successful answer, else an error naming the status and the server's words.
pub async fn call(server: &str, request: reqwest::RequestBuilder) -> anyhow::Result<String> {
    let response = with_credential(request)
        .send()
        .await
        .with_context(|| format!("reaching layercache at {server}"))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .context("reading the server's answer")?;
    anyhow::ensure!(status.is_success(), "the server answered {status}: {body}");
    Ok(body)
}
