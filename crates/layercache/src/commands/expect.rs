//! `layercache expect`: fail a CI step whose build did not use the cache as required.

use server::sessions::{Counts, Session};

use crate::cli::ExpectArgs;

/// Check the sessions of the repository since the given time; `Err` carries the
/// sentence for the CI log.
pub async fn run(args: ExpectArgs) -> anyhow::Result<()> {
    let since = super::since(&args.since)?;
    let session = args.session.as_deref();
    let url = &args.server.url;
    let sessions = super::sessions(url, since, Some(&args.repo), session).await?;
    let clock = super::clock(since);
    match judge(&args, &sessions, &clock) {
        Ok(summary) => {
            println!("{summary}");
            Ok(())
        }
        Err(failure) => {
            // Say what did reach layercache, so the log shows where the build went.
            let all = super::sessions(url, since, None, session).await?;
            eprintln!("layercache expect: {failure}; {}", seen(&all, &clock));
            std::process::exit(1);
        }
    }
}

/// What the sessions did in `repo`, added up.
fn counts_in(sessions: &[Session], repo: &str) -> Counts {
    let mut total = Counts::default();
    for session in sessions {
        total.add(&session.counts_in(repo));
    }
    total
}

/// Images without cache metadata the sessions imported from `repo`, as a sentence that
/// names them and the fix, or `None` when there were none.
fn useless_imports(sessions: &[Session], repo: &str) -> Option<String> {
    let mut images: Vec<&str> = Vec::new();
    for image in sessions.iter().flat_map(|s| &s.no_cache_images) {
        let in_repo = image
            .strip_prefix(repo)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'));
        if in_repo && !images.contains(&image.as_str()) {
            images.push(image);
        }
    }
    let first = images.first()?;
    let builder = super::builder_of(sessions);
    let full = match super::host_of(sessions) {
        Some(host) => format!("{host}/{first}"),
        None => (*first).to_owned(),
    };
    Some(format!(
        "the build imported {} — image(s) without cache metadata, so it got no cache \
         records from them and ran every step (a useless import); push {full} with its \
         cache: {}",
        images.join(", "),
        builder.inline_export_flag(&full)
    ))
}

/// What the sessions add up to in the repository, against what `args` requires.
fn judge(args: &ExpectArgs, sessions: &[Session], since: &str) -> Result<String, String> {
    let repo = &args.repo;
    let c = counts_in(sessions, repo);
    let (hits, misses) = (c.hits(), c.misses());
    let useless = useless_imports(sessions, repo);
    if c.reads() == 0 && c.writes() == 0 && useless.is_none() {
        let asked = if misses > 0 {
            format!(" ({misses} lookup(s) missed)")
        } else {
            String::new()
        };
        return Err(format!(
            "no cache reads or writes for {repo} since {since}{asked}: the build did not reach \
             {repo} — check that --cache-to / --cache-from reached the builder"
        ));
    }
    if args.reads && c.reads() == 0 {
        if let Some(useless) = useless {
            return Err(format!(
                "no cache reads for {repo} since {since}: {useless}"
            ));
        }
        let missed: Vec<&str> = sessions
            .iter()
            .flat_map(|s| s.missed.iter().map(String::as_str))
            .filter(|m| m.starts_with(&format!("{repo}:")) || m.starts_with(&format!("{repo}@")))
            .take(5)
            .collect();
        return Err(format!(
            "no cache reads for {repo} since {since}: {misses} lookup(s) missed ({}) — the \
             build found no cache to import; check --cache-from and that an earlier build \
             exported to it",
            missed.join(", ")
        ));
    }
    if args.writes && c.writes() == 0 {
        return Err(format!(
            "no cache writes for {repo} since {since}: nothing was stored in {repo} — check \
             --cache-to (or BUILDKIT_INLINE_CACHE=1 and the push)"
        ));
    }
    if let Some(min) = args.min_hit_ratio {
        let got = c.hit_ratio().unwrap_or(0.0);
        if got < min {
            let why = useless.map_or(String::new(), |u| format!("; {u}"));
            return Err(format!(
                "cache hit ratio for {repo} since {since} is {:.0}% ({hits} of {} lookups), \
                 below the required {:.0}%{why}",
                got * 100.0,
                hits + misses,
                min * 100.0
            ));
        }
    }
    Ok(format!(
        "{repo} since {since}: {} session(s), {hits} hit(s), {misses} miss(es), {} cache \
         import(s), {} push probe(s), {} bytes read, {} blob(s), {} manifest(s) and {} \
         cache entr(ies) written",
        sessions.len(),
        c.cache_imports,
        c.push_probes,
        c.bytes_served,
        c.blobs_written,
        c.manifests_written,
        c.entries_written
    ))
}

/// A sentence on what the sessions did, repository by repository.
fn seen(sessions: &[Session], since: &str) -> String {
    let mut repos: Vec<&str> = sessions
        .iter()
        .flat_map(|s| s.repositories.iter().map(String::as_str))
        .collect();
    repos.sort_unstable();
    repos.dedup();
    let done: Vec<String> = repos
        .into_iter()
        .filter_map(|repo| {
            let c = counts_in(sessions, repo);
            let mut did = Vec::new();
            if c.manifests_written + c.blobs_written + c.entries_written > 0 {
                did.push(format!(
                    "{} manifest(s), {} blob(s) and {} cache entr(ies) written",
                    c.manifests_written, c.blobs_written, c.entries_written
                ));
            }
            if c.hits() + c.blobs_served > 0 {
                did.push(format!(
                    "{} hit(s), {} blob(s) read",
                    c.hits(),
                    c.blobs_served
                ));
            }
            if c.misses() > 0 {
                did.push(format!("{} miss(es)", c.misses()));
            }
            if c.no_cache_lookups > 0 {
                did.push(format!(
                    "{} lookup(s) of images without cache metadata",
                    c.no_cache_lookups
                ));
            }
            (!did.is_empty()).then(|| format!("{repo}: {}", did.join(", ")))
        })
        .collect();
    if done.is_empty() {
        format!("nothing reached layercache since {since}")
    } else {
        format!("what reached layercache since {since}: {}", done.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(repo: &str, change: impl Fn(&mut Counts)) -> Session {
        let mut counts = Counts::default();
        change(&mut counts);
        let mut session: Session = serde_json::from_value(serde_json::json!({
            "id": "s", "name": null, "client": null, "user_agent": "", "started_ms": 0,
            "ended_ms": 0, "open": false, "repositories": [repo], "tags": [], "missed": [],
            "written": [], "avoided": [],
        }))
        .unwrap();
        session.by_repo.insert(repo.to_owned(), counts.clone());
        session.counts = counts;
        session
    }

    #[test]
    fn what_reached_layercache_is_said_by_repository() {
        let sessions = [
            session("s5/app", |c| {
                c.manifests_written = 1;
                c.blobs_written = 3;
            }),
            session("cache/s5", |c| c.manifest_misses = 1),
        ];
        assert_eq!(
            seen(&sessions, "T"),
            "what reached layercache since T: cache/s5: 1 miss(es); s5/app: 1 manifest(s), \
             3 blob(s) and 0 cache entr(ies) written"
        );
        assert_eq!(seen(&[], "T"), "nothing reached layercache since T");
    }

    #[test]
    fn a_useless_import_fails_the_reads_check_naming_the_image_and_the_fix() {
        let mut job2 = session("s5/prebuild", |c| c.no_cache_lookups = 2);
        job2.no_cache_images = vec!["s5/prebuild:v1".into()];
        job2.user_agents = ["containerd/1.6.20".to_owned()].into();
        job2.host = Some("127.0.0.1:5000".into());
        let args = |reads, ratio| ExpectArgs {
            server: crate::cli::ServerArg { url: String::new() },
            repo: "s5/prebuild".into(),
            since: "1h".into(),
            session: None,
            reads,
            writes: false,
            min_hit_ratio: ratio,
        };
        let failure = judge(&args(true, None), &[job2.clone()], "T").unwrap_err();
        assert!(failure.contains("imported s5/prebuild:v1"), "{failure}");
        assert!(
            failure.contains("push 127.0.0.1:5000/s5/prebuild:v1 with its cache"),
            "{failure}"
        );
        assert!(failure.contains("BUILDKIT_INLINE_CACHE=1"), "{failure}");
        let failure = judge(&args(false, Some(0.5)), &[job2], "T").unwrap_err();
        assert!(failure.contains("0 of 0 lookups"), "{failure}");
        assert!(failure.contains("useless import"), "{failure}");
    }
}
