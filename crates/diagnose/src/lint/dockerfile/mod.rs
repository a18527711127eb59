//! Dockerfile checks: `layer-depth` (a stage chain deeper than overlay filesystems stack)
//! and `context-busts-cache` (the whole context copied before installing dependencies,
//! `.git` sent with the context, a per-commit ARG ahead of expensive steps).

pub(crate) mod parse;

use std::path::{Path, PathBuf};

use self::parse::{Dockerfile, Instruction};
use super::cache::Build;
use super::finding::{Finding, Level, Rule};

pub(crate) use self::parse::parse;

/// Layers at which a warning is due.
const WARN_DEPTH: usize = 100;
/// Layers at which overlay storage gives up (`max depth exceeded`).
const MAX_DEPTH: usize = 125;

/// One stage: `FROM base [AS name]` and its instructions.
struct Stage<'a> {
    name: Option<String>,
    base: String,
    instructions: &'a [Instruction],
}

/// Where the rest of the scan uses a Dockerfile.
pub(crate) struct Uses<'a> {
    /// The builds that name this Dockerfile.
    pub builds: Vec<&'a Build>,
    /// The directories the lint was asked to scan (a context that is one of them is the
    /// root of a checkout, which holds `.git`).
    pub roots: &'a [PathBuf],
}

/// Every Dockerfile check.
pub(crate) fn check(file: &str, path: &Path, dockerfile: &Dockerfile, uses: &Uses) -> Vec<Finding> {
    let stages = stages(dockerfile);
    let mut findings = layer_depth(file, &stages);
    // `ARG NAME=default` before the first FROM: a stage's bare `ARG NAME` takes it.
    let global_defaults: Vec<String> = dockerfile
        .instructions
        .iter()
        .take_while(|i| !i.is("FROM"))
        .filter(|i| i.is("ARG"))
        .flat_map(|i| i.words())
        .filter_map(|w| {
            let (name, default) = w.split_once('=')?;
            (!is_placeholder(default)).then(|| name.to_owned())
        })
        .collect();
    for index in 0..stages.len() {
        findings.extend(context_copied_before_install(file, &stages, index));
    }
    for stage in &stages {
        findings.extend(per_commit_args(file, stage, &uses.builds, &global_defaults));
    }
    findings.extend(git_in_context(file, path, &stages, uses));
    findings
}

fn stages(dockerfile: &Dockerfile) -> Vec<Stage<'_>> {
    let all = dockerfile.instructions.as_slice();
    let starts: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is("FROM"))
        .map(|(index, _)| index)
        .collect();
    starts
        .iter()
        .enumerate()
        .filter_map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(all.len());
            let from = all.get(start)?;
            let words = from.words();
            Some(Stage {
                name: words.get(2).map(|s| s.to_ascii_lowercase()),
                base: words.first().cloned().unwrap_or_default(),
                instructions: all.get(start + 1..end).unwrap_or(&[]),
            })
        })
        .collect()
}

fn creates_layer(instruction: &Instruction) -> bool {
    matches!(instruction.keyword.as_str(), "RUN" | "COPY" | "ADD")
}

/// The stage each stage is built on, when it is an earlier stage.
fn parents(stages: &[Stage]) -> Vec<Option<usize>> {
    stages
        .iter()
        .enumerate()
        .map(|(i, stage)| {
            let base = stage.base.to_ascii_lowercase();
            stages
                .get(..i)?
                .iter()
                .rposition(|s| s.name.as_deref() == Some(base.as_str()))
        })
        .collect()
}

fn stage_label(stages: &[Stage], index: usize) -> String {
    match stages.get(index).and_then(|s| s.name.clone()) {
        Some(name) => format!("`{name}`"),
        None => format!("#{index}"),
    }
}

fn layer_depth(file: &str, stages: &[Stage]) -> Vec<Finding> {
    let parents = parents(stages);
    let mut findings: Vec<Finding> = Vec::new();
    for leaf in 0..stages.len() {
        if parents.contains(&Some(leaf)) {
            continue;
        }
        let mut chain = vec![leaf];
        let mut current = leaf;
        while let Some(Some(parent)) = parents.get(current) {
            chain.push(*parent);
            current = *parent;
        }
        chain.reverse();
        let layers: Vec<&Instruction> = chain
            .iter()
            .filter_map(|&i| stages.get(i))
            .flat_map(|s| s.instructions.iter().filter(|i| creates_layer(i)))
            .collect();
        let total = layers.len();
        let (limit, level) = if total >= MAX_DEPTH {
            (MAX_DEPTH, Level::Error)
        } else if total >= WARN_DEPTH {
            (WARN_DEPTH, Level::Warning)
        } else {
            continue;
        };
        let Some(at) = layers.get(limit - 1) else {
            continue;
        };
        if findings.iter().any(|f| f.line == at.line) {
            continue;
        }
        let names: Vec<String> = chain.iter().map(|&i| stage_label(stages, i)).collect();
        let stage = if chain.len() > 1 {
            format!(
                "stage {} (through {})",
                stage_label(stages, leaf),
                names.join(" → ")
            )
        } else if stages.len() > 1 {
            format!("stage {}", stage_label(stages, leaf))
        } else {
            "the stage".to_owned()
        };
        let base = chain
            .first()
            .and_then(|&i| stages.get(i))
            .map(|s| s.base.clone())
            .unwrap_or_default();
        findings.push(
            Finding::new(
                Rule::LayerDepth,
                file,
                at.line,
                format!(
                    "{stage} stacks {total} layers (RUN, COPY, ADD) on top of the base image \
                     `{base}`, whose own layers are not known here and come on top; this is \
                     layer {limit}: overlay storage stacks about {MAX_DEPTH} layers, beyond \
                     that the build fails with `max depth exceeded`"
                ),
                "merge consecutive RUN instructions (&& or a heredoc) and COPY instructions, \
                 or flatten the earlier layers into a fresh stage (FROM scratch + COPY --from)",
            )
            .at(level),
        );
    }
    findings
}

/// `COPY . dst` / `ADD . dst`: the whole context, from the context (not another stage).
fn copies_whole_context(instruction: &Instruction) -> bool {
    if !(instruction.is("COPY") || instruction.is("ADD"))
        || instruction.flag("from").is_some()
        || !instruction.heredocs.is_empty()
    {
        return false;
    }
    let words = instruction.words();
    let sources = words.get(..words.len().saturating_sub(1)).unwrap_or(&[]);
    sources
        .iter()
        .any(|s| matches!(s.as_str(), "." | "./" | "./." | "*" | "./*"))
}

/// The simple commands of a RUN: split on `&&`, `||`, `;`, `|` and newlines, leading
/// variable assignments and wrappers (`sudo`, `env`) dropped.
fn simple_commands(text: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let normalized = text
        .replace("&&", "\n")
        .replace("||", "\n")
        .replace([';', '|'], "\n");
    for part in normalized.lines() {
        let mut words = parse::split_words(part);
        while words.first().is_some_and(|w| {
            is_assignment(w) || matches!(w.as_str(), "sudo" | "env" | "exec" | "time")
        }) {
            words.remove(0);
        }
        if !words.is_empty() {
            commands.push(words);
        }
    }
    commands
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// The dependency installers a RUN calls, by name (`npm ci`, `pip install`, ...).
fn installs_dependencies(instruction: &Instruction) -> Option<String> {
    if !instruction.is("RUN") {
        return None;
    }
    simple_commands(&instruction.command_text())
        .into_iter()
        .find_map(|words| install_command(&words))
}

fn install_command(words: &[String]) -> Option<String> {
    let program = words.first()?.rsplit('/').next()?.to_owned();
    let rest: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
    let sub = rest.iter().find(|w| !w.starts_with('-')).copied();
    let found = match program.as_str() {
        "npm" => matches!(sub, Some("install" | "i" | "ci")),
        "yarn" => matches!(sub, None | Some("install")),
        "pnpm" => matches!(sub, Some("install" | "i" | "fetch")),
        "pip" | "pip3" => sub == Some("install"),
        "python" | "python3" => rest.windows(3).any(|w| w == ["-m", "pip", "install"]),
        "uv" => matches!(sub, Some("sync" | "pip")),
        "poetry" => sub == Some("install"),
        "pipenv" => matches!(sub, Some("install" | "sync")),
        "go" => rest.windows(2).any(|w| w == ["mod", "download"]),
        // `cargo chef prepare` only writes the recipe; `cargo chef cook` builds from it.
        "cargo" => {
            matches!(sub, Some("build" | "fetch")) || rest.windows(2).any(|w| w == ["chef", "cook"])
        }
        "bundle" | "bundler" => sub == Some("install"),
        "apt-get" | "apt" => sub == Some("install"),
        "apk" => sub == Some("add"),
        "yum" | "dnf" | "microdnf" => sub == Some("install"),
        "mvn" | "mvnw" | "gradle" | "gradlew" => true,
        "composer" => sub == Some("install"),
        "dotnet" => sub == Some("restore"),
        "clojure" | "clj" => rest.contains(&"-P"),
        "lein" => matches!(sub, Some("deps")),
        "sbt" => rest.iter().any(|w| matches!(*w, "update" | "compile")),
        "mix" => sub == Some("deps.get"),
        "bun" => matches!(sub, Some("install" | "i")),
        _ => false,
    };
    found.then(|| match program.as_str() {
        "go" => "go mod download".to_owned(),
        "cargo" if sub == Some("chef") => "cargo chef cook".to_owned(),
        "clojure" | "clj" => format!("{program} -P"),
        "python" | "python3" => format!("{program} -m pip install"),
        _ => match sub {
            Some(sub) => format!("{program} {sub}"),
            None => program,
        },
    })
}

/// A RUN worth caching: a dependency install or a build.
fn is_expensive(instruction: &Instruction) -> bool {
    if installs_dependencies(instruction).is_some() {
        return true;
    }
    if !instruction.is("RUN") {
        return false;
    }
    simple_commands(&instruction.command_text())
        .iter()
        .any(|words| {
            let program = words
                .first()
                .and_then(|w| w.rsplit('/').next())
                .unwrap_or("");
            let sub = words.get(1).map(String::as_str);
            match program {
                "make" | "cmake" | "ninja" | "bazel" | "gcc" | "g++" | "rustc" | "javac" => true,
                "go" => matches!(sub, Some("build" | "install" | "generate")),
                "npm" | "pnpm" | "yarn" => matches!(sub, Some("run" | "build")),
                "dotnet" => matches!(sub, Some("build" | "publish")),
                "cargo" => matches!(sub, Some("install")),
                _ => false,
            }
        })
}

fn context_copied_before_install(file: &str, stages: &[Stage], index: usize) -> Option<Finding> {
    let stage = stages.get(index)?;
    let copy_at = stage.instructions.iter().position(copies_whole_context)?;
    let (before, after) = stage.instructions.split_at(copy_at);
    let copy = after.first()?;
    let (install, command) = after
        .iter()
        .skip(1)
        .find_map(|i| installs_dependencies(i).map(|c| (i, c)))?;
    // Dependencies were installed from their manifests first, in this stage or a stage
    // it is built on; a later install is the project itself.
    let parents = parents(stages);
    let earlier: Vec<&Instruction> = ancestry(&parents, index)
        .into_iter()
        .rev()
        .filter_map(|i| stages.get(i))
        .flat_map(|s| s.instructions.iter())
        .chain(before)
        .collect();
    if earlier.iter().any(|i| installs_dependencies(i).is_some()) {
        return None;
    }
    // Or in another stage whose files a `COPY --from` brought in first, by the same
    // package manager.
    let ecosystem = package_ecosystem(&command);
    let copied_installs = earlier
        .iter()
        .filter_map(|i| i.is("COPY").then(|| i.flag("from")).flatten())
        .filter_map(|from| stage_index(stages, from, index))
        .flat_map(|from| {
            let mut chain = ancestry(&parents, from);
            chain.push(from);
            chain
        })
        .filter_map(|i| stages.get(i))
        .flat_map(|s| s.instructions.iter())
        .filter_map(installs_dependencies)
        .any(|c| package_ecosystem(&c) == ecosystem);
    if copied_installs {
        return None;
    }
    Some(Finding::new(
        Rule::ContextBustsCache,
        file,
        copy.line,
        format!(
            "{} copies the whole build context before `{command}` at line {}: any change to \
             any file reruns the dependency install and every step after it",
            copy.keyword, install.line
        ),
        "copy only the dependency manifests first (package.json and lock file, \
         requirements.txt, go.mod/go.sum, Cargo.toml/Cargo.lock, ...), install, then copy \
         the rest",
    ))
}

/// A build argument's name that says it changes with every commit or build.
fn per_commit_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let tokens: Vec<&str> = upper.split(['_', '-']).collect();
    tokens.iter().any(|t| {
        matches!(
            *t,
            "SHA"
                | "COMMIT"
                | "REVISION"
                | "REV"
                | "GITSHA"
                | "GITCOMMIT"
                | "TIMESTAMP"
                | "BUILDDATE"
                | "BUILDTIME"
        )
    }) || [
        "GIT_HASH",
        "COMMIT_HASH",
        "VCS_REF",
        "SOURCE_VERSION",
        "BUILD_DATE",
        "BUILD_TIME",
        "BUILD_NUMBER",
        "BUILD_ID",
        "RUN_ID",
        "RUN_NUMBER",
    ]
    .iter()
    .any(|p| upper == *p || upper.ends_with(&format!("_{p}")))
}

/// A value that changes with every commit or run (`${{ github.sha }}`, `$(date)`, ...).
pub(crate) fn per_commit_value(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    [
        "github.sha",
        "github_sha",
        "github.run_id",
        "github_run_id",
        "github.run_number",
        "github_run_number",
        "github.event.head_commit",
        "git rev-parse",
        "git describe",
        "$(date",
        "`date",
        "ci_commit_sha",
        "ci_pipeline_id",
        "build_number",
    ]
    .iter()
    .any(|p| lower.contains(p))
}

fn per_commit_args(
    file: &str,
    stage: &Stage,
    builds: &[&Build],
    global_defaults: &[String],
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (index, instruction) in stage.instructions.iter().enumerate() {
        if !instruction.is("ARG") {
            continue;
        }
        for word in instruction.words() {
            let (name, default) = match word.split_once('=') {
                Some((name, default)) if !is_placeholder(default) => {
                    (name.to_owned(), Some(default))
                }
                Some((name, _)) => (name.to_owned(), None),
                None => (word.clone(), None),
            };
            // Given a per-commit value by a build: `${{ github.sha }}`, or anything but a
            // literal for an argument named like one.
            let fed = builds
                .iter()
                .flat_map(|b| b.build_args.iter().map(move |a| (b, a)))
                .find(|(_, a)| {
                    a.name == name
                        && (per_commit_value(&a.value)
                            || (per_commit_name(&name) && a.value.contains(['$', '`'])))
                });
            // Named like one, with no default: it is there to be given per commit. With a
            // default that no build overrides per commit, it is a pin.
            let named =
                per_commit_name(&name) && default.is_none() && !global_defaults.contains(&name);
            if !named && fed.is_none() {
                continue;
            }
            let later = stage.instructions.get(index + 1..).unwrap_or(&[]);
            // An expensive step that reads the argument misses with it by design; one that
            // does not could run before it.
            let Some(expensive) = later
                .iter()
                .find(|i| is_expensive(i) && !reads_arg(i, &name))
            else {
                continue;
            };
            let runs = later.iter().filter(|i| i.is("RUN")).count();
            // An ENV that copies it ahead of the expensive step carries it just the same.
            let also = later
                .iter()
                .take_while(|i| i.line < expensive.line)
                .find(|i| i.is("ENV") && reads_arg(i, &name))
                .map(|env| format!(" (and the ENV at line {} that copies it)", env.line))
                .unwrap_or_default();
            let (why, level) = match fed {
                Some((build, arg)) => (
                    format!(
                        "is given `{}` by {} at {}:{}, so it changes with every commit and",
                        arg.value, build.what, build.file, arg.line
                    ),
                    Level::Warning,
                ),
                // Nothing read here gives it a value: it busts the cache only if a build
                // elsewhere (a Makefile, another CI) does.
                None => (
                    "is named like a per-commit value, has no default and no build scanned \
                     gives it one; if a build elsewhere gives it one per commit,"
                        .to_owned(),
                    Level::Info,
                ),
            };
            findings.push(
                Finding::new(
                    Rule::ContextBustsCache,
                    file,
                    instruction.line,
                    format!(
                        "ARG {name} {why} the {runs} RUN instruction(s) after it miss the cache \
                         (BuildKit passes build arguments to every later RUN of the stage), \
                         including the expensive one at line {}",
                        expensive.line
                    ),
                    format!(
                        "declare ARG {name}{also} after the expensive steps, just before the \
                         instruction that uses it (for a label or a version file, in the final \
                         stage)"
                    ),
                )
                .at(level),
            );
        }
    }
    findings
}

/// Whether a RUN reads the argument `name` (`$NAME`, `${NAME}`, `${NAME:-x}`).
fn reads_arg(instruction: &Instruction, name: &str) -> bool {
    let text = instruction.command_text();
    text.contains(&format!("${{{name}"))
        || text.match_indices(&format!("${name}")).any(|(at, found)| {
            !text.get(at + found.len()..).is_some_and(|rest| {
                rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            })
        })
}

/// A default that stands for "not given" (`unknown`, `dev`, empty): the argument is
/// still there to be given per commit.
fn is_placeholder(default: &str) -> bool {
    let value = default.trim_matches(['"', '\'']).to_ascii_lowercase();
    matches!(
        value.as_str(),
        "" | "unknown"
            | "none"
            | "null"
            | "undefined"
            | "unset"
            | "n/a"
            | "-"
            | "dev"
            | "development"
            | "local"
            | "head"
            | "0"
    )
}

/// `.git` sent with a context that a layer copies whole, ahead of a RUN.
/// Builds that want `.git` (a `.dockerignore` that re-includes it, a build that keeps
/// it in a git context, a later step that runs git or stamps the version) are left alone.
fn git_in_context(file: &str, path: &Path, stages: &[Stage], uses: &Uses) -> Option<Finding> {
    let (copy, after) = whole_copy_before_run(stages)?;
    let keeps_git = uses.builds.iter().any(|b| {
        b.build_args
            .iter()
            .any(|a| a.name == "BUILDKIT_CONTEXT_KEEP_GIT_DIR")
    });
    if keeps_git {
        return None;
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut contexts: Vec<PathBuf> = uses
        .builds
        .iter()
        .filter_map(|b| b.context.clone())
        .collect();
    if uses.builds.is_empty() {
        contexts.push(dir.to_path_buf());
    }
    // A Dockerfile-specific ignore file (Dockerfile.dockerignore) wins over the context's.
    let own_ignore = path.with_file_name(format!(
        "{}.dockerignore",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("Dockerfile")
    ));
    let own = std::fs::read_to_string(&own_ignore).ok();
    for context in contexts {
        let holds_git =
            context.join(".git").exists() || uses.roots.iter().any(|root| same_dir(root, &context));
        if !holds_git || after.iter().any(|i| runs_git(i, &context)) {
            continue;
        }
        let ignore = own
            .clone()
            .or_else(|| std::fs::read_to_string(context.join(".dockerignore")).ok());
        if ignore
            .as_deref()
            .is_some_and(|i| excludes_git(i) || reincludes_git(i))
        {
            continue;
        }
        let shown = super::files::display(&context);
        let ignore_file = super::files::display(&context.join(".dockerignore"));
        let reincluded = ignore
            .as_deref()
            .map(reincluded_git_parts)
            .unwrap_or_default();
        let (problem, fix) = match (&ignore, reincluded.as_slice()) {
            (None, _) => (
                "it has no .dockerignore: .git changes with every commit".to_owned(),
                format!("add `.git` to {ignore_file}"),
            ),
            (Some(_), []) => (
                "its .dockerignore does not exclude .git: .git changes with every commit"
                    .to_owned(),
                format!("add `.git` to {ignore_file}"),
            ),
            (Some(_), lines) => {
                let lines = lines
                    .iter()
                    .map(|l| format!("`!{l}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                (
                    format!(
                        "its .dockerignore excludes .git but brings back {lines}: the \
                         branch's ref (and HEAD, in the detached checkout CI makes of pull \
                         requests and tags) holds the commit and changes with it"
                    ),
                    format!(
                        "drop {lines} from {ignore_file} and pass what the build reads from \
                         them (the commit, a version) as a build argument declared just before \
                         the step that uses it"
                    ),
                )
            }
        };
        return Some(Finding::new(
            Rule::ContextBustsCache,
            file,
            copy.line,
            format!(
                "{} copies the whole build context `{shown}`, and {problem}, so this layer and \
                 every one after it miss the cache, from the RUN at line {} on",
                copy.keyword,
                after.iter().find(|i| i.is("RUN")).map_or(0, |i| i.line)
            ),
            fix,
        ));
    }
    None
}

/// The first whole-context COPY that a RUN follows (in its stage or a stage built on
/// it), and every instruction after it there.
fn whole_copy_before_run<'a>(
    stages: &'a [Stage],
) -> Option<(&'a Instruction, Vec<&'a Instruction>)> {
    let parents = parents(stages);
    stages.iter().enumerate().find_map(|(index, stage)| {
        let at = stage.instructions.iter().position(copies_whole_context)?;
        let mut after: Vec<&Instruction> = stage.instructions.get(at + 1..)?.iter().collect();
        for (later, descendant) in stages.iter().enumerate().skip(index + 1) {
            if ancestry(&parents, later).contains(&index) {
                after.extend(descendant.instructions);
            }
        }
        let copy = stage.instructions.get(at)?;
        after.iter().any(|i| i.is("RUN")).then_some((copy, after))
    })
}

/// The earlier stages stage `index` is built on, nearest first.
fn ancestry(parents: &[Option<usize>], index: usize) -> Vec<usize> {
    let mut chain = Vec::new();
    let mut current = parents.get(index).copied().flatten();
    while let Some(parent) = current.filter(|p| !chain.contains(p)) {
        chain.push(parent);
        current = parents.get(parent).copied().flatten();
    }
    chain
}

/// The earlier stage a `--from` names (by name or number), if it is one.
fn stage_index(stages: &[Stage], from: &str, before: usize) -> Option<usize> {
    let from = from.to_ascii_lowercase();
    let earlier = stages.get(..before)?;
    earlier
        .iter()
        .rposition(|s| s.name.as_deref() == Some(from.as_str()))
        .or_else(|| from.parse().ok().filter(|n: &usize| *n < before))
}

/// The package manager family of an install command (`pip install` and `uv sync` are
/// both Python's), so that one family's install does not stand for another's.
fn package_ecosystem(command: &str) -> &str {
    let program = command.split_whitespace().next().unwrap_or("");
    match program {
        "pip" | "pip3" | "python" | "python3" | "uv" | "poetry" | "pipenv" => "python",
        "npm" | "yarn" | "pnpm" | "bun" => "node",
        "apt-get" | "apt" | "apk" | "yum" | "dnf" | "microdnf" => "system",
        "mvn" | "mvnw" | "gradle" | "gradlew" | "sbt" | "lein" | "clojure" | "clj" => "jvm",
        "bundle" | "bundler" => "ruby",
        other => other,
    }
}

/// Whether a RUN reads the repository's history: it calls git, stamps Go binaries with
/// `-buildvcs=true`, or runs a script from the context, or `make` with a Makefile, that
/// calls git.
fn runs_git(instruction: &Instruction, context: &Path) -> bool {
    if !instruction.is("RUN") {
        return false;
    }
    let text = instruction.command_text();
    let commands = simple_commands(&text);
    calls_git(&text)
        || commands.iter().flatten().any(|word| {
            let script = context.join(word.trim_start_matches("./"));
            word.ends_with(".sh") && std::fs::read_to_string(script).is_ok_and(|t| calls_git(&t))
        })
        || commands.iter().any(|words| {
            words.first().and_then(|w| w.rsplit('/').next()) == Some("make")
                && makefile_calls_git(context)
        })
}

/// Whether a script's text calls git or stamps Go binaries from it.
fn calls_git(text: &str) -> bool {
    ["$(git ", "`git ", "$(shell git ", "-buildvcs=true"]
        .iter()
        .any(|s| text.contains(s))
        || simple_commands(text)
            .iter()
            .any(|words| words.first().and_then(|w| w.rsplit('/').next()) == Some("git"))
}

/// Whether the context's Makefile, or a file it includes, calls git.
fn makefile_calls_git(context: &Path) -> bool {
    let mut pending: Vec<PathBuf> = ["GNUmakefile", "makefile", "Makefile"]
        .iter()
        .map(|name| context.join(name))
        .collect();
    let mut read = 0;
    while let Some(path) = pending.pop() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if calls_git(&text) {
            return true;
        }
        read += 1;
        if read > 50 {
            break;
        }
        pending.extend(
            text.lines()
                .filter_map(|line| {
                    let line = line.trim_start();
                    ["include ", "-include ", "sinclude "]
                        .iter()
                        .find_map(|directive| line.strip_prefix(directive))
                })
                .flat_map(str::split_whitespace)
                .filter(|name| !name.contains('$'))
                .map(|name| context.join(name)),
        );
    }
    false
}

fn same_dir(a: &Path, b: &Path) -> bool {
    // One may be absolute (a directory a script names by its own location).
    let clean = |p: &Path| {
        super::files::normalize(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
    };
    clean(a) == clean(b)
}

/// Paths in `.git` that change with every commit: the branch's ref holds the commit,
/// and so does HEAD in a detached checkout (how CI checks out pull requests and tags);
/// the index, logs and objects change with it.
const PER_COMMIT_GIT: [&str; 7] = [
    ".git/HEAD",
    ".git/refs/heads/main",
    ".git/refs/remotes/origin/main",
    ".git/index",
    ".git/logs/HEAD",
    ".git/objects/pack/pack.idx",
    ".git/FETCH_HEAD",
];

/// A .dockerignore line as `(negated, pattern)`, the pattern without `./`, `/` ends.
fn ignore_line(line: &str) -> Option<(bool, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (negated, pattern) = match line.strip_prefix('!') {
        Some(rest) => (true, rest.trim()),
        None => (false, line),
    };
    let pattern = pattern
        .trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/');
    Some((negated, pattern))
}

/// Whether a .dockerignore leaves `path` out of the context (last matching pattern
/// wins, `!` re-includes).
fn ignored(patterns: &str, path: &str) -> bool {
    let mut ignored = false;
    for (negated, pattern) in patterns.lines().filter_map(ignore_line) {
        if ignore_match(pattern, path) {
            ignored = !negated;
        }
    }
    ignored
}

/// Whether a .dockerignore's patterns exclude `.git`, and every part of it that changes
/// with each commit.
pub(crate) fn excludes_git(patterns: &str) -> bool {
    ignored(patterns, ".git") && PER_COMMIT_GIT.iter().all(|path| ignored(patterns, path))
}

/// The `!` patterns of a .dockerignore that excludes `.git` that bring back a part of it
/// that changes with every commit (`!.git/HEAD`, `!.git/refs/heads/*`).
fn reincluded_git_parts(patterns: &str) -> Vec<String> {
    if !ignored(patterns, ".git") {
        return Vec::new();
    }
    patterns
        .lines()
        .filter_map(ignore_line)
        .filter(|(negated, pattern)| {
            *negated
                && PER_COMMIT_GIT
                    .iter()
                    .any(|path| ignore_match(pattern, path) && !ignored(patterns, path))
        })
        .map(|(_, pattern)| pattern.to_owned())
        .collect()
}

/// Whether a .dockerignore names `.git` in a `!` line: the context keeps it on purpose.
fn reincludes_git(patterns: &str) -> bool {
    patterns.lines().any(|line| {
        line.trim().strip_prefix('!').is_some_and(|pattern| {
            let pattern = pattern
                .trim()
                .trim_start_matches("./")
                .trim_start_matches('/');
            ignore_match(pattern.trim_end_matches('/'), ".git")
        })
    })
}

/// `.dockerignore` matching of one path: `*` and `?` within a segment, `**` across
/// segments, and a pattern that matches a parent directory matches what it holds.
fn ignore_match(pattern: &str, path: &str) -> bool {
    let Ok(glob) = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
    else {
        return false;
    };
    let matcher = glob.compile_matcher();
    let segments: Vec<&str> = path.split('/').collect();
    (1..=segments.len()).any(|n| {
        segments
            .get(..n)
            .is_some_and(|parent| matcher.is_match(parent.join("/")))
    })
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
    fn dockerignore_patterns_that_exclude_git() {
        assert!(excludes_git(".git\n"));
        assert!(excludes_git("/.git/\n"));
        assert!(excludes_git("**/.git\n"));
        assert!(excludes_git("*\n!src\n"));
        assert!(excludes_git(".*\n"));
        assert!(!excludes_git("node_modules\n"));
        assert!(!excludes_git(".git\n!.git\n"));
        assert!(!excludes_git("# .git\n"));
        assert!(!excludes_git(".git/\n!.git/HEAD\n"));
        assert!(excludes_git(".git\n!.git/config\n"));
    }

    #[test]
    fn parts_of_git_brought_back_that_change_with_each_commit() {
        let parts = reincluded_git_parts(".git/\n!.git/HEAD\n!.git/refs/heads/*\n");
        assert_eq!(parts, vec![".git/HEAD", ".git/refs/heads/*"]);
        assert!(reincluded_git_parts(".git\n!.git/config\n").is_empty());
        assert!(reincluded_git_parts(".git\n!.git/HEAD\n.git/HEAD\n").is_empty());
        assert!(reincluded_git_parts("node_modules\n!.git/HEAD\n").is_empty());
    }

    #[test]
    fn installers_are_recognised_and_others_are_not() {
        let run = |text: &str| {
            let file = parse(&format!("FROM a\nRUN {text}\n")).unwrap();
            installs_dependencies(&file.instructions[1])
        };
        assert_eq!(run("npm ci --omit=dev").as_deref(), Some("npm ci"));
        assert_eq!(
            run("cd app && pip install -r requirements.txt").as_deref(),
            Some("pip install")
        );
        assert_eq!(run("go mod download").as_deref(), Some("go mod download"));
        assert_eq!(
            run("DEBIAN_FRONTEND=noninteractive apt-get install -y curl").as_deref(),
            Some("apt-get install")
        );
        assert_eq!(run("yarn --frozen-lockfile").as_deref(), Some("yarn"));
        for (command, found) in [
            ("clojure -P", "clojure -P"),
            ("clj -P -M:build", "clj -P"),
            ("lein deps", "lein deps"),
            ("mvn -B dependency:go-offline", "mvn dependency:go-offline"),
            ("./mvnw dependency:go-offline", "mvnw dependency:go-offline"),
            ("gradle dependencies --no-daemon", "gradle dependencies"),
            ("./gradlew build -x test", "gradlew build"),
            ("go mod download", "go mod download"),
            ("cargo fetch --locked", "cargo fetch"),
            ("poetry install --no-root", "poetry install"),
            ("pipenv install --deploy", "pipenv install"),
            ("bundle install --jobs 4", "bundle install"),
            ("composer install --no-dev", "composer install"),
            ("dotnet restore", "dotnet restore"),
            ("mix deps.get", "mix deps.get"),
        ] {
            assert_eq!(run(command).as_deref(), Some(found), "{command}");
        }
        assert_eq!(run("npm run test"), None);
        assert_eq!(run("clojure -M:test"), None);
        assert_eq!(run("echo pip install"), None);
    }

    #[test]
    fn per_commit_names() {
        assert!(per_commit_name("GIT_SHA"));
        assert!(per_commit_name("COMMIT"));
        assert!(per_commit_name("BUILD_DATE"));
        assert!(per_commit_name("VCS_REVISION"));
        assert!(per_commit_name("GIT_HASH"));
        assert!(per_commit_name("COMMIT_SHA"));
        assert!(per_commit_name("REVISION"));
        assert!(!per_commit_name("NODE_VERSION"));
        assert!(!per_commit_name("TARBALL_SHA256"));
        assert!(per_commit_name("APP_BUILD_DATE"));
        assert!(!per_commit_name("S6_BUILD_TIME_PKGS"));
    }
}
