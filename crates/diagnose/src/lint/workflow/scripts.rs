//! Scripts of the repository that a `run:` step runs (`./scripts/build.sh`, `bash
//! ci/docker.sh ARG`, `sh -c '…'`, `source ci/env.sh`), read as if their commands were
//! written in the step, so that the builds they start are judged like the step's own.
//!
//! A script is read only when its path is known (no variable left in it), lies inside
//! the repository once symlinks are resolved, is a shell script (or is given to a
//! shell by name), and is at most [`MAX_SCRIPT_BYTES`] long. Scripts that run each
//! other are read once per chain of calls, at most [`MAX_DEPTH`] deep and
//! [`MAX_SCRIPTS`] per step. In a script, a variable it sets once to a literal value is
//! known; one it sets from its arguments, from a command or more than once is unknown,
//! never guessed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::lint::files;

use super::shell::{self, Script, Scripted, Word};

/// How many scripts deep a chain of scripts running scripts is followed.
pub(crate) const MAX_DEPTH: usize = 8;
/// How many scripts one step may have read.
pub(crate) const MAX_SCRIPTS: usize = 64;
/// The largest script read.
pub(crate) const MAX_SCRIPT_BYTES: u64 = 256 * 1024;

/// The programs that run a shell script.
const SHELLS: [&str; 6] = ["sh", "bash", "dash", "zsh", "ksh", "ash"];

/// How the scripts a step runs are followed.
pub(crate) struct Follow<'a> {
    /// The repository root, as the lint names it.
    pub repo: &'a Path,
    /// The repository root on disk, symlinks resolved: nothing outside it is read.
    pub real_repo: &'a Path,
    /// The scripts being read, outermost first, as files on disk.
    pub chain: Vec<PathBuf>,
    /// The script whose commands are being read (absolute), for `$(dirname "$0")`;
    /// `None` in a step.
    pub current: Option<PathBuf>,
    /// How many more scripts the step may read.
    pub budget: &'a Cell<usize>,
}

impl<'a> Follow<'a> {
    /// Following from a step of a workflow of the repository at `repo` (`real_repo`:
    /// the same directory, canonical).
    pub fn from_step(repo: &'a Path, real_repo: &'a Path, budget: &'a Cell<usize>) -> Self {
        Follow {
            repo,
            real_repo,
            chain: Vec::new(),
            current: None,
            budget,
        }
    }
}

/// How a command runs a script.
#[derive(Debug, PartialEq)]
enum Invocation {
    /// A file: `./x.sh`, `bash x.sh`, `source x.sh`; `by_shell`: a shell is named, so
    /// the file is read whatever its name and first line.
    File { path: String, by_shell: bool },
    /// `bash -c 'TEXT'`, written on `line`.
    Inline { text: String, line: usize },
}

/// What the script a command runs does, when it is a script that can be followed.
pub(crate) fn run(script: &Script, words: &[Word]) -> Option<Scripted> {
    let follow = script.follow?;
    match invocation(words)? {
        Invocation::Inline { text, line } => {
            let lines: Vec<(usize, &str)> = text
                .lines()
                .enumerate()
                .map(|(i, l)| (line + i, l))
                .collect();
            Some(shell::read(script, &shell::commands(&lines)))
        }
        Invocation::File { path, by_shell } => read_file(script, follow, &path, by_shell),
    }
}

fn read_file(script: &Script, follow: &Follow, written: &str, by_shell: bool) -> Option<Scripted> {
    let path = locate(script, follow, written)?;
    let real = path.canonicalize().ok()?;
    if !real.starts_with(follow.real_repo)
        || follow.chain.contains(&real)
        || follow.chain.len() >= MAX_DEPTH
    {
        return None;
    }
    let meta = std::fs::metadata(&real).ok()?;
    if !meta.is_file() || meta.len() > MAX_SCRIPT_BYTES {
        return None;
    }
    let left = follow.budget.get().checked_sub(1)?;
    follow.budget.set(left);
    let text = std::fs::read_to_string(&real).ok()?;
    if !by_shell && !is_shell_script(&path, &text) {
        return None;
    }
    let lines: Vec<(usize, &str)> = text.lines().enumerate().map(|(i, l)| (i + 1, l)).collect();
    let commands = shell::commands(&lines);
    let current = std::path::absolute(&path).ok()?;
    let mut chain = follow.chain.clone();
    chain.push(real);
    let nested = Follow {
        repo: follow.repo,
        real_repo: follow.real_repo,
        chain,
        current: Some(current),
        budget: follow.budget,
    };
    let env = own_env(script.env, &commands, &nested);
    // Shown as the repository's files are: relative when the lint was given a relative
    // path (a directory named by the script's own location is absolute).
    let shown = match follow.repo.is_absolute() {
        true => path.clone(),
        false => files::relative_to_current_dir(&path),
    };
    let file = files::display(&shown);
    let inner = Script {
        file: &file,
        workdir: script.workdir,
        env: &env,
        follow: Some(&nested),
    };
    let mut scripted = shell::read(&inner, &commands);
    scripted.followed_files.push(file.clone());
    scripted
        .followed_lines
        .extend(text.lines().map(str::to_owned));
    Some(scripted)
}

/// The script a command runs, if it runs one: a path (`./x.sh`, `ci/x.sh`), a shell
/// given a file or `-c` text, or `source`/`.`.
fn invocation(words: &[Word]) -> Option<Invocation> {
    let (program, args) = shell::program_words(words).split_first()?;
    let name = program.text.rsplit('/').next().unwrap_or(&program.text);
    if matches!(program.text.as_str(), "source" | ".") {
        let path = args.first()?.text.clone();
        return Some(Invocation::File {
            path,
            by_shell: true,
        });
    }
    if SHELLS.contains(&name) {
        return shell_invocation(args);
    }
    program.text.contains('/').then(|| Invocation::File {
        path: program.text.clone(),
        by_shell: false,
    })
}

/// `bash [OPTIONS] FILE [ARG...]` or `bash [OPTIONS] -c TEXT`; `None` when the shell
/// reads its standard input (`-s`, no file).
fn shell_invocation(args: &[Word]) -> Option<Invocation> {
    let mut rest = args.iter();
    while let Some(word) = rest.next() {
        let text = word.text.as_str();
        if text == "--" {
            let path = rest.next()?.text.clone();
            return Some(Invocation::File {
                path,
                by_shell: true,
            });
        }
        if matches!(text, "-o" | "+o" | "-O" | "+O") {
            rest.next();
            continue;
        }
        if let Some(flags) = text.strip_prefix('-').filter(|f| !f.starts_with('-')) {
            if flags.contains('s') {
                return None;
            }
            if flags.contains('c') {
                let body = rest.find(|w| !w.text.starts_with(['-', '+']))?;
                return Some(Invocation::Inline {
                    text: body.text.clone(),
                    line: body.line,
                });
            }
            continue;
        }
        if text.starts_with(['-', '+']) {
            continue;
        }
        return Some(Invocation::File {
            path: text.to_owned(),
            by_shell: true,
        });
    }
    None
}

/// The script's path on disk, from where the command runs: the workspace variables
/// stand for the repository root, the script's own directory idioms for its
/// directory; a path still computed (`$DIR/x.sh`) is not followed.
fn locate(script: &Script, follow: &Follow, written: &str) -> Option<PathBuf> {
    const WORKSPACE: [&str; 4] = [
        "${{ github.workspace }}",
        "${{github.workspace}}",
        "${GITHUB_WORKSPACE}",
        "$GITHUB_WORKSPACE",
    ];
    if let Some(rest) = WORKSPACE.iter().find_map(|w| written.strip_prefix(w)) {
        let rest = rest.trim_start_matches('/');
        return (!computed(rest)).then(|| files::resolve(follow.repo, rest));
    }
    let written = own_dir_value(written, follow).unwrap_or_else(|| written.to_owned());
    (!computed(&written)).then(|| files::resolve(script.workdir, &written))
}

/// Whether a path still holds something computed at run time.
fn computed(path: &str) -> bool {
    path.is_empty() || path.contains(['$', '`', '*', '?', '~'])
}

/// Whether a file is a shell script: its `#!` line names a shell, or it has none and
/// is named `*.sh` / `*.bash`.
fn is_shell_script(path: &Path, text: &str) -> bool {
    let base = |word: &str| word.rsplit('/').next().unwrap_or(word).to_owned();
    match text.lines().next().and_then(|l| l.strip_prefix("#!")) {
        Some(interpreter) => {
            let mut words = interpreter.split_whitespace();
            let program = words.next().map(base);
            let program = match program.as_deref() {
                Some("env") => words.find(|w| !w.starts_with('-')).map(base),
                _ => program,
            };
            program.is_some_and(|p| SHELLS.contains(&p.as_str()))
        }
        None => path
            .extension()
            .is_some_and(|ext| ext == "sh" || ext == "bash"),
    }
}

/// `text` with a leading reference to the directory of the script being read
/// (`$(dirname "$0")`, `$(cd "$(dirname "$0")/.." && pwd)`, `${BASH_SOURCE[0]%/*}`,
/// ...) replaced by that directory; `None` when it holds none.
pub(crate) fn own_dir_value(text: &str, follow: &Follow) -> Option<String> {
    let dir = follow.current.as_deref()?.parent()?;
    let (dir, rest) = own_dir(text, dir)?;
    Some(format!("{}{rest}", dir.display()))
}

/// The directory a leading own-directory idiom of `text` names, and what follows it.
fn own_dir<'t>(text: &'t str, dir: &Path) -> Option<(PathBuf, &'t str)> {
    for form in ["${BASH_SOURCE[0]%/*}", "${BASH_SOURCE%/*}", "${0%/*}"] {
        if let Some(rest) = text.strip_prefix(form) {
            return Some((dir.to_path_buf(), rest));
        }
    }
    let (inner, rest) = substitution(text)?;
    let inner = inner.trim();
    if let Some(argument) = inner.strip_prefix("dirname ") {
        return names_itself(unquote(argument.trim())).then(|| (dir.to_path_buf(), rest));
    }
    let body = inner.strip_prefix("cd ")?;
    let (target, then) = body.split_once("&&").or_else(|| body.split_once(';'))?;
    if !matches!(then.trim(), "pwd" | "pwd -P" | "pwd -L") {
        return None;
    }
    let (inner_dir, below) = own_dir(unquote(target.trim()), dir)?;
    let below = unquote(below).trim_start_matches('/');
    Some((files::resolve(&inner_dir, below), rest))
}

/// `$(COMMAND)REST` as `(COMMAND, REST)`.
fn substitution(text: &str) -> Option<(&str, &str)> {
    let body = text.strip_prefix("$(")?;
    let mut depth = 1usize;
    for (at, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((body.get(..at)?, body.get(at + 1..)?));
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether a `dirname` argument names the script itself (`$0`, `${BASH_SOURCE[0]}`,
/// `$(readlink -f "$0")`, ...).
fn names_itself(argument: &str) -> bool {
    if matches!(
        argument,
        "$0" | "${0}" | "${BASH_SOURCE[0]}" | "${BASH_SOURCE}" | "$BASH_SOURCE"
    ) {
        return true;
    }
    substitution(argument).is_some_and(|(inner, rest)| {
        let mut words = inner.split_whitespace();
        rest.is_empty()
            && matches!(words.next(), Some("readlink" | "realpath"))
            && words
                .filter(|w| !w.starts_with('-'))
                .all(|w| names_itself(unquote(w)))
    })
}

fn unquote(text: &str) -> &str {
    let text = text.trim();
    ['"', '\'']
        .iter()
        .find_map(|q| text.strip_prefix(*q).and_then(|t| t.strip_suffix(*q)))
        .unwrap_or(text)
}

/// The variables a script sees: the caller's, less those the script sets itself,
/// plus those it sets exactly once to a literal (or to its own directory).
fn own_env(
    caller: &BTreeMap<String, String>,
    commands: &[Vec<Word>],
    follow: &Follow,
) -> BTreeMap<String, String> {
    let mut assigned: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for command in commands {
        for (name, value) in assignments(command) {
            let known = value.and_then(|v| literal_value(&v, follow));
            assigned.entry(name).or_default().push(known);
        }
    }
    let mut env = caller.clone();
    for (name, values) in assigned {
        match values.as_slice() {
            [Some(value)] => env.insert(name, value.clone()),
            _ => env.remove(&name),
        };
    }
    env
}

/// A value known before the script runs: written out, or the script's directory.
fn literal_value(value: &str, follow: &Follow) -> Option<String> {
    if let Some(dir) = own_dir_value(value, follow) {
        return (!computed(&dir)).then_some(dir);
    }
    (!value.is_empty() && !value.contains(['$', '`'])).then(|| value.to_owned())
}

/// The variables a command sets, with the value written when it is a plain
/// `NAME=VALUE` (`None`: set some other way: `for`, `read`, `+=`, an array).
fn assignments(command: &[Word]) -> Vec<(String, Option<String>)> {
    let texts: Vec<&str> = command
        .iter()
        .map(|w| w.text.as_str())
        .skip_while(|w| shell::is_wrapper(w))
        .collect();
    let mut out = Vec::new();
    match texts.as_slice() {
        ["for", name, ..] | ["select", name, ..] => out.push(((*name).to_owned(), None)),
        ["read" | "mapfile" | "readarray", rest @ ..] => out.extend(
            rest.iter()
                .filter(|w| !w.starts_with('-') && shell::is_name(w))
                .map(|w| ((*w).to_owned(), None)),
        ),
        ["unset", rest @ ..] => out.extend(
            rest.iter()
                .filter(|w| !w.starts_with('-'))
                .map(|w| ((*w).to_owned(), None)),
        ),
        [
            "export" | "local" | "declare" | "readonly" | "typeset",
            rest @ ..,
        ] => {
            let declares = texts.first().is_some_and(|k| *k != "export");
            for word in rest.iter().filter(|w| !w.starts_with(['-', '+'])) {
                match word.split_once('=') {
                    Some(_) => out.extend(assignment(word)),
                    // `local NAME` empties it; `export NAME` leaves it as it is.
                    None if declares && shell::is_name(word) => {
                        out.push(((*word).to_owned(), None));
                    }
                    None => {}
                }
            }
        }
        _ => out.extend(
            texts
                .iter()
                .map_while(|w| assignment(w))
                .collect::<Vec<_>>(),
        ),
    }
    out
}

/// `NAME=VALUE` (value kept) or `NAME+=VALUE` (value unknown).
fn assignment(word: &str) -> Option<(String, Option<String>)> {
    let (name, value) = word.split_once('=')?;
    if let Some(name) = name.strip_suffix('+') {
        return shell::is_name(name).then(|| (name.to_owned(), None));
    }
    shell::is_name(name).then(|| (name.to_owned(), Some(value.to_owned())))
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

    fn words(text: &str) -> Vec<Word> {
        let lines = [(7, text)];
        shell::commands(&lines).remove(0)
    }

    fn file(path: &str, by_shell: bool) -> Option<Invocation> {
        Some(Invocation::File {
            path: path.to_owned(),
            by_shell,
        })
    }

    #[test]
    fn commands_that_run_a_script_are_told_apart() {
        let run = |text: &str| invocation(&words(text));
        assert_eq!(
            run("./scripts/build.sh --push"),
            file("./scripts/build.sh", false)
        );
        assert_eq!(run("ci/build.sh"), file("ci/build.sh", false));
        assert_eq!(run("bash -e ci/docker.sh x"), file("ci/docker.sh", true));
        assert_eq!(run("sudo -E bash ci/docker.sh"), file("ci/docker.sh", true));
        assert_eq!(run("exec ci/docker.sh a"), file("ci/docker.sh", false));
        assert_eq!(run("TARGET=x ci/docker.sh"), file("ci/docker.sh", false));
        assert_eq!(run(". ./env.sh"), file("./env.sh", true));
        assert_eq!(
            run("sh -ec 'docker build .'"),
            Some(Invocation::Inline {
                text: "docker build .".to_owned(),
                line: 7,
            })
        );
        assert_eq!(run("bash -s -- --version 1"), None);
        assert_eq!(run("bash"), None);
        assert_eq!(run("make docker-build"), None);
        assert_eq!(run("echo ./x.sh"), None);
    }

    #[test]
    fn the_own_directory_idioms_name_the_scripts_directory() {
        let dir = Path::new("/r/ci");
        let own = |text: &str| own_dir(text, dir).map(|(d, rest)| (d, rest.to_owned()));
        assert_eq!(own("$(dirname $0)"), Some((dir.into(), String::new())));
        assert_eq!(
            own("$(dirname \"${BASH_SOURCE[0]}\")/.."),
            Some((dir.into(), "/..".to_owned()))
        );
        assert_eq!(
            own("$(cd $(dirname \"$0\")/.. && pwd)"),
            Some((PathBuf::from("/r"), String::new()))
        );
        assert_eq!(
            own("$(dirname \"$(readlink -f \"$0\")\")"),
            Some((dir.into(), String::new()))
        );
        assert_eq!(
            own("${BASH_SOURCE[0]%/*}"),
            Some((dir.into(), String::new()))
        );
        assert_eq!(own("$(dirname \"$1\")"), None);
        assert_eq!(own("$(git rev-parse --show-toplevel)"), None);
    }

    #[test]
    fn only_variables_set_once_to_a_literal_are_known() {
        let lines: Vec<(usize, &str)> = [
            "IMAGE=ghcr.io/o/app",
            "TAG=$1",
            "export MODE=max",
            "if [ -n \"$CI\" ]; then CACHE=a; else CACHE=b; fi",
            "for ARCH in amd64 arm64; do :; done",
            "local SCOPE",
            "ROOT=\"$(cd \"$(dirname \"$0\")/..\" && pwd)\"",
        ]
        .iter()
        .enumerate()
        .map(|(i, l)| (i + 1, *l))
        .collect();
        let commands = shell::commands(&lines);
        let caller = BTreeMap::from(
            ["TAG", "CACHE", "ARCH", "SCOPE", "REGISTRY"].map(|n| (n.to_owned(), "x".to_owned())),
        );
        let budget = Cell::new(1);
        let follow = Follow {
            current: Some(PathBuf::from("/r/ci/build.sh")),
            ..Follow::from_step(Path::new("/r"), Path::new("/r"), &budget)
        };
        let env = own_env(&caller, &commands, &follow);
        let known: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            known,
            vec![
                ("IMAGE", "ghcr.io/o/app"),
                ("MODE", "max"),
                ("REGISTRY", "x"),
                ("ROOT", "/r"),
            ]
        );
    }
}
