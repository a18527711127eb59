//! The `BlobBackend` contract, and `BlobStore`'s verification on top of it, run on every
//! blob backend: the local filesystem and an S3-compatible bucket (a real Garage node,
//! each test under its own key prefix). Every test written as `async fn name(f: Fixture)`
//! becomes `fs::name` and `s3::name`, so a failure names its backend. The S3 tests skip
//! (with a note) where Garage is not installed, unless `REQUIRE_REAL_CLIENTS=1`.
//!
//! The tests at the end are about one backend alone: the filesystem's direct I/O, and
//! S3's outage and the recovery from it, start-up checks, presigned redirects and
//! aborted multipart uploads.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use oci::{Algorithm, Digest, Hasher};
use store::blob::{BlobBackend, FsBackend, S3Backend};
use store::config::S3;
use store::error::Missing;
use store::meta::SqliteMeta;
use store::{BlobStore, ByteRange, ByteStream, Caching, Error, UploadId};
use testsupport::garage::{self, Garage};

/// Larger than one S3 part, so a body of this size takes the multipart path.
const MORE_THAN_A_PART: usize = 12 << 20;

/// One backend under test, with what it takes to open a second instance on the same
/// storage.
struct Fixture {
    name: &'static str,
    backend: Arc<dyn BlobBackend>,
    /// The S3 configuration, `None` on the filesystem.
    s3: Option<S3>,
    /// The node behind it, whose log a failing test shows.
    garage: Option<&'static Garage>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn fs() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backend = FsBackend::open(&dir.path().join("data")).unwrap();
        Fixture {
            name: "filesystem",
            backend: Arc::new(backend),
            s3: None,
            garage: None,
            dir,
        }
    }

    /// A backend on the shared Garage node under a fresh prefix; `None` to skip.
    async fn s3() -> Option<Fixture> {
        let garage = tokio::task::spawn_blocking(garage::require)
            .await
            .unwrap()?;
        Some(Fixture::s3_on(garage, garage.bucket(), None).await)
    }

    async fn s3_on(garage: &'static Garage, bucket: &str, redirect: Option<Duration>) -> Fixture {
        log_to_test_output();
        let dir = tempfile::tempdir().unwrap();
        let mut config = s3_config(garage, dir.path(), bucket);
        config.redirect = redirect;
        let backend = S3Backend::connect(&config).await.unwrap();
        Fixture {
            name: "S3",
            backend: Arc::new(backend),
            s3: Some(config),
            garage: Some(garage),
            dir,
        }
    }

    /// Another instance of the backend on the same storage (another node, or this one
    /// after a restart).
    async fn reopen(&self) -> Arc<dyn BlobBackend> {
        match &self.s3 {
            Some(config) => Arc::new(S3Backend::connect(config).await.unwrap()),
            None => Arc::new(FsBackend::open(&self.dir.path().join("data")).unwrap()),
        }
    }

    /// A verifying store over `backend`.
    fn blob_store(&self, backend: Arc<dyn BlobBackend>) -> BlobStore {
        let path = self
            .dir
            .path()
            .join(format!("meta-{}.db", UploadId::random()));
        BlobStore::new(backend, Arc::new(SqliteMeta::open(&path).unwrap()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(garage) = self.garage
            && std::thread::panicking()
        {
            match garage.log_tail() {
                tail if tail.is_empty() => eprintln!("the Garage node logged no warning"),
                tail => eprintln!("the Garage node's log ends with:\n{tail}"),
            }
        }
    }
}

/// Show the backend's warnings and the object store client's retries (with the request
/// that timed out) in the output of the test that logged them.
fn log_to_test_output() {
    testsupport::log_to_test_output("warn,object_store=info");
}

/// A configuration for `garage`'s `bucket` under a prefix of its own, the secret in a
/// file under `dir`.
fn s3_config(garage: &Garage, dir: &Path, bucket: &str) -> S3 {
    let secret = dir.join("secret");
    std::fs::write(&secret, garage.secret()).unwrap();
    S3 {
        endpoint: Some(garage.endpoint()),
        bucket: bucket.to_owned(),
        region: garage.region().to_owned(),
        prefix: format!("test-{}/", UploadId::random()),
        access_key_id: Some(garage.key_id().to_owned()),
        secret_access_key_file: Some(secret),
        virtual_hosted_style: false,
        redirect: None,
    }
}

/// Whether Garage can be run; a note on stderr when the test skips.
fn garage_installed() -> bool {
    if garage::available() {
        return true;
    }
    assert!(
        !garage::required(),
        "garage is not installed and {} is set",
        garage::REQUIRE_VAR
    );
    eprintln!("skipped: garage is not installed");
    false
}

/// Turn each `async fn name(f: Fixture)` into the tests `fs::name` and `s3::name`.
macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Fixture::fs()).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(fixture) = super::Fixture::s3().await {
                        super::$name(fixture).await
                    }
                }
            )*
        }
    };
}

on_each_backend!(
    absent_things_read_as_absent,
    staged_bytes_are_invisible_until_commit,
    chunked_appends_continue_where_the_area_ends,
    appends_at_any_other_offset_are_refused_with_the_current_length,
    a_failed_append_leaves_the_area_at_its_offset,
    staged_bytes_stream_back_from_any_offset,
    ranges_cover_exactly_the_bytes_asked_for_including_the_last,
    an_empty_blob_commits_and_reads_back_empty,
    committing_content_already_there_keeps_it,
    discard_and_delete_are_idempotent,
    list_and_staged_report_what_exists,
    two_instances_see_each_others_commits_and_continue_each_others_uploads,
    readers_during_commits_see_the_whole_blob_or_nothing,
    a_blob_of_hundreds_of_mebibytes_streams_through,
    redirects_are_offered_only_when_configured,
    blob_store_commits_only_content_that_hashes_to_its_digest,
    blob_store_rehashes_an_upload_on_a_new_instance_and_finishes_it,
    blob_store_refuses_chunks_at_wrong_offsets_and_keeps_the_upload,
    uncached_appends_and_reads_move_the_same_bytes,
);

// ---------------------------------------------------------------------------------------
// Bodies and what came back.

/// `bytes` as a body of `chunk`-sized pieces.
fn body(bytes: &[u8], chunk: usize) -> ByteStream {
    let chunks: Vec<io::Result<Bytes>> = bytes
        .chunks(chunk.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// `bytes` as a body of pieces of the given lengths (the last piece takes the rest),
/// each copied to a 4 KiB-aligned address, as the store hands blocks to a backend: a
/// backend writing around the page cache writes the pieces that are whole 4 KiB blocks
/// as they are, and gathers the others.
fn aligned_body(bytes: &[u8], pieces: &[usize]) -> ByteStream {
    /// Bytes at an aligned address within a larger allocation.
    struct AlignedCopy(Vec<u8>, usize, usize);
    impl AsRef<[u8]> for AlignedCopy {
        fn as_ref(&self) -> &[u8] {
            &self.0[self.1..self.1 + self.2]
        }
    }
    let mut rest = bytes;
    let mut chunks = Vec::new();
    for &len in pieces.iter().chain([&usize::MAX]) {
        let (piece, after) = rest.split_at(len.min(rest.len()));
        let mut mem = vec![0u8; piece.len() + 4096];
        let start = mem.as_ptr().align_offset(4096);
        mem[start..start + piece.len()].copy_from_slice(piece);
        let piece = Bytes::from_owner(AlignedCopy(mem, start, piece.len()));
        assert_eq!(piece.as_ptr().addr() % 4096, 0);
        chunks.push(Ok(piece));
        rest = after;
        if rest.is_empty() {
            break;
        }
    }
    Box::pin(futures::stream::iter(chunks))
}

/// `good` in pieces, then the client going away.
fn failing_body(good: &[u8]) -> ByteStream {
    let chunks = good
        .chunks(1 << 20)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .chain([Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the client went away",
        ))])
        .collect::<Vec<_>>();
    Box::pin(futures::stream::iter(chunks))
}

/// `len` bytes of a pattern that differs at every offset (so misplaced bytes show).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (i + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (x >> 56) as u8
        })
        .collect()
}

/// A body of `len` bytes generated as it is read, in 1 MiB chunks, and its digest.
fn generated(len: u64, seed: u8) -> (ByteStream, Digest) {
    let chunk = move |k: u64| {
        let mut bytes = vec![seed; 1 << 20];
        bytes[..8].copy_from_slice(&k.to_le_bytes());
        bytes
    };
    let chunks = len.div_ceil(1 << 20);
    let size = move |k: u64| ((len - k * (1 << 20)).min(1 << 20)) as usize;
    let mut hasher = Hasher::new(Algorithm::Sha256);
    for k in 0..chunks {
        hasher.update(&chunk(k)[..size(k)]);
    }
    let stream = futures::stream::iter(0..chunks).map(move |k| {
        let mut bytes = chunk(k);
        bytes.truncate(size(k));
        Ok(Bytes::from(bytes))
    });
    (Box::pin(stream), hasher.finish())
}

async fn collect(stream: ByteStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut stream = stream;
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    bytes
}

/// Length and digest of what `stream` yields, without holding it.
async fn hash(stream: ByteStream) -> (u64, Digest) {
    let (mut len, mut hasher, mut stream) = (0, Hasher::new(Algorithm::Sha256), stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    (len, hasher.finish())
}

async fn read_all(backend: &dyn BlobBackend, digest: &Digest) -> Option<Vec<u8>> {
    Some(collect(backend.read(digest, None).await.unwrap()?).await)
}

async fn read_range(backend: &dyn BlobBackend, digest: &Digest, start: u64, len: u64) -> Vec<u8> {
    let range = ByteRange { start, len };
    collect(backend.read(digest, Some(range)).await.unwrap().unwrap()).await
}

/// What a read of `len` bytes from `start` gives of `content`: what there is.
fn in_range(content: &[u8], start: u64, len: u64) -> &[u8] {
    let from = (start as usize).min(content.len());
    let to = (start.saturating_add(len) as usize).min(content.len());
    &content[from..to]
}

/// Stage `content` in `pieces` appends and commit it; returns its digest.
async fn put(backend: &dyn BlobBackend, content: &[u8], pieces: usize) -> Digest {
    let id = UploadId::random();
    backend.create_staged(&id).await.unwrap();
    let mut offset = 0u64;
    for piece in content.chunks(content.len().div_ceil(pieces.max(1)).max(1)) {
        offset = backend
            .append(&id, offset, body(piece, 64 << 10))
            .await
            .unwrap();
    }
    let digest = Digest::sha256_of(content);
    backend.commit(&id, &digest).await.unwrap();
    digest
}

// ---------------------------------------------------------------------------------------
// The backend contract.

async fn absent_things_read_as_absent(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let digest = Digest::sha256_of(b"never stored");
    let unknown = UploadId::random();
    assert_eq!(b.stat(&digest).await.unwrap(), None, "{name}");
    assert!(b.read(&digest, None).await.unwrap().is_none(), "{name}");
    let range = Some(ByteRange { start: 1, len: 2 });
    assert!(b.read(&digest, range).await.unwrap().is_none(), "{name}");
    assert_eq!(b.staged_len(&unknown).await.unwrap(), None, "{name}");
    let missing = |r: Result<_, Error>| matches!(r, Err(Error::NotFound(Missing::Upload)));
    assert!(
        missing(b.read_staged(&unknown, 0).await.map(|_| ())),
        "{name}"
    );
    assert!(
        missing(b.append(&unknown, 0, body(b"x", 1)).await.map(|_| ())),
        "{name}"
    );
    assert!(missing(b.commit(&unknown, &digest).await), "{name}");
    assert_eq!(b.staged_len(&unknown).await.unwrap(), None, "{name}");
    assert_eq!(b.stat(&digest).await.unwrap(), None, "{name}");
}

async fn staged_bytes_are_invisible_until_commit(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let content = pattern(300_000, 1);
    let digest = Digest::sha256_of(&content);
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    assert_eq!(b.staged_len(&id).await.unwrap(), Some(0), "{name}");
    let len = b.append(&id, 0, body(&content, 10_000)).await.unwrap();
    assert_eq!(len, content.len() as u64, "{name}");
    assert_eq!(b.stat(&digest).await.unwrap(), None, "{name}");
    assert!(b.read(&digest, None).await.unwrap().is_none(), "{name}");
    assert!(!b.list().await.unwrap().contains(&digest), "{name}");

    b.commit(&id, &digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), Some(len), "{name}");
    assert_eq!(read_all(b, &digest).await.unwrap(), content, "{name}");
    assert!(b.list().await.unwrap().contains(&digest), "{name}");
    assert_eq!(
        b.staged_len(&id).await.unwrap(),
        None,
        "{name}: a committed area is gone"
    );
    assert!(
        !b.staged().await.unwrap().iter().any(|s| s.id == id),
        "{name}"
    );
}

async fn chunked_appends_continue_where_the_area_ends(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let content = pattern(MORE_THAN_A_PART + 3_000_001, 2);
    let cuts = [
        0,
        1,
        70_000,
        70_000,
        MORE_THAN_A_PART + 70_000,
        content.len(),
    ];
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    let mut offset = 0u64;
    for window in cuts.windows(2) {
        let piece = &content[window[0]..window[1]];
        offset = b.append(&id, offset, body(piece, 100_000)).await.unwrap();
        assert_eq!(offset, window[1] as u64, "{name}");
        assert_eq!(b.staged_len(&id).await.unwrap(), Some(offset), "{name}");
    }
    let digest = Digest::sha256_of(&content);
    b.commit(&id, &digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), Some(offset), "{name}");
    let (len, read) = hash(b.read(&digest, None).await.unwrap().unwrap()).await;
    assert_eq!((len, read), (offset, digest), "{name}");
}

async fn appends_at_any_other_offset_are_refused_with_the_current_length(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    b.append(&id, 0, body(b"0123456789", 3)).await.unwrap();
    for wrong in [0, 9, 11, 1 << 40] {
        match b.append(&id, wrong, body(b"abc", 3)).await {
            Err(Error::RangeInvalid {
                expected_offset: 10,
                got,
            }) if got == wrong => {}
            other => panic!("{name}: append at {wrong} gave {other:?}"),
        }
    }
    assert_eq!(b.staged_len(&id).await.unwrap(), Some(10), "{name}");
    assert_eq!(
        b.append(&id, 10, body(b"abc", 3)).await.unwrap(),
        13,
        "{name}"
    );
    let staged = collect(b.read_staged(&id, 0).await.unwrap()).await;
    assert_eq!(staged, b"0123456789abc", "{name}");
    b.discard(&id).await.unwrap();
}

async fn a_failed_append_leaves_the_area_at_its_offset(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let first = pattern(5_000, 3);
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    b.append(&id, 0, body(&first, 1_000)).await.unwrap();
    // Failing within the first part, and after several parts were stored.
    for good in [pattern(70_000, 4), pattern(MORE_THAN_A_PART * 2, 5)] {
        match b.append(&id, 5_000, failing_body(&good)).await {
            Err(Error::Body(e)) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("{name}: a failing body gave {other:?}"),
        }
        assert_eq!(b.staged_len(&id).await.unwrap(), Some(5_000), "{name}");
    }
    let rest = pattern(MORE_THAN_A_PART, 6);
    let len = b.append(&id, 5_000, body(&rest, 1 << 20)).await.unwrap();
    assert_eq!(len, 5_000 + rest.len() as u64, "{name}");
    let content = [first, rest].concat();
    let digest = Digest::sha256_of(&content);
    b.commit(&id, &digest).await.unwrap();
    assert!(read_all(b, &digest).await.unwrap() == content, "{name}");
}

async fn staged_bytes_stream_back_from_any_offset(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let content = pattern(200_000, 7);
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    assert!(
        collect(b.read_staged(&id, 0).await.unwrap())
            .await
            .is_empty(),
        "{name}"
    );
    let mut offset = 0;
    for piece in content.chunks(64_000) {
        offset = b.append(&id, offset, body(piece, 5_000)).await.unwrap();
    }
    for from in [0usize, 1, 63_999, 64_000, 64_001, 199_999, 200_000, 300_000] {
        let staged = collect(b.read_staged(&id, from as u64).await.unwrap()).await;
        let expected = content.get(from..).unwrap_or_default();
        assert!(staged == expected, "{name}: staged bytes from {from}");
    }
    b.discard(&id).await.unwrap();
}

async fn ranges_cover_exactly_the_bytes_asked_for_including_the_last(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let content = pattern(100_003, 8);
    let size = content.len() as u64;
    let digest = put(b, &content, 3).await;
    let cases: [(u64, u64); 9] = [
        (0, 1),
        (size - 1, 1),
        (0, size),
        (1, size - 2),
        (40_000, 30_000),
        (size - 10, 10),
        // Past the end: what there is, down to nothing.
        (size - 10, 1_000),
        (size, 5),
        (size + 7, 5),
    ];
    for (start, len) in cases {
        let got = read_range(b, &digest, start, len).await;
        assert!(
            got == in_range(&content, start, len),
            "{name}: range {start}+{len} gave {} bytes",
            got.len()
        );
    }
    assert!(
        read_range(b, &digest, 17, 0).await.is_empty(),
        "{name}: an empty range"
    );
}

async fn uncached_appends_and_reads_move_the_same_bytes(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    // Past two of the filesystem's direct I/O windows (2 MiB), ending inside a block;
    // the second append starts at an unaligned offset.
    let content = pattern((5 << 20) + 1_234, 21);
    let size = content.len() as u64;
    let split = (3 << 20) + 100;
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    // Aligned blocks, then bytes that are not whole blocks, then aligned blocks again,
    // which must follow them.
    let pieces = [1 << 20, 512 << 10, 100_003, 512 << 10, 4_096];
    let len = b.append_uncached(&id, 0, aligned_body(&content[..split], &pieces));
    assert_eq!(len.await.unwrap(), split as u64, "{name}");
    let failed = b.append_uncached(&id, split as u64, failing_body(&content[split..]));
    assert!(failed.await.is_err(), "{name}: a body that breaks off");
    assert_eq!(
        b.staged_len(&id).await.unwrap(),
        Some(split as u64),
        "{name}"
    );
    let len = b.append_uncached(&id, split as u64, body(&content[split..], 77_777));
    assert_eq!(len.await.unwrap(), size, "{name}");
    let digest = Digest::sha256_of(&content);
    b.commit(&id, &digest).await.unwrap();

    assert!(read_all(b, &digest).await.unwrap() == content, "{name}");
    let cases: [(u64, u64); 10] = [
        (0, size),
        (1, 4_096),
        (4_095, 2),
        ((2 << 20) - 1, 2),
        ((2 << 20) + 4_096, 3 << 20),
        (size - 1, 1),
        (size - 10, 1_000),
        (size, 5),
        (size + 7, 5),
        (17, 0),
    ];
    for (start, len) in cases {
        let range = ByteRange { start, len };
        let got = b
            .read_uncached(&digest, Some(range))
            .await
            .unwrap()
            .unwrap();
        let got = collect(got).await;
        assert!(
            got == in_range(&content, start, len),
            "{name}: range {start}+{len} gave {} bytes",
            got.len()
        );
    }
    let cached = put(b, &pattern(3_000_000, 22), 2).await;
    let got = collect(b.read_uncached(&cached, None).await.unwrap().unwrap()).await;
    assert!(
        got == pattern(3_000_000, 22),
        "{name}: a blob written cached"
    );
    let never = Digest::sha256_of(b"never stored");
    assert!(
        b.read_uncached(&never, None).await.unwrap().is_none(),
        "{name}"
    );
}

async fn an_empty_blob_commits_and_reads_back_empty(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let digest = Digest::sha256_of(b"");
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    assert_eq!(b.append(&id, 0, body(b"", 1)).await.unwrap(), 0, "{name}");
    b.commit(&id, &digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), Some(0), "{name}");
    assert_eq!(read_all(b, &digest).await, Some(Vec::new()), "{name}");
    assert!(
        read_range(b, &digest, 0, 0).await.is_empty(),
        "{name}: an empty range"
    );
    assert!(b.list().await.unwrap().contains(&digest), "{name}");
    b.delete(&digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), None, "{name}");
}

async fn committing_content_already_there_keeps_it(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let content = pattern(MORE_THAN_A_PART + 1, 9);
    let digest = put(b, &content, 1).await;
    let again = put(b, &content, 3).await;
    assert_eq!(again, digest, "{name}");
    assert_eq!(
        hash(b.read(&digest, None).await.unwrap().unwrap()).await,
        (content.len() as u64, digest.clone()),
        "{name}"
    );
    assert_eq!(
        b.list()
            .await
            .unwrap()
            .iter()
            .filter(|d| **d == digest)
            .count(),
        1,
        "{name}"
    );
}

async fn discard_and_delete_are_idempotent(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    b.append(&id, 0, body(&pattern(50_000, 10), 7_000))
        .await
        .unwrap();
    b.discard(&id).await.unwrap();
    assert_eq!(b.staged_len(&id).await.unwrap(), None, "{name}");
    b.discard(&id).await.unwrap();
    b.discard(&UploadId::random()).await.unwrap();

    let digest = put(b, b"to be deleted", 1).await;
    b.delete(&digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), None, "{name}");
    assert!(b.read(&digest, None).await.unwrap().is_none(), "{name}");
    b.delete(&digest).await.unwrap();
    assert!(!b.list().await.unwrap().contains(&digest), "{name}");
}

async fn list_and_staged_report_what_exists(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let digests = [
        put(b, b"first", 1).await,
        put(b, b"second", 2).await,
        put(b, b"", 1).await,
    ];
    let listed = b.list().await.unwrap();
    for digest in &digests {
        assert!(listed.contains(digest), "{name}: {digest} listed");
    }
    let (open, empty) = (UploadId::random(), UploadId::random());
    b.create_staged(&open).await.unwrap();
    b.create_staged(&empty).await.unwrap();
    b.append(&open, 0, body(&pattern(1_000, 11), 300))
        .await
        .unwrap();
    b.append(&open, 1_000, body(&pattern(234, 12), 300))
        .await
        .unwrap();
    let staged = b.staged().await.unwrap();
    let find = |id: &UploadId| staged.iter().find(|s| s.id == *id);
    let open_area = find(&open).unwrap_or_else(|| panic!("{name}: open area listed"));
    assert_eq!(open_area.len, 1_234, "{name}");
    assert!(open_area.idle < Duration::from_secs(60), "{name}");
    assert_eq!(find(&empty).map(|s| s.len), Some(0), "{name}");
    b.discard(&open).await.unwrap();
    b.discard(&empty).await.unwrap();
    let staged = b.staged().await.unwrap();
    assert!(
        !staged.iter().any(|s| s.id == open || s.id == empty),
        "{name}"
    );
}

async fn two_instances_see_each_others_commits_and_continue_each_others_uploads(f: Fixture) {
    let (a, name) = (f.backend.as_ref(), f.name);
    let other = f.reopen().await;
    let b = other.as_ref();
    let content = pattern(MORE_THAN_A_PART + 500_000, 13);
    let (first, second) = content.split_at(300_000);
    let id = UploadId::random();
    a.create_staged(&id).await.unwrap();
    a.append(&id, 0, body(first, 50_000)).await.unwrap();
    assert_eq!(
        b.staged_len(&id).await.unwrap(),
        Some(first.len() as u64),
        "{name}"
    );
    assert!(
        matches!(
            b.append(&id, 0, body(b"late", 4)).await,
            Err(Error::RangeInvalid {
                expected_offset: 300_000,
                got: 0
            })
        ),
        "{name}"
    );
    let len = b
        .append(&id, first.len() as u64, body(second, 1 << 20))
        .await
        .unwrap();
    assert_eq!(len, content.len() as u64, "{name}");
    assert!(
        collect(a.read_staged(&id, 0).await.unwrap()).await == content,
        "{name}"
    );
    let digest = Digest::sha256_of(&content);
    a.commit(&id, &digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), Some(len), "{name}");
    assert!(b.list().await.unwrap().contains(&digest), "{name}");
    assert_eq!(b.staged_len(&id).await.unwrap(), None, "{name}");
    b.delete(&digest).await.unwrap();
    assert_eq!(a.stat(&digest).await.unwrap(), None, "{name}");
}

async fn readers_during_commits_see_the_whole_blob_or_nothing(f: Fixture) {
    let name = f.name;
    let content = Bytes::from(pattern(MORE_THAN_A_PART + 4_000_000, 14));
    let digest = Digest::sha256_of(&content);
    // Two uploads of the same content, in several appends, committed at once.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = UploadId::random();
        f.backend.create_staged(&id).await.unwrap();
        let mut offset = 0;
        for piece in content.chunks(5_000_000) {
            offset = f
                .backend
                .append(&id, offset, body(piece, 1 << 20))
                .await
                .unwrap();
        }
        ids.push(id);
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (backend, digest, done) = (f.backend.clone(), digest.clone(), done.clone());
            tokio::spawn(async move {
                let mut whole = 0;
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    if let Some(stream) = backend.read(&digest, None).await.unwrap() {
                        let (len, read) = hash(stream).await;
                        assert_eq!(read, digest, "a reader saw {len} other bytes");
                        whole += 1;
                    }
                    if finished {
                        return whole;
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let commits: Vec<_> = ids
        .iter()
        .map(|id| {
            let (backend, id, digest) = (f.backend.clone(), id.clone(), digest.clone());
            tokio::spawn(async move { backend.commit(&id, &digest).await })
        })
        .collect();
    for commit in commits {
        commit.await.unwrap().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    for reader in readers {
        let whole = reader.await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(whole >= 1, "{name}: the last read sees the blob");
    }
    assert_eq!(
        f.backend.stat(&digest).await.unwrap(),
        Some(content.len() as u64),
        "{name}"
    );
}

async fn a_blob_of_hundreds_of_mebibytes_streams_through(f: Fixture) {
    let (b, name) = (f.backend.as_ref(), f.name);
    let size = (210 << 20) + 12_345;
    let (stream, digest) = generated(size, 15);
    let id = UploadId::random();
    b.create_staged(&id).await.unwrap();
    assert_eq!(b.append(&id, 0, stream).await.unwrap(), size, "{name}");
    b.commit(&id, &digest).await.unwrap();
    assert_eq!(b.stat(&digest).await.unwrap(), Some(size), "{name}");
    let read = hash(b.read(&digest, None).await.unwrap().unwrap()).await;
    assert_eq!(read, (size, digest.clone()), "{name}");
    let tail = ByteRange {
        start: size - (3 << 20),
        len: 3 << 20,
    };
    let (len, _) = hash(b.read(&digest, Some(tail)).await.unwrap().unwrap()).await;
    assert_eq!(len, 3 << 20, "{name}");
    b.delete(&digest).await.unwrap();
}

async fn redirects_are_offered_only_when_configured(f: Fixture) {
    let digest = put(f.backend.as_ref(), b"served here", 1).await;
    assert_eq!(
        f.backend.redirect(&digest).await.unwrap(),
        None,
        "{}",
        f.name
    );
}

// ---------------------------------------------------------------------------------------
// BlobStore on top of each backend.

async fn blob_store_commits_only_content_that_hashes_to_its_digest(f: Fixture) {
    let name = f.name;
    let store = f.blob_store(f.backend.clone());
    let content = pattern(MORE_THAN_A_PART + 10, 16);
    let claimed = Digest::sha256_of(b"something else");
    let id = UploadId::random();
    store.create_staged(&id).await.unwrap();
    let (len, hasher) = store
        .append(
            &id,
            0,
            body(&content, 1 << 20),
            Hasher::new(Algorithm::Sha256),
            Caching::Keep,
        )
        .await
        .unwrap();
    assert_eq!(len, content.len() as u64, "{name}");
    match store.commit(&id, &claimed, hasher).await {
        Err(Error::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, claimed, "{name}");
            assert_eq!(actual, Digest::sha256_of(&content), "{name}");
        }
        Err(e) => panic!("{name}: {e}"),
        Ok(_) => panic!("{name}: committed content under another digest"),
    }
    assert_eq!(
        store.staged_len(&id).await.unwrap(),
        None,
        "{name}: discarded"
    );
    assert_eq!(store.stat(&claimed).await.unwrap(), None, "{name}");
    assert_eq!(
        store.stat(&Digest::sha256_of(&content)).await.unwrap(),
        None,
        "{name}"
    );

    let id = UploadId::random();
    store.create_staged(&id).await.unwrap();
    let (_, hasher) = store
        .append(
            &id,
            0,
            body(&content, 1 << 20),
            Hasher::new(Algorithm::Sha256),
            Caching::Keep,
        )
        .await
        .unwrap();
    let (digest, locks) = store.commit_as_hashed(&id, hasher).await.unwrap();
    drop(locks);
    assert_eq!(digest, Digest::sha256_of(&content), "{name}");
    assert_eq!(
        store.stat(&digest).await.unwrap(),
        Some(content.len() as u64),
        "{name}"
    );
}

async fn blob_store_rehashes_an_upload_on_a_new_instance_and_finishes_it(f: Fixture) {
    let name = f.name;
    let content = pattern(MORE_THAN_A_PART + 777, 17);
    let (first, second) = content.split_at(MORE_THAN_A_PART / 2);
    let id = UploadId::random();
    {
        let store = f.blob_store(f.backend.clone());
        store.create_staged(&id).await.unwrap();
        store
            .append(
                &id,
                0,
                body(first, 100_000),
                Hasher::new(Algorithm::Sha256),
                Caching::Keep,
            )
            .await
            .unwrap();
        // The hash state is lost with this instance.
    }
    let restarted = f.blob_store(f.reopen().await);
    let (len, hasher) = restarted.rehash(&id, Algorithm::Sha256).await.unwrap();
    assert_eq!(len, first.len() as u64, "{name}");
    let (len, hasher) = restarted
        .append(&id, len, body(second, 1 << 20), hasher, Caching::Keep)
        .await
        .unwrap();
    assert_eq!(len, content.len() as u64, "{name}");
    let digest = Digest::sha256_of(&content);
    drop(restarted.commit(&id, &digest, hasher).await.unwrap());
    assert!(
        read_all(f.backend.as_ref(), &digest).await.unwrap() == content,
        "{name}"
    );
}

async fn blob_store_refuses_chunks_at_wrong_offsets_and_keeps_the_upload(f: Fixture) {
    let name = f.name;
    let store = f.blob_store(f.backend.clone());
    let id = UploadId::random();
    store.create_staged(&id).await.unwrap();
    let (len, hasher) = store
        .append(
            &id,
            0,
            body(b"hello ", 2),
            Hasher::new(Algorithm::Sha256),
            Caching::Keep,
        )
        .await
        .unwrap();
    let refused = store
        .append(
            &id,
            len + 1,
            body(b"gap", 3),
            Hasher::new(Algorithm::Sha256),
            Caching::Keep,
        )
        .await
        .map(|(len, _)| len);
    assert!(
        matches!(
            refused,
            Err(Error::RangeInvalid {
                expected_offset: 6,
                got: 7
            })
        ),
        "{name}: {refused:?}"
    );
    let (len, hasher) = store
        .append(&id, len, body(b"world", 2), hasher, Caching::Keep)
        .await
        .unwrap();
    assert_eq!(len, 11, "{name}");
    let digest = Digest::sha256_of(b"hello world");
    drop(store.commit(&id, &digest, hasher).await.unwrap());
    assert_eq!(
        read_all(f.backend.as_ref(), &digest).await.unwrap(),
        b"hello world",
        "{name}"
    );
}

// ---------------------------------------------------------------------------------------
// The filesystem alone.

/// Bytes of `path` in the page cache, as `fincore` (util-linux) counts them.
fn resident_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// What the filesystem under `path` is called by `stat -f`.
fn filesystem_type(path: &Path) -> String {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A filesystem fixture whose page cache is not its storage; `None` (the test skipped)
/// on tmpfs.
fn fs_on_disk() -> Option<Fixture> {
    let f = Fixture::fs();
    if filesystem_type(f.dir.path()) == "tmpfs" {
        eprintln!("skipped: the page cache is tmpfs's storage");
        return None;
    }
    Some(f)
}

impl Fixture {
    /// The file the filesystem backend keeps the committed blob `digest` in.
    fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/blobs/sha256")
            .join(&digest.hex()[..2])
            .join(digest.hex())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_uncached_blobs_take_no_page_cache_to_write_or_read() {
    let Some(f) = fs_on_disk() else { return };
    let b = f.backend.as_ref();
    let size = (8 << 20) + 100;
    // Through the page cache, as a control: the written bytes are resident, and so are
    // the bytes read.
    let cached = put(b, &pattern(size, 31), 1).await;
    assert!(resident_bytes(&f.blob_file(&cached)) >= size as u64 / 2);

    // Written as whole aligned blocks (as the store gathers a body) and the tail, and as
    // pieces that are not whole blocks.
    let content = pattern(size, 32);
    let odd = pattern(size, 33);
    let written = [
        ("aligned blocks", &content, [512 << 10; 16].as_slice()),
        ("odd pieces", &odd, [65_536 + 100; 128].as_slice()),
    ];
    for (label, bytes, pieces) in written {
        let id = UploadId::random();
        b.create_staged(&id).await.unwrap();
        b.append_uncached(&id, 0, aligned_body(bytes, pieces))
            .await
            .unwrap();
        let digest = Digest::sha256_of(bytes);
        b.commit(&id, &digest).await.unwrap();
        // At most the tail's page, which does not fill an aligned block.
        let path = f.blob_file(&digest);
        assert!(
            resident_bytes(&path) <= 4096,
            "{label}: {} after writing",
            resident_bytes(&path)
        );
    }
    let digest = Digest::sha256_of(&content);
    let path = f.blob_file(&digest);
    let read = collect(b.read_uncached(&digest, None).await.unwrap().unwrap()).await;
    assert!(read == content);
    assert!(
        resident_bytes(&path) <= 4096,
        "{} after reading",
        resident_bytes(&path)
    );
    assert!(read_all(b, &digest).await.unwrap() == content);
    assert!(
        resident_bytes(&path) >= size as u64 / 2,
        "read through the page cache"
    );
}

/// Drop the pages of `path` from the page cache (they are clean once committed). Pages
/// still being read (the kernel's read-ahead, or a window a dropped stream had started
/// to fault in) or mapped stay, so it tries again until none is left.
fn evict_from_page_cache(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let resident = resident_bytes(path);
        if resident == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{resident} bytes of {} stay in the page cache",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_blobs_out_of_the_page_cache_read_whole_and_in_ranges() {
    let Some(f) = fs_on_disk() else { return };
    let b = f.backend.as_ref();
    // Several 2 MiB windows and a part of one.
    let window: u64 = 2 << 20;
    let content = pattern(3 * window as usize + 4_097, 41);
    let size = content.len() as u64;
    let digest = put(b, &content, 3).await;
    let path = f.blob_file(&digest);
    let cases: [(u64, u64); 6] = [
        (0, size),
        (1, size - 1),
        (window - 1, 2),
        (window + 5, window + 3),
        (3 * window, size),
        (size - 10, 10),
    ];
    for (start, len) in cases {
        evict_from_page_cache(&path);
        let got = if (start, len) == (0, size) {
            read_all(b, &digest).await.unwrap()
        } else {
            read_range(b, &digest, start, len).await
        };
        assert!(
            got == in_range(&content, start, len),
            "range {start}+{len} gave {} bytes",
            got.len()
        );
        assert!(resident_bytes(&path) > 0, "{start}+{len} read the disk");
    }
}

// ---------------------------------------------------------------------------------------
// S3 alone.

/// A Garage node of this test's own, which it may stop; `None` to skip.
async fn own_garage() -> Option<Garage> {
    if !garage_installed() {
        return None;
    }
    log_to_test_output();
    Some(
        tokio::task::spawn_blocking(Garage::start_new)
            .await
            .unwrap()
            .unwrap(),
    )
}

/// Run `operation`, which must fail as unavailable within a few seconds.
async fn assert_unavailable_soon<T: std::fmt::Debug>(
    what: &str,
    operation: impl std::future::Future<Output = Result<T, Error>>,
) {
    let started = Instant::now();
    let outcome = operation.await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Err(Error::Unavailable(_))),
        "{what} with the store down gave {outcome:?}"
    );
    assert!(took < Duration::from_secs(15), "{what} took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_down_is_unavailable_within_seconds_and_everything_is_back_after_it_returns() {
    let Some(garage) = own_garage().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(&garage, dir.path(), garage.bucket());
    let backend = S3Backend::connect(&config).await.unwrap();
    let content = pattern(MORE_THAN_A_PART + 99, 18);
    let digest = put(&backend, &content, 2).await;
    let id = UploadId::random();
    backend.create_staged(&id).await.unwrap();
    backend.append(&id, 0, body(b"half", 4)).await.unwrap();

    tokio::task::block_in_place(|| garage.stop());
    assert_unavailable_soon("stat", backend.stat(&digest)).await;
    assert_unavailable_soon("read", async {
        backend.read(&digest, None).await.map(|s| s.is_some())
    })
    .await;
    assert_unavailable_soon("staged_len", backend.staged_len(&id)).await;
    assert_unavailable_soon("append", backend.append(&id, 4, body(b" more", 5))).await;
    assert_unavailable_soon("commit", backend.commit(&id, &digest)).await;
    assert_unavailable_soon("list", backend.list()).await;
    assert_unavailable_soon("delete", backend.delete(&digest)).await;
    assert_unavailable_soon("connect", S3Backend::connect(&config)).await;

    tokio::task::block_in_place(|| garage.start());
    assert!(read_all(&backend, &digest).await.unwrap() == content);
    assert_eq!(backend.staged_len(&id).await.unwrap(), Some(4));
    assert_eq!(backend.append(&id, 4, body(b" more", 5)).await.unwrap(), 9);
    let finished = Digest::sha256_of(b"half more");
    backend.commit(&id, &finished).await.unwrap();
    let again = S3Backend::connect(&config).await.unwrap();
    assert_eq!(read_all(&again, &finished).await.unwrap(), b"half more");
}

/// A store that stops answering, its connections left open (a hung node, a black-holed
/// route), fails what is under way and what comes after it as unavailable after two of
/// its timeouts (the request and its one retry: two minutes for a transfer), instead of
/// holding them for ever; once it answers again, everything works. The store is frozen
/// while a pull is part-way through its body and while an append waits for the rest of
/// its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_that_stops_answering_fails_requests_instead_of_holding_them() {
    /// Well past two stall timeouts, well short of for ever.
    const BOUND: Duration = Duration::from_secs(200);
    let Some(garage) = own_garage().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(&garage, dir.path(), garage.bucket());
    let backend = Arc::new(S3Backend::connect(&config).await.unwrap());
    // More than the loopback connection's buffers hold, so the pull cannot have it all.
    let content = pattern(64 << 20, 21);
    let digest = put(backend.as_ref(), &content, 1).await;
    let mut pull = backend.read(&digest, None).await.unwrap().unwrap();
    let first = pull.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    let id = UploadId::random();
    backend.create_staged(&id).await.unwrap();
    let (waiting, waited) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let gated: ByteStream = Box::pin(
        futures::stream::once(async { Ok(Bytes::from_static(b"first half, ")) }).chain(
            futures::stream::once(async move {
                waiting.send(()).unwrap();
                released.await.unwrap();
                Ok(Bytes::from_static(b"second half"))
            }),
        ),
    );
    let append = tokio::spawn({
        let backend = backend.clone();
        let id = id.clone();
        async move { backend.append(&id, 0, gated).await }
    });
    waited.await.unwrap();

    tokio::task::block_in_place(|| garage.pause());
    release.send(()).unwrap();
    let all = async {
        tokio::join!(
            async {
                while let Some(piece) = pull.next().await {
                    piece?;
                }
                Ok::<(), io::Error>(())
            },
            append,
            backend.read(&digest, None),
            backend.stat(&digest),
        )
    };
    let (pulled, appended, read, stat) = tokio::time::timeout(BOUND, all)
        .await
        .expect("the frozen store held requests past the bound");
    assert!(pulled.is_err(), "the pull under way ended without an error");
    assert!(
        matches!(appended.unwrap(), Err(Error::Unavailable(_))),
        "the append"
    );
    let read = read.map(|found| found.is_some());
    assert!(
        matches!(read, Err(Error::Unavailable(_))),
        "a new read: {read:?}"
    );
    assert!(matches!(stat, Err(Error::Unavailable(_))), "a stat");

    tokio::task::block_in_place(|| garage.resume());
    assert!(read_all(backend.as_ref(), &digest).await.unwrap() == content);
    assert_eq!(backend.staged_len(&id).await.unwrap(), Some(0));
    let whole = b"first half, second half";
    assert_eq!(
        backend.append(&id, 0, body(whole, 5)).await.unwrap(),
        whole.len() as u64
    );
    let finished = Digest::sha256_of(whole);
    backend.commit(&id, &finished).await.unwrap();
    assert_eq!(read_all(backend.as_ref(), &finished).await.unwrap(), whole);
}

/// A request the store never answers (lost on its way, or dropped by the store) costs its
/// timeout, not the operation: it is sent once more, on another connection, and the stat,
/// the pull and the upload it belonged to succeed. A proxy in front of the shared node
/// takes the first request of each kind and answers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_request_that_goes_unanswered_is_sent_again_and_its_operation_succeeds() {
    let Some(garage) = tokio::task::spawn_blocking(garage::require).await.unwrap() else {
        return;
    };
    log_to_test_output();
    let dir = tempfile::tempdir().unwrap();
    let mut config = s3_config(garage, dir.path(), garage.bucket());
    let proxy = SilentProxy::start(garage.endpoint()).await;
    config.endpoint = Some(proxy.endpoint.clone());
    let backend = S3Backend::connect(&config).await.unwrap();
    let content = pattern(MORE_THAN_A_PART + 5, 22);
    let digest = put(&backend, &content, 1).await;
    let id = UploadId::random();
    backend.create_staged(&id).await.unwrap();

    // A control request (30 s), a pull and an upload's part (60 s each).
    proxy.arm([
        ("HEAD ", "/blobs/"),
        ("GET ", "/blobs/"),
        ("PUT ", "partNumber="),
    ]);
    let (stat, pulled, appended) = tokio::join!(
        backend.stat(&digest),
        read_all(&backend, &digest),
        backend.append(&id, 0, body(&content, 1 << 20)),
    );
    assert_eq!(
        proxy.swallowed(),
        3,
        "a request of each kind went unanswered"
    );
    assert_eq!(stat.unwrap(), Some(content.len() as u64));
    assert!(pulled.unwrap() == content);
    assert_eq!(appended.unwrap(), content.len() as u64);
    backend.commit(&id, &digest).await.unwrap();
    assert!(read_all(&backend, &digest).await.unwrap() == content);
}

/// A TCP proxy to an S3 endpoint that, once armed, takes the first request of each armed
/// kind and says nothing more on its connection, which stays open: the store never
/// answers it.
struct SilentProxy {
    endpoint: String,
    armed: Arc<std::sync::Mutex<Vec<RequestKind>>>,
    swallowed: Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentProxy {
    async fn start(upstream: String) -> SilentProxy {
        let upstream = upstream.strip_prefix("http://").unwrap().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let proxy = SilentProxy {
            endpoint,
            armed: Arc::default(),
            swallowed: Arc::default(),
        };
        let (armed, swallowed) = (proxy.armed.clone(), proxy.swallowed.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let store = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                tokio::spawn(relay(client, store, armed.clone(), swallowed.clone()));
            }
        });
        proxy
    }

    /// Leave unanswered the next request of each of `kinds`.
    fn arm(&self, kinds: impl IntoIterator<Item = RequestKind>) {
        self.armed.lock().unwrap().extend(kinds);
    }

    /// How many requests went unanswered.
    fn swallowed(&self) -> usize {
        self.swallowed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Requests whose first line starts with `.0` (a method and a space) and contains `.1`.
type RequestKind = (&'static str, &'static str);

/// Carry one connection both ways until a read from the client starts an armed request;
/// from then on read what the client sends and answer nothing, keeping the connection
/// open until the client closes it.
async fn relay(
    client: tokio::net::TcpStream,
    store: tokio::net::TcpStream,
    armed: Arc<std::sync::Mutex<Vec<RequestKind>>>,
    swallowed: Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_store, mut to_store) = store.into_split();
    // Hands the client's write half back when the store closes, so it stays open.
    let answers = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from_store.read(&mut buf).await {
            if to_client.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        to_client
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n @ 1..) = from_client.read(&mut buf).await {
        let read = &buf[..n];
        let silenced = {
            let mut armed = armed.lock().unwrap();
            let line = read.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let hit = armed
                .iter()
                .position(|(method, part)| line.starts_with(method) && line.contains(part));
            hit.map(|i| armed.remove(i)).is_some()
        };
        if silenced {
            swallowed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // The store sees the connection end between two requests.
            drop(to_store);
            let _to_client = answers.await.unwrap();
            while let Ok(1..) = from_client.read(&mut buf).await {}
            return;
        }
        if to_store.write_all(read).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_connect_refuses_a_missing_bucket_and_a_wrong_secret_as_configuration_errors() {
    let Some(garage) = tokio::task::spawn_blocking(garage::require).await.unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = s3_config(garage, dir.path(), "no-such-bucket");
    match S3Backend::connect(&config).await {
        Err(Error::Config(message)) => assert!(message.contains("no-such-bucket"), "{message}"),
        other => panic!("a missing bucket gave {other:?}"),
    }
    config.bucket = garage.bucket().to_owned();
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "0".repeat(64)).unwrap();
    config.secret_access_key_file = Some(wrong);
    assert!(matches!(
        S3Backend::connect(&config).await,
        Err(Error::Config(_))
    ));
    config.secret_access_key_file = Some(dir.path().join("absent"));
    assert!(matches!(
        S3Backend::connect(&config).await,
        Err(Error::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_connect_to_an_endpoint_nobody_listens_on_is_unavailable_within_seconds() {
    let Some(garage) = tokio::task::spawn_blocking(garage::require).await.unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = s3_config(garage, dir.path(), garage.bucket());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    assert_unavailable_soon("connect", S3Backend::connect(&config)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_redirect_is_a_presigned_url_that_serves_the_blob() {
    let Some(garage) = tokio::task::spawn_blocking(garage::require).await.unwrap() else {
        return;
    };
    let f = Fixture::s3_on(garage, garage.bucket(), Some(Duration::from_secs(300))).await;
    let content = pattern(70_000, 19);
    let digest = put(f.backend.as_ref(), &content, 2).await;
    let url = f.backend.redirect(&digest).await.unwrap().unwrap();
    let (status, body) = http_get(&url).await;
    assert_eq!(status, 200, "{url}");
    assert!(body == content);
    // The signature covers the object: another key is refused.
    let other = url.replace(digest.hex(), Digest::sha256_of(b"x").hex());
    assert_eq!(http_get(&other).await.0, 403, "{other}");
}

/// Status and body of a plain HTTP/1.1 GET of `url` (an `http://host:port/...` URL).
async fn http_get(url: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..end]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    (status, response[end + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_failed_appends_leave_no_unfinished_multipart_upload() {
    let Some(garage) = tokio::task::spawn_blocking(garage::require).await.unwrap() else {
        return;
    };
    let bucket = format!("aborts-{}", &UploadId::random().as_str()[..8]);
    garage.create_bucket(&bucket).unwrap();
    let f = Fixture::s3_on(garage, &bucket, None).await;
    let id = UploadId::random();
    f.backend.create_staged(&id).await.unwrap();
    let good = pattern(MORE_THAN_A_PART * 2, 20);
    assert!(f.backend.append(&id, 0, failing_body(&good)).await.is_err());
    // A request abandoned midway (its future dropped) aborts as well.
    let slow = futures::stream::iter(
        good.chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
    .chain(futures::stream::pending());
    let abandoned = tokio::time::timeout(
        Duration::from_secs(2),
        f.backend.append(&id, 0, Box::pin(slow)),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the append waits for the rest of its body"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = garage
            .admin(
                "GetBucketInfo",
                &serde_json::json!({ "globalAlias": bucket }),
            )
            .unwrap();
        if info["unfinishedMultipartUploads"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{info}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.backend.staged_len(&id).await.unwrap(), Some(0));
}

/// Resident memory of this process now and at its peak, in MiB.
fn resident_mib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Puts and reads a 1 GiB blob on S3 and prints the resident memory around it (run
/// alone: `--ignored --nocapture s3_resident_memory`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 1 GiB transfer; a measurement, run on demand"]
async fn s3_resident_memory_stays_flat_for_a_1_gib_blob() {
    let Some(f) = Fixture::s3().await else {
        return;
    };
    let (before, _) = resident_mib();
    let size = 1u64 << 30;
    let (stream, digest) = generated(size, 21);
    let id = UploadId::random();
    f.backend.create_staged(&id).await.unwrap();
    f.backend.append(&id, 0, stream).await.unwrap();
    let (_, after_put) = resident_mib();
    // A second segment, so the commit streams both into the blob.
    let (tail, _) = generated(1 << 20, 22);
    f.backend.append(&id, size, tail).await.unwrap();
    let whole = {
        let mut hasher = Hasher::new(Algorithm::Sha256);
        let mut staged = f.backend.read_staged(&id, 0).await.unwrap();
        while let Some(chunk) = staged.next().await {
            hasher.update(&chunk.unwrap());
        }
        hasher.finish()
    };
    f.backend.commit(&id, &whole).await.unwrap();
    let (_, after_commit) = resident_mib();
    let (len, read) = hash(f.backend.read(&whole, None).await.unwrap().unwrap()).await;
    let (now, peak) = resident_mib();
    eprintln!(
        "resident MiB: before {before}, peak after put {after_put}, after commit \
         {after_commit}, after read {peak} (now {now}); read {len} bytes"
    );
    assert_eq!(read, whole);
    assert_ne!(digest, whole);
    assert!(peak < before + 256, "peak {peak} MiB from {before} MiB");
    f.backend.delete(&whole).await.unwrap();
}
