//! Who may pull, push and delete which repositories: the registry token flow.
//!
//! In `token` mode every `/v2/` request needs an identity with the right: a bearer
//! token from [`token`] (the `realm` of the `401` challenge), or `Basic` credentials
//! sent straight to `/v2/`. The password is one of: a credential minted by
//! `layercache token` (signed with the server's key, the one the Actions cache tokens
//! use), a static user's password ([`users`]), or a CI job's identity token
//! ([`oidc`]). Rights are repository globs per action. A request its identity may not
//! make is `DENIED` (403); one without credentials gets the challenge (401).

pub mod oidc;
pub mod users;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use oci::{Digest, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::actions::token::{ISSUER, unix_now};
use crate::app::AppState;
use crate::audit::{Event, Who};
use crate::registry::{Endpoint, RegistryError};
/// The `aud` of the bearer tokens the token endpoint issues, so that one is never
/// taken for a credential, a runtime token or a signed URL.
const BEARER_AUDIENCE: &str = "layercache-registry";
/// Seconds of clock difference allowed on `exp` and `nbf`.
const LEEWAY: u64 = 5;

/// Whether requests need an identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Anyone who reaches the port may do anything.
    #[default]
    Open,
    /// Every request needs an identity with the right (anonymous ones see `anonymous`).
    Token,
}

/// What a request without credentials may do in `token` mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Nothing.
    #[default]
    None,
    /// Pull any repository.
    Pull,
}

/// The `[server.auth]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `open` or `token`; unset is `open`, which a listen address other than loopback
    /// refuses (say `open` to mean it).
    pub mode: Option<Mode>,
    /// What requests without credentials may do in `token` mode.
    pub anonymous: Anonymous,
    /// How long a bearer token from the token endpoint is valid (default 5 minutes).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<Duration>,
    /// Static users and their rights.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<users::User>,
    /// Issuers of CI identity tokens accepted as passwords (and as Actions cache
    /// tokens).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<crate::actions::Issuer>,
    /// What CI identity tokens may do, by their claims.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<oidc::Rule>,
}

impl Config {
    /// Why the server must not start with this configuration on `listen`, in the two
    /// lines that fix it.
    pub fn refusal(&self, listen: SocketAddr) -> Option<String> {
        // Users, issuers or rules without a mode would be configured and unused: the
        // server would run open, on loopback too.
        let half_set = !self.users.is_empty() || !self.issuers.is_empty() || !self.rules.is_empty();
        if self.mode.is_none() && half_set {
            return Some(
                "[server.auth] lists users, issuers or rules but no mode: say mode = \"token\" to \
                 require them (or mode = \"open\" to serve without)"
                    .to_owned(),
            );
        }
        (self.mode.is_none() && !listen.ip().is_loopback()).then(|| {
            format!(
                "refusing to serve {listen} to the network without authentication:\n  \
                 configure it: [server.auth] mode = \"token\" (credentials from `layercache \
                 token --pull … --push …`)\n  or say it is meant: [server.auth] mode = \
                 \"open\", or `serve --open`"
            )
        })
    }

    fn ttl(&self) -> Duration {
        self.token_ttl.unwrap_or(Duration::from_secs(300))
    }
}

/// Repository globs per action, as a credential carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryScopes {
    /// Repositories it may pull (`cache/org/app/**`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pull: Vec<String>,
    /// Repositories it may push to (and pull).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<String>,
    /// Repositories it may delete in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
    /// It may read layercache's own API (sessions, usage), `/metrics` and `/ui`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub view: bool,
    /// It may also run eviction passes through the API (`POST /api/v1/gc`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

impl RegistryScopes {
    /// Whether it grants nothing.
    pub fn is_empty(&self) -> bool {
        self.pull.is_empty()
            && self.push.is_empty()
            && self.delete.is_empty()
            && !self.view
            && !self.admin
    }

    /// Refuse a glob that does not compile.
    pub fn check(&self) -> Result<(), String> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<Rights, String> {
        let set = |globs: &[String]| {
            let mut set = GlobSetBuilder::new();
            for glob in globs {
                let glob = GlobBuilder::new(glob)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| format!("repository glob {glob:?}: {e}"))?;
                set.add(glob);
            }
            set.build().map_err(|e| e.to_string())
        };
        let pullable: Vec<String> = self.pull.iter().chain(&self.push).cloned().collect();
        Ok(Rights {
            catalog: pullable.iter().any(|g| g == "**"),
            pull: set(&pullable)?,
            push: set(&self.push)?,
            delete: set(&self.delete)?,
        })
    }
}

/// Compiled [`RegistryScopes`].
#[derive(Debug, Default)]
struct Rights {
    pull: GlobSet,
    push: GlobSet,
    delete: GlobSet,
    /// It may pull every repository, so list them.
    catalog: bool,
}

impl Rights {
    /// Whether they allow `action` on `repo` (`None`: the catalog).
    fn permit(&self, action: Action, repo: Option<&str>) -> bool {
        match (action, repo) {
            (Action::Pull, None) => self.catalog,
            (_, None) => false,
            (Action::Pull, Some(repo)) => self.pull.is_match(repo),
            (Action::Push, Some(repo)) => self.push.is_match(repo),
            (Action::Delete, Some(repo)) => self.delete.is_match(repo),
        }
    }
}

/// An action on a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read manifests, blobs and tags.
    Pull,
    /// Upload and tag.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
}

impl Action {
    fn scope(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "pull,push",
            Action::Delete => "delete",
        }
    }
}

/// The claims of a credential minted by `layercache token`.
#[derive(Debug, Deserialize)]
struct CredentialClaims {
    exp: u64,
    #[serde(default)]
    reg: RegistryScopes,
    #[serde(default)]
    session: Option<String>,
}

/// One granted scope, in the shape registries put in their tokens.
#[derive(Debug, Serialize, Deserialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// The claims of a bearer token from the token endpoint.
#[derive(Debug, Serialize, Deserialize)]
struct BearerClaims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    /// What the identity it was issued to may do.
    reg: RegistryScopes,
    /// The granted part of the scopes asked for.
    access: Vec<Access>,
    /// `access` as rights on exact repository names: all the token itself may do.
    #[serde(default)]
    grant: RegistryScopes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    /// The session is the login name the client chose (see [`Identity::login_named`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    login_named: bool,
    /// Issued without credentials.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    anonymous: bool,
    /// The claims that granted the rights (a CI identity token's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    claims: BTreeMap<String, String>,
}

/// Who made a request.
#[derive(Debug)]
pub struct Identity {
    /// Who it is: `anonymous`, a user's name, a CI token's subject, or for a credential
    /// minted by `layercache token` `credential` and its fingerprint (the first 12 hex
    /// digits of its SHA-256).
    pub subject: String,
    /// The claims that granted its rights (a CI identity token's), for the record.
    pub claims: BTreeMap<String, String>,
    /// Its rights.
    pub scopes: RegistryScopes,
    /// The build session its credential names, if any.
    pub session: Option<String>,
    /// It sent no credentials.
    pub anonymous: bool,
    /// Its session is the login name the client chose, not one its credential names: a
    /// label, never what identifies it (for the limits or the audit log).
    pub login_named: bool,
    /// `scopes`, compiled.
    rights: Rights,
    /// For a bearer token from the token endpoint, what the token grants (the
    /// repositories its request named): its requests need this as well as `rights`.
    token_grant: Option<Rights>,
    /// When its credential or token expires (seconds since the epoch).
    expires: u64,
}

impl Identity {
    /// What limits count it under: its subject and the session its credential names,
    /// or the client address `addr` for an anonymous one (a login name the client chose
    /// does not count).
    pub fn limit_key(&self, addr: Option<std::net::IpAddr>) -> String {
        match (self.anonymous, addr) {
            (true, Some(addr)) => addr.to_string(),
            _ if self.login_named => self.subject.clone(),
            _ => format!(
                "{}/{}",
                self.subject,
                self.session.as_deref().unwrap_or_default()
            ),
        }
    }

    fn new(
        subject: String,
        scopes: RegistryScopes,
        session: Option<String>,
        anonymous: bool,
        expires: u64,
    ) -> Identity {
        // A glob that does not compile (minted elsewhere) grants nothing.
        let rights = scopes.compile().unwrap_or_default();
        Identity {
            subject,
            claims: BTreeMap::new(),
            scopes,
            session,
            anonymous,
            login_named: false,
            rights,
            token_grant: None,
            expires,
        }
    }

    /// Who this is, for the audit log: `anonymous`, a user's name, a CI token's
    /// subject, or for a minted credential the build session it names, else its login
    /// name beside the credential (`pr-7 (credential 3f9a2c1b0d4e)`), else the
    /// credential.
    pub fn name(&self) -> String {
        match &self.session {
            Some(session) if self.subject.starts_with("credential ") => {
                if self.login_named {
                    format!("{session} ({})", self.subject)
                } else {
                    session.clone()
                }
            }
            _ => self.subject.clone(),
        }
    }

    /// What grants its requests, for the audit log: its registry scopes, and the claims
    /// of a CI identity token that the rules matched.
    pub fn grounds(&self) -> serde_json::Value {
        let mut grounds = serde_json::to_value(&self.scopes).unwrap_or_default();
        if let Some(object) = grounds.as_object_mut()
            && !self.claims.is_empty()
        {
            object.insert("claims".into(), serde_json::json!(self.claims));
        }
        grounds
    }
}

/// Why credentials were not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// They are not valid (the reason).
    #[error("{0}")]
    Credentials(String),
    /// Their address failed too many logins: none of its passwords is checked for this
    /// long.
    #[error("too many failed logins from this address: try again in {}s", .0.as_secs().max(1))]
    Throttled(Duration),
}

impl From<String> for Refused {
    fn from(reason: String) -> Self {
        Refused::Credentials(reason)
    }
}

/// Most verified `Authorization` values remembered (then forgotten all at once).
const MAX_VERIFIED: usize = 10_000;

/// Checks credentials and bearer tokens, and issues the latter.
pub struct Authority {
    config: Config,
    encoding: EncodingKey,
    decoding: DecodingKey,
    users: Vec<users::Account>,
    oidc: Arc<oidc::Oidc>,
    anonymous: Arc<Identity>,
    /// Identities of `Authorization` values already verified, until they expire: a
    /// signature is checked and globs compiled once per token, not per request.
    verified: Mutex<HashMap<String, Arc<Identity>>>,
    /// Static users' failed logins per client address.
    failed_logins: users::FailedLogins,
}

impl Authority {
    /// An authority over `config`, signing with the server's `key` and trusting the CI
    /// identity tokens `oidc` trusts; refuses a user whose hash or globs are unusable.
    pub fn new(config: Config, key: &[u8], oidc: Arc<oidc::Oidc>) -> Result<Authority, String> {
        let users = config
            .users
            .iter()
            .map(users::User::account)
            .collect::<Result<Vec<_>, _>>()?;
        let scopes = match config.anonymous {
            Anonymous::Pull => RegistryScopes {
                pull: vec!["**".into()],
                ..RegistryScopes::default()
            },
            Anonymous::None => RegistryScopes::default(),
        };
        Ok(Authority {
            config,
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            users,
            oidc,
            anonymous: Arc::new(Identity::new(
                "anonymous".into(),
                scopes,
                None,
                true,
                u64::MAX,
            )),
            verified: Mutex::default(),
            failed_logins: users::FailedLogins::default(),
        })
    }

    /// Whether requests need an identity.
    pub fn enforced(&self) -> bool {
        self.config.mode == Some(Mode::Token)
    }

    /// The identity of `authorization` (a header value) sent from `client`, or of no
    /// credentials.
    async fn identify(
        &self,
        authorization: Option<&str>,
        client: Option<IpAddr>,
    ) -> Result<Arc<Identity>, Refused> {
        let Some(value) = authorization else {
            return Ok(Arc::clone(&self.anonymous));
        };
        let now = unix_now();
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(value)
            .filter(|i| i.expires > now)
            .cloned();
        if let Some(identity) = known {
            return Ok(identity);
        }
        let identity = Arc::new(self.verify(value, client).await?);
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(value.to_owned(), Arc::clone(&identity));
        Ok(identity)
    }

    /// The identity the credentials in `headers` carry, once verified (`None` without
    /// credentials, or when they failed), for the audit log of a request refused.
    pub fn identity_of(&self, headers: &HeaderMap) -> Option<Arc<Identity>> {
        let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified.get(authorization).cloned()
    }

    /// Verify `authorization` (a header value) sent from `client`.
    async fn verify(&self, value: &str, client: Option<IpAddr>) -> Result<Identity, Refused> {
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.set_issuer(&[ISSUER]);
            validation.set_audience(&[BEARER_AUDIENCE]);
            validation.validate_nbf = true;
            validation.leeway = LEEWAY;
            let claims =
                jsonwebtoken::decode::<BearerClaims>(rest.trim(), &self.decoding, &validation)
                    .map_err(|e| format!("invalid bearer token: {e}"))?
                    .claims;
            let mut identity = Identity::new(
                claims.sub,
                claims.reg,
                claims.session,
                claims.anonymous,
                claims.exp,
            );
            identity.claims = claims.claims;
            identity.login_named = claims.login_named;
            identity.token_grant = Some(claims.grant.compile().unwrap_or_default());
            return Ok(identity);
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let (user, password) =
                basic(value).ok_or_else(|| "malformed Basic credentials".to_owned())?;
            return self.credential(&user, &password, client).await;
        }
        Err(format!("unsupported authorization scheme {scheme:?}").into())
    }

    /// The identity of a user name and password: a credential minted by `layercache
    /// token` (any user name, which names the build session unless the credential
    /// does), a CI identity token (any user name), or a static user's password.
    async fn credential(
        &self,
        user: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<Identity, Refused> {
        match jsonwebtoken::decode_header(password) {
            Ok(header) if header.alg == Algorithm::HS256 => Ok(self.minted(user, password)?),
            Ok(_) => {
                let granted = self.oidc.grant(password).await?;
                let session = granted.actions.session.clone();
                let mut identity = Identity::new(
                    granted.subject,
                    granted.registry,
                    session,
                    false,
                    granted.expires,
                );
                identity.claims = granted.claims;
                Ok(identity)
            }
            Err(_) => self.password(user, password, client).await,
        }
    }

    /// The identity of a static user's name and password, checked only as often as
    /// [`users::FailedLogins`] lets `client`. An unknown name is checked against another
    /// user's hash, so that how long the refusal takes does not tell which names exist.
    async fn password(
        &self,
        user: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<Identity, Refused> {
        let refused = || Refused::Credentials("unknown user or wrong password".into());
        if let Some(wait) = self.failed_logins.wait(client) {
            return Err(Refused::Throttled(wait));
        }
        let known = self.users.iter().find(|a| a.name == user);
        let Some(account) = known.or(self.users.first()).cloned() else {
            return Err(refused());
        };
        let password = password.to_owned();
        let (account, right) = tokio::task::spawn_blocking(move || {
            let right = account.verify(&password);
            (account, right)
        })
        .await
        .map_err(|e| e.to_string())?;
        if !right || known.is_none() {
            self.failed_logins.count(client);
            return Err(refused());
        }
        Ok(Identity::new(
            account.name.clone(),
            account.scopes,
            Some(account.name),
            false,
            u64::MAX,
        ))
    }

    /// The identity of a credential minted by `layercache token`.
    fn minted(&self, user: &str, password: &str) -> Result<Identity, String> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.required_spec_claims = ["exp".to_owned(), "iss".to_owned()].into();
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        let claims =
            jsonwebtoken::decode::<CredentialClaims>(password, &self.decoding, &validation)
                .map_err(|e| format!("invalid credentials: {e}"))?
                .claims;
        let login_named = claims.session.is_none() && !user.is_empty();
        let session = claims
            .session
            .or_else(|| login_named.then(|| user.to_owned()));
        let fingerprint = Digest::sha256_of(password.as_bytes()).hex()[..12].to_owned();
        let mut identity = Identity::new(
            format!("credential {fingerprint}"),
            claims.reg,
            session,
            false,
            claims.exp,
        );
        identity.login_named = login_named;
        Ok(identity)
    }

    /// Whether `identity` may do `action` on `repo` (`None`: the catalog, which needs
    /// pull on every repository): its rights allow it, and so does its bearer token.
    fn allows(identity: &Identity, action: Action, repo: Option<&str>) -> bool {
        identity.rights.permit(action, repo)
            && identity
                .token_grant
                .as_ref()
                .is_none_or(|grant| grant.permit(action, repo))
    }

    /// Whether a request by `identity` (let through by [`Authority::authorize`]) may pull
    /// `repo` (`None`: every repository); anything may when nothing is enforced.
    pub fn may_pull(&self, identity: Option<&Identity>, repo: Option<&str>) -> bool {
        !self.enforced() || identity.is_some_and(|i| Self::allows(i, Action::Pull, repo))
    }

    /// Check a `/v2/` `request` for `endpoint`: its identity, or the
    /// registry's answer (the challenge, naming the token endpoint at the address the
    /// client used, or `DENIED`).
    pub async fn authorize(
        &self,
        endpoint: &Endpoint,
        request: &axum::http::request::Parts,
    ) -> Result<Option<Arc<Identity>>, RegistryError> {
        if !self.enforced() {
            return Ok(None);
        }
        let (method, headers) = (&request.method, &request.headers);
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let action = action_of(endpoint, method);
        let repo = endpoint.repo().map(|r| r.as_str());
        // `insufficient`: the identity may, its bearer token does not cover it (RFC 6750's
        // `insufficient_scope`, on which clients ask for a token with the scope named).
        let challenge = |message: String, insufficient: bool| {
            let base =
                crate::addressed_base(request).unwrap_or_else(|| crate::loopback_base(request));
            let scope = match (repo, action) {
                (Some(repo), Some(action)) => {
                    format!(",scope=\"repository:{repo}:{}\"", action.scope())
                }
                (None, Some(_)) => ",scope=\"registry:catalog:*\"".to_owned(),
                _ => String::new(),
            };
            RegistryError::new(ErrorCode::Unauthorized, message).with_header(
                header::WWW_AUTHENTICATE,
                format!(
                    "Bearer realm=\"{base}/token\",service=\"{ISSUER}\"{scope}{}",
                    if insufficient {
                        ",error=\"insufficient_scope\""
                    } else {
                        ""
                    }
                ),
            )
        };
        let client = crate::sessions::remote_addr(&request.extensions);
        let identity = match self.identify(authorization, client).await {
            Ok(identity) => identity,
            Err(Refused::Credentials(message)) => return Err(challenge(message, false)),
            Err(throttled) => return Err(throttled.into()),
        };
        let Some(action) = action else {
            // `/v2/` itself: any identity (an anonymous one is asked to log in, so that
            // `docker login` finds the token endpoint).
            return if identity.anonymous {
                Err(challenge("authentication required".into(), false))
            } else {
                Ok(Some(identity))
            };
        };
        if Self::allows(&identity, action, repo) {
            return Ok(Some(identity));
        }
        if identity.anonymous {
            return Err(challenge("authentication required".into(), false));
        }
        if identity.rights.permit(action, repo) {
            return Err(challenge(
                "insufficient scope: the token was issued for other repositories".into(),
                true,
            ));
        }
        Err(RegistryError::new(
            ErrorCode::Denied,
            format!(
                "requested access to the resource is denied: {} on {}",
                action.scope(),
                repo.unwrap_or("the catalog")
            ),
        )
        .with_status(StatusCode::FORBIDDEN))
    }

    /// The part of `scopes` that `identity` may do: the access entries a token lists,
    /// and the same as rights on exact repository names (a name that is not a
    /// repository name, and so might read as a glob, grants nothing).
    fn grant(identity: &Identity, scopes: &[String]) -> (Vec<Access>, RegistryScopes) {
        let mut access = Vec::new();
        let mut granted = RegistryScopes::default();
        for scope in scopes {
            let mut parts = scope.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let actions: Vec<&str> = actions.split(',').collect();
            let allowed: Vec<String> = match kind {
                "registry" if name == "catalog" && Self::allows(identity, Action::Pull, None) => {
                    granted.pull.push("**".into());
                    vec!["*".into()]
                }
                "repository" if name.parse::<oci::RepoName>().is_ok() => {
                    let all = actions.contains(&"*");
                    [
                        ("pull", Action::Pull, &mut granted.pull),
                        ("push", Action::Push, &mut granted.push),
                        ("delete", Action::Delete, &mut granted.delete),
                    ]
                    .into_iter()
                    .filter(|(word, action, _)| {
                        (all || actions.contains(word))
                            && Self::allows(identity, *action, Some(name))
                    })
                    .map(|(word, _, list)| {
                        list.push(name.to_owned());
                        word.to_owned()
                    })
                    .collect()
                }
                _ => continue,
            };
            access.push(Access {
                kind: kind.to_owned(),
                name: name.to_owned(),
                actions: allowed,
            });
        }
        (access, granted)
    }

    /// A bearer token for `identity`, granting what it may of `scopes`
    /// (`repository:NAME:ACTIONS`, `registry:catalog:*`) and nothing else: a token that
    /// leaks carries only the repositories its request named.
    fn issue(&self, identity: &Identity, scopes: &[String]) -> Result<String, String> {
        let (access, grant) = Self::grant(identity, scopes);
        let now = unix_now();
        let claims = BearerClaims {
            iss: ISSUER.to_owned(),
            aud: BEARER_AUDIENCE.to_owned(),
            sub: identity.subject.clone(),
            iat: now,
            nbf: now,
            // Never outliving the credential it was issued for.
            exp: (now + self.config.ttl().as_secs()).min(identity.expires),
            reg: identity.scopes.clone(),
            access,
            grant,
            session: identity.session.clone(),
            login_named: identity.login_named,
            anonymous: identity.anonymous,
            claims: identity.claims.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| e.to_string())
    }
}

/// The API routes that need the admin scope whatever their method (what they answer is
/// for administrators only).
const ADMIN_ROUTES: [&str; 1] = [crate::api::AUDIT_ROUTE];

/// Let a request to layercache's own API, `/metrics` or `/ui` through in `token` mode
/// only with a credential that may view (or, for a `POST` or the audit log, administer);
/// one without credentials is asked for them with a Basic challenge, which browsers
/// answer. The identity let through rides in the request's extensions; a refusal of
/// credentials is audited.
pub async fn guard(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let authority = &state.authority;
    if !authority.enforced() {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let admin = request.method() == Method::POST || ADMIN_ROUTES.contains(&request.uri().path());
    let client = crate::sessions::remote_addr(request.extensions());
    let challenge = || {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"layercache\"")],
            "credentials required: any user name, a credential from `layercache token --view` \
             as the password",
        )
            .into_response()
    };
    let (response, refused) = match authority.identify(authorization, client).await {
        Ok(identity) if identity.anonymous && !identity.scopes.view => (challenge(), None),
        Ok(identity) => {
            // A bearer token is for the registry only.
            let scopes = &identity.scopes;
            let bearer = identity.token_grant.is_some();
            if !bearer && (scopes.admin || (scopes.view && !admin)) {
                request.extensions_mut().insert(identity);
                return next.run(request).await;
            }
            let needed = if admin { "--admin" } else { "--view" };
            let message = format!("this credential may not do that: mint one with {needed}");
            let response = (StatusCode::FORBIDDEN, message.clone()).into_response();
            (response, Some((Some(identity), message)))
        }
        Err(throttled @ Refused::Throttled(wait)) => {
            let message = throttled.to_string();
            let retry_after = [(header::RETRY_AFTER, wait.as_secs().max(1).to_string())];
            let response = (StatusCode::TOO_MANY_REQUESTS, retry_after, message.clone());
            (response.into_response(), Some((None, message)))
        }
        Err(Refused::Credentials(message)) => (challenge(), Some((None, message))),
    };
    if let Some((identity, reason)) = refused {
        state.audit.record(
            &Who::of(identity.as_deref(), client),
            request.method(),
            request.uri().path(),
            response.status(),
            Event::denied(None, reason),
        );
    }
    response
}

/// The action a request for `endpoint` with `method` needs (`None` for `/v2/`).
fn action_of(endpoint: &Endpoint, method: &Method) -> Option<Action> {
    match endpoint {
        Endpoint::Base => None,
        Endpoint::DeleteManifest(..) | Endpoint::DeleteBlob(..) => Some(Action::Delete),
        Endpoint::CancelUpload(..) => Some(Action::Push),
        _ if method == Method::GET || method == Method::HEAD => Some(Action::Pull),
        _ => Some(Action::Push),
    }
}

/// The user name and password of an `Authorization: Basic …` value (base64 of
/// `user:password`; a value without `:` is a user name alone).
pub(crate) fn basic(authorization: &str) -> Option<(String, String)> {
    let (scheme, encoded) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':').unwrap_or((&text, ""));
    Some((user.to_owned(), password.to_owned()))
}

/// The `Authorization` value of Basic credentials `user` and `password`.
fn basic_value(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// The token endpoint's answer.
#[derive(Debug, Serialize)]
struct TokenAnswer {
    token: String,
    access_token: String,
    expires_in: u64,
    issued_at: String,
}

/// `GET /token` (Basic credentials, `scope` repeated) and `POST /token` (the OAuth2
/// form BuildKit and containerd send: `grant_type=password` or `refresh_token`).
pub async fn token(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Query(query): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> Response {
    let authority = &state.authority;
    let form: Vec<(String, String)> = if method == Method::POST {
        serde_urlencoded::from_bytes(&body).unwrap_or_default()
    } else {
        Vec::new()
    };
    let field = |name: &str| {
        form.iter()
            .chain(&query)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    // Secrets only from the body: a URL's query ends up in proxies' and clients' logs.
    let secret = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let scopes: Vec<String> = form
        .iter()
        .chain(&query)
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned))
        .collect();
    // A form's password is checked as the same Basic credentials would be, so that
    // what was verified once is remembered for both.
    let presented = if method == Method::POST {
        match field("grant_type") {
            Some("password") => Ok(Some(basic_value(
                field("username").unwrap_or(""),
                secret("password").unwrap_or(""),
            ))),
            Some("refresh_token") => {
                Ok(Some(basic_value("", secret("refresh_token").unwrap_or(""))))
            }
            other => Err(Refused::Credentials(format!(
                "unsupported grant_type {other:?}"
            ))),
        }
    } else {
        let authorization = headers.get(header::AUTHORIZATION);
        Ok(authorization
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned))
    };
    let client = crate::sessions::remote_addr(&extensions);
    let identity = match presented {
        Ok(value) => authority.identify(value.as_deref(), client).await,
        Err(refused) => Err(refused),
    };
    let identity = match identity {
        // Without credentials there is nothing to grant unless anonymous pulls are on.
        Ok(identity) if identity.anonymous && identity.scopes.is_empty() => {
            Err(Refused::Credentials("credentials are required".to_owned()))
        }
        other => other,
    };
    let identity = match identity {
        Ok(identity) => identity,
        Err(refused) => {
            let message = refused.to_string();
            let response = RegistryError::from(refused).into_response();
            // Credentials presented and refused (not the anonymous first try).
            if method == Method::POST || headers.contains_key(header::AUTHORIZATION) {
                let repository = scopes
                    .first()
                    .and_then(|s| s.split(':').nth(1))
                    .map(str::to_owned);
                state.audit.record(
                    &Who::of(None, client),
                    &method,
                    "/token",
                    response.status(),
                    Event::denied(repository, message),
                );
            }
            return response;
        }
    };
    match authority.issue(&identity, &scopes) {
        Ok(token) => {
            let ttl = authority.config.ttl().as_secs();
            let issued_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            axum::Json(TokenAnswer {
                access_token: token.clone(),
                token,
                expires_in: ttl,
                issued_at: issued_at.to_string(),
            })
            .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(pull: &[&str], push: &[&str]) -> Identity {
        let scopes = RegistryScopes {
            pull: pull.iter().map(|s| (*s).to_owned()).collect(),
            push: push.iter().map(|s| (*s).to_owned()).collect(),
            ..RegistryScopes::default()
        };
        Identity::new("test".into(), scopes, None, false, u64::MAX)
    }

    #[test]
    fn globs_grant_whole_path_segments() {
        let pr = identity(&["cache/org/app/**"], &["cache/org/app/pr-7/**"]);
        let allows = |action, repo| Authority::allows(&pr, action, Some(repo));
        assert!(allows(Action::Pull, "cache/org/app/main"));
        assert!(allows(Action::Pull, "cache/org/app/pr-7/x"));
        assert!(!allows(Action::Push, "cache/org/app/main"));
        assert!(allows(Action::Push, "cache/org/app/pr-7/x"));
        assert!(!allows(Action::Pull, "cache/org/other"));
        assert!(!allows(Action::Delete, "cache/org/app/pr-7/x"));
        let one_level = identity(&["team/*"], &[]);
        assert!(Authority::allows(&one_level, Action::Pull, Some("team/a")));
        assert!(!Authority::allows(
            &one_level,
            Action::Pull,
            Some("team/a/b")
        ));
        assert!(!Authority::allows(&one_level, Action::Pull, None));
        assert!(Authority::allows(
            &identity(&["**"], &[]),
            Action::Pull,
            None
        ));
    }

    #[test]
    fn an_open_listener_off_loopback_needs_saying_so() {
        let unset = Config::default();
        assert!(unset.refusal("127.0.0.1:5000".parse().unwrap()).is_none());
        assert!(unset.refusal("0.0.0.0:5000".parse().unwrap()).is_some());
        let open = Config {
            mode: Some(Mode::Open),
            ..Config::default()
        };
        assert!(open.refusal("0.0.0.0:5000".parse().unwrap()).is_none());
    }

    #[test]
    fn users_or_rules_without_a_mode_are_refused_on_loopback_too() {
        let loopback = "127.0.0.1:5000".parse().unwrap();
        let users = Config {
            users: vec![users::User::default()],
            ..Config::default()
        };
        let said = users.refusal(loopback).unwrap();
        assert!(said.contains("mode = \"token\""), "{said}");
        let rules = Config {
            rules: vec![oidc::Rule::default()],
            ..Config::default()
        };
        assert!(rules.refusal(loopback).is_some());
        let token = Config {
            mode: Some(Mode::Token),
            ..users
        };
        assert!(token.refusal(loopback).is_none());
    }
}
