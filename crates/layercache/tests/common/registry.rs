//! A plain registry client for tests that push and check images over the API: OCI
//! pushes of one-layer images, manifest and blob reads that verify what comes back,
//! and the status and disk figures eviction tests compare.

use std::path::Path;

use bytes::Bytes;
use serde_json::{Value, json};

use super::Server;

/// Manifest types a registry client accepts.
pub const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.index.v1+json";

pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {url}");
    r.json().await.unwrap()
}

/// `GET url` as text (e.g. `/metrics`).
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {url}");
    r.text().await.unwrap()
}

/// The value of the sample named exactly `series` (name and labels) in `/metrics` text,
/// if exported.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub fn field(value: &Value, path: &[&str]) -> u64 {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {value}"))
}

/// Bytes under `dir`, files and directories: (apparent sizes, allocated blocks).
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // Deleted since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        apparent += meta.len();
        allocated += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                pending.push(entry.unwrap().path());
            }
        }
    }
    (apparent, allocated)
}

/// `GET /v2/<repo>/manifests/<reference>`: status and body.
pub async fn get_manifest(
    client: &reqwest::Client,
    server: &Server,
    repo: &str,
    reference: &str,
) -> (u16, Bytes) {
    let r = client
        .get(server.at(&format!("/v2/{repo}/manifests/{reference}")))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap())
}

/// The code of the first error in an OCI error body.
pub fn error_code(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not an OCI error body ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    value["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {value}"))
        .to_owned()
}

/// The digests of a manifest's config and layers.
pub fn blobs_of(manifest: &[u8]) -> Vec<String> {
    let value: Value = serde_json::from_slice(manifest).unwrap();
    let mut blobs = vec![value["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in value["layers"].as_array().unwrap() {
        blobs.push(layer["digest"].as_str().unwrap().to_owned());
    }
    blobs
}

/// `GET` a blob: its status, and for a 200 whether the bytes hash to `digest`; for an
/// error, its code.
pub async fn get_blob(
    client: &reqwest::Client,
    server: &Server,
    repo: &str,
    digest: &str,
) -> Result<(), (u16, String)> {
    let r = client
        .get(server.at(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    if status == 200 {
        assert_eq!(
            super::digest_of(&body),
            digest,
            "{repo}: blob {digest} came back changed"
        );
        Ok(())
    } else {
        Err((status, error_code(&body)))
    }
}

/// An image pushed over the API: a config and one layer.
pub struct Pushed {
    pub repo: String,
    pub manifest: Vec<u8>,
    pub layer: String,
    pub config: String,
}

pub fn random_bytes(seed: u64, len: u64) -> Bytes {
    Bytes::from(
        super::chunks(seed, len as usize, 1 << 20)
            .flat_map(|c| c.to_vec())
            .collect::<Vec<u8>>(),
    )
}

/// Monolithic upload of `bytes` into `repo`.
pub async fn upload(
    client: &reqwest::Client,
    server: &Server,
    repo: &str,
    bytes: Bytes,
) -> reqwest::Response {
    let digest = super::digest_of(&bytes);
    client
        .post(server.at(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .body(bytes)
        .send()
        .await
        .unwrap_or_else(|e| panic!("upload of {digest} to {repo}: {e:?}"))
}

/// Push an image whose layer is `layer` as `repo:v1`.
pub async fn push_image(
    client: &reqwest::Client,
    server: &Server,
    repo: &str,
    layer: Bytes,
) -> Pushed {
    let layer_digest = super::digest_of(&layer);
    let layer_len = layer.len();
    // Like real clients, skip a layer the repository already has.
    let head = client
        .head(server.at(&format!("/v2/{repo}/blobs/{layer_digest}")))
        .send()
        .await
        .unwrap();
    if head.status() != 200 {
        let r = upload(client, server, repo, layer).await;
        assert_eq!(r.status(), 201, "{repo}: {}", r.text().await.unwrap());
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "repo": repo } },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap();
    let config_digest = super::digest_of(&config);
    let config_len = config.len();
    let r = upload(client, server, repo, Bytes::from(config)).await;
    assert_eq!(r.status(), 201, "{repo}: {}", r.text().await.unwrap());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_len,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_len,
        }],
    }))
    .unwrap();
    let r = client
        .put(server.at(&format!("/v2/{repo}/manifests/v1")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{repo}: {}", r.text().await.unwrap());
    Pushed {
        repo: repo.to_owned(),
        manifest,
        layer: layer_digest,
        config: config_digest,
    }
}

/// Delete the image's manifest by digest (its tags go with it), as its owner would.
pub async fn delete_image(client: &reqwest::Client, server: &Server, image: &Pushed) {
    let digest = super::digest_of(&image.manifest);
    let r = client
        .delete(server.at(&format!("/v2/{}/manifests/{digest}", image.repo)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}: DELETE {digest}", image.repo);
}

/// The image is there, manifest and blobs, byte for byte.
pub async fn assert_intact(client: &reqwest::Client, server: &Server, image: &Pushed) {
    let (code, body) = get_manifest(client, server, &image.repo, "v1").await;
    assert_eq!(
        code,
        200,
        "{}: {}",
        image.repo,
        String::from_utf8_lossy(&body)
    );
    assert_eq!(body, image.manifest, "{}", image.repo);
    for digest in [&image.layer, &image.config] {
        get_blob(client, server, &image.repo, digest)
            .await
            .unwrap_or_else(|e| panic!("{}: blob {digest}: {e:?}", image.repo));
    }
}

/// The image's manifest is gone.
pub async fn assert_gone(client: &reqwest::Client, server: &Server, image: &Pushed) {
    let (code, body) = get_manifest(client, server, &image.repo, "v1").await;
    assert_eq!(code, 404, "{} is still there", image.repo);
    assert_eq!(error_code(&body), "MANIFEST_UNKNOWN", "{}", image.repo);
}
