//! The OCI vocabulary layercache speaks: content digests, repository names and
//! references, media types, manifest parsing (and the content a manifest
//! references), and the distribution spec's error-code catalog.
//!
//! Everything here is pure: no I/O, no async. Every type that crosses a trust
//! boundary is only constructible through validation, so code holding a
//! [`Digest`] or a [`RepoName`] never re-checks it.

pub mod digest;
pub mod error_code;
pub mod manifest;
pub mod media_type;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use error_code::ErrorCode;
pub use manifest::{
    CacheRecords, Manifest, ManifestError, RefKind, Reference as ManifestReference,
};
pub use name::{NameError, Reference, RepoName, Tag};
