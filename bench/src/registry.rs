//! A small OCI distribution client for the workloads. Every call checks the response and
//! fails with the server's own answer unless it is a 2xx, so a figure only ever counts
//! successful requests.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Client, Response, StatusCode, Url};

use crate::loadgen::{self, Target};
use crate::payload::Blob;

/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index (also BuildKit's registry cache manifest).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The HTTP client every workload shares: no proxy, no Nagle, a pool large enough to
/// keep one connection per concurrent task.
pub fn http_client() -> Result<Client> {
    http_client_with(reqwest::header::HeaderMap::new())
}

/// [`http_client`] sending `headers` with every request.
pub fn http_client_with(headers: reqwest::header::HeaderMap) -> Result<Client> {
    Client::builder()
        .default_headers(headers)
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(900))
        .build()
        .context("building the HTTP client")
}

/// One registry, addressed by its base URL.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    base: Url,
    /// The `Authorization` header the client sends, for [`target`](Self::target).
    authorization: Option<String>,
}

impl Registry {
    /// A client for the registry at `base` (`http://HOST:PORT`).
    pub fn new(client: Client, base: &str) -> Result<Registry> {
        let base = Url::parse(base).with_context(|| format!("registry URL {base:?}"))?;
        Ok(Registry {
            client,
            base,
            authorization: None,
        })
    }

    /// This registry, whose client sends `authorization` with every request.
    pub fn with_authorization(self, authorization: String) -> Registry {
        Registry {
            authorization: Some(authorization),
            ..self
        }
    }

    /// Where the load generator sends its requests.
    pub fn target(&self) -> Result<Target> {
        let host = self.base.host_str().context("registry URL without host")?;
        let port = self
            .base
            .port_or_known_default()
            .context("registry URL port")?;
        Ok(Target {
            authority: format!("{host}:{port}"),
            authorization: self.authorization.clone(),
        })
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("joining {path:?} to {}", self.base))
    }

    fn location(&self, response: &Response) -> Result<Url> {
        let location = response
            .headers()
            .get(LOCATION)
            .context("upload response without Location")?
            .to_str()
            .context("Location is not text")?;
        self.url(location)
    }

    /// `GET /v2/`.
    pub async fn ping(&self) -> Result<()> {
        let response = self.client.get(self.url("/v2/")?).send().await?;
        success(response, "GET /v2/").await.map(drop)
    }

    /// `POST /v2/<repo>/blobs/uploads/`; returns the upload's location.
    async fn start_upload(&self, repo: &str) -> Result<Url> {
        let response = self
            .client
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/"))?)
            .header(CONTENT_LENGTH, 0)
            .send()
            .await?;
        let response = success(response, "start upload").await?;
        self.location(&response)
    }

    /// Monolithic push: `POST` then `PUT <Location>?digest=` with the whole body.
    pub async fn push(&self, repo: &str, blob: &Blob) -> Result<()> {
        let mut url = self.start_upload(repo).await?;
        url.query_pairs_mut().append_pair("digest", &blob.digest);
        let response = self
            .client
            .put(url)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, blob.len)
            .body(blob.body())
            .send()
            .await?;
        success(response, "monolithic PUT").await.map(drop)
    }

    /// Chunked push: `POST`, one `PATCH` with `Content-Range` per part of about `chunk`
    /// bytes (following each new `Location`), then `PUT ?digest=` without a body.
    pub async fn push_chunked(&self, repo: &str, blob: &Blob, chunk: usize) -> Result<()> {
        let mut url = self.start_upload(repo).await?;
        for part in blob.parts(chunk) {
            let last = (part.offset + part.len).saturating_sub(1);
            let response = self
                .client
                .patch(url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, part.len)
                .header(CONTENT_RANGE, format!("{}-{last}", part.offset))
                .body(part.body())
                .send()
                .await?;
            let response = success(response, "PATCH chunk").await?;
            url = self.location(&response)?;
        }
        url.query_pairs_mut().append_pair("digest", &blob.digest);
        let response = self
            .client
            .put(url)
            .header(CONTENT_LENGTH, 0)
            .send()
            .await?;
        success(response, "closing PUT").await.map(drop)
    }

    /// `HEAD` a blob: `true` if it exists, `false` on 404, an error otherwise.
    pub async fn exists(&self, repo: &str, digest: &str) -> Result<bool> {
        let response = self
            .client
            .head(self.url(&format!("/v2/{repo}/blobs/{digest}"))?)
            .send()
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        success(response, "HEAD blob").await.map(|_| true)
    }

    /// `GET` a blob, reading and discarding the body; returns its length (see
    /// [`loadgen::get_discarding`]).
    pub async fn pull(&self, repo: &str, digest: &str) -> Result<u64> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        loadgen::get_discarding(&self.target()?, url.path()).await
    }

    /// `GET` a blob, appending its body to `out`; fails rather than grow `out` past its
    /// capacity (a caller that sized it for the blob never pays for a reallocation, and a
    /// body longer than the blob is an error).
    pub async fn pull_into(&self, repo: &str, digest: &str, out: &mut Vec<u8>) -> Result<()> {
        let response = self
            .client
            .get(self.url(&format!("/v2/{repo}/blobs/{digest}"))?)
            .send()
            .await?;
        let mut response = success(response, "GET blob").await?;
        while let Some(chunk) = response.chunk().await? {
            if out.len() + chunk.len() > out.capacity() {
                bail!(
                    "GET {repo}@{digest}: more than the {} bytes expected",
                    out.capacity()
                );
            }
            out.extend_from_slice(&chunk);
        }
        Ok(())
    }

    /// `PUT /v2/<repo>/manifests/<reference>`.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<()> {
        let response = self
            .client
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}"))?)
            .header(CONTENT_TYPE, media_type)
            .body(body)
            .send()
            .await?;
        success(response, "PUT manifest").await.map(drop)
    }

    /// The body of `GET /v2/<repo>/manifests/<reference>` with `accept`.
    async fn manifest(&self, repo: &str, reference: &str, accept: &str) -> Result<Bytes> {
        let response = self
            .client
            .get(self.url(&format!("/v2/{repo}/manifests/{reference}"))?)
            .header(ACCEPT, accept)
            .send()
            .await?;
        Ok(success(response, "GET manifest").await?.bytes().await?)
    }

    /// The bytes of the layers of the image manifest `repo:reference` (OCI or Docker
    /// schema 2), as the manifest states them.
    pub async fn image_bytes(&self, repo: &str, reference: &str) -> Result<u64> {
        #[derive(serde::Deserialize)]
        struct Manifest {
            layers: Vec<Layer>,
        }
        #[derive(serde::Deserialize)]
        struct Layer {
            size: u64,
        }
        let accept =
            format!("{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json");
        let body = self.manifest(repo, reference, &accept).await?;
        let manifest: Manifest = serde_json::from_slice(&body)
            .with_context(|| format!("the image manifest of {repo}:{reference}"))?;
        Ok(manifest.layers.iter().map(|l| l.size).sum())
    }

    /// `DELETE /v2/<repo>/manifests/<digest>`: the manifest and the tags pointing at it.
    pub async fn delete_manifest(&self, repo: &str, digest: &str) -> Result<()> {
        let response = self
            .client
            .delete(self.url(&format!("/v2/{repo}/manifests/{digest}"))?)
            .send()
            .await?;
        success(response, "DELETE manifest").await.map(drop)
    }

    /// `GET` a JSON document from the server's own API (such as `/api/v1/gc`).
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self.client.get(self.url(path)?).send().await?;
        let body = success(response, "GET").await?.bytes().await?;
        serde_json::from_slice(&body).with_context(|| format!("the JSON of GET {path}"))
    }
}

/// The response if it is a 2xx, else an error carrying the status and the body.
async fn success(response: Response, what: &str) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let url = response.url().clone();
    let body = response.text().await.unwrap_or_default();
    bail!(
        "{what} {url}: {status}: {}",
        body.chars().take(500).collect::<String>()
    )
}
