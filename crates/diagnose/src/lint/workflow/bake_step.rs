//! A bake invocation (`docker/bake-action`, `docker buildx bake`): which targets it
//! builds from which files, with which `set` overrides, and the rules that need all of
//! that: `no-cache-with-export` and `gha-scope-shared` per target.

use std::path::{Path, PathBuf};

use crate::lint::bake::Bake;
use crate::lint::cache::{At, Build, CacheKind, CacheSpec, no_cache_finding};
use crate::lint::expression;
use crate::lint::finding::{Finding, Rule};

use super::shell;

/// One `target.attr=value` override, with its line.
#[derive(Clone, Debug)]
pub(crate) struct Set {
    /// The targets it applies to (`*`, a name, or a glob).
    pub pattern: String,
    /// The attribute (`cache-to`, `no-cache`, `args.NAME`, ...).
    pub attr: String,
    /// The value as written.
    pub value: String,
    /// Its line.
    pub line: usize,
}

impl Set {
    /// Whether it applies to the target `name`.
    fn applies_to(&self, name: &str) -> bool {
        self.pattern == name
            || globset::Glob::new(&self.pattern).is_ok_and(|g| g.compile_matcher().is_match(name))
    }
}

/// A bake invocation.
#[derive(Debug)]
pub(crate) struct BakeStep {
    /// The workflow file, as displayed.
    pub file: String,
    /// `docker/bake-action@REF`, or "`docker buildx bake`".
    pub uses: String,
    /// The bake files it reads (given, or bake's defaults), on disk.
    pub files: Vec<PathBuf>,
    /// The targets or groups it names (none: the default group); `None` when an
    /// expression decides.
    pub targets: Option<Vec<String>>,
    /// Its overrides.
    pub sets: Vec<Set>,
    /// The line of `no-cache: true` (every target), if given.
    pub no_cache: Option<usize>,
}

impl BakeStep {
    /// A step with no files, targets or overrides yet.
    pub fn new(file: &str, uses: &str) -> BakeStep {
        BakeStep {
            file: file.to_owned(),
            uses: uses.to_owned(),
            files: Vec::new(),
            targets: Some(Vec::new()),
            sets: Vec::new(),
            no_cache: None,
        }
    }

    /// Records one `target.attr=value` override, and adds what it imports or exports to
    /// `build`, the step as the cross-file cache rules see it.
    pub fn set(&mut self, build: &mut Build, set: &str, line: usize) {
        let Some(set) = expression::evaluate(set) else {
            // Computed at run time: it may set any cache.
            build.cache_to.push(At {
                value: CacheSpec::parse(set),
                line,
            });
            return;
        };
        let Some((key, value)) = set.split_once('=') else {
            return;
        };
        let Some((pattern, attr)) = key.split_once('.') else {
            return;
        };
        if attr != "no-cache" {
            shell::apply_set(build, &set, line);
        }
        self.sets.push(Set {
            pattern: pattern.trim().to_owned(),
            attr: attr.trim().to_owned(),
            value: value.trim().to_owned(),
            line,
        });
    }

    /// Every rule on this step; `bake_file` reads one of its files (`None` when it is
    /// not there or does not parse).
    pub fn check(&self, bake_file: &dyn Fn(&Path) -> Option<Bake>) -> Vec<Finding> {
        let Some(requested) = &self.targets else {
            return Vec::new();
        };
        let read: Vec<(PathBuf, Bake)> = self
            .files
            .iter()
            .filter_map(|f| bake_file(f).map(|b| (f.clone(), b)))
            .collect();
        let merged = Bake::merge(read.iter().map(|(_, b)| b.clone()));
        let mut built: Vec<(String, Option<&Build>)> = merged
            .built(requested)
            .into_iter()
            .map(|(name, build)| (name.to_owned(), Some(build)))
            .collect();
        if built.is_empty() {
            // The files are not here: the names given are all there is to go on.
            let names = if requested.is_empty() {
                vec!["default".to_owned()]
            } else {
                requested.clone()
            };
            built = names.into_iter().map(|n| (n, None)).collect();
        }
        let mut findings = self.no_cache_with_export(&built);
        findings.extend(self.gha_scope_shared(&built));
        findings
    }

    /// `gha-scope-shared` for an override that sends several targets' caches to one
    /// `type=gha` scope.
    fn gha_scope_shared(&self, built: &[(String, Option<&Build>)]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for set in self.sets.iter().filter(|s| s.attr == "cache-to") {
            let CacheKind::Gha(scope) = CacheSpec::parse(&set.value).kind else {
                continue;
            };
            let targets: Vec<String> = built
                .iter()
                .filter(|(name, _)| set.applies_to(name))
                .map(|(name, _)| format!("`{name}`"))
                .collect();
            if targets.len() < 2 || scope.contains('$') {
                continue;
            }
            findings.push(Finding::new(
                Rule::GhaScopeShared,
                &self.file,
                set.line,
                format!(
                    "{} sends the cache of targets {} to the same type=gha scope `{scope}` \
                     ({}.cache-to): each export replaces the others', so only the target \
                     built last keeps its cache",
                    self.uses,
                    targets.join(", "),
                    set.pattern
                ),
                "set the cache per target instead (TARGET.cache-to=type=gha,scope=TARGET, and \
                 the same scope in cache-from)",
            ));
        }
        findings
    }

    /// `no-cache-with-export` for the whole step (`no-cache: true`) or for the targets a
    /// `T.no-cache=true` override names.
    fn no_cache_with_export(&self, built: &[(String, Option<&Build>)]) -> Vec<Finding> {
        let exports = |name: &str, target: Option<&Build>| -> Vec<String> {
            let mut exports: Vec<String> = self
                .sets
                .iter()
                .filter(|s| s.attr == "cache-to" && s.applies_to(name))
                .map(|s| CacheSpec::parse(&s.value).text)
                .collect();
            exports.extend(
                target
                    .iter()
                    .flat_map(|t| &t.cache_to)
                    .map(|c| c.value.text.clone()),
            );
            exports
        };
        let mut findings = Vec::new();
        if let Some(line) = self.no_cache {
            let all: Vec<String> = built
                .iter()
                .flat_map(|(name, target)| exports(name, *target))
                .collect();
            if !all.is_empty() {
                findings.push(no_cache_finding(
                    &self.file,
                    line,
                    &format!("{} (no-cache: true, every target)", self.uses),
                    &format!("cache ({})", all.join(", ")),
                ));
            }
        }
        for set in self
            .sets
            .iter()
            .filter(|s| s.attr == "no-cache" && s.value == "true")
        {
            for (name, target) in built.iter().filter(|(n, _)| set.applies_to(n)) {
                let exported = exports(name, *target);
                if !exported.is_empty() {
                    findings.push(no_cache_finding(
                        &self.file,
                        set.line,
                        &format!("target `{name}` of {}", self.uses),
                        &format!("cache ({})", exported.join(", ")),
                    ));
                }
            }
        }
        findings
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

    #[test]
    fn overrides_apply_by_name_and_glob() {
        let set = |pattern: &str| Set {
            pattern: pattern.into(),
            attr: "no-cache".into(),
            value: "true".into(),
            line: 1,
        };
        assert!(set("*").applies_to("app"));
        assert!(set("app-*").applies_to("app-web"));
        assert!(set("postgres").applies_to("postgres"));
        assert!(!set("postgres").applies_to("app"));
    }
}
