//! Waking a connection's reader in steps while a large request body arrives. A client
//! sends a body in TCP segments of at most 64 KiB, and a server that reads faster than
//! its client sends is woken for each of them: 16 000 thread switches per GiB uploaded,
//! which on a VM cost more of a save through the Actions cache than any function of the
//! server's own. While the rest of a body with a known length is certain to come, the
//! socket's receive low watermark (`SO_RCVLOWAT`) makes the kernel wake the reader only
//! once [`STEP`] bytes are queued; a non-blocking read still returns whatever is there.
//!
//! The watermark never exceeds what is still to come, so no read waits for bytes that
//! will not arrive: when a body's first frame is asked for ([`BodyEnd::expect`]), its
//! end lies at least its length, less [`UNREAD_MARGIN`] (what hyper, and TLS under it,
//! may already have read of it), past what has been read from the socket so far. The
//! socket's reader ([`Stepped`]) sets the watermark before each read to the bytes left
//! to that point, capped at [`STEP`], and to 1 past it, so the body's tail, the next
//! request and every small body wake the reader at once, as before.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most bytes the kernel queues before it wakes the reader of a body.
const STEP: u64 = 256 << 10;

/// More than a body's bytes already read from the socket when its first frame is asked
/// for: hyper's read buffer (about 400 KiB at most) and a decoded chunk it holds, and a
/// TLS session's buffered records.
const UNREAD_MARGIN: u64 = 2 << 20;

/// Where the body being read on one connection ends, as a lower bound in bytes read from
/// its socket; shared between the socket's reader and the request's body.
#[derive(Debug, Default)]
pub(crate) struct BodyEnd {
    /// Bytes read from the socket so far.
    read: AtomicU64,
    /// The body's end is at least this many bytes into the socket's stream.
    end: AtomicU64,
}

impl BodyEnd {
    /// A body of `len` bytes, none of them taken yet, is about to be read.
    pub(crate) fn expect(&self, len: u64) {
        let read = self.read.load(Ordering::Acquire);
        let end = read.saturating_add(len.saturating_sub(UNREAD_MARGIN));
        self.end.store(end, Ordering::Release);
    }

    /// The body has ended (or failed): whatever it announced, the reader is woken at
    /// each segment again. A body shorter than its announced length (a chunked body
    /// whose `Content-Range` said more) is read to its end without waiting.
    pub(crate) fn finish(&self) {
        self.end.store(0, Ordering::Release);
    }

    /// The low watermark for a socket that has given `read` bytes.
    fn watermark(&self, read: u64) -> u64 {
        self.end
            .load(Ordering::Acquire)
            .saturating_sub(read)
            .clamp(1, STEP)
    }
}

/// A TCP connection whose reads keep its receive low watermark at what [`BodyEnd`]
/// allows; writes pass through unchanged (vectored, as hyper sends blob windows).
pub(crate) struct Stepped {
    stream: TcpStream,
    body: Arc<BodyEnd>,
    read: u64,
    /// The watermark set on the socket; `None` once setting one failed, after which the
    /// socket is left as it is.
    applied: Option<u64>,
}

impl Stepped {
    /// Wrap an accepted connection; its body ends are announced through `body`.
    pub(crate) fn new(stream: TcpStream, body: Arc<BodyEnd>) -> Stepped {
        Stepped {
            stream,
            body,
            read: 0,
            applied: Some(1),
        }
    }

    /// Set the socket's watermark to what the body allows now, if it changed.
    fn apply_watermark(&mut self) {
        let Some(applied) = self.applied else {
            return;
        };
        let wanted = self.body.watermark(self.read);
        if wanted == applied {
            return;
        }
        self.applied = match set_rcvlowat(&self.stream, wanted) {
            Ok(()) => Some(wanted),
            Err(e) => {
                tracing::debug!(error = %e, "setting a socket's receive low watermark failed");
                // Back to the kernel's default, so no read waits on a watermark left set.
                let _ = set_rcvlowat(&self.stream, 1);
                None
            }
        };
    }
}

/// Set `SO_RCVLOWAT` on `stream`. Setting it wakes a reader whose queued bytes already
/// reach the new value (Linux's `tcp_set_rcvlowat`).
#[allow(unsafe_code)]
fn set_rcvlowat(stream: &TcpStream, bytes: u64) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).map_err(io::Error::other)?;
    // SAFETY: the descriptor is the stream's own and open while it is borrowed; the
    // option value is a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl AsyncRead for Stepped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.apply_watermark();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        this.read += (buf.filled().len() - before) as u64;
        this.body.read.store(this.read, Ordering::Release);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stepped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_stays_below_what_is_still_to_come() {
        let body = BodyEnd::default();
        assert_eq!(
            body.watermark(0),
            1,
            "no body announced: the kernel's default"
        );
        // A small body: its bytes may all be read already.
        body.expect(UNREAD_MARGIN);
        assert_eq!(body.watermark(0), 1);
        // 10 MiB announced after 1 000 bytes (the head) were read.
        body.read.store(1000, Ordering::Release);
        body.expect(10 << 20);
        let end = 1000 + (10 << 20) - UNREAD_MARGIN;
        assert_eq!(body.watermark(1000), STEP);
        assert_eq!(body.watermark(end - 100), 100);
        assert_eq!(body.watermark(end), 1);
        assert_eq!(body.watermark(end + (5 << 20)), 1, "the next request");
    }
}
