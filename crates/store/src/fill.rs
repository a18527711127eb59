//! Blobs filled from a source (a mirror's upstream): one fetch per digest however many
//! clients ask, each following the bytes as they land on disk.
//!
//! The fetch runs in a task of its own, so a client that leaves does not stop it for
//! the others. Followers read the staging file as it grows but are held one byte short
//! of the end until the whole blob is verified against its digest: content that does not
//! hash to its digest is never stored, and no client ever receives it complete.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use oci::{Digest, Hasher, RepoName};
use tokio::sync::watch;

use crate::blob::{BlobStore, ByteRange, ByteStream, Caching};
use crate::error::{Missing, SourceFailure};
use crate::registry::Store;
use crate::upload::UploadId;
use crate::{Error, Result};

/// Chunks queued for one follower (each at most the size the source sent).
const FOLLOW_QUEUE: usize = 16;

/// What a source gives for a blob: its length when known, and its bytes.
pub struct Source {
    /// `Content-Length`, when the source sent one.
    pub size: Option<u64>,
    /// The bytes.
    pub body: ByteStream,
}

/// Where a fill is.
#[derive(Clone)]
enum State {
    /// Waiting for the source to answer.
    Asking,
    /// Writing into staging area `id`: `size` bytes expected, when known.
    Writing { id: UploadId, size: Option<u64> },
    /// Stored and linked (the size), or failed.
    Done(std::result::Result<u64, (SourceFailure, String)>),
}

/// Fills in progress, by digest.
#[derive(Default)]
pub(crate) struct Fills {
    running: Mutex<HashMap<Digest, Running>>,
}

struct Running {
    state: watch::Receiver<State>,
    /// Repositories to link the blob into once stored.
    repos: HashSet<RepoName>,
}

/// A blob being filled, as one client follows it.
pub struct Fill {
    digest: Digest,
    blobs: BlobStore,
    state: watch::Receiver<State>,
    /// Whether this client started the fetch (the others joined it).
    pub started: bool,
}

impl Store {
    /// Follow the fill of `digest` into `repo`: join the one in progress, or start one
    /// that reads what `fetch` returns. The caller checked that `repo` lacks the blob.
    pub fn fill_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        fetch: impl FnOnce() -> BoxFuture<'static, Result<Source>>,
    ) -> Fill {
        let mut running = self
            .0
            .fills
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let follow = |state, started| Fill {
            digest: digest.clone(),
            blobs: self.0.blobs.clone(),
            state,
            started,
        };
        if let Some(fill) = running.get_mut(digest) {
            fill.repos.insert(repo.clone());
            return follow(fill.state.clone(), false);
        }
        let (tx, rx) = watch::channel(State::Asking);
        running.insert(
            digest.clone(),
            Running {
                state: rx.clone(),
                repos: HashSet::from([repo.clone()]),
            },
        );
        let (store, target, source) = (self.clone(), digest.clone(), fetch());
        tokio::spawn(async move {
            let outcome = store.run_fill(&target, source, &tx).await;
            store.0.fills.take(&target);
            let done = outcome.map_err(|e| match e {
                Error::Source { failure, message } => (failure, message),
                Error::DigestMismatch { .. } => (SourceFailure::Corrupt, e.to_string()),
                e => (SourceFailure::Unavailable, e.to_string()),
            });
            tx.send_replace(State::Done(done));
        });
        follow(rx, true)
    }

    /// Fetch, stage, verify, commit and link one blob; its size.
    async fn run_fill(
        &self,
        digest: &Digest,
        source: BoxFuture<'static, Result<Source>>,
        state: &watch::Sender<State>,
    ) -> Result<u64> {
        let Source { size, body } = source.await?;
        // A blob is at most what it announced, and never more than the store takes.
        let limit = size.or(self.0.max_blob_bytes);
        if let (Some(size), Some(max)) = (size, self.0.max_blob_bytes)
            && size > max
        {
            return Err(Error::Source {
                failure: SourceFailure::Corrupt,
                message: format!(
                    "the upstream's blob {digest} is {size} bytes, more than max_blob_size \
                     ({max} bytes)"
                ),
            });
        }
        let id = UploadId::random();
        self.0.blobs.create_staged(&id).await?;
        state.send_replace(State::Writing {
            id: id.clone(),
            size,
        });
        let notify = state.clone();
        let body: ByteStream = Box::pin(body.inspect(move |_| notify.send_modify(|_| ())));
        let body = match limit {
            Some(limit) => crate::limited(body, limit),
            None => body,
        };
        let written = self
            .0
            .blobs
            .append(&id, 0, body, Hasher::new(digest.algorithm()), Caching::Keep)
            .await;
        let committed = match written {
            Ok((len, _)) if size.is_some_and(|s| s != len) => Err(Error::Source {
                failure: SourceFailure::Corrupt,
                message: format!("the upstream sent {len} bytes of {digest}, not {size:?}"),
            }),
            Ok((len, hasher)) => self
                .0
                .blobs
                .commit(&id, digest, hasher)
                .await
                .map(|locked| (len, locked)),
            Err(e) => Err(crate::too_large(
                e,
                Error::Source {
                    failure: SourceFailure::Corrupt,
                    message: format!(
                        "the upstream sent more than {} bytes of {digest}",
                        limit.unwrap_or(u64::MAX)
                    ),
                },
            )),
        };
        let (len, _locked) = match committed {
            Ok(done) => done,
            Err(e) => {
                self.0.blobs.discard(&id).await?;
                return Err(e);
            }
        };
        // Taken out under the digest's lock: a client arriving later finds the blob.
        for repo in self.0.fills.take(digest) {
            self.0.meta.link_blob(&repo, digest, len).await?;
        }
        self.account(Ok(len), |&len| len)
    }
}

impl Fills {
    /// Stop admitting followers to the fill of `digest`; the repositories they want
    /// the blob in.
    fn take(&self, digest: &Digest) -> HashSet<RepoName> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(digest).map(|r| r.repos).unwrap_or_default()
    }
}

impl Fill {
    /// Wait until the blob's size is known: the source answered with a length, or the
    /// fill finished. A failed fill is its error.
    pub async fn size(&mut self) -> Result<u64> {
        loop {
            match &*self.state.borrow_and_update() {
                State::Writing {
                    size: Some(size), ..
                } => return Ok(*size),
                State::Done(done) => return done_result(done),
                _ => {}
            }
            if self.state.changed().await.is_err() {
                return Err(Error::Task("a blob fill stopped".into()));
            }
        }
    }

    /// Wait for the fill to end: the blob's size once stored, or why it failed.
    pub fn finished(&self) -> impl std::future::Future<Output = Result<u64>> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            loop {
                if let State::Done(done) = &*state.borrow_and_update() {
                    return done_result(done);
                }
                if state.changed().await.is_err() {
                    return Err(Error::Task("a blob fill stopped".into()));
                }
            }
        }
    }

    /// The blob's bytes as they arrive; the stream fails if the fill does. Followed in a
    /// task of its own, so dropping the stream stops only this reader.
    pub fn stream(self) -> ByteStream {
        let (tx, rx) = futures::channel::mpsc::channel(FOLLOW_QUEUE);
        tokio::spawn(self.follow(tx));
        Box::pin(rx)
    }

    async fn follow(mut self, mut tx: futures::channel::mpsc::Sender<std::io::Result<Bytes>>) {
        let mut sent = 0u64;
        loop {
            let state = self.state.borrow_and_update().clone();
            let read = match state {
                State::Asking => Ok(0),
                State::Writing { id, size } => {
                    // The last byte waits for the digest check.
                    let held_back = size.map_or(u64::MAX, |s| s.saturating_sub(1));
                    self.forward_staged(&id, sent, held_back, &mut tx).await
                }
                State::Done(Ok(size)) => {
                    let range = ByteRange {
                        start: sent,
                        len: size.saturating_sub(sent),
                    };
                    let result = match self
                        .blobs
                        .read(&self.digest, Some(range), Caching::Keep)
                        .await
                    {
                        Ok(Some(stream)) => forward(stream, u64::MAX, &mut tx).await,
                        Ok(None) => Err(Error::NotFound(Missing::Blob)),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    }
                    return;
                }
                State::Done(Err((_, message))) => {
                    let _ = tx.send(Err(std::io::Error::other(message))).await;
                    return;
                }
            };
            match read {
                // Nothing new yet, or committed (renamed) under us: the next state says
                // what there is and where.
                Ok(0) | Err(Error::NotFound(_)) => {
                    if self.state.changed().await.is_err() {
                        return;
                    }
                }
                Ok(n) => sent += n,
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    }

    /// Send what the staging area holds from `from`, not past `limit`; bytes sent.
    async fn forward_staged(
        &self,
        id: &UploadId,
        from: u64,
        limit: u64,
        tx: &mut futures::channel::mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<u64> {
        if from >= limit {
            return Ok(0);
        }
        let stream = self.blobs.read_staged(id, from).await?;
        forward(stream, limit - from, tx).await
    }
}

/// Send up to `max` bytes of `stream` to `tx`; bytes sent. A reader that went away is
/// an error, which ends the following.
async fn forward(
    mut stream: ByteStream,
    max: u64,
    tx: &mut futures::channel::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<u64> {
    let mut sent = 0u64;
    while sent < max {
        let Some(chunk) = stream.next().await else {
            break;
        };
        let mut chunk = chunk?;
        let room = usize::try_from(max - sent).unwrap_or(usize::MAX);
        chunk.truncate(room);
        sent += chunk.len() as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            return Err(Error::Task("the reader went away".into()));
        }
    }
    Ok(sent)
}

fn done_result(done: &std::result::Result<u64, (SourceFailure, String)>) -> Result<u64> {
    done.clone()
        .map_err(|(failure, message)| Error::Source { failure, message })
}
