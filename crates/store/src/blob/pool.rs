//! Aligned buffers reused from one transfer to the next, so that moving a body touches
//! memory that is already mapped, and lent out as [`Bytes`] that return them when
//! dropped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of an [`Aligned`] buffer's address: the largest logical block size in
/// common use, which direct I/O needs its offsets, lengths and buffers aligned to.
pub(crate) const ALIGN: usize = 4096;
/// Most idle bytes a pool keeps: 8 blocks of a body, or 4 direct I/O windows.
const KEPT_BYTES: usize = 4 << 20;

/// Idle buffers of `LEN` bytes, at most [`KEPT_BYTES`] of them. A buffer taken from an
/// empty pool is a new one, so the pool never makes anyone wait.
#[derive(Clone, Default)]
pub(crate) struct Pool<const LEN: usize> {
    pub(super) idle: Arc<Mutex<Vec<Aligned<LEN>>>>,
}

impl<const LEN: usize> std::fmt::Debug for Pool<LEN> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl<const LEN: usize> Pool<LEN> {
    /// An idle buffer, or a new one.
    pub(crate) fn take(&self) -> Aligned<LEN> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        idle.unwrap_or_else(Aligned::fresh)
    }

    /// Keep `buf` for reuse, emptied, if there is room.
    pub(crate) fn give_back(&self, mut buf: Aligned<LEN>) {
        buf.filled = 0;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if (idle.len() + 1) * LEN <= KEPT_BYTES {
            idle.push(buf);
        }
    }

    /// `buf`'s bytes, given back to the pool once every clone is dropped.
    pub(crate) fn lend(&self, buf: Aligned<LEN>) -> Bytes {
        Bytes::from_owner(Lent {
            buf: Some(buf),
            pool: self.clone(),
        })
    }
}

/// A buffer lent out as [`Bytes`]; dropping it gives the buffer back.
struct Lent<const LEN: usize> {
    buf: Option<Aligned<LEN>>,
    pool: Pool<LEN>,
}

impl<const LEN: usize> AsRef<[u8]> for Lent<LEN> {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], AsRef::as_ref)
    }
}

impl<const LEN: usize> Drop for Lent<LEN> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf);
        }
    }
}

/// `LEN` bytes at an [`ALIGN`]ed address, the first `filled` of them in use.
pub(crate) struct Aligned<const LEN: usize> {
    mem: Box<[u8]>,
    start: usize,
    /// Bytes in use, from the start.
    pub(crate) filled: usize,
}

/// The bytes in use.
impl<const LEN: usize> AsRef<[u8]> for Aligned<LEN> {
    fn as_ref(&self) -> &[u8] {
        let (_, aligned) = self.mem.split_at(self.start);
        aligned.get(..self.filled).unwrap_or_default()
    }
}

impl<const LEN: usize> Aligned<LEN> {
    /// A new buffer, none of it in use.
    fn fresh() -> Self {
        let mem = vec![0; LEN + ALIGN].into_boxed_slice();
        let start = mem.as_ptr().align_offset(ALIGN);
        Aligned {
            mem,
            start,
            filled: 0,
        }
    }

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
