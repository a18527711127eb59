//! Buffers reused from one transfer to the next, so that moving a body touches memory
//! that is already mapped, and lent out as [`Bytes`] that return them when dropped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A buffer a [`Pool`] keeps.
pub(crate) trait Reusable: AsRef<[u8]> + Send + Sized + 'static {
    /// Most idle buffers of this kind kept.
    const KEPT: usize;
    /// A new buffer.
    fn fresh() -> Self;
    /// Empty it for reuse; `false` when it is not worth keeping.
    fn reset(&mut self) -> bool;
}

/// Idle buffers, at most [`Reusable::KEPT`]. A buffer taken from an empty pool is a new
/// one, so the pool never makes anyone wait.
pub(crate) struct Pool<B> {
    pub(super) idle: Arc<Mutex<Vec<B>>>,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            idle: self.idle.clone(),
        }
    }
}

impl<B> Default for Pool<B> {
    fn default() -> Self {
        Pool {
            idle: Arc::default(),
        }
    }
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl<B: Reusable> Pool<B> {
    /// An idle buffer, or a new one.
    pub(crate) fn take(&self) -> B {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        idle.unwrap_or_else(B::fresh)
    }

    /// Keep `buf` for reuse, if there is room and it is worth it.
    pub(crate) fn give_back(&self, mut buf: B) {
        if !buf.reset() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < B::KEPT {
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
