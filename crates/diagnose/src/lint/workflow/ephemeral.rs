//! A `type=local` cache on a GitHub-hosted runner: every job starts on a fresh machine,
//! so a directory that no step brings back (`actions/cache`, an artifact download) is
//! empty when the build imports it, and what the build exports there is thrown away.

use crate::lint::cache::{Build, CacheKind};
use crate::lint::finding::{Finding, Rule};
use crate::lint::yaml::Node;

/// Whether a job's `runs-on` names only GitHub-hosted images (`ubuntu-latest`,
/// `windows-2022`, `macos-14`, ...); self-hosted, larger or computed runners are not.
pub(crate) fn hosted(job: &Node) -> bool {
    let Some(runs_on) = job.get("runs-on") else {
        return false;
    };
    let labels: Vec<&str> = match runs_on.text() {
        Some(label) => vec![label],
        None => runs_on.items().iter().filter_map(Node::text).collect(),
    };
    !labels.is_empty()
        && labels.iter().all(|label| {
            !label.contains("${{")
                && ["ubuntu-", "windows-", "macos-"]
                    .iter()
                    .any(|image| label.starts_with(image))
        })
}

/// What a job does besides its builds, as far as keeping a directory goes.
#[derive(Default)]
pub(crate) struct Job {
    /// The `path:` inputs of its other action steps (`actions/cache`, an artifact
    /// download).
    pub paths: Vec<String>,
    /// The lines of its `run:` scripts.
    pub script: Vec<String>,
    /// Whether a step may restore anything (a local action, an action named for
    /// caching): the check stays silent.
    pub may_restore: bool,
}

/// `cache-write-never-read` for each import of a local directory, in the builds of one
/// job on a hosted runner, that no earlier build of the job fills and no step brings
/// back.
pub(crate) fn check(name: &str, builds: &[Build], job: &Job) -> Vec<Finding> {
    if job.may_restore {
        return Vec::new();
    }
    let mut findings = Vec::new();
    for (index, build) in builds.iter().enumerate() {
        if build.moves_cache {
            continue;
        }
        for from in &build.cache_from {
            let CacheKind::Local(dir) = &from.value.kind else {
                continue;
            };
            let dir = dir.trim_end_matches('/');
            let kept = job.paths.iter().any(|path| covers(path, dir))
                || job.script.iter().any(|line| copies(line, dir));
            if dir.is_empty() || dir.contains('$') || kept {
                continue;
            }
            let filled = builds.iter().take(index).any(|earlier| {
                earlier.cache_to.iter().any(|c| {
                    matches!(&c.value.kind, CacheKind::Local(d) if d.trim_end_matches('/') == dir)
                })
            });
            if filled {
                continue;
            }
            findings.push(Finding::new(
                Rule::CacheWriteNeverRead,
                &build.file,
                from.line,
                format!(
                    "{} imports `{}` in job `{name}` on a GitHub-hosted runner, but no step \
                     brings `{dir}` back (no actions/cache with that path): every job starts \
                     on a fresh machine, so the import finds nothing and the cache exported \
                     beside it is thrown away",
                    build.what, from.value.text
                ),
                format!(
                    "add an actions/cache step with `path: {dir}` before the build (key on the \
                     commit, restore-keys on a prefix), or use a registry cache"
                ),
            ));
        }
    }
    findings
}

/// Whether a script line does something with `dir` other than building with it,
/// removing, moving or making it (an upload, a sync, a copy).
fn copies(line: &str, dir: &str) -> bool {
    let line = line.trim();
    line.contains(dir)
        && !line.starts_with('#')
        && !["rm ", "mv ", "mkdir ", "docker ", "buildctl "]
            .iter()
            .any(|command| line.starts_with(command))
        && !["type=local", "--cache-from", "--cache-to"]
            .iter()
            .any(|flag| line.contains(flag))
}

/// Whether an input value names `dir` or a directory above it (or may, being computed).
fn covers(value: &str, dir: &str) -> bool {
    value.lines().any(|line| {
        let path = line.trim().trim_end_matches('/');
        !path.is_empty()
            && (path.contains("${{")
                || path.contains('*')
                || path == dir
                || dir.starts_with(&format!("{path}/")))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_github_images_are_hosted() {
        let job = |text: &str| crate::lint::yaml::parse(text).unwrap();
        assert!(hosted(&job("runs-on: ubuntu-latest\n")));
        assert!(hosted(&job("runs-on: [macos-14]\n")));
        assert!(!hosted(&job("runs-on: [self-hosted, linux]\n")));
        assert!(!hosted(&job("runs-on: ${{ matrix.os }}\n")));
        assert!(!hosted(&job("runs-on: buildjet-4vcpu-ubuntu-2204\n")));
    }

    #[test]
    fn a_path_covers_itself_and_what_is_below_it() {
        assert!(covers("/tmp/.buildx-cache", "/tmp/.buildx-cache"));
        assert!(covers("/tmp/", "/tmp/.buildx-cache"));
        assert!(covers("a\n/tmp/.buildx-cache/\n", "/tmp/.buildx-cache"));
        assert!(!covers("/tmp/.buildx", "/tmp/.buildx-cache"));
        assert!(copies(
            "aws s3 sync /tmp/.buildx-cache s3://b/c",
            "/tmp/.buildx-cache"
        ));
        assert!(!copies("rm -rf /tmp/.buildx-cache", "/tmp/.buildx-cache"));
        assert!(!copies(
            "  --cache-from type=local,src=/tmp/.buildx-cache \\",
            "/tmp/.buildx-cache"
        ));
    }
}
