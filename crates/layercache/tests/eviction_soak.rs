//! Eviction under load and under crashes.
//!
//! * A soak: pushers and pullers run against a server with a tiny quota while passes run
//!   back to back. A pull that got its manifest must get every blob it references, intact
//!   (the in-use lease); a push may be told MANIFEST_BLOB_UNKNOWN and retries; an evicted
//!   tag is a cache miss. Afterwards the store holds exactly what its manifests reference.
//! * A crash test: a full store restarted with a small quota is killed (`kill -9`) while
//!   its startup pass evicts, several times; once it settles, everything still listed is
//!   whole, nothing unreferenced is left on disk, and the least recently used went first.
//! * Two small, exact cases of how much a pass evicts: only what it needs when the freed
//!   blobs are within their grace, and an index's children before newer roots.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
/// Pushes of one image (or index) before giving up on MANIFEST_BLOB_UNKNOWN.
const MAX_ATTEMPTS: usize = 25;

// ---- content ----

#[derive(Clone)]
struct Blob {
    bytes: Bytes,
    digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        let digest = common::digest_of(&bytes);
        Blob {
            bytes: Bytes::from(bytes),
            digest,
        }
    }

    fn random(rng: &mut StdRng, len: usize) -> Blob {
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        Blob::new(bytes)
    }
}

#[derive(Clone)]
struct Image {
    config: Blob,
    layers: Vec<Blob>,
    body: String,
    digest: String,
}

impl Image {
    fn new(config: Blob, layers: Vec<Blob>) -> Image {
        let descriptors: Vec<Value> = layers
            .iter()
            .map(|l| {
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": l.digest, "size": l.bytes.len()})
            })
            .collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": IMAGE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config.digest, "size": config.bytes.len()},
            "layers": descriptors,
        })
        .to_string();
        let digest = common::digest_of(body.as_bytes());
        Image {
            config,
            layers,
            body,
            digest,
        }
    }

    fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

#[derive(Clone)]
struct Index {
    children: Vec<Image>,
    body: String,
    digest: String,
}

impl Index {
    fn new(children: Vec<Image>) -> Index {
        let descriptors: Vec<Value> = children
            .iter()
            .zip(["amd64", "arm64", "riscv64"])
            .map(|(c, arch)| {
                serde_json::json!({"mediaType": IMAGE, "digest": c.digest, "size": c.body.len(),
                    "platform": {"architecture": arch, "os": "linux"}})
            })
            .collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": descriptors,
        })
        .to_string();
        let digest = common::digest_of(body.as_bytes());
        Index {
            children,
            body,
            digest,
        }
    }
}

/// A config blob unique to `nonce`.
fn config_blob(nonce: &str) -> Blob {
    Blob::new(
        serde_json::json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "nonce": nonce})
        .to_string()
        .into_bytes(),
    )
}

// ---- figures ----

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    pushes: AtomicU64,
    index_pushes: AtomicU64,
    tag_moves: AtomicU64,
    tag_moves_refused: AtomicU64,
    blob_unknown_retries: AtomicU64,
    blobs_uploaded: AtomicU64,
    blobs_skipped: AtomicU64,
    pulls: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    blobs_verified: AtomicU64,
    bytes_verified: AtomicU64,
    beyond_in_use: AtomicU64,
    corrupt: AtomicU64,
    failures: AtomicU64,
    gc_passes: AtomicU64,
    background_passes: AtomicU64,
    background_evicted: AtomicU64,
    background_removed: AtomicU64,
    evicted_roots: AtomicU64,
    blobs_removed: AtomicU64,
    bytes_freed: AtomicU64,
    kept_in_use: AtomicU64,
    max_usage_before: AtomicU64,
    max_usage_after: AtomicU64,
    /// The report of the pass that started at the highest usage.
    peak_report: Mutex<Option<Value>>,
    problems: Mutex<Vec<String>>,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn note(&self, what: String) {
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < 40 {
            problems.push(what);
        }
    }

    fn fail(&self, what: String) {
        Stats::add(&self.failures, 1);
        self.note(format!("FAILURE {what}"));
    }

    fn corrupt(&self, what: String) {
        Stats::add(&self.corrupt, 1);
        self.note(format!("CORRUPT {what}"));
    }
}

// ---- a registry client that counts its requests ----

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    stats: Arc<Stats>,
}

/// A blob read that went wrong.
enum BlobProblem {
    /// 200 but not the bytes the digest names.
    Corrupt(String),
    /// Anything else: a status other than 200, a connection error.
    Failed(String),
}

impl Client {
    fn new(base: &str, stats: Arc<Stats>) -> Client {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            base: base.to_owned(),
            stats,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        Stats::add(&self.stats.requests, 1);
        request
            .send()
            .await
            .map_err(|e| format!("connection error: {e:?}"))
    }

    /// Status, registry error code (if any) and body text of a response.
    async fn explain(r: reqwest::Response) -> (u16, String, String) {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, code, text)
    }

    async fn blob_exists(&self, repo: &str, blob: &Blob) -> Result<bool, String> {
        let r = self
            .send(
                self.http
                    .head(format!("{}/v2/{repo}/blobs/{}", self.base, blob.digest)),
            )
            .await?;
        match r.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            other => Err(format!("HEAD blob {repo} {}: {other}", blob.digest)),
        }
    }

    /// Upload `blob` monolithically (`POST ?digest=`) or as a session (`POST`, `PUT`).
    async fn upload(&self, repo: &str, blob: &Blob, session: bool) -> Result<(), String> {
        Stats::add(&self.stats.blobs_uploaded, 1);
        let base = &self.base;
        let digest = &blob.digest;
        let r = if session {
            let r = self
                .send(self.http.post(format!("{base}/v2/{repo}/blobs/uploads/")))
                .await?;
            if r.status() != 202 {
                let (status, code, text) = Client::explain(r).await;
                return Err(format!("POST upload {repo}: {status} {code} {text}"));
            }
            let location = r.headers()["location"].to_str().unwrap().to_owned();
            let url = if location.starts_with("http") {
                location
            } else {
                format!("{base}{location}")
            };
            let sep = if url.contains('?') { '&' } else { '?' };
            self.send(
                self.http
                    .put(format!("{url}{sep}digest={digest}"))
                    .header("content-type", "application/octet-stream")
                    .body(blob.bytes.clone()),
            )
            .await?
        } else {
            self.send(
                self.http
                    .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
                    .header("content-type", "application/octet-stream")
                    .body(blob.bytes.clone()),
            )
            .await?
        };
        if r.status() == 201 {
            Ok(())
        } else {
            let (status, code, text) = Client::explain(r).await;
            Err(format!("upload {repo} {digest}: {status} {code} {text}"))
        }
    }

    /// PUT a manifest: `Ok(None)` stored, `Ok(Some(message))` MANIFEST_BLOB_UNKNOWN.
    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &str,
    ) -> Result<Option<String>, String> {
        let r = self
            .send(
                self.http
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
                    .header("content-type", media_type)
                    .body(body.to_owned()),
            )
            .await?;
        if r.status() == 201 {
            return Ok(None);
        }
        let (status, code, text) = Client::explain(r).await;
        if status == 400 && code == "MANIFEST_BLOB_UNKNOWN" {
            return Ok(Some(text));
        }
        Err(format!(
            "PUT manifest {repo}:{reference}: {status} {code} {text}"
        ))
    }

    /// Push `image` under `reference`; on MANIFEST_BLOB_UNKNOWN upload every blob again
    /// and retry. On the first attempt, blobs in `pooled` the repository already holds
    /// are not uploaded (as real clients do after a HEAD).
    async fn push_image(
        &self,
        repo: &str,
        image: &Image,
        reference: &str,
        pooled: &HashSet<String>,
    ) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            for (i, blob) in image.blobs().enumerate() {
                if attempt == 0
                    && pooled.contains(&blob.digest)
                    && self.blob_exists(repo, blob).await?
                {
                    Stats::add(&self.stats.blobs_skipped, 1);
                    continue;
                }
                self.upload(repo, blob, i % 2 == 1).await?;
            }
            match self
                .put_manifest(repo, reference, IMAGE, &image.body)
                .await?
            {
                None => return Ok(()),
                Some(message) => last = message,
            }
            Stats::add(&self.stats.blob_unknown_retries, 1);
            backoff(attempt).await;
        }
        Err(format!(
            "push {repo}:{reference}: MANIFEST_BLOB_UNKNOWN {MAX_ATTEMPTS} times in a row, last {last}"
        ))
    }

    /// Push `index`'s children by digest, then the index under `tag`; on
    /// MANIFEST_BLOB_UNKNOWN (a child evicted meanwhile) push everything again.
    async fn push_index(
        &self,
        repo: &str,
        index: &Index,
        tag: &str,
        pooled: &HashSet<String>,
    ) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let pushing = Instant::now();
            for child in &index.children {
                self.push_image(repo, child, &child.digest, pooled).await?;
            }
            let children_pushed = pushing.elapsed();
            match self.put_manifest(repo, tag, INDEX, &index.body).await? {
                None => return Ok(()),
                Some(message) => {
                    last = format!(
                        "{message} (children pushed in {children_pushed:?}, refused {:?} after the first)",
                        pushing.elapsed()
                    );
                }
            }
            Stats::add(&self.stats.blob_unknown_retries, 1);
            backoff(attempt).await;
        }
        Err(format!(
            "push index {repo}:{tag}: MANIFEST_BLOB_UNKNOWN {MAX_ATTEMPTS} times in a row, last {last}"
        ))
    }

    /// GET a manifest: `Ok(None)` on 404 MANIFEST_UNKNOWN; otherwise its digest header,
    /// its body, parsed. The body must hash to the digest header (and to `reference`
    /// when that is a digest).
    async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(String, Value)>, BlobProblem> {
        let r = self
            .send(
                self.http
                    .get(format!("{}/v2/{repo}/manifests/{reference}", self.base))
                    .header("accept", ACCEPT),
            )
            .await
            .map_err(BlobProblem::Failed)?;
        if r.status() != 200 {
            let (status, code, text) = Client::explain(r).await;
            if status == 404 && code == "MANIFEST_UNKNOWN" {
                return Ok(None);
            }
            return Err(BlobProblem::Failed(format!(
                "GET manifest {repo}:{reference}: {status} {code} {text}"
            )));
        }
        let header = r
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = r.bytes().await.map_err(|e| {
            BlobProblem::Failed(format!("GET manifest {repo}:{reference} body: {e:?}"))
        })?;
        let digest = common::digest_of(&body);
        if digest != header || (reference.starts_with("sha256:") && digest != reference) {
            return Err(BlobProblem::Corrupt(format!(
                "manifest {repo}:{reference}: body hashes to {digest}, header says {header:?}"
            )));
        }
        let parsed = serde_json::from_slice(&body).map_err(|e| {
            BlobProblem::Corrupt(format!("manifest {repo}:{reference} is not JSON: {e}"))
        })?;
        Ok(Some((digest, parsed)))
    }

    /// GET a blob and check its bytes against `digest` and `size`.
    async fn get_blob(&self, repo: &str, digest: &str, size: u64) -> Result<(), BlobProblem> {
        let r = self
            .send(
                self.http
                    .get(format!("{}/v2/{repo}/blobs/{digest}", self.base)),
            )
            .await
            .map_err(BlobProblem::Failed)?;
        if r.status() != 200 {
            let (status, code, text) = Client::explain(r).await;
            return Err(BlobProblem::Failed(format!(
                "GET blob {repo} {digest}: {status} {code} {text}"
            )));
        }
        let body = r
            .bytes()
            .await
            .map_err(|e| BlobProblem::Failed(format!("GET blob {repo} {digest} body: {e:?}")))?;
        let got = common::digest_of(&body);
        if got != digest || body.len() as u64 != size {
            return Err(BlobProblem::Corrupt(format!(
                "blob {repo} {digest}: got {} bytes hashing to {got}, want {size}",
                body.len()
            )));
        }
        Stats::add(&self.stats.blobs_verified, 1);
        Stats::add(&self.stats.bytes_verified, size);
        Ok(())
    }

    async fn tags(&self, repo: &str) -> Vec<String> {
        let r = self
            .send(self.http.get(format!("{}/v2/{repo}/tags/list", self.base)))
            .await
            .unwrap();
        match r.status().as_u16() {
            404 => Vec::new(),
            200 => {
                let v: Value = r.json().await.unwrap();
                v["tags"]
                    .as_array()
                    .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default()
            }
            other => panic!("tags/list {repo}: {other}"),
        }
    }

    async fn gc(&self) -> Value {
        let r = self
            .send(
                self.http
                    .post(format!("{}/api/v1/gc?dry_run=false", self.base)),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "POST /api/v1/gc");
        r.json().await.unwrap()
    }

    async fn gc_status(&self) -> Value {
        let r = self
            .send(self.http.get(format!("{}/api/v1/gc", self.base)))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET /api/v1/gc");
        r.json().await.unwrap()
    }
}

/// Wait before retry `attempt` (from 0) of a push, as clients do: 10 ms doubling up to
/// 320 ms, so MAX_ATTEMPTS span several seconds (several passes, and sweeps).
async fn backoff(attempt: usize) {
    let ms = 10u64 << attempt.min(5);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The blobs (digest, size) an image manifest references.
fn image_blobs(manifest: &Value) -> Vec<(String, u64)> {
    std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten())
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_owned(),
                d["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The child manifests an index lists.
fn index_children(manifest: &Value) -> Vec<String> {
    manifest["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

fn is_index(manifest: &Value) -> bool {
    manifest["mediaType"].as_str() == Some(INDEX) || manifest.get("manifests").is_some()
}

/// The committed blob files under `data_dir`, as digests.
fn blob_files(data_dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let Ok(shards) = std::fs::read_dir(data_dir.join("blobs/sha256")) else {
        return found;
    };
    for shard in shards {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let name = file.unwrap().file_name().to_str().unwrap().to_owned();
            found.insert(format!("sha256:{name}"));
        }
    }
    found
}

/// The sizes of the metadata database's files, for the figures.
fn meta_files(data_dir: &Path) -> String {
    ["meta.db", "meta.db-wal", "meta.db-shm"]
        .iter()
        .map(|name| {
            let len = std::fs::metadata(data_dir.join(name)).map_or(0, |m| m.len());
            format!("{name} {len}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pass report without its list of evicted roots.
fn summary(report: &Value) -> Value {
    let mut report = report.clone();
    if let Some(evicted) = report.get("evicted").and_then(Value::as_array) {
        report["evicted"] = Value::from(evicted.len());
    }
    report
}

fn usage_total(status: &Value) -> u64 {
    status["usage"]["total"].as_u64().unwrap()
}

// ---- the soak ----

const SOAK_SEED: u64 = 0x5eed_50a4;
/// About a tenth of what the soak pushes, a little more than the pushers have in flight
/// at once (at 8 MiB the uploads in flight alone exceed it, and every manifest is
/// evicted as soon as it is pushed).
const SOAK_QUOTA: &str = "16MiB";
const SOAK_QUOTA_BYTES: u64 = 16 << 20;
const PUSHERS: usize = 8;
const PUSHES_PER_PUSHER: usize = 24;
const PULLERS: usize = 8;
const PULLS_PER_PULLER: usize = 60;
const REPOS: usize = 4;
const IN_USE: Duration = Duration::from_secs(2);
/// Tags pullers choose from: the most recently pushed.
const RECENT: usize = 16;

/// What the soak pushed, shared between its tasks.
#[derive(Default)]
struct Pushed {
    /// Recently pushed (repo, tag), newest last.
    recent: Mutex<VecDeque<(String, String)>>,
    /// Every image manifest pushed: (repo, digest) -> its blobs.
    images: Mutex<BTreeMap<(String, String), Vec<String>>>,
    /// Every index pushed: (repo, digest) -> its children.
    indexes: Mutex<BTreeMap<(String, String), Vec<String>>>,
}

impl Pushed {
    fn tagged(&self, repo: &str, tag: &str) {
        let mut recent = self.recent.lock().unwrap();
        recent.push_back((repo.to_owned(), tag.to_owned()));
        while recent.len() > RECENT {
            recent.pop_front();
        }
    }

    fn image(&self, repo: &str, image: &Image) {
        self.images.lock().unwrap().insert(
            (repo.to_owned(), image.digest.clone()),
            image.blobs().map(|b| b.digest.clone()).collect(),
        );
    }
}

/// One pusher: images of 2-4 layers (fresh or from the shared pool), now and then an
/// index over two images, now and then a tag moved to the newest image.
async fn pusher(client: Client, id: usize, pool: Arc<Vec<Blob>>, pushed: Arc<Pushed>) {
    let mut rng = StdRng::seed_from_u64(SOAK_SEED ^ ((id as u64 + 1) * 0x9e37_79b9));
    let repo = format!("soak/r{}", id % REPOS);
    let pooled: HashSet<String> = pool.iter().map(|b| b.digest.clone()).collect();
    let stats = client.stats.clone();
    let make_image = |rng: &mut StdRng, n: usize, part: usize| {
        let layers: Vec<Blob> = (0..rng.random_range(2..=4))
            .map(|_| {
                if rng.random_bool(0.3) {
                    pool[rng.random_range(0..pool.len())].clone()
                } else {
                    // 16 KiB to 1 MiB, small ones more often (log-uniform).
                    let len = (16.0 * KIB as f64 * 64f64.powf(rng.random::<f64>())) as usize;
                    Blob::random(rng, len)
                }
            })
            .collect();
        Image::new(config_blob(&format!("soak {id} {n} {part}")), layers)
    };
    for n in 0..PUSHES_PER_PUSHER {
        // A build between pushes.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
        let tag = format!("p{id}-{n}");
        let newest = if rng.random_bool(0.2) {
            let index = Index::new(vec![make_image(&mut rng, n, 0), make_image(&mut rng, n, 1)]);
            if let Err(e) = client.push_index(&repo, &index, &tag, &pooled).await {
                stats.fail(e);
                continue;
            }
            for child in &index.children {
                pushed.image(&repo, child);
            }
            pushed.indexes.lock().unwrap().insert(
                (repo.clone(), index.digest.clone()),
                index.children.iter().map(|c| c.digest.clone()).collect(),
            );
            Stats::add(&stats.index_pushes, 1);
            (INDEX, index.body)
        } else {
            let image = make_image(&mut rng, n, 0);
            if let Err(e) = client.push_image(&repo, &image, &tag, &pooled).await {
                stats.fail(e);
                continue;
            }
            pushed.image(&repo, &image);
            (IMAGE, image.body)
        };
        Stats::add(&stats.pushes, 1);
        pushed.tagged(&repo, &tag);
        if rng.random_bool(0.25) {
            // Move this pusher's `latest` to what it just pushed (by re-putting the
            // manifest under the tag; its content must still be all there).
            let latest = format!("latest-{id}");
            match client
                .put_manifest(&repo, &latest, newest.0, &newest.1)
                .await
            {
                Ok(None) => {
                    Stats::add(&stats.tag_moves, 1);
                    pushed.tagged(&repo, &latest);
                }
                // What it references was evicted since: the tag move is dropped.
                Ok(Some(_)) => Stats::add(&stats.tag_moves_refused, 1),
                Err(e) => stats.fail(e),
            }
        }
    }
}

/// Record a problem with a read made `since` the lease that protects it began: a failure
/// within the in-use window, past it only a note (the server promised nothing then).
fn read_problem(stats: &Stats, problem: BlobProblem, since: Instant) {
    match problem {
        BlobProblem::Corrupt(what) => stats.corrupt(what),
        BlobProblem::Failed(what) if since.elapsed() >= IN_USE => {
            Stats::add(&stats.beyond_in_use, 1);
            stats.note(format!(
                "beyond in_use ({:?} after the manifest): {what}",
                since.elapsed()
            ));
        }
        BlobProblem::Failed(what) => stats.fail(what),
    }
}

/// Pull `repo:tag` whole: the manifest, for an index every child, and every blob.
async fn pull(client: &Client, repo: &str, tag: &str) {
    let stats = &client.stats;
    Stats::add(&stats.pulls, 1);
    let t0 = Instant::now();
    let (_, manifest) = match client.get_manifest(repo, tag).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            Stats::add(&stats.misses, 1);
            return;
        }
        Err(BlobProblem::Corrupt(what)) => return stats.corrupt(what),
        Err(BlobProblem::Failed(what)) => return stats.fail(what),
    };
    Stats::add(&stats.hits, 1);
    // (lease start, image manifest) to fetch the blobs of.
    let mut images = Vec::new();
    if is_index(&manifest) {
        for child in index_children(&manifest) {
            let tc = Instant::now();
            match client.get_manifest(repo, &child).await {
                Ok(Some((_, m))) => images.push((tc, m)),
                Ok(None) => {
                    return read_problem(
                        stats,
                        BlobProblem::Failed(format!(
                            "child {repo}@{child} of {repo}:{tag}: 404 MANIFEST_UNKNOWN"
                        )),
                        t0,
                    );
                }
                Err(p) => return read_problem(stats, p, t0),
            }
        }
    } else {
        images.push((t0, manifest));
    }
    for (since, image) in images {
        for (digest, size) in image_blobs(&image) {
            if let Err(p) = client.get_blob(repo, &digest, size).await {
                read_problem(stats, p, since);
                return;
            }
        }
    }
}

async fn puller(client: Client, id: usize, pushed: Arc<Pushed>, pushers_done: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(SOAK_SEED ^ ((id as u64 + 101) * 0x85eb_ca6b));
    let mut done = 0;
    while done < PULLS_PER_PULLER {
        let pick = {
            let recent = pushed.recent.lock().unwrap();
            (!recent.is_empty()).then(|| recent[rng.random_range(0..recent.len())].clone())
        };
        let Some((repo, tag)) = pick else {
            if pushers_done.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        pull(&client, &repo, &tag).await;
        done += 1;
        // Spread the pulls over the pushes rather than racing through them at the start.
        if !pushers_done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        }
    }
}

/// Passes back to back until `stop`, adding up what they report.
async fn collector(client: Client, stop: Arc<AtomicBool>) {
    let stats = client.stats.clone();
    let mut seen = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        // The server's own passes (schedule, quota), as far as the last one shows them.
        let status = client.gc_status().await;
        let last = &status["last_pass"];
        if last["trigger"].as_str().is_some_and(|t| t != "manual")
            && seen.insert((last["started_at"].to_string(), last["seconds"].to_string()))
        {
            Stats::add(&stats.background_passes, 1);
            Stats::add(
                &stats.background_evicted,
                last["evicted"].as_array().unwrap().len() as u64,
            );
            Stats::add(
                &stats.background_removed,
                last["blobs_removed"].as_u64().unwrap(),
            );
        }
        let r = match client
            .send(
                client
                    .http
                    .post(format!("{}/api/v1/gc?dry_run=false", client.base)),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                stats.fail(format!("POST /api/v1/gc: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if r.status() != 200 {
            let (status, code, text) = Client::explain(r).await;
            stats.fail(format!("POST /api/v1/gc: {status} {code} {text}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let report: Value = r.json().await.unwrap();
        Stats::add(&stats.gc_passes, 1);
        Stats::add(
            &stats.evicted_roots,
            report["evicted"].as_array().unwrap().len() as u64,
        );
        Stats::add(
            &stats.blobs_removed,
            report["blobs_removed"].as_u64().unwrap(),
        );
        Stats::add(&stats.bytes_freed, report["bytes_freed"].as_u64().unwrap());
        Stats::add(&stats.kept_in_use, report["kept_in_use"].as_u64().unwrap());
        let before = report["usage_before"]["total"].as_u64().unwrap();
        if stats.max_usage_before.fetch_max(before, Ordering::Relaxed) < before {
            let mut peak = report.clone();
            peak["evicted"] = Value::from(report["evicted"].as_array().unwrap().len());
            *stats.peak_report.lock().unwrap() = Some(peak);
        }
        stats.max_usage_after.fetch_max(
            report["usage_after"]["total"].as_u64().unwrap(),
            Ordering::Relaxed,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_push_pull_under_continuous_eviction() {
    let started = Instant::now();
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", SOAK_QUOTA),
        ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
        ("LAYERCACHE_STORE__EVICTION__GRACE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "2s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "2s"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1s"),
    ]);
    let stats = Arc::new(Stats::default());
    let client = Client::new(&server.url, stats.clone());
    let quota = client.gc_status().await["quota"].clone();
    assert_eq!(quota["limit"].as_u64(), Some(SOAK_QUOTA_BYTES), "{quota}");

    // A small pool of layers images share (within and across repositories).
    let mut rng = StdRng::seed_from_u64(SOAK_SEED);
    let pool: Arc<Vec<Blob>> = Arc::new(
        (0..6)
            .map(|_| {
                let len = rng.random_range(16 * KIB..=256 * KIB);
                Blob::random(&mut rng, len)
            })
            .collect(),
    );

    let pushed = Arc::new(Pushed::default());
    let pushers_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let gc = tokio::spawn(collector(client.clone(), stop.clone()));
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|id| tokio::spawn(pusher(client.clone(), id, pool.clone(), pushed.clone())))
        .collect();
    let pullers: Vec<_> = (0..PULLERS)
        .map(|id| {
            tokio::spawn(puller(
                client.clone(),
                id,
                pushed.clone(),
                pushers_done.clone(),
            ))
        })
        .collect();
    for p in pushers {
        p.await.unwrap();
    }
    pushers_done.store(true, Ordering::Relaxed);
    for p in pullers {
        p.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    gc.await.unwrap();
    let load_seconds = started.elapsed().as_secs_f64();

    // Quiet now: let the leases run out, then one more pass.
    tokio::time::sleep(IN_USE + Duration::from_secs(1)).await;
    let last = client.gc().await;
    Stats::add(
        &stats.evicted_roots,
        last["evicted"].as_array().unwrap().len() as u64,
    );
    Stats::add(
        &stats.blobs_removed,
        last["blobs_removed"].as_u64().unwrap(),
    );
    let on_disk = blob_files(server.data_dir());
    let status = client.gc_status().await;

    let s = &*stats;
    let g = Stats::get;
    println!(
        "eviction soak ({load_seconds:.1} s of load, {:.1} s in all):",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  events (requests): {}\n  pushes: {} ({} indexes, {} tag moves, {} refused; {} blobs uploaded, {} skipped after HEAD)\n  \
         MANIFEST_BLOB_UNKNOWN retries: {}\n  pulls: {} ({} hits, {} misses; {} blobs / {} MiB verified)\n  \
         reads past in_use: {}\n  failures: {}, corrupt reads: {}\n  \
         gc passes asked for: {}; evicted roots: {}, blobs removed: {}, MiB freed: {}, kept in use: {}\n  \
         the server's own passes seen: {}; evicted roots: {}, blobs removed: {}\n  \
         quota: {quota}\n  max usage before a pass: {} KiB, after: {} KiB; now {} KiB, {} blob files",
        g(&s.requests),
        g(&s.pushes),
        g(&s.index_pushes),
        g(&s.tag_moves),
        g(&s.tag_moves_refused),
        g(&s.blobs_uploaded),
        g(&s.blobs_skipped),
        g(&s.blob_unknown_retries),
        g(&s.pulls),
        g(&s.hits),
        g(&s.misses),
        g(&s.blobs_verified),
        g(&s.bytes_verified) / MIB as u64,
        g(&s.beyond_in_use),
        g(&s.failures),
        g(&s.corrupt),
        g(&s.gc_passes),
        g(&s.evicted_roots),
        g(&s.blobs_removed),
        g(&s.bytes_freed) / MIB as u64,
        g(&s.kept_in_use),
        g(&s.background_passes),
        g(&s.background_evicted),
        g(&s.background_removed),
        g(&s.max_usage_before) / KIB as u64,
        g(&s.max_usage_after) / KIB as u64,
        usage_total(&status) / KIB as u64,
        on_disk.len(),
    );
    println!(
        "  peak pass: {}",
        s.peak_report.lock().unwrap().clone().unwrap_or_default()
    );
    println!("  usage now: {}", status["usage"]);
    let problems = s.problems.lock().unwrap().clone();
    for p in &problems {
        println!("  {p}");
    }

    assert_eq!(g(&s.failures), 0, "failures: {problems:#?}");
    assert_eq!(g(&s.corrupt), 0, "corrupt reads: {problems:#?}");
    assert_eq!(
        g(&s.pushes),
        (PUSHERS * PUSHES_PER_PUSHER) as u64,
        "every push eventually succeeds"
    );
    assert!(g(&s.hits) > 0, "no pull ever found its tag");
    assert!(
        g(&s.evicted_roots) + g(&s.blobs_removed) > 0,
        "the passes asked for never evicted anything"
    );
    assert!(
        usage_total(&status) <= status["quota"]["high"].as_u64().unwrap(),
        "usage {} is above the high watermark after a quiet pass: {status}",
        usage_total(&status)
    );

    // On disk: every file hashes to its name, and the files are exactly the blobs the
    // manifests still stored reference (grace is 0, so nothing else may stay).
    common::assert_blob_files_match_their_names(server.data_dir());
    let images = pushed.images.lock().unwrap().clone();
    let indexes = pushed.indexes.lock().unwrap().clone();
    let mut referenced = BTreeSet::new();
    let mut kept_images = 0;
    for ((repo, digest), blobs) in &images {
        match client.get_manifest(repo, digest).await {
            Ok(Some(_)) => {
                kept_images += 1;
                referenced.extend(blobs.iter().cloned());
            }
            Ok(None) => {}
            Err(BlobProblem::Corrupt(w) | BlobProblem::Failed(w)) => panic!("{w}"),
        }
    }
    for ((repo, digest), children) in &indexes {
        if let Ok(Some(_)) = client.get_manifest(repo, digest).await {
            for child in children {
                assert!(
                    matches!(client.get_manifest(repo, child).await, Ok(Some(_))),
                    "index {repo}@{digest} is kept but its child {child} is not"
                );
            }
        }
    }
    let leaked: Vec<_> = on_disk.difference(&referenced).collect();
    let lost: Vec<_> = referenced.difference(&on_disk).collect();
    println!(
        "  after the last pass: {kept_images} of {} image manifests kept, {} blobs referenced, {} files",
        images.len(),
        referenced.len(),
        on_disk.len()
    );
    assert!(
        lost.is_empty(),
        "blobs of kept manifests missing on disk: {lost:?}"
    );
    assert!(
        leaked.is_empty(),
        "blob files no kept manifest references: {leaked:?}"
    );
    assert!(
        kept_images < images.len() / 2,
        "most of what was pushed should have been evicted: kept {kept_images} of {}",
        images.len()
    );

    // The store still takes pushes once the storm is over (within the quota, so they
    // stay): three images and an index, then one more pass.
    let mut rng = StdRng::seed_from_u64(SOAK_SEED + 7);
    let none = HashSet::new();
    let mut after_tags = Vec::new();
    for i in 0..3 {
        let image = Image::new(
            config_blob(&format!("after {i}")),
            vec![Blob::random(&mut rng, 64 * KIB), pool[i].clone()],
        );
        client
            .push_image("soak/after", &image, &format!("a{i}"), &none)
            .await
            .unwrap();
        after_tags.push(format!("a{i}"));
    }
    let index = Index::new(
        (0..2)
            .map(|i| {
                Image::new(
                    config_blob(&format!("after index {i}")),
                    vec![Blob::random(&mut rng, 32 * KIB)],
                )
            })
            .collect(),
    );
    client
        .push_index("soak/after", &index, "multi", &none)
        .await
        .unwrap();
    after_tags.push("multi".to_owned());
    client.gc().await;
    assert_eq!(
        client.tags("soak/after").await,
        after_tags,
        "pushed after the run, within the quota"
    );

    // Every tag still listed resolves, whole.
    let mut tags_checked = 0;
    let repos = (0..REPOS)
        .map(|r| format!("soak/r{r}"))
        .chain(["soak/after".to_owned()]);
    for repo in repos {
        for tag in client.tags(&repo).await {
            let before = stats.failures.load(Ordering::Relaxed)
                + stats.corrupt.load(Ordering::Relaxed)
                + stats.misses.load(Ordering::Relaxed);
            pull(&client, &repo, &tag).await;
            let after = stats.failures.load(Ordering::Relaxed)
                + stats.corrupt.load(Ordering::Relaxed)
                + stats.misses.load(Ordering::Relaxed);
            assert_eq!(
                before,
                after,
                "listed tag {repo}:{tag} does not pull whole: {:#?}",
                stats.problems.lock().unwrap()
            );
            tags_checked += 1;
        }
    }
    println!("  listed tags pulled whole after the run (4 pushed after it): {tags_checked}");
    common::assert_blob_files_match_their_names(server.data_dir());
}

// ---- crashes during the startup pass ----

const CRASH_SEED: u64 = 0xc0ff_ee00;
/// Many small images: the startup pass has thousands of blobs to delete, so it runs
/// long enough to be killed in the middle.
const CRASH_IMAGES: usize = 1600;
const CRASH_ROUNDS: usize = 4;
const CRASH_KILLS: usize = 6;
/// The share of the blob bytes the small quota leaves room for.
const CRASH_KEEP_PERCENT: u64 = 35;

/// A root the crash test pushed: its tag, the round it was pushed in, and its manifests
/// (an image, or an index and its children) with their blobs.
struct Root {
    repo: String,
    tag: String,
    round: usize,
    digest: String,
    /// (manifest digest, its blobs) for the root and, for an index, each child.
    images: Vec<(String, Vec<String>)>,
}

/// What a root is made of.
#[derive(Clone)]
enum Content {
    Image(Image),
    Index(Index),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_eviction_pass_loses_nothing_referenced() {
    let started = Instant::now();
    let base_env = [
        ("LAYERCACHE_STORE__EVICTION__GRACE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "0s"),
    ];
    let mut first = common::Server::start_with_env(&base_env);
    let dir = first.data_dir().to_owned();
    let stats = Arc::new(Stats::default());
    let client = Client::new(&first.url, stats.clone());
    let mut rng = StdRng::seed_from_u64(CRASH_SEED);
    let pool: Vec<Blob> = (0..16).map(|_| Blob::random(&mut rng, 4 * KIB)).collect();
    let pooled: HashSet<String> = pool.iter().map(|b| b.digest.clone()).collect();

    // Fill: rounds of images more than a second apart, so their last use orders them.
    let mut roots: Vec<Root> = Vec::new();
    let per_round = CRASH_IMAGES / CRASH_ROUNDS;
    for round in 0..CRASH_ROUNDS {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let mut batch = Vec::new();
        for k in round * per_round..(round + 1) * per_round {
            let make = |rng: &mut StdRng, part: usize| {
                let mut layers: Vec<Blob> = (0..2)
                    .map(|_| {
                        let len = rng.random_range(KIB..=8 * KIB);
                        Blob::random(rng, len)
                    })
                    .collect();
                if rng.random_bool(0.5) {
                    layers.push(pool[rng.random_range(0..pool.len())].clone());
                }
                Image::new(config_blob(&format!("crash {k} {part}")), layers)
            };
            let repo = format!("fill/{}", ["a", "b", "c"][k % 3]);
            let tag = format!("img-{k}");
            let root = if k % 10 == 9 {
                let index = Index::new(vec![make(&mut rng, 0), make(&mut rng, 1)]);
                let mut images = vec![(index.digest.clone(), Vec::new())];
                images.extend(index.children.iter().map(|c| {
                    (
                        c.digest.clone(),
                        c.blobs().map(|b| b.digest.clone()).collect(),
                    )
                }));
                (
                    Root {
                        repo,
                        tag,
                        round,
                        digest: index.digest.clone(),
                        images,
                    },
                    Content::Index(index),
                )
            } else {
                let image = make(&mut rng, 0);
                let images = vec![(
                    image.digest.clone(),
                    image.blobs().map(|b| b.digest.clone()).collect(),
                )];
                (
                    Root {
                        repo,
                        tag,
                        round,
                        digest: image.digest.clone(),
                        images,
                    },
                    Content::Image(image),
                )
            };
            batch.push(root);
        }
        // Push the round 16 at a time.
        let pushes = batch.iter().map(|(root, content)| {
            let (client, pooled) = (client.clone(), pooled.clone());
            let (repo, tag) = (root.repo.clone(), root.tag.clone());
            let content = content.clone();
            tokio::spawn(async move {
                match content {
                    Content::Image(image) => client.push_image(&repo, &image, &tag, &pooled).await,
                    Content::Index(index) => client.push_index(&repo, &index, &tag, &pooled).await,
                }
            })
        });
        let results: Vec<_> = futures::stream::iter(pushes)
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r.unwrap().unwrap();
        }
        roots.extend(batch.into_iter().map(|(root, _)| root));
    }
    let full = client.gc_status().await;
    let full_usage = usage_total(&full);
    let full_files = blob_files(&dir).len();
    let full_meta = meta_files(&dir);
    first.kill();

    // Restart with a quota whose low watermark (80%) leaves room for the metadata and
    // a share of the blobs, and crash while the startup pass works. Each restart lowers
    // the share a little, so every startup pass has work to be killed in the middle of;
    // the last start keeps CRASH_KEEP_PERCENT.
    let quota_env = |keep_percent: u64| -> Vec<(String, String)> {
        let max_size = (full["usage"]["metadata_bytes"].as_u64().unwrap()
            + full["usage"]["blob_bytes"].as_u64().unwrap() * keep_percent / 100)
            * 100
            / 80;
        base_env
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .chain(
                [
                    ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", max_size.to_string()),
                    ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0".to_owned()),
                    ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1s".to_owned()),
                ]
                .map(|(k, v)| (k.to_owned(), v)),
            )
            .collect()
    };
    let start = |env: &[(String, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        common::Server::start_on_with_env(&dir, "127.0.0.1:0", &env)
    };
    println!(
        "restart mid-pass: filled {} roots, {full_usage} bytes ({}), {full_files} blob files, {full_meta} in {:.1} s",
        roots.len(),
        full["usage"],
        started.elapsed().as_secs_f64()
    );
    let mut kill_rng = StdRng::seed_from_u64(CRASH_SEED + 1);
    let mut mid_pass_kills = 0;
    for kill in 0..CRASH_KILLS {
        let keep = CRASH_KEEP_PERCENT + 5 * (CRASH_KILLS - kill) as u64;
        let mut server = start(&quota_env(keep));
        let delay = Duration::from_millis(kill_rng.random_range(20..=300));
        tokio::time::sleep(delay).await;
        let status = Client::new(&server.url, stats.clone()).gc_status().await;
        server.kill();
        if status["last_pass"].is_null() {
            mid_pass_kills += 1;
        }
        println!(
            "  kill {kill} (quota for {keep}% of the blobs): after {delay:?}, {} blob files left; usage then {}, last pass {}",
            blob_files(&dir).len(),
            status["usage"],
            summary(&status["last_pass"]),
        );
    }

    println!("  {mid_pass_kills} of {CRASH_KILLS} kills came before the startup pass had finished");

    // Once more, killed as soon as the sweep is seen under way (the metadata holds fewer
    // blobs than when the server started), whatever the machine's speed.
    let mut server = start(&quota_env(CRASH_KEEP_PERCENT));
    let watcher = Client::new(&server.url, stats.clone());
    let at_start = watcher.gc_status().await["usage"]["blobs"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let status = watcher.gc_status().await;
        let blobs = status["usage"]["blobs"].as_u64().unwrap();
        if blobs < at_start || !status["last_pass"].is_null() || Instant::now() > deadline {
            server.kill();
            break status;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!(
        "  kill {CRASH_KILLS} (sweep seen under way: {}): {} blobs in the metadata at start, {} then, {} blob files left",
        seen["last_pass"].is_null(),
        at_start,
        seen["usage"]["blobs"],
        blob_files(&dir).len(),
    );

    // Start once more and let it settle.
    let server = start(&quota_env(CRASH_KEEP_PERCENT));
    let client = Client::new(&server.url, stats.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled = loop {
        let status = client.gc_status().await;
        if !status["last_pass"].is_null()
            && usage_total(&status) <= status["quota"]["high"].as_u64().unwrap()
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "usage never got under the quota: {} (last pass {})",
            status["usage"],
            summary(&status["last_pass"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = client.gc().await;
    let on_disk = blob_files(&dir);
    println!(
        "  settled: usage {}; last pass {}\n  final pass {}\n  {} blob files; {}",
        settled["usage"],
        summary(&settled["last_pass"]),
        summary(&last),
        on_disk.len(),
        meta_files(&dir),
    );
    common::assert_blob_files_match_their_names(&dir);

    // Which roots are kept: a tag listed resolves to the root pushed under it, and a
    // root is kept exactly when its tag is still listed.
    let mut listed = BTreeSet::new();
    for repo in ["fill/a", "fill/b", "fill/c"] {
        for tag in client.tags(repo).await {
            listed.insert((repo.to_owned(), tag));
        }
    }
    let mut kept: Vec<&Root> = Vec::new();
    let mut evicted: Vec<&Root> = Vec::new();
    for root in &roots {
        let by_digest = match client.get_manifest(&root.repo, &root.digest).await {
            Ok(m) => m.is_some(),
            Err(BlobProblem::Corrupt(w) | BlobProblem::Failed(w)) => panic!("{w}"),
        };
        let is_listed = listed.contains(&(root.repo.clone(), root.tag.clone()));
        assert_eq!(
            by_digest, is_listed,
            "{}:{} ({}): manifest stored {by_digest}, tag listed {is_listed}",
            root.repo, root.tag, root.digest
        );
        if by_digest {
            kept.push(root);
        } else {
            evicted.push(root);
        }
    }
    assert_eq!(
        listed.len(),
        kept.len(),
        "tags listed that were never pushed: {listed:?}"
    );

    // Every kept root pulls whole through its tag, and its blobs are all on disk; an
    // evicted index's children may outlive it (they are roots of their own then).
    let mut referenced = BTreeSet::new();
    for root in &kept {
        let before = stats.failures.load(Ordering::Relaxed)
            + stats.corrupt.load(Ordering::Relaxed)
            + stats.misses.load(Ordering::Relaxed);
        pull(&client, &root.repo, &root.tag).await;
        let after = stats.failures.load(Ordering::Relaxed)
            + stats.corrupt.load(Ordering::Relaxed)
            + stats.misses.load(Ordering::Relaxed);
        assert_eq!(
            before,
            after,
            "kept root {}:{} does not pull whole: {:#?}",
            root.repo,
            root.tag,
            stats.problems.lock().unwrap()
        );
        for (_, blobs) in &root.images {
            referenced.extend(blobs.iter().cloned());
        }
    }
    let mut orphaned_children = 0;
    for root in &evicted {
        for (digest, blobs) in root.images.iter().skip(1) {
            let child = match client.get_manifest(&root.repo, digest).await {
                Ok(child) => child,
                Err(BlobProblem::Corrupt(w) | BlobProblem::Failed(w)) => panic!("{w}"),
            };
            if let Some((_, child)) = child {
                orphaned_children += 1;
                for (blob, size) in image_blobs(&child) {
                    if let Err(BlobProblem::Corrupt(w) | BlobProblem::Failed(w)) =
                        client.get_blob(&root.repo, &blob, size).await
                    {
                        panic!("kept child {digest}: {w}");
                    }
                }
                referenced.extend(blobs.iter().cloned());
            }
        }
    }

    // Nothing on disk but what kept manifests reference (grace is 0).
    let leaked: Vec<_> = on_disk.difference(&referenced).collect();
    let lost: Vec<_> = referenced.difference(&on_disk).collect();
    println!(
        "  kept {} roots, evicted {} ({orphaned_children} children of evicted indexes kept); {} blobs referenced, {} files; {:.1} s in all",
        kept.len(),
        evicted.len(),
        referenced.len(),
        on_disk.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        lost.is_empty(),
        "blobs of kept manifests missing on disk: {lost:?}"
    );
    assert!(
        leaked.is_empty(),
        "blob files no kept manifest references: {leaked:?}"
    );
    assert!(
        !kept.is_empty() && evicted.len() > roots.len() / 2,
        "expected most roots evicted: kept {}, evicted {}",
        kept.len(),
        evicted.len()
    );

    // Least recently used first: no root evicted from a later round than one kept.
    let newest_evicted = evicted.iter().map(|r| r.round).max().unwrap();
    let oldest_kept = kept.iter().map(|r| r.round).min().unwrap();
    assert!(
        newest_evicted <= oldest_kept,
        "evicted a root of round {newest_evicted} but kept one of round {oldest_kept}"
    );
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert_eq!(stats.corrupt.load(Ordering::Relaxed), 0);
    common::assert_blob_files_match_their_names(&dir);
}

// ---- how much a pass evicts ----

/// Fill a fresh server: `push` runs against it; then wait past the current second (so
/// everything pushed is idle for a 0 s grace), note its usage and stop it. Returns the
/// first server (its directory lives as long as it does) and its status.
async fn fill_then_stop<F, Fut>(env: &[(&str, &str)], push: F) -> (common::Server, Value)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut server = common::Server::start_with_env(env);
    let client = Client::new(&server.url, Arc::new(Stats::default()));
    push(client.clone()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = client.gc_status().await;
    server.kill();
    (server, status)
}

/// Start on `dir` with a quota whose watermarks (both 80%) sit `over` bytes under
/// `usage`, and wait for the startup pass. Returns the server and that pass's report.
async fn restart_over_quota(
    dir: &Path,
    env: &[(&str, &str)],
    usage: u64,
    over: u64,
) -> (common::Server, Client, Value) {
    let max_size = ((usage - over) * 100 / 80).to_string();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.extend([
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", max_size.as_str()),
        ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
        ("LAYERCACHE_STORE__EVICTION__HIGH_WATERMARK", "80%"),
        ("LAYERCACHE_STORE__EVICTION__LOW_WATERMARK", "80%"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1h"),
    ]);
    let server = common::Server::start_on_with_env(dir, "127.0.0.1:0", &env);
    let client = Client::new(&server.url, Arc::new(Stats::default()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.gc_status().await;
        if !status["last_pass"].is_null() {
            let report = status["last_pass"].clone();
            return (server, client, report);
        }
        assert!(Instant::now() < deadline, "no startup pass: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An image of one layer of `len` random bytes.
fn big_image(rng: &mut StdRng, name: &str, len: usize) -> Image {
    Image::new(config_blob(name), vec![Blob::random(rng, len)])
}

/// A pass that must free a little evicts the least recently used roots, not every root,
/// even when the blobs it unreferences stay for their grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_evicts_only_what_it_needs_when_blobs_are_in_grace() {
    let env = [
        ("LAYERCACHE_STORE__EVICTION__GRACE", "1h"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "0s"),
    ];
    let mut rng = StdRng::seed_from_u64(0x6ace);
    let images: Vec<Image> = (0..10)
        .map(|i| big_image(&mut rng, &format!("grace {i}"), 2 * MIB))
        .collect();
    let pushed = images.clone();
    let (first, status) = fill_then_stop(&env, |client| async move {
        for (i, image) in pushed.iter().enumerate() {
            if i == 5 {
                // The second half is more recently used.
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
            let tag = format!("img-{i}");
            client
                .push_image("grace/app", image, &tag, &HashSet::new())
                .await
                .unwrap();
        }
    })
    .await;
    // 5 MiB over: the three least recently used images would cover it.
    let (_server, client, report) =
        restart_over_quota(first.data_dir(), &env, usage_total(&status), 5 * MIB as u64).await;
    let tags = client.tags("grace/app").await;
    println!("pass: {}\ntags left: {tags:?}", summary(&report));
    for i in 5..10 {
        assert!(
            tags.contains(&format!("img-{i}")),
            "the pass evicted img-{i}, one of the most recently used; tags left {tags:?}; pass {}",
            summary(&report)
        );
    }
}

/// Evicting an index lets its children go too, before any more recently used root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_an_index_frees_its_children_before_newer_roots() {
    let env = [
        ("LAYERCACHE_STORE__EVICTION__GRACE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "0s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "0s"),
    ];
    let mut rng = StdRng::seed_from_u64(0x1dec);
    let index = Index::new(vec![
        big_image(&mut rng, "old amd64", 4 * MIB),
        big_image(&mut rng, "old arm64", 4 * MIB),
    ]);
    let newer: Vec<Image> = (0..6)
        .map(|i| big_image(&mut rng, &format!("new {i}"), 4 * MIB))
        .collect();
    let (old, pushed) = (index.clone(), newer.clone());
    let (first, status) = fill_then_stop(&env, |client| async move {
        client
            .push_index("lru/app", &old, "old", &HashSet::new())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for (i, image) in pushed.iter().enumerate() {
            client
                .push_image("lru/app", image, &format!("new-{i}"), &HashSet::new())
                .await
                .unwrap();
        }
    })
    .await;
    // 6 MiB over: the old index with its children (8 MiB) covers it.
    let (_server, client, report) =
        restart_over_quota(first.data_dir(), &env, usage_total(&status), 6 * MIB as u64).await;
    let tags = client.tags("lru/app").await;
    let mut children_left = Vec::new();
    for child in &index.children {
        if let Ok(Some(_)) = client.get_manifest("lru/app", &child.digest).await {
            children_left.push(child.digest.clone());
        }
    }
    println!(
        "pass: {}\ntags left: {tags:?}\nchildren of the evicted index left: {children_left:?}",
        summary(&report)
    );
    for i in 0..newer.len() {
        assert!(
            tags.contains(&format!("new-{i}")),
            "the pass evicted new-{i}, more recently used than the index it evicted; tags left \
             {tags:?}, the index's children left: {children_left:?}; pass {}",
            summary(&report)
        );
    }
    assert!(
        children_left.is_empty(),
        "children of the evicted index are left: {children_left:?}"
    );
}
