//! The OCI distribution API (v1.1, `/v2/` routes).
//!
//! One entry point, [`dispatch`], parses the request into an [`Endpoint`] and calls the
//! thin handler for it; every failure becomes OCI error JSON through [`RegistryError`].
//! Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md>.

mod blobs;
mod endpoint;
mod error;
mod manifests;
mod referrers;
mod tags;
mod uploads;

pub(crate) use uploads::chunk_start;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use oci::{CacheRecords, ErrorCode, Reference, RepoName};

pub use endpoint::Endpoint;
pub use error::RegistryError;
pub use manifests::CACHE_RECORDS;

use crate::app::AppState;
use crate::audit::{Event, Who};
use crate::auth::Identity;
use crate::metrics::Route;
use crate::sessions::{Client, Outcome};
use crate::upstream::Served;

/// `Result` of a registry handler.
type Result<T = Response, E = RegistryError> = std::result::Result<T, E>;

/// Query parameters the distribution API uses (others, such as `_state`, are ignored);
/// one given twice takes its first value, as distribution does.
#[derive(Debug, Default)]
struct Params {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
    n: Option<String>,
    last: Option<String>,
    artifact_type: Option<String>,
}

impl Params {
    fn parse(query: Option<&str>) -> Result<Params> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| {
                RegistryError::new(ErrorCode::Unsupported, format!("malformed query: {e}"))
                    .with_status(StatusCode::BAD_REQUEST)
            })?;
        let first = |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        Ok(Params {
            digest: first("digest"),
            mount: first("mount"),
            from: first("from"),
            n: first("n"),
            last: first("last"),
            artifact_type: first("artifactType"),
        })
    }
}

/// Serve any `/v2/...` request, and record it in its build session.
pub async fn dispatch(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = crate::body::drain_on_drop(body);
    let addr = crate::sessions::remote_addr(&parts.extensions);
    let mut client = Client::of(&parts.headers, addr);
    let authority = &state.authority;
    let mut identity = None;
    let parsed =
        if !authority.enforced() && state.sessions.wants_credentials(&client, &parts.headers) {
            Err(ask_credentials())
        } else {
            match Endpoint::parse(&parts.method, parts.uri.path()) {
                Ok(endpoint) => match authority.authorize(&endpoint, &parts).await {
                    Ok(found) => {
                        identity = found;
                        Ok(endpoint)
                    }
                    Err(e) => {
                        audit_refusal(&state, &endpoint, &parts, &e);
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            }
        };
    let admitted = parsed.and_then(|endpoint| {
        let key = match &identity {
            Some(identity) => identity.limit_key(addr),
            None => addr.map(|a| a.to_string()).unwrap_or_default(),
        };
        state.limiter.admit(&key)?;
        // An upload is a request that carries blob bytes.
        let slot = match endpoint {
            Endpoint::StartUpload(..) | Endpoint::AppendUpload(..) | Endpoint::FinishUpload(..)
                if has_body(&body) =>
            {
                state.limiter.upload(&key)?
            }
            _ => None,
        };
        // The credential names the build: no need to ask for a name.
        if let Some(session) = identity.as_ref().and_then(|i| i.session.clone()) {
            client.name = Some(session);
        }
        Ok((endpoint, slot))
    });
    let mut response = match admitted {
        Ok((endpoint, _upload)) => {
            let span = tracing::Span::current();
            span.record("endpoint", endpoint.name());
            let result = handle(&state, endpoint.clone(), &parts, body, identity.as_deref()).await;
            let failure = result
                .as_ref()
                .err()
                .map(|e| format!("{}: {}", e.code().as_str(), e.message()));
            let response = result.unwrap_or_else(IntoResponse::into_response);
            if let Some(mut event) = audited(&endpoint, &parts, &response) {
                event.reason = failure;
                let who = Who::of(
                    identity.as_deref(),
                    crate::sessions::remote_addr(&parts.extensions),
                );
                let (method, path) = (&parts.method, parts.uri.path());
                state
                    .audit
                    .record(&who, method, path, response.status(), event);
            }
            if let Some((repo, outcome)) = outcome(&endpoint, &response)
                && !client.is_layercache()
            {
                state.metrics.outcome(&outcome);
                let session = state.sessions.record(&client, repo.as_str(), outcome);
                span.record("session", session.as_str());
            }
            let mut response = response;
            response.extensions_mut().insert(Route(endpoint.name()));
            response
        }
        Err(e) => e.into_response(),
    };
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    response
}

/// Audit a request `authorize` refused: `DENIED`, or credentials that failed (the
/// challenge to a request without credentials is how every client starts: not audited).
fn audit_refusal(state: &AppState, endpoint: &Endpoint, parts: &Parts, refusal: &RegistryError) {
    let denied = refusal.status() == StatusCode::FORBIDDEN;
    let presented = parts
        .headers
        .contains_key(axum::http::header::AUTHORIZATION);
    if !denied && !presented {
        return;
    }
    // A valid bearer token not issued for this repository: the client asks for one that
    // is (the token flow), which is no refusal of its identity.
    if refusal.status() == StatusCode::UNAUTHORIZED
        && state.authority.identity_of(&parts.headers).is_some()
    {
        return;
    }
    let identity = if denied {
        state.authority.identity_of(&parts.headers)
    } else {
        None
    };
    let who = Who::of(
        identity.as_deref(),
        crate::sessions::remote_addr(&parts.extensions),
    );
    let repository = endpoint.repo().map(ToString::to_string);
    let mut event = Event::denied(repository, refusal.message());
    event.digest = match endpoint {
        Endpoint::DeleteBlob(_, d) => Some(d.to_string()),
        Endpoint::PutManifest(_, Reference::Digest(d))
        | Endpoint::DeleteManifest(_, Reference::Digest(d)) => Some(d.to_string()),
        _ => None,
    };
    event.reference = match endpoint {
        Endpoint::PutManifest(_, Reference::Tag(t))
        | Endpoint::DeleteManifest(_, Reference::Tag(t)) => Some(t.to_string()),
        _ => None,
    };
    let (method, path) = (&parts.method, parts.uri.path());
    state
        .audit
        .record(&who, method, path, refusal.status(), event);
}

/// What the audit log says of a request to `endpoint` answered with `response`: a write
/// that completed or failed (not the opening of an upload session, nor a chunk), or a
/// delete; `None` for reads.
fn audited(endpoint: &Endpoint, parts: &Parts, response: &Response) -> Option<Event> {
    let status = response.status();
    let answered = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let params = Params::parse(parts.uri.query()).unwrap_or_default();
    let event = |action, repo: &RepoName| Event {
        action,
        repository: Some(repo.to_string()),
        ..Event::default()
    };
    Some(match endpoint {
        Endpoint::PutManifest(repo, reference) => match reference {
            Reference::Tag(tag) => Event {
                reference: Some(tag.to_string()),
                digest: answered,
                ..event("tag", repo)
            },
            Reference::Digest(digest) => Event {
                digest: Some(digest.to_string()),
                ..event("push", repo)
            },
        },
        Endpoint::DeleteManifest(repo, reference) => match reference {
            Reference::Tag(tag) => Event {
                reference: Some(tag.to_string()),
                ..event("delete", repo)
            },
            Reference::Digest(digest) => Event {
                digest: Some(digest.to_string()),
                ..event("delete", repo)
            },
        },
        Endpoint::DeleteBlob(repo, digest) => Event {
            digest: Some(digest.to_string()),
            ..event("delete", repo)
        },
        // A mount that fell back to an upload session (202) wrote nothing yet.
        Endpoint::StartUpload(repo) if params.mount.is_some() => {
            if status == StatusCode::ACCEPTED {
                return None;
            }
            Event {
                digest: params.mount,
                detail: params.from.map(|from| serde_json::json!({ "from": from })),
                ..event("mount", repo)
            }
        }
        Endpoint::StartUpload(repo) if params.digest.is_some() => Event {
            digest: params.digest,
            ..event("push", repo)
        },
        Endpoint::FinishUpload(repo, _) => Event {
            digest: params.digest,
            ..event("push", repo)
        },
        _ => return None,
    })
}

/// The challenge that makes clients send their (any) credentials, naming the session.
fn ask_credentials() -> RegistryError {
    RegistryError::new(
        ErrorCode::Unauthorized,
        "log in with any password: the user name names the build session",
    )
    .with_header(
        axum::http::header::WWW_AUTHENTICATE,
        "Basic realm=\"layercache\"".to_owned(),
    )
}

/// Answer a path outside the API.
pub async fn not_found() -> Response {
    RegistryError::route_not_found().into_response()
}

async fn handle(
    state: &AppState,
    endpoint: Endpoint,
    parts: &Parts,
    body: Body,
    identity: Option<&Identity>,
) -> Result {
    let params = Params::parse(parts.uri.query())?;
    let headers = &parts.headers;
    refuse_read_only(state, &endpoint).await?;
    match endpoint {
        Endpoint::Base => Ok(axum::Json(serde_json::json!({})).into_response()),
        Endpoint::Catalog => tags::catalog(state, &params).await,
        Endpoint::ListTags(repo) => tags::list_tags(state, &repo, &params).await,
        Endpoint::GetManifest(repo, r) => {
            manifests::get_manifest(state, &repo, &r, headers, true).await
        }
        Endpoint::HeadManifest(repo, r) => {
            manifests::get_manifest(state, &repo, &r, headers, false).await
        }
        Endpoint::PutManifest(repo, r) => {
            manifests::put_manifest(state, &repo, &r, headers, body).await
        }
        Endpoint::DeleteManifest(repo, r) => manifests::delete_manifest(state, &repo, &r).await,
        Endpoint::GetBlob(repo, d) => blobs::get_blob(state, &repo, &d, parts).await,
        Endpoint::HeadBlob(repo, d) => blobs::head_blob(state, &repo, &d).await,
        Endpoint::DeleteBlob(repo, d) => blobs::delete_blob(state, &repo, &d).await,
        Endpoint::StartUpload(repo) => {
            let readable = |from: Option<&RepoName>| {
                state
                    .authority
                    .may_pull(identity, from.map(RepoName::as_str))
            };
            uploads::start_upload(state, &repo, &params, body, readable).await
        }
        Endpoint::GetUpload(repo, id) => uploads::get_upload(state, &repo, &id).await,
        Endpoint::AppendUpload(repo, id) => {
            uploads::append_upload(state, &repo, &id, headers, body).await
        }
        Endpoint::FinishUpload(repo, id) => {
            uploads::finish_upload(state, &repo, &id, &params, headers, body).await
        }
        Endpoint::CancelUpload(repo, id) => uploads::cancel_upload(state, &repo, &id).await,
        Endpoint::ListReferrers(repo, d) => {
            referrers::list_referrers(state, &repo, &d, &params).await
        }
    }
}

/// Refuse a push into a repository that mirrors a public registry (an edge's centre
/// takes pushes; a mirror is read-only).
async fn refuse_read_only(state: &AppState, endpoint: &Endpoint) -> Result<()> {
    let repo = match endpoint {
        Endpoint::PutManifest(repo, _)
        | Endpoint::StartUpload(repo)
        | Endpoint::AppendUpload(repo, _)
        | Endpoint::FinishUpload(repo, _) => repo,
        _ => return Ok(()),
    };
    match state.upstreams.route(&state.store, repo, true).await? {
        Some(route) if !route.upstream.takes_pushes() => Err(RegistryError::new(
            ErrorCode::Unsupported,
            format!(
                "{repo} mirrors the upstream {:?}, which is read-only here",
                route.upstream.name
            ),
        )),
        _ => Ok(()),
    }
}

/// What a request to `endpoint` that got `response` did, for its build session: the
/// repository and the outcome (`None` outside any repository).
fn outcome<'a>(endpoint: &'a Endpoint, response: &Response) -> Option<(&'a RepoName, Outcome)> {
    let status = response.status();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
    let length = header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let failed = status.is_client_error() || status.is_server_error();
    let reference = |repo: &RepoName, r: &Reference| match r {
        Reference::Tag(tag) => format!("{repo}:{tag}"),
        Reference::Digest(digest) => format!("{repo}@{digest}"),
    };
    let found = status == StatusCode::OK;
    let missing = status == StatusCode::NOT_FOUND;
    let filled = response.extensions().get::<Served>() == Some(&Served::Filled);
    Some(match endpoint {
        Endpoint::Base | Endpoint::Catalog => return None,
        Endpoint::GetManifest(repo, r) | Endpoint::HeadManifest(repo, r) if found || missing => {
            let by_tag = matches!(r, Reference::Tag(_));
            let head = matches!(endpoint, Endpoint::HeadManifest(..));
            let reference = reference(repo, r);
            let records = header(manifests::CACHE_RECORDS.as_str()).and_then(CacheRecords::parse);
            (
                repo,
                Outcome::ManifestLookup {
                    reference,
                    by_tag,
                    head,
                    found,
                    records,
                    filled,
                },
            )
        }
        Endpoint::PutManifest(repo, r) if status == StatusCode::CREATED => {
            let tag = matches!(r, Reference::Tag(_)).then(|| reference(repo, r));
            (repo, Outcome::ManifestWritten { tag })
        }
        Endpoint::HeadBlob(repo, d) if found || missing => {
            let size = found.then_some(length);
            let digest = d.to_string();
            (repo, Outcome::BlobChecked { digest, size })
        }
        Endpoint::GetBlob(repo, d) if status.is_success() => {
            let (digest, bytes) = (d.to_string(), length);
            (
                repo,
                Outcome::BlobServed {
                    digest,
                    bytes,
                    filled,
                },
            )
        }
        Endpoint::GetBlob(repo, d) if missing => (
            repo,
            Outcome::BlobMissing {
                digest: d.to_string(),
            },
        ),
        Endpoint::StartUpload(repo) | Endpoint::FinishUpload(repo, _)
            if status == StatusCode::CREATED =>
        {
            let digest = header("docker-content-digest").unwrap_or("").to_owned();
            let outcome = match response.extensions().get::<uploads::Stored>() {
                Some(uploads::Stored::Mounted(bytes)) => Outcome::BlobMounted {
                    digest,
                    bytes: *bytes,
                },
                Some(uploads::Stored::Uploaded(bytes)) => Outcome::BlobWritten {
                    digest,
                    bytes: *bytes,
                },
                None => Outcome::Other,
            };
            (repo, outcome)
        }
        other => {
            let repo = other.repo()?;
            (
                repo,
                if failed {
                    Outcome::Failed
                } else {
                    Outcome::Other
                },
            )
        }
    })
}

/// Whether the request carries a body (a `Content-Length` above zero, or chunked).
fn has_body(body: &Body) -> bool {
    use axum::body::HttpBody;
    !body.is_end_stream() && body.size_hint().exact() != Some(0)
}

/// A request body's length, when it is known before reading it (0 for none).
fn body_len(body: &Body) -> Option<u64> {
    use axum::body::HttpBody;
    if has_body(body) {
        body.size_hint().exact()
    } else {
        Some(0)
    }
}
