//! Local-filesystem blob backend.
//!
//! Layout under the data directory: `blobs/<alg>/<hex[0..2]>/<hex>` for committed blobs
//! and `uploads/<uuid>` for staging files. Paths are built only from a validated
//! [`Digest`] or [`UploadId`] (invariant 6). A blob becomes visible by `rename` after its
//! staging file and then its directory are fsynced, so a crash never exposes a partial
//! blob (invariant 1).

mod direct;

use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use oci::Digest;
use tokio::sync::mpsc;
use tokio_util::io::ReaderStream;

use super::backend::{BlobBackend, Staged};
use super::{ByteRange, ByteStream};
use crate::upload::UploadId;
use crate::{Error, Result};

/// Read buffer for streaming staging files (hash rebuilds).
const READ_CHUNK: usize = 1 << 20;
/// Committed blobs are served as memory-mapped windows of this size (a multiple of the
/// page size): the socket write copies straight from the page cache, and each window
/// is unmapped once sent, so resident memory stays flat. Mapped pages count in RSS while
/// queued: 8 concurrent pulls peaked at 68-70 MiB with 4 MiB windows, 51-54 with 2 and
/// 44-46 with 1, and each window costs a map and an unmap (about 10 µs).
const MAP_WINDOW: u64 = 2 << 20;
/// Blocks queued between the request task and the writer thread (bounds memory).
const WRITE_QUEUE: usize = 4;
/// Written bytes are handed to the kernel for write-back in windows of this size, so the
/// fsync that makes a blob durable waits only for the tail instead of the whole file.
const WRITEBACK_WINDOW: u64 = 16 << 20;

/// Blobs stored as files under one directory.
#[derive(Debug, Clone)]
pub struct FsBackend {
    blobs: PathBuf,
    uploads: PathBuf,
    buffers: direct::BufferPool,
}

impl FsBackend {
    /// Use (and create if needed) `root/blobs` and `root/uploads`.
    pub fn open(root: &Path) -> io::Result<FsBackend> {
        let backend = FsBackend {
            blobs: root.join("blobs"),
            uploads: root.join("uploads"),
            buffers: direct::BufferPool::default(),
        };
        std::fs::create_dir_all(&backend.blobs)?;
        std::fs::create_dir_all(&backend.uploads)?;
        Ok(backend)
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(hex.get(..2).unwrap_or("00"))
            .join(hex)
    }

    fn staged_path(&self, id: &UploadId) -> PathBuf {
        self.uploads.join(id.as_str())
    }
}

fn not_found_as_none<T>(result: io::Result<T>) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The bytes `[start, end)` of a committed blob, as mapped windows. A window in the page
/// cache goes out as soon as it is mapped, and the socket write copies from it. A window
/// that is not is faulted in on a blocking thread first, so that the socket write does
/// not wait for the disk on a runtime thread: five cold 512 MiB pulls held a concurrent
/// `HEAD` up to 0.9 s that way. The next window is mapped (and read) while one is sent.
fn mapped_windows(file: std::fs::File, start: u64, end: u64) -> ByteStream {
    let windows = MappedWindows {
        file: std::sync::Arc::new(file),
        next: start,
        end,
    }
    .map(|window| async move {
        let window = window?;
        if window.is_resident() {
            return Ok(window.into_bytes());
        }
        tokio::task::spawn_blocking(move || {
            window.fault_in();
            window.into_bytes()
        })
        .await
        .map_err(io::Error::other)
    });
    Box::pin(futures::stream::iter(windows).buffered(2))
}

/// The windows `[next, end)` of a committed blob, each mapped when it is polled.
struct MappedWindows {
    file: std::sync::Arc<std::fs::File>,
    next: u64,
    end: u64,
}

impl Iterator for MappedWindows {
    type Item = io::Result<Window>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let offset = self.next - self.next % MAP_WINDOW;
        let window_end = (offset + MAP_WINDOW).min(self.end);
        let skip = (self.next - offset) as usize;
        self.next = window_end;
        Some(Window::map(&self.file, offset, window_end - offset, skip))
    }
}

/// One mapped window of a committed blob, sent from `skip` on.
struct Window {
    map: memmap2::Mmap,
    skip: usize,
}

impl Window {
    /// Map `len` bytes of a committed blob from the page-aligned `offset`.
    #[allow(unsafe_code)]
    fn map(file: &std::fs::File, offset: u64, len: u64, skip: usize) -> io::Result<Window> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        // SAFETY: committed blob files are never written or truncated after the rename
        // that publishes them; they are only unlinked, which leaves existing mappings
        // intact. So the mapped bytes cannot change or vanish while the mapping lives.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file)?
        };
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Window { map, skip })
    }

    /// Whether the window of the `size`-byte file holding byte `at` is in the page cache
    /// (as [`Window::is_resident`] tells).
    fn resident_at(file: &std::fs::File, at: u64, size: u64) -> bool {
        let offset = at - at % MAP_WINDOW;
        let len = (offset + MAP_WINDOW).min(size).saturating_sub(offset);
        len > 0 && Window::map(file, offset, len, 0).is_ok_and(|w| w.is_resident())
    }

    /// Whether the window's last page is in the page cache (`mincore`), which the
    /// kernel's sequential read-ahead fills after the pages before it: so whether
    /// sending the window reads no disk. Checking every page instead cost 28 µs per
    /// window here, 6 % of a pull's CPU; the last one costs 1.5.
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn is_resident(&self) -> bool {
        // SAFETY: `sysconf` only reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let last = self.map.len().saturating_sub(1) / page * page;
        let mut resident = 0u8;
        // SAFETY: the page at `last` lies in the mapping `self.map` keeps alive, starts at
        // a page boundary (the mapping does), and `resident` has the one entry it needs.
        let done = unsafe {
            libc::mincore(
                self.map.as_ptr().add(last) as *mut libc::c_void,
                1,
                &mut resident,
            )
        };
        done == 0 && resident & 1 == 1
    }

    #[cfg(not(target_os = "linux"))]
    fn is_resident(&self) -> bool {
        true
    }

    /// Read the window's pages from the disk and map them (blocking), through the
    /// kernel's sequential read-ahead (starting the next windows' reads with
    /// `posix_fadvise(WILLNEED)` as well was no better). Only an optimisation: a page
    /// left out is read by the socket write.
    #[cfg(target_os = "linux")]
    fn fault_in(&self) {
        let _ = self.map.advise(memmap2::Advice::PopulateRead);
    }

    #[cfg(not(target_os = "linux"))]
    fn fault_in(&self) {}

    /// The window's bytes from `skip` on, unmapped when the last of them is dropped.
    fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self.map).slice(self.skip..)
    }
}

/// Writes every block it receives to `file` from `offset` on, starting write-back as
/// it goes; runs on a blocking thread.
fn write_blocks(
    mut file: std::fs::File,
    offset: u64,
    mut rx: mpsc::Receiver<Bytes>,
) -> io::Result<()> {
    let (mut written, mut flushed) = (offset, offset);
    while let Some(block) = rx.blocking_recv() {
        file.write_all(&block)?;
        written += block.len() as u64;
        if written - flushed >= WRITEBACK_WINDOW {
            start_writeback(&file, flushed, written - flushed);
            flushed = written;
        }
    }
    Ok(())
}

/// Ask the kernel to start writing `len` bytes from `offset` to disk without waiting.
/// Only an optimisation: durability still comes from the fsync at commit.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a file descriptor that `file` keeps open; no memory
    // is shared with the kernel.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

impl FsBackend {
    /// [`BlobBackend::read`], or with `uncached`, [`BlobBackend::read_uncached`].
    async fn read_from(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        uncached: bool,
    ) -> Result<Option<ByteStream>> {
        let path = self.blob_path(digest);
        let from = range.map_or(0, |r| r.start);
        let opened = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let file = std::fs::File::open(&path)?;
            let size = file.metadata()?.len();
            // Bytes already in the page cache are read from there all the same.
            let direct =
                uncached && !Window::resident_at(&file, from, size) && direct::enable(&file, 0);
            Ok((file, direct, size))
        });
        let Some((file, direct, size)) = not_found_as_none(opened.await?)? else {
            return Ok(None);
        };
        let range = range.unwrap_or(ByteRange {
            start: 0,
            len: size,
        });
        let end = range.start.saturating_add(range.len).min(size);
        if direct {
            return Ok(Some(direct::read(
                file,
                self.buffers.clone(),
                range.start,
                end,
            )));
        }
        Ok(Some(mapped_windows(file, range.start, end)))
    }

    /// [`BlobBackend::append`], or with `uncached`, [`BlobBackend::append_uncached`].
    async fn append_to(
        &self,
        id: &UploadId,
        offset: u64,
        mut body: ByteStream,
        uncached: bool,
    ) -> Result<u64> {
        let path = self.staged_path(id);
        let file = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
            let mut file = not_found_as_none(std::fs::OpenOptions::new().write(true).open(path))?
                .ok_or(Error::NotFound(crate::error::Missing::Upload))?;
            let len = file.metadata()?.len();
            if len != offset {
                return Err(Error::RangeInvalid {
                    expected_offset: len,
                    got: offset,
                });
            }
            file.seek(SeekFrom::Start(offset))?;
            Ok(file)
        })
        .await??;
        let rollback = file.try_clone()?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let buffers = self.buffers.clone();
        let writer = tokio::task::spawn_blocking(move || {
            if uncached && direct::enable(&file, offset) {
                direct::write_blocks(&file, offset, rx, &buffers)
            } else {
                write_blocks(file, offset, rx)
            }
        });
        let mut written = 0u64;
        let mut body_error = None;
        while let Some(block) = body.next().await {
            match block {
                Ok(block) => {
                    written += block.len() as u64;
                    // On a send error the writer failed; its error is reported below.
                    if tx.send(block).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    body_error = Some(Error::Body(e));
                    break;
                }
            }
        }
        drop(tx);
        let outcome = match (writer.await?, body_error) {
            (Err(e), _) => Err(Error::from(e)),
            (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(offset + written),
        };
        if outcome.is_err() {
            tokio::task::spawn_blocking(move || rollback.set_len(offset)).await??;
        }
        outcome
    }
}

#[async_trait]
impl BlobBackend for FsBackend {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        let meta = not_found_as_none(tokio::fs::metadata(self.blob_path(digest)).await)?;
        Ok(meta.map(|m| m.len()))
    }

    async fn read(&self, digest: &Digest, range: Option<ByteRange>) -> Result<Option<ByteStream>> {
        self.read_from(digest, range, false).await
    }

    async fn read_uncached(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>> {
        self.read_from(digest, range, true).await
    }

    async fn create_staged(&self, id: &UploadId) -> Result<()> {
        tokio::fs::File::create(self.staged_path(id)).await?;
        Ok(())
    }

    async fn staged_len(&self, id: &UploadId) -> Result<Option<u64>> {
        let meta = not_found_as_none(tokio::fs::metadata(self.staged_path(id)).await)?;
        Ok(meta.map(|m| m.len()))
    }

    async fn append(&self, id: &UploadId, offset: u64, body: ByteStream) -> Result<u64> {
        self.append_to(id, offset, body, false).await
    }

    async fn append_uncached(&self, id: &UploadId, offset: u64, body: ByteStream) -> Result<u64> {
        self.append_to(id, offset, body, true).await
    }

    async fn read_staged(&self, id: &UploadId, offset: u64) -> Result<ByteStream> {
        use tokio::io::AsyncSeekExt;
        let mut file = not_found_as_none(tokio::fs::File::open(self.staged_path(id)).await)?
            .ok_or(Error::NotFound(crate::error::Missing::Upload))?;
        file.seek(SeekFrom::Start(offset)).await?;
        Ok(Box::pin(ReaderStream::with_capacity(file, READ_CHUNK)))
    }

    async fn commit(&self, id: &UploadId, digest: &Digest) -> Result<()> {
        let staged = self.staged_path(id);
        let target = self.blob_path(digest);
        tokio::task::spawn_blocking(move || -> Result<()> {
            not_found_as_none(std::fs::File::open(&staged))?
                .ok_or(Error::NotFound(crate::error::Missing::Upload))?
                .sync_all()?;
            let dir = target.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            std::fs::rename(&staged, &target)?;
            Ok(std::fs::File::open(dir)?.sync_all()?)
        })
        .await??;
        Ok(())
    }

    async fn discard(&self, id: &UploadId) -> Result<()> {
        not_found_as_none(tokio::fs::remove_file(self.staged_path(id)).await)?;
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        not_found_as_none(tokio::fs::remove_file(self.blob_path(digest)).await)?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Digest>> {
        let root = self.blobs.clone();
        tokio::task::spawn_blocking(move || -> io::Result<Vec<Digest>> {
            let mut found = Vec::new();
            for algorithm in std::fs::read_dir(&root)? {
                let algorithm = algorithm?;
                for prefix in std::fs::read_dir(algorithm.path())? {
                    for blob in std::fs::read_dir(prefix?.path())? {
                        let name = format!(
                            "{}:{}",
                            algorithm.file_name().to_string_lossy(),
                            blob?.file_name().to_string_lossy()
                        );
                        // Anything else in the tree is not a blob this backend wrote.
                        if let Ok(digest) = Digest::parse_stored(&name) {
                            found.push(digest);
                        }
                    }
                }
            }
            Ok(found)
        })
        .await?
        .map_err(Error::from)
    }

    async fn staged(&self) -> Result<Vec<Staged>> {
        let root = self.uploads.clone();
        tokio::task::spawn_blocking(move || -> io::Result<Vec<Staged>> {
            let mut found = Vec::new();
            for entry in std::fs::read_dir(&root)? {
                let entry = entry?;
                let Ok(id) = entry.file_name().to_string_lossy().parse() else {
                    continue;
                };
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Gone since the listing: finished or discarded meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                let idle = meta.modified()?.elapsed().unwrap_or_default();
                found.push(Staged {
                    id,
                    len: meta.len(),
                    idle,
                });
            }
            Ok(found)
        })
        .await?
        .map_err(Error::from)
    }
}
