//! A small read-only registry client: manifests, blobs, blob checks, tag lists and the
//! catalog over the distribution API, anonymous, with the Bearer token exchange public
//! registries ask for (`WWW-Authenticate: Bearer realm=…`). Bodies are read up to a
//! limit and checked against their digest.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use diagnose::explain::session::nearest;
use oci::Digest;
use reqwest::{Method, Response, StatusCode, header};

/// Every manifest and index type `explain` reads, as an `Accept` value.
fn manifest_accept() -> String {
    use oci::media_type::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
    [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST,
    ]
    .join(", ")
}

/// Largest manifest read.
pub const MAX_MANIFEST: usize = 4 << 20;

/// Most pages of a tag list or the catalog followed.
const MAX_PAGES: usize = 20;
/// Most tags listed to name the nearest to one that is not there.
const MAX_TAGS_NEAREST: usize = 10_000;

/// A fetched manifest or index.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `Content-Type` (or the descriptor's media type).
    pub media_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
    /// Its digest.
    pub digest: Digest,
}

/// A registry at one base URL.
pub struct Registry {
    http: reqwest::Client,
    base: String,
    /// Bearer tokens by repository (`""` for the catalog).
    tokens: Mutex<HashMap<String, String>>,
    /// The password the token service is asked with (`LAYERCACHE_CREDENTIAL`: a
    /// credential from `layercache token`), else tokens are asked for anonymously.
    credential: Option<String>,
}

impl Registry {
    /// A client of the registry at `base` (`http://host:port`).
    pub fn new(base: &str) -> anyhow::Result<Registry> {
        let http = reqwest::Client::builder()
            // A layercache server counts these reads in no build's session.
            .user_agent(format!(
                "{}explain/{}",
                server::sessions::TOOL_AGENT_PREFIX,
                env!("CARGO_PKG_VERSION")
            ))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .context("creating the HTTP client")?;
        Ok(Registry {
            http,
            base: base.trim_end_matches('/').to_owned(),
            tokens: Mutex::default(),
            credential: crate::commands::credential(),
        })
    }

    fn token(&self, scope: &str) -> Option<String> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(scope)
            .cloned()
    }

    /// Send a request for `path` (or an absolute URL), answering one Bearer challenge.
    async fn send(
        &self,
        method: Method,
        scope: &str,
        path: &str,
        accept: Option<&str>,
    ) -> anyhow::Result<Response> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        let mut retried = false;
        loop {
            let mut request = self.http.request(method.clone(), &url);
            if let Some(accept) = accept {
                request = request.header(header::ACCEPT, accept);
            }
            if let Some(token) = self.token(scope) {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.map_err(|e| connect_error(&url, e))?;
            if response.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(response);
            }
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let Some(params) = challenge
                .strip_prefix("Bearer ")
                .or_else(|| challenge.strip_prefix("bearer "))
            else {
                bail!(
                    "{url} asks for credentials ({}); explain reads anonymously",
                    if challenge.is_empty() {
                        "401 without a challenge"
                    } else {
                        &challenge
                    }
                );
            };
            let token = self.fetch_token(params, scope).await?;
            self.tokens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(scope.to_owned(), token);
            retried = true;
        }
    }

    /// A token for `scope` from the realm a Bearer challenge names (with the credential,
    /// if one is set).
    async fn fetch_token(&self, params: &str, repo: &str) -> anyhow::Result<String> {
        let params = challenge_params(params);
        let realm = params
            .get("realm")
            .context("a Bearer challenge without a realm")?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        let scope = params
            .get("scope")
            .cloned()
            .or_else(|| (!repo.is_empty()).then(|| format!("repository:{repo}:pull")));
        if let Some(scope) = scope {
            query.push(("scope", scope));
        }
        let mut request = self.http.get(realm).query(&query);
        if let Some(credential) = &self.credential {
            request = request.basic_auth("layercache", Some(credential));
        }
        let response = request.send().await.map_err(|e| connect_error(realm, e))?;
        let status = response.status();
        let body = read_limited(response, 1 << 20, "the token").await?;
        if !status.is_success() {
            bail!(
                "the token service {realm} refused a token ({status}; set {} to \
                 a credential that may pull): {}",
                crate::commands::CREDENTIAL_VAR,
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            );
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_slice(&body)
            .with_context(|| format!("reading the token from {realm}"))?;
        token
            .token
            .or(token.access_token)
            .with_context(|| format!("{realm} answered without a token"))
    }

    /// The manifest `reference` (tag or digest) of `repo`.
    pub async fn manifest(&self, repo: &str, reference: &str) -> anyhow::Result<Fetched> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let response = self
            .send(Method::GET, repo, &path, Some(&manifest_accept()))
            .await?;
        let status = response.status();
        if !status.is_success() {
            let what = format!("{}/{repo}:{reference}", self.host());
            let error = refusal(response, &what, "manifest").await;
            if status != StatusCode::NOT_FOUND || reference.parse::<Digest>().is_ok() {
                return Err(error);
            }
            return Err(match self.tags(repo, MAX_TAGS_NEAREST).await {
                Ok(Some(tags)) if !tags.is_empty() => {
                    let near = nearest(reference, &tags, 3);
                    error.context(format!(
                        "{repo} has no tag {reference}; its nearest tags: {}",
                        near.join(", ")
                    ))
                }
                Ok(Some(_)) => error.context(format!("{repo} holds no tags")),
                Ok(None) => error.context(format!("there is no repository {repo}")),
                Err(_) => error,
            });
        }
        let media_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| oci::media_type::essence(v).to_owned());
        let body = read_limited(response, MAX_MANIFEST, "the manifest").await?;
        let digest = Digest::sha256_of(&body);
        if let Ok(asked) = reference.parse::<Digest>()
            && !asked.matches(&body)
        {
            bail!("the registry answered {reference} with content whose digest is {digest}");
        }
        Ok(Fetched {
            media_type,
            body,
            digest,
        })
    }

    /// Whether the manifest `repo:tag` carries cache records, as layercache says
    /// (`None`: not there, or a registry that does not say).
    pub async fn has_cache(&self, repo: &str, tag: &str) -> anyhow::Result<Option<bool>> {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let response = self
            .send(Method::HEAD, repo, &path, Some(&manifest_accept()))
            .await?;
        Ok(response
            .headers()
            .get("layercache-cache-records")
            .and_then(|v| v.to_str().ok())
            .and_then(oci::CacheRecords::parse)
            .map(oci::CacheRecords::has_records))
    }

    /// Blob `digest` of `repo`, at most `limit` bytes, checked against its digest.
    pub async fn blob(&self, repo: &str, digest: &Digest, limit: usize) -> anyhow::Result<Vec<u8>> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let response = self.send(Method::GET, repo, &path, None).await?;
        if !response.status().is_success() {
            let what = format!("{}/{repo}@{digest}", self.host());
            return Err(refusal(response, &what, "blob").await);
        }
        let body = read_limited(response, limit, &format!("blob {digest}")).await?;
        if !digest.matches(&body) {
            bail!("blob {digest} of {repo} does not match its digest");
        }
        Ok(body)
    }

    /// The size of blob `digest` in `repo`, or `None` when it is not there.
    pub async fn blob_size(&self, repo: &str, digest: &str) -> anyhow::Result<Option<u64>> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let response = self.send(Method::HEAD, repo, &path, None).await?;
        match response.status() {
            s if s.is_success() => Ok(Some(
                response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            s => bail!("HEAD {path} answered {s}"),
        }
    }

    /// The tags of `repo` (at most `max`), or `None` when the registry does not know it.
    pub async fn tags(&self, repo: &str, max: usize) -> anyhow::Result<Option<Vec<String>>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let first = format!("/v2/{repo}/tags/list?n=1000");
        let mut tags = Vec::new();
        let mut next = Some(first);
        for _ in 0..MAX_PAGES {
            let Some(path) = next.take() else { break };
            let response = self.send(Method::GET, repo, &path, None).await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !response.status().is_success() {
                return Err(refusal(response, repo, "tag list").await);
            }
            next = next_page(&response);
            let body = read_limited(response, 8 << 20, "the tag list").await?;
            let page: TagList = serde_json::from_slice(&body)
                .with_context(|| format!("reading the tag list of {repo}"))?;
            tags.extend(page.tags.unwrap_or_default());
            if tags.len() >= max {
                tags.truncate(max);
                break;
            }
        }
        Ok(Some(tags))
    }

    /// The registry's repositories (at most `max`).
    pub async fn catalog(&self, max: usize) -> anyhow::Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Catalog {
            repositories: Option<Vec<String>>,
        }
        let mut repos = Vec::new();
        let mut next = Some("/v2/_catalog?n=1000".to_owned());
        for _ in 0..MAX_PAGES {
            let Some(path) = next.take() else { break };
            let response = self.send(Method::GET, "", &path, None).await?;
            if !response.status().is_success() {
                return Err(refusal(response, "the catalog", "listing").await);
            }
            next = next_page(&response);
            let body = read_limited(response, 8 << 20, "the catalog").await?;
            let page: Catalog =
                serde_json::from_slice(&body).context("reading the registry's catalog")?;
            repos.extend(page.repositories.unwrap_or_default());
            if repos.len() >= max {
                repos.truncate(max);
                break;
            }
        }
        Ok(repos)
    }

    /// A JSON document of layercache's own API (`/api/v1/...`).
    pub async fn api(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let response = crate::commands::with_credential(self.http.get(&url))
            .send()
            .await
            .map_err(|e| connect_error(&url, e))?;
        let status = response.status();
        let body = read_limited(response, 64 << 20, path).await?;
        if !status.is_success() {
            bail!(
                "{}{path} answered {status}: {}",
                self.base,
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            );
        }
        Ok(body)
    }

    /// The registry host (`HOST:PORT`), as references name it.
    pub fn host(&self) -> &str {
        self.base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, h)| h)
    }
}

/// The `Link: <…>; rel="next"` target of a paginated answer.
fn next_page(response: &Response) -> Option<String> {
    let link = response.headers().get(header::LINK)?.to_str().ok()?;
    let (target, params) = link.split_once(';')?;
    params.contains("rel=\"next\"").then(|| {
        target
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned()
    })
}

/// The `key="value"` pairs of a challenge.
fn challenge_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, r)) => (v, r),
                None => (quoted, ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, r)) => (v, r),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_owned());
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    params
}

/// Read a body, refusing more than `limit` bytes.
async fn read_limited(mut response: Response, limit: usize, what: &str) -> anyhow::Result<Vec<u8>> {
    if let Some(length) = response.content_length()
        && length > limit as u64
    {
        bail!("{what} is {length} bytes, more than the {limit} explain reads");
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("reading {what}"))?
    {
        if body.len() + chunk.len() > limit {
            bail!("{what} is more than the {limit} bytes explain reads");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error for a refused request, with the registry's own error message if it sent one.
async fn refusal(response: Response, what: &str, kind: &str) -> anyhow::Error {
    let status = response.status();
    let body = read_limited(response, 64 << 10, "the error")
        .await
        .unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<OciError>,
    }
    #[derive(serde::Deserialize)]
    struct OciError {
        code: Option<String>,
        message: Option<String>,
    }
    let detail = serde_json::from_slice::<Errors>(&body)
        .ok()
        .and_then(|e| e.errors.into_iter().next())
        .map(|e| {
            format!(
                " ({}: {})",
                e.code.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    match status {
        StatusCode::NOT_FOUND => {
            anyhow::anyhow!("no {kind} {what}: the registry answered 404{detail}")
        }
        _ => anyhow::anyhow!("the registry refused the {kind} {what}: {status}{detail}"),
    }
}

/// A connection failure, said plainly.
fn connect_error(url: &str, e: reqwest::Error) -> anyhow::Error {
    let mut text = format!("cannot reach {url}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    if url.starts_with("https://") {
        text += " (for a registry served over plain HTTP, pass --insecure or write the \
                 reference as http://HOST/REPO:TAG)";
    }
    anyhow::anyhow!(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_are_parsed() {
        let p = challenge_params(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(
            p.get("realm").map(String::as_str),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(
            p.get("service").map(String::as_str),
            Some("registry.docker.io")
        );
        assert_eq!(
            p.get("scope").map(String::as_str),
            Some("repository:library/busybox:pull,push")
        );
        let p = challenge_params("realm=http://a/token, service=x");
        assert_eq!(p.get("realm").map(String::as_str), Some("http://a/token"));
        assert_eq!(p.get("service").map(String::as_str), Some("x"));
    }
}
