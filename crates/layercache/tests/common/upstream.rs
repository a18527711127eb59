//! A real upstream for pull-through-mirror tests, and a docker daemon to pull through the
//! mirror with.
//!
//! - [`Upstream`]: CNCF distribution (Debian's `docker-registry`, 2.8) on a free
//!   `127.0.0.1` port, over HTTPS with a CA made here by the `openssl` CLI and with
//!   htpasswd (bcrypt) basic auth, or plain HTTP without auth ([`Upstream::start_plain`]).
//!   It can be stopped and started again on the same port and storage, and counts the
//!   requests it answered from its JSON log ([`Upstream::requests`]).
//! - [`push_image`] / [`busybox_image`]: FROM-scratch images written as an OCI image
//!   layout on disk (uncompressed tar layers, so each layer's digest is its diff_id: a
//!   static busybox, pseudo-random files of up to hundreds of MiB written streaming,
//!   small files) and copied into an upstream with skopeo, keeping the OCI manifest.
//! - [`Dockerd`]: a second dockerd (Debian's 20.10), apart from the system one at
//!   `/var/run/docker.sock`, with its own data root, exec root (so its own containerd),
//!   socket and `daemon.json`, and `--registry-mirror` set. Both `docker pull` and a
//!   BuildKit `docker build` of a `FROM` image go through the mirror.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest as _;

use super::{run, run_ok};

/// The user the HTTPS upstream accepts (htpasswd, bcrypt).
pub const USER: &str = "upstream-user";

/// [`USER`]'s password.
pub const PASSWORD: &str = "upstream-pass";

/// The media type of an uncompressed OCI layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// The media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// The query a request [`Upstream::requests`] sends to know the log is complete carries;
/// such requests are left out of every count.
const SYNC_QUERY: &str = "upstream-fixture-sync";

/// How long the registry may take to answer after it is spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a dockerd may take to answer `docker info`, and to stop.
const DOCKERD_TIMEOUT: Duration = Duration::from_secs(60);

/// A request the upstream answered, from its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, `PUT`…
    pub method: String,
    /// The request target: path and query (`/v2/library/base/blobs/sha256:…`).
    pub uri: String,
    /// The response status.
    pub status: u16,
}

/// A distribution registry on a free `127.0.0.1` port, in a temporary directory it owns
/// (configuration, certificates, htpasswd, storage, logs); killed when dropped.
pub struct Upstream {
    child: Option<Child>,
    /// `127.0.0.1:PORT`, as registry clients want it.
    pub host: String,
    /// `https://127.0.0.1:PORT` (`http://` for [`Upstream::start_plain`]).
    pub url: String,
    /// HTTPS with the CA and basic auth (else plain HTTP, no auth).
    secure: bool,
    /// Requests [`Upstream::requests`] sent to know the log is complete.
    syncs: AtomicU64,
    dir: tempfile::TempDir,
}

impl Upstream {
    /// Start a registry serving HTTPS with a new CA (see [`Upstream::ca_file`]) and
    /// requiring [`USER`]/[`PASSWORD`]; returns once `GET /v2/` answers 401.
    pub fn start() -> Upstream {
        Upstream::launch(true)
    }

    /// Start a registry serving plain HTTP without auth (a stand-in mirror, say); returns
    /// once `GET /v2/` answers 200.
    pub fn start_plain() -> Upstream {
        Upstream::launch(false)
    }

    fn launch(secure: bool) -> Upstream {
        let dir = tempfile::Builder::new()
            .prefix("upstream.")
            .tempdir()
            .unwrap();
        if secure {
            make_certificates(dir.path());
            let out = run_ok(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]));
            std::fs::write(dir.path().join("htpasswd"), out.trim()).unwrap();
        }
        let mut upstream = Upstream {
            child: None,
            host: String::new(),
            url: String::new(),
            secure,
            syncs: AtomicU64::new(0),
            dir,
        };
        // A port found free may be taken before the registry binds it: try another.
        let mut errors = Vec::new();
        for _ in 0..5 {
            let port = super::free_port();
            upstream.host = format!("127.0.0.1:{port}");
            let scheme = if secure { "https" } else { "http" };
            upstream.url = format!("{scheme}://{}", upstream.host);
            match upstream.spawn() {
                Ok(()) => return upstream,
                Err(e) => errors.push(e),
            }
        }
        panic!("the upstream registry did not start: {errors:#?}");
    }

    /// The directory `start` made everything in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM) the HTTPS upstream's certificate is signed with (for
    /// `curl --cacert`, a `reqwest::Certificate`, a server's upstream CA setting).
    pub fn ca_file(&self) -> PathBuf {
        assert!(self.secure, "the plain upstream has no CA");
        self.dir.path().join("ca.crt")
    }

    /// A directory holding only `ca.crt`, as skopeo's `--cert-dir`,
    /// `--src-cert-dir` and `--dest-cert-dir` want it.
    pub fn cert_dir(&self) -> PathBuf {
        assert!(self.secure, "the plain upstream has no CA");
        self.dir.path().join("certs")
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `https://127.0.0.1:PORT/v2/<repository>/blobs/<digest>`.
    pub fn blob_url(&self, repository: &str, digest: &str) -> String {
        self.at(&format!("/v2/{repository}/blobs/{digest}"))
    }

    /// skopeo flags for commands naming only this registry (`inspect`, `list-tags`,
    /// `delete`): `--creds` and `--cert-dir`, or `--tls-verify=false` for the plain one.
    pub fn skopeo_args(&self) -> Vec<String> {
        self.skopeo_flags("--")
    }

    /// skopeo `copy` flags for this registry as the source (`--src-creds`, …).
    pub fn skopeo_src_args(&self) -> Vec<String> {
        self.skopeo_flags("--src-")
    }

    /// skopeo `copy` flags for this registry as the destination (`--dest-creds`, …).
    pub fn skopeo_dest_args(&self) -> Vec<String> {
        self.skopeo_flags("--dest-")
    }

    fn skopeo_flags(&self, prefix: &str) -> Vec<String> {
        if self.secure {
            vec![
                format!("{prefix}creds={USER}:{PASSWORD}"),
                format!("{prefix}cert-dir={}", self.cert_dir().display()),
            ]
        } else {
            vec![format!("{prefix}tls-verify=false")]
        }
    }

    /// Whether the registry process is running (not [`Upstream::stop`]ped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill the registry (its storage and log stay).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the registry again after [`Upstream::stop`], on the same port and storage.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the upstream is running");
        let mut errors = Vec::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => errors.push(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "the upstream did not start again on {}: {errors:#?}",
            self.host
        );
    }

    /// Write the configuration for `self.host`, spawn the registry, wait until it answers.
    fn spawn(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let config = dir.join("config.yml");
        std::fs::write(&config, self.config()).unwrap();
        let append = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .unwrap()
        };
        let log_start = std::fs::metadata(dir.join("registry.log")).map_or(0, |m| m.len());
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(append("access.log"))
            .stderr(append("registry.log"))
            .spawn()
            .map_err(|e| format!("spawn docker-registry: {e}"))?;
        self.child = Some(child);
        let ready = if self.secure { 401 } else { 200 };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = self.log();
                let tail = log.get(log_start as usize..).unwrap_or(&log);
                return Err(format!("docker-registry exited ({status}):\n{tail}"));
            }
            if self.get("/v2/", false) == Ok(ready) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("no {ready} from {} in {READY_TIMEOUT:?}", self.url));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// distribution's configuration: filesystem storage, JSON log at `info` (one
    /// `response completed` line per answered request) and the combined access log.
    fn config(&self) -> String {
        let dir = self.dir.path().display();
        let mut config = format!(
            "version: 0.1
log:
  level: info
  formatter: json
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {dir}/storage
  delete:
    enabled: true
http:
  addr: {host}
  secret: upstream-fixture-secret
",
            host = self.host
        );
        if self.secure {
            config.push_str(&format!(
                "  tls:
    certificate: {dir}/server.crt
    key: {dir}/server.key
auth:
  htpasswd:
    realm: upstream
    path: {dir}/htpasswd
"
            ));
        }
        config
    }

    /// `GET path` (with the credentials if `auth` and the upstream wants them): the
    /// status, or why there was none. A thread of its own runs it, so async tests may
    /// call this too.
    fn get(&self, path: &str, auth: bool) -> Result<u16, String> {
        let url = self.at(path);
        let ca = self
            .secure
            .then(|| std::fs::read(self.dir.path().join("ca.crt")).unwrap());
        let auth = auth && self.secure;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async move {
                        let mut builder = reqwest::Client::builder()
                            .timeout(Duration::from_secs(10))
                            .no_proxy();
                        if let Some(ca) = ca {
                            builder = builder
                                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
                        }
                        let mut request = builder.build().unwrap().get(&url);
                        if auth {
                            request = request.basic_auth(USER, Some(PASSWORD));
                        }
                        match request.send().await {
                            Ok(response) => Ok(response.status().as_u16()),
                            Err(e) => Err(format!("GET {url}: {e:?}")),
                        }
                    })
                })
                .join()
                .unwrap()
        })
    }

    /// How many requests with `method` whose target (path and query) contains
    /// `path_contains` the registry has answered, over every start: e.g.
    /// `requests("GET", "/blobs/sha256:…")` counts blob downloads. Only requests that got
    /// past auth count (a 401 challenge is answered before the request is read for what
    /// it asks, and distribution logs it only in the access log); a 404 does.
    pub fn requests(&self, method: &str, path_contains: &str) -> usize {
        self.answered()
            .iter()
            .filter(|r| r.method == method && r.uri.contains(path_contains))
            .count()
    }

    /// Every request the registry answered past auth, in order (see
    /// [`Upstream::requests`]). While the registry runs, a request of its own makes sure
    /// the log holds every request answered before the call.
    pub fn answered(&self) -> Vec<Request> {
        self.settle();
        parse_log(&self.log())
            .into_iter()
            .filter(|r| !r.uri.contains(SYNC_QUERY))
            .collect()
    }

    /// distribution writes a request's log line after the response: send a request and
    /// wait for its line, by when the lines of requests answered before are written.
    fn settle(&self) {
        if self.child.is_none() {
            return;
        }
        let n = self.syncs.fetch_add(1, Ordering::Relaxed);
        let path = format!("/v2/?{SYNC_QUERY}={n}");
        if self.get(&path, true).is_err() {
            // Not answering (killed from outside?): the log is what it is.
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !parse_log(&self.log()).iter().any(|r| r.uri == path) {
            assert!(
                Instant::now() < deadline,
                "{path} never showed in the upstream's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The registry's log so far (JSON lines, every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's access log so far (combined log format, every request including
    /// 401 challenges).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The answered requests in a distribution log: its `response completed` (2xx, 3xx) and
/// `response completed with error` (4xx, 5xx) lines, e.g.
/// `{"http.request.method":"GET","http.request.uri":"/v2/r/blobs/sha256:…",
/// "http.response.status":200,"msg":"response completed",…}`.
pub fn parse_log(log: &str) -> Vec<Request> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| {
            entry["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("response completed"))
        })
        .filter_map(|entry| {
            Some(Request {
                method: entry["http.request.method"].as_str()?.to_owned(),
                uri: entry["http.request.uri"].as_str()?.to_owned(),
                status: u16::try_from(entry["http.response.status"].as_u64()?).ok()?,
            })
        })
        .collect()
}

/// `openssl`: a CA (`ca.key`, `ca.crt`, and `certs/ca.crt`) and a server certificate
/// for IP 127.0.0.1 and DNS localhost signed by it (`server.key`, `server.crt`) in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(dir));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "7",
        "-subj",
        "/CN=layercache test upstream CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "7",
        "-extfile",
        "server.ext",
    ]);
    std::fs::create_dir(dir.join("certs")).unwrap();
    std::fs::copy(dir.join("ca.crt"), dir.join("certs/ca.crt")).unwrap();
}

/// A blob of an image: its digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its length in bytes.
    pub size: u64,
}

impl Blob {
    /// An OCI descriptor of the blob.
    pub fn descriptor(&self, media_type: &str) -> Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.size })
    }
}

/// What a layer (an uncompressed tar) holds.
#[derive(Debug, Clone)]
pub enum Layer {
    /// `bin/busybox` (the static `/bin/busybox` of Debian's busybox-static) and a
    /// `bin/sh` symlink to it: enough for `docker run IMAGE /bin/busybox sh -c …` and a
    /// `RUN` in either form.
    Busybox,
    /// One file at `path` of `len` pseudo-random bytes of stream `seed`
    /// (`common::chunks`), written streaming: hundreds of MiB need little memory.
    Random {
        /// The file's path in the layer (`data/big.bin`).
        path: String,
        /// Which stream.
        seed: u64,
        /// How many bytes.
        len: u64,
    },
    /// Small regular files (path, contents).
    Files(Vec<(String, Vec<u8>)>),
}

/// An image pushed into an upstream.
#[derive(Debug, Clone)]
pub struct Image {
    /// `library/base`.
    pub repository: String,
    /// `1`.
    pub tag: String,
    /// `sha256:` digest of the manifest (an OCI image manifest).
    pub manifest_digest: String,
    /// The manifest's bytes, as pushed.
    pub manifest: Vec<u8>,
    /// The config blob.
    pub config: Blob,
    /// The layers, bottom first (uncompressed tars: each digest is also the diff_id).
    pub layers: Vec<Blob>,
}

impl Image {
    /// `repository:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// Build an image of `layers` (config: amd64, linux, `Cmd` `/bin/busybox sh`, the right
/// `rootfs.diff_ids`) as an OCI layout in a temporary directory and copy it into
/// `upstream` as `reference` (`repository:tag`) with `skopeo copy --preserve-digests`
/// (so the manifest stays OCI and the layers uncompressed). The same arguments make the
/// same digests.
pub fn push_image(upstream: &Upstream, reference: &str, layers: &[Layer]) -> Image {
    let (repository, tag) = reference
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .unwrap_or_else(|| panic!("{reference:?} is not repository:tag"));
    let tmp = tempfile::Builder::new()
        .prefix("upstream-image.")
        .tempdir()
        .unwrap();
    let layout = tmp.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    let blobs: Vec<Blob> = layers.iter().map(|l| write_layer(&layout, l)).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/busybox", "sh"] },
        "rootfs": {
            "type": "layers",
            "diff_ids": blobs.iter().map(|b| b.digest.clone()).collect::<Vec<_>>(),
        },
    });
    let config = write_blob(&layout, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(OCI_CONFIG),
        "layers": blobs.iter().map(|b| b.descriptor(LAYER_TAR)).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest_blob = write_blob(&layout, &manifest);
    let mut descriptor = manifest_blob.descriptor(OCI_MANIFEST);
    descriptor["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();

    let digest_file = tmp.path().join("digest");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--preserve-digests", "--digestfile"])
            .arg(&digest_file)
            .args(upstream.skopeo_dest_args())
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{reference}", upstream.host)),
    );
    let pushed = std::fs::read_to_string(&digest_file).unwrap();
    assert_eq!(
        pushed.trim(),
        manifest_blob.digest,
        "skopeo changed the manifest of {reference}"
    );
    Image {
        repository: repository.to_owned(),
        tag: tag.to_owned(),
        manifest_digest: manifest_blob.digest,
        manifest,
        config,
        layers: blobs,
    }
}

/// Push a one-layer [`Layer::Busybox`] image as `reference` (`library/base:1`): a base
/// for `docker run` and for a Dockerfile's `FROM` + `RUN`.
pub fn busybox_image(upstream: &Upstream, reference: &str) -> Image {
    push_image(upstream, reference, &[Layer::Busybox])
}

/// Write `bytes` as a blob of the layout at `layout`.
fn write_blob(layout: &Path, bytes: &[u8]) -> Blob {
    let digest = super::digest_of(bytes);
    std::fs::write(blob_path(layout, &digest), bytes).unwrap();
    Blob {
        digest,
        size: bytes.len() as u64,
    }
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Write `layer` as an uncompressed tar blob of the layout at `layout`, streaming and
/// hashing on the way.
fn write_layer(layout: &Path, layer: &Layer) -> Blob {
    let staging = layout.join("blobs/sha256/.staging");
    let mut tar = TarWriter {
        out: BufWriter::with_capacity(1 << 20, File::create(&staging).unwrap()),
        hasher: sha2::Sha256::new(),
        len: 0,
    };
    match layer {
        Layer::Busybox => {
            let mut busybox = File::open("/bin/busybox")
                .expect("a static busybox at /bin/busybox (Debian busybox-static)");
            let len = busybox.metadata().unwrap().len();
            tar.header("bin/", 0o755, b'5', 0, "");
            tar.header("bin/busybox", 0o755, b'0', len, "");
            let mut buf = vec![0u8; 1 << 20];
            let mut left = len;
            while left > 0 {
                let n = busybox.read(&mut buf).unwrap();
                assert!(n > 0, "/bin/busybox shrank while read");
                tar.write(&buf[..n]);
                left = left.saturating_sub(n as u64);
            }
            tar.pad(len);
            tar.header("bin/sh", 0o777, b'2', 0, "busybox");
        }
        Layer::Random { path, seed, len } => {
            tar.header(path, 0o644, b'0', *len, "");
            let len_usize = usize::try_from(*len).unwrap();
            for chunk in super::chunks(*seed, len_usize, 1 << 20) {
                tar.write(&chunk);
            }
            tar.pad(*len);
        }
        Layer::Files(files) => {
            for (path, contents) in files {
                tar.header(path, 0o644, b'0', contents.len() as u64, "");
                tar.write(contents);
                tar.pad(contents.len() as u64);
            }
        }
    }
    tar.write(&[0; 1024]);
    tar.out.flush().unwrap();
    let blob = Blob {
        digest: format!("sha256:{}", hex::encode(tar.hasher.finalize())),
        size: tar.len,
    };
    std::fs::rename(&staging, blob_path(layout, &blob.digest)).unwrap();
    blob
}

/// A tar archive being written to a file and hashed.
struct TarWriter {
    out: BufWriter<File>,
    hasher: sha2::Sha256,
    len: u64,
}

impl TarWriter {
    fn write(&mut self, bytes: &[u8]) {
        self.out.write_all(bytes).unwrap();
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Zeros up to the next 512-byte boundary after `len` bytes of content.
    fn pad(&mut self, len: u64) {
        let pad = (512 - len % 512) % 512;
        self.write(&vec![0; pad as usize]);
    }

    /// A ustar header: `kind` `b'0'` regular file, `b'2'` symlink to `link`, `b'5'`
    /// directory; owned by root, mtime 0 (the same input makes the same bytes).
    fn header(&mut self, path: &str, mode: u32, kind: u8, len: u64, link: &str) {
        assert!(
            path.len() <= 100 && link.len() <= 100,
            "{path}: name too long"
        );
        let mut h = [0u8; 512];
        let mut field = |offset: usize, value: &[u8]| {
            h[offset..offset + value.len()].copy_from_slice(value);
        };
        field(0, path.as_bytes());
        field(100, format!("{mode:07o}\0").as_bytes());
        field(108, b"0000000\0");
        field(116, b"0000000\0");
        field(124, format!("{len:011o}\0").as_bytes());
        field(136, b"00000000000\0");
        field(148, b"        ");
        field(156, &[kind]);
        field(157, link.as_bytes());
        field(257, b"ustar\0");
        field(263, b"00");
        field(265, b"root");
        field(297, b"root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.write(&h);
    }
}

/// A second dockerd, apart from the system one: its own data root, exec root (and so
/// its own containerd, which it launches, with its socket, state and runc root under
/// them), pidfile, socket and an empty `daemon.json`, no iptables, no bridge (run
/// containers and builds with `--network=none`), and `--registry-mirror`. Its
/// directory is under `/var/tmp`, a real filesystem overlay2 works on (vfs otherwise).
/// Stopped with SIGTERM when dropped.
pub struct Dockerd {
    child: Option<Child>,
    /// `unix://<dir>/docker.sock`.
    pub host: String,
    /// The storage driver it runs with: `overlay2`, or `vfs` where overlay2 fails.
    pub storage_driver: &'static str,
    dir: tempfile::TempDir,
}

impl Dockerd {
    /// Start a dockerd whose mirror for Docker Hub (`docker.io`) is `registry_mirror`
    /// (`http://127.0.0.1:PORT` or `https://…`), which is also an insecure registry: over
    /// HTTP BuildKit then speaks plain HTTP to it, and over HTTPS no CA is checked (the
    /// daemon could trust a CA only from the system-wide `/etc/docker/certs.d`). Returns
    /// once `docker info` answers.
    pub fn start(registry_mirror: &str) -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("lc-dockerd.")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::write(dir.path().join("daemon.json"), "{}").unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        let mut dockerd = Dockerd {
            child: None,
            host: format!("unix://{}/docker.sock", dir.path().display()),
            storage_driver: "overlay2",
            dir,
        };
        let mut errors = Vec::new();
        for driver in ["overlay2", "vfs"] {
            dockerd.storage_driver = driver;
            match dockerd.spawn(registry_mirror) {
                Ok(()) => return dockerd,
                Err(e) => {
                    dockerd.stop();
                    errors.push(e);
                }
            }
        }
        panic!("the second dockerd did not start: {errors:#?}");
    }

    fn spawn(&mut self, mirror: &str) -> Result<(), String> {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dockerd.log"))
            .unwrap();
        let child = Command::new("/usr/sbin/dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join(format!("data-{}", self.storage_driver)))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["-H", &self.host])
            .args(["--storage-driver", self.storage_driver])
            .args(["--iptables=false", "--ip-masq=false", "--ip-forward=false"])
            .args(["--bridge=none", "--userland-proxy=false"])
            .args(["--registry-mirror", mirror, "--insecure-registry", mirror])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn dockerd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + DOCKERD_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "dockerd ({}) exited ({status}):\n{}",
                    self.storage_driver,
                    self.log()
                ));
            }
            let (ok, _) = run(&mut self.docker(&["info", "--format", "{{.ServerVersion}}"]));
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dockerd ({}) did not answer in {DOCKERD_TIMEOUT:?}:\n{}",
                    self.storage_driver,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/usr/bin/docker` (Debian's 20.10 client) against this daemon, with
    /// `DOCKER_BUILDKIT=1` and a private `DOCKER_CONFIG`, running `args`.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut command = Command::new("/usr/bin/docker");
        command
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .env("DOCKER_BUILDKIT", "1")
            .env("DOCKER_CONFIG", self.dir.path().join("config"))
            .args(["-H", &self.host])
            .args(args);
        command
    }

    /// The daemon's log so far (its containerd's included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// The directory everything of this daemon is under.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGTERM the daemon and wait for it (SIGKILL after a minute, then its containerd
    /// too); unmount whatever is left mounted under its directory.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + DOCKERD_TIMEOUT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // dockerd stops the containerd it launched, unless it was killed.
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours =
                String::from_utf8_lossy(&cmdline).contains(&*self.dir.path().to_string_lossy());
            if ours {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        for mount in mounts_under(self.dir.path()).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Mount points under `dir`, in mount order (`/proc/self/mountinfo`).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let unescape = |field: &str| {
        // Spaces, tabs, newlines and backslashes are escaped as `\ooo`.
        let mut out = Vec::new();
        let bytes = field.as_bytes();
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            let octal = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            match octal {
                Some(v) if b == b'\\' => {
                    out.push(v);
                    i += 4;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        PathBuf::from(String::from_utf8_lossy(&out).into_owned())
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape))
        .filter(|mount| mount.starts_with(dir))
        .collect()
}
