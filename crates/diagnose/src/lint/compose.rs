//! Compose files: each service's `build:` as a [`Build`], and `compose-xbake-dropped`
//! (cache settings under `build.x-bake`, which compose's own bake path drops).

use std::collections::BTreeMap;
use std::path::Path;

use super::bake::Bake;
use super::cache::{At, Build, BuildArg, CacheSpec};
use super::files;
use super::finding::{Finding, Rule};
use super::yaml::Node;

/// What a compose file holds for the lint.
pub(crate) struct Compose {
    /// One build per service that has a `build:` section.
    pub builds: Vec<Build>,
    /// The name of each of those services, in the order of `builds`.
    pub services: Vec<String>,
    /// `compose-xbake-dropped` findings.
    pub findings: Vec<Finding>,
}

/// Reads the services of a parsed compose file at `path` (shown as `file`).
pub(crate) fn read(file: &str, path: &Path, root: &Node) -> Compose {
    let dir = path.parent().unwrap_or(Path::new(""));
    let env = dotenv(dir);
    let interpolate = |text: &str| interpolate(text, &env);
    let mut compose = Compose {
        builds: Vec::new(),
        services: Vec::new(),
        findings: Vec::new(),
    };
    let Some(services) = root.get("services") else {
        return compose;
    };
    for service in services.entries() {
        let Some(build_node) = service.value.get("build") else {
            continue;
        };
        let mut build = Build {
            file: file.to_owned(),
            line: service.line,
            what: format!("compose service `{}`", service.key),
            ..Build::default()
        };
        if let Some(image) = service.value.get("image").and_then(Node::text) {
            build.tags.push(interpolate(image));
        }
        let context = match build_node.text() {
            Some(context) => Some(interpolate(context)),
            None => build_node
                .get("context")
                .and_then(Node::text)
                .map(&interpolate),
        };
        let context = context.unwrap_or_else(|| ".".to_owned());
        if !is_remote(&context) {
            let context_dir = files::resolve(dir, &context);
            let dockerfile = build_node
                .get("dockerfile")
                .and_then(Node::text)
                .map(&interpolate)
                .unwrap_or_else(|| "Dockerfile".to_owned());
            build.dockerfile = Some(files::resolve(&context_dir, &dockerfile));
            build.context = Some(context_dir);
        }
        build.cache_from = specs(build_node.get("cache_from"), &env);
        build.cache_to = specs(build_node.get("cache_to"), &env);
        if let Some(no_cache) = build_node.entry("no_cache")
            && no_cache.value.is_true()
        {
            build.no_cache = Some(no_cache.line);
        }
        build.build_args = args(build_node.get("args"), &env);
        for tag in build_node.get("tags").map(Node::items).unwrap_or(&[]) {
            if let Some(tag) = tag.text() {
                build.tags.push(interpolate(tag));
            }
        }
        if let Some(xbake) = build_node.get("x-bake") {
            compose
                .findings
                .extend(xbake_dropped(file, &service.key, xbake, &build, &env));
            // `docker buildx bake -f compose.yaml` does honour them: keep them in the
            // picture of what is read and written.
            let dropped = |node| {
                specs(node, &env).into_iter().map(|mut spec| {
                    spec.value.dropped = true;
                    spec
                })
            };
            let from: Vec<_> = dropped(xbake.get("cache-from")).collect();
            let to: Vec<_> = dropped(xbake.get("cache-to")).collect();
            build.cache_from.extend(from);
            build.cache_to.extend(to);
        }
        compose.builds.push(build);
        compose.services.push(service.key.clone());
    }
    compose
}

impl Compose {
    /// The file as bake reads it: one target per service, all of them by default.
    pub fn as_bake(&self) -> Bake {
        Bake {
            targets: self.builds.clone(),
            names: self.services.clone(),
            groups: Default::default(),
        }
    }
}

fn xbake_dropped(
    file: &str,
    service: &str,
    xbake: &Node,
    build: &Build,
    env: &BTreeMap<String, String>,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (key, own) in [("cache-from", "cache_from"), ("cache-to", "cache_to")] {
        let Some(entry) = xbake.entry(key) else {
            continue;
        };
        let kept = if key == "cache-from" {
            &build.cache_from
        } else {
            &build.cache_to
        };
        let dropped: Vec<String> = specs(Some(&entry.value), env)
            .into_iter()
            .filter(|spec| !kept.iter().any(|k| k.value.text == spec.value.text))
            .map(|spec| spec.value.text)
            .collect();
        if dropped.is_empty() {
            continue;
        }
        findings.push(Finding::new(
            Rule::ComposeXbakeDropped,
            file,
            entry.line,
            format!(
                "service `{service}` sets {key} under build.x-bake ({}): docker compose's bake \
                 path (COMPOSE_BAKE=true, the default in recent compose) drops x-bake, so \
                 this cache is silently never {}",
                dropped.join(", "),
                if key == "cache-from" {
                    "read"
                } else {
                    "written"
                }
            ),
            format!("move it to build.{own} of service `{service}`"),
        ));
    }
    findings
}

/// A list (or a single string) of cache specs, each with its line.
fn specs(node: Option<&Node>, env: &BTreeMap<String, String>) -> Vec<At<CacheSpec>> {
    let Some(node) = node else {
        return Vec::new();
    };
    if let Some(text) = node.text() {
        return vec![At {
            value: CacheSpec::parse(&interpolate(text, env)),
            line: node.line,
        }];
    }
    node.items()
        .iter()
        .filter_map(|item| {
            item.text().map(|text| At {
                value: CacheSpec::parse(&interpolate(text, env)),
                line: item.line,
            })
        })
        .collect()
}

/// `args:` as a mapping or as a list of `NAME=VALUE`.
fn args(node: Option<&Node>, env: &BTreeMap<String, String>) -> Vec<BuildArg> {
    let Some(node) = node else {
        return Vec::new();
    };
    let mut args: Vec<BuildArg> = node
        .entries()
        .iter()
        .map(|e| BuildArg {
            name: e.key.clone(),
            value: e
                .value
                .text()
                .map(|t| interpolate(t, env))
                .unwrap_or_default(),
            line: e.line,
        })
        .collect();
    args.extend(node.items().iter().filter_map(|item| {
        let (name, value) = item.text()?.split_once('=')?;
        Some(BuildArg {
            name: name.trim().to_owned(),
            value: interpolate(value, env),
            line: item.line,
        })
    }));
    args
}

fn is_remote(context: &str) -> bool {
    context.contains("://") || context.starts_with("git@") || context.ends_with(".git")
}

/// The variables of the `.env` file beside a compose file (`NAME=VALUE` lines), which
/// compose interpolates the file with unless the shell sets them.
fn dotenv(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join(".env")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (name, value) = line.split_once('=')?;
            let name = name.trim();
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            valid.then(|| (name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Compose interpolation where the files say what the value is: a variable the `.env`
/// file sets (`env`) becomes its value; otherwise `${VAR:-default}` and `${VAR-default}`
/// become the default, `$$` a `$`, and other variables stay as written.
fn interpolate(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(rest.get(..at).unwrap_or(""));
        let tail = rest.get(at..).unwrap_or("");
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        if let Some(inner) = tail.strip_prefix("${")
            && let Some(end) = inner.find('}')
        {
            let body = inner.get(..end).unwrap_or("");
            let name_end = body
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(body.len());
            if let Some(value) = body.get(..name_end).and_then(|name| env.get(name)) {
                out.push_str(value);
                rest = inner.get(end + 1..).unwrap_or("");
                continue;
            }
            let default = if body.contains('?') {
                None
            } else {
                body.split_once(":-")
                    .or_else(|| body.split_once('-'))
                    .map(|(_, d)| d)
            };
            match default {
                Some(default) => out.push_str(default),
                None => {
                    out.push_str("${");
                    out.push_str(body);
                    out.push('}');
                }
            }
            rest = inner.get(end + 1..).unwrap_or("");
            continue;
        }
        let name = tail
            .get(1..)
            .unwrap_or("")
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        match env.get(name).filter(|_| !name.is_empty()) {
            Some(value) => {
                out.push_str(value);
                rest = tail.get(1 + name.len()..).unwrap_or("");
            }
            None => {
                out.push('$');
                rest = tail.get(1..).unwrap_or("");
            }
        }
    }
    out.push_str(rest);
    out
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
    fn interpolation_uses_defaults_the_file_gives() {
        let none = BTreeMap::new();
        assert_eq!(
            interpolate("${REG:-ghcr.io/o}/app:${TAG-main}", &none),
            "ghcr.io/o/app:main"
        );
        assert_eq!(interpolate("${REG}/app", &none), "${REG}/app");
        assert_eq!(interpolate("a$$b", &none), "a$b");
        let env = BTreeMap::from([("CACHE".to_owned(), "alpine:3.20".to_owned())]);
        assert_eq!(interpolate("${CACHE}", &env), "alpine:3.20");
        assert_eq!(interpolate("$CACHE", &env), "alpine:3.20");
        assert_eq!(interpolate("${CACHE:-x}", &env), "alpine:3.20");
        assert_eq!(interpolate("${OTHER}/$OTHER", &env), "${OTHER}/$OTHER");
    }
}
