//! Read-through: repositories served from this server's disk and filled from an
//! upstream registry on a miss. The same mechanism is a pull-through mirror of a public
//! registry (`[[upstreams]]` with a `name`, the first path component that selects it)
//! and an edge tier in front of a central layercache (`serve --upstream URL`: an
//! upstream without a name serves every other repository, and pushes pass through to it).
//!
//! Digests never change, so content fetched once is served from disk for as long as it
//! is kept; a tag is revalidated (a `HEAD`) once older than the upstream's `tag_ttl`, and
//! served stale when the upstream cannot answer. Blob fills are verified and coalesced
//! by the store (see [`store::Fill`]).

mod actions;
mod client;
mod metrics;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use oci::{Digest, Manifest, Reference, RepoName, Tag};
use store::error::Missing;
use store::meta::StoredManifest;
use store::{BlobRead, Error, Fill, PutManifest, SourceFailure, Store};

pub use actions::EntryAsk;
use client::Client;
pub use metrics::{UpstreamMetrics, UpstreamStats};

/// The upstream that serves repositories without a prefix of their own when no edge
/// upstream does: what dockerd's `registry-mirrors` and BuildKit's `mirrors` ask for.
const DOCKER_HUB: &str = "docker.io";
/// Blobs pushed to the centre at once while a manifest is pushed through an edge.
const PUSH_CONCURRENCY: usize = 4;

/// One upstream registry, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The first path component that selects it (clients pull `HOST/docker.io/library/
    /// alpine`); empty for a central layercache in front of which this one is an edge,
    /// serving every repository no other upstream names.
    #[serde(default)]
    pub name: String,
    /// Its base URL (`https://registry-1.docker.io`).
    pub url: String,
    /// What to log in with (anonymous without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// Extra certificate authorities (PEM) to trust for it, beside the public ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How long a tag is served before it is revalidated; digests never are [default:
    /// 10 minutes; for an edge's centre, which is close, 0: every lookup asks it].
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub tag_ttl: Option<Duration>,
    /// How long an answer from it may go without a byte before it is given up (the
    /// fill fails, its clients are released and the partial bytes discarded)
    /// [default: 60 seconds].
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub read_timeout: Option<Duration>,
}

impl Config {
    /// The tag lifetime in force.
    fn effective_tag_ttl(&self) -> Duration {
        match (self.tag_ttl, self.name.is_empty()) {
            (Some(ttl), _) => ttl,
            (None, true) => Duration::ZERO,
            (None, false) => Duration::from_secs(600),
        }
    }

    /// An edge's central layercache at `url`, with a token (any user name).
    pub fn centre(url: String, token_file: Option<PathBuf>) -> Config {
        Config {
            name: String::new(),
            url,
            credentials: token_file.map(|file| Credentials {
                username: "edge".into(),
                password_env: None,
                password_file: Some(file),
            }),
            ca_file: None,
            tag_ttl: None,
            read_timeout: None,
        }
    }
}

/// A user name and where its password (or token) is read from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// A file holding the password (its surrounding whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl Credentials {
    fn password(&self) -> Result<String, String> {
        match (&self.password_env, &self.password_file) {
            (Some(var), None) => {
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))
            }
            (None, Some(file)) => std::fs::read_to_string(file)
                .map(|p| p.trim().to_owned())
                .map_err(|e| format!("reading {}: {e}", file.display())),
            _ => Err("credentials need exactly one of password_env and password_file".into()),
        }
    }
}

/// How a read was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// From this server's disk.
    Hit,
    /// Fetched from the upstream now.
    Filled,
    /// From disk, although the upstream could not confirm it is current.
    Stale,
}

/// Every configured upstream.
#[derive(Default)]
pub struct Upstreams {
    list: Vec<Upstream>,
    /// What each did, for `/metrics`.
    pub metrics: UpstreamMetrics,
}

/// One upstream and what this server knows of its tags.
pub struct Upstream {
    /// Its name (empty for an edge's centre).
    pub name: String,
    client: Arc<Client>,
    /// Its cache service, when it is an edge's centre.
    cache: Option<actions::CentreCache>,
    tag_ttl: Duration,
    /// When each tag was last found current, by local repository and tag.
    validated: Mutex<HashMap<(RepoName, String), Instant>>,
}

/// Where a repository's reads are filled from.
pub struct Route<'a> {
    /// The upstream.
    pub upstream: &'a Upstream,
    /// The repository as stored here (`docker.io/library/alpine`).
    pub local: RepoName,
    /// The repository as the upstream names it (`library/alpine`).
    remote: String,
    /// The name has no upstream's prefix: it may as well be a repository of this server
    /// that does not exist yet (the first push of a build's cache probes it).
    implicit: bool,
    metrics: &'a UpstreamMetrics,
}

/// A blob to answer a read with.
pub enum BlobAnswer {
    /// Stored here.
    Stored(BlobRead),
    /// Being fetched from the upstream.
    Filling(Fill),
}

impl Upstreams {
    /// The upstreams `configs` describe (manifests up to `max_manifest_bytes`).
    pub fn new(configs: &[Config], max_manifest_bytes: usize) -> Result<Upstreams, String> {
        let mut list = Vec::new();
        for config in configs {
            if !config.name.is_empty() && config.name.parse::<RepoName>().is_err() {
                return Err(format!(
                    "upstream name {:?} is not a repository path component",
                    config.name
                ));
            }
            if list.iter().any(|u: &Upstream| u.name == config.name) {
                return Err(format!("two upstreams are named {:?}", config.name));
            }
            let client = Client::new(config, max_manifest_bytes)?;
            let cache = config
                .name
                .is_empty()
                .then(|| actions::CentreCache::new(config, client.base().clone()))
                .transpose()?;
            list.push(Upstream {
                name: config.name.clone(),
                client: Arc::new(client),
                cache,
                tag_ttl: config.effective_tag_ttl(),
                validated: Mutex::default(),
            });
        }
        Ok(Upstreams {
            list,
            metrics: UpstreamMetrics::default(),
        })
    }

    /// What each upstream did since the server started.
    pub fn stats(&self) -> Vec<UpstreamStats> {
        self.list.iter().map(|u| self.metrics.stats(u)).collect()
    }

    /// An edge's central layercache, if this server is an edge.
    pub fn centre(&self) -> Option<&Upstream> {
        self.list.iter().find(|u| u.name.is_empty())
    }

    /// The upstream behind `repo`, if any: the one its first component names, else an
    /// edge's centre, else, for a read of a repository with nothing stored under its own
    /// name, Docker Hub's mirror (which stores it under `docker.io/`).
    pub async fn route(
        &self,
        store: &Store,
        repo: &RepoName,
        write: bool,
    ) -> Result<Option<Route<'_>>, Error> {
        if self.list.is_empty() {
            return Ok(None);
        }
        let path = repo.as_str();
        let named = path.split_once('/').and_then(|(first, rest)| {
            self.list
                .iter()
                .find(|u| !u.name.is_empty() && u.name == first)
                .map(|u| (u, rest))
        });
        let (upstream, local, remote, implicit) = if let Some((upstream, rest)) = named {
            (
                upstream,
                repo.clone(),
                hub_name(&upstream.name, rest),
                false,
            )
        } else if let Some(centre) = self.centre() {
            (centre, repo.clone(), path.to_owned(), false)
        } else if let Some(hub) = self.list.iter().find(|u| u.name == DOCKER_HUB && !write) {
            if store.has_repository(repo).await? {
                return Ok(None);
            }
            let Ok(local) = format!("{DOCKER_HUB}/{path}").parse() else {
                return Ok(None);
            };
            (hub, local, hub_name(DOCKER_HUB, path), true)
        } else {
            return Ok(None);
        };
        Ok(Some(Route {
            upstream,
            local,
            remote,
            implicit,
            metrics: &self.metrics,
        }))
    }
}

/// Docker Hub's name for `path`: official images live under `library/`.
fn hub_name(upstream: &str, path: &str) -> String {
    if upstream == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_owned()
    }
}

impl Upstream {
    /// Its base URL (`https://registry-1.docker.io`).
    pub fn url(&self) -> &reqwest::Url {
        self.client.base()
    }

    /// Whether pushes to its repositories pass through to it (an edge's centre); a
    /// public registry's mirror is read-only.
    pub fn takes_pushes(&self) -> bool {
        self.name.is_empty()
    }

    fn is_current(&self, repo: &RepoName, tag: &Tag) -> bool {
        let validated = self.validated.lock().unwrap_or_else(|p| p.into_inner());
        validated
            .get(&(repo.clone(), tag.to_string()))
            .is_some_and(|at| at.elapsed() < self.tag_ttl)
    }

    fn validate(&self, repo: &RepoName, tag: &Tag) {
        if self.tag_ttl.is_zero() {
            return;
        }
        self.validated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((repo.clone(), tag.to_string()), Instant::now());
    }
}

impl Route<'_> {
    /// The manifest `reference` names: from disk while current, else from the upstream
    /// (stored for next time); stale from disk when the upstream cannot answer.
    pub async fn manifest(
        &self,
        store: &Store,
        reference: &Reference,
    ) -> Result<(StoredManifest, Served), Error> {
        let found = self.lookup_manifest(store, reference).await;
        found.map_err(|e| self.absent(e, Missing::Manifest))
    }

    /// What a failure of the upstream means for the client: the upstream's "not found"
    /// is the registry's; for an implicit name, whatever the upstream could not provide
    /// is simply not here.
    pub fn absent(&self, error: Error, missing: Missing) -> Error {
        match error {
            Error::Source {
                failure: SourceFailure::NotFound,
                ..
            } => Error::NotFound(missing),
            Error::Source { message, .. } if self.implicit => {
                tracing::debug!(repo = %self.remote, reason = message, "not from Docker Hub either");
                Error::NotFound(missing)
            }
            e => e,
        }
    }

    async fn lookup_manifest(
        &self,
        store: &Store,
        reference: &Reference,
    ) -> Result<(StoredManifest, Served), Error> {
        let stored = match store.get_manifest(&self.local, reference).await {
            Ok(stored) => Some(stored),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let tag = match reference {
            Reference::Tag(tag) => tag,
            Reference::Digest(_) => {
                return match stored {
                    Some(stored) => Ok(self.served(stored, Served::Hit)),
                    None => self.fill_manifest(store, reference).await,
                };
            }
        };
        let Some(stored) = stored else {
            return self.fill_manifest(store, reference).await;
        };
        if self.upstream.is_current(&self.local, tag) {
            return Ok(self.served(stored, Served::Hit));
        }
        let upstream = self
            .upstream
            .client
            .manifest_digest(&self.remote, tag.as_str())
            .await;
        match upstream {
            Ok(digest) if digest == stored.digest => {
                self.upstream.validate(&self.local, tag);
                Ok(self.served(stored, Served::Hit))
            }
            // Moved, but not fetched: an outage, or new bytes that are not what the
            // upstream said (a broken upstream); the verified copy is served meanwhile.
            Ok(_) => match self.fill_manifest(store, reference).await {
                Err(Error::Source { failure, message })
                    if failure.is_outage() || failure == SourceFailure::Corrupt =>
                {
                    Ok(self.stale(stored, &message))
                }
                other => other,
            },
            Err(Error::Source {
                failure: SourceFailure::NotFound,
                ..
            }) => {
                // Gone upstream: gone here.
                let _ = store.delete_manifest(&self.local, reference).await;
                Err(Error::NotFound(Missing::Manifest))
            }
            Err(Error::Source { message, .. }) => Ok(self.stale(stored, &message)),
            Err(e) => Err(e),
        }
    }

    async fn fill_manifest(
        &self,
        store: &Store,
        reference: &Reference,
    ) -> Result<(StoredManifest, Served), Error> {
        let expected = match reference {
            Reference::Digest(digest) => Some(digest),
            Reference::Tag(_) => None,
        };
        let fetched = self
            .upstream
            .client
            .manifest(&self.remote, &reference.to_string(), expected)
            .await
            .inspect_err(|_| {
                self.metrics.failure_counter(self.upstream).inc();
            })?;
        self.metrics
            .filled(self.upstream, "manifest", fetched.body.len() as u64);
        store
            .put_mirrored_manifest(
                &self.local,
                reference,
                fetched.media_type.as_deref(),
                fetched.body,
                fetched.records,
            )
            .await
            .map_err(|e| match e {
                // Not one a registry may serve: the upstream's fault, not the client's.
                Error::ManifestInvalid(_) | Error::ManifestTooLarge { .. } => Error::Source {
                    failure: SourceFailure::Corrupt,
                    message: format!("the upstream's manifest {reference}: {e}"),
                },
                e => e,
            })?;
        if let Reference::Tag(tag) = reference {
            self.upstream.validate(&self.local, tag);
        }
        let stored = store
            .get_manifest(&self.local, &Reference::Digest(fetched.digest))
            .await?;
        Ok((stored, Served::Filled))
    }

    fn served(&self, stored: StoredManifest, served: Served) -> (StoredManifest, Served) {
        self.metrics.hit(self.upstream, "manifest");
        (stored, served)
    }

    fn stale(&self, stored: StoredManifest, why: &str) -> (StoredManifest, Served) {
        tracing::warn!(upstream = %self.upstream.name, repo = %self.local, reason = why, "serving a stale tag");
        self.metrics.stale(self.upstream);
        (stored, Served::Stale)
    }

    /// Blob `digest`: from disk, linked from another repository that holds it (when the
    /// upstream confirms this one has it too), or filled from the upstream.
    pub async fn blob(&self, store: &Store, digest: &Digest) -> Result<BlobAnswer, Error> {
        let found = self.stored_or_filling(store, digest).await;
        found.map_err(|e| self.absent(e, Missing::Blob))
    }

    async fn stored_or_filling(&self, store: &Store, digest: &Digest) -> Result<BlobAnswer, Error> {
        match store.open_blob(&self.local, digest).await {
            Ok(blob) => {
                self.metrics.hit(self.upstream, "blob");
                return Ok(BlobAnswer::Stored(blob));
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        if store.stored_blob_size(digest).await?.is_some() {
            let confirmed = match self.upstream.client.blob_size(&self.remote, digest).await {
                Ok(size) => size.is_some(),
                // The bytes are verified; an outage does not withhold them.
                Err(Error::Source { failure, .. }) => failure.is_outage(),
                Err(e) => return Err(e),
            };
            if confirmed && store.mount_blob(&self.local, digest, None).await?.is_some() {
                self.metrics.hit(self.upstream, "blob");
                return Ok(BlobAnswer::Stored(
                    store.open_blob(&self.local, digest).await?,
                ));
            }
        }
        let (client, remote, target) = (
            self.upstream.client.clone(),
            self.remote.clone(),
            digest.clone(),
        );
        let counter = self.metrics.bytes_counter(self.upstream);
        let fill = store.fill_blob(&self.local, digest, move || {
            Box::pin(async move {
                let mut source = client.blob(&remote, &target).await?;
                source.body = Box::pin(source.body.inspect_ok(move |chunk| {
                    counter.inc_by(chunk.len() as u64);
                }));
                Ok(source)
            })
        });
        if fill.started {
            self.metrics.filled(self.upstream, "blob", 0);
            let finished = fill.finished();
            let failures = self.metrics.failure_counter(self.upstream);
            let (upstream, digest) = (self.upstream.name.clone(), digest.clone());
            tokio::spawn(async move {
                if let Err(e) = finished.await {
                    failures.inc();
                    tracing::warn!(upstream, %digest, error = %e, "filling a blob failed");
                }
            });
        }
        Ok(BlobAnswer::Filling(fill))
    }

    /// Size of blob `digest`, from disk or as the upstream says (nothing is fetched).
    pub async fn blob_size(&self, store: &Store, digest: &Digest) -> Result<u64, Error> {
        let found = self.stored_or_upstream_size(store, digest).await;
        found.map_err(|e| self.absent(e, Missing::Blob))
    }

    async fn stored_or_upstream_size(&self, store: &Store, digest: &Digest) -> Result<u64, Error> {
        match store.open_blob(&self.local, digest).await {
            Ok(blob) => return Ok(blob.size),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        match self.upstream.client.blob_size(&self.remote, digest).await {
            Ok(Some(size)) => Ok(size),
            Ok(None) => Err(Error::NotFound(Missing::Blob)),
            Err(e) => Err(e),
        }
    }

    /// Push a manifest through to the upstream (first the blobs it lacks, from this
    /// server's copies), then keep it here.
    pub async fn push_manifest(
        &self,
        store: &Store,
        reference: &Reference,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<PutManifest, Error> {
        let parsed = Manifest::parse(content_type, &body)?;
        let blobs: Vec<Digest> = parsed
            .references
            .iter()
            .filter(|r| r.kind == oci::RefKind::Blob && r.required)
            .map(|r| r.digest.clone())
            .collect();
        let pushes: Vec<_> = blobs.iter().map(|d| self.push_blob(store, d)).collect();
        futures::stream::iter(pushes)
            .buffer_unordered(PUSH_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let client = &self.upstream.client;
        client
            .put_manifest(
                &self.remote,
                &reference.to_string(),
                &parsed.media_type,
                body.clone(),
            )
            .await?;
        let put = store
            .put_mirrored_manifest(&self.local, reference, content_type, body, None)
            .await?;
        if let Reference::Tag(tag) = reference {
            self.upstream.validate(&self.local, tag);
        }
        Ok(put)
    }

    /// Make sure the upstream holds blob `digest`, pushing this server's copy if not.
    async fn push_blob(&self, store: &Store, digest: &Digest) -> Result<(), Error> {
        let client = &self.upstream.client;
        if client.blob_size(&self.remote, digest).await?.is_some() {
            return Ok(());
        }
        let blob = store
            .open_blob(&self.local, digest)
            .await
            .map_err(|e| match e {
                Error::NotFound(_) => Error::ManifestBlobUnknown {
                    digest: digest.clone(),
                    kind: "blob",
                },
                e => e,
            })?;
        let size = blob.size;
        client
            .push_blob(&self.remote, digest, size, blob.stream(None).await?)
            .await
    }

    /// Delete a tag or manifest upstream, then here.
    pub async fn delete_manifest(&self, store: &Store, reference: &Reference) -> Result<(), Error> {
        self.upstream
            .client
            .delete_manifest(&self.remote, &reference.to_string())
            .await?;
        match store.delete_manifest(&self.local, reference).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
