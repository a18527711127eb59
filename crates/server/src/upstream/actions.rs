//! An edge's use of its centre's GitHub Actions cache service: a restore the edge cannot
//! answer from its own disk is asked of the centre, and an entry the centre has is
//! downloaded into the edge's store (in the scope the centre found it in) before the
//! client is answered, so the next restore is served from the edge; a save finished on
//! the edge is passed through to the centre before the client is told it succeeded.
//!
//! The edge speaks the centre's v2 twirp JSON API whatever its own client spoke
//! (`GetCacheEntryDownloadURL`, `CreateCacheEntry`, `FinalizeCacheEntryUpload`), and
//! moves the bytes with one streamed GET of the signed download URL and one streamed
//! Azure `Put Blob` to the signed upload URL: memory stays flat for any size.
//!
//! Identity: the edge forwards the client's own `Authorization` header (its runtime
//! token), so the centre grants exactly what it would grant the client. That works when
//! edge and centre trust the same tokens: they share the signing key (`[actions]
//! key_file` naming the same key) or trust the same CI issuer. The edge's registry token
//! (`--upstream-token-file`) is not used here. Which scope a match was found in is not
//! part of the twirp answer; a layercache centre says it in the
//! [`SCOPE_HEADER`](crate::actions::SCOPE_HEADER) header.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderValue, header};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, TryStreamExt};
use prometheus_client::metrics::counter::Counter;
use reqwest::{Response, Url};
use store::{Entry, Error, NewEntry, SourceFailure, Store};

use super::client::{
    MAX_ANSWER_BYTES, check, http_builder, read_limited, send_watched, transport, unavailable,
};
use super::{Config, Upstream, Upstreams};
use crate::actions::SCOPE_HEADER;

/// The twirp service's path, relative to the centre's base URL.
const SERVICE: &str = "twirp/github.actions.results.api.v1.CacheService";
/// How long an API call, or the next bytes of a download or upload, may take.
const IDLE: Duration = Duration::from_secs(60);

/// A fill of one entry (repository, scope, key, version), shared by the restores that
/// wait for it.
type FillKey = (String, String, String, String);
type SharedFill = Shared<BoxFuture<'static, Result<Entry, String>>>;

/// The centre's cache service.
pub(super) struct CentreCache {
    base: Url,
    /// For the API calls and downloads: a read timeout between bytes.
    api: reqwest::Client,
    /// For uploads: reqwest's read timeout would also run while the body is sent, so
    /// progress is watched instead (see [`send_watched`]).
    upload: reqwest::Client,
    /// Fills under way.
    fills: Arc<Mutex<HashMap<FillKey, SharedFill>>>,
}

/// What a restore through an edge asks its centre.
pub struct EntryAsk<'a> {
    /// The client's `Authorization` header (its runtime token), forwarded.
    pub authorization: &'a HeaderValue,
    /// The repository the token reaches.
    pub repository: &'a str,
    /// The scopes the token reads, in lookup order.
    pub readable: &'a [String],
    /// The primary key, then the restore keys.
    pub keys: &'a [String],
    /// The version.
    pub version: &'a str,
    /// The largest entry this server stores.
    pub limit: u64,
}

/// A match the centre found.
struct Found {
    scope: String,
    key: String,
    url: String,
}

#[derive(serde::Deserialize)]
struct Reply {
    #[serde(default)]
    ok: bool,
    #[serde(default, alias = "signedDownloadUrl")]
    signed_download_url: String,
    #[serde(default, alias = "signedUploadUrl")]
    signed_upload_url: String,
    #[serde(default, alias = "matchedKey")]
    matched_key: String,
    #[serde(default)]
    message: String,
}

impl CentreCache {
    /// A client of the cache service of the centre `config` names, at `base`.
    pub(super) fn new(config: &Config, base: Url) -> Result<CentreCache, String> {
        let build = |client: reqwest::ClientBuilder| client.build().map_err(|e| e.to_string());
        Ok(CentreCache {
            base,
            api: build(http_builder(config)?.read_timeout(IDLE))?,
            upload: build(http_builder(config)?)?,
            fills: Arc::default(),
        })
    }

    /// Call twirp `method` with `body` as the client `authorization` names.
    async fn call(
        &self,
        method: &str,
        authorization: &HeaderValue,
        body: serde_json::Value,
    ) -> Result<Response, Error> {
        let url = self
            .base
            .join(&format!("{SERVICE}/{method}"))
            .map_err(|e| unavailable(format!("the central cache's URL: {e}")))?;
        let response = self
            .api
            .post(url)
            .header(header::AUTHORIZATION, authorization.clone())
            .timeout(IDLE)
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        check(response, "cache").await
    }

    /// The centre's match for `keys` (primary first) at `version`, if any.
    async fn lookup(
        &self,
        authorization: &HeaderValue,
        keys: &[String],
        version: &str,
    ) -> Result<Option<Found>, Error> {
        let (key, restore_keys) = keys
            .split_first()
            .ok_or_else(|| unavailable("a restore names no key".into()))?;
        let body = serde_json::json!({
            "key": key,
            "restore_keys": restore_keys,
            "version": version,
        });
        let response = self
            .call("GetCacheEntryDownloadURL", authorization, body)
            .await?;
        let scope = response
            .headers()
            .get(SCOPE_HEADER)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .map(str::to_owned);
        let reply = json(response).await?;
        if !reply.ok {
            return Ok(None);
        }
        if reply.matched_key.is_empty() || reply.signed_download_url.is_empty() {
            return Err(unavailable(
                "the central cache's match has no key or no download URL".into(),
            ));
        }
        let scope = scope.ok_or_else(|| {
            unavailable(format!(
                "the central cache's match carries no {SCOPE_HEADER} header"
            ))
        })?;
        Ok(Some(Found {
            scope,
            key: reply.matched_key,
            url: reply.signed_download_url,
        }))
    }

    /// The fill of `entry` from `url`: joined if one is under way (`false`), else started
    /// (`true`) in a task of its own, so a client that goes away does not cut it short.
    fn fill(
        &self,
        store: &Store,
        entry: NewEntry,
        url: String,
        limit: u64,
        bytes: Counter,
    ) -> (SharedFill, bool) {
        let id: FillKey = (
            entry.repository.clone(),
            entry.scope.clone(),
            entry.key.clone(),
            entry.version.clone(),
        );
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = fills.get(&id) {
            return (running.clone(), false);
        }
        let task = tokio::spawn({
            let (http, store, fills, id) = (
                self.api.clone(),
                store.clone(),
                self.fills.clone(),
                id.clone(),
            );
            async move {
                let filled = download(&http, &store, entry, &url, limit, bytes)
                    .await
                    .map_err(|e| e.to_string());
                fills.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                filled
            }
        });
        let shared = async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the fill stopped: {e}")))
        }
        .boxed()
        .shared();
        fills.insert(id, shared.clone());
        (shared, true)
    }

    /// Pass finished `entry` of this server's store through to the centre: reserve it,
    /// upload its bytes, finalize it. An entry the centre already holds is a success.
    async fn save(
        &self,
        store: &Store,
        authorization: &HeaderValue,
        entry: &Entry,
    ) -> Result<(), Error> {
        let size = entry
            .size
            .ok_or(Error::NotFound(store::error::Missing::Entry))?;
        let body = serde_json::json!({ "key": entry.key, "version": entry.version });
        let created = match self.call("CreateCacheEntry", authorization, body).await {
            Err(Error::Source {
                failure: SourceFailure::Refused(409),
                ..
            }) => return self.confirm(authorization, entry).await,
            created => json(created?).await?,
        };
        if !created.ok {
            return Err(refused(&created.message, "reserve"));
        }
        let content = store.read_entry(entry.id).await?.stream(None);
        let request = self
            .upload
            .put(&created.signed_upload_url)
            .header("x-ms-blob-type", "BlockBlob")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size);
        let response = send_watched(request, content).await?;
        check(response, "cache upload").await?;
        let body = serde_json::json!({
            "key": entry.key,
            "version": entry.version,
            "size_bytes": size.to_string(),
        });
        let finalized = json(
            self.call("FinalizeCacheEntryUpload", authorization, body)
                .await?,
        )
        .await?;
        if !finalized.ok {
            return Err(refused(&finalized.message, "finalize"));
        }
        Ok(())
    }

    /// Whether the centre, which refused to reserve `entry` as existing, holds it
    /// finished (and not only an upload under way): its exact key, in its scope.
    async fn confirm(&self, authorization: &HeaderValue, entry: &Entry) -> Result<(), Error> {
        let found = self
            .lookup(
                authorization,
                std::slice::from_ref(&entry.key),
                &entry.version,
            )
            .await?;
        match found {
            Some(found) if found.key == entry.key && found.scope == entry.scope => Ok(()),
            _ => Err(unavailable(
                "the central cache is receiving another upload of this entry".into(),
            )),
        }
    }
}

/// The centre's answer to a twirp call.
async fn json(response: Response) -> Result<Reply, Error> {
    let body = read_limited(response, MAX_ANSWER_BYTES, "cache answer")
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    serde_json::from_slice(&body)
        .map_err(|e| unavailable(format!("the central cache's answer: {e}")))
}

/// The centre said no (`ok: false`) to step `what` of a save.
fn refused(message: &str, what: &str) -> Error {
    Error::Source {
        failure: SourceFailure::Denied,
        message: if message.is_empty() {
            format!("the central cache did not {what} the entry")
        } else {
            format!("the central cache did not {what} the entry: {message}")
        },
    }
}

/// Download the entry at `url` into `store` as finished entry `entry`, of at most `limit`
/// bytes; nothing is left behind if it fails.
async fn download(
    http: &reqwest::Client,
    store: &Store,
    entry: NewEntry,
    url: &str,
    limit: u64,
    bytes: Counter,
) -> Result<Entry, Error> {
    let response = http.get(url).send().await.map_err(transport)?;
    let response = check(response, "cache download").await?;
    let size = response.content_length();
    let body = response
        .bytes_stream()
        .map_err(std::io::Error::other)
        .inspect_ok(move |chunk| {
            bytes.inc_by(chunk.len() as u64);
        });
    let created = store.create_entry(entry).await?;
    let stored = async {
        let len = store
            .put_entry_part(created.id, 0, size, true, Box::pin(body), limit)
            .await?;
        store.finish_entry(created.id, len).await
    }
    .await;
    if stored.is_err()
        && let Err(e) = store.delete_entry(created.id).await
    {
        tracing::warn!(entry = created.id, error = %e, "removing a failed entry fill");
    }
    stored
}

impl Upstreams {
    /// An edge's centre and its cache service.
    fn centre_cache(&self) -> Option<(&Upstream, &CentreCache)> {
        let centre = self.centre()?;
        centre.cache.as_ref().map(|cache| (centre, cache))
    }

    /// Whether this server is an edge, passing cache restores and saves to a centre.
    pub fn passes_entries(&self) -> bool {
        self.centre_cache().is_some()
    }

    /// Count a restore an edge answered from its own disk.
    pub fn entry_hit(&self) {
        if let Some((centre, _)) = self.centre_cache() {
            self.metrics.hit(centre, "entry");
        }
    }

    /// The entry the centre matches for `ask`, stored here (filled now unless this
    /// server holds it already); `None` when the centre has none or this is no edge. A
    /// failure (counted) is the centre's, or storing what it sent.
    pub async fn restore_entry(
        &self,
        store: &Store,
        ask: EntryAsk<'_>,
    ) -> Result<Option<Entry>, Error> {
        let Some((centre, cache)) = self.centre_cache() else {
            return Ok(None);
        };
        let restored = async {
            let Some(found) = cache
                .lookup(ask.authorization, ask.keys, ask.version)
                .await?
            else {
                return Ok(None);
            };
            if !ask.readable.contains(&found.scope) {
                return Err(unavailable(format!(
                    "the central cache matched in scope {:?}, which the token does not read",
                    found.scope
                )));
            }
            let wanted = NewEntry {
                repository: ask.repository.to_owned(),
                scope: found.scope,
                key: found.key,
                version: ask.version.to_owned(),
            };
            let held = store.entry_by_key(wanted.clone()).await?;
            if let Some(held) = held.filter(|e| e.size.is_some()) {
                self.metrics.hit(centre, "entry");
                return Ok(Some(held));
            }
            let bytes = self.metrics.bytes_counter(centre);
            let (fill, started) = cache.fill(store, wanted, found.url, ask.limit, bytes);
            if started {
                self.metrics.filled(centre, "entry", 0);
            }
            fill.await.map(Some).map_err(unavailable)
        }
        .await;
        if restored.is_err() {
            self.metrics.failure_counter(centre).inc();
        }
        restored
    }

    /// Pass finished `entry` through to the centre with the client's `authorization`
    /// (nothing to do when this is no edge). A failure (counted) is the centre's, or
    /// reading this server's copy.
    pub async fn save_entry(
        &self,
        store: &Store,
        authorization: &HeaderValue,
        entry: &Entry,
    ) -> Result<(), Error> {
        let Some((centre, cache)) = self.centre_cache() else {
            return Ok(());
        };
        let saved = cache.save(store, authorization, entry).await;
        if saved.is_err() {
            self.metrics.failure_counter(centre).inc();
        }
        saved
    }
}
