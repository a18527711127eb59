//! Repository names, tags and manifest references, validated by the grammar of the
//! distribution spec so that nothing a client sends reaches storage unchecked.

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// Longest repository name accepted (distribution's limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag the spec allows.
pub const MAX_TAG_LEN: usize = 128;

/// Why a name, tag or reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The repository name breaks the spec's grammar or length limit.
    #[error("invalid repository name {0:?}")]
    Repository(String),
    /// The tag breaks the spec's grammar.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// A digest reference that does not parse.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A repository name such as `cache/team/app`: path components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.first().is_some_and(|&b| alnum(b)) || !bytes.last().is_some_and(|&b| alnum(b)) {
        return false;
    }
    // Between alphanumeric runs: ".", "_", "__", or one or more "-".
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if alnum(b) {
            i += 1;
            continue;
        }
        let start = i;
        while bytes.get(i).is_some_and(|&c| !alnum(c)) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(NameError::Repository(s.chars().take(300).collect()));
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl serde::Serialize for RepoName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RepoName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_');
        let rest_ok = bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || s.len() > MAX_TAG_LEN {
            return Err(NameError::Tag(s.chars().take(200).collect()));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable content digest.
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_spec_grammar() {
        for good in [
            "a",
            "library/busybox",
            "cache/team/app-x",
            "a__b",
            "a---b",
            "a.b_c/d-e",
            "0/1/2/3/4/5/6/7",
        ] {
            assert!(
                good.parse::<RepoName>().is_ok(),
                "{good:?} must be accepted"
            );
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a..b", "a___b", "a._b", "-a", "a-", "../etc", "a/../b",
            "a b", "a%2fb",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} must be rejected");
        }
        assert!("a".repeat(256).parse::<RepoName>().is_err());
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        for good in ["latest", "v1.0.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(good.parse::<Tag>().is_ok(), "{good:?} must be accepted");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "..", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn references_are_tags_or_digests() {
        assert!(matches!("latest".parse(), Ok(Reference::Tag(_))));
        assert!(matches!(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse(),
            Ok(Reference::Digest(_))
        ));
        assert!("sha256:nothex".parse::<Reference>().is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const COMPONENT: &str = "[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,2}";

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn names_tags_and_references_print_back_the_same(s in "\\PC{0,40}|[a-z0-9._/-]{1,40}|[a-zA-Z0-9_.:-]{1,40}") {
                if let Ok(name) = s.parse::<RepoName>() {
                    prop_assert_eq!(name.to_string(), s.clone());
                    prop_assert!(!name.as_str().contains(".."));
                }
                if let Ok(tag) = s.parse::<Tag>() {
                    prop_assert_eq!(tag.to_string(), s.clone());
                }
                if let Ok(reference) = s.parse::<Reference>() {
                    prop_assert_eq!(reference.to_string(), s.clone());
                    prop_assert_eq!(matches!(reference, Reference::Digest(_)), s.contains(':'));
                }
            }

            #[test]
            fn names_from_the_grammar_parse(components in proptest::collection::vec(COMPONENT, 1..5)) {
                let name = components.join("/");
                prop_assume!(name.len() <= MAX_NAME_LEN);
                prop_assert_eq!(name.parse::<RepoName>().map(|n| n.to_string()), Ok(name));
            }

            #[test]
            fn tags_from_the_grammar_parse(tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
                prop_assert_eq!(tag.parse::<Tag>().map(|t| t.to_string()), Ok(tag.clone()));
                prop_assert!(matches!(tag.parse::<Reference>(), Ok(Reference::Tag(_))));
            }
        }
    }
}
