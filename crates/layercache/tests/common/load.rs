//! Registry load for eviction tests: images of random layers (and indexes over them),
//! pushed, pulled, retagged and deleted over the distribution API by a client that counts
//! its requests and returns what went wrong instead of panicking, so a test can go on and
//! sum up, or watch the server vanish under a `kill -9`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::RngCore;
use rand::rngs::StdRng;
use serde_json::Value;

/// The OCI image manifest media type.
pub const IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI image index media type.
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The manifest types a pull accepts.
pub const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
/// Pushes of one image (or index) before giving up on MANIFEST_BLOB_UNKNOWN.
pub const MAX_ATTEMPTS: usize = 25;
/// The size of the `PATCH` chunks of a chunked upload.
pub const PATCH_CHUNK: usize = 64 << 10;

// ---- content ----

/// Bytes and their digest.
#[derive(Clone)]
pub struct Blob {
    /// The content.
    pub bytes: Bytes,
    /// `sha256:` of the content.
    pub digest: String,
}

impl Blob {
    /// A blob of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Blob {
        let digest = super::digest_of(&bytes);
        Blob {
            bytes: Bytes::from(bytes),
            digest,
        }
    }

    /// `len` random bytes from `rng`.
    pub fn random(rng: &mut StdRng, len: usize) -> Blob {
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        Blob::new(bytes)
    }

    /// How a push uploads it, fixed by its digest so every kind is exercised: one
    /// `POST ?digest=`, a session closed by a `PUT` with the body, or a session of
    /// `PATCH` chunks.
    pub fn upload_kind(&self) -> UploadKind {
        match self.digest.as_bytes().last() {
            Some(b'0'..=b'4') => UploadKind::Monolithic,
            Some(b'5'..=b'9') => UploadKind::Session,
            _ => UploadKind::Chunked,
        }
    }
}

/// The ways a blob goes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadKind {
    /// `POST /blobs/uploads/?digest=` with the body.
    Monolithic,
    /// `POST`, then `PUT ?digest=` with the body.
    Session,
    /// `POST`, `PATCH` chunks with `Content-Range`, `PUT ?digest=`.
    Chunked,
}

/// An image manifest over a config and layers.
#[derive(Clone)]
pub struct Image {
    /// Its config blob.
    pub config: Blob,
    /// Its layers, in order.
    pub layers: Vec<Blob>,
    /// The manifest as pushed.
    pub body: String,
    /// The manifest's digest.
    pub digest: String,
}

impl Image {
    /// The manifest of `config` and `layers`.
    pub fn new(config: Blob, layers: Vec<Blob>) -> Image {
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
        let digest = super::digest_of(body.as_bytes());
        Image {
            config,
            layers,
            body,
            digest,
        }
    }

    /// The config, then the layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(&self.layers)
    }
}

/// An index over images.
#[derive(Clone)]
pub struct Index {
    /// The images it lists, one per platform.
    pub children: Vec<Image>,
    /// The index as pushed.
    pub body: String,
    /// The index's digest.
    pub digest: String,
}

impl Index {
    /// The index over `children`.
    pub fn new(children: Vec<Image>) -> Index {
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
        let digest = super::digest_of(body.as_bytes());
        Index {
            children,
            body,
            digest,
        }
    }
}

/// A config blob unique to `nonce`.
pub fn config_blob(nonce: &str) -> Blob {
    Blob::new(
        serde_json::json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "nonce": nonce})
        .to_string()
        .into_bytes(),
    )
}

// ---- the client ----

/// What a client did, summed over every clone of it.
#[derive(Default)]
pub struct Counters {
    /// HTTP requests sent.
    pub requests: AtomicU64,
    /// Blobs uploaded in one `POST`.
    pub monolithic: AtomicU64,
    /// Blobs uploaded in a session closed by a `PUT` with the body.
    pub sessions: AtomicU64,
    /// Blobs uploaded in `PATCH` chunks.
    pub chunked: AtomicU64,
    /// Blobs a push skipped because a HEAD found them.
    pub blobs_skipped: AtomicU64,
    /// Manifest PUTs refused with MANIFEST_BLOB_UNKNOWN and retried.
    pub blob_unknown_retries: AtomicU64,
    /// Of those, refusals naming a blob the push found by HEAD, or uploaded, sooner
    /// before than the push window the client was told.
    pub blob_unknown_within_window: AtomicU64,
    /// Of those, refusals naming a child manifest (an index's, pushed just before).
    pub blob_unknown_child: AtomicU64,
    /// The first refusals, described.
    pub refusals: std::sync::Mutex<Vec<String>>,
    /// Blobs read and verified.
    pub blobs_verified: AtomicU64,
    /// Their bytes.
    pub bytes_verified: AtomicU64,
}

impl Counters {
    /// Add `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// What `counter` holds.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A read that went wrong.
#[derive(Debug)]
pub enum Problem {
    /// 200 but not the bytes the digest names (or a body that is not what it says).
    Corrupt(String),
    /// Anything else: a status other than the expected, a connection error, a body cut
    /// off.
    Failed(String),
}

impl Problem {
    /// What went wrong, in words.
    pub fn text(&self) -> &str {
        match self {
            Problem::Corrupt(w) | Problem::Failed(w) => w,
        }
    }
}

/// What a pull got.
#[derive(Debug, PartialEq, Eq)]
pub enum Pulled {
    /// 404 MANIFEST_UNKNOWN for the reference asked for.
    Miss,
    /// The manifest (and an index's children) and every blob, verified.
    Whole { manifests: usize, blobs: usize },
}

/// A pull that went wrong, and when the request for the manifest that named the missing
/// or bad part was sent (reads of it are leased from about then).
#[derive(Debug)]
pub struct PullProblem {
    /// What went wrong.
    pub problem: Problem,
    /// When the request for the manifest naming it was sent.
    pub since: Instant,
}

/// A registry client of one server.
#[derive(Clone)]
pub struct Client {
    /// The HTTP client (a 60 s timeout).
    pub http: reqwest::Client,
    /// `http://HOST:PORT`.
    pub base: String,
    /// What this client and its clones did.
    pub counters: Arc<Counters>,
    /// The server's push window, to tell early MANIFEST_BLOB_UNKNOWN refusals apart.
    pub push_window: Duration,
}

impl Client {
    /// A client of the server at `base`, counting into `counters`.
    pub fn new(base: &str, counters: Arc<Counters>) -> Client {
        Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            base: base.to_owned(),
            counters,
            push_window: Duration::ZERO,
        }
    }

    /// The same client, told the server's push window.
    pub fn with_push_window(mut self, window: Duration) -> Client {
        self.push_window = window;
        self
    }

    /// Send `request`, counting it; a connection error as text.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        Counters::add(&self.counters.requests, 1);
        request
            .send()
            .await
            .map_err(|e| format!("connection error: {e:?}"))
    }

    /// Status, registry error code (if any) and body text of a response.
    pub async fn explain(r: reqwest::Response) -> (u16, String, String) {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let code = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, code, text)
    }

    /// `HEAD` a blob: whether `repo` has it.
    pub async fn blob_exists(&self, repo: &str, blob: &Blob) -> Result<bool, String> {
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

    /// The absolute URL of an upload session's `Location`.
    fn location(&self, r: &reqwest::Response) -> Result<String, String> {
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("upload answered {} without a Location", r.status()))?;
        Ok(if location.starts_with("http") {
            location.to_owned()
        } else {
            format!("{}{location}", self.base)
        })
    }

    /// Upload `blob` the way `kind` says.
    pub async fn upload(&self, repo: &str, blob: &Blob, kind: UploadKind) -> Result<(), String> {
        let base = &self.base;
        let digest = &blob.digest;
        let counter = match kind {
            UploadKind::Monolithic => &self.counters.monolithic,
            UploadKind::Session => &self.counters.sessions,
            UploadKind::Chunked => &self.counters.chunked,
        };
        Counters::add(counter, 1);
        let r = if kind == UploadKind::Monolithic {
            self.send(
                self.http
                    .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
                    .header("content-type", "application/octet-stream")
                    .body(blob.bytes.clone()),
            )
            .await?
        } else {
            let r = self
                .send(self.http.post(format!("{base}/v2/{repo}/blobs/uploads/")))
                .await?;
            if r.status() != 202 {
                let (status, code, text) = Client::explain(r).await;
                return Err(format!("POST upload {repo}: {status} {code} {text}"));
            }
            let mut url = self.location(&r)?;
            let body = if kind == UploadKind::Chunked {
                let mut offset = 0;
                for chunk in blob.bytes.chunks(PATCH_CHUNK) {
                    let end = offset + chunk.len() - 1;
                    let r = self
                        .send(
                            self.http
                                .patch(&url)
                                .header("content-type", "application/octet-stream")
                                .header("content-range", format!("{offset}-{end}"))
                                .body(blob.bytes.slice(offset..=end)),
                        )
                        .await?;
                    if r.status() != 202 {
                        let (status, code, text) = Client::explain(r).await;
                        return Err(format!(
                            "PATCH upload {repo} {digest} at {offset}: {status} {code} {text}"
                        ));
                    }
                    url = self.location(&r)?;
                    offset = end + 1;
                }
                Bytes::new()
            } else {
                blob.bytes.clone()
            };
            let sep = if url.contains('?') { '&' } else { '?' };
            self.send(
                self.http
                    .put(format!("{url}{sep}digest={digest}"))
                    .header("content-type", "application/octet-stream")
                    .body(body),
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
    pub async fn put_manifest(
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

    /// Note a MANIFEST_BLOB_UNKNOWN refusal (`message`) of a push of `repo` that found
    /// or uploaded its blobs at the times in `checked`.
    fn refused(&self, repo: &str, message: &str, checked: &[(String, &'static str, Instant)]) {
        let c = &self.counters;
        Counters::add(&c.blob_unknown_retries, 1);
        let named = checked
            .iter()
            .find(|(digest, _, _)| message.contains(digest.as_str()));
        let what = match named {
            Some((digest, how, at)) => {
                let since = at.elapsed();
                if since < self.push_window {
                    Counters::add(&c.blob_unknown_within_window, 1);
                }
                format!("{repo}: blob {digest} {how} {since:?} before the refusal")
            }
            None => {
                Counters::add(&c.blob_unknown_child, 1);
                format!("{repo}: {message}")
            }
        };
        let mut refusals = c.refusals.lock().unwrap();
        if refusals.len() < 20 {
            refusals.push(what);
        }
    }

    /// Push `image` under `reference` as clients do: HEAD each blob, upload those
    /// missing, PUT the manifest; on MANIFEST_BLOB_UNKNOWN all of it again.
    pub async fn push_image(
        &self,
        repo: &str,
        image: &Image,
        reference: &str,
    ) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let blobs: Vec<&Blob> = image.blobs().collect();
            let mut checked = Vec::new();
            for blob in blobs {
                let how = if self.blob_exists(repo, blob).await? {
                    Counters::add(&self.counters.blobs_skipped, 1);
                    "found by HEAD"
                } else {
                    self.upload(repo, blob, blob.upload_kind()).await?;
                    "uploaded"
                };
                checked.push((blob.digest.clone(), how, Instant::now()));
            }
            match self
                .put_manifest(repo, reference, IMAGE, &image.body)
                .await?
            {
                None => return Ok(()),
                Some(message) => last = message,
            }
            self.refused(repo, &last, &checked);
            backoff(attempt).await;
        }
        Err(format!(
            "push {repo}:{reference}: MANIFEST_BLOB_UNKNOWN {MAX_ATTEMPTS} times in a row, last {last}"
        ))
    }

    /// Push `index`'s children by digest, then the index under `tag`; on
    /// MANIFEST_BLOB_UNKNOWN (a child evicted meanwhile) push everything again.
    pub async fn push_index(&self, repo: &str, index: &Index, tag: &str) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let began = Instant::now();
            for child in &index.children {
                self.push_image(repo, child, &child.digest).await?;
            }
            match self.put_manifest(repo, tag, INDEX, &index.body).await? {
                None => return Ok(()),
                Some(message) => {
                    last = format!(
                        "{message} (refused {:?} after the children began)",
                        began.elapsed()
                    );
                }
            }
            self.refused(repo, &last, &[]);
            backoff(attempt).await;
        }
        Err(format!(
            "push index {repo}:{tag}: MANIFEST_BLOB_UNKNOWN {MAX_ATTEMPTS} times in a row, last {last}"
        ))
    }

    /// GET a manifest: `Ok(None)` on 404 MANIFEST_UNKNOWN; otherwise its digest, media
    /// type and body, parsed. The body must hash to the digest header (and to
    /// `reference` when that is a digest).
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(String, String, Value)>, Problem> {
        let r = self
            .send(
                self.http
                    .get(format!("{}/v2/{repo}/manifests/{reference}", self.base))
                    .header("accept", ACCEPT),
            )
            .await
            .map_err(|e| Problem::Failed(format!("GET manifest {repo}:{reference}: {e}")))?;
        if r.status() != 200 {
            let (status, code, text) = Client::explain(r).await;
            if status == 404 && code == "MANIFEST_UNKNOWN" {
                return Ok(None);
            }
            return Err(Problem::Failed(format!(
                "GET manifest {repo}:{reference}: {status} {code} {text}"
            )));
        }
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (digest_header, media_type) = (header("docker-content-digest"), header("content-type"));
        let body = r
            .bytes()
            .await
            .map_err(|e| Problem::Failed(format!("GET manifest {repo}:{reference} body: {e:?}")))?;
        let digest = super::digest_of(&body);
        if digest != digest_header || (reference.starts_with("sha256:") && digest != reference) {
            return Err(Problem::Corrupt(format!(
                "manifest {repo}:{reference}: body hashes to {digest}, header says {digest_header:?}"
            )));
        }
        let parsed = serde_json::from_slice(&body).map_err(|e| {
            Problem::Corrupt(format!("manifest {repo}:{reference} is not JSON: {e}"))
        })?;
        Ok(Some((digest, media_type, parsed)))
    }

    /// GET a blob and check its bytes against `digest` and `size`.
    pub async fn get_blob(&self, repo: &str, digest: &str, size: u64) -> Result<(), Problem> {
        match self.try_get_blob(repo, digest, Some(size)).await? {
            true => Ok(()),
            false => Err(Problem::Failed(format!(
                "GET blob {repo} {digest}: 404 BLOB_UNKNOWN"
            ))),
        }
    }

    /// GET a blob: `false` on 404 BLOB_UNKNOWN, `true` when it came back hashing to
    /// `digest` (and `size` long, if given).
    pub async fn try_get_blob(
        &self,
        repo: &str,
        digest: &str,
        size: Option<u64>,
    ) -> Result<bool, Problem> {
        let r = self
            .send(
                self.http
                    .get(format!("{}/v2/{repo}/blobs/{digest}", self.base)),
            )
            .await
            .map_err(|e| Problem::Failed(format!("GET blob {repo} {digest}: {e}")))?;
        if r.status() != 200 {
            let (status, code, text) = Client::explain(r).await;
            if status == 404 && code == "BLOB_UNKNOWN" {
                return Ok(false);
            }
            return Err(Problem::Failed(format!(
                "GET blob {repo} {digest}: {status} {code} {text}"
            )));
        }
        let body = r
            .bytes()
            .await
            .map_err(|e| Problem::Failed(format!("GET blob {repo} {digest} body: {e:?}")))?;
        let got = super::digest_of(&body);
        if got != digest || size.is_some_and(|size| body.len() as u64 != size) {
            return Err(Problem::Corrupt(format!(
                "blob {repo} {digest}: got {} bytes hashing to {got}, want {size:?}",
                body.len()
            )));
        }
        Counters::add(&self.counters.blobs_verified, 1);
        Counters::add(&self.counters.bytes_verified, body.len() as u64);
        Ok(true)
    }

    /// Pull `repo:reference` whole: the manifest, for an index every child, and every
    /// blob, each verified.
    pub async fn pull(&self, repo: &str, reference: &str) -> Result<Pulled, PullProblem> {
        let t0 = Instant::now();
        let at = |problem: Problem, since: Instant| PullProblem { problem, since };
        let manifest = match self.get_manifest(repo, reference).await {
            Ok(Some((_, _, m))) => m,
            Ok(None) => return Ok(Pulled::Miss),
            Err(p) => return Err(at(p, t0)),
        };
        // (lease start, image manifest) to fetch the blobs of.
        let mut images = Vec::new();
        let mut manifests = 1;
        if is_index(&manifest) {
            for child in index_children(&manifest) {
                let tc = Instant::now();
                match self.get_manifest(repo, &child).await {
                    Ok(Some((_, _, m))) => {
                        manifests += 1;
                        images.push((tc, m));
                    }
                    Ok(None) => {
                        let what = format!(
                            "child {repo}@{child} of {repo}:{reference}: 404 MANIFEST_UNKNOWN"
                        );
                        return Err(at(Problem::Failed(what), t0));
                    }
                    Err(p) => return Err(at(p, t0)),
                }
            }
        } else {
            images.push((t0, manifest));
        }
        let mut blobs = 0;
        for (since, image) in images {
            for (digest, size) in image_blobs(&image) {
                self.get_blob(repo, &digest, size)
                    .await
                    .map_err(|p| at(p, since))?;
                blobs += 1;
            }
        }
        Ok(Pulled::Whole { manifests, blobs })
    }

    /// `DELETE` a manifest by digest: `true` deleted, `false` not there (404).
    pub async fn delete_manifest(&self, repo: &str, digest: &str) -> Result<bool, String> {
        let r = self
            .send(
                self.http
                    .delete(format!("{}/v2/{repo}/manifests/{digest}", self.base)),
            )
            .await?;
        match r.status().as_u16() {
            202 => Ok(true),
            _ => {
                let (status, code, text) = Client::explain(r).await;
                if status == 404 && code == "MANIFEST_UNKNOWN" {
                    Ok(false)
                } else {
                    Err(format!(
                        "DELETE manifest {repo}@{digest}: {status} {code} {text}"
                    ))
                }
            }
        }
    }

    /// Every tag of `repo` (none if the repository is unknown).
    pub async fn tags(&self, repo: &str) -> Vec<String> {
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

    /// `POST /api/v1/gc`: run a pass (or a dry run) now; its report.
    pub async fn gc_pass(&self, dry_run: bool) -> Value {
        let r = self
            .send(
                self.http
                    .post(format!("{}/api/v1/gc?dry_run={dry_run}", self.base)),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "POST /api/v1/gc");
        r.json().await.unwrap()
    }

    /// `POST /api/v1/gc`: run a pass now; its report.
    pub async fn gc(&self) -> Value {
        self.gc_pass(false).await
    }

    /// `GET /api/v1/gc`: usage, quota and the last pass.
    pub async fn gc_status(&self) -> Value {
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
pub async fn backoff(attempt: usize) {
    let ms = 10u64 << attempt.min(5);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The blobs (digest, size) an image manifest references.
pub fn image_blobs(manifest: &Value) -> Vec<(String, u64)> {
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
pub fn index_children(manifest: &Value) -> Vec<String> {
    manifest["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// Whether a manifest is an index.
pub fn is_index(manifest: &Value) -> bool {
    manifest["mediaType"].as_str() == Some(INDEX) || manifest.get("manifests").is_some()
}

/// The committed blob files under `data_dir`, as digests.
pub fn blob_files(data_dir: &Path) -> BTreeSet<String> {
    blob_file_sizes(data_dir).into_keys().collect()
}

/// The committed blob files under `data_dir` (layers under `sha256`, cache entries' parts
/// under `blake3`), as digests, with their lengths.
pub fn blob_file_sizes(data_dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut found = std::collections::BTreeMap::new();
    for algorithm in ["sha256", "sha512", "blake3"] {
        let Ok(shards) = std::fs::read_dir(data_dir.join("blobs").join(algorithm)) else {
            continue;
        };
        for shard in shards {
            let Ok(files) = std::fs::read_dir(shard.unwrap().path()) else {
                continue;
            };
            for file in files {
                let file = file.unwrap();
                // Deleted since the listing: not there.
                let Ok(meta) = file.metadata() else { continue };
                let name = file.file_name().to_str().unwrap().to_owned();
                found.insert(format!("{algorithm}:{name}"), meta.len());
            }
        }
    }
    found
}

/// Bytes a blob of `size` takes on disk, as the server counts them (whole 4 KiB blocks).
pub fn on_disk(size: u64) -> u64 {
    size.div_ceil(4096) * 4096
}

/// The sizes of the metadata database's files, for the figures.
pub fn meta_files(data_dir: &Path) -> String {
    ["meta.db", "meta.db-wal", "meta.db-shm"]
        .iter()
        .map(|name| {
            let len = std::fs::metadata(data_dir.join(name)).map_or(0, |m| m.len());
            format!("{name} {len}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pass report without its lists of evicted roots and entries (their lengths instead).
pub fn summary(report: &Value) -> Value {
    let mut report = report.clone();
    for list in ["evicted", "evicted_entries"] {
        if let Some(evicted) = report.get(list).and_then(Value::as_array) {
            report[list] = Value::from(evicted.len());
        }
    }
    report
}

/// `usage.total` of a `GET /api/v1/gc` status.
pub fn usage_total(status: &Value) -> u64 {
    status["usage"]["total"].as_u64().unwrap()
}
