//! An OCI image layout on disk (`index.json`, `blobs/<algorithm>/<hex>`), as written by
//! `buildctl --output type=oci`, `--cache-to type=local` or `skopeo copy oci:…`.
//! Blob paths are built from validated digests only.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use diagnose::explain::document::ImageIndex;
use oci::Digest;

use super::registry::{Fetched, MAX_MANIFEST};

/// The annotation naming an entry of `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A layout directory.
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Open the layout at `root`.
    pub fn open(root: &Path) -> anyhow::Result<Layout> {
        if !root.join("index.json").is_file() {
            bail!(
                "{} is not an OCI image layout: it has no index.json",
                root.display()
            );
        }
        Ok(Layout {
            root: root.to_owned(),
        })
    }

    /// Blob `digest`, at most `limit` bytes, checked against its digest.
    pub fn blob(&self, digest: &Digest, limit: usize) -> anyhow::Result<Vec<u8>> {
        let path = self
            .root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex());
        let len = std::fs::metadata(&path)
            .with_context(|| format!("no blob {digest} in {}", self.root.display()))?
            .len();
        if len > limit as u64 {
            bail!("blob {digest} is {len} bytes, more than the {limit} explain reads");
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if !digest.matches(&bytes) {
            bail!(
                "blob {digest} in {} does not match its digest",
                self.root.display()
            );
        }
        Ok(bytes)
    }

    /// The manifest tagged `tag` in `index.json`; without a tag, the only entry, or
    /// `index.json` itself when it lists several.
    pub fn top(&self, tag: Option<&str>) -> anyhow::Result<Fetched> {
        let path = self.root.join("index.json");
        let body = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if body.len() > MAX_MANIFEST {
            bail!("{} is larger than {MAX_MANIFEST} bytes", path.display());
        }
        let index: ImageIndex = serde_json::from_slice(&body)
            .with_context(|| format!("{} is not an OCI image index", path.display()))?;
        let entries = index.manifests();
        let chosen = match tag {
            Some(tag) => entries.iter().find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .is_some_and(|name| {
                        name == tag || name.rsplit_once(':').is_some_and(|(_, t)| t == tag)
                    })
            }),
            None if entries.len() == 1 => entries.first(),
            None => None,
        };
        match (chosen, tag) {
            (Some(d), _) => {
                let digest: Digest = d
                    .digest()
                    .to_string()
                    .parse()
                    .with_context(|| format!("index.json of {}", self.root.display()))?;
                let body = self.blob(&digest, MAX_MANIFEST)?;
                Ok(Fetched {
                    media_type: Some(d.media_type().to_string()),
                    body,
                    digest,
                })
            }
            (None, Some(tag)) => {
                let names: Vec<String> = entries
                    .iter()
                    .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).cloned())
                    .collect();
                bail!(
                    "no entry tagged {tag:?} in {} (it has: {})",
                    path.display(),
                    if names.is_empty() {
                        "no tagged entries".to_owned()
                    } else {
                        names.join(", ")
                    }
                )
            }
            (None, None) => Ok(Fetched {
                media_type: Some(oci::media_type::OCI_INDEX.to_owned()),
                digest: Digest::sha256_of(&body),
                body,
            }),
        }
    }
}
