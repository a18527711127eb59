//! Fetch what a reference names, following an index to the image for the platform:
//! an image (manifest + config) or a BuildKit cache export (index or manifest + cache
//! config), from a registry or an OCI layout.

use anyhow::{Context, bail};
use diagnose::explain::cache::{Cache, CacheConfig, CacheForm};
use diagnose::explain::document::{Descriptor, Document, Platform, select_platform};
use diagnose::explain::image::Image;
use oci::Digest;

use super::layout::Layout;
use super::reference::Location;
use super::registry::{Fetched, MAX_MANIFEST, Registry};

/// Largest config or cache config read.
const MAX_CONFIG: usize = 32 << 20;

/// Where the content of one reference comes from.
pub enum Source {
    /// A registry repository.
    Registry {
        /// The client.
        registry: Registry,
        /// The repository.
        repo: String,
        /// The tag or digest asked for.
        reference: String,
    },
    /// An OCI layout.
    Layout {
        /// The layout.
        layout: Layout,
        /// The entry asked for.
        tag: Option<String>,
    },
}

impl Source {
    /// The source of `location`.
    pub fn open(location: &Location) -> anyhow::Result<Source> {
        Ok(match location {
            Location::Registry(r) => Source::Registry {
                registry: Registry::new(&r.base)?,
                repo: r.repo.clone(),
                reference: r.reference.clone(),
            },
            Location::Layout { path, tag } => Source::Layout {
                layout: Layout::open(path)?,
                tag: tag.clone(),
            },
        })
    }

    async fn top(&self) -> anyhow::Result<Fetched> {
        match self {
            Source::Registry {
                registry,
                repo,
                reference,
            } => registry.manifest(repo, reference).await,
            Source::Layout { layout, tag } => layout.top(tag.as_deref()),
        }
    }

    async fn manifest(&self, descriptor: &Descriptor) -> anyhow::Result<Fetched> {
        let digest = digest_of(descriptor)?;
        match self {
            Source::Registry { registry, repo, .. } => {
                let mut fetched = registry.manifest(repo, &digest.to_string()).await?;
                if fetched.media_type.is_none() {
                    fetched.media_type = Some(descriptor.media_type().to_string());
                }
                Ok(fetched)
            }
            Source::Layout { layout, .. } => Ok(Fetched {
                media_type: Some(descriptor.media_type().to_string()),
                body: layout.blob(&digest, MAX_MANIFEST)?,
                digest,
            }),
        }
    }

    async fn blob(&self, descriptor: &Descriptor, what: &str) -> anyhow::Result<Vec<u8>> {
        let digest = digest_of(descriptor)?;
        let size = descriptor.size();
        if size > MAX_CONFIG as u64 {
            bail!("{what} is {size} bytes, more than the {MAX_CONFIG} explain reads");
        }
        let bytes = match self {
            Source::Registry { registry, repo, .. } => {
                registry.blob(repo, &digest, MAX_CONFIG).await
            }
            Source::Layout { layout, .. } => layout.blob(&digest, MAX_CONFIG),
        };
        bytes.with_context(|| format!("fetching {what}"))
    }
}

fn digest_of(descriptor: &Descriptor) -> anyhow::Result<Digest> {
    descriptor
        .digest()
        .to_string()
        .parse()
        .context("a descriptor with an unusable digest")
}

/// What a reference resolved to.
pub enum Resolved {
    /// An image.
    Image {
        /// The image manifest's digest.
        digest: Digest,
        /// The image.
        image: Image,
    },
    /// A BuildKit cache export.
    Cache {
        /// The export's index or manifest digest.
        digest: Digest,
        /// The cache.
        cache: Cache,
    },
}

impl Resolved {
    /// The digest of the manifest (or index) it came from.
    pub fn digest(&self) -> &Digest {
        match self {
            Resolved::Image { digest, .. } | Resolved::Cache { digest, .. } => digest,
        }
    }
}

/// Fetch `location`, following an index to the image for `platform`.
pub async fn resolve(location: &Location, platform: &Platform) -> anyhow::Result<Resolved> {
    let source = Source::open(location)?;
    let mut fetched = source.top().await?;
    // An index of images, then the image: two levels are all a registry nests.
    for _ in 0..3 {
        let document = Document::parse(fetched.media_type.as_deref(), &fetched.body)
            .with_context(|| format!("reading {location}"))?;
        match document {
            Document::ImageIndex(index) => {
                let chosen = select_platform(&index, platform)
                    .with_context(|| format!("reading {location}"))?;
                fetched = source.manifest(&chosen).await?;
            }
            Document::Image(manifest) => {
                let config = source
                    .blob(manifest.config(), &format!("the config of {location}"))
                    .await?;
                let image = Image::from_parts(&manifest, &config)
                    .with_context(|| format!("reading {location}"))?;
                return Ok(Resolved::Image {
                    digest: fetched.digest,
                    image,
                });
            }
            Document::CacheIndex(index) => {
                let Some(config) = index
                    .manifests()
                    .iter()
                    .find(|d| d.media_type().as_ref() == oci::media_type::BUILDKIT_CACHE_CONFIG)
                else {
                    bail!("{location} is a cache index without a cache config");
                };
                let bytes = source
                    .blob(config, &format!("the cache config of {location}"))
                    .await?;
                let parsed =
                    CacheConfig::parse(&bytes).with_context(|| format!("reading {location}"))?;
                let cache = Cache::from_export(CacheForm::Index, &parsed, index.manifests())
                    .with_context(|| format!("reading {location}"))?;
                return Ok(Resolved::Cache {
                    digest: fetched.digest,
                    cache,
                });
            }
            Document::CacheManifest(manifest) => {
                let bytes = source
                    .blob(
                        manifest.config(),
                        &format!("the cache config of {location}"),
                    )
                    .await?;
                let parsed =
                    CacheConfig::parse(&bytes).with_context(|| format!("reading {location}"))?;
                let cache =
                    Cache::from_export(CacheForm::ImageManifest, &parsed, manifest.layers())
                        .with_context(|| format!("reading {location}"))?;
                return Ok(Resolved::Cache {
                    digest: fetched.digest,
                    cache,
                });
            }
        }
    }
    bail!("{location}: indexes nested too deep")
}
