//! A GitHub Actions cache client: the v1 REST API, and the v2 twirp API with the
//! Azure-blob signed URLs its clients upload to and download from (Put Blob, Put Block,
//! Put Block List, Get Blob), sent the way go-actions-cache (BuildKit `type=gha`) and the
//! JS toolkit send them.
//!
//! [`Client`] talks to a server by URL. Its `try_` calls return what went wrong instead of
//! panicking, for load and crash tests that sum failures up or expect the server to
//! vanish; the other calls assert, for protocol tests. [`Gha`] is a server on a data
//! directory of its own with a client holding a token for [`SCOPE`].

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use sha2::Digest;

use super::Server;

/// A mebibyte.
pub const MIB: usize = 1 << 20;
/// The scope every token here reads and writes.
pub const SCOPE: &str = "refs/heads/main";
/// The path prefix of the v2 cache service's twirp methods.
pub const TWIRP: &str = "/twirp/github.actions.results.api.v1.CacheService/";

/// go-actions-cache's version for every key: `sha256("|go-actionscache-1.0")`.
pub fn version() -> String {
    hex::encode(sha2::Sha256::digest(b"|go-actionscache-1.0"))
}

/// `len` bytes of pseudo-random stream `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for chunk in super::chunks(seed, len, MIB) {
        out.extend_from_slice(&chunk);
    }
    out
}

/// The bytes a load test saves under `key`: fixed by the key, so any client can check a
/// restore; `min` to `max` bytes long, log-uniform.
pub fn keyed_content(key: &str, min: usize, max: usize) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let hash = sha2::Sha256::digest(key.as_bytes());
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&hash[..8]);
    let seed = u64::from_le_bytes(seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ratio = max as f64 / min as f64;
    let len = (min as f64 * ratio.powf(rng.random::<f64>())) as usize;
    data(seed, len.clamp(min, max))
}

/// The blobs (digest, size) an entry is stored as when uploaded in blocks of `block`
/// bytes (one block per blob; what is smaller than a block goes up whole, as one),
/// addressed by BLAKE3 as the store addresses entries' parts.
pub fn stored_pieces(bytes: &[u8], block: usize) -> Vec<(String, u64)> {
    bytes
        .chunks(block.max(1))
        .map(|p| (super::digest_with("blake3", p), p.len() as u64))
        .collect()
}

/// A key and its content.
pub struct Entry {
    /// The key.
    pub key: String,
    /// The content saved under it.
    pub bytes: Vec<u8>,
}

impl Entry {
    /// `bytes` under `key`.
    pub fn new(key: String, bytes: Vec<u8>) -> Entry {
        Entry { key, bytes }
    }

    /// A layer blob as BuildKit names it: `buildkit-blob-1-sha256:<hex>`.
    pub fn layer(seed: u64, len: usize) -> Entry {
        let bytes = data(seed, len);
        Entry {
            key: format!("buildkit-blob-1-{}", super::digest_of(&bytes)),
            bytes,
        }
    }
}

/// `GET /api/v1/gc`'s usage.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Blobs stored.
    pub blobs: u64,
    /// Their bytes on disk.
    pub blob_bytes: u64,
}

/// Standard base64 with padding (block ids as the Azure SDKs send them).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = |i: usize| u32::from(group.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A block id as azblob (Go) makes it: 64 bytes, a random 16-byte prefix and the block
/// index big-endian at offset 16, base64 (88 characters, with `+`, `/` and `=` that
/// need escaping in a query).
pub fn go_block_id(index: u32) -> String {
    let mut raw = [0u8; 64];
    raw[..16].copy_from_slice(&[
        0xfb, 0xef, 0xbe, 0xff, 0x3e, 0xfc, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0xfb,
        0xff,
    ]);
    raw[16..20].copy_from_slice(&index.to_be_bytes());
    base64(&raw)
}

/// `url` with `extra` query parameters, rebuilt the way the Go Azure SDK does it: parse,
/// add, sort by name, re-encode (`?blockid=…&comp=block&sig=…`).
pub fn go_url(url: &str, extra: &[(&str, &str)]) -> String {
    let mut parsed = Url::parse(url).unwrap();
    let mut pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    parsed.query_pairs_mut().clear().extend_pairs(pairs);
    parsed.to_string()
}

/// `url` with `extra` appended as the JS SDK does (`url&comp=block&blockid=…`).
pub fn js_url(url: &str, extra: &[(&str, &str)]) -> String {
    let mut parsed = Url::parse(url).unwrap();
    parsed.query_pairs_mut().extend_pairs(extra);
    parsed.to_string()
}

/// A body sent with `Transfer-Encoding: chunked` (no Content-Length), in 64 KiB frames.
pub fn chunked(bytes: &[u8]) -> reqwest::Body {
    let frames: Vec<Result<bytes::Bytes, std::io::Error>> = bytes
        .chunks(64 * 1024)
        .map(|f| Ok(bytes::Bytes::copy_from_slice(f)))
        .collect();
    reqwest::Body::wrap_stream(futures::stream::iter(frames))
}

/// Whether the response carries a non-empty `x-ms-request-id` (go-actions-cache crashes
/// without): an error naming `what` if not.
pub fn check_request_id(response: &reqwest::Response, what: &str) -> Result<(), String> {
    let id = response
        .headers()
        .get("x-ms-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if id.is_empty() {
        return Err(format!(
            "{what}: {} without x-ms-request-id; headers {:?}",
            response.status(),
            response.headers()
        ));
    }
    Ok(())
}

/// The response carries a non-empty `x-ms-request-id` (go-actions-cache crashes without).
pub fn assert_request_id(response: &reqwest::Response, what: &str) {
    check_request_id(response, what).unwrap_or_else(|e| panic!("{e}"));
}

/// A response header as text.
pub fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// A client of one server's Actions cache API, with a token; it counts the requests it
/// sends.
#[derive(Clone)]
pub struct Client {
    /// The HTTP client (a 60 s timeout, no redirects).
    pub http: reqwest::Client,
    /// The runtime token it presents.
    pub token: String,
    base: String,
    sent: Arc<AtomicU64>,
}

/// A server on a data directory of our own, and a client whose token reads and writes
/// [`SCOPE`]; it derefs to the client.
pub struct Gha {
    /// The server.
    pub server: Server,
    client: Client,
    _tmp: tempfile::TempDir,
}

impl Deref for Gha {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Gha {
    /// A server with the default configuration.
    pub fn start() -> Gha {
        Gha::start_with_env(&[])
    }

    /// A server with extra environment (configuration).
    pub fn start_with_env(env: &[(&str, &str)]) -> Gha {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let server = Server::start_on_with_env(&dir, "127.0.0.1:0", env);
        let token = super::mint_token(&dir, &["--read", SCOPE, "--write", SCOPE]);
        let client = Client::new(&server.url, token);
        Gha {
            server,
            client,
            _tmp: tmp,
        }
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        self.server.data_dir()
    }
}

impl Client {
    /// A client of the server at `base` (`http://HOST:PORT`) presenting `token`.
    pub fn new(base: &str, token: String) -> Client {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Client {
            http,
            token,
            base: base.to_owned(),
            sent: Arc::default(),
        }
    }

    /// The same client, counting the requests it sends into `sent`.
    pub fn counting_into(mut self, sent: Arc<AtomicU64>) -> Client {
        self.sent = sent;
        self
    }

    /// Requests sent so far (through every clone counting into the same counter).
    pub fn requests_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The server's URL for `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Send `request`, counting it.
    async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        request.send().await
    }

    /// Send `request`, counting it; a connection error names `what`.
    async fn try_send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, String> {
        self.send(request)
            .await
            .map_err(|e| format!("{what}: connection error: {e:?}"))
    }

    // ---- v1 ----------------------------------------------------------------------------

    /// A v1 API request as the clients send it, with the bearer token.
    pub fn v1(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(&self.token)
            .header("accept", "application/json;api-version=6.0-preview.1")
    }

    /// The v1 lookup URL for `keys` (primary first) at [`version`].
    pub fn v1_lookup_url(&self, keys: &[&str]) -> String {
        let mut url = Url::parse(&self.at("/_apis/artifactcache/cache")).unwrap();
        url.query_pairs_mut()
            .append_pair("keys", &keys.join(","))
            .append_pair("version", &version());
        url.to_string()
    }

    /// A v1 lookup of `keys`.
    pub async fn v1_lookup(&self, keys: &[&str]) -> reqwest::Response {
        self.send(self.v1(Method::GET, &self.v1_lookup_url(keys)))
            .await
            .unwrap()
    }

    /// A lookup that must miss: 204, empty body.
    pub async fn v1_miss(&self, keys: &[&str]) {
        let response = self.v1_lookup(keys).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 204, "lookup {keys:?} should miss: {body}");
        assert!(body.is_empty(), "{body}");
    }

    /// A lookup that must hit: the JSON.
    pub async fn v1_hit(&self, keys: &[&str]) -> Value {
        let response = self.v1_lookup(keys).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "lookup {keys:?} should hit: {body}");
        let hit: Value = serde_json::from_str(&body).unwrap();
        assert!(hit["archiveLocation"].is_string(), "{hit:#}");
        hit
    }

    /// A v1 reserve of `key` for `size` bytes.
    pub async fn v1_reserve(&self, key: &str, size: usize) -> reqwest::Response {
        self.send(
            self.v1(Method::POST, &self.at("/_apis/artifactcache/caches"))
                .json(&json!({"key": key, "version": version(), "cacheSize": size})),
        )
        .await
        .unwrap()
    }

    /// A v1 reserve that must succeed: the cache id.
    pub async fn v1_reserve_ok(&self, key: &str, size: usize) -> u64 {
        let response = self.v1_reserve(key, size).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 201, "reserve {key}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        body["cacheId"]
            .as_u64()
            .unwrap_or_else(|| panic!("reserve {key}: no numeric cacheId in {body}"))
    }

    /// The v1 URL of cache `id`.
    pub fn v1_cache_url(&self, id: &str) -> String {
        self.at(&format!("/_apis/artifactcache/caches/{id}"))
    }

    /// `PATCH caches/{id}` with `range` as Content-Range (none if `None`).
    pub async fn v1_patch_with(
        &self,
        id: &str,
        range: Option<&str>,
        body: reqwest::Body,
    ) -> reqwest::Response {
        let mut request = self
            .v1(Method::PATCH, &self.v1_cache_url(id))
            .header("content-type", "application/octet-stream");
        if let Some(range) = range {
            request = request.header("content-range", range);
        }
        self.send(request.body(body)).await.unwrap()
    }

    /// One chunk at `start`, chunked transfer encoding, as the clients send it.
    pub async fn v1_patch(&self, id: u64, start: usize, bytes: &[u8]) -> reqwest::Response {
        let range = format!("bytes {start}-{}/*", start + bytes.len() - 1);
        self.v1_patch_with(&id.to_string(), Some(&range), chunked(bytes))
            .await
    }

    /// Upload `bytes` in `chunk`-sized pieces, 4 in flight, last piece first.
    pub async fn v1_upload(&self, id: u64, bytes: &[u8], chunk: usize) {
        let mut starts: Vec<usize> = (0..bytes.len()).step_by(chunk).collect();
        starts.reverse();
        let statuses: Vec<(usize, StatusCode, String)> = futures::stream::iter(starts)
            .map(|start| async move {
                let end = (start + chunk).min(bytes.len());
                let response = self.v1_patch(id, start, &bytes[start..end]).await;
                let status = response.status();
                (start, status, response.text().await.unwrap())
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for (start, status, body) in statuses {
            assert_eq!(status, 204, "PATCH cache {id} at {start}: {body}");
        }
    }

    /// A v1 commit of cache `id` at `size` bytes.
    pub async fn v1_commit(&self, id: &str, size: usize) -> reqwest::Response {
        self.send(
            self.v1(Method::POST, &self.v1_cache_url(id))
                .json(&json!({"size": size})),
        )
        .await
        .unwrap()
    }

    /// A v1 commit that must succeed.
    pub async fn v1_commit_ok(&self, id: u64, size: usize) {
        let response = self.v1_commit(&id.to_string(), size).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 204, "commit cache {id} size {size}: {body}");
    }

    /// Reserve, upload in 256 KiB chunks, commit.
    pub async fn v1_save(&self, entry: &Entry) {
        let id = self.v1_reserve_ok(&entry.key, entry.bytes.len()).await;
        self.v1_upload(id, &entry.bytes, 256 * 1024).await;
        self.v1_commit_ok(id, entry.bytes.len()).await;
    }

    /// `entry` restores byte-identical through v1.
    pub async fn v1_restores(&self, entry: &Entry) {
        let hit = self.v1_hit(&[&entry.key]).await;
        assert_eq!(hit["cacheKey"], entry.key, "{hit:#}");
        let got = self.get_ok(hit["archiveLocation"].as_str().unwrap()).await;
        assert!(
            got == entry.bytes,
            "{} restored {} different bytes ({} expected)",
            entry.key,
            got.len(),
            entry.bytes.len()
        );
    }

    /// The v1 listing of entries under `key`.
    pub async fn v1_list(&self, key: &str) -> Value {
        let mut url = Url::parse(&self.at("/_apis/artifactcache/caches")).unwrap();
        url.query_pairs_mut().append_pair("key", key);
        let response = self.send(self.v1(Method::GET, url.as_str())).await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    // ---- v2 ----------------------------------------------------------------------------

    /// A twirp call with raw `body` and `authorization` (none if `None`); the status and
    /// the body, which must be JSON whatever the status.
    pub async fn try_twirp_raw(
        &self,
        method: &str,
        body: impl Into<reqwest::Body>,
        authorization: Option<&str>,
    ) -> Result<(StatusCode, Value), String> {
        let mut request = self
            .http
            .post(self.at(&format!("{TWIRP}{method}")))
            .header("content-type", "application/json")
            .body(body);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = self.try_send(request, method).await?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{method}: {status}, body cut off: {e:?}"))?;
        let value = serde_json::from_str(&text).map_err(|e| {
            format!("{method} answered {status} with a body that is not JSON ({e}): {text:?}")
        })?;
        Ok((status, value))
    }

    /// [`Client::try_twirp_raw`], which must get an answer.
    pub async fn twirp_raw(
        &self,
        method: &str,
        body: impl Into<reqwest::Body>,
        authorization: Option<&str>,
    ) -> (StatusCode, Value) {
        self.try_twirp_raw(method, body, authorization)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A twirp call with `body` and the bearer token.
    pub async fn try_twirp(
        &self,
        method: &str,
        body: Value,
    ) -> Result<(StatusCode, Value), String> {
        let authorization = format!("Bearer {}", self.token);
        self.try_twirp_raw(method, body.to_string(), Some(&authorization))
            .await
    }

    /// [`Client::try_twirp`], which must get an answer.
    pub async fn twirp(&self, method: &str, body: Value) -> (StatusCode, Value) {
        self.try_twirp(method, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// CreateCacheEntry: the signed upload URL, or `None` when the key is taken (409
    /// `already_exists`: being uploaded or stored already).
    pub async fn try_v2_create(&self, key: &str) -> Result<Option<String>, String> {
        let (status, body) = self
            .try_twirp(
                "CreateCacheEntry",
                json!({"key": key, "version": version()}),
            )
            .await?;
        if status == 409 && body["code"] == "already_exists" {
            return Ok(None);
        }
        match body["signed_upload_url"].as_str() {
            Some(url) if status == 200 && body["ok"] == true => Ok(Some(url.to_owned())),
            _ => Err(format!("create {key}: {status} {body}")),
        }
    }

    /// CreateCacheEntry that must succeed: the signed upload URL.
    pub async fn v2_create(&self, key: &str) -> String {
        match self.try_v2_create(key).await {
            Ok(Some(url)) => url,
            Ok(None) => panic!("create {key}: already exists"),
            Err(e) => panic!("{e}"),
        }
    }

    /// FinalizeCacheEntryUpload with `size` as given (string or number).
    pub async fn v2_finalize(&self, key: &str, size: Value) -> (StatusCode, Value) {
        self.twirp(
            "FinalizeCacheEntryUpload",
            json!({"key": key, "size_bytes": size, "version": version()}),
        )
        .await
    }

    /// FinalizeCacheEntryUpload of `size` bytes: the entry id.
    pub async fn try_v2_finalize(&self, key: &str, size: usize) -> Result<String, String> {
        let (status, body) = self
            .try_twirp(
                "FinalizeCacheEntryUpload",
                json!({"key": key, "size_bytes": size.to_string(), "version": version()}),
            )
            .await?;
        match body["entry_id"].as_str() {
            Some(id) if status == 200 && body["ok"] == true => Ok(id.to_owned()),
            _ => Err(format!("finalize {key}: {status} {body}")),
        }
    }

    /// FinalizeCacheEntryUpload that must succeed: the entry id.
    pub async fn v2_finalize_ok(&self, key: &str, size: usize) -> String {
        self.try_v2_finalize(key, size)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// GetCacheEntryDownloadURL for `key` and `restore` keys: status and body.
    pub async fn v2_lookup(&self, key: &str, restore: &[&str]) -> (StatusCode, Value) {
        self.try_v2_lookup_raw(key, restore)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_v2_lookup_raw(
        &self,
        key: &str,
        restore: &[&str],
    ) -> Result<(StatusCode, Value), String> {
        let mut body = json!({"key": key, "version": version()});
        if !restore.is_empty() {
            body["restore_keys"] = json!(restore);
        }
        self.try_twirp("GetCacheEntryDownloadURL", body).await
    }

    /// GetCacheEntryDownloadURL: on a hit the signed download URL and the matched key,
    /// `None` on a miss.
    pub async fn try_v2_lookup(
        &self,
        key: &str,
        restore: &[&str],
    ) -> Result<Option<(String, String)>, String> {
        let (status, body) = self.try_v2_lookup_raw(key, restore).await?;
        if status != 200 {
            return Err(format!("lookup {key} {restore:?}: {status} {body}"));
        }
        if body["ok"] != true {
            return Ok(None);
        }
        match (
            body["signed_download_url"].as_str(),
            body["matched_key"].as_str(),
        ) {
            (Some(url), Some(matched)) => Ok(Some((url.to_owned(), matched.to_owned()))),
            _ => Err(format!(
                "lookup {key} {restore:?}: a hit without a URL: {body}"
            )),
        }
    }

    /// A v2 lookup that must miss.
    pub async fn v2_miss(&self, key: &str, restore: &[&str]) {
        let (status, body) = self.v2_lookup(key, restore).await;
        assert_eq!(status, 200, "lookup {key}: {body}");
        assert_ne!(body["ok"], true, "lookup {key} should miss: {body}");
        assert!(
            body.get("signed_download_url").is_none_or(|u| u == ""),
            "{body}"
        );
    }

    /// A lookup that must hit: the signed download URL and the matched key.
    pub async fn v2_hit(&self, key: &str, restore: &[&str]) -> (String, String) {
        let (status, body) = self.v2_lookup(key, restore).await;
        assert_eq!(status, 200, "lookup {key}: {body}");
        assert_eq!(
            body["ok"], true,
            "lookup {key} {restore:?} should hit: {body}"
        );
        (
            body["signed_download_url"].as_str().unwrap().to_owned(),
            body["matched_key"].as_str().unwrap().to_owned(),
        )
    }

    /// `entry` restores byte-identical through v2.
    pub async fn v2_restores(&self, entry: &Entry) {
        let (url, matched) = self.v2_hit(&entry.key, &[]).await;
        assert_eq!(matched, entry.key);
        let got = self.get_ok(&url).await;
        assert!(
            got == entry.bytes,
            "{} restored {} different bytes ({} expected)",
            entry.key,
            got.len(),
            entry.bytes.len()
        );
    }

    /// Put Blob: the whole entry in one `PUT` with `x-ms-blob-type: BlockBlob`.
    pub async fn try_put_blob(&self, url: &str, bytes: &[u8]) -> Result<reqwest::Response, String> {
        self.try_send(
            self.http
                .put(url)
                .header("x-ms-blob-type", "BlockBlob")
                .header("x-ms-version", "2024-11-04")
                .header("content-type", "application/octet-stream")
                .body(bytes.to_vec()),
            "Put Blob",
        )
        .await
    }

    /// [`Client::try_put_blob`], which must get an answer.
    pub async fn put_blob(&self, url: &str, bytes: &[u8]) -> reqwest::Response {
        self.try_put_blob(url, bytes)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Put Blob to the signed URL as the Go SDK rewrites it: 201 with a request id.
    pub async fn try_v2_put_blob(&self, url: &str, bytes: &[u8]) -> Result<(), String> {
        let response = self.try_put_blob(&go_url(url, &[]), bytes).await?;
        created(response, "Put Blob").await
    }

    /// [`Client::try_v2_put_blob`], which must succeed.
    pub async fn v2_put_blob(&self, url: &str, bytes: &[u8]) {
        self.try_v2_put_blob(url, bytes)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Put Block `id` (already in URL form by `go_url`/`js_url`).
    pub async fn try_put_block(
        &self,
        url: &str,
        bytes: &[u8],
    ) -> Result<reqwest::Response, String> {
        self.try_send(
            self.http
                .put(url)
                .header("x-ms-version", "2024-11-04")
                .header("content-type", "application/octet-stream")
                .body(bytes.to_vec()),
            "Put Block",
        )
        .await
    }

    /// [`Client::try_put_block`], which must get an answer.
    pub async fn put_block(&self, url: &str, bytes: &[u8]) -> reqwest::Response {
        self.try_put_block(url, bytes)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Put Block List naming `ids` in order, with the body the Go SDK sends.
    pub async fn try_put_block_list(
        &self,
        url: &str,
        ids: &[String],
    ) -> Result<reqwest::Response, String> {
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<BlockList>");
        for id in ids {
            xml.push_str(&format!("<Latest>{id}</Latest>"));
        }
        xml.push_str("</BlockList>");
        self.try_put_block_list_xml(url, xml).await
    }

    /// Put Block List with the body `xml`, whatever it holds.
    pub async fn try_put_block_list_xml(
        &self,
        url: &str,
        xml: impl Into<String>,
    ) -> Result<reqwest::Response, String> {
        let xml: String = xml.into();
        self.try_send(
            self.http
                .put(go_url(url, &[("comp", "blocklist")]))
                .header("x-ms-version", "2024-11-04")
                .header("content-type", "application/xml")
                .body(xml),
            "Put Block List",
        )
        .await
    }

    /// [`Client::try_put_block_list`], which must get an answer.
    pub async fn put_block_list(&self, url: &str, ids: &[String]) -> reqwest::Response {
        self.try_put_block_list(url, ids)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Upload as go-actions-cache does, with blocks of `block` bytes: Put Blocks
    /// (`in_flight` at once, last block first), then a Put Block List in order; each
    /// answered 201 with a request id.
    pub async fn try_upload_blocks(
        &self,
        url: &str,
        bytes: &[u8],
        block: usize,
        in_flight: usize,
    ) -> Result<(), String> {
        let blocks: Vec<(u32, &[u8])> = bytes
            .chunks(block)
            .enumerate()
            .map(|(i, b)| (i as u32, b))
            .collect();
        let ids: Vec<String> = blocks.iter().map(|(i, _)| go_block_id(*i)).collect();
        // The futures are made up front: a stream mapping through a closure would not be
        // `Send` for every lifetime, and spawned load tasks upload too.
        let puts: Vec<_> = blocks
            .iter()
            .rev()
            .map(|&(i, block)| async move {
                let id = go_block_id(i);
                let target = go_url(url, &[("comp", "block"), ("blockid", &id)]);
                let response = self.try_put_block(&target, block).await?;
                created(response, &format!("Put Block {i}")).await
            })
            .collect();
        let results: Vec<Result<(), String>> = futures::stream::iter(puts)
            .buffer_unordered(in_flight)
            .collect()
            .await;
        results.into_iter().collect::<Result<(), String>>()?;
        let response = self.try_put_block_list(url, &ids).await?;
        created(response, "Put Block List").await
    }

    /// Upload as go-actions-cache does: below 1 MiB one Put Blob; otherwise 1 MiB Put
    /// Blocks (8 in flight, last block first) and a Put Block List in order.
    pub async fn v2_upload_go(&self, url: &str, bytes: &[u8]) {
        if bytes.len() < MIB {
            self.v2_put_blob(url, bytes).await;
            return;
        }
        self.try_upload_blocks(url, bytes, MIB, 8)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Upload as the JS Azure SDK does above its single-shot size: Put Blocks of
    /// `block` bytes with 48-byte ids (`<uuid><12-digit index>`), appended to the URL as
    /// given, then the block list with its `standalone` declaration.
    pub async fn js_upload_blocks(&self, url: &str, bytes: &[u8], block: usize) {
        let ids: Vec<String> = (0..bytes.len().div_ceil(block))
            .map(|i| base64(format!("6f1c1a3e-8b8e-4f4e-9d5e-2b1f0c9a7d3e{i:012}").as_bytes()))
            .collect();
        for (id, chunk) in ids.iter().zip(bytes.chunks(block)).rev() {
            let target = js_url(url, &[("comp", "block"), ("blockid", id)]);
            let response = self.put_block(&target, chunk).await;
            assert_request_id(&response, "Put Block");
            assert_eq!(response.status(), 201, "Put Block {id}");
        }
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?><BlockList>",
        );
        for id in &ids {
            xml.push_str(&format!("<Latest>{id}</Latest>"));
        }
        xml.push_str("</BlockList>");
        let response = self
            .send(
                self.http
                    .put(js_url(url, &[("comp", "blocklist")]))
                    .header("content-type", "application/xml")
                    .body(xml),
            )
            .await
            .unwrap();
        assert_request_id(&response, "Put Block List");
        let status = response.status();
        assert_eq!(
            status,
            201,
            "Put Block List: {}",
            response.text().await.unwrap()
        );
    }

    // ---- downloads -----------------------------------------------------------------------

    /// GET `url` without Authorization: the status, and the whole body on a 200 (the
    /// error text otherwise).
    pub async fn try_get(&self, url: &str) -> Result<(StatusCode, Vec<u8>), String> {
        let response = self.try_send(self.http.get(url), "GET").await?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("GET {url}: {status}, body cut off: {e:?}"))?;
        Ok((status, body.to_vec()))
    }

    /// GET `url` without Authorization: 200 and the bytes.
    pub async fn get_ok(&self, url: &str) -> Vec<u8> {
        let (status, body) = self.try_get(url).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200, "GET {url}");
        body
    }

    /// Download `url` every way the clients do, without Authorization: whole, HEAD, and
    /// ranged with `Range` and `x-ms-range` (closed and open-ended). With `azure`, every
    /// response must carry `x-ms-request-id`.
    pub async fn check_download(&self, url: &str, expected: &[u8], azure: bool) {
        let len = expected.len();
        let check_id = |response: &reqwest::Response, what: &str| {
            if azure {
                assert_request_id(response, what);
            }
        };

        let response = self.send(self.http.get(url)).await.unwrap();
        check_id(&response, "GET");
        assert_eq!(response.status(), 200, "GET {url}");
        if let Some(length) = header(&response, "content-length") {
            assert_eq!(length, len.to_string(), "GET {url}");
        }
        let got = response.bytes().await.unwrap();
        assert!(got == expected, "GET {url}: {} different bytes", got.len());

        let response = self.send(self.http.head(url)).await.unwrap();
        check_id(&response, "HEAD");
        assert_eq!(response.status(), 200, "HEAD {url}");
        assert_eq!(
            header(&response, "content-length"),
            Some(len.to_string()),
            "HEAD {url}"
        );

        let a = len / 3;
        let b = (a + 100_000).min(len - 1);
        let c = len / 2;
        let open = len * 2 / 3;
        for (name, spec, first, last) in [
            ("range", format!("bytes={a}-{b}"), a, b),
            ("x-ms-range", format!("bytes={c}-{}", len - 1), c, len - 1),
            ("range", format!("bytes={open}-"), open, len - 1),
            ("x-ms-range", format!("bytes={open}-"), open, len - 1),
        ] {
            let response = self
                .send(self.http.get(url).header(name, &spec))
                .await
                .unwrap();
            check_id(&response, name);
            assert_eq!(response.status(), 206, "{name}: {spec} of {len} bytes");
            assert_eq!(
                header(&response, "content-range"),
                Some(format!("bytes {first}-{last}/{len}")),
                "{name}: {spec}"
            );
            let got = response.bytes().await.unwrap();
            assert!(
                got == expected[first..=last],
                "{name}: {spec}: {} different bytes",
                got.len()
            );
        }
    }

    /// Create, upload as go-actions-cache does, finalize.
    pub async fn v2_save(&self, entry: &Entry) {
        let url = self.v2_create(&entry.key).await;
        self.v2_upload_go(&url, &entry.bytes).await;
        self.v2_finalize_ok(&entry.key, entry.bytes.len()).await;
    }

    /// `key` matches nothing through either protocol.
    pub async fn invisible(&self, key: &str) {
        self.v1_miss(&[key]).await;
        self.v2_miss(key, &[]).await;
    }

    /// `GET /api/v1/gc`'s blob usage.
    pub async fn usage(&self) -> Usage {
        let status: Value = self
            .send(self.http.get(self.at("/api/v1/gc")))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let field = |name: &str| {
            status["usage"][name]
                .as_u64()
                .unwrap_or_else(|| panic!("no usage.{name} in GET /api/v1/gc: {status:#}"))
        };
        Usage {
            blobs: field("blobs"),
            blob_bytes: field("blob_bytes"),
        }
    }
}

/// A signed-URL write answered 201 with a request id; otherwise what it got.
async fn created(response: reqwest::Response, what: &str) -> Result<(), String> {
    check_request_id(&response, what)?;
    let status = response.status();
    if status != 201 {
        let body = response.text().await.unwrap_or_default();
        return Err(format!("{what}: {status} {body}"));
    }
    Ok(())
}
