//! Blob bodies sent from the file to the socket by the kernel (`sendfile`), with no copy
//! through user space, while hyper still frames the response.
//!
//! hyper writes a response as a queue of body buffers, handed to the connection's
//! `poll_write_vectored` in order, without copying them (the connection is built with
//! `writev(true)`). A [`ZeroCopy`] body yields *placeholder* buffers: slices of one
//! reserved region of zeroed memory, each as long as the file segment it stands for,
//! and queues that segment on its connection. The connection's [`Connection`] stream
//! recognises a placeholder by its address and sends the segment with `sendfile` in its
//! place; where the placeholder has been partly written, the address says how far.
//!
//! The placeholder bytes are never sent: a placeholder without its segment fails the
//! connection instead. Only plain-HTTP connections offer this; over TLS (and for any
//! other body) responses are written as before.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use store::ByteRange;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Longest placeholder, and so the most one body frame stands for.
const PLACEHOLDER_LEN: usize = 16 << 20;

/// The reserved region placeholders are cut from: zeroed, allocated once and never
/// touched, so it costs address space but no memory.
fn placeholders() -> &'static [u8] {
    static REGION: OnceLock<&'static [u8]> = OnceLock::new();
    REGION.get_or_init(|| Box::leak(vec![0u8; PLACEHOLDER_LEN].into_boxed_slice()))
}

/// How far into the placeholder region `slice` starts, if it lies in it.
fn placeholder_offset(slice: &[u8]) -> Option<usize> {
    let region = placeholders().as_ptr_range();
    let start = slice.as_ptr();
    region
        .contains(&start)
        .then(|| start as usize - region.start as usize)
}

/// A part of a file a placeholder stands for.
struct Segment {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

/// The segments a connection's responses have queued, in body order.
type Segments = Arc<Mutex<VecDeque<Segment>>>;

/// A plain-HTTP connection's socket, sending placeholders' segments with `sendfile`.
pub struct Connection {
    socket: TcpStream,
    segments: Segments,
}

/// What a request on a [`Connection`] uses to send files (a request extension).
#[derive(Clone)]
pub struct ZeroCopy {
    segments: Segments,
}

impl Connection {
    /// Wrap `socket`; the [`ZeroCopy`] goes with every request read from it.
    pub fn new(socket: TcpStream) -> (Connection, ZeroCopy) {
        let segments = Segments::default();
        let zero_copy = ZeroCopy {
            segments: Arc::clone(&segments),
        };
        (Connection { socket, segments }, zero_copy)
    }

    fn segments(&self) -> std::sync::MutexGuard<'_, VecDeque<Segment>> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send what the placeholder at `offset` into the region, `len` bytes long, stands
    /// for: the front segment, from where the placeholder was written up to.
    fn poll_send_segment(
        &mut self,
        cx: &mut Context<'_>,
        offset: usize,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.socket.poll_write_ready(cx))?;
            let (file, position) = {
                let segments = self.segments();
                let Some(segment) = segments.front() else {
                    return Poll::Ready(Err(io::Error::other(
                        "a zero-copy placeholder without its file segment",
                    )));
                };
                if offset + len > segment.len {
                    return Poll::Ready(Err(io::Error::other(
                        "a zero-copy placeholder longer than its file segment",
                    )));
                }
                (Arc::clone(&segment.file), segment.offset + offset as u64)
            };
            let sent = self.socket.try_io(Interest::WRITABLE, || {
                send_file(&self.socket, &file, position, len)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the blob file ended early",
                    )));
                }
                Ok(n) => {
                    let mut segments = self.segments();
                    if segments.front().is_some_and(|s| offset + n == s.len) {
                        segments.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// `sendfile(2)`: up to `len` bytes of `file` from `position` onto `socket`.
#[allow(unsafe_code)]
fn send_file(socket: &TcpStream, file: &File, position: u64, len: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut offset = libc::off_t::try_from(position).map_err(io::Error::other)?;
    // SAFETY: both descriptors stay open for the call (borrowed from live owners), and
    // the kernel writes only to `offset`, a local it is given a valid pointer to.
    let sent = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut offset, len) };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// The plain buffers before the first placeholder in one write; a placeholder that
    /// comes first, with `sendfile`.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let plain = bufs
            .iter()
            .position(|b| placeholder_offset(b).is_some())
            .unwrap_or(bufs.len());
        match (plain, bufs.first()) {
            (0, Some(first)) => {
                let offset = placeholder_offset(first).unwrap_or_default();
                self.poll_send_segment(cx, offset, first.len())
            }
            _ => {
                Pin::new(&mut self.socket).poll_write_vectored(cx, bufs.get(..plain).unwrap_or(&[]))
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

impl ZeroCopy {
    /// A body of `len` bytes of `file` from `offset`, sent by the kernel.
    pub fn body(&self, file: File, offset: u64, len: u64) -> Body {
        self.files(futures::stream::once(async move {
            Ok((file, ByteRange { start: offset, len }))
        }))
    }

    /// A body of the given ranges of files, one after the other, sent by the kernel; an
    /// error from `files` ends the response (and its connection) there.
    pub fn files<S>(&self, files: S) -> Body
    where
        S: Stream<Item = io::Result<(File, ByteRange)>> + Send + 'static,
    {
        let segments = Arc::clone(&self.segments);
        let frames = files
            .map_ok(move |(file, range)| {
                let segments = Arc::clone(&segments);
                let file = Arc::new(file);
                let end = range.start + range.len;
                let starts = (range.start..end).step_by(PLACEHOLDER_LEN);
                futures::stream::iter(starts).map(move |offset| {
                    let frame = usize::try_from(end - offset)
                        .unwrap_or(PLACEHOLDER_LEN)
                        .min(PLACEHOLDER_LEN);
                    segments
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_back(Segment {
                            file: Arc::clone(&file),
                            offset,
                            len: frame,
                        });
                    let placeholder = placeholders().get(..frame).unwrap_or_default();
                    Ok::<_, io::Error>(Bytes::from_static(placeholder))
                })
            })
            .try_flatten();
        Body::from_stream(frames)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use std::io::Write as _;

    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// A file of `len` bytes that differ from one offset to the next.
    fn patterned(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let content: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&content).unwrap();
        (file, content)
    }

    /// Serve one connection whose responses are `path`'s bytes from the `?from=&len=` of
    /// each request (`&copies=N`: that many times), zero-copy, with a small send buffer
    /// so writes are partial.
    async fn serve_file(path: std::path::PathBuf) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            socket2_small_send_buffer(&socket);
            let (connection, zero_copy) = Connection::new(socket);
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let query = request.uri().query().unwrap_or_default().to_owned();
                let field = |name: &str| -> Option<u64> {
                    let value = query.split('&').find_map(|kv| kv.strip_prefix(name))?;
                    Some(value.parse().unwrap())
                };
                let (from, len) = (field("from=").unwrap(), field("len=").unwrap());
                // One range of the file, or `copies` of it, each from its own handle.
                let (body, length) = match field("copies=") {
                    None => (zero_copy.body(File::open(&path).unwrap(), from, len), len),
                    Some(copies) => {
                        let range = ByteRange { start: from, len };
                        let files = (0..copies)
                            .map(|_| Ok((File::open(&path).unwrap(), range)))
                            .collect::<Vec<_>>();
                        (zero_copy.files(futures::stream::iter(files)), len * copies)
                    }
                };
                async move {
                    Ok::<_, std::convert::Infallible>(
                        axum::http::Response::builder()
                            .header("content-length", length)
                            .body(body)
                            .unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(true)
                .serve_connection(TokioIo::new(connection), service)
                .await;
        });
        addr
    }

    fn socket2_small_send_buffer(socket: &TcpStream) {
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 256 << 10;
        #[allow(unsafe_code)]
        // SAFETY: setsockopt with a pointer to a live c_int and its exact size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    #[tokio::test]
    async fn ranges_of_a_file_arrive_whole_over_one_kept_alive_connection() {
        let len = PLACEHOLDER_LEN * 2 + 12_345;
        let (file, content) = patterned(len);
        let addr = serve_file(file.path().to_owned()).await;
        let socket = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut read = BufReader::new(read);
        // The whole file (three frames), a range across a frame boundary, one byte, and
        // the whole file again on the same connection.
        let asks = [(0, len), (PLACEHOLDER_LEN - 7, 100), (len - 1, 1), (0, len)];
        for (from, want) in asks {
            write
                .write_all(
                    format!("GET /?from={from}&len={want} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
                )
                .await
                .unwrap();
            let mut length = None;
            loop {
                let mut line = String::new();
                read.read_line(&mut line).await.unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = Some(v.trim().parse::<usize>().unwrap());
                }
            }
            assert_eq!(length, Some(want));
            let mut body = vec![0u8; want];
            read.read_exact(&mut body).await.unwrap();
            assert!(
                body == content[from..from + want],
                "bytes {from}..{} differ",
                from + want
            );
        }
    }

    #[tokio::test]
    async fn ranges_of_several_files_arrive_one_after_the_other() {
        let len = PLACEHOLDER_LEN + 4_321;
        let (file, content) = patterned(len);
        let addr = serve_file(file.path().to_owned()).await;
        let socket = TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut read = BufReader::new(read);
        // Three files' ranges, each across a frame boundary, then an empty range.
        for (from, want, copies) in [(PLACEHOLDER_LEN - 99, 1_000, 3), (5, 0, 2)] {
            write
                .write_all(
                    format!(
                        "GET /?from={from}&len={want}&copies={copies} HTTP/1.1\r\nhost: x\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            let mut line = String::new();
            while line != "\r\n" {
                line.clear();
                read.read_line(&mut line).await.unwrap();
            }
            let mut body = vec![0u8; want * copies];
            read.read_exact(&mut body).await.unwrap();
            for copy in body.chunks(want.max(1)) {
                assert!(*copy == content[from..from + want], "a copy differs");
            }
        }
    }

    #[tokio::test]
    async fn a_placeholder_without_its_segment_fails_the_write_instead_of_sending_zeros() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut connection, _zero_copy) = Connection::new(accepted.unwrap().0);
        let placeholder = &placeholders()[..10];
        let written = connection.write(placeholder).await;
        assert!(written.is_err(), "{written:?}");
        // Plain bytes still pass.
        connection.write_all(b"plain").await.unwrap();
        drop(connection);
        let mut got = Vec::new();
        client.unwrap().read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"plain");
    }
}
