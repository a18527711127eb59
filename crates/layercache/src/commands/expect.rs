//! `layercache expect`: fail a CI step whose build did not use the cache as required.

use server::sessions::Session;

use crate::cli::ExpectArgs;

/// Check the sessions of the repository since the given time; `Err` carries the
/// sentence for the CI log.
pub async fn run(args: ExpectArgs) -> anyhow::Result<()> {
    let since = super::since(&args.since)?;
    let sessions = super::sessions(
        &args.server.url,
        since,
        Some(&args.repo),
        args.session.as_deref(),
    )
    .await?;
    let verdict = judge(&args, &sessions, &super::clock(since));
    match verdict {
        Ok(summary) => {
            println!("{summary}");
            Ok(())
        }
        Err(failure) => {
            eprintln!("layercache expect: {failure}");
            std::process::exit(1);
        }
    }
}

/// What the sessions add up to, against what `args` requires.
fn judge(args: &ExpectArgs, sessions: &[Session], since: &str) -> Result<String, String> {
    let total = |f: fn(&Session) -> u64| sessions.iter().map(f).sum::<u64>();
    // Manifest lookups and Actions cache restores alike.
    let (hits, misses) = (total(Session::hits), total(Session::misses));
    let served = total(|s| s.bytes_served);
    let (blobs_written, manifests_written, entries_written) = (
        total(|s| s.blobs_written),
        total(|s| s.manifests_written),
        total(|s| s.entries_written),
    );
    let reads = hits + total(|s| s.blobs_served);
    let writes = blobs_written + manifests_written + entries_written;
    let repo = &args.repo;
    if reads == 0 && writes == 0 {
        let asked = if misses > 0 {
            format!(" ({misses} lookup(s) missed)")
        } else {
            String::new()
        };
        return Err(format!(
            "no cache reads or writes for {repo} since {since}{asked}: the build did not reach \
             layercache — check that --cache-to / --cache-from reached the builder"
        ));
    }
    if args.reads && reads == 0 {
        let missed: Vec<&str> = sessions
            .iter()
            .flat_map(|s| s.missed.iter().map(String::as_str))
            .take(5)
            .collect();
        return Err(format!(
            "no cache reads for {repo} since {since}: {misses} lookup(s) missed ({}) — the \
             build found no cache to import; check --cache-from and that an earlier build \
             exported to it",
            missed.join(", ")
        ));
    }
    if args.writes && writes == 0 {
        return Err(format!(
            "no cache writes for {repo} since {since}: nothing was stored — check --cache-to \
             (or BUILDKIT_INLINE_CACHE=1 and the push)"
        ));
    }
    let ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
    if let Some(min) = args.min_hit_ratio {
        let got = ratio.unwrap_or(0.0);
        if got < min {
            return Err(format!(
                "cache hit ratio for {repo} since {since} is {:.0}% ({hits} of {} lookups), \
                 below the required {:.0}%",
                got * 100.0,
                hits + misses,
                min * 100.0
            ));
        }
    }
    Ok(format!(
        "{repo} since {since}: {} session(s), {hits} hit(s), {misses} miss(es), {served} bytes \
         read, {blobs_written} blob(s), {manifests_written} manifest(s) and {entries_written} \
         cache entr(ies) written",
        sessions.len()
    ))
}
