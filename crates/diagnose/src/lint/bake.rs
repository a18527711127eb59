//! Bake files (`docker-bake.hcl`, `docker-bake.json`, other `*.hcl` with `target`
//! blocks): each target as a [`Build`], with `inherits` followed and `${VAR}` replaced by
//! the variable's default where the file gives one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use hcl_edit::Span;
use hcl_edit::expr::{Expression, ObjectKey};
use hcl_edit::structure::{Block, BlockLabel, Body, Structure};
use hcl_edit::template::Element;

use super::cache::{At, Build, BuildArg, CacheSpec};
use super::files;
use super::yaml::{self, Node};

/// The targets and groups of a bake file (or of a compose file read by bake).
#[derive(Clone, Debug, Default)]
pub(crate) struct Bake {
    /// One build per target.
    pub targets: Vec<Build>,
    /// The name of each target, in the order of `targets`.
    pub names: Vec<String>,
    /// Each group's targets (or groups).
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Bake {
    /// The files one bake invocation reads, as one: targets and groups of the same name
    /// are merged.
    pub fn merge(files: impl IntoIterator<Item = Bake>) -> Bake {
        let mut merged = Bake::default();
        for bake in files {
            merged.targets.extend(bake.targets);
            merged.names.extend(bake.names);
            for (group, members) in bake.groups {
                merged.groups.entry(group).or_default().extend(members);
            }
        }
        merged
    }

    /// The targets `requested` builds (names of targets or groups; none means the
    /// `default` group, else a `default` target, else every target, as compose files
    /// have it). Unknown names build nothing.
    pub fn built(&self, requested: &[String]) -> Vec<(&str, &Build)> {
        let mut pending: Vec<String> = if !requested.is_empty() {
            requested.to_vec()
        } else if self.groups.contains_key("default") || self.names.iter().any(|n| n == "default") {
            vec!["default".to_owned()]
        } else {
            self.names.clone()
        };
        let mut seen: Vec<String> = Vec::new();
        let mut built = Vec::new();
        while let Some(name) = pending.pop() {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name.clone());
            if let Some(members) = self.groups.get(&name) {
                pending.extend(members.iter().cloned());
                continue;
            }
            built.extend(
                self.names
                    .iter()
                    .zip(&self.targets)
                    .filter(|(n, _)| **n == name)
                    .map(|(n, t)| (n.as_str(), t)),
            );
        }
        built.sort_by_key(|(name, _)| *name);
        built
    }
}

/// A syntax error, with its line.
#[derive(Debug)]
pub(crate) struct BakeError {
    /// The line (1-based).
    pub line: usize,
    /// The parser's message.
    pub message: String,
}

/// An attribute value, reduced to what the checks read.
#[derive(Clone, Debug)]
enum Val {
    Str(String),
    Bool(bool),
    List(Vec<At<Val>>),
    Obj(Vec<(String, Val)>),
    Other(String),
}

impl Val {
    fn text(&self) -> Option<String> {
        match self {
            Val::Str(s) | Val::Other(s) => Some(s.clone()),
            Val::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// A target's attributes (after inheritance) and where it starts.
#[derive(Clone, Debug, Default)]
struct Target {
    line: usize,
    attrs: Vec<(String, At<Val>)>,
}

impl Target {
    fn get(&self, key: &str) -> Option<&At<Val>> {
        self.attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Parses an HCL bake file.
pub(crate) fn read_hcl(file: &str, path: &Path, text: &str) -> Result<Bake, BakeError> {
    let body = hcl_edit::parser::parse_body(text).map_err(|e| BakeError {
        line: e.location().line(),
        message: e.message().to_owned(),
    })?;
    let lines = LineIndex::new(text);
    let mut vars = BTreeMap::new();
    for block in blocks(&body, "variable") {
        if let Some(name) = label(block)
            && let Some(default) = block.body.get_attribute("default")
            && let Some(value) = hcl_value(&default.value, text, &lines, &vars).text()
        {
            vars.insert(name, value);
        }
    }
    let mut groups = BTreeMap::new();
    for block in blocks(&body, "group") {
        if let Some(name) = label(block)
            && let Some(members) = block.body.get_attribute("targets")
            && let Val::List(items) = hcl_value(&members.value, text, &lines, &vars)
        {
            let members = items.iter().filter_map(|i| i.value.text()).collect();
            groups.insert(name, members);
        }
    }
    let mut targets = Vec::new();
    for block in blocks(&body, "target") {
        let Some(name) = label(block) else {
            continue;
        };
        let mut target = Target {
            line: block.span().map(|s| lines.line(s.start)).unwrap_or(1),
            attrs: Vec::new(),
        };
        for attr in block.body.attributes() {
            let line = attr
                .span()
                .map(|s| lines.line(s.start))
                .unwrap_or(target.line);
            target.attrs.push((
                attr.key.as_str().to_owned(),
                At {
                    value: hcl_value(&attr.value, text, &lines, &vars),
                    line,
                },
            ));
        }
        targets.push((name, target));
    }
    Ok(bake(file, path, targets, groups))
}

/// Parses a JSON bake file.
pub(crate) fn read_json(file: &str, path: &Path, text: &str) -> Result<Bake, BakeError> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
        return Err(BakeError {
            line: e.line(),
            message: e.to_string(),
        });
    }
    let root = yaml::parse(text).map_err(|e| BakeError {
        line: e.line,
        message: e.message,
    })?;
    let mut vars = BTreeMap::new();
    for var in root.get("variable").map(Node::entries).unwrap_or(&[]) {
        if let Some(default) = var.value.get("default").and_then(Node::text) {
            vars.insert(var.key.clone(), default.to_owned());
        }
    }
    let mut targets = Vec::new();
    for entry in root.get("target").map(Node::entries).unwrap_or(&[]) {
        let mut target = Target {
            line: entry.line,
            attrs: Vec::new(),
        };
        for attr in entry.value.entries() {
            target.attrs.push((
                attr.key.clone(),
                At {
                    value: json_value(&attr.value, &vars),
                    line: attr.line,
                },
            ));
        }
        targets.push((entry.key.clone(), target));
    }
    let groups = root
        .get("group")
        .map(Node::entries)
        .unwrap_or(&[])
        .iter()
        .map(|group| {
            let members = group
                .value
                .get("targets")
                .map(Node::items)
                .unwrap_or(&[])
                .iter()
                .filter_map(|m| m.text().map(|t| substitute(t, &vars)))
                .collect();
            (group.key.clone(), members)
        })
        .collect();
    Ok(bake(file, path, targets, groups))
}

/// Whether an `*.hcl` file is a bake file: it has `target` or `group` blocks.
pub(crate) fn looks_like_bake(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start();
        (l.starts_with("target ") || l.starts_with("group ")) && l.contains('"')
    })
}

fn blocks<'a>(body: &'a Body, ident: &'a str) -> impl Iterator<Item = &'a Block> {
    body.iter().filter_map(move |s| match s {
        Structure::Block(b) if b.ident.as_str() == ident => Some(b),
        _ => None,
    })
}

fn label(block: &Block) -> Option<String> {
    block.labels.first().map(|l| match l {
        BlockLabel::Ident(i) => i.as_str().to_owned(),
        BlockLabel::String(s) => s.value().clone(),
    })
}

fn hcl_value(
    expr: &Expression,
    text: &str,
    lines: &LineIndex,
    vars: &BTreeMap<String, String>,
) -> Val {
    let source = || {
        expr.span()
            .and_then(|s| text.get(s))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    match expr {
        Expression::String(s) => Val::Str(substitute(s.value(), vars)),
        Expression::Bool(b) => Val::Bool(*b.value()),
        Expression::StringTemplate(template) => {
            let mut out = String::new();
            for element in template.iter() {
                match element {
                    Element::Literal(l) => out.push_str(l.value()),
                    Element::Interpolation(i) => match &i.expr {
                        Expression::Variable(v) if vars.contains_key(v.as_str()) => {
                            out.push_str(vars.get(v.as_str()).map(String::as_str).unwrap_or(""))
                        }
                        inner => {
                            let shown =
                                inner.span().and_then(|s| text.get(s)).unwrap_or("?").trim();
                            out.push_str(&format!("${{{shown}}}"));
                        }
                    },
                    Element::Directive(_) => out.push_str("${?}"),
                }
            }
            Val::Str(out)
        }
        Expression::Variable(v) => match vars.get(v.as_str()) {
            Some(value) => Val::Str(value.clone()),
            None => Val::Other(format!("${{{}}}", v.as_str())),
        },
        Expression::Array(array) => Val::List(
            array
                .iter()
                .map(|item| At {
                    value: hcl_value(item, text, lines, vars),
                    line: item.span().map(|s| lines.line(s.start)).unwrap_or(1),
                })
                .collect(),
        ),
        Expression::Object(object) => Val::Obj(
            object
                .iter()
                .filter_map(|(key, value)| {
                    let key = match key {
                        ObjectKey::Ident(i) => i.as_str().to_owned(),
                        ObjectKey::Expression(Expression::String(s)) => s.value().clone(),
                        ObjectKey::Expression(_) => return None,
                    };
                    Some((key, hcl_value(value.expr(), text, lines, vars)))
                })
                .collect(),
        ),
        Expression::Parenthesis(p) => hcl_value(p.inner(), text, lines, vars),
        _ => Val::Other(format!("${{{}}}", source())),
    }
}

fn json_value(node: &Node, vars: &BTreeMap<String, String>) -> Val {
    match &node.value {
        yaml::Value::Null => Val::Other(String::new()),
        yaml::Value::Scalar { text, .. } => match text.as_str() {
            "true" => Val::Bool(true),
            "false" => Val::Bool(false),
            _ => Val::Str(substitute(text, vars)),
        },
        yaml::Value::Seq(items) => Val::List(
            items
                .iter()
                .map(|item| At {
                    value: json_value(item, vars),
                    line: item.line,
                })
                .collect(),
        ),
        yaml::Value::Map(entries) => Val::Obj(
            entries
                .iter()
                .map(|e| (e.key.clone(), json_value(&e.value, vars)))
                .collect(),
        ),
    }
}

/// `${NAME}` replaced by the variable's default, where known.
fn substitute(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    out
}

/// Follows `inherits` and turns targets into builds.
fn bake(
    file: &str,
    path: &Path,
    targets: Vec<(String, Target)>,
    groups: BTreeMap<String, Vec<String>>,
) -> Bake {
    let dir = path.parent().unwrap_or(Path::new(""));
    let by_name: HashMap<&str, &Target> = targets.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let inherited: Vec<String> = targets.iter().flat_map(|(_, t)| parents(t)).collect();
    let builds = targets
        .iter()
        .map(|(name, target)| {
            let resolved = inherit(target, &by_name, 0);
            let mut build = build(file, dir, name, &resolved);
            build.template = inherited.contains(name);
            build
        })
        .collect();
    Bake {
        targets: builds,
        names: targets.iter().map(|(name, _)| name.clone()).collect(),
        groups,
    }
}

/// The targets `inherits` names.
fn parents(target: &Target) -> Vec<String> {
    match target.get("inherits").map(|a| &a.value) {
        Some(Val::List(items)) => items.iter().filter_map(|i| i.value.text()).collect(),
        Some(other) => other.text().into_iter().collect(),
        None => Vec::new(),
    }
}

fn inherit(target: &Target, by_name: &HashMap<&str, &Target>, depth: usize) -> Target {
    let mut resolved = target.clone();
    if depth > 16 {
        return resolved;
    }
    for parent in parents(target).iter().rev() {
        let Some(parent) = by_name.get(parent.as_str()) else {
            continue;
        };
        let parent = inherit(parent, by_name, depth + 1);
        for (key, value) in parent.attrs {
            if resolved.get(&key).is_none() {
                resolved.attrs.push((key, value));
            }
        }
    }
    resolved
}

fn build(file: &str, dir: &Path, name: &str, target: &Target) -> Build {
    let mut build = Build {
        file: file.to_owned(),
        line: target.line,
        what: format!("bake target `{name}`"),
        ..Build::default()
    };
    build.target = target.get("target").and_then(|t| t.value.text());
    build.cache_from = cache_specs(target.get("cache-from"));
    build.cache_to = cache_specs(target.get("cache-to"));
    if let Some(no_cache) = target.get("no-cache")
        && matches!(no_cache.value, Val::Bool(true))
    {
        build.no_cache = Some(no_cache.line);
    }
    if let Some(args) = target.get("args")
        && let Val::Obj(pairs) = &args.value
    {
        build.build_args = pairs
            .iter()
            .map(|(k, v)| BuildArg {
                name: k.clone(),
                value: v.text().unwrap_or_default(),
                line: args.line,
            })
            .collect();
    }
    if let Some(At {
        value: Val::List(tags),
        ..
    }) = target.get("tags")
    {
        build.tags = tags.iter().filter_map(|t| t.value.text()).collect();
    }
    let context = target
        .get("context")
        .and_then(|c| c.value.text())
        .unwrap_or_else(|| ".".to_owned());
    if !context.contains("://") && !context.starts_with("git@") && !context.starts_with("${") {
        let context_dir = files::resolve(dir, &context);
        let dockerfile = target
            .get("dockerfile")
            .and_then(|d| d.value.text())
            .unwrap_or_else(|| "Dockerfile".to_owned());
        build.dockerfile = Some(files::resolve(&context_dir, &dockerfile));
        build.context = Some(context_dir);
    }
    build
}

/// `cache-from = ["type=registry,ref=r", {type = "gha"}]`, each with its line.
fn cache_specs(attr: Option<&At<Val>>) -> Vec<At<CacheSpec>> {
    let Some(attr) = attr else {
        return Vec::new();
    };
    let items = match &attr.value {
        Val::List(items) => items.clone(),
        other => vec![At {
            value: other.clone(),
            line: attr.line,
        }],
    };
    items
        .into_iter()
        .filter_map(|item| {
            let spec = match &item.value {
                Val::Str(s) | Val::Other(s) => CacheSpec::parse(s),
                Val::Obj(pairs) => {
                    let pairs: Vec<(String, String)> = pairs
                        .iter()
                        .filter_map(|(k, v)| v.text().map(|t| (k.clone(), t)))
                        .collect();
                    CacheSpec::from_pairs(&pairs)
                }
                _ => return None,
            };
            Some(At {
                value: spec,
                line: item.line,
            })
        })
        .collect()
}

/// Byte offsets to 1-based lines.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    fn line(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
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

    #[test]
    fn hcl_targets_with_variables_inheritance_and_object_caches() {
        let text = r#"variable "REG" {
  default = "ghcr.io/o"
}

target "base" {
  cache-from = ["type=registry,ref=${REG}/app:cache"]
}

target "app" {
  inherits = ["base"]
  cache-to = [
    {type = "registry", ref = "${REG}/app:cache", mode = "max"},
  ]
  no-cache = true
  args = { GIT_SHA = "${SHA}" }
}
"#;
        let bake = read_hcl("docker-bake.hcl", Path::new("docker-bake.hcl"), text).unwrap();
        let app = &bake.targets[1];
        assert_eq!(app.line, 9);
        assert_eq!(app.cache_from[0].line, 6);
        assert_eq!(
            app.cache_from[0].value.kind,
            CacheKind::Registry("ghcr.io/o/app:cache".into())
        );
        assert_eq!(app.cache_to[0].line, 12);
        assert_eq!(app.cache_to[0].value.attr("mode"), Some("max"));
        assert_eq!(app.no_cache, Some(14));
        assert_eq!(app.build_args[0].value, "${SHA}");
    }

    #[test]
    fn broken_hcl_and_json_report_their_line() {
        let err = read_hcl("b.hcl", Path::new("b.hcl"), "target \"a\" {\n  x = [\n}\n")
            .err()
            .unwrap();
        assert!(err.line >= 2, "{}", err.line);
        let err = read_json(
            "b.json",
            Path::new("b.json"),
            "{\n \"target\": {\n  \"a\": {,}\n}}\n",
        )
        .err()
        .unwrap();
        assert_eq!(err.line, 3);
    }

    #[test]
    fn json_targets() {
        let text = "{\n  \"variable\": {\"TAG\": {\"default\": \"main\"}},\n  \"target\": {\n    \"app\": {\n      \"cache-to\": [\"type=gha,mode=max\"],\n      \"tags\": [\"app:${TAG}\"]\n    }\n  }\n}\n";
        let bake = read_json("docker-bake.json", Path::new("docker-bake.json"), text).unwrap();
        assert_eq!(bake.targets[0].cache_to[0].line, 5);
        assert_eq!(bake.targets[0].tags, vec!["app:main".to_owned()]);
    }
}
