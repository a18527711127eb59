//! The builds a `run:` script starts: `docker build`, `docker buildx build`, `docker
//! buildx bake --set`, `buildah bud`, `buildctl build`, with their cache, build-argument,
//! tag and context options. The script is split into simple commands the way a shell
//! would (quotes, `\` continuations, `&&`, `;`, `|`, comments), keeping each word's line;
//! `cd` moves where later commands run, and a script of the repository that a command
//! runs is read too (see [`super::scripts`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::lint::bake::Bake;
use crate::lint::cache::{self, At, Build, BuildArg, CacheSpec, no_cache_finding, split_csv};
use crate::lint::files;
use crate::lint::finding::Finding;

use super::BakeStep;
use super::scripts::{self, Follow};

/// A word of a command and the line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Word {
    /// The word with quotes removed.
    pub text: String,
    /// Its line in the file.
    pub line: usize,
    /// How many `( … )` groups (subshells) it is written in.
    pub depth: usize,
}

/// Splits a script (its lines with their line numbers) into simple commands.
pub(crate) fn commands(lines: &[(usize, &str)]) -> Vec<Vec<Word>> {
    let lines = without_heredoc_bodies(lines);
    let mut commands = Vec::new();
    let mut command: Vec<Word> = Vec::new();
    let mut word = String::new();
    let mut word_line = 0;
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut pending_continuation = false;
    let mut depth = 0usize;
    for (line, text) in &lines {
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        if !pending_continuation && quote.is_none() {
            end_word(&mut command, &mut word, &mut in_word, word_line, depth);
            end_command(&mut commands, &mut command);
        }
        pending_continuation = false;
        while let Some(&c) = chars.get(i) {
            if let Some(q) = quote {
                if c == q {
                    quote = None;
                } else if c == '\\' && q == '"' {
                    if let Some(&next) = chars.get(i + 1) {
                        word.push(next);
                        i += 1;
                    }
                } else {
                    word.push(c);
                }
                i += 1;
                continue;
            }
            match c {
                '\\' if i + 1 == chars.len() => {
                    pending_continuation = true;
                }
                '\\' => {
                    if let Some(&next) = chars.get(i + 1) {
                        start_word(&mut in_word, &mut word_line, *line);
                        word.push(next);
                        i += 1;
                    }
                }
                '\'' | '"' => {
                    start_word(&mut in_word, &mut word_line, *line);
                    quote = Some(c);
                }
                '#' if !in_word => break,
                ';' | '|' | '&' | '(' | ')' => {
                    end_word(&mut command, &mut word, &mut in_word, word_line, depth);
                    end_command(&mut commands, &mut command);
                    match c {
                        '(' => depth += 1,
                        ')' => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
                '$' if matches!(chars.get(i + 1), Some('{') | Some('(')) => {
                    // `${{ expr }}`, `${VAR}`, `$(cmd)`: one word whatever it holds.
                    start_word(&mut in_word, &mut word_line, *line);
                    let (open, close) = match chars.get(i + 1) {
                        Some('(') => ('(', ')'),
                        _ => ('{', '}'),
                    };
                    let mut depth = 0;
                    while let Some(&d) = chars.get(i) {
                        word.push(d);
                        if d == open {
                            depth += 1;
                        } else if d == close {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        i += 1;
                    }
                }
                c if c.is_whitespace() => {
                    end_word(&mut command, &mut word, &mut in_word, word_line, depth);
                }
                c => {
                    start_word(&mut in_word, &mut word_line, *line);
                    word.push(c);
                }
            }
            i += 1;
        }
        if quote.is_some() {
            word.push('\n');
        }
    }
    end_word(&mut command, &mut word, &mut in_word, word_line, depth);
    end_command(&mut commands, &mut command);
    commands
}

/// The script with the bodies of its heredocs (`<<EOF` ... `EOF`) blanked: they are
/// data, not commands.
fn without_heredoc_bodies<'a>(lines: &[(usize, &'a str)]) -> Vec<(usize, &'a str)> {
    let mut out = Vec::with_capacity(lines.len());
    let mut closing: Vec<String> = Vec::new();
    for &(line, text) in lines {
        if let Some(delimiter) = closing.first() {
            if text.trim() == delimiter {
                closing.remove(0);
            }
            out.push((line, ""));
            continue;
        }
        closing.extend(heredoc_delimiters(text));
        out.push((line, text));
    }
    out
}

/// The delimiters of the heredocs a line opens (`<<EOF`, `<<-EOF`, `<<'EOF'`), not
/// `<<<` here-strings.
fn heredoc_delimiters(text: &str) -> Vec<String> {
    let mut delimiters = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("<<") {
        let after = rest.get(at + 2..).unwrap_or("");
        if after.starts_with('<') {
            rest = after.trim_start_matches('<');
            continue;
        }
        let word = after.strip_prefix('-').unwrap_or(after).trim_start();
        let word = word.trim_start_matches(['\'', '"']);
        let name: String = word
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            delimiters.push(name);
        }
        rest = after;
    }
    delimiters
}

fn start_word(in_word: &mut bool, word_line: &mut usize, line: usize) {
    if !*in_word {
        *in_word = true;
        *word_line = line;
    }
}

fn end_word(
    command: &mut Vec<Word>,
    word: &mut String,
    in_word: &mut bool,
    line: usize,
    depth: usize,
) {
    if *in_word {
        command.push(Word {
            text: std::mem::take(word),
            line,
            depth,
        });
        *in_word = false;
    }
}

fn end_command(commands: &mut Vec<Vec<Word>>, command: &mut Vec<Word>) {
    if !command.is_empty() {
        commands.push(std::mem::take(command));
    }
}

/// Options that take a value, for `docker build` / `buildx build` / `buildah bud`.
const BUILD_VALUED: [&str; 44] = [
    "-t",
    "--tag",
    "-f",
    "--file",
    "--build-arg",
    "--cache-from",
    "--cache-to",
    "--target",
    "--platform",
    "-o",
    "--output",
    "--label",
    "--secret",
    "--ssh",
    "--network",
    "--progress",
    "--builder",
    "--iidfile",
    "--metadata-file",
    "--add-host",
    "--shm-size",
    "--ulimit",
    "--allow",
    "--build-context",
    "--annotation",
    "--attest",
    "--provenance",
    "--sbom",
    "--call",
    "--cgroup-parent",
    "--isolation",
    "-m",
    "--memory",
    "--memory-swap",
    "--cpu-shares",
    "--cpuset-cpus",
    "--cpu-quota",
    "--security-opt",
    "--no-cache-filter",
    "--format",
    "--creds",
    "--authfile",
    "--jobs",
    "--secret-file",
];

/// Where a script runs and what it knows.
pub(crate) struct Script<'a> {
    /// The file the script is written in (a workflow, or a script of the repository),
    /// as displayed.
    pub file: &'a str,
    /// The directory its first command runs in (the checkout, `working-directory`, or
    /// the caller's directory for a script a step runs).
    pub workdir: &'a Path,
    /// Environment variables the workflow, job and step set (and, in a script of the
    /// repository, what the script sets itself, as far as it is known).
    pub env: &'a BTreeMap<String, String>,
    /// How scripts of the repository that its commands run are followed; `None`: they
    /// are not.
    pub follow: Option<&'a Follow<'a>>,
}

/// What a script does, as far as the cache is concerned.
#[derive(Debug, Default)]
pub(crate) struct Scripted {
    /// The builds its commands start.
    pub builds: Vec<Build>,
    /// Its `docker buildx bake` commands.
    pub bake_steps: Vec<BakeStep>,
    /// Its `docker compose build` commands.
    pub compose_builds: Vec<ComposeBuild>,
    /// The words of its other commands (expanded): a cache ref or directory named there
    /// may be used in a way the lint cannot follow.
    pub mentions: Vec<String>,
    /// The lines of the scripts of the repository it runs.
    pub followed_lines: Vec<String>,
    /// Those scripts, as displayed.
    pub followed_files: Vec<String>,
}

impl Scripted {
    fn extend(&mut self, other: Scripted) {
        self.builds.extend(other.builds);
        self.bake_steps.extend(other.bake_steps);
        self.compose_builds.extend(other.compose_builds);
        self.mentions.extend(other.mentions);
        self.followed_lines.extend(other.followed_lines);
        self.followed_files.extend(other.followed_files);
    }
}

/// The builds the commands of a script start, and what its other commands name.
pub(crate) fn read(script: &Script, commands: &[Vec<Word>]) -> Scripted {
    let mut scripted = Scripted::default();
    // The directory changed by `cd`, and the `( … )` depth it was changed at: leaving
    // the group goes back to the directory outside it.
    let mut moved: Vec<(usize, PathBuf)> = Vec::new();
    for command in commands {
        let depth = command.first().map_or(0, |w| w.depth);
        moved.retain(|(at, _)| *at <= depth);
        let workdir = moved
            .last()
            .map_or(script.workdir, |(_, dir)| dir.as_path());
        let words: Vec<Word> = command
            .iter()
            .map(|w| Word {
                text: expand(&w.text, script.env),
                line: w.line,
                depth: w.depth,
            })
            .collect();
        let here = Script { workdir, ..*script };
        if words.first().is_some_and(|w| w.text == "popd") {
            moved.pop();
            continue;
        }
        if let Some(dir) = changed_dir(&here, &words) {
            moved.retain(|(at, _)| *at < depth);
            moved.push((depth, dir));
            continue;
        }
        match build(&here, &words) {
            Some(Started::Build(build)) => scripted.builds.push(build),
            Some(Started::Bake(build, step)) => {
                scripted.builds.push(build);
                scripted.bake_steps.push(step);
            }
            Some(Started::Compose(compose)) => scripted.compose_builds.push(compose),
            None => {
                if let Some(followed) = scripts::run(&here, &words) {
                    scripted.extend(followed);
                }
                scripted.mentions.extend(words.into_iter().map(|w| w.text));
            }
        }
    }
    scripted
}

/// The directory `cd DIR` (or `pushd DIR`) moves to: the literal directory, the
/// script's own directory for `cd "$(dirname "$0")"` and its kin, and a directory
/// that stands for any (its name keeps the `$`) when it is computed otherwise.
fn changed_dir(script: &Script, words: &[Word]) -> Option<PathBuf> {
    let (first, args) = words.split_first()?;
    if !matches!(first.text.as_str(), "cd" | "pushd") {
        return None;
    }
    let target = args
        .iter()
        .map(|w| w.text.as_str())
        .find(|t| !t.starts_with('-'))
        .unwrap_or("$HOME");
    let target = match target {
        "~" => "$HOME".to_owned(),
        other => script
            .follow
            .and_then(|f| scripts::own_dir_value(other, f))
            .unwrap_or_else(|| other.to_owned()),
    };
    Some(files::resolve(script.workdir, &target))
}

/// Replaces `${{ env.NAME }}`, `${NAME}` and `$NAME` by the values the workflow sets.
pub(crate) fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    if !text.contains('$') {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        let after = rest.get(start + 3..).unwrap_or("");
        let Some(len) = after.find("}}") else {
            break;
        };
        let inner = after.get(..len).unwrap_or("").trim();
        out.push_str(rest.get(..start).unwrap_or(""));
        match inner
            .strip_prefix("env.")
            .and_then(|name| env.get(name.trim()))
        {
            Some(value) => out.push_str(value),
            None => out.push_str(rest.get(start..start + 3 + len + 2).unwrap_or("")),
        }
        rest = after.get(len + 2..).unwrap_or("");
    }
    out.push_str(rest);
    for (name, value) in env {
        out = out.replace(&format!("${{{name}}}"), value);
        let plain = format!("${name}");
        let mut from = 0;
        while let Some(found) = out.get(from..).and_then(|rest| rest.find(&plain)) {
            let at = from + found;
            let end = at + plain.len();
            let continues = out
                .get(end..)
                .and_then(|r| r.chars().next())
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if continues {
                from = end;
            } else {
                out.replace_range(at..end, value);
                from = at + value.len();
            }
        }
    }
    out
}

/// What a command starts.
enum Started {
    /// A build.
    Build(Build),
    /// `docker buildx bake`: the settings it adds, and the invocation.
    Bake(Build, BakeStep),
    /// `docker compose build`.
    Compose(ComposeBuild),
}

/// `docker compose build [SERVICE...]`: the compose files' services, built with the
/// command's build arguments.
#[derive(Clone, Debug)]
pub(crate) struct ComposeBuild {
    /// The workflow file, as displayed.
    pub file: String,
    /// The line of the command.
    pub line: usize,
    /// The compose files it reads (given with `-f`, or compose's defaults), on disk.
    pub files: Vec<PathBuf>,
    /// The services named (none: every service).
    pub services: Vec<String>,
    /// `--build-arg` values, on top of each service's `args`.
    pub build_args: Vec<BuildArg>,
    /// The line of `--no-cache`, when given.
    pub no_cache: Option<usize>,
}

impl ComposeBuild {
    /// Each service it builds, as a build with the command's arguments on top of the
    /// service's own, and `no-cache-with-export` for services that export a cache.
    /// `read` reads a compose file as bake sees it.
    pub fn builds(&self, read: &dyn Fn(&Path) -> Option<Bake>) -> (Vec<Build>, Vec<Finding>) {
        let given_files = self.files.len() > 1
            || !COMPOSE_DEFAULT_FILES
                .iter()
                .any(|d| self.files.first().is_some_and(|f| f.ends_with(d)));
        let read: Vec<Bake> = if given_files {
            self.files.iter().filter_map(|f| read(f)).collect()
        } else {
            // Compose takes the first default file there is.
            self.files
                .iter()
                .find_map(|f| read(f))
                .into_iter()
                .collect()
        };
        let compose = Bake::merge(read);
        let mut builds = Vec::new();
        let mut findings = Vec::new();
        for (service, own) in compose.built(&self.services) {
            let mut build = own.clone();
            build.file = self.file.clone();
            build.line = self.line;
            build.what = format!("`docker compose build` (service `{service}`)");
            build
                .build_args
                .retain(|a| !self.build_args.iter().any(|b| b.name == a.name));
            build.build_args.extend(self.build_args.iter().cloned());
            if let Some(line) = self.no_cache {
                let exports = own.exports();
                if !exports.is_empty() {
                    findings.push(no_cache_finding(
                        &self.file,
                        line,
                        &build.what,
                        &format!("cache ({})", exports.join(", ")),
                    ));
                }
            }
            builds.push(build);
        }
        (builds, findings)
    }
}

/// The files `docker compose` reads when none is named.
const COMPOSE_DEFAULT_FILES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
];

/// `docker compose [GLOBAL OPTIONS] build [OPTIONS] [SERVICE...]`; other subcommands
/// build nothing the lint follows.
fn compose(script: &Script, first: &Word, args: &[Word]) -> Option<ComposeBuild> {
    let global = [
        "-f",
        "--file",
        "-p",
        "--project-name",
        "--profile",
        "--env-file",
        "--project-directory",
        "--ansi",
        "--progress",
        "--parallel",
    ];
    let mut files = Vec::new();
    let mut rest = args;
    while let Some((word, tail)) = rest.split_first() {
        let text = word.text.as_str();
        if !text.starts_with('-') {
            break;
        }
        let (name, inline) = match text.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (text, None),
        };
        let mut tail = tail;
        let value = match inline {
            Some(value) => Some(value),
            None if global.contains(&name) => {
                let value = tail.first().map(|w| w.text.clone());
                tail = tail.get(1..).unwrap_or(&[]);
                value
            }
            None => None,
        };
        if matches!(name, "-f" | "--file")
            && let Some(value) = value
        {
            files.push(files::resolve(script.workdir, &value));
        }
        rest = tail;
    }
    let (sub, tail) = rest.split_first()?;
    if sub.text != "build" {
        return None;
    }
    let mut compose = ComposeBuild {
        file: script.file.to_owned(),
        line: first.line,
        files: if files.is_empty() {
            COMPOSE_DEFAULT_FILES
                .iter()
                .map(|f| script.workdir.join(f))
                .collect()
        } else {
            files
        },
        services: Vec::new(),
        build_args: Vec::new(),
        no_cache: None,
    };
    let valued = [
        "--build-arg",
        "--builder",
        "-m",
        "--memory",
        "--ssh",
        "--progress",
    ];
    for (name, value, line) in options(tail, &valued) {
        match name.as_str() {
            "--build-arg" => {
                let (name, value) = match value.split_once('=') {
                    Some((n, v)) => (n.to_owned(), v.to_owned()),
                    // `--build-arg NAME` passes the variable of the same name.
                    None => (value.clone(), expand(&format!("${{{value}}}"), script.env)),
                };
                compose.build_args.push(BuildArg { name, value, line });
            }
            "--no-cache" => compose.no_cache = Some(line),
            "" => compose.services.push(value),
            _ => {}
        }
    }
    Some(compose)
}

fn build(script: &Script, words: &[Word]) -> Option<Started> {
    let mut started = recognise(script, words)?;
    // The legacy builder (DOCKER_BUILDKIT=0) uses any local image as a cache: there is
    // no metadata to miss.
    let legacy = script.env.get("DOCKER_BUILDKIT").map(String::as_str) == Some("0")
        || words.iter().any(|w| w.text == "DOCKER_BUILDKIT=0");
    if legacy && let Started::Build(build) = &mut started {
        build.cache_from.clear();
    }
    Some(started)
}

/// Whether a word is `NAME=VALUE` (a variable set for the command, or for the script).
pub(crate) fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| is_name(name))
}

/// Whether a word is a shell variable's name.
pub(crate) fn is_name(word: &str) -> bool {
    !word.is_empty()
        && !word.starts_with(|c: char| c.is_ascii_digit())
        && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Words that run the command after them (`sudo`, `exec`, ...) or open a compound
/// command (`if`, `then`, `do`, `{`, ...).
pub(crate) fn is_wrapper(word: &str) -> bool {
    matches!(
        word,
        "sudo"
            | "time"
            | "env"
            | "exec"
            | "nohup"
            | "command"
            | "!"
            | "{"
            | "if"
            | "then"
            | "else"
            | "elif"
            | "do"
            | "while"
            | "until"
    )
}

/// The command's program and arguments, past leading `NAME=VALUE` assignments, wrappers
/// and the options of `sudo` and `env`.
pub(crate) fn program_words(words: &[Word]) -> &[Word] {
    let mut rest = words;
    while let Some((first, tail)) = rest.split_first() {
        if !is_assignment(&first.text) && !is_wrapper(&first.text) {
            break;
        }
        rest = tail;
        if matches!(first.text.as_str(), "sudo" | "env") {
            while rest.first().is_some_and(|w| w.text.starts_with('-')) {
                rest = rest.get(1..).unwrap_or(&[]);
            }
        }
    }
    rest
}

fn recognise(script: &Script, words: &[Word]) -> Option<Started> {
    let rest = program_words(words);
    let (first, args) = rest.split_first()?;
    let program = first.text.rsplit('/').next().unwrap_or(&first.text);
    let args = match program {
        "docker-compose" | "podman-compose" => {
            return compose(script, first, args).map(Started::Compose);
        }
        "docker" | "podman" | "nerdctl" => skip_options(
            args,
            &[
                "--context",
                "-c",
                "--host",
                "-H",
                "--config",
                "--log-level",
                "-l",
            ],
        ),
        "buildx" | "docker-buildx" => {
            return buildx(script, first, skip_options(args, &["--builder"]));
        }
        "buildah" => {
            let args = skip_options(args, &["--storage-driver", "--root", "--runroot"]);
            let (sub, tail) = args.split_first()?;
            return matches!(
                sub.text.as_str(),
                "bud" | "build" | "build-using-dockerfile"
            )
            .then(|| Started::Build(docker_build(script, first, tail, "`buildah bud`")));
        }
        "mv" => return moved_cache(script, first, args).map(Started::Build),
        "buildctl" => {
            let args = skip_options(
                args,
                &[
                    "--addr",
                    "--tlsservername",
                    "--tlscacert",
                    "--tlscert",
                    "--tlskey",
                    "--tlsdir",
                    "--timeout",
                ],
            );
            let (sub, tail) = args.split_first()?;
            return (sub.text == "build").then(|| Started::Build(buildctl(script, first, tail)));
        }
        _ => return None,
    };
    let (sub, tail) = args.split_first()?;
    if only_checks(tail) {
        return None;
    }
    match sub.text.as_str() {
        "build" => Some(Started::Build(docker_build(
            script,
            first,
            tail,
            "`docker build`",
        ))),
        "image" | "builder" => {
            let (verb, tail) = tail.split_first()?;
            (verb.text == "build")
                .then(|| Started::Build(docker_build(script, first, tail, "`docker build`")))
        }
        "buildx" => buildx(script, first, skip_options(tail, &["--builder"])),
        "compose" => compose(script, first, tail).map(Started::Compose),
        _ => None,
    }
}

/// `mv NEW OLD`: maybe the usual rotation of a local cache directory (export to a new
/// directory, then move it where the next build imports from), which reads the one and
/// writes the other as far as the cache is concerned. The workflow keeps it only when a
/// `type=local` cache of a build uses one of the two directories.
fn moved_cache(script: &Script, first: &Word, args: &[Word]) -> Option<Build> {
    let paths: Vec<&Word> = args.iter().filter(|w| !w.text.starts_with('-')).collect();
    let [from, to] = paths.as_slice() else {
        return None;
    };
    Some(Build {
        file: script.file.to_owned(),
        line: first.line,
        what: "`mv`".to_owned(),
        cache_from: vec![At {
            value: CacheSpec::parse(&format!("type=local,src={}", from.text)),
            line: from.line,
        }],
        cache_to: vec![At {
            value: CacheSpec::parse(&format!("type=local,dest={}", to.text)),
            line: to.line,
        }],
        moves_cache: true,
        ..Build::default()
    })
}

fn buildx(script: &Script, first: &Word, args: &[Word]) -> Option<Started> {
    let (sub, tail) = args.split_first()?;
    match sub.text.as_str() {
        "build" | "b" => Some(Started::Build(docker_build(
            script,
            first,
            tail,
            "`docker buildx build`",
        ))),
        "bake" => {
            let (build, step) = bake(script, first, tail);
            Some(Started::Bake(build, step))
        }
        _ => None,
    }
}

/// Whether build options ask for something other than a build (`--check`,
/// `--call=outline`, `--print`): nothing is built or cached.
fn only_checks(args: &[Word]) -> bool {
    let mut words = args.iter().map(|w| w.text.as_str());
    while let Some(word) = words.next() {
        let call = match word {
            "--check" | "--print" => return true,
            "--call" => words.next().unwrap_or("build"),
            _ => word.strip_prefix("--call=").unwrap_or("build"),
        };
        if call != "build" {
            return true;
        }
    }
    false
}

/// Drops leading global options (and the values of those in `valued`).
fn skip_options<'a>(args: &'a [Word], valued: &[&str]) -> &'a [Word] {
    let mut rest = args;
    while let Some((first, tail)) = rest.split_first() {
        if !first.text.starts_with('-') {
            break;
        }
        rest = if valued.contains(&first.text.as_str()) {
            tail.get(1..).unwrap_or(&[])
        } else {
            tail
        };
    }
    rest
}

/// Options as (name, value, line of the value); positional words have an empty name.
fn options(args: &[Word], valued: &[&str]) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    let mut iter = args.iter();
    while let Some(word) = iter.next() {
        let text = word.text.as_str();
        if let Some((name, value)) = text.split_once('=').filter(|(n, _)| n.starts_with('-')) {
            out.push((name.to_owned(), value.to_owned(), word.line));
        } else if text.starts_with('-') && text.len() > 1 {
            if valued.contains(&text) {
                let value = iter.next();
                out.push((
                    text.to_owned(),
                    value.map(|v| v.text.clone()).unwrap_or_default(),
                    value.map_or(word.line, |v| v.line),
                ));
            } else {
                out.push((text.to_owned(), String::new(), word.line));
            }
        } else {
            out.push((String::new(), text.to_owned(), word.line));
        }
    }
    out
}

fn docker_build(script: &Script, first: &Word, args: &[Word], what: &str) -> Build {
    let mut build = Build {
        file: script.file.to_owned(),
        line: first.line,
        what: what.to_owned(),
        ..Build::default()
    };
    let mut context = None;
    let mut dockerfile = None;
    for (name, value, line) in options(args, &BUILD_VALUED) {
        match name.as_str() {
            "--cache-from" => build.cache_from.push(At {
                value: CacheSpec::parse(&value),
                line,
            }),
            "--cache-to" => build.cache_to.push(At {
                value: CacheSpec::parse(&value),
                line,
            }),
            "--no-cache" if !matches!(value.as_str(), "false" | "0") => {
                build.no_cache = Some(line);
            }
            "--build-arg" => {
                if let Some((n, v)) = value.split_once('=') {
                    build.build_args.push(BuildArg {
                        name: n.to_owned(),
                        value: v.to_owned(),
                        line,
                    });
                }
            }
            "-t" | "--tag" => build.tags.push(value),
            "--target" => build.target = Some(value),
            "-o" | "--output" => build.tags.extend(output_names(&value)),
            "-f" | "--file" => dockerfile = Some(value),
            "" => {
                // A word that is wholly computed (`$ARGS`, `"$@"`) may hold any option.
                build.opaque_options |= !value.is_empty() && cache::is_unknown(&value);
                context = Some(value);
            }
            _ => {}
        }
    }
    locate(
        script,
        &mut build,
        context.as_deref(),
        dockerfile.as_deref(),
    );
    build
}

/// `name=` of an image or registry output (`type=image,"name=a,b",push=true`).
fn output_names(value: &str) -> Vec<String> {
    let fields = split_csv(value);
    let image = fields
        .iter()
        .any(|f| matches!(f.as_str(), "type=image" | "type=registry" | "type=docker"));
    if !image {
        return Vec::new();
    }
    fields
        .iter()
        .filter_map(|f| f.strip_prefix("name="))
        .flat_map(|names| names.split(','))
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

fn locate(script: &Script, build: &mut Build, context: Option<&str>, dockerfile: Option<&str>) {
    let Some(context) = context else {
        return;
    };
    if context == "-" || context.contains("://") || context.starts_with("git@") {
        return;
    }
    let context_dir = files::resolve(script.workdir, context);
    build.dockerfile = Some(match dockerfile {
        Some(file) => files::resolve(script.workdir, file),
        None => context_dir.join("Dockerfile"),
    });
    build.context = Some(context_dir);
}

fn buildctl(script: &Script, first: &Word, args: &[Word]) -> Build {
    let mut build = Build {
        file: script.file.to_owned(),
        line: first.line,
        what: "`buildctl build`".to_owned(),
        ..Build::default()
    };
    let valued = [
        "--export-cache",
        "--import-cache",
        "--opt",
        "--local",
        "--output",
        "-o",
        "--frontend",
        "--secret",
        "--ssh",
        "--progress",
        "--metadata-file",
    ];
    let mut context = None;
    let mut dockerfile_dir = None;
    let mut filename = None;
    for (name, value, line) in options(args, &valued) {
        match name.as_str() {
            "--export-cache" => build.cache_to.push(At {
                value: CacheSpec::parse(&value),
                line,
            }),
            "--import-cache" => build.cache_from.push(At {
                value: CacheSpec::parse(&value),
                line,
            }),
            "--no-cache" => build.no_cache = Some(line),
            "--opt" => {
                if let Some(arg) = value.strip_prefix("build-arg:")
                    && let Some((n, v)) = arg.split_once('=')
                {
                    build.build_args.push(BuildArg {
                        name: n.to_owned(),
                        value: v.to_owned(),
                        line,
                    });
                } else if let Some(f) = value.strip_prefix("filename=") {
                    filename = Some(f.to_owned());
                }
            }
            "--local" => {
                if let Some(dir) = value.strip_prefix("context=") {
                    context = Some(dir.to_owned());
                } else if let Some(dir) = value.strip_prefix("dockerfile=") {
                    dockerfile_dir = Some(dir.to_owned());
                }
            }
            "--output" | "-o" => build.tags.extend(output_names(&value)),
            _ => {}
        }
    }
    if let Some(context) = context {
        let context_dir = files::resolve(script.workdir, &context);
        let dir = dockerfile_dir
            .map(|d| files::resolve(script.workdir, &d))
            .unwrap_or_else(|| context_dir.clone());
        build.dockerfile = Some(dir.join(filename.as_deref().unwrap_or("Dockerfile")));
        build.context = Some(context_dir);
    }
    build
}

/// `docker buildx bake [TARGET...] [-f FILE] [--set target.key=value]`: the settings it
/// adds on top of the bake files, and the step for the bake rules.
fn bake(script: &Script, first: &Word, args: &[Word]) -> (Build, BakeStep) {
    let mut build = Build {
        file: script.file.to_owned(),
        line: first.line,
        what: "`docker buildx bake`".to_owned(),
        ..Build::default()
    };
    let mut step = BakeStep::new(script.file, "`docker buildx bake`");
    let valued = [
        "-f",
        "--file",
        "--set",
        "--builder",
        "--progress",
        "--metadata-file",
        "--allow",
        "--call",
        "--provenance",
        "--sbom",
    ];
    let mut files = Vec::new();
    let mut targets = Vec::new();
    for (name, value, line) in options(args, &valued) {
        match name.as_str() {
            "--set" => step.set(&mut build, &value, line),
            "--no-cache" => step.no_cache = Some(line),
            "-f" | "--file" => files.push(files::resolve(script.workdir, &value)),
            "" => targets.push(value),
            _ => {}
        }
    }
    step.files = if files.is_empty() {
        super::BAKE_DEFAULT_FILES
            .iter()
            .map(|f| script.workdir.join(f))
            .collect()
    } else {
        files
    };
    step.targets = (!targets.iter().any(|t| t.contains('$'))).then_some(targets);
    (build, step)
}

/// One bake override `target.key=value` (from `--set` or bake-action's `set:`).
pub(crate) fn apply_set(build: &mut Build, set: &str, line: usize) {
    let Some((key, value)) = set.split_once('=') else {
        return;
    };
    let Some((_, attr)) = key.split_once('.') else {
        return;
    };
    match attr {
        "cache-from" => build.cache_from.push(At {
            value: CacheSpec::parse(value),
            line,
        }),
        "cache-to" => build.cache_to.push(At {
            value: CacheSpec::parse(value),
            line,
        }),
        "tags" => build.tags.push(value.to_owned()),
        _ => {
            if let Some(name) = attr.strip_prefix("args.") {
                build.build_args.push(BuildArg {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    line,
                });
            }
        }
    }
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
    use crate::lint::cache::CacheKind;

    fn script_builds(text: &str) -> Vec<Build> {
        let lines: Vec<(usize, &str)> =
            text.lines().enumerate().map(|(i, l)| (i + 10, l)).collect();
        let env = BTreeMap::from([("IMAGE".to_owned(), "ghcr.io/o/app".to_owned())]);
        let script = Script {
            file: "ci.yml",
            workdir: Path::new(""),
            env: &env,
            follow: None,
        };
        read(&script, &commands(&lines)).builds
    }

    #[test]
    fn continued_commands_keep_each_option_on_its_line() {
        let builds = script_builds(
            "echo start # not a build\nDOCKER_BUILDKIT=1 docker build \\\n  --cache-from \"$IMAGE:prefix\" \\\n  --build-arg BUILDKIT_INLINE_CACHE=1 \\\n  -t ${{ env.IMAGE }}:next -f docker/Dockerfile . && docker push x\n",
        );
        assert_eq!(builds.len(), 1);
        let build = &builds[0];
        assert_eq!(build.line, 11);
        assert_eq!(build.cache_from[0].line, 12);
        assert_eq!(
            build.cache_from[0].value.kind,
            CacheKind::Registry("ghcr.io/o/app:prefix".into())
        );
        assert!(build.inline_cache());
        assert_eq!(build.tags, vec!["ghcr.io/o/app:next".to_owned()]);
        assert_eq!(
            build.dockerfile.as_deref(),
            Some(Path::new("docker/Dockerfile"))
        );
    }

    #[test]
    fn heredoc_bodies_and_shell_keywords_are_not_mistaken_for_builds() {
        let builds = script_builds(
            "cat <<'EOF' > notes.txt\ndocker build --cache-from x .\nEOF\nif true; then docker build -t a .; fi\nfor p in a b; do docker buildx build -t $p .; done\n",
        );
        let lines: Vec<usize> = builds.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![13, 14]);
        assert!(builds.iter().all(|b| b.cache_from.is_empty()));
        let legacy = script_builds("DOCKER_BUILDKIT=0 docker build --cache-from a:1 .\n");
        assert!(legacy[0].cache_from.is_empty());
    }

    #[test]
    fn a_moved_local_cache_reads_one_directory_and_writes_the_other() {
        let builds = script_builds("mv /tmp/.buildx-cache-new /tmp/.buildx-cache\n");
        assert_eq!(
            builds[0].cache_from[0].value.kind,
            CacheKind::Local("/tmp/.buildx-cache-new".into())
        );
        assert_eq!(
            builds[0].cache_to[0].value.kind,
            CacheKind::Local("/tmp/.buildx-cache".into())
        );
    }

    #[test]
    fn checks_and_prints_build_nothing() {
        let builds = script_builds(
            "docker build --check .\ndocker buildx build --call=outline .\ndocker buildx bake --print app\ndocker buildx build --call build -t a .\n",
        );
        assert_eq!(builds.len(), 1);
        assert_eq!(builds[0].tags, vec!["a".to_owned()]);
    }

    #[test]
    fn buildx_bake_and_buildctl_are_recognised() {
        let builds = script_builds(
            "docker buildx build --push --cache-to=type=gha,mode=max --no-cache .\ndocker buildx bake --set '*.cache-to=type=registry,ref=r:c' app\nbuildctl --addr tcp://x build --export-cache type=inline --output type=image,name=r:1,push=true --local context=.\n",
        );
        assert_eq!(builds.len(), 3);
        assert_eq!(builds[0].no_cache, Some(10));
        assert_eq!(
            builds[1].cache_to[0].value.kind,
            CacheKind::Registry("r:c".into())
        );
        assert!(builds[2].inline_cache());
        assert_eq!(builds[2].tags, vec!["r:1".to_owned()]);
    }
}
