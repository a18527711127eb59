//! Explaining cache misses, over content already fetched: no network, no clock.
//!
//! * [`document`]: what a reference resolved to (image, index, BuildKit cache export), and
//!   the image of an index for a platform;
//! * [`image`]: an image's build steps, from its config's `history` and `rootfs.diff_ids`
//!   and its manifest's layers;
//! * [`diff`]: two images aligned step by step, the first step that diverged and the
//!   bytes rebuilt from there on;
//! * [`cache`]: a BuildKit cache (export or inline) as records and layers in build order,
//!   and which records a second export already had;
//! * [`cache_from`]: whether BuildKit can use an image or export as `--cache-from`;
//! * [`session`]: a build session's misses set against what the registry holds.
//!
//! Every result is `Serialize` (for `--json`) and has a `text()` for people.

pub mod cache;
pub mod cache_from;
pub mod diff;
pub mod document;
pub mod image;
pub mod session;
mod text;

/// Why content could not be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A manifest, config or cache config that does not parse as what it claims to be.
    #[error("{what} is malformed: {detail}")]
    Malformed {
        /// What was being read, e.g. "the image config".
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Content of a kind `explain` cannot read (not an image, an index or a cache).
    #[error("{0}")]
    Unsupported(String),
    /// An index without an image for the platform asked for.
    #[error("no image for {wanted} in the index (it holds: {available})")]
    NoPlatform {
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        available: String,
    },
}

impl Error {
    /// A [`Error::Malformed`] about `what`.
    pub fn malformed(what: impl Into<String>, detail: impl std::fmt::Display) -> Error {
        Error::Malformed {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// The result of this module's fallible functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first 12 hex characters of a digest (`sha256:` dropped), as docker shows layers.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.chars().take(12).collect()
}
