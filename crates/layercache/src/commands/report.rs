//! `layercache report`: what recent builds read from and wrote to the cache.

use anyhow::Context;
use bytesize::ByteSize;
use server::sessions::Session;
use server::upstream::UpstreamStats;

use crate::cli::ReportArgs;

/// Print the sessions as a table (or JSON).
pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let since = super::since(&args.since)?;
    let sessions = super::sessions(
        &args.server.url,
        since,
        args.repo.as_deref(),
        args.session.as_deref(),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(());
    }
    if sessions.is_empty() {
        println!("no build sessions since {}", super::clock(since));
    } else {
        print!("{}", table(&sessions, args.repo.as_deref()));
    }
    let url = format!("{}/api/v1/upstreams", args.server.url.trim_end_matches('/'));
    let upstreams = match super::call(&args.server.url, reqwest::Client::new().get(&url)).await {
        Ok(body) => serde_json::from_str(&body).context("parsing the server's upstreams")?,
        Err(e) => {
            // A server older than this client has none to report.
            eprintln!("upstreams not reported: {e:#}");
            Vec::<UpstreamStats>::new()
        }
    };
    if !upstreams.is_empty() {
        print!(
            "\nupstreams, since the server started:\n{}",
            upstream_table(&upstreams)
        );
    }
    Ok(())
}

/// One row per upstream: reads served from disk, fills, bytes fetched.
fn upstream_table(upstreams: &[UpstreamStats]) -> String {
    let header = [
        "UPSTREAM", "URL", "HITS", "FILLS", "FETCHED", "STALE", "FAILURES",
    ];
    let split = |counts: &std::collections::BTreeMap<String, u64>| {
        let total: u64 = counts.values().sum();
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        match parts.len() {
            0 => "0".to_owned(),
            _ => format!("{total} ({})", parts.join(", ")),
        }
    };
    let rows: Vec<Vec<String>> = upstreams
        .iter()
        .map(|u| {
            vec![
                u.upstream.clone(),
                u.url.clone(),
                split(&u.hits),
                split(&u.fills),
                ByteSize(u.bytes).display().iec().to_string(),
                u.stale.to_string(),
                u.failures.to_string(),
            ]
        })
        .collect();
    super::aligned(&header, &rows)
}

/// One row per session, most recent first; with `repo`, the counts are those in it.
fn table(sessions: &[Session], repo: Option<&str>) -> String {
    let header = [
        "SESSION",
        "CLIENT",
        "REPOSITORIES",
        "STARTED",
        "SECONDS",
        "HITS",
        "MISSES",
        "HIT%",
        "PROBES",
        "IMPORTS",
        "NO-CACHE",
        "READ",
        "FILLED",
        "WRITTEN",
        "AVOIDED",
        "ERRORS",
    ];
    let size = |b: u64| ByteSize(b).display().iec().to_string();
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            let c = repo.map_or_else(|| s.counts.clone(), |r| s.counts_in(r));
            vec![
                s.name.clone().unwrap_or_else(|| s.id.clone()),
                s.client.clone().unwrap_or_default(),
                s.repositories.iter().cloned().collect::<Vec<_>>().join(","),
                super::clock(s.started_ms / 1000),
                format!("{:.1}", (s.ended_ms - s.started_ms) as f64 / 1000.0),
                c.hits().to_string(),
                c.misses().to_string(),
                c.hit_ratio()
                    .map_or("-".to_owned(), |r| format!("{:.0}", r * 100.0)),
                c.push_probes.to_string(),
                c.cache_imports.to_string(),
                c.no_cache_lookups.to_string(),
                size(c.bytes_served),
                size(c.bytes_filled),
                size(c.bytes_written),
                size(c.bytes_avoided),
                c.errors.to_string(),
            ]
        })
        .collect();
    let mut out = super::aligned(&header, &rows);
    for s in sessions {
        let c = repo.map_or_else(|| s.counts.clone(), |r| s.counts_in(r));
        // A build (it wrote, or its cache repository was named) that got no cache.
        let build = repo.is_some() || s.counts.writes() > 0;
        if build && c.no_cache_lookups > 0 && c.reads() == 0 {
            let name = s.name.as_deref().unwrap_or(&s.id);
            out += &format!(
                "\n{name}: useless import: it looked up {} (image(s) without cache metadata) \
                 and obtained no cache; `layercache explain --session {name}` says what to \
                 change\n",
                s.no_cache_images.join(", ")
            );
        }
    }
    out
}
