//! S3-compatible blob backend, so several nodes share one bucket.
//!
//! Layout under the configured prefix: `blobs/<alg>/<hex>` for committed blobs, and
//! `uploads/<uuid>/<offset>` for the segments of a staging area (the offset zero-padded
//! to 20 digits; an empty segment at offset 0 marks a new area). Keys are built only
//! from a validated [`Digest`] or [`UploadId`] (invariant 6).
//!
//! Every object appears atomically (a PUT, a server-side copy or a multipart completion),
//! so a crash never exposes a partial blob (invariant 1): an append becomes one new
//! segment only once all its bytes are stored, which leaves a failed append's area at
//! its offset, and a commit publishes the blob key in one step. Because a staging area
//! is nothing but objects, a chunked upload continues through any node, after any node
//! restarts. Bodies move in parts of [`PART_SIZE`], at most [`PARTS_IN_FLIGHT`] at a
//! time, so memory stays flat whatever the blob size (invariant 4).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutPayloadMut, RetryConfig,
};
use oci::Digest;
use tokio::task::JoinSet;

use super::backend::{BlobBackend, Staged};
use super::{ByteRange, ByteStream};
use crate::config::S3;
use crate::error::Missing;
use crate::upload::UploadId;
use crate::{Error, Result};

/// Size of the parts a body is uploaded in (S3 wants at least 5 MiB but for the last;
/// 10,000 parts of this size allow blobs of 78 GiB).
const PART_SIZE: usize = 8 << 20;
/// Parts of one body uploaded at the same time: with the part being filled, this bounds
/// the memory one upload holds.
const PARTS_IN_FLIGHT: usize = 3;
/// Time allowed to open a connection to the object store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for a whole request that carries no large body (HEAD, LIST, DELETE).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a transfer waits for the store: for the answer to a request once it is sent
/// (a part's bytes included: at least 140 KB/s for a part of [`PART_SIZE`]), and for
/// each next piece of an answer's body. A store that stops answering fails the request
/// instead of holding it, and the upload or pull behind it, for ever.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most retries of one request. One that fails at once (refused, a 5xx) is tried again
/// after backing off up to a second each time: an unreachable store is reported within
/// seconds, as unavailable.
const MAX_RETRIES: usize = 3;
/// How long past its own time bound ([`CONTROL_TIMEOUT`], [`STALL_TIMEOUT`]) a request may
/// still be tried again: so one that timed out is sent once more, on another connection (a
/// request the store lost costs one timeout, not the operation), and a store that stops
/// answering is reported after two.
const RETRY_GRACE: Duration = Duration::from_secs(5);
/// Digits of a segment's offset in its key (enough for any `u64`), so keys sort by offset.
const OFFSET_DIGITS: usize = 20;

/// Blobs stored as objects in an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Backend {
    /// For requests without a large body: bounded by [`CONTROL_TIMEOUT`].
    control: Arc<AmazonS3>,
    /// For requests streaming a body (GET, parts, copies): no overall time limit, so a
    /// large transfer is never cut, but a stall is ([`STALL_TIMEOUT`]).
    transfer: Arc<AmazonS3>,
    /// `<prefix>/blobs`.
    blobs: Path,
    /// `<prefix>/uploads`.
    uploads: Path,
    /// `<prefix>/probe`.
    probes: Path,
    /// How long presigned redirects stay valid, when they are enabled.
    redirect: Option<Duration>,
}

/// Makes the client for transfers: one whose requests fail after [`STALL_TIMEOUT`]
/// without progress, which the object store's client options cannot express.
#[derive(Debug)]
struct TransferConnector {
    allow_http: bool,
}

impl HttpConnector for TransferConnector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT)
            .https_only(!self.allow_http)
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(client))
    }
}

/// One object of a staging area: its bytes start at `offset` in the area.
#[derive(Debug)]
struct Segment {
    offset: u64,
    size: u64,
    key: Path,
}

impl S3Backend {
    /// Connect to the bucket `config` describes, and check that it can be written to.
    ///
    /// Credentials come from `access_key_id` and `secret_access_key_file`, or else from
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`. Fails with [`Error::Config`]
    /// when they are missing or refused or the bucket does not exist, and with
    /// [`Error::Unavailable`] when the store cannot be reached.
    pub async fn connect(config: &S3) -> Result<S3Backend> {
        let access_key_id = match &config.access_key_id {
            Some(id) => id.clone(),
            None => std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                Error::Config(
                    "blobs.access_key_id is not set, and neither is AWS_ACCESS_KEY_ID".into(),
                )
            })?,
        };
        let secret = match &config.secret_access_key_file {
            Some(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| {
                    Error::Config(format!(
                        "blobs.secret_access_key_file {}: {e}",
                        path.display()
                    ))
                })?
                .trim()
                .to_owned(),
            None => std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| {
                Error::Config(
                    "blobs.secret_access_key_file is not set, and neither is \
                     AWS_SECRET_ACCESS_KEY"
                        .into(),
                )
            })?,
        };
        let prefix = Path::parse(&config.prefix).map_err(|e| {
            Error::Config(format!(
                "blobs.prefix {:?} is not usable: {e}",
                config.prefix
            ))
        })?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(config.virtual_hosted_style);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let allow_http = config
            .endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_allow_http(allow_http);
        let build = |builder: AmazonS3Builder, timeout: Duration| {
            builder
                .with_retry(RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(1),
                        base: 2.0,
                    },
                    max_retries: MAX_RETRIES,
                    retry_timeout: timeout + RETRY_GRACE,
                })
                .build()
                .map(Arc::new)
                .map_err(|e| Error::Config(format!("blobs: {e}")))
        };
        let backend = S3Backend {
            control: build(
                builder
                    .clone()
                    .with_client_options(options.clone().with_timeout(CONTROL_TIMEOUT)),
                CONTROL_TIMEOUT,
            )?,
            transfer: build(
                builder
                    .with_client_options(options.with_timeout_disabled())
                    .with_http_connector(TransferConnector { allow_http }),
                STALL_TIMEOUT,
            )?,
            blobs: prefix.clone().join("blobs"),
            uploads: prefix.clone().join("uploads"),
            probes: prefix.join("probe"),
            redirect: config.redirect,
        };
        backend.probe().await.map_err(|e| {
            let place = format!(
                "bucket {:?} at {}",
                config.bucket,
                config.endpoint.as_deref().unwrap_or("AWS S3")
            );
            match e {
                Error::Unavailable(_) => Error::Unavailable(format!("the object store ({place})")),
                e => Error::Config(format!("blobs: cannot write to {place}: {e}")),
            }
        })?;
        Ok(backend)
    }

    /// Write, read back and delete a small object: the bucket exists and these
    /// credentials may use it.
    pub async fn probe(&self) -> Result<()> {
        let key = self.probes.clone().join(UploadId::random().as_str());
        let content = Bytes::from_static(b"layercache probe");
        self.control.put(&key, content.clone().into()).await?;
        let read = self.control.get(&key).await?.bytes().await?;
        self.control.delete(&key).await?;
        if read != content {
            return Err(Error::Config(
                "the object store returned other bytes than were written".into(),
            ));
        }
        Ok(())
    }

    fn blob_key(&self, digest: &Digest) -> Path {
        self.blobs
            .clone()
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    fn area(&self, id: &UploadId) -> Path {
        self.uploads.clone().join(id.as_str())
    }

    fn segment_key(&self, id: &UploadId, offset: u64) -> Path {
        self.area(id)
            .join(format!("{offset:0width$}", width = OFFSET_DIGITS).as_str())
    }

    /// The segments of a staging area in order (none when it does not exist), checked
    /// to follow each other without gap or overlap.
    async fn segments(&self, id: &UploadId) -> Result<Vec<Segment>> {
        let objects: Vec<ObjectMeta> = self
            .control
            .list(Some(&self.area(id)))
            .try_collect()
            .await?;
        let mut segments: Vec<Segment> = objects
            .into_iter()
            .filter_map(|meta| {
                let offset = meta.location.filename()?.parse().ok()?;
                Some(Segment {
                    offset,
                    size: meta.size,
                    key: meta.location,
                })
            })
            .collect();
        segments.sort_by_key(|s| s.offset);
        let mut end = 0;
        for segment in &segments {
            if segment.offset != end {
                // Only two nodes writing the same upload at once can cause this.
                tracing::warn!(upload = %id, at = end, found = segment.offset,
                    "staging area has a gap or an overlap; the upload must restart");
                return Err(Error::NotFound(Missing::Upload));
            }
            end += segment.size;
        }
        Ok(segments)
    }

    /// Make the bytes of `segments` (the staging area `id`) the object `target`, in one
    /// step: a server-side copy of a single segment, or one multipart upload streaming
    /// them all.
    async fn publish(&self, id: &UploadId, segments: &[Segment], target: &Path) -> Result<()> {
        let with_bytes: Vec<&Segment> = segments.iter().filter(|s| s.size > 0).collect();
        match with_bytes.as_slice() {
            [] => self.transfer.copy(&self.segment_key(id, 0), target).await?,
            [only] => self.transfer.copy(&only.key, target).await?,
            several => {
                let mut writer = ObjectWriter::new(&self.transfer, target);
                for segment in several {
                    let mut bytes = self.transfer.get(&segment.key).await?.into_stream();
                    while let Some(chunk) = bytes.try_next().await? {
                        writer.write(chunk).await?;
                    }
                }
                writer.finish().await?;
            }
        }
        Ok(())
    }

    /// Stream `body` into a new object at `key`; returns its length. The object appears
    /// only if every byte was stored.
    async fn write_object(&self, key: &Path, mut body: ByteStream) -> Result<u64> {
        let mut writer = ObjectWriter::new(&self.transfer, key);
        while let Some(chunk) = body.next().await {
            writer.write(chunk.map_err(Error::Body)?).await?;
        }
        writer.finish().await
    }

    /// Delete every object under `prefix` (nothing when there are none).
    async fn delete_all(&self, prefix: &Path) -> Result<()> {
        let keys = self
            .control
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        self.control
            .delete_stream(keys)
            .try_for_each(|_| futures::future::ready(Ok(())))
            .await
            .or_else(ignore_not_found)
    }
}

fn ignore_not_found(e: object_store::Error) -> Result<()> {
    match e {
        object_store::Error::NotFound { .. } => Ok(()),
        e => Err(e.into()),
    }
}

fn not_found_as_none<T>(result: object_store::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn empty_stream() -> ByteStream {
    Box::pin(futures::stream::empty())
}

/// Uploads one object from a sequence of chunks: a single PUT when they fit in one
/// part, a multipart upload otherwise. An upload that does not finish (an error, or the
/// writer dropped) is aborted, so it leaves no object and no stored parts.
struct ObjectWriter<'a> {
    store: &'a AmazonS3,
    key: &'a Path,
    /// The part being filled.
    buffer: PutPayloadMut,
    /// Started with the first full part.
    upload: Option<Box<dyn MultipartUpload>>,
    parts: JoinSet<object_store::Result<()>>,
    written: u64,
}

impl<'a> ObjectWriter<'a> {
    fn new(store: &'a AmazonS3, key: &'a Path) -> Self {
        ObjectWriter {
            store,
            key,
            buffer: PutPayloadMut::new(),
            upload: None,
            parts: JoinSet::new(),
            written: 0,
        }
    }

    async fn write(&mut self, mut chunk: Bytes) -> Result<()> {
        self.written += chunk.len() as u64;
        while !chunk.is_empty() {
            let room = PART_SIZE - self.buffer.content_length();
            if chunk.len() < room {
                self.buffer.push(chunk);
                return Ok(());
            }
            self.buffer.push(chunk.split_to(room));
            self.send_part().await?;
        }
        Ok(())
    }

    /// Start uploading the buffered part, once fewer than [`PARTS_IN_FLIGHT`] are.
    async fn send_part(&mut self) -> Result<()> {
        while self.parts.len() >= PARTS_IN_FLIGHT {
            self.join_part().await?;
        }
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => self
                .upload
                .insert(self.store.put_multipart(self.key).await?),
        };
        let part = std::mem::take(&mut self.buffer).freeze();
        self.parts.spawn(upload.put_part(part));
        Ok(())
    }

    async fn join_part(&mut self) -> Result<()> {
        if let Some(done) = self.parts.join_next().await {
            done??;
        }
        Ok(())
    }

    /// Store what was written as the object; returns its length.
    async fn finish(mut self) -> Result<u64> {
        if self.upload.is_none() {
            let content = std::mem::take(&mut self.buffer).freeze();
            self.store.put(self.key, content).await?;
            return Ok(self.written);
        }
        if self.buffer.content_length() > 0 {
            self.send_part().await?;
        }
        while !self.parts.is_empty() {
            self.join_part().await?;
        }
        if let Some(upload) = &mut self.upload {
            upload.complete().await?;
        }
        self.upload = None;
        Ok(self.written)
    }
}

impl Drop for ObjectWriter<'_> {
    fn drop(&mut self) {
        let Some(mut upload) = self.upload.take() else {
            return;
        };
        self.parts.abort_all();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "could not abort a multipart upload");
                }
            });
        }
    }
}

#[async_trait]
impl BlobBackend for S3Backend {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        let meta = not_found_as_none(self.control.head(&self.blob_key(digest)).await)?;
        Ok(meta.map(|m| m.size))
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<ByteStream>> {
        let key = self.blob_key(digest);
        let bounds = match range {
            None => None,
            // Nothing to read, but whether the blob exists.
            Some(range) if range.len == 0 => {
                return Ok(self.stat(digest).await?.map(|_| empty_stream()));
            }
            Some(range) => Some(range.start..range.start.saturating_add(range.len)),
        };
        let options = GetOptions::new().with_range(bounds.clone().map(GetRange::Bounded));
        match self.transfer.get_opts(&key, options).await {
            // The store's client resumes a body that breaks off; when its retries run
            // out the response can only be cut, so say which blob it was.
            Ok(found) => {
                let digest = digest.clone();
                let body = found.into_stream().map_err(move |e| {
                    tracing::warn!(
                        %digest, error = %e,
                        "a blob read from the object store broke off"
                    );
                    io::Error::from(e)
                });
                Ok(Some(Box::pin(body)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => match Error::from(e) {
                unavailable @ Error::Unavailable(_) => Err(unavailable),
                e => match (bounds, self.stat(digest).await?) {
                    // A range starting at or past the end: the store refuses it, the
                    // contract gives no bytes.
                    (Some(bounds), Some(size)) if bounds.start >= size => Ok(Some(empty_stream())),
                    (_, None) => Ok(None),
                    _ => Err(e),
                },
            },
        }
    }

    async fn create_staged(&self, id: &UploadId) -> Result<()> {
        self.control
            .put(&self.segment_key(id, 0), Bytes::new().into())
            .await?;
        Ok(())
    }

    async fn staged_len(&self, id: &UploadId) -> Result<Option<u64>> {
        let segments = self.segments(id).await?;
        if segments.is_empty() {
            return Ok(None);
        }
        Ok(Some(segments.iter().map(|s| s.size).sum()))
    }

    async fn append(&self, id: &UploadId, offset: u64, body: ByteStream) -> Result<u64> {
        let len = self
            .staged_len(id)
            .await?
            .ok_or(Error::NotFound(Missing::Upload))?;
        if len != offset {
            return Err(Error::RangeInvalid {
                expected_offset: len,
                got: offset,
            });
        }
        // An empty append adds no segment.
        let mut body = body.peekable();
        if std::pin::Pin::new(&mut body).peek().await.is_none() {
            return Ok(offset);
        }
        let written = self
            .write_object(&self.segment_key(id, offset), Box::pin(body))
            .await?;
        Ok(offset + written)
    }

    async fn read_staged(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        let segments = self.segments(id).await?;
        if segments.is_empty() {
            return Err(Error::NotFound(Missing::Upload));
        }
        let pieces: Vec<(Path, u64)> = segments
            .into_iter()
            .filter(|s| s.size > 0 && s.offset + s.size > offset)
            .map(|s| (s.key, offset.saturating_sub(s.offset)))
            .collect();
        let store = self.transfer.clone();
        let stream = futures::stream::iter(pieces)
            .then(move |(key, from)| {
                let store = store.clone();
                async move {
                    let range = (from > 0).then_some(GetRange::Offset(from));
                    match store
                        .get_opts(&key, GetOptions::new().with_range(range))
                        .await
                    {
                        Ok(found) => Ok(Some(found.into_stream().map_err(io::Error::from))),
                        // Committed or discarded meanwhile: the area ends here.
                        Err(object_store::Error::NotFound { .. }) => Ok(None),
                        Err(e) => Err(io::Error::from(e)),
                    }
                }
            })
            .take_while(|piece| futures::future::ready(!matches!(piece, Ok(None))))
            .filter_map(|piece| futures::future::ready(piece.transpose()))
            .try_flatten();
        Ok(Box::pin(stream))
    }

    async fn commit(&self, id: &UploadId, digest: &Digest) -> Result<()> {
        let segments = self.segments(id).await?;
        if segments.is_empty() {
            return Err(Error::NotFound(Missing::Upload));
        }
        // Already there means the same content, since it hashes to the same digest.
        // A concurrent commit of the same content may win the race to publish (Garage
        // aborts the other uploads to a key when one completes): that is a success.
        if self.stat(digest).await?.is_none()
            && let Err(e) = self.publish(id, &segments, &self.blob_key(digest)).await
            && !matches!(self.stat(digest).await, Ok(Some(_)))
        {
            return Err(e);
        }
        // The blob is visible: staging objects a failure leaves here are removed when
        // the upload expires.
        if let Err(e) = self.delete_all(&self.area(id)).await {
            tracing::warn!(upload = %id, error = %e, "could not remove a committed upload's segments");
        }
        Ok(())
    }

    async fn discard(&self, id: &UploadId) -> Result<()> {
        self.delete_all(&self.area(id)).await
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        self.control
            .delete(&self.blob_key(digest))
            .await
            .or_else(ignore_not_found)
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let blobs = self.blobs.clone();
        self.control
            .list(Some(&self.blobs))
            .map_err(Error::from)
            .try_filter_map(|meta| {
                let digest = meta.location.prefix_match(&blobs).and_then(|mut parts| {
                    let algorithm = parts.next()?;
                    let hex = parts.next()?;
                    if parts.next().is_some() {
                        return None;
                    }
                    // Anything else under the prefix is not a blob this backend wrote.
                    Digest::parse_stored(&format!("{}:{}", algorithm.as_ref(), hex.as_ref())).ok()
                });
                futures::future::ready(Ok(digest))
            })
            .try_collect()
            .await
    }

    async fn staged(&self) -> Result<Vec<Staged>> {
        let objects: Vec<ObjectMeta> = self.control.list(Some(&self.uploads)).try_collect().await?;
        let mut areas: BTreeMap<String, (u64, SystemTime)> = BTreeMap::new();
        for meta in objects {
            let Some(id) = meta
                .location
                .prefix_match(&self.uploads)
                .and_then(|mut parts| parts.next())
            else {
                continue;
            };
            let modified = SystemTime::from(meta.last_modified);
            let area = areas
                .entry(id.as_ref().to_owned())
                .or_insert((0, SystemTime::UNIX_EPOCH));
            area.0 += meta.size;
            area.1 = area.1.max(modified);
        }
        Ok(areas
            .into_iter()
            .filter_map(|(id, (len, newest))| {
                Some(Staged {
                    id: id.parse().ok()?,
                    len,
                    idle: newest.elapsed().unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn redirect(&self, digest: &Digest) -> Result<Option<String>> {
        let Some(valid_for) = self.redirect else {
            return Ok(None);
        };
        let get = "GET"
            .parse()
            .map_err(|e| Error::Task(format!("HTTP method: {e}")))?;
        let url = self
            .control
            .signed_url(get, &self.blob_key(digest), valid_for)
            .await?;
        Ok(Some(url.into()))
    }
}
