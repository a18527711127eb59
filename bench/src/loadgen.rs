//! The request-rate workloads' load generator: one keep-alive HTTP/1.1 connection per
//! concurrent task, each writing a request and reading its whole response before the
//! next (a closed loop), with nothing between the task and its socket. The blob pulls'
//! reader ([`get_discarding`]) uses the same connections.
//!
//! The generator shares the machine's two cores with the server it measures, so what it
//! spends per request is taken from the server: through `reqwest`'s pool (a hand-off to a
//! connection task and back) a `HEAD` cost it about as much CPU as it cost layercache.
//! Here a request costs a write and a read or two, as for `wrk` or `h2load`.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::workloads::Rate;

/// Where requests go: the server's `host:port` and the credential every request carries.
#[derive(Clone)]
pub struct Target {
    /// `host:port`, also sent as `Host`.
    pub authority: String,
    /// The `Authorization` header's value, if any.
    pub authorization: Option<String>,
}

/// One request of a workload.
pub struct Request {
    /// `HEAD`, `GET` or `PUT`.
    pub method: &'static str,
    /// Path and query.
    pub path: String,
    /// The body (sent with a `Content-Length`; empty for none).
    pub body: Bytes,
}

/// A keep-alive connection that sends one request at a time.
struct Connection {
    stream: TcpStream,
    /// The header lines every request of the workload carries.
    common: String,
    /// Bytes read past the end of the last response.
    input: Vec<u8>,
    output: Vec<u8>,
}

impl Connection {
    /// A connection to `target` whose requests all carry `headers` (lines ending in
    /// `\r\n`).
    async fn open(target: &Target, headers: &str) -> Result<Connection> {
        let stream = TcpStream::connect(&target.authority)
            .await
            .with_context(|| format!("connecting to {}", target.authority))?;
        stream.set_nodelay(true)?;
        let mut common = format!("Host: {}\r\n", target.authority);
        if let Some(authorization) = &target.authorization {
            common.push_str(&format!("Authorization: {authorization}\r\n"));
        }
        common.push_str(headers);
        Ok(Connection {
            stream,
            common,
            input: Vec::with_capacity(16 << 10),
            output: Vec::with_capacity(4 << 10),
        })
    }

    /// Send `request` and read its response; fails unless the status is 2xx, or when a
    /// `GET` is answered with an empty body.
    async fn send(&mut self, request: &Request) -> Result<()> {
        self.output.clear();
        write!(
            self.output,
            "{} {} HTTP/1.1\r\n{}Content-Length: {}\r\n\r\n",
            request.method,
            request.path,
            self.common,
            request.body.len()
        )?;
        self.output.extend_from_slice(&request.body);
        self.stream.write_all(&self.output).await?;
        let (status, head_len, content_length) = self.read_head().await?;
        let body_len = match (request.method, status) {
            ("HEAD", _) | (_, 204 | 304) => 0,
            _ => content_length.context("a response without Content-Length")?,
        };
        self.input.drain(..head_len);
        while self.input.len() < body_len {
            self.fill().await?;
        }
        let body = self.input.drain(..body_len);
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(body.as_slice()).into_owned();
            bail!("{} {}: {status} {text}", request.method, request.path);
        }
        ensure!(
            request.method != "GET" || body_len > 0,
            "GET {}: an empty body",
            request.path
        );
        Ok(())
    }

    /// Read until a whole response head is buffered; its status, length and
    /// `Content-Length`.
    async fn read_head(&mut self) -> Result<(u16, usize, Option<usize>)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = response.parse(&self.input)? {
                ensure!(
                    !response
                        .headers
                        .iter()
                        .any(|h| { h.name.eq_ignore_ascii_case("transfer-encoding") }),
                    "a chunked response (not supported here)"
                );
                let content_length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        let text = std::str::from_utf8(h.value).context("Content-Length")?;
                        text.trim().parse::<usize>().context("Content-Length")
                    })
                    .transpose()?;
                return Ok((response.code.unwrap_or(0), len, content_length));
            }
            self.fill().await?;
        }
    }

    /// `GET path`, its body read into one reused buffer and dropped; returns the body's
    /// length. Fails unless the status is 200.
    async fn get_discarding(&mut self, path: &str) -> Result<u64> {
        self.output.clear();
        write!(self.output, "GET {path} HTTP/1.1\r\n{}\r\n", self.common)?;
        self.stream.write_all(&self.output).await?;
        let (status, head_len, content_length) = self.read_head().await?;
        ensure!(status == 200, "GET {path}: {status}");
        let len = content_length.context("a response without Content-Length")? as u64;
        let mut got = (self.input.len() - head_len) as u64;
        let mut buf = vec![0u8; BODY_BUFFER];
        while got < len {
            let n = self.stream.read(&mut buf).await?;
            ensure!(
                n > 0,
                "GET {path}: the server closed after {got} of {len} bytes"
            );
            got += n as u64;
        }
        ensure!(got == len, "GET {path}: {got} bytes for a length of {len}");
        Ok(got)
    }

    /// Append what the socket has to the input buffer.
    async fn fill(&mut self) -> Result<()> {
        self.input.reserve(16 << 10);
        let n = self.stream.read_buf(&mut self.input).await?;
        ensure!(n > 0, "the server closed the connection");
        Ok(())
    }
}

/// What a body read by [`get_discarding`] goes through: as large as the loopback stream
/// limit's receiver reads.
const BODY_BUFFER: usize = 1 << 20;

/// `GET path` from `target` on a connection of its own, its body read from the socket into
/// one reused 1 MiB buffer and dropped, as the loopback stream limit's receiver reads;
/// returns the body's length. What a blob pull measures is then the server and the
/// kernel: through `reqwest` the same pull reached about half of what `curl` did.
pub async fn get_discarding(target: &Target, path: &str) -> Result<u64> {
    Connection::open(target, "")
        .await?
        .get_discarding(path)
        .await
}

/// Send `request(task, i)`, with the header lines `headers` (each ending in `\r\n`),
/// from `conns` connections, each waiting for a response before its next request, until
/// `secs` have passed; returns the rate over all connections and how many requests each
/// one completed.
pub async fn closed_loop<F>(
    target: &Target,
    headers: &str,
    conns: usize,
    secs: f64,
    request: F,
) -> Result<(Rate, Vec<u64>)>
where
    F: Fn(usize, u64) -> Request + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let mut connections = Vec::with_capacity(conns);
    for _ in 0..conns {
        connections.push(Connection::open(target, headers).await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for (task, mut connection) in connections.into_iter().enumerate() {
        let request = request.clone();
        set.spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let next = request(task, i);
                let t = Instant::now();
                connection.send(&next).await?;
                latencies.push(t.elapsed());
                i += 1;
            }
            anyhow::Ok((task, latencies))
        });
    }
    let mut counts = vec![0u64; conns];
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        let (task, latencies) = done??;
        if let Some(count) = counts.get_mut(task) {
            *count = latencies.len() as u64;
        }
        all.extend(latencies);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let requests = all.len() as u64;
    ensure!(requests > 0, "no request completed");
    let rate = Rate {
        requests,
        per_sec: requests as f64 / secs,
        p50_ms: percentile_ms(&all, 0.50),
        p99_ms: percentile_ms(&all, 0.99),
    };
    Ok((rate, counts))
}

/// The `q` quantile of sorted latencies, in milliseconds (nearest rank).
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1);
    sorted
        .get(rank.min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 0.5), 50.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&v[..1], 0.99), 1.0);
    }

    /// A server that answers each request with the next of `responses`, split in two
    /// writes so the client must read more than once.
    async fn serve(responses: Vec<&'static str>) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for response in responses {
                let _ = socket.read(&mut buf).await.unwrap();
                let (a, b) = response.split_at(response.len() / 2);
                socket.write_all(a.as_bytes()).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                socket.write_all(b.as_bytes()).await.unwrap();
            }
        });
        Target {
            authority,
            authorization: None,
        }
    }

    fn request(method: &'static str) -> Request {
        Request {
            method,
            path: "/v2/".into(),
            body: Bytes::new(),
        }
    }

    #[tokio::test]
    async fn reads_heads_and_bodies_and_keeps_what_follows() {
        let target = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 404 Not Found\r\nContent-Length: 7\r\n\r\nunknown",
        ])
        .await;
        let mut connection = Connection::open(&target, "").await.unwrap();
        // A HEAD's Content-Length announces a body that is not sent.
        connection.send(&request("HEAD")).await.unwrap();
        connection.send(&request("GET")).await.unwrap();
        assert!(connection.input.is_empty());
        let refused = connection.send(&request("GET")).await.unwrap_err();
        assert!(refused.to_string().contains("404 unknown"), "{refused}");
    }

    #[tokio::test]
    async fn a_discarded_body_is_counted_whole_or_refused() {
        let whole = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        ]);
        assert_eq!(get_discarding(&whole.await, "/b").await.unwrap(), 11);
        let short = serve(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello world",
        ]);
        let cut = get_discarding(&short.await, "/b").await.unwrap_err();
        assert!(cut.to_string().contains("after 11 of 12"), "{cut}");
        let missing = serve(vec!["HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]);
        let refused = get_discarding(&missing.await, "/b").await.unwrap_err();
        assert!(refused.to_string().contains("404"), "{refused}");
    }
}
