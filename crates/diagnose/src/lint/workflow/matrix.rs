//! `matrix-too-large`: how many jobs a `strategy.matrix` expands to, the way GitHub
//! Actions counts them: the cartesian product of the axes, minus the combinations an
//! `exclude` entry matches, plus each `include` entry that extends no combination.
//! Axes given by an expression make the size unknown (no finding), except
//! `${{ fromJSON(inputs.NAME) }}`, which takes the input's default or a caller's value.

use std::collections::BTreeMap;

use crate::lint::finding::{Finding, Rule};
use crate::lint::yaml::{self, Entry, Node, Value};

/// The most jobs one matrix may expand to.
pub(crate) const MAX_JOBS: u128 = 256;

/// Beyond this many combinations, excludes are not applied one by one.
const ENUMERATION_LIMIT: u128 = 100_000;

/// How big a matrix is.
#[derive(Debug, PartialEq)]
pub(crate) enum Size {
    /// Exactly this many jobs, with the axis lengths.
    Known {
        jobs: u128,
        axes: Vec<(String, usize)>,
    },
    /// An expression decides.
    Unknown,
}

/// Counts the jobs of a `matrix:` node.
pub(crate) fn size(matrix: &Node) -> Size {
    if !matrix.is_map() {
        return Size::Unknown;
    }
    let mut axes: Vec<(&str, &[Node])> = Vec::new();
    for entry in matrix.entries() {
        if entry.key == "include" || entry.key == "exclude" {
            if !entry.value.is_seq() && entry.value.value != Value::Null {
                return Size::Unknown;
            }
            continue;
        }
        if !entry.value.is_seq() {
            return Size::Unknown;
        }
        if entry.value.items().iter().any(is_expression) && entry.value.items().len() == 1 {
            return Size::Unknown;
        }
        axes.push((entry.key.as_str(), entry.value.items()));
    }
    let product = axes.iter().fold(1u128, |acc, (_, items)| {
        acc.saturating_mul(items.len() as u128)
    });
    let product = if axes.is_empty() { 0 } else { product };
    let excludes: Vec<&Node> = matrix
        .get("exclude")
        .map(Node::items)
        .unwrap_or(&[])
        .iter()
        .collect();
    let includes: Vec<&Node> = matrix
        .get("include")
        .map(Node::items)
        .unwrap_or(&[])
        .iter()
        .collect();
    let combinations: Vec<Vec<usize>> = if axes.is_empty() {
        Vec::new()
    } else if product <= ENUMERATION_LIMIT {
        enumerate(&axes)
            .into_iter()
            .filter(|combo| !excludes.iter().any(|e| matches(&axes, combo, e)))
            .collect()
    } else {
        Vec::new()
    };
    let kept = if product <= ENUMERATION_LIMIT {
        combinations.len() as u128
    } else {
        product
    };
    let added = includes
        .iter()
        .filter(|include| {
            if product > ENUMERATION_LIMIT {
                return false;
            }
            !combinations
                .iter()
                .any(|combo| extends(&axes, combo, include))
        })
        .count() as u128;
    Size::Known {
        jobs: kept + added,
        axes: axes
            .iter()
            .map(|(name, items)| ((*name).to_owned(), items.len()))
            .collect(),
    }
}

fn is_expression(node: &Node) -> bool {
    node.text().is_some_and(|t| t.contains("${{"))
}

fn enumerate(axes: &[(&str, &[Node])]) -> Vec<Vec<usize>> {
    let mut combos: Vec<Vec<usize>> = vec![Vec::new()];
    for (_, items) in axes {
        let mut next = Vec::with_capacity(combos.len() * items.len());
        for combo in &combos {
            for index in 0..items.len() {
                let mut c = combo.clone();
                c.push(index);
                next.push(c);
            }
        }
        combos = next;
    }
    combos
}

/// The value of axis `key` in a combination.
fn value_of<'a>(axes: &[(&str, &'a [Node])], combo: &[usize], key: &str) -> Option<&'a Node> {
    let position = axes.iter().position(|(name, _)| *name == key)?;
    let (_, items) = axes.get(position)?;
    items.get(*combo.get(position)?)
}

/// Whether an `exclude` entry matches a combination (every key it names is an axis with
/// that value).
fn matches(axes: &[(&str, &[Node])], combo: &[usize], exclude: &Node) -> bool {
    exclude
        .entries()
        .iter()
        .all(|Entry { key, value, .. }| value_of(axes, combo, key).is_some_and(|v| same(v, value)))
}

/// Whether an `include` entry can be added to a combination: it overwrites none of the
/// combination's original values.
fn extends(axes: &[(&str, &[Node])], combo: &[usize], include: &Node) -> bool {
    include.entries().iter().all(
        |Entry { key, value, .. }| match value_of(axes, combo, key) {
            Some(v) => same(v, value),
            None => true,
        },
    )
}

/// Structural equality, ignoring lines.
fn same(a: &Node, b: &Node) -> bool {
    match (&a.value, &b.value) {
        (Value::Null, Value::Null) => true,
        (Value::Scalar { text: x, .. }, Value::Scalar { text: y, .. }) => x == y,
        (Value::Seq(x), Value::Seq(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|e| y.iter().any(|f| f.key == e.key && same(&f.value, &e.value)))
        }
        _ => false,
    }
}

/// The matrix with each `${{ fromJSON(inputs.NAME) }}` replaced by that input's value
/// (its default, or what a caller passes), where the value is JSON.
pub(crate) fn with_inputs(matrix: &Node, inputs: &BTreeMap<String, String>) -> Node {
    let value = match &matrix.value {
        Value::Scalar { text, .. } => {
            let resolved = input_name(text)
                .and_then(|name| inputs.get(name))
                .and_then(|json| yaml::parse(json).ok());
            match resolved {
                Some(node) => relined(node.value, matrix.line),
                None => matrix.value.clone(),
            }
        }
        Value::Seq(items) => Value::Seq(items.iter().map(|i| with_inputs(i, inputs)).collect()),
        Value::Map(entries) => Value::Map(
            entries
                .iter()
                .map(|e| Entry {
                    key: e.key.clone(),
                    line: e.line,
                    value: with_inputs(&e.value, inputs),
                })
                .collect(),
        ),
        Value::Null => Value::Null,
    };
    Node {
        line: matrix.line,
        value,
    }
}

/// `NAME` of `${{ fromJSON(inputs.NAME) }}` (any case and spacing).
fn input_name(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("${{")?.strip_suffix("}}")?.trim();
    let (function, rest) = inner.split_once('(')?;
    if !function.trim().eq_ignore_ascii_case("fromjson") {
        return None;
    }
    let argument = rest.strip_suffix(')')?.trim();
    let name = argument.strip_prefix("inputs.")?;
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        .then_some(name)
}

/// A value parsed elsewhere, placed on `line`.
fn relined(value: Value, line: usize) -> Value {
    let node = |value| Node { line, value };
    match value {
        Value::Seq(items) => Value::Seq(
            items
                .into_iter()
                .map(|i| node(relined(i.value, line)))
                .collect(),
        ),
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|e| Entry {
                    key: e.key,
                    line,
                    value: node(relined(e.value.value, line)),
                })
                .collect(),
        ),
        other => other,
    }
}

/// `matrix-too-large` for one job's `matrix:` entry; `source` says where values of
/// inputs came from, when any did.
pub(crate) fn check(
    file: &str,
    job: &str,
    matrix: &Entry,
    source: Option<&str>,
) -> Option<Finding> {
    let Size::Known { jobs, axes } = size(&matrix.value) else {
        return None;
    };
    if jobs <= MAX_JOBS {
        return None;
    }
    let mut shape = axes
        .iter()
        .map(|(name, n)| format!("{n} {name}"))
        .collect::<Vec<_>>()
        .join(" × ");
    let adjusted: Vec<&str> = ["exclude", "include"]
        .into_iter()
        .filter(|key| matrix.value.get(key).is_some())
        .collect();
    if !adjusted.is_empty() {
        shape.push_str(&format!(", with {}", adjusted.join(" and ")));
    }
    if let Some(source) = source {
        shape.push_str(&format!(", with the inputs{source}"));
    }
    Some(Finding::new(
        Rule::MatrixTooLarge,
        file,
        matrix.line,
        format!(
            "the matrix of job `{job}` expands to {jobs} jobs ({shape}); GitHub Actions runs \
             at most {MAX_JOBS} jobs per matrix and the rest never run"
        ),
        format!(
            "split it into several jobs or workflows (for example one per value of an axis) or \
             exclude combinations, so that each matrix has at most {MAX_JOBS} jobs"
        ),
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
    use crate::lint::yaml::parse;

    fn jobs(text: &str) -> Size {
        let doc = parse(text).unwrap();
        size(doc.get("matrix").unwrap())
    }

    fn count(text: &str) -> u128 {
        match jobs(text) {
            Size::Known { jobs, .. } => jobs,
            Size::Unknown => panic!("unknown"),
        }
    }

    #[test]
    fn github_documentation_examples() {
        // 3 x 2 = 6 jobs.
        assert_eq!(
            count("matrix:\n  version: [10, 12, 14]\n  os: [ubuntu, windows]\n"),
            6
        );
        // exclude removes one (a partial match removes every combination it matches).
        assert_eq!(
            count(
                "matrix:\n  os: [macos, windows]\n  version: [12, 14, 16]\n  environment: [staging, production]\n  exclude:\n    - os: macos\n      version: 12\n      environment: production\n    - os: windows\n      version: 16\n"
            ),
            12 - 1 - 2
        );
        // include entries that extend combinations add no job; the others add one each.
        assert_eq!(
            count(
                "matrix:\n  fruit: [apple, pear]\n  animal: [cat, dog]\n  include:\n    - color: green\n    - color: pink\n      animal: cat\n    - fruit: apple\n      shape: circle\n    - fruit: banana\n    - fruit: banana\n      animal: cat\n"
            ),
            6
        );
        // include only.
        assert_eq!(count("matrix:\n  include:\n    - a: 1\n    - a: 2\n"), 2);
    }

    #[test]
    fn expressions_make_the_size_unknown() {
        assert_eq!(
            jobs("matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}\n"),
            Size::Unknown
        );
        assert_eq!(
            jobs("matrix:\n  os: ${{ fromJSON(inputs.os) }}\n  v: [1, 2]\n"),
            Size::Unknown
        );
        assert_eq!(
            jobs("matrix:\n  os: [a]\n  include: ${{ fromJSON(inputs.extra) }}\n"),
            Size::Unknown
        );
    }

    #[test]
    fn inputs_given_as_json_are_evaluated() {
        let doc = parse("matrix:\n  os: ${{ fromJson( inputs.systems ) }}\n  set: ${{ fromJSON(inputs.sets) }}\n").unwrap();
        let inputs = BTreeMap::from([
            ("systems".to_owned(), "[\"a\", \"b\", \"c\"]".to_owned()),
            ("sets".to_owned(), "[1, 2]".to_owned()),
        ]);
        let resolved = with_inputs(doc.get("matrix").unwrap(), &inputs);
        assert!(matches!(size(&resolved), Size::Known { jobs: 6, .. }));
        let whole = parse("matrix: ${{ fromJSON(inputs.matrix) }}\n").unwrap();
        let inputs = BTreeMap::from([(
            "matrix".to_owned(),
            "{\"py\": [\"3.11\", \"3.12\"], \"include\": [{\"py\": \"3.13\"}]}".to_owned(),
        )]);
        let resolved = with_inputs(whole.get("matrix").unwrap(), &inputs);
        assert!(matches!(size(&resolved), Size::Known { jobs: 3, .. }));
    }

    #[test]
    fn forty_six_by_three_by_two_is_too_large() {
        let shards: Vec<String> = (1..=46).map(|n| n.to_string()).collect();
        let text = format!(
            "matrix:\n  shard: [{}]\n  python: ['3.10', '3.11', '3.12']\n  os: [ubuntu-latest, macos-latest]\n",
            shards.join(", ")
        );
        assert_eq!(count(&text), 276);
    }
}
