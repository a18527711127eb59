//! YAML (and JSON, its subset) as a small tree that remembers lines: what the compose,
//! workflow and JSON bake checks read. Anchors and aliases are resolved by the parser,
//! merge keys (`<<: *defaults`) here; scalars keep their text as written.

use saphyr::{MarkedYamlOwned, ScalarStyle, YamlDataOwned, YamlLoader};
use saphyr_parser::Parser;

/// A YAML node and the line (1-based) it starts on.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Node {
    /// Where the node starts; for a block scalar (`|`, `>`), its first content line.
    pub line: usize,
    /// What it holds.
    pub value: Value,
}

/// The content of a node.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null` or nothing.
    Null,
    /// A scalar, as written (quotes removed); `block` for `|` and `>` scalars.
    Scalar { text: String, block: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order.
    Map(Vec<Entry>),
}

/// One key of a mapping with the line the key is on.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    /// The key's text.
    pub key: String,
    /// The key's line.
    pub line: usize,
    /// Its value.
    pub value: Node,
}

/// Why a document could not be parsed, and where.
#[derive(Clone, Debug)]
pub(crate) struct YamlError {
    /// The line (1-based) the parser stopped at.
    pub line: usize,
    /// The parser's message.
    pub message: String,
}

/// Parses the first document of `text` (an empty file is `Null`). A flow collection
/// closed at its key's indentation (`test: [` … `]`), which YAML 1.2 forbids but the
/// parsers of docker compose and GitHub Actions accept, is read as they read it.
pub(crate) fn parse(text: &str) -> Result<Node, YamlError> {
    parse_strict(text).or_else(|error| {
        let relaxed = indent_flow_closers(text);
        if relaxed == text {
            return Err(error);
        }
        parse_strict(&relaxed).map_err(|_| error)
    })
}

/// `text` with each line that only closes flow collections (`]`, `},`) indented as the
/// line before it; line numbers stay.
fn indent_flow_closers(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut indent = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_start_matches(' ');
        let closes = content.starts_with([']', '}'])
            && content
                .trim_end()
                .chars()
                .all(|c| matches!(c, ']' | '}' | ',' | ' '));
        if closes {
            let own = line.len() - content.len();
            out.push_str(&" ".repeat(indent.max(own)));
            out.push_str(content);
        } else {
            if !content.trim().is_empty() {
                indent = line.len() - content.len();
            }
            out.push_str(line);
        }
    }
    out
}

fn parse_strict(text: &str) -> Result<Node, YamlError> {
    let mut loader = YamlLoader::<MarkedYamlOwned>::default();
    loader.early_parse(false);
    let mut parser = Parser::new_from_str(text);
    let loaded = parser.load(&mut loader, true);
    let error = loaded.err().or_else(|| loader.error().cloned());
    if let Some(error) = error {
        return Err(YamlError {
            line: error.marker().line(),
            message: error.info().to_owned(),
        });
    }
    Ok(loader
        .into_documents()
        .first()
        .map(convert)
        .unwrap_or(Node {
            line: 1,
            value: Value::Null,
        }))
}

fn convert(node: &MarkedYamlOwned) -> Node {
    let line = node.span.start.line();
    let value = match &node.data {
        YamlDataOwned::Representation(text, style, _) => {
            let plain = matches!(style, ScalarStyle::Plain);
            if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                Value::Null
            } else {
                Value::Scalar {
                    text: text.clone(),
                    block: matches!(style, ScalarStyle::Literal | ScalarStyle::Folded),
                }
            }
        }
        YamlDataOwned::Value(scalar) => match scalar {
            saphyr::ScalarOwned::Null => Value::Null,
            saphyr::ScalarOwned::Boolean(b) => Value::Scalar {
                text: b.to_string(),
                block: false,
            },
            saphyr::ScalarOwned::Integer(i) => Value::Scalar {
                text: i.to_string(),
                block: false,
            },
            saphyr::ScalarOwned::FloatingPoint(f) => Value::Scalar {
                text: f.to_string(),
                block: false,
            },
            saphyr::ScalarOwned::String(s) => Value::Scalar {
                text: s.clone(),
                block: false,
            },
        },
        YamlDataOwned::Sequence(items) => Value::Seq(items.iter().map(convert).collect()),
        YamlDataOwned::Mapping(map) => {
            let mut entries = Vec::new();
            let mut merged = Vec::new();
            for (key, value) in map {
                let key_node = convert(key);
                let Some(text) = key_node.text() else {
                    continue;
                };
                if text == "<<" {
                    merged.push(convert(value));
                    continue;
                }
                entries.push(Entry {
                    key: text.to_owned(),
                    line: key_node.line,
                    value: convert(value),
                });
            }
            for source in merged {
                let maps = match source.value {
                    Value::Seq(items) => items,
                    other => vec![Node {
                        line: source.line,
                        value: other,
                    }],
                };
                for map in maps {
                    if let Value::Map(extra) = map.value {
                        for entry in extra {
                            if !entries.iter().any(|e| e.key == entry.key) {
                                entries.push(entry);
                            }
                        }
                    }
                }
            }
            Value::Map(entries)
        }
        YamlDataOwned::Tagged(_, inner) => return convert(inner),
        YamlDataOwned::Alias(_) | YamlDataOwned::BadValue => Value::Null,
    };
    Node { line, value }
}

impl Node {
    /// The value under `key`, when this is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|e| &e.value)
    }

    /// The entry under `key`, with the key's line.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries().iter().find(|e| e.key == key)
    }

    /// A mapping's entries (none for anything else).
    pub fn entries(&self) -> &[Entry] {
        match &self.value {
            Value::Map(entries) => entries,
            _ => &[],
        }
    }

    /// A sequence's items (none for anything else).
    pub fn items(&self) -> &[Node] {
        match &self.value {
            Value::Seq(items) => items,
            _ => &[],
        }
    }

    /// A scalar's text.
    pub fn text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Whether this is a block scalar (`|` or `>`), whose content starts at `line`.
    pub fn is_block(&self) -> bool {
        matches!(self.value, Value::Scalar { block: true, .. })
    }

    /// Whether this is a YAML `true` (compose and workflows also accept the string `"true"`).
    pub fn is_true(&self) -> bool {
        self.text()
            .is_some_and(|t| matches!(t.trim(), "true" | "True" | "TRUE"))
    }

    /// Whether this is a mapping.
    pub fn is_map(&self) -> bool {
        matches!(self.value, Value::Map(_))
    }

    /// Whether this is a sequence.
    pub fn is_seq(&self) -> bool {
        matches!(self.value, Value::Seq(_))
    }

    /// The lines of a scalar, each with its line number in the file (a block scalar's
    /// lines follow its first content line; a flow scalar's all sit on its line).
    pub fn lines(&self) -> Vec<(usize, &str)> {
        let Some(text) = self.text() else {
            return Vec::new();
        };
        if self.is_block() {
            text.lines()
                .enumerate()
                .map(|(i, l)| (self.line + i, l))
                .collect()
        } else {
            text.lines().map(|l| (self.line, l)).collect()
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

    #[test]
    fn keys_values_and_block_scalars_keep_their_lines() {
        let doc = parse("a: 1\nrun: |\n  one\n  two\nlist: [x, 'y z']\n").unwrap();
        assert_eq!(doc.entry("run").unwrap().line, 2);
        let run = doc.get("run").unwrap();
        assert_eq!(run.lines(), vec![(3, "one"), (4, "two")]);
        assert_eq!(doc.get("list").unwrap().items()[1].text(), Some("y z"));
        assert_eq!(doc.get("a").unwrap().text(), Some("1"));
    }

    #[test]
    fn merge_keys_fill_in_missing_entries() {
        let doc = parse("d: &d\n  x: 1\n  y: 2\ns:\n  <<: *d\n  y: 3\n").unwrap();
        let s = doc.get("s").unwrap();
        assert_eq!(s.get("x").unwrap().text(), Some("1"));
        assert_eq!(s.get("y").unwrap().text(), Some("3"));
    }

    #[test]
    fn flow_collections_may_close_at_their_key_indentation() {
        let text = "services:\n  a:\n    healthcheck:\n      test: [\n          \"CMD\",\n          \"true\"\n      ]\n    image: x\n";
        let doc = parse(text).unwrap();
        let a = doc.get("services").unwrap().get("a").unwrap();
        assert_eq!(
            a.get("healthcheck")
                .unwrap()
                .get("test")
                .unwrap()
                .items()
                .len(),
            2
        );
        assert_eq!(a.entry("image").unwrap().line, 8);
    }

    #[test]
    fn errors_carry_a_line() {
        let err = parse("a: [\nb: c\n").unwrap_err();
        assert_eq!(err.line, 2);
    }
}
