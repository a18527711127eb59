//! The GitHub Actions cache service, on the same store as the registry: the legacy v1
//! REST API (`/_apis/artifactcache/`), the current v2 twirp service
//! (`/twirp/github.actions.results.api.v1.CacheService/`), and the signed URLs their
//! clients upload to and download from (the Azure Blob calls those clients make).
//!
//! GitHub's semantics: a runtime token names the scopes (git refs) it may read, in
//! lookup order, and the one it writes; a restore matches the exact key, then the key as
//! a prefix, then each restore key as a prefix, newest first, in each readable scope in
//! turn; the version must match exactly; entries are immutable, so a second create of a
//! key and version is refused (BuildKit's index lock relies on it).
//!
//! On an edge (a server with a central layercache, `serve --upstream`), a restore this
//! server cannot answer with the primary key's entry in the first readable scope is
//! asked of the centre, and what the centre has is filled into this server's store
//! first; a save is passed through to the centre before it is acknowledged. Both carry
//! the client's own runtime token, so edge and centre must trust the same tokens (a
//! shared `[actions] key_file`, or the same CI issuer). See [`crate::upstream::EntryAsk`].

mod blob;
mod error;
pub mod token;
mod twirp;
mod v1;

pub(crate) use blob::block_list;
pub(crate) use v1::content_range;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::any;
use bytesize::ByteSize;
use store::{Entry, EntryQuery, NewEntry};

pub use error::ActionsError;
pub use token::{Grant, Issuer, IssuerError, TokenRequest, UrlUse, Verifier};

use crate::app::AppState;
use crate::audit::{Event, Who};
use crate::auth::oidc::Oidc;
use crate::sessions::{ACTIONS_AREA, Client, Outcome};
use crate::upstream::EntryAsk;

/// Most keys a restore may name (the primary key and its restore keys).
const MAX_KEYS: usize = 10;
/// Longest key or version, in characters.
const MAX_KEY_CHARS: usize = 512;
/// The response header naming the scope a restore's match was found in (the v2 answer
/// does not carry it; an edge stores what it fills from its centre in that scope).
pub(crate) const SCOPE_HEADER: &str = "layercache-cache-scope";

/// The cache-service section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The key that signs runtime tokens and URLs [default: `actions.key` in the data
    /// directory, created on first use].
    pub key_file: Option<PathBuf>,
    /// How long a signed upload or download URL stays valid.
    #[serde(with = "humantime_serde")]
    pub url_ttl: Duration,
    /// Largest entry accepted.
    pub max_entry_size: ByteSize,
    /// The URL clients reach this server at, for the signed URLs it hands out
    /// [default: `http://` and the request's `Host`].
    pub public_url: Option<String>,
    /// Also trust runtime tokens signed by this issuer.
    pub issuer: Option<Issuer>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            key_file: None,
            url_ttl: Duration::from_secs(3600),
            max_entry_size: ByteSize::gib(10),
            public_url: None,
            issuer: None,
        }
    }
}

impl Config {
    /// Where the signing key is, for a server on `data_dir`.
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("actions.key"))
    }
}

/// The cache service's state: its settings and the token verifier.
pub struct Actions {
    config: Config,
    verifier: Verifier,
}

impl Actions {
    /// Load (or create) the signing key and the external issuer's keys; CI identity
    /// tokens get the scopes `oidc`'s rules grant.
    pub async fn open(
        config: Config,
        data_dir: &Path,
        oidc: Arc<Oidc>,
    ) -> Result<Actions, IssuerError> {
        let path = config.key_path(data_dir);
        let key = token::load_or_create_key(&path)
            .map_err(|e| IssuerError::new(format!("signing key {}: {e}", path.display())))?;
        let verifier = Verifier::new(&key, config.issuer.clone(), oidc).await?;
        Ok(Actions { config, verifier })
    }

    fn max_entry_size(&self) -> u64 {
        self.config.max_entry_size.as_u64()
    }

    /// The base of the signed URLs handed to a client that sent `headers`: the
    /// configured `public_url`, else the `Host` it addressed, once checked to be only a
    /// host and port.
    fn base_url(&self, request: &Parts) -> Result<String, ActionsError> {
        if let Some(url) = &self.config.public_url {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        if !request.headers.contains_key(axum::http::header::HOST) {
            return Ok(crate::loopback_base(request));
        }
        crate::addressed_base(request)
            .ok_or_else(|| ActionsError::Invalid("the Host header is not a host and port".into()))
    }

    /// A signed URL for `use_` of `entry`.
    fn signed_url(
        &self,
        request: &Parts,
        use_: UrlUse,
        entry: i64,
        session: Option<&str>,
    ) -> Result<String, ActionsError> {
        let signature = self
            .verifier
            .sign_url(use_, entry, self.config.url_ttl, session);
        Ok(format!(
            "{}{}?sig={signature}",
            self.base_url(request)?,
            blob::path(entry)
        ))
    }
}

/// The whole cache service.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/_apis/artifactcache/{*path}", any(v1::dispatch))
        .route(
            "/twirp/github.actions.results.api.v1.CacheService/{method}",
            any(twirp::dispatch),
        )
        .route(blob::ROUTE, any(blob::dispatch))
}

/// One request's caller: its grant, and where it came from.
struct Caller {
    grant: Grant,
    addr: Option<IpAddr>,
    /// Its `Authorization` header, forwarded to an edge's centre.
    authorization: Option<HeaderValue>,
}

impl Caller {
    /// The caller of a request, from its bearer token.
    async fn of(state: &AppState, parts: &Parts) -> Result<Caller, ActionsError> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION);
        let grant = state
            .actions
            .verifier
            .verify(header.and_then(|v| v.to_str().ok()))
            .await?;
        state.limiter.admit(&format!(
            "actions/{}/{}",
            grant.repository,
            grant
                .write
                .as_deref()
                .or(grant.session.as_deref())
                .unwrap_or_default()
        ))?;
        Ok(Caller {
            grant,
            addr: crate::sessions::remote_addr(&parts.extensions),
            authorization: header.cloned(),
        })
    }

    /// Who this caller is, for the audit log: the session its token names (else
    /// `token`), and its grant.
    fn who(&self) -> Who {
        let grant = &self.grant;
        Who {
            identity: Some(grant.session.clone().unwrap_or_else(|| "token".to_owned())),
            grounds: serde_json::json!({
                "repository": grant.repository,
                "read": grant.read,
                "write": grant.write,
                "session": grant.session,
            }),
            client: self.addr,
        }
    }

    /// An audit event of this caller on `entry`.
    fn event(&self, action: &'static str, entry: &Entry, size: Option<u64>) -> Event {
        Event {
            action,
            repository: Some(entry.repository.clone()),
            reference: Some(entry.key.clone()),
            detail: Some(serde_json::json!({
                "scope": entry.scope,
                "version": entry.version,
                "entry": entry.id,
                "size": size,
            })),
            ..Event::default()
        }
    }

    /// The response to this caller's request: `result`, in the protocol's form
    /// (`wire`); what it wrote (the [`Event`] its handler attached) or a denial of its
    /// token's scopes goes to the audit log.
    fn answer(
        &self,
        state: &AppState,
        parts: &Parts,
        result: Result<Response, ActionsError>,
        wire: fn(ActionsError) -> Response,
    ) -> Response {
        let (mut response, event) = match result {
            Ok(response) => (response, None),
            Err(e) => {
                let denial = matches!(
                    e,
                    ActionsError::WriteDenied(_) | ActionsError::ReadDenied(_)
                )
                .then(|| Event::denied(Some(self.grant.repository.clone()), e.to_string()));
                (wire(e), denial)
            }
        };
        if let Some(event) = event.or_else(|| response.extensions_mut().remove::<Event>()) {
            state.audit.record(
                &self.who(),
                &parts.method,
                parts.uri.path(),
                response.status(),
                event,
            );
        }
        response
    }

    fn write_scope(&self) -> Result<&str, ActionsError> {
        self.grant
            .write
            .as_deref()
            .ok_or_else(|| ActionsError::WriteDenied("token has no writable scopes".into()))
    }

    /// The entry key `key` and `version` name in this caller's write scope.
    fn entry_key(&self, key: &str, version: &str) -> Result<NewEntry, ActionsError> {
        check_key(key)?;
        check_version(version)?;
        Ok(NewEntry {
            repository: self.grant.repository.clone(),
            scope: self.write_scope()?.to_owned(),
            key: key.to_owned(),
            version: version.to_owned(),
        })
    }

    /// Record `outcome` in this caller's build session.
    fn record(&self, state: &AppState, scope: &str, outcome: Outcome) {
        record(
            state,
            self.addr,
            self.grant.session.as_deref(),
            scope,
            outcome,
        );
    }

    /// What a restore of `keys` (primary first) at `version` gets; recorded as a hit or
    /// a miss.
    async fn restore(
        &self,
        state: &AppState,
        keys: Vec<String>,
        version: String,
    ) -> Result<Option<Entry>, ActionsError> {
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(ActionsError::Invalid(format!(
                "a restore names 1 to {MAX_KEYS} keys, not {}",
                keys.len()
            )));
        }
        keys.iter().try_for_each(|k| check_key(k))?;
        check_version(&version)?;
        if self.grant.read.is_empty() {
            return Err(ActionsError::ReadDenied(
                "token has no readable scopes".into(),
            ));
        }
        let primary = keys.first().cloned().unwrap_or_default();
        let local = state
            .store
            .find_entry(EntryQuery {
                repository: self.grant.repository.clone(),
                scopes: self.grant.read.clone(),
                keys: keys.clone(),
                version: version.clone(),
            })
            .await?;
        let found = self.ask_centre(state, &keys, &version, local).await;
        let scope = found
            .as_ref()
            .map(|e| e.scope.clone())
            .or_else(|| self.grant.read.first().cloned())
            .unwrap_or_default();
        self.record(
            state,
            &scope,
            Outcome::EntryLookup {
                key: primary,
                found: found.is_some(),
            },
        );
        Ok(found)
    }

    /// On an edge, what the centre matches for `keys` at `version`, filled into this
    /// server's store, unless `local` holds the primary key in the first readable scope
    /// (the centre's answer too: entries are immutable). A local match of a later scope
    /// or a restore key could hide the centre's better one, so the centre is asked; when
    /// it has nothing or cannot answer (a warning, counted), `local` stands.
    async fn ask_centre(
        &self,
        state: &AppState,
        keys: &[String],
        version: &str,
        local: Option<Entry>,
    ) -> Option<Entry> {
        let upstreams = &state.upstreams;
        let Some(authorization) = self.authorization.as_ref() else {
            return local;
        };
        if !upstreams.passes_entries() {
            return local;
        }
        let settled = local.as_ref().is_some_and(|e| {
            keys.first() == Some(&e.key) && self.grant.read.first() == Some(&e.scope)
        });
        if !settled {
            let ask = EntryAsk {
                authorization,
                repository: &self.grant.repository,
                readable: &self.grant.read,
                keys,
                version,
                limit: state.actions.max_entry_size(),
            };
            match upstreams.restore_entry(&state.store, ask).await {
                Ok(Some(entry)) => return Some(entry),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the central cache could not answer a restore");
                }
            }
        }
        if local.is_some() {
            upstreams.entry_hit();
        }
        local
    }

    /// Reserve an entry in the write scope.
    async fn create(
        &self,
        state: &AppState,
        key: &str,
        version: &str,
    ) -> Result<Entry, ActionsError> {
        let new = self.entry_key(key, version)?;
        Ok(state.store.create_entry(new).await?)
    }

    /// An entry of this caller's write scope, by id.
    async fn own_entry(&self, state: &AppState, id: i64) -> Result<Entry, ActionsError> {
        let entry = state.store.entry(id).await?;
        if entry.repository != self.grant.repository
            || Some(entry.scope.as_str()) != self.grant.write.as_deref()
        {
            return Err(ActionsError::WriteDenied(
                "the entry belongs to another scope".into(),
            ));
        }
        Ok(entry)
    }

    /// Finish an entry of `size` bytes; recorded as a write. On an edge, it is then
    /// passed through to the centre, and a failure there is the answer (the entry stays
    /// here); a client's retry of that finish passes it through again.
    async fn finish(
        &self,
        state: &AppState,
        entry: &Entry,
        size: u64,
    ) -> Result<Entry, ActionsError> {
        let edge = state.upstreams.passes_entries();
        let finished = match state.store.finish_entry(entry.id, size).await {
            Ok(finished) => {
                self.record(
                    state,
                    &entry.scope,
                    Outcome::EntryWritten {
                        key: entry.key.clone(),
                        bytes: size,
                    },
                );
                finished
            }
            // A retried finish (its first answer was lost) of the same size succeeds again.
            Err(store::Error::EntryFinished) if entry.size == Some(size) => entry.clone(),
            Err(e) => return Err(e.into()),
        };
        if let (true, Some(authorization)) = (edge, &self.authorization) {
            state
                .upstreams
                .save_entry(&state.store, authorization, &finished)
                .await
                .inspect_err(|e| {
                    tracing::warn!(key = %finished.key, error = %e, "passing a save to the central cache failed");
                })
                .map_err(ActionsError::passing)?;
        }
        Ok(finished)
    }
}

/// `error` answered in the protocol's form (`wire`); a runtime token or signed URL it
/// refused (before any grant is known) goes to the audit log.
fn refuse(
    state: &AppState,
    parts: &Parts,
    error: ActionsError,
    wire: fn(ActionsError) -> Response,
) -> Response {
    // Like the registry's first, credential-less attempt, a request that presented
    // nothing (no token, no signature) is answered but not recorded.
    let presented = parts.headers.contains_key(header::AUTHORIZATION)
        || parts.uri.query().is_some_and(|q| q.contains("sig="));
    let refusal = match &error {
        ActionsError::Unauthenticated(reason) | ActionsError::UrlDenied(reason) if presented => {
            Some(reason.clone())
        }
        _ => None,
    };
    let response = wire(error);
    if let Some(reason) = refusal {
        let who = Who {
            client: crate::sessions::remote_addr(&parts.extensions),
            ..Who::default()
        };
        state.audit.record(
            &who,
            &parts.method,
            parts.uri.path(),
            response.status(),
            Event::denied(None, reason),
        );
    }
    response
}

/// Record `outcome` of a cache request from `addr` in its build session: the one the
/// token (or URL) names, else the implicit session of the address and scope.
fn record(
    state: &AppState,
    addr: Option<IpAddr>,
    session: Option<&str>,
    scope: &str,
    outcome: Outcome,
) {
    let client = Client {
        name: session.map(str::to_owned),
        addr,
        user_agent: "actions-cache".into(),
        host: None,
    };
    state.metrics.outcome(&outcome);
    let id = state
        .sessions
        .record(&client, &format!("{ACTIONS_AREA}{scope}"), outcome);
    tracing::Span::current().record("session", id.as_str());
}

/// The [`SCOPE_HEADER`] of a restore that matched `entry` (none for a scope that cannot
/// be a header value).
fn scope_header(entry: &Entry) -> Option<(axum::http::HeaderName, HeaderValue)> {
    let value = HeaderValue::from_bytes(entry.scope.as_bytes()).ok()?;
    Some((axum::http::HeaderName::from_static(SCOPE_HEADER), value))
}

/// The entry an id in a path names (an id that does not parse names none).
fn entry_id(id: &str) -> Result<i64, ActionsError> {
    id.parse()
        .map_err(|_| store::Error::NotFound(store::error::Missing::Entry).into())
}

/// A key is 1 to 512 characters, without commas (the v1 API joins keys with them) or
/// control characters.
fn check_key(key: &str) -> Result<(), ActionsError> {
    let chars = key.chars().count();
    if chars == 0 || chars > MAX_KEY_CHARS {
        return Err(ActionsError::Invalid(format!(
            "a key has 1 to {MAX_KEY_CHARS} characters, not {chars}"
        )));
    }
    if key.contains(',') || key.chars().any(char::is_control) {
        return Err(ActionsError::Invalid(format!(
            "key {key:?} holds a comma or a control character"
        )));
    }
    Ok(())
}

fn check_version(version: &str) -> Result<(), ActionsError> {
    let chars = version.chars().count();
    if chars == 0 || chars > MAX_KEY_CHARS || version.chars().any(char::is_control) {
        return Err(ActionsError::Invalid(format!(
            "a version has 1 to {MAX_KEY_CHARS} printable characters"
        )));
    }
    Ok(())
}

/// RFC 3339 text of a time in milliseconds since the epoch.
fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}
