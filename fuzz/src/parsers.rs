//! Targets over the pure parsers: digests, names and references, manifests and indexes,
//! the `/v2/` path router, `Range` and `Content-Range`, Azure block lists.

use axum::http::{HeaderMap, HeaderValue, Method, Request, header};
use oci::{Digest, Manifest, Reference, RepoName, Tag};
use server::registry::Endpoint;

/// The input as text, or `None` when it is not UTF-8 (HTTP gives the parsers text).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Assert that a value parsed from `input` prints back to `input`.
fn round_trips<T: std::str::FromStr + std::fmt::Display>(input: &str) {
    if let Ok(value) = input.parse::<T>() {
        assert_eq!(
            value.to_string(),
            input,
            "parsed and printed back differently"
        );
    }
}

/// Digests, repository names, tags and references: whatever parses prints back to the
/// same string, and a reference is a tag exactly when it has no `:`.
pub fn names(data: &[u8]) {
    let Some(input) = text(data) else { return };
    round_trips::<Digest>(input);
    round_trips::<RepoName>(input);
    round_trips::<Tag>(input);
    round_trips::<Reference>(input);
    if let Ok(reference) = input.parse::<Reference>() {
        assert_eq!(
            matches!(reference, Reference::Digest(_)),
            input.contains(':'),
            "a reference is a digest exactly when it has a ':'"
        );
    }
    if let Ok(name) = input.parse::<RepoName>() {
        assert!(name.as_str().len() <= oci::name::MAX_NAME_LEN);
        assert!(
            !name.as_str().contains(".."),
            "a name never climbs a directory"
        );
    }
    // Each `/`-separated part as a digest too, the way paths carry them.
    for part in input.split('/') {
        round_trips::<Digest>(part);
    }
}

/// Manifests and indexes: the first line is the `Content-Type` (empty for none), the
/// rest the body. Parsing is deterministic, and a parsed manifest names only digests.
pub fn manifest(data: &[u8]) {
    let (content_type, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (data.get(..at).unwrap_or_default(), data.get(at + 1..)),
        None => (&[][..], Some(data)),
    };
    let body = body.unwrap_or_default();
    let content_type = text(content_type);
    let first = Manifest::parse(content_type, body);
    let second = Manifest::parse(content_type, body);
    assert_eq!(first, second, "parsing is deterministic");
    if let Ok(manifest) = first {
        assert!(!manifest.media_type.is_empty());
        for reference in &manifest.references {
            round_trips::<Digest>(&reference.digest.to_string());
        }
    }
}

/// The `/v2/` router: the first line is the method, the rest the path. An endpoint that
/// parses names a valid repository, and parsing the same path again gives the same one.
pub fn endpoint(data: &[u8]) {
    let Some(input) = text(data) else { return };
    let (method, path) = input.split_once('\n').unwrap_or(("GET", input));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let first = Endpoint::parse(&method, path);
    if let Ok(endpoint) = &first {
        if let Some(repo) = endpoint.repo() {
            round_trips::<RepoName>(repo.as_str());
        }
        assert_eq!(Endpoint::parse(&method, path).ok().as_ref(), Some(endpoint));
    }
}

/// `Range` against a size, a registry upload's `Content-Range` with a `Content-Length`,
/// and a cache upload's `Content-Range`. The first 8 bytes are the size (little-endian),
/// then a `Content-Length` line, then the header value.
pub fn range(data: &[u8]) {
    let (size, rest) = match data.split_first_chunk::<8>() {
        Some((size, rest)) => (u64::from_le_bytes(*size), rest),
        None => (0, data),
    };
    let Some(rest) = text(rest) else { return };
    let (length, value) = rest.split_once('\n').unwrap_or(("", rest));

    // A satisfiable range lies inside the content and is not empty.
    if let Ok(Some(range)) = server::parse::range(value, size) {
        assert!(range.len >= 1, "an empty range from {value:?}");
        assert!(
            range
                .start
                .checked_add(range.len)
                .is_some_and(|end| end <= size),
            "{range:?} from {value:?} is outside {size} bytes"
        );
    }

    let Ok(value) = HeaderValue::from_str(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_RANGE, value.clone());
    if let Ok(length) = HeaderValue::from_str(length) {
        headers.insert(header::CONTENT_LENGTH, length);
    }
    if let Err(error) = server::parse::upload_chunk_start(&headers) {
        assert_eq!(error.code(), oci::ErrorCode::RangeInvalid);
        assert!(error.status().is_client_error());
    }

    let Ok(request) = Request::builder()
        .method(Method::PATCH)
        .uri("/_apis/artifactcache/caches/1")
        .header(header::CONTENT_RANGE, value)
        .body(())
    else {
        return;
    };
    let (parts, ()) = request.into_parts();
    if let Ok((first, last)) = server::parse::cache_chunk_range(&parts) {
        assert!(first <= last, "{first}-{last} runs backwards");
    }
}

/// Azure `<BlockList>` documents: ids come back trimmed, and a document type
/// declaration (entity expansion) is never accepted.
pub fn block_list(data: &[u8]) {
    let Some(xml) = text(data) else { return };
    if let Ok(ids) = server::parse::block_list(xml) {
        for id in &ids {
            assert_eq!(id.trim(), id, "block ids are trimmed");
        }
    }
}
