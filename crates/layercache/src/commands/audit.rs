//! `layercache audit`: the server's audit log (writes, deletes, administrative actions
//! and denials), as stored or as a table.

use anyhow::Context;
use server::audit::Record;

use crate::cli::AuditArgs;

/// Print the lines recorded since `--since`: as stored (`--json`), or as a table.
pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let since = super::since(&args.since)?;
    let server = &args.server.url;
    let mut query = vec![("since", since.to_string())];
    query.extend(args.limit.map(|l| ("limit", l.to_string())));
    let url = format!("{}/api/v1/audit", server.trim_end_matches('/'));
    let body = super::call(server, reqwest::Client::new().get(&url).query(&query)).await?;
    if args.json {
        print!("{body}");
        return Ok(());
    }
    let records = body
        .lines()
        .map(serde_json::from_str::<Record>)
        .collect::<Result<Vec<Record>, _>>()
        .context("parsing the audit log")?;
    if records.is_empty() {
        println!("nothing audited since {}", super::clock(since));
        return Ok(());
    }
    print!("{}", table(&records));
    Ok(())
}

/// One row per line, oldest first.
fn table(records: &[Record]) -> String {
    let header = [
        "TIME",
        "IDENTITY",
        "ACTION",
        "REPOSITORY",
        "REF/DIGEST",
        "CLIENT",
        "STATUS",
        "REASON",
    ];
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.time.clone(),
                r.identity.clone().unwrap_or_else(|| "-".to_owned()),
                r.action.clone(),
                r.repository.clone().unwrap_or_else(|| "-".to_owned()),
                target(r),
                r.client.clone().unwrap_or_else(|| "-".to_owned()),
                r.status.to_string(),
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    super::aligned(&header, &rows)
}

/// The tag or key, and the digest shortened to 12 hex digits: `v1@sha256:0123456789ab`.
fn target(record: &Record) -> String {
    let digest = record.digest.as_deref().map(|d| match d.split_once(':') {
        Some((algorithm, hex)) => format!("{algorithm}:{}", hex.get(..12).unwrap_or(hex)),
        None => d.to_owned(),
    });
    match (&record.reference, digest) {
        (Some(reference), Some(digest)) => format!("{reference}@{digest}"),
        (Some(reference), None) => reference.clone(),
        (None, Some(digest)) => digest,
        (None, None) => "-".to_owned(),
    }
}
