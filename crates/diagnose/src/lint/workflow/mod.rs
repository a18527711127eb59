//! GitHub workflow files: the builds their steps start (`run:` scripts and the scripts
//! of the repository they run, `docker/build-push-action`, `docker/bake-action`, other
//! actions with its cache inputs), `matrix-too-large` for each job's matrix, and what the
//! lint cannot follow (unknown actions that may build, caches named in other commands).

mod bake_step;
mod ephemeral;
pub(crate) mod matrix;
mod scripts;
pub(crate) mod shell;

pub(crate) use self::bake_step::BakeStep;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::cache::{At, Build, BuildArg, CacheKind, CacheSpec};
use super::expression;
use super::files;
use super::finding::Finding;
use super::yaml::{Entry, Node};

/// What a workflow holds for the lint.
#[derive(Default)]
pub(crate) struct Workflow {
    /// Builds its steps start.
    pub builds: Vec<Build>,
    /// Its bake invocations (bake-action steps, `docker buildx bake` commands).
    pub bake_steps: Vec<BakeStep>,
    /// Its `docker compose build` commands.
    pub compose_builds: Vec<shell::ComposeBuild>,
    /// The workflow file, as displayed.
    pub file: String,
    /// Its path.
    pub path: PathBuf,
    /// Each job's `strategy.matrix` entry.
    pub matrices: Vec<(String, Entry)>,
    /// The defaults of its `workflow_call` and `workflow_dispatch` inputs.
    pub input_defaults: BTreeMap<String, String>,
    /// The workflows of the same repository its jobs call.
    pub calls: Vec<Call>,
    /// What it names where the lint cannot follow (other commands, `env:`, the inputs
    /// of other actions and called workflows).
    pub mentions: Vec<String>,
    /// Whether a step the lint does not know may build (a local or docker action, an
    /// action named for building images, a workflow of another repository).
    pub unseen_builder: bool,
    /// What one job shows alone (a local cache on a hosted runner that nothing keeps).
    pub findings: Vec<Finding>,
    /// The scripts of the repository its steps run, as displayed.
    pub scripts: Vec<String>,
}

/// The files `docker buildx bake` reads when none is named.
pub(crate) const BAKE_DEFAULT_FILES: [&str; 8] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
    "docker-bake.json",
    "docker-bake.hcl",
    "docker-bake.override.json",
    "docker-bake.override.hcl",
];

/// A job calling a workflow of the same repository (`uses: ./.github/workflows/x.yml`).
#[derive(Clone, Debug)]
pub(crate) struct Call {
    /// The called workflow, on disk.
    pub path: PathBuf,
    /// The line of `uses:`.
    pub line: usize,
    /// The inputs it passes that are literal (no expression).
    pub with: BTreeMap<String, String>,
}

/// Reads a parsed workflow file at `path` (shown as `file`).
pub(crate) fn read(file: &str, path: &Path, root: &Node) -> Workflow {
    let repo = files::workflow_root(path);
    // Scripts are followed only inside the repository, as it is on disk.
    let real_repo = repo.canonicalize().ok();
    let mut workflow = Workflow {
        file: file.to_owned(),
        path: path.to_path_buf(),
        ..Workflow::default()
    };
    for trigger in ["workflow_call", "workflow_dispatch"] {
        let declared = root
            .get("on")
            .and_then(|on| on.get(trigger))
            .and_then(|t| t.get("inputs"));
        for input in declared.map(Node::entries).unwrap_or(&[]) {
            if let Some(default) = input.value.get("default").and_then(Node::text) {
                workflow
                    .input_defaults
                    .insert(input.key.clone(), default.to_owned());
            }
        }
    }
    let workflow_env = env_of(root);
    workflow.mentions.extend(workflow_env.values().cloned());
    for job in root.get("jobs").map(Node::entries).unwrap_or(&[]) {
        if let Some(uses) = job.value.entry("uses")
            && let Some(called) = uses.value.text()
        {
            let with = job.value.get("with");
            if called.starts_with("./") {
                let literal = with
                    .map(Node::entries)
                    .unwrap_or(&[])
                    .iter()
                    .filter_map(|e| Some((e.key.clone(), e.value.text()?.to_owned())))
                    .filter(|(_, v)| !v.contains("${{"))
                    .collect();
                workflow.calls.push(Call {
                    path: files::resolve(&repo, called),
                    line: uses.line,
                    with: literal,
                });
            } else {
                let called = called.split('@').next().unwrap_or(called);
                workflow.unseen_builder |= may_build(called) && !names_its_cache(with);
            }
            workflow.mentions.extend(inputs(with));
        }
        let matrix = job.value.get("strategy").and_then(|s| s.entry("matrix"));
        if let Some(matrix) = matrix {
            workflow.matrices.push((job.key.clone(), matrix.clone()));
        }
        let own_env = env_of(&job.value);
        workflow.mentions.extend(own_env.values().cloned());
        let mut job_env = workflow_env.clone();
        job_env.extend(own_env);
        let default_dir = job
            .value
            .get("defaults")
            .and_then(|d| d.get("run"))
            .and_then(|r| r.get("working-directory"))
            .and_then(Node::text);
        let first_build = workflow.builds.len();
        let mut kept = ephemeral::Job::default();
        let mut outputs: BTreeMap<String, String> = BTreeMap::new();
        for step in job.value.get("steps").map(Node::items).unwrap_or(&[]) {
            let mut env = job_env.clone();
            let step_env = env_of(step);
            workflow.mentions.extend(step_env.values().cloned());
            env.extend(step_env);
            if let Some(run) = step.get("run") {
                let dir = step
                    .get("working-directory")
                    .and_then(Node::text)
                    .or(default_dir);
                let workdir = match dir {
                    Some(dir) => files::resolve(&repo, dir),
                    None => repo.clone(),
                };
                let budget = Cell::new(scripts::MAX_SCRIPTS);
                let follow = real_repo
                    .as_deref()
                    .map(|real| scripts::Follow::from_step(&repo, real, &budget));
                let script = shell::Script {
                    file,
                    workdir: &workdir,
                    env: &env,
                    follow: follow.as_ref(),
                };
                let lines = run.lines();
                if let Some(id) = step.get("id").and_then(Node::text) {
                    outputs.extend(step_outputs(id, &lines));
                }
                kept.script
                    .extend(lines.iter().map(|(_, text)| (*text).to_owned()));
                let scripted = shell::read(&script, &shell::commands(&lines));
                kept.script.extend(scripted.followed_lines);
                workflow.scripts.extend(scripted.followed_files);
                workflow.builds.extend(scripted.builds);
                workflow.bake_steps.extend(scripted.bake_steps);
                workflow.compose_builds.extend(scripted.compose_builds);
                workflow.mentions.extend(scripted.mentions);
            }
            let Some(uses_entry) = step.entry("uses") else {
                continue;
            };
            let Some(uses) = uses_entry.value.text() else {
                continue;
            };
            let action = uses.split('@').next().unwrap_or(uses);
            let with = step.get("with");
            let varies_by_matrix = matrix.is_some()
                && with.map(Node::entries).unwrap_or(&[]).iter().any(|e| {
                    !e.key.starts_with("cache-")
                        && e.value.lines().iter().any(|(_, t)| t.contains("matrix."))
                });
            match action {
                "docker/build-push-action" => {
                    let mut build = build_push_action(file, &repo, uses_entry.line, with, &env);
                    build.varies_by_matrix = varies_by_matrix;
                    read_outputs(&mut build, &outputs);
                    workflow.builds.push(build);
                }
                "docker/bake-action" => {
                    let (build, step) = bake_action(file, &repo, uses_entry.line, uses, with, &env);
                    workflow.builds.push(build);
                    workflow.bake_steps.push(step);
                }
                // Another action with the build-push-action's cache inputs (often the
                // action's own repository testing itself with `uses: ./`).
                _ if input(with, "cache-from").is_some() || input(with, "cache-to").is_some() => {
                    let mut build = build_push_action(file, &repo, uses_entry.line, with, &env);
                    build.what = format!("`{uses}`");
                    build.varies_by_matrix = varies_by_matrix;
                    read_outputs(&mut build, &outputs);
                    workflow.builds.push(build);
                }
                _ => {
                    let composite = action
                        .starts_with("./")
                        .then(|| composite_builds(&repo, action, with, &env))
                        .flatten();
                    let may_build_unseen = match composite {
                        Some((builds, others)) => {
                            for mut build in builds {
                                build.varies_by_matrix = varies_by_matrix;
                                workflow.builds.push(build);
                            }
                            others
                        }
                        None => may_build(action),
                    };
                    workflow.unseen_builder |= may_build_unseen && !names_its_cache(with);
                    workflow.mentions.extend(inputs(with));
                    kept.paths.extend(
                        input(with, "path")
                            .map(Node::lines)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(_, path)| path.to_owned()),
                    );
                    kept.may_restore |= action.starts_with("./")
                        || (action.contains("cache") && !action.starts_with("actions/cache"));
                }
            }
        }
        for build in workflow.builds.get_mut(first_build..).unwrap_or(&mut []) {
            build.job = Some(job.key.clone());
        }
        if ephemeral::hosted(&job.value) {
            let builds = workflow.builds.get(first_build..).unwrap_or(&[]);
            let found = ephemeral::check(&job.key, builds, &kept);
            workflow.findings.extend(found);
        }
    }
    keep_cache_rotations(&mut workflow.builds);
    workflow
}

/// `matrix-too-large` for each job matrix of `workflow`: as written, with the defaults
/// of its inputs, and with what each of `callers` passes.
pub(crate) fn matrix_findings(workflow: &Workflow, callers: &[(&str, &Call)]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (job, entry) in &workflow.matrices {
        let mut variants: Vec<(Option<String>, BTreeMap<String, String>)> = vec![(
            (!workflow.input_defaults.is_empty()).then(|| "' defaults".to_owned()),
            workflow.input_defaults.clone(),
        )];
        for (file, call) in callers {
            let mut inputs = workflow.input_defaults.clone();
            inputs.extend(call.with.clone());
            variants.push((Some(format!(" passed at {file}:{}", call.line)), inputs));
        }
        let found = variants.into_iter().find_map(|(source, inputs)| {
            let resolved = Entry {
                key: entry.key.clone(),
                line: entry.line,
                value: matrix::with_inputs(&entry.value, &inputs),
            };
            // Only say where inputs came from when the matrix used them.
            let source = source.filter(|_| resolved.value != entry.value);
            matrix::check(&workflow.file, job, &resolved, source.as_deref())
        });
        findings.extend(found);
    }
    findings
}

/// Keeps an `mv` between two directories only when a build's `type=local` cache uses one
/// of them: any other `mv` is not about the cache.
fn keep_cache_rotations(builds: &mut Vec<Build>) {
    let local_dirs: Vec<String> = builds
        .iter()
        .filter(|b| !b.moves_cache)
        .flat_map(|b| b.cache_from.iter().chain(&b.cache_to))
        .filter_map(|c| match &c.value.kind {
            CacheKind::Local(dir) => Some(dir.trim_end_matches('/').to_owned()),
            _ => None,
        })
        .collect();
    builds.retain(|b| {
        !b.moves_cache
            || b.cache_from.iter().chain(&b.cache_to).any(|c| {
                matches!(&c.value.kind, CacheKind::Local(dir)
                    if local_dirs.iter().any(|d| d == dir.trim_end_matches('/')))
            })
    });
}

/// The text of every input a step or a called workflow is given.
fn inputs(with: Option<&Node>) -> Vec<String> {
    with.map(Node::entries)
        .unwrap_or(&[])
        .iter()
        .flat_map(|e| {
            let scope = e.key.contains("scope");
            e.value
                .lines()
                .into_iter()
                .map(move |(_, text)| match scope {
                    // `cache-scope: bin` of a builder not read: it uses `type=gha,scope=bin`.
                    true => format!("scope={text}"),
                    false => text.to_owned(),
                })
        })
        .collect()
}

/// Whether an unread builder's inputs say which cache it uses (a `cache-scope`, a
/// `cache-from` ref, ...): what it imports and exports is then in its inputs, not
/// anything at all.
fn names_its_cache(with: Option<&Node>) -> bool {
    with.map(Node::entries).unwrap_or(&[]).iter().any(|e| {
        e.key.contains("cache")
            && e.value
                .text()
                .is_some_and(|v| !matches!(v.trim(), "true" | "false" | "") && !v.contains("${{"))
    })
}

/// Actions known not to build an image.
const NOT_BUILDING: [&str; 6] = [
    "docker/login-action",
    "docker/setup-buildx-action",
    "docker/setup-qemu-action",
    "docker/setup-docker-action",
    "docker/metadata-action",
    "docker/scout-action",
];

/// Whether an action or remote reusable workflow the lint does not read may build an
/// image: a local or docker action, or one named for building images.
fn may_build(action: &str) -> bool {
    if action.starts_with("./") || action.starts_with("docker://") {
        return true;
    }
    let lower = action.to_ascii_lowercase();
    !NOT_BUILDING.contains(&lower.as_str())
        && !lower.starts_with("actions/")
        && !lower.starts_with("github/codeql-action/")
        && !lower.starts_with("docker/bake-action/subaction/")
        && [
            "docker",
            "build",
            "image",
            "container",
            "buildah",
            "kaniko",
            "bake",
        ]
        .iter()
        .any(|word| lower.contains(word))
}

/// The `docker/build-push-action` steps of a composite action of the repository
/// (`uses: ./.github/actions/build`), read with the inputs this call gives (or their
/// defaults) written in, and whether its other steps may build too (a `run:` step, an
/// action that may build). `None` when it is not such an action or has no such step.
fn composite_builds(
    repo: &Path,
    action: &str,
    with: Option<&Node>,
    env: &BTreeMap<String, String>,
) -> Option<(Vec<Build>, bool)> {
    let dir = files::resolve(repo, action);
    let path = ["action.yml", "action.yaml"]
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())?;
    let mut text = std::fs::read_to_string(&path).ok()?;
    let declared = super::yaml::parse(&text).ok()?;
    for input in declared.get("inputs").map(Node::entries).unwrap_or(&[]) {
        let given = with
            .and_then(|w| w.get(&input.key))
            .or_else(|| input.value.get("default"))
            .and_then(Node::text)
            .filter(|value| !value.contains('\n'));
        if let Some(value) = given {
            let key = &input.key;
            for form in [
                format!("${{{{ inputs.{key} }}}}"),
                format!("${{{{inputs.{key}}}}}"),
            ] {
                text = text.replace(&form, value);
            }
        }
    }
    let root = super::yaml::parse(&text).ok()?;
    let runs = root.get("runs")?;
    if runs.get("using").and_then(Node::text) != Some("composite") {
        return None;
    }
    let file = files::display(&path);
    let mut builds = Vec::new();
    let mut others = false;
    for step in runs.get("steps").map(Node::items).unwrap_or(&[]) {
        let uses = step.entry("uses");
        let used = uses
            .and_then(|u| u.value.text())
            .map(|u| u.split('@').next().unwrap_or(u));
        match (uses, used) {
            (Some(uses), Some("docker/build-push-action")) => {
                builds.push(build_push_action(
                    &file,
                    repo,
                    uses.line,
                    step.get("with"),
                    env,
                ));
            }
            (_, Some(used)) => others |= may_build(used),
            _ => others |= step.get("run").is_some(),
        }
    }
    (!builds.is_empty()).then_some((builds, others))
}

/// The `NAME=VALUE` a step's script echoes to `$GITHUB_OUTPUT`, keyed by the
/// expression later steps read it with (`steps.ID.outputs.NAME`).
fn step_outputs(id: &str, lines: &[(usize, &str)]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|(_, line)| {
            let (written, target) = line.split_once(">>")?;
            if !target.contains("GITHUB_OUTPUT") {
                return None;
            }
            let mut words = written.trim().splitn(2, char::is_whitespace);
            if !matches!(words.next(), Some("echo" | "printf")) {
                return None;
            }
            let pair = words.next()?.trim().trim_matches(['"', '\'']);
            let (name, value) = pair.split_once('=')?;
            let named = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            named.then(|| (format!("steps.{id}.outputs.{name}"), value.to_owned()))
        })
        .collect()
}

/// Build arguments that read a step's output, given what the step writes
/// (`$(git describe --tags)`), so that a per-commit value is seen as one.
fn read_outputs(build: &mut Build, outputs: &BTreeMap<String, String>) {
    for arg in &mut build.build_args {
        for (expression, written) in outputs {
            for form in [
                format!("${{{{ {expression} }}}}"),
                format!("${{{{{expression}}}}}"),
            ] {
                arg.value = arg.value.replace(&form, written);
            }
        }
    }
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
            expression::split_commas(text)
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
    build.target = input(with, "target")
        .and_then(Node::text)
        .map(|t| shell::expand(t, env));
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
    let mut step = BakeStep::new(file, uses);
    for (set, set_line) in input_list(with, "set", false) {
        let set = shell::expand(&set, env);
        step.set(&mut build, &set, set_line);
    }
    step.no_cache = input(with, "no-cache")
        .filter(|n| n.is_true())
        .map(|n| n.line);
    let workdir = input(with, "workdir")
        .and_then(Node::text)
        .map(|w| files::resolve(repo, w))
        .unwrap_or_else(|| repo.to_path_buf());
    let named = input_list(with, "files", true);
    step.files = if named.is_empty() {
        BAKE_DEFAULT_FILES.iter().map(|f| workdir.join(f)).collect()
    } else {
        named
            .iter()
            .map(|(f, _)| files::resolve(&workdir, f))
            .collect()
    };
    let targets: Vec<String> = input_list(with, "targets", true)
        .into_iter()
        .map(|(t, _)| shell::expand(&t, env))
        .collect();
    step.targets = (!targets.iter().any(|t| t.contains("${{"))).then_some(targets);
    (build, step)
}
