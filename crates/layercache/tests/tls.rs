//! HTTPS with a private CA from `layercache tls init`, in `token` mode, with real
//! clients: dockerd (login, push, pull, a BuildKit build exporting inline cache and a
//! rebuild importing it) trusting the CA from `/etc/docker/certs.d`, buildah and skopeo
//! with `--cert-dir`; each refuses the server without the CA. The certificate follows its
//! files while the server runs (a pair that does not parse keeps the previous one), and
//! SIGHUP reloads it; a handshake that never comes is cut off like a slow request head.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::Server;

/// One docker build at a time: the daemon's build cache is shared.
static DAEMON: Mutex<()> = Mutex::new(());

/// The port the docker test serves on. BuildKit inside dockerd 20.10 reads which
/// `/etc/docker/certs.d/HOST:PORT` directories exist only when dockerd starts, so
/// `scripts/setup-clients.sh` creates this one (on the machine's address) beforehand.
const DOCKER_PORT: u16 = 5443;

const DOCKERFILE: &str = r#"FROM scratch
COPY busybox /bin/busybox
COPY nonce /nonce
RUN ["/bin/busybox", "sh", "-c", "echo built > /built"]
"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `layercache tls init --dir DIR --host …` (and `--force`); its output.
fn tls_init(dir: &Path, hosts: &[&str], force: bool) -> String {
    let mut args = vec!["tls", "init", "--dir", dir.to_str().unwrap()];
    for host in hosts {
        args.extend(["--host", host]);
    }
    if force {
        args.push("--force");
    }
    let out = common::layercache(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// An address of this machine that is not loopback: dockerd skips certificate checks for
/// registries on `127.0.0.0/8`, so a test there would prove nothing about the CA. The
/// first IPv4 address `hostname -I` lists, as `scripts/setup-clients.sh` picks it.
fn machine_ip() -> Option<IpAddr> {
    let usable = |ip: &IpAddr| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified();
    let listed = Command::new("hostname")
        .arg("-I")
        .output()
        .ok()
        .and_then(|out| {
            text(&out.stdout)
                .split_whitespace()
                .filter_map(|word| word.parse().ok())
                .find(usable)
        });
    listed.or_else(|| {
        // Connecting a UDP socket sends nothing: it only picks the outgoing address.
        UdpSocket::bind("0.0.0.0:0")
            .and_then(|socket| socket.connect("198.51.100.1:9").map(|()| socket))
            .and_then(|socket| socket.local_addr())
            .map(|addr| addr.ip())
            .ok()
            .filter(usable)
    })
}

/// The machine's address, or a skip (a failure where real clients are required).
fn require_machine_ip() -> Option<IpAddr> {
    let ip = machine_ip();
    if ip.is_none() {
        let required = std::env::var("REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1")
            || std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!required, "no address other than loopback to serve TLS on");
        eprintln!("SKIPPED: no address other than loopback");
    }
    ip
}

/// A server in `token` mode serving HTTPS on `listen` with a certificate for `hosts`
/// from a new CA in `<tmp>/tls`.
struct TlsServer {
    server: Server,
    tls: PathBuf,
    _tmp: tempfile::TempDir,
}

impl TlsServer {
    fn start(listen: &str, hosts: &[&str], extra: &[(&str, &str)]) -> TlsServer {
        let tmp = tempfile::tempdir().unwrap();
        let tls = tmp.path().join("tls");
        tls_init(&tls, hosts, false);
        let cert = tls.join("server.crt");
        let key = tls.join("server.key");
        let mut env = vec![
            ("LAYERCACHE_SERVER__AUTH__MODE", "token"),
            ("LAYERCACHE_SERVER__TLS__CERT", cert.to_str().unwrap()),
            ("LAYERCACHE_SERVER__TLS__KEY", key.to_str().unwrap()),
        ];
        env.extend_from_slice(extra);
        let server = Server::start_on_with_env(&tmp.path().join("data"), listen, &env);
        assert!(server.url.starts_with("https://"), "{}", server.url);
        TlsServer {
            server,
            tls,
            _tmp: tmp,
        }
    }

    /// A credential that may pull and push `tls/**`.
    fn credential(&self) -> String {
        common::mint_token(
            self.server.data_dir(),
            &["--pull", "tls/**", "--push", "tls/**"],
        )
    }

    /// A directory holding only the CA, as `--cert-dir` wants it (a `.key` there would
    /// be taken for half of a client certificate).
    fn cert_dir(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(self.tls.join("ca.crt"), dir.path().join("ca.crt")).unwrap();
        dir
    }
}

/// A name no other run uses.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

/// dockerd's trust for one registry address, and the login to it: both removed when
/// dropped (the directory stays: BuildKit only learns of directories when dockerd
/// starts).
struct DockerTrust {
    certs: PathBuf,
    host: String,
    config: tempfile::TempDir,
}

impl DockerTrust {
    fn new(host: &str) -> DockerTrust {
        DockerTrust {
            certs: Path::new("/etc/docker/certs.d").join(host),
            host: host.to_owned(),
            config: tempfile::tempdir().unwrap(),
        }
    }

    /// Trust the CA in `ca` for this address.
    fn trust(&self, ca: &Path) {
        std::fs::create_dir_all(&self.certs).unwrap();
        std::fs::copy(ca, self.certs.join("ca.crt")).unwrap();
    }

    /// `docker` with this test's own client configuration.
    fn docker(&self, args: &[&str]) -> Command {
        let mut command = common::docker(args);
        command.env("DOCKER_CONFIG", self.config.path());
        command
    }

    fn login(&self, password: &str) -> (bool, String) {
        let mut command = self.docker(&["login", &self.host, "-u", "tls-ci", "--password-stdin"]);
        let out = common::output_with_input(&mut command, password.as_bytes());
        (
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    }
}

impl Drop for DockerTrust {
    fn drop(&mut self) {
        let _ = common::run(&mut self.docker(&["logout", &self.host]));
        let _ = std::fs::remove_file(self.certs.join("ca.crt"));
    }
}

/// Whether `output` is a refusal of the server's certificate.
fn is_certificate_refusal(output: &str) -> bool {
    let lower = output.to_lowercase();
    lower.contains("x509") || lower.contains("certificate")
}

#[test]
fn dockerd_and_buildkit_trust_the_ca_from_certs_d_and_refuse_the_server_without_it() {
    let _daemon = DAEMON.lock().unwrap_or_else(|p| p.into_inner());
    if !common::require_tool("/usr/bin/docker") {
        return;
    }
    let Some(ip) = require_machine_ip() else {
        return;
    };
    let ip = ip.to_string();
    let tls = TlsServer::start(&format!("{ip}:{DOCKER_PORT}"), &[&ip], &[]);
    let host = tls.server.host.clone();
    let credential = tls.credential();
    let trust = DockerTrust::new(&host);

    // Not trusted yet: the login is refused for the certificate (the address is not one
    // dockerd treats as insecure, so it verifies).
    let (logged_in, out) = trust.login(&credential);
    assert!(!logged_in, "logged in without trusting the CA:\n{out}");
    assert!(is_certificate_refusal(&out), "{out}");

    trust.trust(&tls.tls.join("ca.crt"));
    let (logged_in, out) = trust.login(&credential);
    assert!(logged_in, "{out}");

    // Build with inline cache and push; drop everything local; pull it back.
    let image = format!("{host}/tls/{}:v1", unique("docker"));
    let context = common::busybox_context(&tls.server, "Dockerfile", DOCKERFILE);
    let forget = || {
        common::run(&mut trust.docker(&["builder", "prune", "-af"]));
        common::run(&mut trust.docker(&["image", "rm", "-f", &image]));
    };
    forget();
    let cold = common::run_ok(
        trust
            .docker(&["build", "--network=none", "--progress=plain", "-t", &image])
            .args(["--build-arg", "BUILDKIT_INLINE_CACHE=1"])
            .arg(context.path()),
    );
    assert!(
        common::step_outcomes(&cold)
            .values()
            .any(|end| end.starts_with("DONE")),
        "{cold}"
    );
    common::run_ok(&mut trust.docker(&["push", &image]));
    forget();
    common::run_ok(&mut trust.docker(&["pull", &image]));
    forget();

    // A rebuild on an empty builder imports the cache over TLS: every step CACHED.
    // BuildKit reads the manifest through dockerd (certs.d); the docker client fetches
    // its bearer tokens itself, trusting the system's roots or SSL_CERT_FILE.
    let warm = common::run_ok(
        trust
            .docker(&["build", "--network=none", "--progress=plain"])
            .args(["--cache-from", &image, "-t", &image])
            .env("SSL_CERT_FILE", tls.tls.join("ca.crt"))
            .arg(context.path()),
    );
    let steps = common::step_outcomes(&warm);
    assert!(!steps.is_empty(), "{warm}");
    assert!(
        !warm.contains("x509"),
        "BuildKit does not trust {host}: /etc/docker/certs.d/{host} must exist when \
         dockerd starts (scripts/setup-clients.sh creates it; restart dockerd)\n{warm}"
    );
    assert!(
        steps.values().all(|end| end == "CACHED"),
        "{steps:#?}\n{warm}"
    );
    forget();

    // Trusting another CA instead: the pull is refused for the certificate.
    let other = tempfile::tempdir().unwrap();
    tls_init(other.path(), &[&ip], false);
    trust.trust(&other.path().join("ca.crt"));
    let (pulled, out) = common::run(&mut trust.docker(&["pull", &image]));
    assert!(!pulled, "pulled trusting another CA:\n{out}");
    assert!(is_certificate_refusal(&out), "{out}");
}

#[test]
fn buildah_and_skopeo_verify_the_ca_from_cert_dir() {
    if !common::require_tool("buildah") || !common::require_tool("skopeo") {
        return;
    }
    let Some(ip) = require_machine_ip() else {
        return;
    };
    let ip = ip.to_string();
    let tls = TlsServer::start(&format!("{ip}:0"), &[&ip], &[]);
    let host = &tls.server.host;
    let creds = format!("tls-ci:{}", tls.credential());
    let cert_dir = tls.cert_dir();
    let cert_dir = cert_dir.path().to_str().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let buildah = |storage: &Path, args: &[&str]| {
        common::run(
            Command::new("buildah")
                .arg("--root")
                .arg(storage.join("root"))
                .arg("--runroot")
                .arg(storage.join("runroot"))
                .args(["--storage-driver", "vfs"])
                .args(args),
        )
    };
    let context = common::busybox_context(
        &tls.server,
        "Containerfile",
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY nonce /nonce\n",
    );
    let local = "localhost/layercache-tls:test";
    let (built, out) = buildah(
        storage.path(),
        &[
            "bud",
            "--isolation",
            "chroot",
            "-t",
            local,
            context.path().to_str().unwrap(),
        ],
    );
    assert!(built, "{out}");

    let repo = unique("buildah");
    let remote = format!("docker://{host}/tls/{repo}:v1");
    // Without the CA, verification on: refused for the certificate.
    let (pushed, out) = buildah(
        storage.path(),
        &[
            "push",
            "--tls-verify=true",
            "--creds",
            &creds,
            local,
            &remote,
        ],
    );
    assert!(!pushed, "pushed without the CA:\n{out}");
    assert!(is_certificate_refusal(&out), "{out}");
    let with_ca = [
        "--tls-verify=true",
        "--cert-dir",
        cert_dir,
        "--creds",
        &creds,
    ];
    let (pushed, out) = buildah(
        storage.path(),
        &[&["push"], &with_ca[..], &[local, &remote]].concat(),
    );
    assert!(pushed, "{out}");
    let fresh = tempfile::tempdir().unwrap();
    let (pulled, out) = buildah(fresh.path(), &["pull", "--tls-verify=true", &remote]);
    assert!(!pulled, "pulled without the CA:\n{out}");
    assert!(is_certificate_refusal(&out), "{out}");
    let (pulled, out) = buildah(
        fresh.path(),
        &[&["pull"], &with_ca[..], &[&remote]].concat(),
    );
    assert!(pulled, "{out}");

    // skopeo copies between two repositories of the server, verifying both ends.
    let copy = format!("docker://{host}/tls/{}:v1", unique("skopeo"));
    let skopeo = |cert_dirs: bool| {
        let mut command = Command::new("skopeo");
        command
            .args(["copy", "--src-tls-verify=true", "--dest-tls-verify=true"])
            .args(["--src-creds", &creds, "--dest-creds", &creds]);
        if cert_dirs {
            command.args(["--src-cert-dir", cert_dir, "--dest-cert-dir", cert_dir]);
        }
        common::run(command.args([&remote, &copy]))
    };
    let (copied, out) = skopeo(false);
    assert!(!copied, "copied without the CA:\n{out}");
    assert!(is_certificate_refusal(&out), "{out}");
    let (copied, out) = skopeo(true);
    assert!(copied, "{out}");
    let (inspected, out) = common::run(
        Command::new("skopeo")
            .args(["inspect", "--tls-verify=true", "--cert-dir", cert_dir])
            .args(["--creds", &creds, &copy]),
    );
    assert!(inspected, "{out}");
}

/// A client trusting only the CA in `ca_pem`, with a new connection and a full
/// handshake (no session resumption) for every request: each sees the certificate
/// served at that moment.
fn client_trusting(ca_pem: &[u8]) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .use_preconfigured_tls(config)
        .build()
        .unwrap()
}

/// Whether a new connection from `client` to `server` completes its handshake.
async fn handshakes(client: &reqwest::Client, server: &Server) -> bool {
    client.get(server.at("/v2/")).send().await.is_ok()
}

/// Wait (up to 15 s) until `check` holds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replace `path` with `contents` the way renewal tools do (write aside, rename).
fn replace(path: &Path, contents: &[u8]) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test]
async fn the_certificate_follows_its_files_keeps_serving_through_a_bad_one_and_reloads_on_sighup() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    tls_init(&first, &["127.0.0.1"], false);
    tls_init(&second, &["127.0.0.1"], false);
    let live = tmp.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let (cert, key) = (live.join("server.crt"), live.join("server.key"));
    let install = |from: &Path| {
        replace(&key, &std::fs::read(from.join("server.key")).unwrap());
        replace(&cert, &std::fs::read(from.join("server.crt")).unwrap());
    };
    install(&first);
    let server = Server::start_logged(&[
        ("LAYERCACHE_SERVER__AUTH__MODE", "token"),
        ("LAYERCACHE_SERVER__TLS__CERT", cert.to_str().unwrap()),
        ("LAYERCACHE_SERVER__TLS__KEY", key.to_str().unwrap()),
    ]);
    let first_ca = client_trusting(&std::fs::read(first.join("ca.crt")).unwrap());
    let second_ca = client_trusting(&std::fs::read(second.join("ca.crt")).unwrap());

    // The URLs handed out over TLS say https: the token realm and signed Actions URLs.
    let challenge = first_ca.get(server.at("/v2/")).send().await.unwrap();
    assert_eq!(challenge.status(), 401);
    assert_eq!(
        challenge.headers()["www-authenticate"].to_str().unwrap(),
        format!(
            "Bearer realm=\"https://{}/token\",service=\"layercache\"",
            server.host
        )
    );
    let token = common::mint_token(server.data_dir(), &["--write", "refs/heads/main"]);
    let created: serde_json::Value = first_ca
        .post(server.at("/twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"key": "tls", "version": "v1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let upload = created["signed_upload_url"].as_str().unwrap();
    assert!(
        upload.starts_with(&format!("https://{}/", server.host)),
        "{created}"
    );
    assert!(!handshakes(&second_ca, &server).await);

    // A new pair replaces the files: new connections see it, without a restart.
    install(&second);
    eventually("the second certificate is served", async || {
        handshakes(&second_ca, &server).await
    })
    .await;
    assert!(!handshakes(&first_ca, &server).await);

    // A replacement that does not parse: the second pair keeps serving.
    replace(&cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n");
    eventually("the broken certificate is reported", async || {
        handshakes(&second_ca, &server).await;
        server.log().contains("TLS certificate not reloaded")
    })
    .await;
    assert!(handshakes(&second_ca, &server).await);

    // The first pair again, with the times of the files it replaces: unnoticed by the
    // time check, it is served once SIGHUP asks.
    let times = |path: &Path| std::fs::metadata(path).unwrap().modified().unwrap();
    let (cert_time, key_time) = (times(&cert), times(&key));
    install(&first);
    for (path, time) in [(&cert, cert_time), (&key, key_time)] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(time)
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(handshakes(&second_ca, &server).await);
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    eventually("SIGHUP reloads the first certificate", async || {
        handshakes(&first_ca, &server).await
    })
    .await;
    assert!(!handshakes(&second_ca, &server).await);
}

#[test]
fn a_handshake_that_never_comes_is_cut_off_at_the_header_deadline() {
    use std::io::Read;
    let tls = TlsServer::start(
        "127.0.0.1:0",
        &["127.0.0.1"],
        &[("LAYERCACHE_SERVER__LIMITS__HEADER_READ_TIMEOUT", "1s")],
    );
    let mut silent = std::net::TcpStream::connect(&tls.server.host).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = silent.read(&mut buf);
    assert!(
        matches!(read, Ok(0)) && started.elapsed() < Duration::from_secs(20),
        "{read:?} after {:?}: the connection was not closed",
        started.elapsed()
    );
    // The server serves on.
    let ca = std::fs::read(tls.tls.join("ca.crt")).unwrap();
    let status = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = client_trusting(&ca);
        client
            .get(tls.server.at("/v2/"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 401);
}

#[test]
fn tls_init_keeps_an_existing_ca_unless_forced_and_keys_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let said = tls_init(dir.path(), &["cache.example", "192.0.2.10"], false);
    for expected in [
        "/etc/docker/certs.d/cache.example:5000/ca.crt",
        "[registry.\"192.0.2.10:5000\"]",
        "--cert-dir",
        "[server.tls]",
        &format!("cert = \"{}\"", dir.path().join("server.crt").display()),
    ] {
        assert!(
            said.contains(expected),
            "{expected:?} missing from:\n{said}"
        );
    }
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    #[cfg(unix)]
    for key in ["ca.key", "server.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // Again: the CA is kept, a new server certificate issued by it.
    let server = std::fs::read(dir.path().join("server.crt")).unwrap();
    let said = tls_init(dir.path(), &["other.example"], false);
    assert!(said.contains("(kept)"), "{said}");
    assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca);
    assert_ne!(
        std::fs::read(dir.path().join("server.crt")).unwrap(),
        server
    );
    let verified = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("ca.crt"))
        .arg(dir.path().join("server.crt"))
        .output();
    if let Ok(out) = verified {
        assert!(out.status.success(), "{}", text(&out.stdout));
    }
    // --force makes a new CA.
    tls_init(dir.path(), &["other.example"], true);
    assert_ne!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca);
    // Half a CA is refused.
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let out = common::layercache(&[
        "tls",
        "init",
        "--dir",
        dir.path().to_str().unwrap(),
        "--host",
        "x.example",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
}
