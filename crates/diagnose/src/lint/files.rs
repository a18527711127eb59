//! Which files to lint: a walk of the given directories that picks Dockerfiles, compose
//! files, bake files and GitHub workflow files by name. The walk honours `.gitignore`,
//! skips vendored trees and test fixtures, applies `--exclude` globs and those of a
//! `.layercache-lint.toml`, and says which repository each file belongs to (the nearest
//! directory holding `.git` or `.github`), so that each repository is checked on its own.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::Deserialize;

use super::finding::{Finding, Rule};

/// What a file is, judged by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `Dockerfile`, `*.Dockerfile`, `Dockerfile.*` (and `Containerfile` alike).
    Dockerfile,
    /// `compose.yaml`, `docker-compose.yml`, and their `.override`/`.*` variants.
    Compose,
    /// `docker-compose_prod.yml`, `compose-dev.yaml`, `app.docker-compose.yml`: a compose
    /// file if it has a top-level `services` mapping.
    MaybeCompose,
    /// `docker-bake.hcl` and variants.
    BakeHcl,
    /// `docker-bake.json` and variants.
    BakeJson,
    /// Another `*.hcl`: a bake file if it has `target` or `group` blocks.
    MaybeBakeHcl,
    /// `.github/workflows/*.yml`.
    Workflow,
    /// A file named on the command line whose name says nothing: judged by its content.
    Unknown,
}

/// Directories never walked into: version control, dependencies vendored or installed,
/// build output, and test data (parser fixtures are invalid on purpose).
const SKIPPED: [&str; 11] = [
    ".git",
    "node_modules",
    "vendor",
    "third_party",
    "target",
    "testdata",
    "fixtures",
    "__fixtures__",
    "testfiles",
    "testfiles-negative",
    "bower_components",
];

/// The configuration file read at the root of each scanned directory and repository.
pub(crate) const CONFIG_FILE: &str = ".layercache-lint.toml";

/// `.layercache-lint.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Globs (`.gitignore` syntax, relative to the file's directory) never linted.
    #[serde(default)]
    exclude: Vec<String>,
}

/// A file to lint.
#[derive(Debug)]
pub(crate) struct Found {
    /// Its path.
    pub path: PathBuf,
    /// What its name says it is.
    pub kind: Kind,
    /// The root of the repository it belongs to: its files are checked together.
    pub scope: PathBuf,
}

/// The files a walk found, and what could not be read.
#[derive(Debug, Default)]
pub(crate) struct Discovered {
    /// Files to lint, sorted by path.
    pub files: Vec<Found>,
    /// Paths that could not be read and configuration files that do not parse.
    pub findings: Vec<Finding>,
}

/// The files to lint under `paths` (a file given directly is always taken), leaving out
/// what matches `exclude` (globs relative to each given directory).
pub(crate) fn discover(paths: &[PathBuf], exclude: &[String]) -> Discovered {
    let mut found = Discovered::default();
    let mut scopes = Scopes::default();
    for path in paths {
        let path = normalize(path);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, exclude, &mut scopes, &mut found),
            Ok(_) => {
                let kind = classify(&path).unwrap_or(Kind::Unknown);
                let scope = scopes.of(&path, None);
                found.files.push(Found { path, kind, scope });
            }
            Err(error) => found.findings.push(unreadable(&path, &error.to_string())),
        }
    }
    found.files.sort_by(|a, b| a.path.cmp(&b.path));
    found.files.dedup_by(|a, b| a.path == b.path);
    found
}

fn unreadable(path: &Path, error: &str) -> Finding {
    Finding::new(
        Rule::ParseError,
        display(path),
        1,
        format!("cannot read it: {error}"),
        "check the path and its permissions",
    )
}

fn walk(root: &Path, exclude: &[String], scopes: &mut Scopes, found: &mut Discovered) {
    let mut builder = GitignoreBuilder::new(root);
    for glob in exclude {
        if let Err(error) = builder.add_line(None, glob) {
            found.findings.push(Finding::new(
                Rule::ParseError,
                "--exclude",
                1,
                format!("not a valid glob: {error}"),
                "write the pattern in .gitignore syntax",
            ));
        }
    }
    let excluded = builder.build().unwrap_or_else(|_| Gitignore::empty());
    let walk_root = root.to_path_buf();
    let walker = ignore::WalkBuilder::new(root)
        .hidden(false)
        .ignore(false)
        .git_global(false)
        .require_git(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(move |entry| {
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            let skipped =
                is_dir && entry.depth() > 0 && SKIPPED.iter().any(|s| entry.file_name() == *s);
            let relative = entry
                .path()
                .strip_prefix(&walk_root)
                .unwrap_or(entry.path());
            !skipped && !excluded.matched(relative, is_dir).is_ignore()
        })
        .build();
    let mut configs = Configs::default();
    let real_root = root.canonicalize().ok();
    for entry in walker {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                let path = match &error {
                    ignore::Error::WithPath { path, .. } => path.clone(),
                    _ => root.to_path_buf(),
                };
                found.findings.push(unreadable(&path, &error.to_string()));
                continue;
            }
        };
        let path = normalize(entry.path());
        let is_file = entry.file_type().is_some_and(|t| t.is_file()) || path.is_file();
        if !is_file || entry.depth() == 0 {
            continue;
        }
        let Some(kind) = classify(&path) else {
            continue;
        };
        if entry.path_is_symlink() && links_inside(&path, real_root.as_deref()) {
            // The file it points to is linted under its own name.
            continue;
        }
        let scope = scopes.of(&path, Some(root));
        if configs.excludes(&path, &[root, &scope], &mut found.findings) {
            continue;
        }
        found.files.push(Found { path, kind, scope });
    }
}

/// Whether the symlink `path` points to a file under `root` (canonical).
fn links_inside(path: &Path, root: Option<&Path>) -> bool {
    root.zip(path.canonicalize().ok())
        .is_some_and(|(root, target)| target.starts_with(root))
}

/// The repository root of each directory, found once.
#[derive(Default)]
struct Scopes {
    known: HashMap<PathBuf, bool>,
}

impl Scopes {
    /// The nearest directory above `path` (up to `limit`, normalized) holding `.git` or
    /// `.github`; `limit` itself (or the file's directory) when none does.
    fn of(&mut self, path: &Path, limit: Option<&Path>) -> PathBuf {
        let dir = path
            .parent()
            .map(dir_or_dot)
            .unwrap_or_else(|| PathBuf::from("."));
        for ancestor in path.ancestors().skip(1) {
            let ancestor = dir_or_dot(ancestor);
            let marked = *self.known.entry(ancestor.clone()).or_insert_with(|| {
                ancestor.join(".git").exists() || ancestor.join(".github").is_dir()
            });
            if marked {
                return ancestor;
            }
            if limit == Some(ancestor.as_path()) {
                return ancestor;
            }
        }
        limit.map(Path::to_path_buf).unwrap_or(dir)
    }
}

fn dir_or_dot(dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_path_buf()
    }
}

/// The `.layercache-lint.toml` files read so far, by directory.
#[derive(Default)]
struct Configs {
    read: HashMap<PathBuf, Option<Gitignore>>,
}

impl Configs {
    /// Whether the configuration in any of `dirs` excludes `path`.
    fn excludes(&mut self, path: &Path, dirs: &[&Path], findings: &mut Vec<Finding>) -> bool {
        dirs.iter().any(|dir| {
            let matcher = self
                .read
                .entry(dir.to_path_buf())
                .or_insert_with(|| load_config(dir, findings));
            let relative = if *dir == Path::new(".") {
                Some(path)
            } else {
                path.strip_prefix(dir).ok()
            };
            matcher.as_ref().zip(relative).is_some_and(|(m, relative)| {
                m.matched_path_or_any_parents(relative, false).is_ignore()
            })
        })
    }
}

fn load_config(dir: &Path, findings: &mut Vec<Finding>) -> Option<Gitignore> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let config: Config = match toml::from_str(&text) {
        Ok(config) => config,
        Err(error) => {
            let line = error
                .span()
                .map(|span| text.get(..span.start).unwrap_or("").lines().count().max(1))
                .unwrap_or(1);
            findings.push(Finding::new(
                Rule::ParseError,
                display(&path),
                line,
                format!("not a valid {CONFIG_FILE}: {}", error.message()),
                "write `exclude = [\"GLOB\", ...]` (globs in .gitignore syntax)",
            ));
            return None;
        }
    };
    let mut builder = GitignoreBuilder::new(dir);
    for glob in &config.exclude {
        if builder.add_line(Some(path.clone()), glob).is_err() {
            findings.push(Finding::new(
                Rule::ParseError,
                display(&path),
                1,
                format!("`{glob}` is not a valid glob"),
                "write the pattern in .gitignore syntax",
            ));
        }
    }
    builder.build().ok()
}

/// Extensions of other languages and formats: `dockerfile.go` is Go, `Dockerfile.md`
/// prose, `Dockerfile.j2` and `Dockerfile.windows.tmpl` templates.
const NOT_DOCKERFILE: [&str; 36] = [
    "go", "rs", "py", "js", "mjs", "cjs", "ts", "tsx", "jsx", "java", "kt", "c", "h", "cc", "cpp",
    "cs", "rb", "php", "sh", "bash", "ps1", "md", "rst", "txt", "html", "json", "yml", "yaml",
    "toml", "xml", "j2", "jinja", "tmpl", "tpl", "template", "erb",
];

/// What a file is by its name, if it is one of the kinds linted.
pub(crate) fn classify(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_str()?;
    let lower = name.to_ascii_lowercase();
    let yaml = lower.ends_with(".yml") || lower.ends_with(".yaml");
    if yaml && is_workflow_dir(path) {
        return Some(Kind::Workflow);
    }
    if yaml
        && ["compose.", "docker-compose."]
            .iter()
            .any(|prefix| lower.starts_with(prefix))
    {
        return Some(Kind::Compose);
    }
    if yaml && compose_variant(&lower) {
        return Some(Kind::MaybeCompose);
    }
    if lower.starts_with("docker-bake.") {
        if lower.ends_with(".hcl") {
            return Some(Kind::BakeHcl);
        }
        if lower.ends_with(".json") {
            return Some(Kind::BakeJson);
        }
    }
    if lower.ends_with(".hcl") {
        return Some(Kind::MaybeBakeHcl);
    }
    if lower.ends_with(".dockerignore") {
        return None;
    }
    let dockerfile = ["dockerfile", "containerfile"].iter().any(|base| {
        lower == *base
            || lower.ends_with(&format!(".{base}"))
            || lower
                .strip_prefix(&format!("{base}."))
                .and_then(|rest| rest.rsplit('.').next())
                .is_some_and(|ext| !NOT_DOCKERFILE.contains(&ext))
    });
    dockerfile.then_some(Kind::Dockerfile)
}

/// A YAML file named like a compose file with a suffix or prefix joined by `_`, `-` or
/// `.` (`docker-compose_v3_local.yaml`, `compose-dev.yml`, `app.docker-compose.yml`).
fn compose_variant(lower: &str) -> bool {
    let stem = lower
        .strip_suffix(".yml")
        .or_else(|| lower.strip_suffix(".yaml"))
        .unwrap_or(lower);
    ["docker-compose", "compose"].iter().any(|base| {
        stem.strip_prefix(base)
            .is_some_and(|rest| rest.starts_with(['_', '-', '.']))
            || stem
                .strip_suffix(base)
                .is_some_and(|rest| rest.ends_with(['_', '-', '.']))
    })
}

fn is_workflow_dir(path: &Path) -> bool {
    let parent = path.parent();
    let workflows = parent
        .and_then(Path::file_name)
        .is_some_and(|n| n == "workflows");
    let github = parent
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|n| n == ".github");
    workflows && github
}

/// The root of the repository a workflow file belongs to (the parent of `.github`).
pub(crate) fn workflow_root(path: &Path) -> PathBuf {
    path.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A path with `.` removed and `..` folded where it can be, without touching the disk.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                let last = out.components().next_back();
                match last {
                    Some(Component::Normal(_)) => {
                        out.pop();
                    }
                    Some(Component::RootDir | Component::Prefix(_)) => {}
                    _ => out.push(".."),
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// A path as shown in findings: `/`-separated, `.` for the current directory.
pub(crate) fn display(path: &Path) -> String {
    let text = path
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/");
    let text = text.replace("//", "/");
    if text.is_empty() {
        ".".to_owned()
    } else {
        text
    }
}

/// An absolute path under the current directory made relative to it, as the paths the
/// walk finds are when the lint is given relative ones; any other path as it is.
pub(crate) fn relative_to_current_dir(path: &Path) -> PathBuf {
    let Ok(current) = std::env::current_dir() else {
        return path.to_path_buf();
    };
    match path.strip_prefix(&current) {
        Ok(rest) if path.is_absolute() && rest.as_os_str().is_empty() => PathBuf::from("."),
        Ok(rest) if path.is_absolute() => rest.to_path_buf(),
        _ => path.to_path_buf(),
    }
}

/// `dir/relative`, normalised; an absolute `relative` stands alone.
pub(crate) fn resolve(dir: &Path, relative: &str) -> PathBuf {
    normalize(&dir.join(relative))
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
    fn names_are_classified() {
        let kind = |p: &str| classify(Path::new(p));
        assert_eq!(kind("a/Dockerfile"), Some(Kind::Dockerfile));
        assert_eq!(kind("a/api.Dockerfile"), Some(Kind::Dockerfile));
        assert_eq!(kind("a/Dockerfile.prod"), Some(Kind::Dockerfile));
        assert_eq!(kind("a/Dockerfile.dockerignore"), None);
        assert_eq!(kind("frontend/dockerfile.go"), None);
        assert_eq!(kind("docs/Dockerfile.md"), None);
        assert_eq!(kind("Containerfile"), Some(Kind::Dockerfile));
        assert_eq!(kind("Dockerfile.cuda"), Some(Kind::Dockerfile));
        assert_eq!(kind("compose.yaml"), Some(Kind::Compose));
        assert_eq!(kind("docker-compose.override.yml"), Some(Kind::Compose));
        assert_eq!(kind("docker-bake.hcl"), Some(Kind::BakeHcl));
        assert_eq!(kind("docker-bake.json"), Some(Kind::BakeJson));
        assert_eq!(kind("ci/images.hcl"), Some(Kind::MaybeBakeHcl));
        assert_eq!(kind("x/.github/workflows/ci.yml"), Some(Kind::Workflow));
        assert_eq!(kind(".github/workflows/ci.yaml"), Some(Kind::Workflow));
        assert_eq!(kind("config.yml"), None);
        for name in [
            "docker-compose_v3_alpine_mysql_local.yaml",
            "compose_databases.yaml",
            "docker-compose-dev.yml",
            "app.docker-compose.yml",
            "ci-compose.yaml",
        ] {
            assert_eq!(kind(name), Some(Kind::MaybeCompose), "{name}");
        }
        assert_eq!(kind("composer.yml"), None);
        assert_eq!(kind("docker-compose_notes.md"), None);
        assert_eq!(kind("decompose.yml"), None);
    }

    #[test]
    fn paths_are_normalised_lexically() {
        assert_eq!(normalize(Path::new("./a/./b/../c")), PathBuf::from("a/c"));
        assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
        assert_eq!(display(Path::new("")), ".");
        assert_eq!(display(&normalize(Path::new("./a/b"))), "a/b");
        assert_eq!(normalize(Path::new("./")), PathBuf::from("."));
        assert_eq!(
            workflow_root(Path::new(".github/workflows/ci.yml")),
            PathBuf::new()
        );
    }
}
