//! GitHub workflow files: the builds their steps start (`run:` scripts,
//! `docker/build-push-action`, `docker/bake-action`), `matrix-too-large` for each job's
//! matrix, and `bake-git-context` for bake-action steps that build from the git context.

pub(crate) mod matrix;
pub(crate) mod shell;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::cache::{At, Build, BuildArg, CacheSpec};
use super::files;
use super::finding::{Finding, Rule};
use super::yaml::Node;

/// A `docker/bake-action` step, for `bake-git-context`.
pub(crate) struct BakeStep {
    /// The workflow file, as displayed.
    pub file: String,
    /// The line of `uses:`.
    pub line: usize,
    /// `docker/bake-action@REF`.
    pub uses: String,
    /// `with.source`, if given.
    pub source: Option<String>,
    /// The bake files it reads (given, or bake's defaults), on disk.
    pub files: Vec<PathBuf>,
    /// The cache settings its `set:` adds.
    pub set_cache: Vec<String>,
}

/// What a workflow holds for the lint.
pub(crate) struct Workflow {
    /// Builds its steps start.
    pub builds: Vec<Build>,
    /// Its bake-action steps.
    pub bake_steps: Vec<BakeStep>,
    /// `matrix-too-large` findings.
    pub findings: Vec<Finding>,
}

/// The files `docker buildx bake` reads when none is named.
const BAKE_DEFAULT_FILES: [&str; 8] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
    "docker-bake.json",
    "docker-bake.hcl",
    "docker-bake.override.json",
    "docker-bake.override.hcl",
];

/// Reads a parsed workflow file at `path` (shown as `file`).
pub(crate) fn read(file: &str, path: &Path, root: &Node) -> Workflow {
    let repo = files::workflow_root(path);
    let mut workflow = Workflow {
        builds: Vec::new(),
        bake_steps: Vec::new(),
        findings: Vec::new(),
    };
    let workflow_env = env_of(root);
    for job in root.get("jobs").map(Node::entries).unwrap_or(&[]) {
        if let Some(matrix) = job.value.get("strategy").and_then(|s| s.entry("matrix")) {
            workflow
                .findings
                .extend(matrix::check(file, &job.key, matrix));
        }
        let mut job_env = workflow_env.clone();
        job_env.extend(env_of(&job.value));
        let default_dir = job
            .value
            .get("defaults")
            .and_then(|d| d.get("run"))
            .and_then(|r| r.get("working-directory"))
            .and_then(Node::text);
        for step in job.value.get("steps").map(Node::items).unwrap_or(&[]) {
            let mut env = job_env.clone();
            env.extend(env_of(step));
            if let Some(run) = step.get("run") {
                let dir = step
                    .get("working-directory")
                    .and_then(Node::text)
                    .or(default_dir);
                let workdir = match dir {
                    Some(dir) => files::resolve(&repo, dir),
                    None => repo.clone(),
                };
                let script = shell::Script {
                    file,
                    workdir: &workdir,
                    env: &env,
                };
                let lines = run.lines();
                workflow
                    .builds
                    .extend(shell::builds(&script, &shell::commands(&lines)));
            }
            let Some(uses_entry) = step.entry("uses") else {
                continue;
            };
            let Some(uses) = uses_entry.value.text() else {
                continue;
            };
            let action = uses.split('@').next().unwrap_or(uses);
            let with = step.get("with");
            match action {
                "docker/build-push-action" => workflow.builds.push(build_push_action(
                    file,
                    &repo,
                    uses_entry.line,
                    with,
                    &env,
                )),
                "docker/bake-action" => {
                    let (build, step) = bake_action(file, &repo, uses_entry.line, uses, with, &env);
                    workflow.builds.push(build);
                    workflow.bake_steps.push(step);
                }
                _ => {}
            }
        }
    }
    workflow
}

fn env_of(node: &Node) -> BTreeMap<String, String> {
    node.get("env")
        .map(Node::entries)
        .unwrap_or(&[])
        .iter()
        .filter_map(|e| e.value.text().map(|v| (e.key.clone(), v.to_owned())))
        .collect()
}

/// An action input that is a list: one item per line (and per comma unless the items
/// hold commas themselves, as cache specs do), each with its line.
fn input_list(with: Option<&Node>, key: &str, commas: bool) -> Vec<(String, usize)> {
    let Some(node) = with.and_then(|w| w.get(key)) else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for (line, text) in node.lines() {
        let parts: Vec<&str> = if commas {
            text.split(',').collect()
        } else {
            vec![text]
        };
        for part in parts {
            let part = part.trim();
            if !part.is_empty() && !part.starts_with('#') {
                items.push((part.to_owned(), line));
            }
        }
    }
    items
}

fn input<'a>(with: Option<&'a Node>, key: &str) -> Option<&'a Node> {
    with.and_then(|w| w.get(key))
}

fn specs(items: Vec<(String, usize)>, env: &BTreeMap<String, String>) -> Vec<At<CacheSpec>> {
    items
        .into_iter()
        .map(|(text, line)| At {
            value: CacheSpec::parse(&shell::expand(&text, env)),
            line,
        })
        .collect()
}

fn build_push_action(
    file: &str,
    repo: &Path,
    line: usize,
    with: Option<&Node>,
    env: &BTreeMap<String, String>,
) -> Build {
    let mut build = Build {
        file: file.to_owned(),
        line,
        what: "docker/build-push-action".to_owned(),
        ..Build::default()
    };
    build.cache_from = specs(input_list(with, "cache-from", false), env);
    build.cache_to = specs(input_list(with, "cache-to", false), env);
    if let Some(no_cache) = input(with, "no-cache")
        && no_cache.is_true()
    {
        build.no_cache = Some(no_cache.line);
    }
    build.build_args = input_list(with, "build-args", false)
        .into_iter()
        .filter_map(|(text, line)| {
            let (name, value) = text.split_once('=')?;
            Some(BuildArg {
                name: name.trim().to_owned(),
                value: shell::expand(value.trim(), env),
                line,
            })
        })
        .collect();
    build.tags = input_list(with, "tags", true)
        .into_iter()
        .map(|(t, _)| shell::expand(&t, env))
        .collect();
    let context = input(with, "context").and_then(Node::text);
    let dockerfile = input(with, "file").and_then(Node::text);
    match context {
        // Without `context`, the action builds the git context of the commit.
        Some(context) if !context.contains("://") && !context.contains("{{") => {
            let context_dir = files::resolve(repo, context);
            build.dockerfile = Some(match dockerfile {
                Some(f) => files::resolve(repo, f),
                None => context_dir.join("Dockerfile"),
            });
            build.context = Some(context_dir);
        }
        _ => {
            build.dockerfile = Some(files::resolve(repo, dockerfile.unwrap_or("Dockerfile")));
        }
    }
    build
}

fn bake_action(
    file: &str,
    repo: &Path,
    line: usize,
    uses: &str,
    with: Option<&Node>,
    env: &BTreeMap<String, String>,
) -> (Build, BakeStep) {
    let mut build = Build {
        file: file.to_owned(),
        line,
        what: "docker/bake-action".to_owned(),
        ..Build::default()
    };
    let mut set_cache = Vec::new();
    for (set, set_line) in input_list(with, "set", false) {
        let set = shell::expand(&set, env);
        if set.contains(".cache-from=") || set.contains(".cache-to=") {
            set_cache.push(set.clone());
        }
        shell::apply_set(&mut build, &set, set_line);
    }
    if let Some(no_cache) = input(with, "no-cache")
        && no_cache.is_true()
    {
        build.no_cache = Some(no_cache.line);
    }
    let workdir = input(with, "workdir")
        .and_then(Node::text)
        .map(|w| files::resolve(repo, w))
        .unwrap_or_else(|| repo.to_path_buf());
    let named = input_list(with, "files", true);
    let bake_files = if named.is_empty() {
        BAKE_DEFAULT_FILES.iter().map(|f| workdir.join(f)).collect()
    } else {
        named
            .iter()
            .map(|(f, _)| files::resolve(&workdir, f))
            .collect()
    };
    let step = BakeStep {
        file: file.to_owned(),
        line,
        uses: uses.to_owned(),
        source: input(with, "source")
            .and_then(Node::text)
            .map(str::to_owned),
        files: bake_files,
        set_cache,
    };
    (build, step)
}

/// Whether a bake-action version predates v6, when it still built the checked-out
/// files by default.
fn builds_local_by_default(uses: &str) -> bool {
    let Some((_, version)) = uses.split_once('@') else {
        return false;
    };
    let major = version
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    major.is_some_and(|m| m < 6)
}

fn is_local_source(source: &str) -> bool {
    let s = source.trim();
    !s.is_empty() && !s.contains("://") && !s.starts_with("git@") && !s.contains("{{")
}

/// `bake-git-context` for one bake-action step; `cache_in` says which of the bake
/// files it reads set a cache (`None` when a file is unknown).
pub(crate) fn bake_git_context(
    step: &BakeStep,
    cache_in: &dyn Fn(&Path) -> Option<bool>,
) -> Option<Finding> {
    if builds_local_by_default(&step.uses) {
        return None;
    }
    if step.source.as_deref().is_some_and(is_local_source) {
        return None;
    }
    let mut settings: Vec<String> = step.set_cache.clone();
    for bake_file in &step.files {
        if cache_in(bake_file) == Some(true) {
            settings.push(format!(
                "the cache settings in {}",
                files::display(bake_file)
            ));
        }
    }
    if settings.is_empty() {
        return None;
    }
    let source = match &step.source {
        Some(source) => format!("builds from `source: {source}`, a git context"),
        None => "has no `source`, so bake builds from the git context of the commit (the \
                 default since bake-action v6)"
            .to_owned(),
    };
    Some(Finding::new(
        Rule::BakeGitContext,
        &step.file,
        step.line,
        format!(
            "{} {source}: every commit changes the context and with it every layer's cache \
             key, so the cache ({}) never hits",
            step.uses,
            settings.join("; ")
        ),
        "add `source: .` under `with:` (after actions/checkout) so bake builds the checked-out \
         files",
    ))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    use super::*;

    #[test]
    fn old_bake_action_versions_build_local_files() {
        assert!(builds_local_by_default("docker/bake-action@v5"));
        assert!(builds_local_by_default("docker/bake-action@v4.6.0"));
        assert!(!builds_local_by_default("docker/bake-action@v6"));
        assert!(!builds_local_by_default("docker/bake-action@master"));
        assert!(!builds_local_by_default(
            "docker/bake-action@3e8c5a6b0d1f2e4a5b6c7d8e9f0a1b2c3d4e5f6a"
        ));
    }
}
