//! The parsers of client input that handlers call privately, reachable from outside the
//! crate only so that the fuzz targets and property tests can drive them directly. Not a
//! stable interface: each function forwards to the one a handler uses.

use axum::http::HeaderMap;
use axum::http::request::Parts;
use store::ByteRange;

use crate::actions::ActionsError;
use crate::registry::RegistryError;

/// A `Range` (or `x-ms-range`) value against content of `size` bytes: `Ok(None)` to
/// serve it all, `Err(())` for an unsatisfiable range.
#[allow(clippy::result_unit_err)]
pub fn range(value: &str, size: u64) -> Result<Option<ByteRange>, ()> {
    crate::body::parse_range(value, size)
}

/// The start offset a registry upload chunk claims in `Content-Range` (checked against
/// `Content-Length`).
pub fn upload_chunk_start(headers: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    crate::registry::chunk_start(headers, None)
}

/// The first and last byte of an Actions cache v1 chunk's `Content-Range`.
pub fn cache_chunk_range(parts: &Parts) -> Result<(u64, u64), ActionsError> {
    crate::actions::content_range(parts)
}

/// The block ids of an Azure `<BlockList>` document, in order.
pub fn block_list(xml: &str) -> Result<Vec<String>, ActionsError> {
    crate::actions::block_list(xml)
}

/// The user name and password of an `Authorization: Basic …` value.
pub fn basic(authorization: &str) -> Option<(String, String)> {
    crate::auth::basic(authorization)
}
