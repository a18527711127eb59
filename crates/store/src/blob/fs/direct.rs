//! Direct I/O, for blobs kept out of the page cache: their bytes move between the disk
//! and a few reused aligned buffers, so writing or reading one takes no page-cache
//! pages. A blob written once and read at a client's pace (an Actions cache part) gains
//! nothing from staying in memory, and would push the registry's hot layers out of it.
//!
//! Where the filesystem refuses direct I/O (some FUSE mounts, tmpfs before Linux 6.6),
//! [`enable`] and [`open`] say so and the caller goes through the page cache instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::blob::ByteStream;
use crate::blob::pool::{ALIGN, Aligned, Pool, is_aligned};

/// Most bytes per direct read, and per direct write of bytes that were not whole
/// aligned blocks: 2 MiB windows used 7-11 MiB more memory at peak over the bench's
/// Actions cache saves and restores, for the same CPU.
const WINDOW: usize = 1 << 20;
/// Windows read ahead of the one being sent.
const READ_AHEAD: usize = 1;
/// The open flag for direct I/O (none where it is not used).
#[cfg(target_os = "linux")]
const O_DIRECT: libc::c_int = libc::O_DIRECT;
#[cfg(not(target_os = "linux"))]
const O_DIRECT: libc::c_int = 0;

/// A window of a blob, at an aligned address.
type Buffer = Aligned<WINDOW>;

/// Buffers for direct I/O, reused so that it touches memory that is already mapped.
pub(super) type BufferPool = Pool<WINDOW>;

/// Switch `file`'s writes and reads to direct I/O (`on`) or back to the page cache.
#[allow(unsafe_code)]
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: plain system calls on a file descriptor that `file` keeps open; no memory
    // is shared with the kernel.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | O_DIRECT
    } else {
        flags & !O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Switch the reads and writes of `file`, from `offset` on, to direct I/O; `false` when
/// the offset is not aligned or the filesystem refuses.
pub(super) fn enable(file: &File, offset: u64) -> bool {
    O_DIRECT != 0 && offset.is_multiple_of(ALIGN as u64) && set_direct(file, true).is_ok()
}

/// Write `bytes` at `at`; a direct write refused as misaligned (a device with larger
/// blocks) is done again through the page cache, and so is every write after it.
fn write_at(file: &File, bytes: &[u8], at: u64, direct: &mut bool) -> io::Result<()> {
    match file.write_all_at(bytes, at) {
        Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
            set_direct(file, false)?;
            *direct = false;
            file.write_all_at(bytes, at)
        }
        written => written,
    }
}

/// Write every block received to `file` (switched by [`enable`]) from `offset` on.
/// Blocks that are whole aligned blocks at an aligned address (as the store gathers a
/// body) are written as they are; other bytes are gathered into a window, which
/// is written when full, and its whole aligned blocks when no block is queued, so the
/// staging file follows a slow body. The tail that is not a whole block goes through
/// the page cache. Runs on a blocking thread.
pub(super) fn write_blocks(
    file: &File,
    mut offset: u64,
    mut rx: mpsc::Receiver<Bytes>,
    pool: &BufferPool,
) -> io::Result<()> {
    let mut direct = true;
    // Taken at the first block that needs one, so an upload waiting for its body, or
    // whose blocks are all aligned, holds none.
    let mut window: Option<Buffer> = None;
    while let Some(block) = rx.blocking_recv() {
        if window.as_ref().is_none_or(|w| w.filled == 0) && is_aligned(&block) {
            write_at(file, &block, offset, &mut direct)?;
            offset += block.len() as u64;
            continue;
        }
        let buf = window.get_or_insert_with(|| pool.take());
        let mut rest = &block[..];
        while !rest.is_empty() {
            rest = buf.fill(rest);
            if buf.is_full() {
                offset += write_aligned(file, buf, offset, &mut direct)?;
            }
        }
        if rx.is_empty() {
            offset += write_aligned(file, buf, offset, &mut direct)?;
        }
    }
    let Some(mut buf) = window else {
        return Ok(());
    };
    offset += write_aligned(file, &mut buf, offset, &mut direct)?;
    if direct {
        set_direct(file, false)?;
    }
    file.write_all_at(buf.as_ref(), offset)?;
    pool.give_back(buf);
    Ok(())
}

/// Write the whole aligned blocks of `buf` at `at` and keep the rest at its start;
/// returns the bytes written.
fn write_aligned(file: &File, buf: &mut Buffer, at: u64, direct: &mut bool) -> io::Result<u64> {
    let whole = buf.filled - buf.filled % ALIGN;
    if whole == 0 {
        return Ok(0);
    }
    let (aligned, _) = buf.as_ref().split_at(whole);
    write_at(file, aligned, at, direct)?;
    let filled = buf.filled;
    buf.space().copy_within(whole..filled, 0);
    buf.filled -= whole;
    Ok(whole as u64)
}

/// The bytes `[start, end)` of `file` (switched by [`enable`]), read a window at a time on
/// a blocking thread, the next window read while one is sent.
pub(super) fn read(file: File, pool: BufferPool, start: u64, end: u64) -> ByteStream {
    if start >= end {
        return Box::pin(futures::stream::empty());
    }
    let file = Arc::new(file);
    let first = start - start % WINDOW as u64;
    let windows = (first..end).step_by(WINDOW).map(move |at| {
        let (file, pool) = (file.clone(), pool.clone());
        async move {
            let (from, to) = (start.max(at), end.min(at + WINDOW as u64));
            tokio::task::spawn_blocking(move || read_window(&file, pool, at, from, to))
                .await
                .map_err(io::Error::other)?
        }
    });
    Box::pin(futures::stream::iter(windows).buffered(READ_AHEAD + 1))
}

/// The bytes `[from, to)` of the window at `at`.
fn read_window(file: &File, pool: BufferPool, at: u64, from: u64, to: u64) -> io::Result<Bytes> {
    let mut buf = pool.take();
    let need = usize::try_from(to - at).map_err(io::Error::other)?;
    // Whole aligned blocks: the last one may end past the file's end, where the read
    // stops short.
    let whole = need.next_multiple_of(ALIGN);
    while buf.filled < need {
        let filled = buf.filled;
        let into = buf.space().get_mut(filled..whole).unwrap_or_default();
        match file.read_at(into, at + filled as u64)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf.filled += n,
        }
    }
    buf.filled = need;
    let skip = usize::try_from(from - at).map_err(io::Error::other)?;
    Ok(pool.lend(buf).slice(skip..))
}
