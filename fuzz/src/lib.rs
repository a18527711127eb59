//! Fuzz targets over everything layercache parses from clients. Each target takes raw
//! bytes, drives one parser (or the whole HTTP app) with them and panics when a property
//! fails: a panic inside the server, a 5xx, a hang, an OCI error without its JSON body,
//! or a parser whose accepted input does not print back to itself.
//!
//! The same functions are run three ways: by AFL++ through `src/bin/fuzz_target.rs`
//! (`scripts/fuzz.sh`), by `cargo test` over the committed corpus and regression inputs
//! (`tests/replay.rs`), and nowhere else.

// Failing loudly is how a target reports a broken property.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

pub mod app;
pub mod parsers;

/// A fuzz target: consumes one input, panics on a failed property.
pub type Target = fn(&[u8]);

/// Every target, by the name `scripts/fuzz.sh` and the corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("app", app::app),
    ("twirp", app::twirp),
    ("authorization", app::authorization),
    ("manifest", parsers::manifest),
    ("names", parsers::names),
    ("endpoint", parsers::endpoint),
    ("range", parsers::range),
    ("blocklist", parsers::block_list),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}
