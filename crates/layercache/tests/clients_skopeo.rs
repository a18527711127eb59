//! skopeo against layercache: an OCI image layout with a 256 MiB layer is copied into the
//! registry and back out unchanged, inspected, listed by tag and deleted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::Digest as _;

const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A blob written into a layout: its digest and size.
#[derive(Debug, Clone)]
struct Blob {
    digest: String,
    size: u64,
}

impl Blob {
    fn descriptor(&self, media_type: &str) -> Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.size })
    }
}

/// An OCI image layout being written on disk (`oci-layout`, `index.json`, `blobs/sha256/`).
struct Layout {
    dir: PathBuf,
    manifests: Vec<Value>,
}

impl Layout {
    fn create(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_owned(),
            manifests: Vec::new(),
        }
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn add_blob(&self, bytes: &[u8]) -> Blob {
        let digest = common::digest_of(bytes);
        std::fs::write(self.blob_path(&digest), bytes).unwrap();
        Blob {
            digest,
            size: bytes.len() as u64,
        }
    }

    /// An uncompressed tar layer holding `files` (path, length) of pseudo-random bytes,
    /// streamed to disk and hashed on the way.
    fn add_tar_layer(&self, seed: u64, files: &[(&str, usize)]) -> Blob {
        struct Hashing<W> {
            inner: W,
            hasher: sha2::Sha256,
            len: u64,
        }
        impl<W: Write> Write for Hashing<W> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = self.inner.write(buf)?;
                self.hasher.update(&buf[..n]);
                self.len += n as u64;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.inner.flush()
            }
        }
        let staging = self.dir.join("blobs/sha256/.staging");
        let mut out = Hashing {
            inner: BufWriter::new(File::create(&staging).unwrap()),
            hasher: sha2::Sha256::new(),
            len: 0,
        };
        for (i, &(path, len)) in files.iter().enumerate() {
            out.write_all(&common::tar_header(path, len as u64))
                .unwrap();
            for chunk in common::chunks(seed + i as u64, len, 1 << 20) {
                out.write_all(&chunk).unwrap();
            }
            out.write_all(&vec![0; (512 - len % 512) % 512]).unwrap();
        }
        out.write_all(&[0; 1024]).unwrap();
        out.flush().unwrap();
        let blob = Blob {
            digest: format!("sha256:{}", hex::encode(out.hasher.finalize())),
            size: out.len,
        };
        std::fs::rename(&staging, self.blob_path(&blob.digest)).unwrap();
        blob
    }

    /// An image of `layers`, tagged `tag` in the layout; returns its manifest bytes.
    fn add_image(&mut self, tag: &str, layers: &[Blob]) -> Vec<u8> {
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
            },
        });
        let config = self.add_blob(&serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
            "layers": layers.iter().map(|l| l.descriptor(LAYER_TAR)).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let blob = self.add_blob(&bytes);
        let mut descriptor = blob.descriptor(OCI_MANIFEST);
        descriptor["annotations"] = json!({ REF_NAME: tag });
        self.manifests.push(descriptor);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": self.manifests,
        });
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
        bytes
    }
}

/// Copy `image` out of the registry into a new layout at `dir`; check that the manifest
/// bytes and every layer come back as pushed.
fn pull_unchanged(image: &str, dir: &Path, manifest: &[u8], layers: &[&Blob]) {
    let out = common::run_ok(
        skopeo(&["copy", "--preserve-digests", "--src-tls-verify=false"])
            .arg(image)
            .arg(format!("oci:{}:pulled", dir.display())),
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"][REF_NAME] == "pulled")
        .unwrap_or_else(|| panic!("no image in {index}\n{out}"));
    let digest = common::digest_of(manifest);
    assert_eq!(entry["digest"], digest.as_str(), "{image}");
    let blob = |digest: &str| dir.join("blobs/sha256").join(&digest[7..]);
    let pulled = std::fs::read(blob(&digest)).unwrap();
    assert_eq!(
        pulled, manifest,
        "the manifest of {image} came back changed"
    );
    let pulled: Value = serde_json::from_slice(&pulled).unwrap();
    let pulled_layers: Vec<&str> = pulled["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let pushed_layers: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(pulled_layers, pushed_layers);
    for layer in layers {
        let path = blob(&layer.digest);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), layer.size);
        assert_eq!(
            common::file_digest(&path),
            layer.digest,
            "{image}: layer bytes differ"
        );
    }
}

fn skopeo(args: &[&str]) -> Command {
    let mut command = Command::new("skopeo");
    command.args(args);
    command
}

fn json_of(text: &str) -> Value {
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::Deserializer::from_str(&text[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap_or_else(|e| panic!("bad JSON ({e}) in {text}"))
}

fn tags(host: &str) -> Vec<String> {
    let out = common::run_ok(&mut skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{host}/skopeo/big"),
    ]));
    let mut tags: Vec<String> = json_of(&out)["Tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no Tags in {out}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    tags.sort();
    tags
}

#[test]
fn skopeo_copies_a_large_oci_layout_in_and_out_unchanged_lists_and_deletes_it() {
    if !common::require_tool("skopeo") {
        return;
    }
    let server = common::Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(&tmp.path().join("src"));
    let big = layout.add_tar_layer(1, &[("data/big.bin", 256 << 20)]);
    let small = layout.add_tar_layer(2, &[("etc/motd", 300), ("etc/hosts", 4096)]);
    let tiny = layout.add_tar_layer(3, &[("etc/version", 7)]);
    let manifest = layout.add_image("v1", &[big.clone(), small.clone(), tiny.clone()]);
    let manifest_digest = common::digest_of(&manifest);
    let other = layout.add_image("other", std::slice::from_ref(&small));
    let src = |tag: &str| format!("oci:{}:{tag}", layout.dir.display());
    let dest = |tag: &str| format!("docker://{}/skopeo/big:{tag}", server.host);

    // Push: without --preserve-digests skopeo would gzip the tar layers for a registry.
    let digest_file = tmp.path().join("pushed-digest");
    let copy_in = ["copy", "--preserve-digests", "--dest-tls-verify=false"];
    common::run_ok(
        skopeo(&copy_in)
            .arg("--digestfile")
            .arg(&digest_file)
            .args([src("v1"), dest("v1")]),
    );
    assert_eq!(
        std::fs::read_to_string(&digest_file).unwrap().trim(),
        manifest_digest
    );
    common::run_ok(skopeo(&copy_in).args([src("v1"), dest("v2")]));
    common::run_ok(skopeo(&copy_in).args([src("other"), dest("other")]));

    // Pull into a fresh layout: the same manifest bytes and blobs come back.
    let layers = [&big, &small, &tiny];
    pull_unchanged(&dest("v1"), &tmp.path().join("back"), &manifest, &layers);

    // Inspect shows the manifest digest and the layers, in order.
    let out = common::run_ok(skopeo(&["inspect", "--tls-verify=false"]).arg(dest("v1")));
    let inspected = json_of(&out);
    assert_eq!(inspected["Digest"], manifest_digest.as_str(), "{out}");
    assert_eq!(
        inspected["Layers"],
        json!([big.digest, small.digest, tiny.digest]),
        "{out}"
    );
    let raw = common::run_ok(skopeo(&["inspect", "--raw", "--tls-verify=false"]).arg(dest("v1")));
    assert_eq!(raw.trim_end().as_bytes(), manifest.as_slice());

    assert_eq!(tags(&server.host), ["other", "v1", "v2"]);

    // Copy to another repository of the same registry (skopeo mounts the blobs).
    let mirror = format!("docker://{}/skopeo/mirror:v1", server.host);
    common::run_ok(
        skopeo(&["copy", "--preserve-digests", "--src-tls-verify=false"])
            .arg("--dest-tls-verify=false")
            .args([dest("v1"), mirror.clone()]),
    );

    // Delete resolves the tag and deletes the manifest by digest: every tag of it goes.
    common::run_ok(skopeo(&["delete", "--tls-verify=false"]).arg(dest("v1")));
    for tag in ["v1", "v2"] {
        let (ok, out) = common::run(skopeo(&["inspect", "--tls-verify=false"]).arg(dest(tag)));
        assert!(!ok, "{tag} is still there after the delete:\n{out}");
        assert!(out.contains("manifest unknown"), "{tag}: {out}");
    }
    let raw =
        common::run_ok(skopeo(&["inspect", "--raw", "--tls-verify=false"]).arg(dest("other")));
    assert_eq!(raw.trim_end().as_bytes(), other.as_slice());
    assert_eq!(tags(&server.host), ["other"]);

    // The other repository keeps its copy, blobs included.
    pull_unchanged(&mirror, &tmp.path().join("mirror"), &manifest, &layers);
}
