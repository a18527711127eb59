//! Manifest and index parsing, and the content a manifest references.
//!
//! The references are what the store records for every manifest: they decide which
//! blobs and child manifests must exist before a PUT is accepted, and which content
//! eviction must keep while the manifest is kept.

use std::collections::BTreeMap;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::media_type;

/// Why a manifest body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON for its media type, or an unsupported schema.
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// A media type this registry does not store as a manifest.
    #[error("unsupported manifest media type {0:?}")]
    Unsupported(String),
}

/// How a manifest refers to other content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefKind {
    /// A blob (config, layer, BuildKit cache config) in the same repository.
    Blob,
    /// A child manifest of an index, in the same repository.
    Manifest,
}

impl RefKind {
    /// Stable name used in metadata storage.
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Blob => "blob",
            RefKind::Manifest => "manifest",
        }
    }
}

/// One piece of content a manifest references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Whether it is a blob or a child manifest.
    pub kind: RefKind,
    /// Whether the registry must hold it (foreign layers with `urls` need not be).
    pub required: bool,
    /// The size its descriptor gives, which the stored content must have.
    pub size: u64,
}

/// The image config field BuildKit's inline cache lives in (base64 of its cache records).
pub const INLINE_CACHE_FIELD: &str = "moby.buildkit.cache.v0";

/// The BuildKit cache records a manifest gives a build that imports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheRecords {
    /// None: an image pushed without cache metadata, or another artifact.
    Without,
    /// A registry cache export: a manifest or index carrying a BuildKit cache config.
    Export,
    /// An image whose config carries inline cache (`moby.buildkit.cache.v0`).
    Inline,
}

impl CacheRecords {
    /// Stable name used in metadata storage and the `Layercache-Cache-Records` header.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheRecords::Without => "none",
            CacheRecords::Export => "export",
            CacheRecords::Inline => "inline",
        }
    }

    /// The value [`CacheRecords::as_str`] gives, back.
    pub fn parse(name: &str) -> Option<CacheRecords> {
        [
            CacheRecords::Without,
            CacheRecords::Export,
            CacheRecords::Inline,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }

    /// Whether a build importing it finds cache records.
    pub fn has_records(self) -> bool {
        self != CacheRecords::Without
    }
}

/// Whether an image config (its JSON bytes) carries inline cache.
pub fn has_inline_cache(config: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "moby.buildkit.cache.v0")]
        cache: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(config).is_ok_and(|p| p.cache.is_some())
}

/// A parsed manifest or index: what storage and the referrers API need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The manifest's media type (from the body, else from the request's `Content-Type`).
    pub media_type: String,
    /// `artifactType`, or for an image manifest without one its config media type.
    pub artifact_type: Option<String>,
    /// The manifest this one refers to through `subject`, if any.
    pub subject: Option<Digest>,
    /// Annotations, reported by the referrers API.
    pub annotations: BTreeMap<String, String>,
    /// Everything the manifest references (config, layers, children).
    pub references: Vec<Reference>,
    /// It carries a BuildKit cache config: a registry cache export.
    pub cache_export: bool,
    /// The image config of an image manifest (not a cache config): its digest and size.
    pub image_config: Option<(Digest, u64)>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
}

impl Manifest {
    /// Parse `body`, sent with `content_type` (the header's essence, if any).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Manifest, ManifestError> {
        let probe: Probe = serde_json::from_slice(body)
            .map_err(|e| ManifestError::Invalid(format!("not a JSON object: {e}")))?;
        if probe.schema_version != Some(2) {
            return Err(ManifestError::Invalid(
                "schemaVersion must be 2 (schema 1 is not supported)".into(),
            ));
        }
        let content_type = content_type.filter(|ct| !ct.is_empty());
        if let (Some(ct), Some(mt)) = (content_type, probe.media_type.as_deref())
            && ct != mt
        {
            return Err(ManifestError::Invalid(format!(
                "Content-Type {ct:?} does not match the manifest's mediaType {mt:?}"
            )));
        }
        let media_type = match (probe.media_type.as_deref(), content_type) {
            (Some(mt), _) | (None, Some(mt)) => mt.to_owned(),
            (None, None) if probe.manifests.is_some() => media_type::OCI_INDEX.to_owned(),
            (None, None) if probe.config.is_some() => media_type::OCI_MANIFEST.to_owned(),
            (None, None) => {
                return Err(ManifestError::Invalid(
                    "no media type in the request or the body".into(),
                ));
            }
        };
        if media_type::is_image_manifest(&media_type) {
            Self::parse_image(media_type, body)
        } else if media_type::is_index(&media_type) {
            Self::parse_index(media_type, body)
        } else {
            Err(ManifestError::Unsupported(media_type))
        }
    }

    fn parse_image(media_type: String, body: &[u8]) -> Result<Manifest, ManifestError> {
        let m: ImageManifest = serde_json::from_slice(body)
            .map_err(|e| ManifestError::Invalid(format!("not an image manifest: {e}")))?;
        let mut references = vec![blob_ref(m.config())?];
        for layer in m.layers() {
            references.push(blob_ref(layer)?);
        }
        // An empty `artifactType` counts as none (the spec's "empty or missing").
        let artifact_type = m
            .artifact_type()
            .as_ref()
            .map(|t| t.to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| Some(m.config().media_type().to_string()));
        let cache_export = m.config().media_type().as_ref() == media_type::BUILDKIT_CACHE_CONFIG;
        let image_config = (!cache_export)
            .then(|| Ok::<_, ManifestError>((digest_of(m.config())?, m.config().size())))
            .transpose()?;
        Ok(Manifest {
            media_type,
            artifact_type,
            subject: m.subject().as_ref().map(digest_of).transpose()?,
            annotations: sorted(m.annotations()),
            references,
            cache_export,
            image_config,
        })
    }

    fn parse_index(media_type: String, body: &[u8]) -> Result<Manifest, ManifestError> {
        let index: ImageIndex = serde_json::from_slice(body)
            .map_err(|e| ManifestError::Invalid(format!("not an image index: {e}")))?;
        let references = index
            .manifests()
            .iter()
            .map(|d| {
                // A BuildKit cache index lists layer and cache-config blobs, not manifests.
                let kind = if media_type::is_manifest(d.media_type().as_ref()) {
                    RefKind::Manifest
                } else {
                    RefKind::Blob
                };
                Ok(Reference {
                    digest: digest_of(d)?,
                    kind,
                    required: d.urls().as_ref().is_none_or(|u| u.is_empty()),
                    size: d.size(),
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        let cache_export = index
            .manifests()
            .iter()
            .any(|d| d.media_type().as_ref() == media_type::BUILDKIT_CACHE_CONFIG);
        Ok(Manifest {
            media_type,
            artifact_type: index
                .artifact_type()
                .as_ref()
                .map(|t| t.to_string())
                .filter(|t| !t.is_empty()),
            subject: index.subject().as_ref().map(digest_of).transpose()?,
            annotations: sorted(index.annotations()),
            references,
            cache_export,
            image_config: None,
        })
    }
}

fn sorted(
    annotations: &Option<std::collections::HashMap<String, String>>,
) -> BTreeMap<String, String> {
    annotations
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn digest_of(descriptor: &Descriptor) -> Result<Digest, ManifestError> {
    descriptor
        .digest()
        .to_string()
        .parse()
        .map_err(|e| ManifestError::Invalid(format!("descriptor digest: {e}")))
}

fn blob_ref(descriptor: &Descriptor) -> Result<Reference, ManifestError> {
    Ok(Reference {
        digest: digest_of(descriptor)?,
        kind: RefKind::Blob,
        required: descriptor.urls().as_ref().is_none_or(|u| u.is_empty()),
        size: descriptor.size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    const L1: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(media_type: &str, config_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}",
            "config":{{"mediaType":"{config_type}","digest":"{CFG}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{L1}","size":0}}]}}"#
        )
    }

    #[test]
    fn image_manifest_references_config_and_layers() {
        let body = image(
            media_type::OCI_MANIFEST,
            "application/vnd.oci.image.config.v1+json",
        );
        let m = Manifest::parse(Some(media_type::OCI_MANIFEST), body.as_bytes()).unwrap();
        let digests: Vec<String> = m.references.iter().map(|r| r.digest.to_string()).collect();
        assert_eq!(digests, [CFG, L1]);
        assert!(
            m.references
                .iter()
                .all(|r| r.kind == RefKind::Blob && r.required)
        );
    }

    #[test]
    fn buildkit_cache_index_references_blobs_not_manifests() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
            {{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{L1}","size":0}},
            {{"mediaType":"{}","digest":"{CFG}","size":2}}]}}"#,
            media_type::OCI_INDEX,
            media_type::BUILDKIT_CACHE_CONFIG
        );
        let m = Manifest::parse(Some(media_type::OCI_INDEX), body.as_bytes()).unwrap();
        assert!(m.references.iter().all(|r| r.kind == RefKind::Blob));
        assert_eq!(m.references.len(), 2);
        assert!(m.cache_export);
        // The image-manifest shape of the same export (`image-manifest=true`).
        let body = image(media_type::OCI_MANIFEST, media_type::BUILDKIT_CACHE_CONFIG);
        let m = Manifest::parse(None, body.as_bytes()).unwrap();
        assert!(m.cache_export && m.image_config.is_none());
    }

    #[test]
    fn an_image_config_names_its_inline_cache() {
        let body = image(
            media_type::DOCKER_MANIFEST,
            "application/vnd.docker.container.image.v1+json",
        );
        let m = Manifest::parse(None, body.as_bytes()).unwrap();
        assert!(!m.cache_export);
        assert_eq!(
            m.image_config.map(|c| c.0.to_string()).as_deref(),
            Some(CFG)
        );
        assert!(has_inline_cache(
            br#"{"os":"linux","moby.buildkit.cache.v0":"W10="}"#
        ));
        assert!(!has_inline_cache(br#"{"os":"linux"}"#));
        assert!(!has_inline_cache(br#"{"moby.buildkit.cache.v0":null}"#));
        assert!(!has_inline_cache(b"not json"));
        for records in [
            CacheRecords::Without,
            CacheRecords::Export,
            CacheRecords::Inline,
        ] {
            assert_eq!(CacheRecords::parse(records.as_str()), Some(records));
        }
    }

    #[test]
    fn index_of_manifests_references_manifests() {
        let body = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{L1}","size":0}}]}}"#,
            media_type::OCI_MANIFEST
        );
        let m = Manifest::parse(None, body.as_bytes()).unwrap();
        assert_eq!(m.media_type, media_type::OCI_INDEX);
        assert_eq!(m.references[0].kind, RefKind::Manifest);
    }

    #[test]
    fn malformed_or_mismatched_manifests_are_refused() {
        let good = image(
            media_type::OCI_MANIFEST,
            "application/vnd.oci.image.config.v1+json",
        );
        assert!(Manifest::parse(Some(media_type::DOCKER_MANIFEST), good.as_bytes()).is_err());
        assert!(Manifest::parse(None, b"{").is_err());
        assert!(Manifest::parse(None, b"[]").is_err());
        assert!(Manifest::parse(None, br#"{"schemaVersion":1}"#).is_err());
        let bad_digest = good.replace(CFG, "sha256:zz");
        assert!(Manifest::parse(None, bad_digest.as_bytes()).is_err());
        assert!(matches!(
            Manifest::parse(Some("text/plain"), br#"{"schemaVersion":2}"#),
            Err(ManifestError::Unsupported(_))
        ));
    }

    #[test]
    fn artifact_type_and_subject_are_extracted() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/x-sbom",
            "config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{CFG}","size":2}},
            "layers":[],"subject":{{"mediaType":"{}","digest":"{L1}","size":0}},
            "annotations":{{"a":"b"}}}}"#,
            media_type::OCI_MANIFEST,
            media_type::OCI_MANIFEST
        );
        let m = Manifest::parse(None, body.as_bytes()).unwrap();
        assert_eq!(m.artifact_type.as_deref(), Some("application/x-sbom"));
        assert_eq!(m.subject.map(|d| d.to_string()).as_deref(), Some(L1));
        assert_eq!(m.annotations.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn an_empty_artifact_type_is_none() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"",
            "config":{{"mediaType":"application/x-cfg","digest":"{CFG}","size":2}},"layers":[]}}"#,
            media_type::OCI_MANIFEST
        );
        let m = Manifest::parse(None, image.as_bytes()).unwrap();
        assert_eq!(m.artifact_type.as_deref(), Some("application/x-cfg"));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"","manifests":[]}}"#,
            media_type::OCI_INDEX
        );
        let m = Manifest::parse(None, index.as_bytes()).unwrap();
        assert_eq!(m.artifact_type, None);
    }
}
