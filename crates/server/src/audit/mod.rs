//! The audit log: one JSON line per write (manifest and tag pushes, completed blob
//! uploads, cross-repository mounts, Actions cache entries created and saved), per
//! delete, per administrative action and per denied request; successful reads are left
//! to the build sessions and the metrics.
//!
//! Handlers never wait on the disk: [`Audit::record`] hands the line to a bounded queue
//! read by one writer thread, which appends, rotates and flushes as soon as the queue is
//! empty. A full queue loses the line, but never silently: it is counted in
//! `layercache_audit_dropped_total` and warned about.

mod files;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::http::{Method, StatusCode};
use bytesize::ByteSize;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use self::files::{Layout, Writer};

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 8192;
/// Denials recorded per second from one client address, sustained (the first
/// [`DENIALS_BURST`] at once): a client sending refused requests in a loop cannot rotate
/// the history out of the log. The rest are counted as lost.
const DENIALS_PER_SECOND: NonZeroU32 = NonZeroU32::new(10).unwrap();
/// Denials from one client address recorded at once above that rate.
const DENIALS_BURST: NonZeroU32 = NonZeroU32::new(100).unwrap();
/// Longest request path and reason kept in a line, in bytes; a longer one is cut.
const MAX_TEXT: usize = 512;

/// The `[server.audit]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Keep the audit log (on unless turned off).
    pub enabled: bool,
    /// Where its files go [default: `audit` in the data directory].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `audit.log` is rotated before a line would take it past this size.
    pub max_file_size: ByteSize,
    /// Rotated files kept (`audit.N.log`); older ones are removed.
    pub keep: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            dir: None,
            max_file_size: ByteSize::mib(64),
            keep: 10,
        }
    }
}

impl Config {
    /// Where the files go, for a server on `data_dir`.
    pub fn dir_in(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("audit"))
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// Who: the identity's name; `null` without authentication (the client address is
    /// what identifies then) or when the credentials presented failed.
    pub identity: Option<String>,
    /// What granted the request, or what was presented when it was denied: the
    /// credential's registry scopes, or the runtime token's grant.
    pub grounds: Value,
    /// `push`, `tag`, `mount`, `delete`, `cache.create`, `cache.save`, `cache.delete`,
    /// `gc` or `denied`.
    pub action: String,
    /// The registry repository (or the Actions cache repository) acted on.
    pub repository: Option<String>,
    /// The tag, or the cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The manifest's or blob's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// What else says what was done (a mount's source, a cache entry's scope and
    /// version, a pass's figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
    /// The client's address.
    pub client: Option<String>,
    /// The request: method and path (never the query, which may carry a signature).
    pub request: String,
    /// The HTTP status answered.
    pub status: u16,
    /// Why it was denied or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a request did, as the handler knows it.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// See [`Record::action`].
    pub action: &'static str,
    /// See [`Record::repository`].
    pub repository: Option<String>,
    /// See [`Record::reference`].
    pub reference: Option<String>,
    /// See [`Record::digest`].
    pub digest: Option<String>,
    /// See [`Record::detail`].
    pub detail: Option<Value>,
    /// See [`Record::reason`].
    pub reason: Option<String>,
}

impl Event {
    /// A denial of a request on `repository`, for `reason`.
    pub fn denied(repository: Option<String>, reason: impl Into<String>) -> Event {
        Event {
            action: "denied",
            repository,
            reason: Some(reason.into()),
            ..Event::default()
        }
    }
}

/// Who made a request, and from where.
#[derive(Debug, Clone, Default)]
pub struct Who {
    /// See [`Record::identity`].
    pub identity: Option<String>,
    /// See [`Record::grounds`].
    pub grounds: Value,
    /// The client's address.
    pub client: Option<IpAddr>,
}

impl Who {
    /// A registry identity (`None`: open mode, or credentials that failed).
    pub fn of(identity: Option<&crate::auth::Identity>, client: Option<IpAddr>) -> Who {
        Who {
            identity: identity.map(crate::auth::Identity::name),
            grounds: identity.map_or(Value::Null, crate::auth::Identity::grounds),
            client,
        }
    }
}

/// What the writer thread is asked to do.
enum Message {
    /// Append a line.
    Line(String),
    /// Flush everything before, then answer.
    Flush(oneshot::Sender<()>),
}

struct Inner {
    queue: mpsc::Sender<Message>,
    layout: Layout,
    dropped: Counter,
    /// Denials recorded per client address.
    denials: DefaultKeyedRateLimiter<Option<IpAddr>>,
}

/// The audit log's handle: cheap to clone; does nothing when the log is off.
#[derive(Clone)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
    dropped: Counter,
}

impl Audit {
    /// Open the log for a server on `data_dir` (creating its directory) and start its
    /// writer; a log that records nothing when `config` turns it off.
    pub fn open(config: &Config, data_dir: &Path) -> std::io::Result<Audit> {
        if !config.enabled {
            return Ok(Audit::off());
        }
        let layout = Layout {
            dir: config.dir_in(data_dir),
            max_file_size: config.max_file_size.as_u64().max(1),
            keep: config.keep,
            lock: Arc::default(),
        };
        let writer = Writer::open(layout.clone())?;
        let dropped = Counter::default();
        let (queue, receiver) = mpsc::channel(QUEUE);
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_lines(writer, receiver, &counter))?;
        Ok(Audit {
            inner: Some(Arc::new(Inner {
                queue,
                layout,
                dropped: dropped.clone(),
                denials: denial_limiter(),
            })),
            dropped,
        })
    }

    /// A log that records nothing.
    pub fn off() -> Audit {
        Audit {
            inner: None,
            dropped: Counter::default(),
        }
    }

    /// Whether lines are kept.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Lines lost (queue full, or a write failed), for `/metrics`.
    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    /// Record `event` of a `method` request to `path` by `who`, answered with `status`.
    pub fn record(&self, who: &Who, method: &Method, path: &str, status: StatusCode, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        if event.action == "denied" {
            if inner.denials.len() > 10_000 {
                inner.denials.retain_recent();
            }
            if inner.denials.check_key(&who.client).is_err() {
                inner.lost("over the denials one client address may have recorded");
                return;
            }
        }
        let record = Record {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            identity: who.identity.clone(),
            grounds: who.grounds.clone(),
            action: event.action.to_owned(),
            repository: event.repository,
            reference: event.reference,
            digest: event.digest,
            detail: event.detail,
            client: who.client.map(|a| a.to_string()),
            request: format!("{method} {}", cut(path)),
            status: status.as_u16(),
            reason: event.reason.as_deref().map(cut),
        };
        let line = match serde_json::to_string(&record) {
            Ok(line) => line,
            Err(e) => {
                inner.lost(&format!("encoding failed: {e}"));
                return;
            }
        };
        if inner.queue.try_send(Message::Line(line)).is_err() {
            inner.lost("the writer is behind (queue full)");
        }
    }

    /// Wait until every line recorded so far is written to its file (on shutdown, and
    /// before a read).
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let (done, written) = oneshot::channel();
        if inner.queue.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// The lines recorded since `since` (all when `None`), oldest first: the last
    /// `limit` of them, across the current and the rotated files. `None` when the log
    /// is off.
    pub async fn read(
        &self,
        since: Option<SystemTime>,
        limit: usize,
    ) -> Option<std::io::Result<Vec<String>>> {
        let inner = self.inner.as_ref()?;
        self.flush().await;
        let layout = inner.layout.clone();
        // Times are written in one fixed-width UTC form, so they compare as text.
        let since = since.map(|t| humantime::format_rfc3339_millis(t).to_string());
        let read = tokio::task::spawn_blocking(move || {
            files::read(&layout, limit, |line| match &since {
                None => true,
                Some(since) => serde_json::from_str::<Timed>(line)
                    .is_ok_and(|timed| timed.time.as_str() >= since.as_str()),
            })
        })
        .await;
        Some(read.unwrap_or_else(|e| Err(std::io::Error::other(e))))
    }
}

/// A line's time, read without the rest.
#[derive(Deserialize)]
struct Timed {
    time: String,
}

impl Inner {
    /// Count a lost line and say so (on the first loss, then at each power of two).
    fn lost(&self, why: &str) {
        lost(&self.dropped, why);
    }
}

/// The rate at which one client address's denials are recorded.
fn denial_limiter() -> DefaultKeyedRateLimiter<Option<IpAddr>> {
    RateLimiter::keyed(Quota::per_second(DENIALS_PER_SECOND).allow_burst(DENIALS_BURST))
}

/// `text`, cut to [`MAX_TEXT`] bytes (on a character boundary, marked with `…`).
fn cut(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let end = (0..=MAX_TEXT)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &text[..end])
}

fn lost(dropped: &Counter, why: &str) {
    let count = dropped.inc() + 1;
    if count.is_power_of_two() {
        tracing::warn!(lost = count, "audit log line lost: {why}");
    }
}

/// The writer thread: append each line; flush whenever the queue is empty.
fn write_lines(mut writer: Writer, mut queue: mpsc::Receiver<Message>, dropped: &Counter) {
    let flush = |writer: &mut Writer| {
        if let Err(e) = writer.flush() {
            tracing::error!(error = %e, "flushing the audit log failed");
        }
    };
    while let Some(message) = queue.blocking_recv() {
        let mut next = Some(message);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    if let Err(e) = writer.append(&line) {
                        lost(dropped, &format!("writing failed: {e}"));
                    }
                }
                Message::Flush(done) => {
                    flush(&mut writer);
                    let _ = done.send(());
                }
            }
            next = queue.try_recv().ok();
        }
        flush(&mut writer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Who {
        Who {
            identity: Some("ci".into()),
            grounds: serde_json::json!({"push": ["cache/**"]}),
            client: Some(IpAddr::from([127, 0, 0, 1])),
        }
    }

    fn push(n: usize) -> Event {
        Event {
            action: "push",
            repository: Some("cache/app".into()),
            digest: Some(format!("sha256:{n:064}")),
            ..Event::default()
        }
    }

    #[tokio::test]
    async fn recorded_lines_rotate_and_read_back_in_order_without_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config {
            max_file_size: ByteSize::b(1024),
            keep: 2,
            ..Config::default()
        };
        let audit = Audit::open(&config, tmp.path()).unwrap();
        let total = 100;
        for n in 0..total {
            audit.record(
                &who(),
                &Method::PUT,
                "/v2/cache/app/blobs/uploads/x",
                StatusCode::CREATED,
                push(n),
            );
        }
        let lines = audit.read(None, usize::MAX).await.unwrap().unwrap();
        let records: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(records.len() < total, "older files were removed");
        let first = total - records.len();
        for (record, n) in records.iter().zip(first..) {
            assert_eq!(
                record.digest.as_deref(),
                Some(format!("sha256:{n:064}").as_str())
            );
            assert_eq!(record.identity.as_deref(), Some("ci"));
            assert_eq!(record.status, 201);
            assert_eq!(record.client.as_deref(), Some("127.0.0.1"));
        }
        let files = std::fs::read_dir(tmp.path().join("audit")).unwrap().count();
        assert_eq!(files, 3, "the current file and two rotated ones");
        assert_eq!(audit.dropped().get(), 0);
        // A limit keeps the newest; a time after every line keeps none.
        let last = audit.read(None, 3).await.unwrap().unwrap();
        assert_eq!(last, lines[lines.len() - 3..]);
        let future = SystemTime::now() + std::time::Duration::from_secs(60);
        assert!(
            audit
                .read(Some(future), 10)
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );
        let past = SystemTime::now() - std::time::Duration::from_secs(60);
        assert_eq!(
            audit.read(Some(past), usize::MAX).await.unwrap().unwrap(),
            lines
        );
    }

    #[tokio::test]
    async fn a_full_queue_is_counted_not_lost_silently() {
        let (queue, _receiver) = mpsc::channel(1);
        let dropped = Counter::default();
        let audit = Audit {
            inner: Some(Arc::new(Inner {
                queue,
                layout: Layout {
                    dir: PathBuf::from("/nonexistent"),
                    max_file_size: 1,
                    keep: 1,
                    lock: Arc::default(),
                },
                dropped: dropped.clone(),
                denials: denial_limiter(),
            })),
            dropped,
        };
        for n in 0..5 {
            audit.record(&who(), &Method::PUT, "/", StatusCode::CREATED, push(n));
        }
        assert_eq!(audit.dropped().get(), 4);
    }

    #[test]
    fn off_records_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config {
            enabled: false,
            ..Config::default()
        };
        let audit = Audit::open(&config, tmp.path()).unwrap();
        audit.record(&who(), &Method::PUT, "/", StatusCode::CREATED, push(0));
        assert!(!tmp.path().join("audit").exists());
    }
}
