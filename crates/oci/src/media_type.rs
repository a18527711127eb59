//! The media types layercache treats specially: manifests and indexes (OCI and Docker),
//! BuildKit's cache config, and the types a referrers response is made of.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1 manifest (unsigned); refused.
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker schema 1 manifest (signed); refused.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// BuildKit's cache config blob, the config of a registry cache export.
pub const BUILDKIT_CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";

/// Whether `media_type` names an image manifest (OCI or Docker schema 2).
pub fn is_image_manifest(media_type: &str) -> bool {
    matches!(media_type, OCI_MANIFEST | DOCKER_MANIFEST)
}

/// Whether `media_type` names an index (OCI index or Docker manifest list).
pub fn is_index(media_type: &str) -> bool {
    matches!(media_type, OCI_INDEX | DOCKER_MANIFEST_LIST)
}

/// Whether `media_type` names anything stored under `/manifests/`.
pub fn is_manifest(media_type: &str) -> bool {
    is_image_manifest(media_type) || is_index(media_type)
}

/// The media type part of a header value, without parameters or surrounding space.
pub fn essence(header_value: &str) -> &str {
    header_value.split(';').next().unwrap_or("").trim()
}

/// Whether an `Accept` header value admits `media_type`. A missing or empty header
/// admits everything; so do `*/*` and `application/*`.
pub fn accepts(accept: &[&str], media_type: &str) -> bool {
    let mut offered = accept
        .iter()
        .flat_map(|value| value.split(','))
        .map(essence)
        .filter(|v| !v.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return true;
    }
    offered.any(|v| v == media_type || v == "*/*" || v == "application/*")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_are_split_and_matched_by_essence() {
        let buildkit = [
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json;q=0.5",
        ];
        assert!(accepts(&buildkit, OCI_INDEX));
        assert!(accepts(&buildkit, DOCKER_MANIFEST));
        assert!(!accepts(&buildkit, OCI_MANIFEST));
        assert!(accepts(&[], OCI_MANIFEST));
        assert!(accepts(&["*/*"], OCI_MANIFEST));
    }
}
