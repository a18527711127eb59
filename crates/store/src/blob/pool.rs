//! Buffers reused from one transfer to the next, so that moving a body touches memory
//! that is already mapped, and lent out as [`Bytes`] that return them when dropped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of an [`Aligned`] buffer's address: the largest logical block size in
/// common use, which direct I/O needs its offsets, lengths and buffers aligned to.
pub(crate) const ALIGN: usize = 4096;

/// A buffer a [`Pool`] keeps.
pub(crate) trait Reusable: AsRef<[u8]> + Send + Sized + 'static {
    /// A new buffer.
    fn fresh() -> Self;
    /// Empty it for reuse.
    fn reset(&mut self);
}

/// Idle buffers, at most `kept`. A buffer taken from an empty pool is a new one, so the
/// pool never makes anyone wait.
pub(crate) struct Pool<B> {
    pub(super) idle: Arc<Mutex<Vec<B>>>,
    kept: usize,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            idle: self.idle.clone(),
            kept: self.kept,
        }
    }
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl<B: Reusable> Pool<B> {
    /// An empty pool that keeps at most `kept` idle buffers.
    pub(crate) fn new(kept: usize) -> Pool<B> {
        Pool {
            idle: Arc::default(),
            kept,
        }
    }

    /// An idle buffer, or a new one.
    pub(crate) fn take(&self) -> B {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        idle.unwrap_or_else(B::fresh)
    }

    /// Keep `buf` for reuse, if there is room.
    pub(crate) fn give_back(&self, mut buf: B) {
        buf.reset();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.kept {
            idle.push(buf);
        }
    }

    /// `buf`'s bytes, given back to the pool once every clone is dropped.
    pub(crate) fn lend(&self, buf: B) -> Bytes {
        Bytes::from_owner(Lent {
            buf: Some(buf),
            pool: self.clone(),
        })
    }
}

/// A buffer lent out as [`Bytes`]; dropping it gives the buffer back.
struct Lent<B: Reusable> {
    buf: Option<B>,
    pool: Pool<B>,
}

impl<B: Reusable> AsRef<[u8]> for Lent<B> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], AsRef::as_ref)
    }
}

impl<B: Reusable> Drop for Lent<B> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf);
        }
    }
}

/// `LEN` bytes at an [`ALIGN`]ed address, the first `filled` of them in use.
#[derive(Debug)]
pub(crate) struct Aligned<const LEN: usize> {
    mem: Box<[u8]>,
    start: usize,
    /// Bytes in use, from the start.
    pub(crate) filled: usize,
}

impl<const LEN: usize> Reusable for Aligned<LEN> {
    fn fresh() -> Self {
        let mem = vec![0; LEN + ALIGN].into_boxed_slice();
        let start = mem.as_ptr().align_offset(ALIGN);
        Aligned {
            mem,
            start,
            filled: 0,
        }
    }

    fn reset(&mut self) {
        self.filled = 0;
    }
}

/// The bytes in use.
impl<const LEN: usize> AsRef<[u8]> for Aligned<LEN> {
    fn as_ref(&self) -> &[u8] {
        let (_, aligned) = self.mem.split_at(self.start);
        aligned.get(..self.filled).unwrap_or_default()
    }
}

impl<const LEN: usize> Aligned<LEN> {
    /// The whole buffer, in use or not.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        let (_, aligned) = self.mem.split_at_mut(self.start);
        aligned.get_mut(..LEN).unwrap_or_default()
    }

    /// Whether every byte is in use.
    pub(crate) fn is_full(&self) -> bool {
        self.filled >= LEN
    }

    /// Copy as much of `bytes` as fits after the bytes in use; returns what did not fit.
    pub(crate) fn fill<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let filled = self.filled;
        let free = self.space().get_mut(filled..).unwrap_or_default();
        let (now, later) = bytes.split_at(bytes.len().min(free.len()));
        if let Some(dst) = free.get_mut(..now.len()) {
            dst.copy_from_slice(now);
        }
        self.filled += now.len();
        later
    }
}

/// Whether `bytes` start at an [`ALIGN`]ed address and are whole aligned blocks, as a
/// direct write needs them.
pub(crate) fn is_aligned(bytes: &[u8]) -> bool {
    bytes.as_ptr().addr().is_multiple_of(ALIGN) && bytes.len().is_multiple_of(ALIGN)
}
