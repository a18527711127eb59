//! Which files to lint: a walk of the given directories (skipping `.git`, `target` and
//! `node_modules`) that picks Dockerfiles, compose files, bake files and GitHub workflow
//! files by name.

use std::path::{Component, Path, PathBuf};

/// What a file is, judged by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `Dockerfile`, `*.Dockerfile`, `Dockerfile.*`.
    Dockerfile,
    /// `compose.yaml`, `docker-compose.yml`, and their `.override`/`.*` variants.
    Compose,
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

/// Directories never walked into.
const SKIPPED: [&str; 3] = [".git", "target", "node_modules"];

/// The files a walk found, and the paths it could not read.
#[derive(Debug, Default)]
pub(crate) struct Discovered {
    /// Files to lint with their kind, sorted.
    pub files: Vec<(PathBuf, Kind)>,
    /// Paths that could not be read, with why.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The files to lint under `paths` (a file given directly is always taken).
pub(crate) fn discover(paths: &[PathBuf]) -> Discovered {
    let mut found = Discovered::default();
    for path in paths {
        let path = normalize(path);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, &mut found),
            Ok(_) => {
                let kind = classify(&path).unwrap_or(Kind::Unknown);
                found.files.push((path, kind));
            }
            Err(error) => found.unreadable.push((path, error.to_string())),
        }
    }
    found.files.sort_by(|a, b| a.0.cmp(&b.0));
    found.files.dedup_by(|a, b| a.0 == b.0);
    found
}

fn walk(dir: &Path, found: &mut Discovered) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            found
                .unreadable
                .push((dir.to_path_buf(), error.to_string()));
            return;
        }
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = normalize(&dir.join(entry.file_name()));
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            let name = entry.file_name();
            if !SKIPPED.iter().any(|s| name == *s) {
                walk(&path, found);
            }
        } else if (file_type.is_file() || path.is_file())
            && let Some(kind) = classify(&path)
        {
            found.files.push((path, kind));
        }
    }
}

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
    if lower == "dockerfile" || lower.ends_with(".dockerfile") || lower.starts_with("dockerfile.") {
        return Some(Kind::Dockerfile);
    }
    None
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
        assert_eq!(kind("compose.yaml"), Some(Kind::Compose));
        assert_eq!(kind("docker-compose.override.yml"), Some(Kind::Compose));
        assert_eq!(kind("docker-bake.hcl"), Some(Kind::BakeHcl));
        assert_eq!(kind("docker-bake.json"), Some(Kind::BakeJson));
        assert_eq!(kind("ci/images.hcl"), Some(Kind::MaybeBakeHcl));
        assert_eq!(kind("x/.github/workflows/ci.yml"), Some(Kind::Workflow));
        assert_eq!(kind(".github/workflows/ci.yaml"), Some(Kind::Workflow));
        assert_eq!(kind("config.yml"), None);
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
