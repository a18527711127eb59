//! The workloads, each run the same way against either server: blob push (monolithic and
//! chunked), pulls, HEAD and manifest request rates, and a BuildKit-style cache export.
//!
//! Fixed-duration workloads are closed loops ([`loadgen`]): `n` tasks, each on its own
//! connection, issue one request after another until the deadline; a request that is not
//! a 2xx fails the whole run.

use std::time::Instant;

use anyhow::{Result, ensure};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use serde_json::json;
use tokio::task::JoinSet;

use crate::eviction::Fill;
use crate::limits::mbps;
use crate::loadgen::{self, Request};
use crate::payload::{Base, Blob, MIB};
use crate::registry::{OCI_INDEX, OCI_MANIFEST, Registry};

/// Repository for pushed and pulled large blobs.
pub const REPO_BLOBS: &str = "bench/blobs";
/// Repository of the cache export (and the blobs the HEAD workload asks for).
pub const REPO_CACHE: &str = "bench/cache";
/// Repository of the manifest workloads.
pub const REPO_MANIFESTS: &str = "bench/manifests";

/// Shape of the workloads.
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    /// Size of the pushed and pulled blob, in MiB.
    pub blob_mib: usize,
    /// Chunk size of the chunked push, in MiB.
    pub chunk_mib: usize,
    /// Number of concurrent pulls.
    pub pulls: usize,
    /// Size of each concurrently pulled blob, in MiB.
    pub pull_mib: usize,
    /// Concurrent connections of the HEAD workload.
    pub head_conns: usize,
    /// Duration of the HEAD workload, in seconds.
    pub head_secs: f64,
    /// Concurrent connections of the manifest workloads.
    pub manifest_conns: usize,
    /// Duration of each manifest workload, in seconds.
    pub manifest_secs: f64,
    /// Blobs in the cache export.
    pub export_blobs: usize,
    /// Large blobs among them.
    pub export_large: usize,
    /// Size of each large one, in MiB.
    pub export_large_mib: usize,
    /// Blobs missing from the repository before each export.
    pub export_missing: usize,
    /// Large blobs among the missing ones.
    pub export_missing_large: usize,
    /// Concurrent HEADs during the export (BuildKit's default is in this range).
    pub export_head_conns: usize,
    /// Concurrent uploads during the export.
    pub export_upload_conns: usize,
    /// Size of the file the GitHub Actions cache client saves and restores, in MiB.
    pub actions_mib: usize,
    /// The eviction workload's fill of many small images (also the one a push and a pull
    /// run beside the pass of).
    pub evict_small: Fill,
    /// The eviction workload's fill of fewer large images.
    pub evict_large: Fill,
    /// Share of the blob bytes the eviction workload's lowered quota keeps, in percent.
    pub evict_keep_pct: u64,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape {
            blob_mib: 1024,
            chunk_mib: 64,
            pulls: 8,
            pull_mib: 128,
            head_conns: 64,
            head_secs: 10.0,
            manifest_conns: 16,
            manifest_secs: 5.0,
            export_blobs: 300,
            export_large: 5,
            export_large_mib: 100,
            export_missing: 15,
            export_missing_large: 1,
            export_head_conns: 8,
            export_upload_conns: 4,
            actions_mib: 1024,
            evict_small: Fill {
                images: 4000,
                layers: 3,
                layer_kib: 256,
            },
            evict_large: Fill {
                images: 200,
                layers: 2,
                layer_kib: 16 * 1024,
            },
            evict_keep_pct: 10,
        }
    }
}

/// Request rate and latency of a closed-loop workload.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Rate {
    /// Successful requests.
    pub requests: u64,
    /// Successful requests per second.
    pub per_sec: f64,
    /// Median latency, in milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile latency, in milliseconds.
    pub p99_ms: f64,
}

/// Blobs every server gets before the first round; identical for both servers.
pub struct Fixtures {
    /// The concurrently pulled blobs.
    pub pulls: Vec<Blob>,
    /// The cache blobs already in the repository (also the HEAD workload's targets).
    pub cache_existing: Vec<Blob>,
    /// Config blob the benchmark manifests reference.
    pub manifest_config: Blob,
    /// Layer blob the benchmark manifests reference.
    pub manifest_layer: Blob,
}

impl Fixtures {
    /// Build the fixtures from `base` (large ones) and seeded random bytes (small ones).
    pub fn new(base: &Base, shape: &Shape) -> Result<Fixtures> {
        let pulls = (0..shape.pulls)
            .map(|i| base.blob(shape.pull_mib, &format!("pull-{i}")))
            .collect::<Result<Vec<_>>>()?;
        let existing = shape.export_blobs.saturating_sub(shape.export_missing);
        let large = shape
            .export_large
            .saturating_sub(shape.export_missing_large);
        let mut cache_existing = Vec::with_capacity(existing);
        for i in 0..existing {
            cache_existing.push(if i < large {
                base.blob(shape.export_large_mib, &format!("cache-{i}"))?
            } else {
                small_blob(1_000_000 + i as u64)
            });
        }
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        Ok(Fixtures {
            pulls,
            cache_existing,
            manifest_config: Blob::from_bytes(Bytes::from(serde_json::to_vec(&config)?)),
            manifest_layer: Blob::random(4096, 42),
        })
    }

    /// Push every fixture to `registry`.
    pub async fn push_to(&self, registry: &Registry) -> Result<()> {
        for blob in &self.pulls {
            registry.push(REPO_BLOBS, blob).await?;
        }
        futures::stream::iter(self.cache_existing.iter())
            .map(|blob| registry.push(REPO_CACHE, blob))
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        registry.push(REPO_MANIFESTS, &self.manifest_config).await?;
        registry.push(REPO_MANIFESTS, &self.manifest_layer).await
    }
}

/// A few KiB of random bytes, as most of BuildKit's cache blobs are.
fn small_blob(seed: u64) -> Blob {
    let len = 1024 + (seed.wrapping_mul(2_654_435_761) % (7 * 1024)) as usize;
    Blob::random(len, seed)
}

/// Monolithic push of `blob`, in MB/s.
pub async fn push_monolithic(registry: &Registry, blob: &Blob) -> Result<f64> {
    let start = Instant::now();
    registry.push(REPO_BLOBS, blob).await?;
    mbps(blob.len, start.elapsed().as_secs_f64())
}

/// Chunked push of `blob` in `chunk_mib` MiB parts, in MB/s.
pub async fn push_chunked(registry: &Registry, blob: &Blob, chunk_mib: usize) -> Result<f64> {
    let start = Instant::now();
    registry
        .push_chunked(REPO_BLOBS, blob, chunk_mib * MIB)
        .await?;
    mbps(blob.len, start.elapsed().as_secs_f64())
}

/// Pulls of the same blob in a round, each a sample of the pull figures. A cached 1 GiB
/// pull lasts a quarter of a second, and on a VM some pulls after a large write (the push
/// before them) run at half the rate and twice the CPU, the kernel's copy into the socket
/// taking four times as long: one pull a round would let one of them decide a median.
pub const PULLS_PER_ROUND: usize = 3;

/// Pull of `blob` (already pushed), in MB/s.
pub async fn pull(registry: &Registry, blob: &Blob) -> Result<f64> {
    let start = Instant::now();
    let got = registry.pull(REPO_BLOBS, &blob.digest).await?;
    let secs = start.elapsed().as_secs_f64();
    ensure!(
        got == blob.len,
        "pulled {got} bytes of {}, expected {}",
        blob.digest,
        blob.len
    );
    mbps(got, secs)
}

/// Concurrent pulls of distinct blobs, aggregate MB/s.
pub async fn pull_concurrent(registry: &Registry, blobs: &[Blob]) -> Result<f64> {
    let start = Instant::now();
    let mut set = JoinSet::new();
    for blob in blobs {
        let registry = registry.clone();
        let (digest, len) = (blob.digest.clone(), blob.len);
        set.spawn(async move {
            let got = registry.pull(REPO_BLOBS, &digest).await?;
            ensure!(got == len, "pulled {got} bytes of {digest}, expected {len}");
            Ok(got)
        });
    }
    let mut total = 0;
    while let Some(got) = set.join_next().await {
        total += got??;
    }
    mbps(total, start.elapsed().as_secs_f64())
}

/// `HEAD` of existing blobs from `conns` connections for `secs` seconds.
pub async fn head_load(
    registry: &Registry,
    fixtures: &Fixtures,
    conns: usize,
    secs: f64,
) -> Result<Rate> {
    let paths: Vec<String> = fixtures
        .cache_existing
        .iter()
        .map(|b| format!("/v2/{REPO_CACHE}/blobs/{}", b.digest))
        .collect();
    ensure!(!paths.is_empty(), "no blobs to HEAD");
    let target = registry.target()?;
    let (rate, _) = loadgen::closed_loop(&target, "", conns, secs, move |task, i| {
        let k = (task * 37 + i as usize) % paths.len();
        Request {
            method: "HEAD",
            path: paths.get(k).cloned().unwrap_or_default(),
            body: Bytes::new(),
        }
    })
    .await?;
    Ok(rate)
}

/// `PUT` of distinct small manifests under distinct tags `<prefix>-<task>-<i>` from
/// `conns` connections for `secs` seconds; returns the rate and the tags written.
pub async fn manifest_put_load(
    registry: &Registry,
    fixtures: &Fixtures,
    prefix: &str,
    conns: usize,
    secs: f64,
) -> Result<(Rate, Vec<String>)> {
    let config = descriptor(
        "application/vnd.oci.image.config.v1+json",
        &fixtures.manifest_config,
    );
    let layer = descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &fixtures.manifest_layer,
    );
    let owned_prefix = prefix.to_owned();
    let target = registry.target()?;
    let headers = format!("Content-Type: {OCI_MANIFEST}\r\n");
    let (rate, counts) = loadgen::closed_loop(&target, &headers, conns, secs, move |task, i| {
        let tag = format!("{owned_prefix}-{task}-{i}");
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [layer],
            "annotations": {"org.opencontainers.image.ref.name": tag},
        });
        Request {
            method: "PUT",
            path: format!("/v2/{REPO_MANIFESTS}/manifests/{tag}"),
            body: Bytes::from(manifest.to_string()),
        }
    })
    .await?;
    let tags = counts
        .iter()
        .enumerate()
        .flat_map(|(task, &n)| (0..n).map(move |i| format!("{prefix}-{task}-{i}")))
        .collect();
    Ok((rate, tags))
}

/// `GET` of manifests by tag (cycling through `tags`) from `conns` connections for
/// `secs` seconds.
pub async fn manifest_get_load(
    registry: &Registry,
    tags: Vec<String>,
    conns: usize,
    secs: f64,
) -> Result<Rate> {
    ensure!(!tags.is_empty(), "no tags to GET");
    let target = registry.target()?;
    let headers = format!("Accept: {OCI_MANIFEST}\r\n");
    let (rate, _) = loadgen::closed_loop(&target, &headers, conns, secs, move |task, i| {
        let k = (task * 7919 + i as usize) % tags.len();
        Request {
            method: "GET",
            path: format!(
                "/v2/{REPO_MANIFESTS}/manifests/{}",
                tags.get(k).map_or("", |t| t)
            ),
            body: Bytes::new(),
        }
    })
    .await?;
    Ok(rate)
}

/// A BuildKit-style registry cache export: `HEAD` every blob, upload the missing ones
/// (`POST` + `PUT`), upload the cache config and `PUT` the cache index under `tag`;
/// returns the total seconds.
pub async fn cache_export(
    registry: &Registry,
    fixtures: &Fixtures,
    missing: &[Blob],
    shape: &Shape,
    tag: &str,
) -> Result<f64> {
    let layers: Vec<&Blob> = fixtures.cache_existing.iter().chain(missing).collect();
    let config = cache_config(&layers)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": layers
            .iter()
            .map(|b| {
                json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": b.digest,
                    "size": b.len,
                    "annotations": {
                        "buildkit/createdat": "2024-01-01T00:00:00Z",
                        "containerd.io/uncompressed": b.digest,
                    },
                })
            })
            .chain(std::iter::once(descriptor(
                "application/vnd.buildkit.cacheconfig.v0",
                &config,
            )))
            .collect::<Vec<_>>(),
    });
    let index = Bytes::from(serde_json::to_vec(&index)?);

    let start = Instant::now();
    let wanted: Vec<&Blob> = layers
        .iter()
        .copied()
        .chain(std::iter::once(&config))
        .collect();
    let found: Vec<(bool, &Blob)> = futures::stream::iter(wanted)
        .map(|blob| async move {
            Ok::<_, anyhow::Error>((registry.exists(REPO_CACHE, &blob.digest).await?, blob))
        })
        .buffered(shape.export_head_conns)
        .try_collect()
        .await?;
    let to_upload: Vec<&Blob> = found
        .into_iter()
        .filter(|(e, _)| !e)
        .map(|(_, b)| b)
        .collect();
    ensure!(
        to_upload.len() == missing.len() + 1,
        "{} blobs missing before the export, expected {}",
        to_upload.len(),
        missing.len() + 1
    );
    futures::stream::iter(to_upload)
        .map(|blob| registry.push(REPO_CACHE, blob))
        .buffer_unordered(shape.export_upload_conns)
        .try_collect::<Vec<()>>()
        .await?;
    registry
        .put_manifest(REPO_CACHE, tag, OCI_INDEX, index)
        .await?;
    Ok(start.elapsed().as_secs_f64())
}

/// The blobs missing before an export, unique to `label` (server and round).
pub fn export_missing(base: &Base, shape: &Shape, label: &str, seed: u64) -> Result<Vec<Blob>> {
    (0..shape.export_missing)
        .map(|i| {
            if i < shape.export_missing_large {
                base.blob(shape.export_large_mib, &format!("export-{label}-{i}"))
            } else {
                Ok(small_blob(seed * 1000 + i as u64))
            }
        })
        .collect()
}

/// A `application/vnd.buildkit.cacheconfig.v0` blob naming every layer.
fn cache_config(layers: &[&Blob]) -> Result<Blob> {
    let config = json!({
        "layers": layers
            .iter()
            .enumerate()
            .map(|(i, b)| json!({"blob": b.digest, "parent": if i == 0 { -1 } else { i as i64 - 1 }}))
            .collect::<Vec<_>>(),
        "records": layers
            .iter()
            .enumerate()
            .map(|(i, b)| json!({"digest": b.digest, "layers": [{"layer": i}]}))
            .collect::<Vec<_>>(),
    });
    Ok(Blob::from_bytes(Bytes::from(serde_json::to_vec(&config)?)))
}

/// An OCI descriptor of `blob` with `media_type`.
pub fn descriptor(media_type: &str, blob: &Blob) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": blob.digest, "size": blob.len})
}
