//! `store::Error`: what went wrong, in storage terms. The HTTP edge maps it to each
//! protocol's wire error once.

use oci::Digest;

/// Which kind of thing was not found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// A blob (not linked in the repository, or not stored).
    Blob,
    /// A manifest or tag.
    Manifest,
    /// A repository.
    Repository,
    /// An upload session.
    Upload,
    /// A cache entry.
    Entry,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named thing does not exist.
    #[error("{0:?} not found")]
    NotFound(Missing),
    /// Content did not hash to the digest it was sent under.
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// The digest the client claimed.
        expected: Digest,
        /// The digest of what was received.
        actual: Digest,
    },
    /// A chunk did not start where the upload currently ends.
    #[error("chunk starts at {got}, upload is at {expected_offset}")]
    RangeInvalid {
        /// Where the next chunk must start.
        expected_offset: u64,
        /// Where the chunk claimed to start.
        got: u64,
    },
    /// A manifest references content the repository does not hold.
    #[error("manifest references unknown {kind} {digest}")]
    ManifestBlobUnknown {
        /// The missing reference.
        digest: Digest,
        /// `blob` or `manifest`.
        kind: &'static str,
    },
    /// A manifest gives a size for content that the stored content does not have.
    #[error("manifest gives {kind} {digest} a size of {declared} bytes; it has {stored}")]
    ManifestSizeMismatch {
        /// The content.
        digest: Digest,
        /// `blob` or `manifest`.
        kind: &'static str,
        /// The descriptor's size.
        declared: u64,
        /// The stored content's size.
        stored: u64,
    },
    /// The manifest body is not acceptable.
    #[error(transparent)]
    ManifestInvalid(#[from] oci::ManifestError),
    /// The manifest is larger than the configured limit.
    #[error("manifest of {size} bytes exceeds the {limit}-byte limit")]
    ManifestTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The blob is larger than the configured limit.
    #[error("a blob may hold at most {limit} bytes")]
    BlobTooLarge {
        /// The limit.
        limit: u64,
    },
    /// A cache entry with the same key and version exists in the scope (perhaps still
    /// being uploaded).
    #[error("a cache entry with the same key, version and scope already exists")]
    EntryExists,
    /// The cache entry is finished: entries are immutable.
    #[error("the cache entry is already finished")]
    EntryFinished,
    /// The uploaded parts do not cover the entry's size exactly (or nothing was placed).
    #[error(
        "the uploaded content covers {covered} contiguous bytes from the start, not the {size} \
         bytes declared (or no content was uploaded and placed)"
    )]
    EntryIncomplete {
        /// The size the client declared.
        size: u64,
        /// Contiguous bytes from the start that were uploaded.
        covered: u64,
    },
    /// The entry would be larger than allowed.
    #[error("a cache entry may hold at most {limit} bytes")]
    EntryTooLarge {
        /// The limit.
        limit: u64,
    },
    /// A block list names a block that was not uploaded.
    #[error("block {0} was not uploaded")]
    UnknownBlock(String),
    /// A chunk's body does not match its declared length.
    #[error("received {received} bytes for a chunk of {declared}")]
    ChunkLength {
        /// The length its range declared.
        declared: u64,
        /// What arrived.
        received: u64,
    },
    /// The request body could not be read to its end (client went away, bad framing).
    #[error("request body: {0}")]
    Body(#[source] std::io::Error),
    /// The source a mirrored blob or manifest is filled from could not provide it.
    #[error("{message}")]
    Source {
        /// How it failed.
        failure: SourceFailure,
        /// What it said, for the client.
        message: String,
    },
    /// The disk is full.
    #[error("no space left on the storage device")]
    StorageFull,
    /// Local I/O failed.
    #[error("i/o: {0}")]
    Io(#[source] std::io::Error),
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Database(#[source] rusqlite::Error),
    /// The PostgreSQL metadata database failed.
    #[error("metadata database: {0}")]
    Postgres(#[source] sqlx::Error),
    /// The object store failed.
    #[error("object store: {0}")]
    ObjectStore(#[source] object_store::Error),
    /// A shared backend (the object store, the database) cannot be reached or is
    /// overloaded for now: the request is worth retrying.
    #[error("{0} is unavailable for now; retry")]
    Unavailable(String),
    /// A group of metadata writes failed to commit; none of them took effect.
    #[error("metadata commit failed: {0}")]
    Commit(String),
    /// Another process holds the data directory.
    #[error("another layercache process is using {0}")]
    DataDirInUse(std::path::PathBuf),
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// A background task died (a bug, never client input).
    #[error("internal task failed: {0}")]
    Task(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(28) {
            Error::StorageFull
        } else {
            Error::Io(e)
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            Error::StorageFull
        } else {
            Error::Database(e)
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let unreachable = match &e {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => true,
            // Connection failures (class 08), shutdowns and overload.
            E::Database(db) => db.code().is_some_and(|code| {
                code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
            }),
            _ => false,
        };
        if unreachable {
            tracing::warn!(error = %e, "metadata database unavailable");
            Error::Unavailable("the metadata database".to_owned())
        } else {
            Error::Postgres(e)
        }
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        if object_store_unavailable(&e) {
            tracing::warn!(error = %e, "object store unavailable");
            Error::Unavailable("the object store".to_owned())
        } else {
            Error::ObjectStore(e)
        }
    }
}

/// Whether an object store failure is the store being away (unreachable, timing out,
/// failing or overloaded after the client's retries) rather than an answer about the
/// request (a refused range, a malformed request, an unreadable reply).
fn object_store_unavailable(e: &object_store::Error) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    /// How object_store renders the status of a response that was not a success; the
    /// status itself is not exposed.
    const STATUS: &str = "Server returned non-2xx status code: ";
    /// How it renders a success whose body reports an internal error or a slow-down.
    const ERROR_IN_BODY: &str = "Server returned error response: ";

    let object_store::Error::Generic { source, .. } = e else {
        return false;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(error) = cause {
        if let Some(http) = error.downcast_ref::<HttpError>() {
            return http.kind() != HttpErrorKind::Decode;
        }
        let text = error.to_string();
        if let Some(status) = text.strip_prefix(STATUS) {
            return status.starts_with('5')
                || status.starts_with("429")
                || status.starts_with("408");
        }
        if text.starts_with(ERROR_IN_BODY) {
            return true;
        }
        cause = error.source();
    }
    false
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

/// How the source of a mirrored blob or manifest failed to provide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFailure {
    /// It does not have it.
    NotFound,
    /// It refused this server's credentials.
    Denied,
    /// It could not be reached or failed.
    Unavailable,
    /// It asks to retry after this many seconds.
    RateLimited(Option<u64>),
    /// It refused a write with this status (an unknown reference, an invalid manifest).
    Refused(u16),
    /// It sent content that is not what was asked for (wrong digest or size).
    Corrupt,
}

impl SourceFailure {
    /// Whether it is the source being away (down, overloaded, refusing this server)
    /// rather than an answer about the content.
    pub fn is_outage(self) -> bool {
        matches!(
            self,
            SourceFailure::Unavailable | SourceFailure::RateLimited(_) | SourceFailure::Denied
        )
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
