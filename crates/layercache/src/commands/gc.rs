//! `layercache gc`: run one eviction pass on a running server and print what it did.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use bytesize::ByteSize;
use store::GcReport;

use crate::cli::GcArgs;

/// Ask the server for a pass and print its report.
pub async fn run(args: GcArgs) -> anyhow::Result<()> {
    let url = format!(
        "{}/api/v1/gc?dry_run={}",
        args.server.url.trim_end_matches('/'),
        args.dry_run
    );
    let body = super::call(&args.server.url, reqwest::Client::new().post(&url)).await?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let report: GcReport = serde_json::from_str(&body).context("parsing the server's report")?;
    print!("{}", summary(&report));
    Ok(())
}

/// The report in a few lines for people.
fn summary(r: &GcReport) -> String {
    let size = |b: u64| ByteSize(b).display().iec().to_string();
    let verb = if r.dry_run { "would evict" } else { "evicted" };
    let mut out = format!(
        "{verb} {} image(s) or cache(s) and {} Actions cache entr(ies), {} {} blob(s) ({}), {} \
         upload(s) expired\n",
        r.evicted.len(),
        r.evicted_entries.len(),
        if r.dry_run { "would remove" } else { "removed" },
        r.blobs_removed,
        size(r.bytes_freed),
        r.uploads_expired,
    );
    out += &format!(
        "usage {} -> {} of {} (evicts from {} down to {})\n",
        size(r.usage_before.total),
        size(r.usage_after.total),
        size(r.quota.limit),
        size(r.quota.high),
        size(r.quota.low),
    );
    if r.quota.squeezed() {
        out += &format!(
            "the filesystem's free space sets the quota: max_size allows {}, and min_free keeps \
             {} free on it\n",
            size(r.quota.max_size),
            size(r.quota.min_free),
        );
    }
    if r.kept_in_use + r.kept_pinned > 0 {
        out += &format!(
            "kept {} in use and {} pinned\n",
            r.kept_in_use, r.kept_pinned
        );
    }
    if r.released_bytes > 0 {
        let when = r.next_sweep_at.map_or(String::new(), |at| {
            let at = UNIX_EPOCH + Duration::from_secs(at.max(0) as u64);
            format!(", the first at {}", humantime::format_rfc3339_seconds(at))
        });
        out += &format!(
            "{} released, leaving once their push window lapses{when}\n",
            size(r.released_bytes)
        );
    }
    if r.shortfall > 0 {
        out += &format!(
            "the quota cannot be met: {} over the low watermark, and every root left is in use or \
             pinned\n",
            size(r.shortfall)
        );
    }
    for root in &r.evicted {
        let used = UNIX_EPOCH + Duration::from_secs(root.last_used.max(0) as u64);
        let name = if root.tags.is_empty() {
            format!("{}@{}", root.repo, root.digest)
        } else {
            format!("{}:{}", root.repo, root.tags.join(","))
        };
        out += &format!(
            "  {name}  (last used {})\n",
            humantime::format_rfc3339_seconds(used)
        );
    }
    for entry in &r.evicted_entries {
        let used = UNIX_EPOCH + Duration::from_secs(entry.last_used.max(0) as u64);
        out += &format!(
            "  actions:{} {}  ({}, last used {})\n",
            entry.scope,
            entry.key,
            size(entry.size),
            humantime::format_rfc3339_seconds(used)
        );
    }
    out
}
