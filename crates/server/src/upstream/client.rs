//! A registry client for one upstream: the distribution API's reads and pushes, with
//! its token flow (a `401` challenge answered with a `Bearer` token from the realm, or
//! `Basic` credentials) and TLS with extra trusted roots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use futures::TryStreamExt;
use oci::Digest;
use reqwest::{Method, RequestBuilder, Response, Url};
use store::{ByteStream, Error, SourceFailure};

use super::Config;

/// Manifest media types asked for, most specific first.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";
/// A token without `expires_in` is good for this long (the token spec's default).
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);
/// Waiting for a connection, and (unless configured otherwise) for the next bytes of a
/// response.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The most of a token answer, or of a small JSON answer, read before it is refused.
pub(super) const MAX_ANSWER_BYTES: usize = 64 << 10;
/// The most of an error answer's body read for its message; the rest is not read.
const MAX_ERROR_DETAIL_BYTES: usize = 4 << 10;

/// What the upstream asked for in its last challenge.
#[derive(Debug, Clone)]
enum Challenge {
    /// Nothing yet (or it never asked).
    None,
    /// `Basic`: send the credentials on every request.
    Basic,
    /// `Bearer`: get a token from `realm` for `service`.
    Bearer { realm: String, service: String },
}

/// A manifest as the upstream sent it.
pub struct Fetched {
    /// Its `Content-Type`.
    pub media_type: Option<String>,
    /// Its bytes (verified against the digest asked for, if one was).
    pub body: Bytes,
    /// The digest of its bytes.
    pub digest: Digest,
    /// Cache records a central layercache says the manifest gives a build.
    pub records: Option<oci::CacheRecords>,
}

/// One upstream registry.
pub struct Client {
    base: Url,
    /// For requests without a body to stream: a read timeout between bytes.
    http: reqwest::Client,
    /// For blob pushes: progress is watched instead (see [`send_watched`]).
    upload: reqwest::Client,
    credentials: Option<(String, String)>,
    challenge: Mutex<Challenge>,
    /// Bearer tokens by scope, with when they expire.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    max_manifest_bytes: usize,
}

impl Client {
    /// A client for `config` (reading its password and extra CA now).
    pub fn new(config: &Config, max_manifest_bytes: usize) -> Result<Client, String> {
        let base = Url::parse(config.url.trim_end_matches('/'))
            .map_err(|e| format!("upstream {:?}: url {:?}: {e}", config.name, config.url))?;
        let http = http_builder(config)?.read_timeout(config.read_timeout.unwrap_or(READ_TIMEOUT));
        let upload = http_builder(config)?;
        let credentials = match &config.credentials {
            Some(c) => Some((c.username.clone(), c.password()?)),
            None => None,
        };
        Ok(Client {
            base,
            http: http.build().map_err(|e| e.to_string())?,
            upload: upload.build().map_err(|e| e.to_string())?,
            credentials,
            challenge: Mutex::new(Challenge::None),
            tokens: Mutex::default(),
            max_manifest_bytes,
        })
    }

    /// The upstream's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url, Error> {
        self.base
            .join(path)
            .map_err(|e| unavailable(format!("bad upstream path {path:?}: {e}")))
    }

    /// Send the request `build` makes, with the credentials the upstream asked for; a
    /// `401` is answered once (a new token, or credentials) and the request sent again.
    async fn send(
        &self,
        repo: &str,
        push: bool,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, Error> {
        let scope = format!(
            "repository:{repo}:{}",
            if push { "pull,push" } else { "pull" }
        );
        let mut retried = false;
        loop {
            let mut request = build(&self.http);
            request = self.authorize(request, &scope);
            let response = request.send().await.map_err(transport)?;
            if response.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(response);
            }
            retried = true;
            let challenge = parse_challenge(response.headers());
            let fresh = match &challenge {
                Challenge::Bearer { realm, service } => {
                    Some(self.fetch_token(realm, service, &scope).await?)
                }
                Challenge::Basic if self.credentials.is_some() => None,
                _ => return Ok(response),
            };
            *self.challenge.lock().unwrap_or_else(|p| p.into_inner()) = challenge;
            if let Some((token, expires)) = fresh {
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(scope.clone(), (token, expires));
            }
        }
    }

    fn authorize(&self, request: RequestBuilder, scope: &str) -> RequestBuilder {
        let challenge = self
            .challenge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match challenge {
            Challenge::None => request,
            Challenge::Basic => match &self.credentials {
                Some((user, password)) => request.basic_auth(user, Some(password)),
                None => request,
            },
            Challenge::Bearer { .. } => {
                let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
                match tokens.get(scope) {
                    Some((token, expires)) if *expires > Instant::now() => {
                        request.bearer_auth(token)
                    }
                    _ => request,
                }
            }
        }
    }

    /// A token for `scope` from `realm`, with when to stop using it.
    async fn fetch_token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<(String, Instant), Error> {
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let realm = Url::parse(realm)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https"))
            .ok_or_else(|| {
                unavailable(format!(
                    "the upstream's token realm {realm:?} is not an http(s) URL"
                ))
            })?;
        let mut request = self
            .http
            .get(realm.clone())
            .query(&[("service", service), ("scope", scope)]);
        match &self.credentials {
            Some((user, password)) if same_site(&self.base, &realm) => {
                request = request.basic_auth(user, Some(password));
            }
            Some(_) => {
                tracing::warn!(%realm, upstream = %self.base, "a token realm off the upstream's site: asked without credentials");
            }
            None => {}
        }
        let response = request.send().await.map_err(transport)?;
        let response = check(response, "token").await?;
        let body = read_limited(response, MAX_ANSWER_BYTES, "token answer")
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("the upstream's token answer: {e}")))?;
        let token = answer
            .token
            .or(answer.access_token)
            .ok_or_else(|| unavailable("the upstream's token answer holds no token".into()))?;
        // Renew a little early.
        let life = answer
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFE, Duration::from_secs)
            .saturating_sub(Duration::from_secs(5));
        Ok((token, Instant::now() + life))
    }

    /// The digest `reference` names now (a `HEAD`).
    pub async fn manifest_digest(&self, repo: &str, reference: &str) -> Result<Digest, Error> {
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let response = self
            .send(repo, false, |http| {
                http.head(url.clone()).header(header::ACCEPT, ACCEPT)
            })
            .await?;
        let response = check(response, "manifest").await?;
        match digest_header(response.headers()) {
            Some(digest) => Ok(digest),
            // Without the header, the bytes say.
            None => Ok(self.manifest(repo, reference, None).await?.digest),
        }
    }

    /// The manifest `reference` names; with `expected`, its bytes must hash to it.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<Fetched, Error> {
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let response = self
            .send(repo, false, |http| {
                http.get(url.clone()).header(header::ACCEPT, ACCEPT)
            })
            .await?;
        let response = check(response, "manifest").await?;
        let headers = response.headers().clone();
        let body = read_limited(response, self.max_manifest_bytes, "manifest").await?;
        let digest = match expected {
            Some(expected) => expected.clone(),
            None => digest_header(&headers).unwrap_or_else(|| Digest::sha256_of(&body)),
        };
        if !digest.matches(&body) {
            return Err(Error::Source {
                failure: SourceFailure::Corrupt,
                message: format!(
                    "the upstream's manifest {repo}:{reference} does not hash to {digest}"
                ),
            });
        }
        let records = headers
            .get(crate::registry::CACHE_RECORDS)
            .and_then(|v| v.to_str().ok())
            .and_then(oci::CacheRecords::parse);
        Ok(Fetched {
            media_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| oci::media_type::essence(v).to_owned()),
            body,
            digest,
            records,
        })
    }

    /// Size of blob `digest` in `repo`, when the upstream has it.
    pub async fn blob_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, Error> {
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"))?;
        let response = self
            .send(repo, false, |http| http.head(url.clone()))
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = check(response, "blob").await?;
        // The header, not `content_length()`: a HEAD's body is empty, its length 0.
        let size = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .ok_or_else(|| Error::Source {
                failure: SourceFailure::Corrupt,
                message: format!("the upstream's HEAD of blob {digest} gives no length"),
            })?;
        Ok(Some(size))
    }

    /// The bytes of blob `digest` in `repo`, and their length when the upstream says.
    pub async fn blob(&self, repo: &str, digest: &Digest) -> Result<store::Source, Error> {
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"))?;
        let response = self.send(repo, false, |http| http.get(url.clone())).await?;
        let response = check(response, "blob").await?;
        let size = response.content_length();
        let body = response.bytes_stream().map_err(std::io::Error::other);
        Ok(store::Source {
            size,
            body: Box::pin(body),
        })
    }

    /// Push blob `digest` of `size` bytes into `repo` (an upload session, then one `PUT`).
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), Error> {
        let start = self.url(&format!("v2/{repo}/blobs/uploads/"))?;
        let response = self
            .send(repo, true, |http| {
                http.post(start.clone()).header(header::CONTENT_LENGTH, 0)
            })
            .await?;
        let response = check(response, "upload").await?;
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unavailable("the upstream's upload has no Location".into()))?;
        let mut url = self
            .url(location)
            .map_err(|e| unavailable(format!("upload location: {e}")))?;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        // The session's token is fresh from the POST, and a stream cannot be sent twice.
        let request = self
            .upload
            .put(url)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size);
        let scope = format!("repository:{repo}:pull,push");
        let response = send_watched(self.authorize(request, &scope), body).await?;
        check(response, "upload").await.map(drop)
    }

    /// Store a manifest in `repo` under `reference`.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<(), Error> {
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let response = self
            .send(repo, true, |http| {
                http.request(Method::PUT, url.clone())
                    .header(header::CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        check(response, "manifest").await.map(drop)
    }

    /// Delete a tag, or a manifest by digest, in `repo`.
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<(), Error> {
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let response = self
            .send(repo, true, |http| http.delete(url.clone()))
            .await?;
        check(response, "manifest").await.map(drop)
    }
}

/// An HTTP client for `config`'s upstream: its connect timeout, user agent and trusted
/// roots (the public ones and its `ca_file`), without a read timeout.
pub(super) fn http_builder(config: &Config) -> Result<reqwest::ClientBuilder, String> {
    let mut http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("layercache/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("reading {}: {e}", ca.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: {e}", ca.display()))?
        {
            http = http.add_root_certificate(cert);
        }
    }
    Ok(http)
}

/// Send `request` with `body`, failing once the centre has taken no bytes of it (and
/// not answered) for [`READ_TIMEOUT`]: an upload may take longer than any fixed timeout.
pub(super) async fn send_watched(
    request: reqwest::RequestBuilder,
    body: ByteStream,
) -> Result<Response, Error> {
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let body = body.inspect_ok(move |chunk| {
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    });
    let send = request.body(reqwest::Body::wrap_stream(body)).send();
    tokio::pin!(send);
    let mut seen = 0;
    loop {
        tokio::select! {
            response = &mut send => return response.map_err(transport),
            () = tokio::time::sleep(READ_TIMEOUT) => {
                let now = sent.load(Ordering::Relaxed);
                if now == seen {
                    return Err(unavailable(format!(
                        "the upstream took no upload bytes for {READ_TIMEOUT:?}"
                    )));
                }
                seen = now;
            }
        }
    }
}

/// The response when it succeeded; otherwise the failure it reports.
pub(super) async fn check(response: Response, what: &str) -> Result<Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let text = read_prefix(response, MAX_ERROR_DETAIL_BYTES).await;
    let detail: String = String::from_utf8_lossy(&text).chars().take(300).collect();
    let failure = match status {
        StatusCode::NOT_FOUND => SourceFailure::NotFound,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => SourceFailure::Denied,
        StatusCode::TOO_MANY_REQUESTS => SourceFailure::RateLimited(retry_after),
        // A push the upstream refused (an unknown blob, an invalid manifest) is its say.
        s if s.is_client_error() => SourceFailure::Refused(s.as_u16()),
        _ => SourceFailure::Unavailable,
    };
    Err(Error::Source {
        failure,
        message: format!("upstream {what}: {status}: {}", detail.trim()),
    })
}

/// The body of `response` (its `what`), refused once it passes `limit` bytes.
pub(super) async fn read_limited(
    response: Response,
    limit: usize,
    what: &str,
) -> Result<Bytes, Error> {
    use futures::StreamExt;
    let too_large = || Error::Source {
        failure: SourceFailure::Corrupt,
        message: format!("the upstream's {what} exceeds {limit} bytes"),
    };
    // Refused unread when it says so itself.
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(transport)?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// The first `limit` bytes of `response`'s body at most (fewer if reading it fails); the
/// rest is left unread.
async fn read_prefix(response: Response, limit: usize) -> Vec<u8> {
    use futures::StreamExt;
    let mut prefix = Vec::new();
    let mut stream = response.bytes_stream();
    while prefix.len() < limit {
        match stream.next().await {
            Some(Ok(chunk)) => {
                let room = limit - prefix.len();
                prefix.extend_from_slice(chunk.get(..room).unwrap_or(&chunk));
            }
            _ => break,
        }
    }
    prefix
}

/// Whether `realm` may receive the credentials configured for `upstream`: the same host
/// (and port, when one is written), or (names, not addresses) a sibling under the
/// upstream's parent domain (`registry-1.docker.io` and `auth.docker.io`). The scheme
/// is not compared: a server behind a TLS-terminating proxy names its realm in `http`.
fn same_site(upstream: &Url, realm: &Url) -> bool {
    if upstream.host_str() == realm.host_str() && upstream.port() == realm.port() {
        return true;
    }
    let (Some(upstream), Some(realm)) = (upstream.domain(), realm.domain()) else {
        return false;
    };
    match upstream.split_once('.') {
        // The parent must itself be a name under a suffix (`docker.io`, not `io`).
        Some((_, parent)) if parent.contains('.') => {
            realm == parent || realm.ends_with(&format!(".{parent}"))
        }
        _ => false,
    }
}

fn digest_header(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The challenge a `401` carries (`Bearer realm="…",service="…"` or `Basic …`).
fn parse_challenge(headers: &HeaderMap) -> Challenge {
    let Some(value) = headers
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
    else {
        return Challenge::None;
    };
    let (scheme, params) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::None;
    }
    let mut realm = None;
    let mut service = String::new();
    for (key, value) in challenge_params(params) {
        match key.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "service" => service = value,
            _ => {}
        }
    }
    match realm {
        Some(realm) => Challenge::Bearer { realm, service },
        None => Challenge::None,
    }
}

/// `key="value"` (or bare `key=value`) pairs separated by commas.
fn challenge_params(params: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.find('"') {
                Some(end) => (
                    quoted.get(..end).unwrap_or(""),
                    quoted.get(end + 1..).unwrap_or(""),
                ),
                None => (quoted, ""),
            },
            None => match after.find(',') {
                Some(end) => (
                    after.get(..end).unwrap_or(""),
                    after.get(end..).unwrap_or(""),
                ),
                None => (after, ""),
            },
        };
        pairs.push((key, value.to_owned()));
        rest = next.trim_start().trim_start_matches(',');
    }
    pairs
}

pub(super) fn unavailable(message: String) -> Error {
    Error::Source {
        failure: SourceFailure::Unavailable,
        message,
    }
}

pub(super) fn transport(e: reqwest::Error) -> Error {
    unavailable(format!("upstream unreachable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:library/alpine:pull\""
                .parse()
                .unwrap(),
        );
        match parse_challenge(&headers) {
            Challenge::Bearer { realm, service } => {
                assert_eq!(realm, "https://auth.docker.io/token");
                assert_eq!(service, "registry.docker.io");
            }
            other => panic!("{other:?}"),
        }
        headers.insert(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"registry\"".parse().unwrap(),
        );
        assert!(matches!(parse_challenge(&headers), Challenge::Basic));
        let url = |u: &str| Url::parse(u).unwrap();
        let hub = url("https://registry-1.docker.io");
        assert!(same_site(&hub, &url("https://auth.docker.io/token")));
        assert!(same_site(&hub, &url("https://registry-1.docker.io/token")));
        assert!(same_site(
            &url("https://central"),
            &url("http://central/token")
        ));
        assert!(!same_site(
            &hub,
            &url("https://docker.io.evil.example/token")
        ));
        assert!(!same_site(
            &url("https://ghcr.io"),
            &url("https://evil.io/token")
        ));
        let local = url("http://127.0.0.1:5000");
        assert!(same_site(&local, &url("http://127.0.0.1:5000/token")));
        assert!(!same_site(&local, &url("http://127.0.0.1:5001/token")));
        assert_eq!(
            challenge_params("realm=x, service=\"a,b\""),
            vec![
                ("realm".into(), "x".into()),
                ("service".into(), "a,b".into())
            ]
        );
    }
}
