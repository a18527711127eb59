//! Request bodies as handlers see them: a body a handler drops unread (it answered
//! before reading: unknown upload, out-of-order chunk, manifest over the limit) is read
//! to its end and discarded in the background, so a client still sending it reads the
//! error instead of a reset connection. Draining is bounded by [`DRAIN_LIMIT`] bytes and
//! [`DRAIN_TIME`]; past either the connection is closed as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use futures::{StreamExt, TryStreamExt};
use http_body::{Frame, SizeHint};
use store::ByteRange;

use crate::socket::BodyEnd;

/// Most bytes read and discarded after an early answer.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
/// Longest time spent draining after an early answer.
const DRAIN_TIME: Duration = Duration::from_secs(30);

/// Wrap a request body so that dropping it unread drains it.
pub(crate) fn drain_on_drop(body: Body) -> Body {
    Body::new(DrainOnDrop {
        inner: Some(body),
        finished: false,
    })
}

struct DrainOnDrop {
    inner: Option<Body>,
    finished: bool,
}

impl HttpBody for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.finished = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(body) = self.inner.take().filter(|b| !b.is_end_stream()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body));
        }
    }
}

async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut left = DRAIN_LIMIT;
    let discard = async {
        while let Some(Ok(chunk)) = stream.next().await {
            left = left.saturating_sub(chunk.len() as u64);
            if left == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
}

/// Wrap a request body so that it fails once its reader has waited `timeout` without a
/// byte arriving: a client that stalls mid-body (or vanished without closing) releases
/// what its request holds (an upload's lock, an upload slot) instead of keeping it.
pub(crate) fn idle_timeout(body: Body, timeout: Duration) -> Body {
    Body::new(IdleTimeout {
        inner: body,
        timeout,
        waiting_since: None,
        deadline: None,
        expired: false,
    })
}

struct IdleTimeout {
    inner: Body,
    timeout: Duration,
    /// When the reader began waiting for the next frame (`None` while it is not).
    waiting_since: Option<Instant>,
    /// A timer set at the first wait, and when it fires moved to the current wait's end
    /// if frames came meanwhile: one timer per body, not one per frame.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: bool,
}

impl HttpBody for IdleTimeout {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting_since = None;
            return Poll::Ready(frame);
        }
        let due = *this.waiting_since.get_or_insert_with(Instant::now) + this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
        loop {
            std::task::ready!(deadline.as_mut().poll(cx));
            if Instant::now() >= due {
                break;
            }
            deadline.as_mut().reset(due.into());
        }
        this.expired = true;
        let stalled = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no bytes arrived for {}",
                humantime::format_duration(this.timeout)
            ),
        );
        Poll::Ready(Some(Err(axum::Error::new(stalled))))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wrap a request body so that, when its first frame is asked for, it tells its
/// connection where it ends ([`BodyEnd::expect`]) if its length is known, and when it
/// ends, that it has ([`BodyEnd::finish`]).
pub(crate) fn announce_end(body: Body, end: Arc<BodyEnd>) -> Body {
    Body::new(AnnounceEnd {
        inner: body,
        end,
        polled: false,
        finished: false,
    })
}

/// Tell the connection of a request (`extensions`) that its body, not read yet, carries
/// `len` bytes: for a body without a `Content-Length`, whose length another header gives.
pub(crate) fn expect_len(extensions: &axum::http::Extensions, len: u64) {
    if let Some(end) = extensions.get::<Arc<BodyEnd>>() {
        end.expect(len);
    }
}

struct AnnounceEnd {
    inner: Body,
    end: Arc<BodyEnd>,
    polled: bool,
    finished: bool,
}

impl HttpBody for AnnounceEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if !this.polled {
            this.polled = true;
            if let Some(len) = this.inner.size_hint().exact() {
                this.end.expect(len);
            }
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if !this.finished && matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.finished = true;
            this.end.finish();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as the store takes it.
pub(crate) fn byte_stream(body: Body) -> store::ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

/// Parse one `bytes=` range against `size` (RFC 9110 §14). `Ok(None)` means "serve it
/// all": a header to ignore (another unit, a malformed range, several ranges); `Err`
/// means a range that is unsatisfiable or invalid.
pub(crate) fn parse_range(value: &str, size: u64) -> std::result::Result<Option<ByteRange>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    let Some((first, last)) = spec.split_once('-').filter(|_| !spec.contains(',')) else {
        return Ok(None);
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    let (first, last) = (first.trim(), last.trim());
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        (false, true) => match num(first) {
            Some(start) => (start, size.checked_sub(1).ok_or(())?),
            None => return Ok(None),
        },
        (false, false) => match (num(first), num(last)) {
            // Invalid (last before first): refused, as RFC 9110 §15.5.17 allows.
            (Some(start), Some(end)) if end < start => return Err(()),
            (Some(start), Some(end)) => (start, end.min(size.saturating_sub(1))),
            _ => return Ok(None),
        },
        (true, false) => {
            let Some(suffix) = num(last) else {
                return Ok(None);
            };
            let suffix = suffix.min(size);
            if suffix == 0 {
                return Err(());
            }
            (size - suffix, size - 1)
        }
        (true, true) => return Ok(None),
    };
    if start >= size {
        return Err(());
    }
    Ok(Some(ByteRange {
        start,
        len: end - start + 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_dropped_unread_is_still_read_to_its_end() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let body = drain_on_drop(Body::from_stream(stream));
        assert!(!body.is_end_stream());
        drop(body);
        // With nobody reading, the one-slot channel would close or block.
        for _ in 0..100 {
            let sent = tokio::time::timeout(
                Duration::from_secs(5),
                tx.send(Ok(Bytes::from_static(b"chunk"))),
            )
            .await;
            assert!(matches!(sent, Ok(Ok(()))), "the sender is being drained");
        }
    }

    fn r(start: u64, len: u64) -> std::result::Result<Option<ByteRange>, ()> {
        Ok(Some(ByteRange { start, len }))
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), r(0, 10));
        assert_eq!(parse_range("bytes=90-", 100), r(90, 10));
        assert_eq!(parse_range("bytes=-10", 100), r(90, 10));
        assert_eq!(parse_range("bytes=95-200", 100), r(95, 5));
        assert_eq!(parse_range("bytes=-500", 100), r(0, 100));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        // Unsatisfiable: 416.
        for unsatisfiable in ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=5-2"] {
            assert_eq!(parse_range(unsatisfiable, 100), Err(()), "{unsatisfiable}");
        }
        assert_eq!(parse_range("bytes=0-", 0), Err(()));
        // Another unit, or malformed: ignored, the whole body is sent.
        for ignored in [
            "items=0-5",
            "bytes=-1-5",
            "bytes=-",
            "bytes=a-b",
            "bytes=0-1-2",
            "bytes 0-5",
        ] {
            assert_eq!(parse_range(ignored, 100), Ok(None), "{ignored}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn a_satisfiable_range_lies_inside_the_content(
                value in "\\PC{0,30}|bytes= ?[0-9]{0,21} ?- ?[0-9]{0,21}",
                size in prop_oneof![0..200u64, any::<u64>()],
            ) {
                if let Ok(Some(range)) = parse_range(&value, size) {
                    prop_assert!(range.len >= 1);
                    prop_assert!(range.start.checked_add(range.len).is_some_and(|end| end <= size));
                }
            }

            #[test]
            fn a_range_from_first_to_last_is_exact(first in 0..1000u64, len in 1..1000u64, size in 0..3000u64) {
                let last = first + len - 1;
                match parse_range(&format!("bytes={first}-{last}"), size) {
                    Ok(Some(range)) => {
                        prop_assert_eq!(range.start, first);
                        prop_assert_eq!(range.len, len.min(size - first));
                    }
                    other => {
                        prop_assert_eq!(other, Err(()));
                        prop_assert!(first >= size);
                    }
                }
            }
        }
    }
}
