//! What a reference resolved to: a manifest or index body classified as an image, an
//! index of images, or one of BuildKit's two cache export forms; and the image an index
//! holds for a platform.

use oci::media_type;
/// The image-spec types a [`Document`] holds, re-exported for callers that walk it.
pub use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::{Error, Result};

/// A fetched manifest or index, by what it holds.
#[derive(Debug, Clone)]
pub enum Document {
    /// An index (or Docker manifest list) of images, one per platform.
    ImageIndex(ImageIndex),
    /// An image manifest.
    Image(ImageManifest),
    /// A BuildKit cache export in its default form: an index whose `manifests[]` are the
    /// layer descriptors plus one cache config descriptor.
    CacheIndex(ImageIndex),
    /// A BuildKit cache export written with `image-manifest=true`: an image manifest whose
    /// config is the cache config.
    CacheManifest(ImageManifest),
}

impl Document {
    /// Classify `body`, served with the `Content-Type` `content_type` (used only when
    /// the body names no media type itself).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Document> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
        }
        let probe: Probe = serde_json::from_slice(body)
            .map_err(|e| Error::malformed("the manifest", format!("not a JSON object: {e}")))?;
        let declared = probe
            .media_type
            .or_else(|| content_type.map(|c| media_type::essence(c).to_owned()))
            .filter(|m| !m.is_empty() && m != "application/json" && m != "text/plain");
        let parsed = oci::Manifest::parse(declared.as_deref(), body).map_err(|e| match e {
            oci::ManifestError::Unsupported(mt) => Error::Unsupported(format!(
                "this is not an image, an image index or a BuildKit cache: its media type is \
                 {mt:?}"
            )),
            oci::ManifestError::Invalid(detail) => Error::malformed("the manifest", detail),
        })?;
        if media_type::is_index(&parsed.media_type) {
            let index: ImageIndex =
                serde_json::from_slice(body).map_err(|e| Error::malformed("the image index", e))?;
            let is_cache = index
                .manifests()
                .iter()
                .any(|d| d.media_type().as_ref() == media_type::BUILDKIT_CACHE_CONFIG);
            Ok(if is_cache {
                Document::CacheIndex(index)
            } else {
                Document::ImageIndex(index)
            })
        } else {
            let manifest: ImageManifest = serde_json::from_slice(body)
                .map_err(|e| Error::malformed("the image manifest", e))?;
            let config_type = manifest.config().media_type().to_string();
            if config_type == media_type::BUILDKIT_CACHE_CONFIG {
                Ok(Document::CacheManifest(manifest))
            } else if is_image_config(&config_type) {
                Ok(Document::Image(manifest))
            } else {
                let artifact = manifest
                    .artifact_type()
                    .as_ref()
                    .map_or(config_type, |t| t.to_string());
                Err(Error::Unsupported(format!(
                    "this is an artifact of type {artifact:?}, not a container image or a \
                     BuildKit cache"
                )))
            }
        }
    }

    /// What it is, for people.
    pub fn kind(&self) -> &'static str {
        match self {
            Document::ImageIndex(_) => "image index",
            Document::Image(_) => "image",
            Document::CacheIndex(_) => "BuildKit cache export (index)",
            Document::CacheManifest(_) => "BuildKit cache export (image-manifest=true)",
        }
    }
}

/// Whether `media_type` is an image config (OCI or Docker).
fn is_image_config(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
    )
}

/// A platform such as `linux/amd64` or `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Architecture variant, e.g. `v8`.
    pub variant: Option<String>,
}

impl std::str::FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || Error::Unsupported(format!("platform {s:?} is not OS/ARCH[/VARIANT]"));
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: parts
                    .get(2)
                    .map(|v| (*v).to_owned())
                    .filter(|v| !v.is_empty()),
            }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The descriptor of `index`'s image for `wanted`, or of its only image when none names
/// that platform. Attestation manifests (BuildKit's `unknown/unknown` entries) never count.
pub fn select_platform(index: &ImageIndex, wanted: &Platform) -> Result<Descriptor> {
    let images: Vec<&Descriptor> = index
        .manifests()
        .iter()
        .filter(|d| media_type::is_manifest(d.media_type().as_ref()))
        .filter(|d| !is_attestation(d))
        .collect();
    let matches = |d: &&&Descriptor| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == wanted.os
                && p.architecture().to_string() == wanted.architecture
                && wanted
                    .variant
                    .as_ref()
                    .is_none_or(|v| p.variant().as_deref() == Some(v.as_str()))
        })
    };
    if let Some(found) = images.iter().find(matches) {
        return Ok((*found).clone());
    }
    if let [only] = images.as_slice() {
        return Ok((*only).clone());
    }
    let available: Vec<String> = images
        .iter()
        .map(|d| {
            d.platform()
                .as_ref()
                .map_or("(no platform)".to_owned(), |p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s = format!("{s}/{v}");
                    }
                    s
                })
        })
        .collect();
    Err(Error::NoPlatform {
        wanted: wanted.to_string(),
        available: if available.is_empty() {
            "no images".to_owned()
        } else {
            available.join(", ")
        },
    })
}

/// Whether an index entry is an attestation (provenance, SBOM), not a runnable image.
fn is_attestation(d: &Descriptor) -> bool {
    let by_annotation = d.annotations().as_ref().is_some_and(|a| {
        a.get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
    });
    let unknown = d
        .platform()
        .as_ref()
        .is_some_and(|p| p.os().to_string() == "unknown");
    by_annotation || unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index(entries: &str) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{entries}]}}"#
        )
        .into_bytes()
    }

    fn entry(digest: &str, platform: &str) -> String {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":10{platform}}}"#
        )
    }

    #[test]
    fn indexes_resolve_to_the_platform_or_the_only_image() {
        let body = index(&format!(
            "{},{}",
            entry(
                D1,
                r#","platform":{"os":"linux","architecture":"arm64","variant":"v8"}"#
            ),
            entry(D2, r#","platform":{"os":"linux","architecture":"amd64"}"#)
        ));
        let Ok(Document::ImageIndex(idx)) = Document::parse(None, &body) else {
            panic!("an image index");
        };
        let amd64: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(
            select_platform(&idx, &amd64).unwrap().digest().to_string(),
            D2
        );
        let arm: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(
            select_platform(&idx, &arm).unwrap().digest().to_string(),
            D1
        );
        let s390: Platform = "linux/s390x".parse().unwrap();
        let err = select_platform(&idx, &s390).unwrap_err().to_string();
        assert!(err.contains("linux/arm64/v8, linux/amd64"), "{err}");

        let attested = index(&format!(
            "{},{}",
            entry(D1, r#","platform":{"os":"linux","architecture":"arm64"}"#),
            entry(
                D2,
                r#","platform":{"os":"unknown","architecture":"unknown"}"#
            )
        ));
        let Ok(Document::ImageIndex(idx)) = Document::parse(None, &attested) else {
            panic!("an image index");
        };
        assert_eq!(
            select_platform(&idx, &amd64).unwrap().digest().to_string(),
            D1
        );
        assert!("linux".parse::<Platform>().is_err());
    }

    #[test]
    fn cache_exports_and_artifacts_are_told_apart_from_images() {
        let cache_index = index(&format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D1}","size":3}},
               {{"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":"{D2}","size":4}}"#
        ));
        assert!(matches!(
            Document::parse(None, &cache_index),
            Ok(Document::CacheIndex(_))
        ));
        let manifest = |config_type: &str| {
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{{"mediaType":"{config_type}","digest":"{D1}","size":2}},"layers":[]}}"#
            )
        };
        let cache = manifest("application/vnd.buildkit.cacheconfig.v0");
        assert!(matches!(
            Document::parse(None, cache.as_bytes()),
            Ok(Document::CacheManifest(_))
        ));
        let image = manifest("application/vnd.oci.image.config.v1+json");
        assert!(matches!(
            Document::parse(None, image.as_bytes()),
            Ok(Document::Image(_))
        ));
        let artifact = manifest("application/vnd.oci.empty.v1+json");
        let err = Document::parse(None, artifact.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        assert!(matches!(
            Document::parse(None, b"<html>"),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            Document::parse(None, br#"{"schemaVersion":2}"#),
            Err(Error::Malformed { .. })
        ));
    }
}
