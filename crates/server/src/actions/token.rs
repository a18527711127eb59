//! Who may read and write which cache scopes: runtime tokens (JWTs whose `ac` claim
//! lists scopes with permission bits, as GitHub's runners carry), minted with the
//! server's key or signed by an external issuer whose key set is configured, and the
//! signed, expiring URLs entries are uploaded to and downloaded from.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::ActionsError;
use crate::auth::oidc::{Oidc, unverified_issuer};

/// The `iss` of every token this server signs.
pub(crate) const ISSUER: &str = "layercache";
/// The `aud` of signed URLs, so that one is never taken for a runtime token.
const URL_AUDIENCE: &str = "layercache-url";
/// Permission bit: read.
const READ: u64 = 1;
/// Permission bit: write.
const WRITE: u64 = 2;
/// Least time between two fetches of an external key set.
const JWKS_REFRESH: Duration = Duration::from_secs(60);

/// An external token issuer (GitHub's, or a GHES one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    /// The `iss` its tokens carry, e.g. `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// Its JSON Web Key Set: a file path, or an `http(s)://` URL fetched at start and
    /// again when a token names an unknown key.
    pub jwks: String,
    /// The `aud` its tokens must carry, if any.
    pub audience: Option<String>,
}

/// What a token lets its holder do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The repository whose cache it reaches.
    pub repository: String,
    /// Scopes it may read, in lookup order.
    pub read: Vec<String>,
    /// The scope it writes, if any.
    pub write: Option<String>,
    /// The build session it names, if any.
    pub session: Option<String>,
}

/// One scope of an `ac` claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScopeClaim {
    #[serde(rename = "Scope")]
    scope: String,
    #[serde(rename = "Permission")]
    permission: u64,
}

/// The claims layercache reads from a runtime token.
#[derive(Debug, Deserialize)]
struct RuntimeClaims {
    ac: String,
    #[serde(default)]
    repository_id: Option<serde_json::Value>,
    #[serde(default)]
    session: Option<String>,
}

/// The claims of a token this server mints.
#[derive(Debug, Serialize)]
struct MintedClaims {
    ac: String,
    iss: &'static str,
    iat: u64,
    nbf: u64,
    exp: u64,
    repository_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<String>,
    #[serde(skip_serializing_if = "crate::auth::RegistryScopes::is_empty")]
    reg: crate::auth::RegistryScopes,
}

/// The claims of a signed URL.
#[derive(Debug, Serialize, Deserialize)]
struct UrlClaims {
    /// `upload:<entry>` or `download:<entry>`.
    sub: String,
    aud: String,
    exp: u64,
    /// The build session to record the transfer in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sn: Option<String>,
}

/// What a signed URL is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlUse {
    /// Uploading an entry's bytes.
    Upload,
    /// Downloading them.
    Download,
}

impl UrlUse {
    fn subject(self, entry: i64) -> String {
        match self {
            UrlUse::Upload => format!("upload:{entry}"),
            UrlUse::Download => format!("download:{entry}"),
        }
    }
}

/// What a token to mint allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Scopes it may read (the write scope is readable too, and searched first).
    pub read: Vec<String>,
    /// The scope it writes.
    pub write: Option<String>,
    /// How long it is valid.
    pub ttl: Duration,
    /// The repository whose cache it reaches.
    pub repository: String,
    /// The build session its requests are recorded in.
    pub session: Option<String>,
    /// The registry repositories it may pull, push to and delete in.
    pub registry: crate::auth::RegistryScopes,
}

/// Seconds since the Unix epoch: the clock of token claims.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The server's key, from `path`; created (32 random bytes, hex, mode 0600) if absent.
/// Safe when `serve` and `token` race to create it: one file wins, both read it.
pub fn load_or_create_key(path: &Path) -> std::io::Result<Vec<u8>> {
    if !path.exists() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_private()
            .open(&temp)?;
        file.write_all(hex::encode(key).as_bytes())?;
        file.sync_all()?;
        let linked = std::fs::hard_link(&temp, path);
        std::fs::remove_file(&temp)?;
        match linked {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(path)?;
    let key = hex::decode(text.trim()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a hex key: {e}", path.display()),
        )
    })?;
    if key.len() < 32 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: a key needs at least 32 bytes", path.display()),
        ));
    }
    Ok(key)
}

/// Owner-only permissions for a file about to be created.
trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    #[cfg(unix)]
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
    #[cfg(not(unix))]
    fn mode_private(&mut self) -> &mut Self {
        self
    }
}

/// Mint a runtime token with the server's `key`.
pub fn mint(key: &[u8], request: &TokenRequest) -> Result<String, jsonwebtoken::errors::Error> {
    let mut scopes: Vec<ScopeClaim> = request
        .write
        .iter()
        .map(|scope| ScopeClaim {
            scope: scope.clone(),
            permission: READ | WRITE,
        })
        .collect();
    for scope in &request.read {
        if !scopes.iter().any(|s| &s.scope == scope) {
            scopes.push(ScopeClaim {
                scope: scope.clone(),
                permission: READ,
            });
        }
    }
    let now = unix_now();
    let claims = MintedClaims {
        ac: serde_json::to_string(&scopes).unwrap_or_default(),
        iss: ISSUER,
        iat: now,
        nbf: now,
        exp: now + request.ttl.as_secs(),
        repository_id: request.repository.clone(),
        session: request.session.clone(),
        reg: request.registry.clone(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key),
    )
}

/// An external issuer with its keys.
pub(crate) struct External {
    config: Issuer,
    keys: tokio::sync::RwLock<(JwkSet, Instant)>,
}

/// Checks runtime tokens and signs and checks URLs.
pub struct Verifier {
    encoding: EncodingKey,
    decoding: DecodingKey,
    external: Option<External>,
    oidc: Arc<Oidc>,
}

impl Verifier {
    /// A verifier with the server's `key`, also trusting `issuer` when given (its keys
    /// are loaded now), and CI identity tokens as `oidc`'s rules grant.
    pub async fn new(
        key: &[u8],
        issuer: Option<Issuer>,
        oidc: Arc<Oidc>,
    ) -> Result<Verifier, IssuerError> {
        let external = match issuer {
            Some(config) => Some(External::load(config).await?),
            None => None,
        };
        Ok(Verifier {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            external,
            oidc,
        })
    }

    /// The grant of the bearer token in an `Authorization` header value.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Grant, ActionsError> {
        let token = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ActionsError::Unauthenticated("a bearer token is required".into()))?;
        let bad = |e: jsonwebtoken::errors::Error| {
            ActionsError::Unauthenticated(format!("invalid runtime token: {e}"))
        };
        let header = jsonwebtoken::decode_header(token).map_err(bad)?;
        let claims: RuntimeClaims = if header.alg == Algorithm::HS256 {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.set_issuer(&[ISSUER]);
            validation.required_spec_claims = HashSet::from(["exp".into(), "iss".into()]);
            validation.leeway = 5;
            validation.validate_nbf = true;
            jsonwebtoken::decode(token, &self.decoding, &validation)
                .map_err(bad)?
                .claims
        } else if self.oidc.trusts(unverified_issuer(token).as_deref()) {
            let granted = self.oidc.grant(token).await.map_err(|e| {
                ActionsError::Unauthenticated(format!("invalid identity token: {e}"))
            })?;
            return Ok(granted.actions);
        } else if let Some(external) = &self.external {
            external
                .decode(token, &header)
                .await
                .map_err(|e| ActionsError::Unauthenticated(format!("invalid runtime token: {e}")))?
        } else {
            return Err(ActionsError::Unauthenticated(format!(
                "tokens signed with {:?} are not trusted: no external issuer is configured",
                header.alg
            )));
        };
        grant(claims)
    }

    /// The signature for a URL that allows `use_` of `entry` until `ttl` from now,
    /// recording transfers in `session`.
    pub fn sign_url(
        &self,
        use_: UrlUse,
        entry: i64,
        ttl: Duration,
        session: Option<&str>,
    ) -> String {
        let claims = UrlClaims {
            sub: use_.subject(entry),
            aud: URL_AUDIENCE.into(),
            exp: unix_now() + ttl.as_secs().max(1),
            sn: session.map(str::to_owned),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Check a URL's signature for `use_` of `entry`; returns the session it names.
    pub fn check_url(
        &self,
        signature: Option<&str>,
        use_: UrlUse,
        entry: i64,
    ) -> Result<Option<String>, ActionsError> {
        let signature = signature
            .ok_or_else(|| ActionsError::UrlDenied("the URL carries no signature".into()))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[URL_AUDIENCE]);
        validation.leeway = 0;
        let claims: UrlClaims = jsonwebtoken::decode(signature, &self.decoding, &validation)
            .map_err(|e| ActionsError::UrlDenied(format!("signature refused: {e}")))?
            .claims;
        if claims.sub != use_.subject(entry) {
            return Err(ActionsError::UrlDenied(
                "the signature was issued for another entry or use".into(),
            ));
        }
        Ok(claims.sn)
    }
}

impl External {
    /// The issuer `config` describes, with its keys loaded now.
    pub(crate) async fn load(config: Issuer) -> Result<External, IssuerError> {
        let keys = fetch_jwks(&config.jwks).await?;
        Ok(External {
            config,
            keys: tokio::sync::RwLock::new((keys, Instant::now())),
        })
    }

    /// The `iss` its tokens carry.
    pub(crate) fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// The claims of `token` (whose header is `header`), once its signature, issuer,
    /// audience and validity period are checked; the key set is fetched again (at most
    /// once a minute) when the token names a key it does not hold.
    pub(crate) async fn decode<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        header: &Header,
    ) -> Result<T, String> {
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err("an external issuer's token must be signed with its public key".into());
        }
        let kid = header.kid.clone().unwrap_or_default();
        let mut jwk = self.keys.read().await.0.find(&kid).cloned();
        if jwk.is_none() {
            let mut keys = self.keys.write().await;
            if keys.1.elapsed() >= JWKS_REFRESH {
                match fetch_jwks(&self.config.jwks).await {
                    Ok(fresh) => *keys = (fresh, Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "refreshing the issuer's keys failed"),
                }
            }
            jwk = keys.0.find(&kid).cloned();
        }
        let jwk = jwk.ok_or_else(|| format!("unknown signing key {kid:?}"))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable signing key: {e}"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        validation.leeway = 5;
        validation.validate_nbf = true;
        jsonwebtoken::decode(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| e.to_string())
    }
}

/// The grant `claims` describe.
fn grant(claims: RuntimeClaims) -> Result<Grant, ActionsError> {
    let scopes: Vec<ScopeClaim> = serde_json::from_str(&claims.ac).map_err(|e| {
        ActionsError::Unauthenticated(format!("the token's `ac` claim is not a scope list: {e}"))
    })?;
    let repository = match claims.repository_id {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => "0".into(),
    };
    Ok(Grant {
        repository,
        read: scopes
            .iter()
            .filter(|s| s.permission & READ != 0)
            .map(|s| s.scope.clone())
            .collect(),
        write: scopes
            .iter()
            .find(|s| s.permission & WRITE != 0)
            .map(|s| s.scope.clone()),
        session: claims.session,
    })
}

/// Load a key set from a file or an `http(s)://` URL.
async fn fetch_jwks(source: &str) -> Result<JwkSet, IssuerError> {
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        reqwest::get(source)
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| IssuerError(format!("fetching {source}: {e}")))?
            .text()
            .await
            .map_err(|e| IssuerError(format!("reading {source}: {e}")))?
    } else {
        tokio::fs::read_to_string(source)
            .await
            .map_err(|e| IssuerError(format!("reading {source}: {e}")))?
    };
    serde_json::from_str(&text)
        .map_err(|e| IssuerError(format!("{source} is not a JSON Web Key Set: {e}")))
}

/// The external issuer's key set could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IssuerError(String);

impl IssuerError {
    pub(crate) fn new(message: String) -> IssuerError {
        IssuerError(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (Vec<u8>, Verifier) {
        let key = vec![7u8; 32];
        let verifier = Verifier {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            external: None,
            oidc: Arc::default(),
        };
        (key, verifier)
    }

    #[tokio::test]
    async fn a_minted_token_grants_its_scopes_write_scope_first() {
        let (key, verifier) = verifier();
        let token = mint(
            &key,
            &TokenRequest {
                read: vec!["refs/heads/main".into()],
                write: Some("refs/pull/7/merge".into()),
                ttl: Duration::from_secs(60),
                repository: "42".into(),
                session: Some("run-1".into()),
                registry: Default::default(),
            },
        )
        .unwrap();
        let grant = verifier
            .verify(Some(&format!("Bearer {token}")))
            .await
            .unwrap();
        assert_eq!(grant.read, ["refs/pull/7/merge", "refs/heads/main"]);
        assert_eq!(grant.write.as_deref(), Some("refs/pull/7/merge"));
        assert_eq!(grant.repository, "42");
        assert_eq!(grant.session.as_deref(), Some("run-1"));
    }

    #[tokio::test]
    async fn foreign_expired_and_url_tokens_are_refused() {
        let (_, verifier) = verifier();
        let request = TokenRequest {
            read: vec!["refs/heads/main".into()],
            write: None,
            ttl: Duration::from_secs(60),
            repository: "0".into(),
            session: None,
            registry: Default::default(),
        };
        let foreign = mint(&[8u8; 32], &request).unwrap();
        assert!(
            verifier
                .verify(Some(&format!("Bearer {foreign}")))
                .await
                .is_err()
        );
        assert!(verifier.verify(Some("Bearer not-a-jwt")).await.is_err());
        assert!(verifier.verify(None).await.is_err());
        let url = verifier.sign_url(UrlUse::Download, 1, Duration::from_secs(60), None);
        assert!(
            verifier
                .verify(Some(&format!("Bearer {url}")))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_token_not_valid_yet_is_refused() {
        let (key, verifier) = verifier();
        let now = unix_now();
        let claims = |nbf: u64| MintedClaims {
            ac: r#"[{"Scope":"refs/heads/main","Permission":1}]"#.into(),
            iss: ISSUER,
            iat: now,
            nbf,
            exp: now + 7200,
            repository_id: "0".into(),
            session: None,
            reg: Default::default(),
        };
        let header = jsonwebtoken::Header::new(Algorithm::HS256);
        let secret = EncodingKey::from_secret(&key);
        let token = |nbf| jsonwebtoken::encode(&header, &claims(nbf), &secret).unwrap();
        let bearer = |nbf| format!("Bearer {}", token(nbf));
        assert!(verifier.verify(Some(&bearer(now))).await.is_ok());
        assert!(verifier.verify(Some(&bearer(now + 3600))).await.is_err());
    }

    #[test]
    fn a_url_signature_covers_one_entry_and_one_use() {
        let (_, verifier) = verifier();
        let sig = verifier.sign_url(UrlUse::Upload, 5, Duration::from_secs(60), Some("s"));
        assert_eq!(
            verifier
                .check_url(Some(&sig), UrlUse::Upload, 5)
                .unwrap()
                .as_deref(),
            Some("s")
        );
        assert!(verifier.check_url(Some(&sig), UrlUse::Upload, 6).is_err());
        assert!(verifier.check_url(Some(&sig), UrlUse::Download, 5).is_err());
        assert!(verifier.check_url(None, UrlUse::Upload, 5).is_err());
    }
}
