//! Shared pieces of the OCI distribution conformance suite (`conformance_*.rs`): a small
//! client for the `/v2/` API, content builders, exact error-body checks, and a raw HTTP
//! sender for requests a URL library would normalise away (`..`, `%2F`, bad methods).

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Server, digest_of};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const BUILDKIT_CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";

/// A digest nothing is ever stored under.
pub const ABSENT_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A client of one server. Build a new one after `Server::restart` (the old connection
/// pool points at the dead process).
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(server: &Server) -> Api {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Api {
            http,
            base: server.url.clone(),
        }
    }

    /// `base` + `path`, or `path` itself when it is already absolute.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(Method::GET, path).send().await.unwrap()
    }

    /// `GET` with one extra header.
    pub async fn get_with(&self, path: &str, name: &str, value: &str) -> reqwest::Response {
        let request = self.request(Method::GET, path).header(name, value);
        request.send().await.unwrap()
    }

    pub async fn head(&self, path: &str) -> reqwest::Response {
        self.request(Method::HEAD, path).send().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.request(Method::DELETE, path).send().await.unwrap()
    }

    /// `POST /v2/<repo>/blobs/uploads/`, asserting 202; returns the `Location`.
    pub async fn start_upload(&self, repo: &str) -> String {
        let resp = self
            .request(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .header("content-length", "0")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "start upload in {repo}"
        );
        header(&resp, "location")
    }

    /// Push a blob the way BuildKit does (`POST` a session, one `PUT ?digest=` with the
    /// body); returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = digest_of(bytes);
        let location = self.start_upload(repo).await;
        let resp = self
            .request(Method::PUT, &with_query(&location, "digest", &digest))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "push blob {digest}");
        digest
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `media_type` as `Content-Type`.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> reqwest::Response {
        self.request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Put a manifest and assert 201 with the spec's headers; returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let digest = digest_of(body);
        let resp = self.put_manifest(repo, reference, media_type, body).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "put manifest {repo}:{reference}: {}",
            resp.text().await.unwrap_or_default()
        );
        assert_eq!(
            header(&resp, "location"),
            format!("/v2/{repo}/manifests/{digest}")
        );
        assert_eq!(header(&resp, "docker-content-digest"), digest);
        digest
    }

    /// Push a config blob and `layers` blobs and an OCI image manifest naming them
    /// under `reference`; returns the image.
    pub async fn push_image(&self, repo: &str, reference: &str, seed: u8) -> Image {
        let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}");
        let config = descriptor(OCI_CONFIG, config.as_bytes());
        self.push_blob(repo, &config.bytes).await;
        let mut layers = Vec::new();
        for i in 0..2u8 {
            let layer = descriptor(OCI_LAYER, &pseudo_random(seed, i, 1000 + usize::from(i)));
            self.push_blob(repo, &layer.bytes).await;
            layers.push(layer);
        }
        let manifest = image_manifest(OCI_MANIFEST, &config, &layers, None);
        let digest = self
            .push_manifest(repo, reference, OCI_MANIFEST, &manifest)
            .await;
        Image {
            config,
            layers,
            manifest,
            digest,
        }
    }
}

/// An image pushed by [`Api::push_image`].
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

/// Some content and the descriptor a manifest would use for it.
#[derive(Clone)]
pub struct Blob {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl Blob {
    pub fn json(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> Blob {
    Blob {
        media_type: media_type.to_owned(),
        bytes: bytes.to_vec(),
        digest: digest_of(bytes),
    }
}

/// An image manifest (OCI or Docker schema 2) over `config` and `layers`, optionally
/// with extra top-level fields (`subject`, `artifactType`, `annotations`).
pub fn image_manifest(
    media_type: &str,
    config: &Blob,
    layers: &[Blob],
    extra: Option<Value>,
) -> Vec<u8> {
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.json(),
        "layers": layers.iter().map(Blob::json).collect::<Vec<_>>(),
    });
    if let (Some(Value::Object(extra)), Some(obj)) = (extra, manifest.as_object_mut()) {
        obj.extend(extra);
    }
    serde_json::to_vec(&manifest).unwrap()
}

/// An index (OCI index or Docker manifest list) of `manifests` descriptors.
pub fn index(media_type: &str, manifests: &[Value], extra: Option<Value>) -> Vec<u8> {
    let mut index = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    });
    if let (Some(Value::Object(extra)), Some(obj)) = (extra, index.as_object_mut()) {
        obj.extend(extra);
    }
    serde_json::to_vec(&index).unwrap()
}

/// A descriptor of a manifest body.
pub fn manifest_descriptor(media_type: &str, body: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": digest_of(body), "size": body.len() })
}

/// `len` deterministic bytes, different for every `(seed, stream)`.
pub fn pseudo_random(seed: u8, stream: u8, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(u64::from(seed) << 8 | u64::from(stream));
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    buf
}

/// `location` with `name=value` appended to its query.
pub fn with_query(location: &str, name: &str, value: &str) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}{name}={value}")
}

/// A response header as a string; panics when absent.
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {resp:?}"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// A response header, if present.
pub fn maybe_header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// The upload id at the end of an upload `Location`.
pub fn upload_id(location: &str) -> String {
    let path = location.split('?').next().unwrap();
    path.rsplit('/').next().unwrap().to_owned()
}

/// Assert `resp` is `status` with the spec's error body whose first (and only) error has
/// `code` and a string `message`; returns the error entry.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    let got = resp.status().as_u16();
    let content_type = maybe_header(&resp, "content-type");
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "status (body {text})");
    assert_eq!(
        content_type.as_deref(),
        Some("application/json"),
        "content type of {text}"
    );
    check_error_body(text.as_bytes(), code)
}

/// Check an error body: `{"errors":[{"code":<code>,"message":<string>,…}]}`.
pub fn check_error_body(body: &[u8], code: &str) -> Value {
    let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let errors = value["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors array in {value}"));
    assert_eq!(errors.len(), 1, "one error expected in {value}");
    let entry = errors[0].clone();
    assert_eq!(entry["code"], code, "error code in {value}");
    assert!(entry["message"].is_string(), "message in {value}");
    entry
}

/// Assert a HEAD (or other bodiless) response is a plain `status`.
pub fn expect_status(resp: &reqwest::Response, status: u16) {
    assert_eq!(resp.status().as_u16(), status, "{resp:?}");
}

/// The JSON body of a 200 response.
pub async fn json_ok(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// A raw HTTP/1.1 exchange, for request lines a URL library would rewrite.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send `method target` (written to the wire verbatim) with `body` over a fresh
/// connection and read the whole answer; panics if the server takes over 10 s.
pub async fn raw_request(host: &str, method: &str, target: &str, body: &[u8]) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {target} hung"));
    parse_raw(&answer, method == "HEAD")
}

fn parse_raw(answer: &[u8], head: bool) -> RawResponse {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(answer)));
    let text = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let raw_body = &answer[split + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if head {
        Vec::new()
    } else if chunked {
        dechunk(raw_body)
    } else {
        raw_body.to_vec()
    };
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..eol]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
    out
}
