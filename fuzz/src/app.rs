//! The whole HTTP app in process, over a store in a temporary directory: any method,
//! path, headers and body a client could send. Properties: no panic, no 5xx, no request
//! taking longer than [`REQUEST_TIME`], and on `/v2/` every error is the OCI error JSON
//! with a code.
//!
//! An input is up to [`MAX_REQUESTS`] requests separated by a line `~~~`, each written as
//! HTTP/1.1 text without the version: `METHOD TARGET`, header lines, an empty line, the
//! body. An input starting with `#` runs against a server in `token` mode (credentials
//! required), any other against one in `open` mode. Placeholders let an input follow a
//! protocol's flow: `@LOCATION@` is the `Location` of the last response that had one,
//! `@URL@` the path and query of the last signed URL a cache response handed out,
//! `@TOKEN@` a valid runtime token (cache read and write, registry pull, push and
//! delete everywhere) and `@BASIC@` the base64 of `fuzz:` and that token.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use base64::Engine;
use server::actions::TokenRequest;
use server::auth::RegistryScopes;
use tower::ServiceExt;

/// Most requests one input sends.
pub const MAX_REQUESTS: usize = 8;
/// Longest a request may take, its response body read, before it counts as a hang.
pub const REQUEST_TIME: Duration = Duration::from_secs(10);
/// Largest response body read.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;
/// The signing key of the fuzzed servers, so that inputs can carry valid tokens.
const KEY: [u8; 32] = [7; 32];

/// A server kept for the whole process (a store is too slow to open per input).
struct Server {
    runtime: tokio::runtime::Runtime,
    open: Router,
    token_mode: Router,
    token: String,
    _dirs: Vec<tempfile::TempDir>,
}

/// Where the stores go: memory when the machine has it, so `fsync` costs nothing.
fn temp_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    dir.unwrap_or_else(|e| unreachable!("no temporary directory: {e}"))
}

async fn router(mode: server::auth::Mode, dir: &std::path::Path) -> Router {
    let data_dir = dir.join("data");
    let store_config = store::Config {
        data_dir: data_dir.clone(),
        ..store::Config::default()
    };
    let store = store::Store::open(&store_config)
        .await
        .unwrap_or_else(|e| unreachable!("opening a store: {e}"));
    let key_file = dir.join("actions.key");
    std::fs::write(&key_file, hex::encode(KEY))
        .unwrap_or_else(|e| unreachable!("writing the key: {e}"));
    let actions_config = server::actions::Config {
        key_file: Some(key_file),
        max_entry_size: bytesize::ByteSize::mib(64),
        ..server::actions::Config::default()
    };
    let oidc = std::sync::Arc::<server::auth::oidc::Oidc>::default();
    let actions = server::actions::Actions::open(actions_config, &data_dir, oidc.clone())
        .await
        .unwrap_or_else(|e| unreachable!("opening the cache service: {e}"));
    let mut config = server::Config::default();
    config.auth.mode = Some(mode);
    // The audit log is written too, kept small.
    config.audit.max_file_size = bytesize::ByteSize::mib(1);
    config.audit.keep = 1;
    let audit = server::audit::Audit::open(&config.audit, &data_dir)
        .unwrap_or_else(|e| unreachable!("opening the audit log: {e}"));
    let authority = server::auth::Authority::new(config.auth.clone(), &KEY, oidc)
        .unwrap_or_else(|e| unreachable!("the policy: {e}"));
    let state = server::AppState::new(
        store,
        &config,
        actions,
        authority,
        audit,
        server::upstream::Upstreams::default(),
    );
    server::build_router(state)
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| unreachable!("a runtime: {e}"));
        let (open_dir, token_dir) = (temp_dir(), temp_dir());
        let (open, token_mode) = runtime.block_on(async {
            (
                router(server::auth::Mode::Open, open_dir.path()).await,
                router(server::auth::Mode::Token, token_dir.path()).await,
            )
        });
        let everywhere = vec!["**".to_owned()];
        let token = server::actions::token::mint(
            &KEY,
            &TokenRequest {
                read: vec!["refs/heads/main".into()],
                write: Some("refs/heads/feature".into()),
                ttl: Duration::from_secs(24 * 3600),
                repository: "fuzz".into(),
                session: None,
                registry: RegistryScopes {
                    pull: everywhere.clone(),
                    push: everywhere.clone(),
                    delete: everywhere,
                    view: true,
                    admin: false,
                },
            },
        )
        .unwrap_or_else(|e| unreachable!("minting a token: {e}"));
        Server {
            runtime,
            open,
            token_mode,
            token,
            _dirs: vec![open_dir, token_dir],
        }
    })
}

/// Whether `FUZZ_DEBUG` asks for each request and its status on standard error (to
/// check that a seed goes where it means to).
fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

/// What the last responses handed out, for the placeholders.
#[derive(Default)]
struct Flow {
    location: String,
    url: String,
}

impl Flow {
    fn fill(&self, text: &str, token: &str) -> String {
        if !text.contains('@') {
            return text.to_owned();
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("fuzz:{token}"));
        text.replace("@LOCATION@", &self.location)
            .replace("@URL@", &self.url)
            .replace("@TOKEN@", token)
            .replace("@BASIC@", &basic)
    }

    /// Remember what `response` hands out.
    fn learn(&mut self, headers: &axum::http::HeaderMap, body: &[u8]) {
        if let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
            self.location = location.to_owned();
        }
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
            return;
        };
        for field in [
            "signed_upload_url",
            "signed_download_url",
            "archiveLocation",
        ] {
            if let Some(url) = json.get(field).and_then(|v| v.as_str()) {
                let path = url
                    .find("://")
                    .and_then(|at| url.get(at + 3..))
                    .and_then(|rest| rest.find('/').and_then(|at| rest.get(at..)))
                    .unwrap_or(url);
                self.url = path.to_owned();
            }
        }
    }
}

/// One request of an input, before the placeholders are filled in.
struct RawRequest<'a> {
    method: &'a [u8],
    target: &'a [u8],
    headers: Vec<(&'a [u8], &'a [u8])>,
    body: &'a [u8],
}

fn split_once<'a>(data: &'a [u8], separator: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let at = data
        .windows(separator.len())
        .position(|window| window == separator)?;
    Some((data.get(..at)?, data.get(at + separator.len()..)?))
}

fn parse_request(data: &[u8]) -> Option<RawRequest<'_>> {
    let (head, body) = split_once(data, b"\n\n").unwrap_or((data, b""));
    let mut lines = head.split(|&b| b == b'\n');
    let (method, target) = split_once(lines.next()?, b" ")?;
    let headers = lines
        .filter_map(|line| {
            let (name, value) = split_once(line, b":")?;
            Some((name, value.trim_ascii()))
        })
        .collect();
    Some(RawRequest {
        method,
        target,
        headers,
        body,
    })
}

/// The requests of an input (see the module's documentation).
fn requests(data: &[u8]) -> Vec<RawRequest<'_>> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() < MAX_REQUESTS {
        let (one, next) = split_once(rest, b"\n~~~\n").unwrap_or((rest, b""));
        out.extend(parse_request(one));
        if next.is_empty() {
            break;
        }
        rest = next;
    }
    out
}

/// Build the request, or `None` when hyper would never hand such a request to the app.
fn build(raw: &RawRequest<'_>, flow: &Flow, token: &str) -> Option<Request<Body>> {
    let method = Method::from_bytes(raw.method).ok()?;
    let target = flow.fill(std::str::from_utf8(raw.target).ok()?, token);
    let mut request = Request::builder().method(method).uri(target);
    for (name, value) in &raw.headers {
        let name = HeaderName::from_bytes(name).ok()?;
        let value = match std::str::from_utf8(value) {
            Ok(text) => HeaderValue::from_str(&flow.fill(text, token)).ok()?,
            Err(_) => HeaderValue::from_bytes(value).ok()?,
        };
        request = request.header(name, value);
    }
    request.body(Body::from(raw.body.to_vec())).ok()
}

/// The whole app: every request of the input, with the properties of the module.
pub fn app(data: &[u8]) {
    let (token_mode, data) = match data.strip_prefix(b"#") {
        Some(rest) => (true, rest),
        None => (false, data),
    };
    let server = server();
    let router = if token_mode {
        &server.token_mode
    } else {
        &server.open
    };
    server.runtime.block_on(async {
        let mut flow = Flow::default();
        for raw in requests(data) {
            let Some(request) = build(&raw, &flow, &server.token) else {
                continue;
            };
            send(router, request, &mut flow).await;
        }
    });
}

async fn send(router: &Router, request: Request<Body>, flow: &mut Flow) {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let exchange = async {
        let response = router
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, MAX_RESPONSE).await;
        (parts, body)
    };
    let Ok((parts, body)) = tokio::time::timeout(REQUEST_TIME, exchange).await else {
        panic!("{method} {uri} took longer than {REQUEST_TIME:?}");
    };
    let status = parts.status;
    if debug() {
        eprintln!("  {method} {uri} -> {status}");
    }
    let body = body.unwrap_or_else(|e| panic!("{method} {uri}: the response body failed: {e}"));
    assert!(
        !status.is_server_error(),
        "{method} {uri} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    if uri.path().starts_with("/v2") && status.is_client_error() && method != Method::HEAD {
        assert_oci_error(&method, &uri, status, &body);
    }
    flow.learn(&parts.headers, &body);
}

/// An OCI error body: `{"errors": [{"code": "…", "message": …}]}`, at least one error.
fn assert_oci_error(method: &Method, uri: &axum::http::Uri, status: StatusCode, body: &[u8]) {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{method} {uri} answered {status} without an OCI error body ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    let codes: Vec<&str> = json
        .get("errors")
        .and_then(|errors| errors.as_array())
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e.get("code").and_then(|c| c.as_str()))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !codes.is_empty(),
        "{method} {uri} answered {status} with an error body without a code: {json}"
    );
}

/// The v2 cache service's twirp calls, with a valid token: the first byte picks the
/// call, the rest is its JSON body.
pub fn twirp(data: &[u8]) {
    const CALLS: [&str; 3] = [
        "CreateCacheEntry",
        "FinalizeCacheEntryUpload",
        "GetCacheEntryDownloadURL",
    ];
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let call = CALLS
        .get(usize::from(pick) % CALLS.len())
        .copied()
        .unwrap_or("CreateCacheEntry");
    let mut input = format!(
        "POST /twirp/github.actions.results.api.v1.CacheService/{call}\n\
         Authorization: Bearer @TOKEN@\nContent-Type: application/json\n\n"
    )
    .into_bytes();
    input.extend_from_slice(body);
    // Follow with an upload to the signed URL handed out, if any.
    input.extend_from_slice(b"\n~~~\nPUT @URL@\nx-ms-blob-type: BlockBlob\n\ncontent");
    app(&input);
}

/// `Authorization` values, against the server in `token` mode (registry, cache API and
/// dashboard), and the Basic parser directly.
pub fn authorization(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some((user, password)) = server::parse::basic(text)
    {
        // What parses prints back to credentials that parse the same.
        let again = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        if !user.contains(':') {
            assert_eq!(
                server::parse::basic(&format!("Basic {again}")),
                Some((user, password))
            );
        }
    }
    if HeaderValue::from_bytes(data).is_err() || data.contains(&b'\n') {
        return;
    }
    let mut input = Vec::from(&b"#"[..]);
    for target in [
        "GET /v2/",
        "GET /v2/fuzz/manifests/latest",
        "POST /v2/fuzz/blobs/uploads/",
        "POST /twirp/github.actions.results.api.v1.CacheService/GetCacheEntryDownloadURL",
        "GET /_apis/artifactcache/cache?keys=k&version=v",
        "GET /api/v1/sessions",
        "GET /token?scope=repository:fuzz:pull",
    ] {
        input.extend_from_slice(target.as_bytes());
        input.extend_from_slice(b"\nAuthorization: ");
        input.extend_from_slice(data);
        input.extend_from_slice(b"\n\n{}\n~~~\n");
    }
    app(&input);
}
