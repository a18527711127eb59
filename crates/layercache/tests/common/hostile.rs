//! A registry upstream that misbehaves on purpose, for the mirror's and the edge's
//! defences: each path answers with a scripted [`Reply`] (bytes that do not match their
//! digest, endless or stalling bodies, resets, redirects, challenges, garbage), and every
//! request is recorded with its `Authorization` header.
//!
//! Plain HTTP on a free `127.0.0.1` port, served by axum on a runtime of its own; the
//! replies can be changed while it runs ([`Hostile::reply`]). Paths without a reply get
//! a distribution-style `404`, except `/v2/`, which answers `200`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt as _;

/// How long a [`Reply::Stall`] waits before giving up on its own.
const STALL: Duration = Duration::from_secs(3600);
/// The chunk an endless body repeats.
const ENDLESS_CHUNK: usize = 64 << 10;

/// What one path answers.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A complete answer.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// `status` with `headers`, then zeros for ever (chunked, or under a
    /// `Content-Length` of `declared` it never reaches).
    Endless {
        status: u16,
        headers: Vec<(String, String)>,
        declared: Option<u64>,
    },
    /// `first` of a body declared `declared` bytes long, then nothing, the connection open.
    Stall { first: Vec<u8>, declared: u64 },
    /// No answer at all, the connection open.
    Silent,
    /// `first` of a body declared `declared` bytes long, then the connection is cut.
    Reset { first: Vec<u8>, declared: u64 },
}

impl Reply {
    /// `200` with `body` and its length.
    pub fn ok(body: &[u8], headers: &[(&str, &str)]) -> Reply {
        Reply::Full {
            status: 200,
            headers: owned(headers),
            body: body.to_vec(),
        }
    }

    /// `status` with `headers` and an empty body.
    pub fn status(status: u16, headers: &[(&str, &str)]) -> Reply {
        Reply::Full {
            status,
            headers: owned(headers),
            body: Vec::new(),
        }
    }

    /// A redirect (`status`) to `location`.
    pub fn redirect(status: u16, location: &str) -> Reply {
        Reply::status(status, &[("location", location)])
    }
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A request the fake upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `HEAD`…
    pub method: String,
    /// The path and query.
    pub uri: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Script {
    replies: Mutex<HashMap<String, Reply>>,
    seen: Mutex<Vec<Seen>>,
}

/// The fake upstream; stopped (every connection cut) when dropped.
pub struct Hostile {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    script: Arc<Script>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Hostile {
    /// Start one on a free port.
    pub fn start() -> Hostile {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let script = Arc::new(Script::default());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(script.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Hostile {
            url,
            script,
            runtime: Some(runtime),
        }
    }

    /// Answer requests for `path` (`/v2/…`, without the query) with `reply` from now on.
    pub fn reply(&self, path: &str, reply: Reply) {
        self.script
            .replies
            .lock()
            .unwrap()
            .insert(path.to_owned(), reply);
    }

    /// The requests received so far whose path contains `part`.
    pub fn seen(&self, part: &str) -> Vec<Seen> {
        let seen = self.script.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.uri.contains(part))
            .cloned()
            .collect()
    }

    /// How many `method` requests for a path containing `part` it received.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.seen(part)
            .iter()
            .filter(|s| s.method == method)
            .count()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn answer(State(script): State<Arc<Script>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    script.seen.lock().unwrap().push(Seen {
        method: request.method().to_string(),
        uri: request.uri().to_string(),
        authorization: request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    let reply = script.replies.lock().unwrap().get(&path).cloned();
    let reply = reply.unwrap_or_else(|| match path.as_str() {
        "/v2/" | "/v2" => Reply::ok(b"{}", &[]),
        _ => Reply::Full {
            status: 404,
            headers: owned(&[("content-type", "application/json")]),
            body: br#"{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}"#.to_vec(),
        },
    });
    match reply {
        Reply::Full {
            status,
            headers,
            body,
        } => respond(status, &headers, None, Body::from(body)),
        Reply::Endless {
            status,
            headers,
            declared,
        } => {
            let chunk = Bytes::from(vec![0u8; ENDLESS_CHUNK]);
            let body = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
            respond(status, &headers, declared, Body::from_stream(body))
        }
        Reply::Stall { first, declared } => {
            let body =
                futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) })
                    .chain(futures::stream::once(async {
                        tokio::time::sleep(STALL).await;
                        Err(std::io::Error::other("stalled"))
                    }));
            respond(200, &[], Some(declared), Body::from_stream(body))
        }
        Reply::Silent => {
            tokio::time::sleep(STALL).await;
            respond(504, &[], None, Body::empty())
        }
        Reply::Reset { first, declared } => {
            let body =
                futures::stream::iter([Ok(Bytes::from(first)), Err(std::io::Error::other("cut"))]);
            respond(200, &[], Some(declared), Body::from_stream(body))
        }
    }
}

fn respond(
    status: u16,
    headers: &[(String, String)],
    declared: Option<u64>,
    body: Body,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    if let Some(len) = declared {
        response
            .headers_mut()
            .insert("content-length", HeaderValue::from(len));
    }
    response
}
