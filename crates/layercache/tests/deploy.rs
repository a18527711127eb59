//! Deploying layercache the ways an operator does, checked against the real thing:
//!
//! * the image `scripts/build-image.sh` builds runs in dockerd with a volume, behind
//!   docker's published port, in `token` mode; a real BuildKit build pushes to it and, on
//!   a wiped builder, warms from it with every step CACHED; `docker stop` ends it with
//!   exit code 0, and a new container on the same volume serves every image unchanged;
//! * `SIGTERM` during uploads: the one whose body arrives during the drain finishes; the
//!   one still stalled at the deadline is cut off, is resumable after the restart from
//!   what was received, and nothing of either is visible as a blob before its `PUT`;
//! * `SIGHUP` keeps serving and says whether the configuration changed;
//! * `systemd-analyze` accepts the unit; the Kubernetes manifests name the server's real
//!   port, probe paths, volume, user and configuration, and the binary started with a
//!   manifest's configuration answers the probes it names.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DOCKER: &str = "/usr/bin/docker";
const BINARY: &str = env!("CARGO_BIN_EXE_layercache");

/// The repository root.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Call `probe` until it returns `Some`, for at most `limit` (the thing it waits for is
/// checked each time; the limit only turns a hang into a failure).
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET http://ADDR/PATH` over a fresh connection: the status and body, or `None` when
/// nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The status of `GET http://ADDR/PATH`, or `None` when nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(status, _)| status)
}

// ---------------------------------------------------------------------------------------
// The container image.

/// What the image test leaves in dockerd, removed also on failure.
#[derive(Default)]
struct DockerCleanup {
    containers: Vec<String>,
    volumes: Vec<String>,
    images: Vec<String>,
    logins: Vec<String>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for container in &self.containers {
            common::run(&mut common::docker(&["rm", "-f", "-v", container]));
        }
        for volume in &self.volumes {
            common::run(&mut common::docker(&["volume", "rm", "-f", volume]));
        }
        for login in &self.logins {
            common::run(&mut common::docker(&["logout", login]));
        }
        for image in &self.images {
            common::run(&mut common::docker(&["image", "rm", "-f", image]));
        }
        common::run(&mut common::docker(&["builder", "prune", "-af"]));
    }
}

/// `docker inspect --format FORMAT NAME`, trimmed.
fn inspect(name: &str, format: &str) -> String {
    common::run_ok(&mut common::docker(&["inspect", "--format", format, name]))
        .trim()
        .to_owned()
}

/// Run the image as container `name` on `volume`, in `token` mode, probed every second,
/// listening on all interfaces at `port`; wait until it is ready.
///
/// The container shares the host's network: this machine's dockerd runs without
/// iptables, and its default bridge may be gone (a second dockerd started by another
/// test can remove it), so a published port is not dependable here. The image's own
/// `0.0.0.0:5000` gives way to the free port (the Kubernetes test checks that port).
fn run_container(image: &str, name: &str, volume: &str, port: u16) {
    common::run_ok(&mut common::docker(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-v",
        &format!("{volume}:/data"),
        "-e",
        "LAYERCACHE_SERVER__AUTH__MODE=token",
        "-e",
        &format!("LAYERCACHE_SERVER__LISTEN=0.0.0.0:{port}"),
        // What the HEALTHCHECK (`layercache health`) asks.
        "-e",
        &format!("LAYERCACHE_SERVER=http://127.0.0.1:{port}"),
        // A quota of its own, whatever else fills this machine's disk.
        "-e",
        "LAYERCACHE_STORE__EVICTION__MAX_SIZE=4GiB",
        "-e",
        "LAYERCACHE_STORE__EVICTION__MIN_FREE=0",
        "--health-interval",
        "1s",
        "--stop-timeout",
        "30",
        image,
    ]));
    let addr = format!("127.0.0.1:{port}");
    wait_for(&format!("{name} ready"), Duration::from_secs(60), || {
        let running = inspect(name, "{{.State.Running}}") == "true";
        assert!(
            running || inspect(name, "{{.State.Status}}") == "created",
            "{name} exited:\n{}",
            common::run(&mut common::docker(&["logs", name])).1
        );
        (http_status(&addr, server::health::READY_PATH) == Some(200)).then_some(())
    });
}

/// `docker stop` (SIGTERM, SIGKILL after the container's 30 s): the exit code and log.
fn stop_container(name: &str) -> (String, String) {
    common::run_ok(&mut common::docker(&["stop", name]));
    let state = inspect(name, "{{.State.Status}} {{.State.ExitCode}}");
    let log = common::run(&mut common::docker(&["logs", name])).1;
    (state, log)
}

/// Every repository's tags and the manifest digest each names, read with `credential`.
async fn registry_contents(
    client: &reqwest::Client,
    base: &str,
    credential: &str,
) -> BTreeMap<String, (String, Vec<String>)> {
    let get = |path: String| {
        client
            .get(format!("{base}{path}"))
            .basic_auth("ci", Some(credential))
            .header("accept", common::registry::ACCEPT)
            .send()
    };
    let catalog: Value = get("/v2/_catalog".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut contents = BTreeMap::new();
    for repo in catalog["repositories"].as_array().unwrap() {
        let repo = repo.as_str().unwrap();
        let tags: Value = get(format!("/v2/{repo}/tags/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for tag in tags["tags"].as_array().unwrap() {
            let tag = tag.as_str().unwrap();
            let response = get(format!("/v2/{repo}/manifests/{tag}")).await.unwrap();
            assert_eq!(response.status(), 200, "{repo}:{tag}");
            let digest = response.headers()["docker-content-digest"]
                .to_str()
                .unwrap()
                .to_owned();
            let body = response.bytes().await.unwrap();
            assert_eq!(common::digest_of(&body), digest, "{repo}:{tag}");
            contents.insert(
                format!("{repo}:{tag}"),
                (digest, common::registry::blobs_of(&body)),
            );
        }
    }
    contents
}

/// Every blob the manifests of `contents` name hashes to its digest.
async fn assert_blobs_intact(
    client: &reqwest::Client,
    base: &str,
    credential: &str,
    contents: &BTreeMap<String, (String, Vec<String>)>,
) {
    for (image, (_, blobs)) in contents {
        let repo = image.split(':').next().unwrap();
        for digest in blobs {
            let response = client
                .get(format!("{base}/v2/{repo}/blobs/{digest}"))
                .basic_auth("ci", Some(credential))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{image}: blob {digest}");
            let bytes = response.bytes().await.unwrap();
            assert_eq!(&common::digest_of(&bytes), digest, "{image}: blob {digest}");
        }
    }
}

/// Two steps writing random bytes: a step that ran again could not make the same layer.
const APP_DOCKERFILE: &str = r#"FROM scratch
COPY nonce /nonce
COPY busybox /bin/busybox
SHELL ["/bin/busybox", "sh", "-c"]
RUN /bin/busybox mkdir -p /data /tmp && /bin/busybox dd if=/dev/urandom of=/data/a.bin bs=1M count=8
RUN /bin/busybox dd if=/dev/urandom of=/data/b.bin bs=1M count=8
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_image_serves_buildkit_stops_cleanly_and_keeps_every_image_on_its_volume() {
    if !common::require_tool(DOCKER) {
        return;
    }
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );
    let id = std::process::id();
    let image = format!("layercache-deploy-test:{id}");
    let mut cleanup = DockerCleanup::default();
    cleanup.images.push(image.clone());

    // Built by the script, from the binary cargo built for this test.
    let built = common::run_ok(
        Command::new(repo_root().join("scripts/build-image.sh"))
            .args(["--binary", BINARY, "--tag", &image])
            .env("DOCKER", DOCKER)
            .env("DOCKER_BUILDKIT", "1"),
    );
    assert!(
        built.trim_end().ends_with(&inspect(&image, "{{.Id}}")),
        "{built}"
    );
    let version = String::from_utf8(common::layercache(&["--version"]).stdout).unwrap();
    let labels: Value = serde_json::from_str(&inspect(&image, "{{json .Config.Labels}}")).unwrap();
    assert_eq!(
        Some(version.split_whitespace().nth(1).unwrap()),
        labels["org.opencontainers.image.version"].as_str(),
        "{labels}"
    );
    let head = common::run_ok(
        Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(["rev-parse", "HEAD"]),
    );
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap()
            .starts_with(head.trim()),
        "{labels}"
    );
    assert!(
        !labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(inspect(&image, "{{.Config.User}}"), "10001:10001");
    assert_eq!(
        inspect(&image, "{{json .Config.ExposedPorts}}"),
        r#"{"5000/tcp":{}}"#
    );
    assert_eq!(
        inspect(&image, "{{json .Config.Volumes}}"),
        r#"{"/data":{}}"#
    );

    // Exactly the binary, the libraries it loads, the loader, CA certificates and the
    // user's files: no shell, no package manager.
    let probe = format!("layercache-deploy-files-{id}");
    cleanup.containers.push(probe.clone());
    common::run_ok(&mut common::docker(&[
        "create",
        "--network",
        "none",
        "--name",
        &probe,
        &image,
    ]));
    let mut export = Command::new(DOCKER)
        .args(["export", &probe])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let listing = Command::new("tar")
        .arg("-t")
        .stdin(export.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(export.wait().unwrap().success() && listing.status.success());
    let files: Vec<String> = String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(|l| format!("/{l}"))
        .collect();
    let ldd = common::run_ok(Command::new("ldd").arg(BINARY));
    let mut expected: Vec<String> = ldd
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some((*path).to_owned()),
                [path, ..] if path.starts_with('/') => Some((*path).to_owned()),
                _ => None,
            }
        })
        .collect();
    expected.extend(
        [
            "/usr/local/bin/layercache",
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/passwd",
            "/etc/group",
            "/etc/nsswitch.conf",
        ]
        .map(String::from),
    );
    // What docker itself puts into every container's filesystem.
    let docker_own = [
        "/.dockerenv",
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/mtab",
    ];
    let mut found: Vec<String> = files
        .into_iter()
        .filter(|f| {
            !docker_own.contains(&f.as_str())
                && !f.starts_with("/dev/")
                && !f.starts_with("/proc/")
                && !f.starts_with("/sys/")
        })
        .collect();
    found.sort();
    expected.sort();
    assert_eq!(found, expected, "the image's files");

    // Without an auth mode it refuses to serve the network.
    let (ok, refused) = common::run(&mut common::docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        &image,
    ]));
    assert!(
        !ok && refused.contains("refusing to serve 0.0.0.0:5000"),
        "{refused}"
    );

    let volume = format!("layercache-deploy-{id}");
    cleanup.volumes.push(volume.clone());
    let port = common::free_port();
    let host = format!("127.0.0.1:{port}");
    let base = format!("http://{host}");
    let first = format!("layercache-deploy-{id}-1");
    cleanup.containers.push(first.clone());
    run_container(&image, &first, &volume, port);
    // The image's HEALTHCHECK (`layercache health`) sees it ready.
    wait_for("the container healthy", Duration::from_secs(60), || {
        (inspect(&first, "{{.State.Health.Status}}") == "healthy").then_some(())
    });
    // Probes need no credential; the registry does.
    assert_eq!(http_status(&host, server::health::LIVE_PATH), Some(200));
    assert_eq!(http_status(&host, "/v2/"), Some(401));

    let credential = common::run_ok(&mut common::docker(&[
        "exec",
        &first,
        "layercache",
        "token",
        "--data-dir",
        "/data",
        "--pull",
        "**",
        "--push",
        "cache/**",
        "--view",
    ]))
    .trim()
    .to_owned();
    let logged_in = common::output_with_input(
        &mut common::docker(&["login", &host, "-u", "ci", "--password-stdin"]),
        credential.as_bytes(),
    );
    assert!(
        logged_in.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&logged_in.stderr)
    );
    cleanup.logins.push(host.clone());

    // Cold build, pushed with its inline cache.
    let context = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", context.path().join("busybox"))
        .expect("a static busybox at /bin/busybox (Debian busybox-static)");
    std::fs::write(
        context.path().join("nonce"),
        format!("{id} {:?}", std::time::SystemTime::now()),
    )
    .unwrap();
    std::fs::write(context.path().join("Dockerfile"), APP_DOCKERFILE).unwrap();
    let tag = format!("{host}/cache/app:v1");
    cleanup.images.push(tag.clone());
    let cold = common::docker_build(context.path(), &tag, true, None);
    let cold_steps = common::step_outcomes(&cold);
    let steps = APP_DOCKERFILE
        .lines()
        .filter(|l| l.starts_with("RUN ") || l.starts_with("COPY "))
        .count();
    assert!(
        cold_steps.len() == steps && cold_steps.values().all(|end| end.starts_with("DONE")),
        "{cold_steps:#?}\n{cold}"
    );
    let built_id = inspect(&tag, "{{.Id}}");
    cleanup.images.push(built_id.clone());
    common::run_ok(&mut common::docker(&["push", &tag]));

    // A wiped builder warms from it: nothing runs.
    common::run_ok(&mut common::docker(&["builder", "prune", "-af"]));
    common::run_ok(&mut common::docker(&["image", "rm", "-f", &tag, &built_id]));
    let warm = common::docker_build(context.path(), &tag, true, Some(&tag));
    common::assert_same_steps_all_cached(&cold_steps, &warm);
    assert_eq!(inspect(&tag, "{{.Id}}"), built_id);

    // What the guide tells a CI job to check.
    let expect = Command::new(BINARY)
        .args([
            "expect",
            "--server",
            &base,
            "--repo",
            "cache/app",
            "--since",
            "10m",
            "--reads",
            "--writes",
        ])
        .env("LAYERCACHE_CREDENTIAL", &credential)
        .output()
        .unwrap();
    assert!(
        expect.status.success(),
        "layercache expect: {}{}",
        String::from_utf8_lossy(&expect.stdout),
        String::from_utf8_lossy(&expect.stderr)
    );

    let client = reqwest::Client::new();
    let before = registry_contents(&client, &base, &credential).await;
    assert!(before.contains_key("cache/app:v1"), "{before:?}");

    // docker stop: SIGTERM, and the process ends by itself (137 would be SIGKILL).
    let (state, log) = stop_container(&first);
    assert_eq!(state, "exited 0", "{log}");
    assert!(log.contains("layercache stopped"), "{log}");

    // A new container on the same volume: every image, every blob, and a pull of the
    // same image on a wiped daemon.
    let second = format!("layercache-deploy-{id}-2");
    cleanup.containers.push(second.clone());
    run_container(&image, &second, &volume, port);
    let after = registry_contents(&client, &base, &credential).await;
    assert_eq!(after, before, "the registry after the restart");
    assert_blobs_intact(&client, &base, &credential, &after).await;
    common::run_ok(&mut common::docker(&["image", "rm", "-f", &tag, &built_id]));
    common::run_ok(&mut common::docker(&["pull", &tag]));
    assert_eq!(inspect(&tag, "{{.Id}}"), built_id);

    let (state, log) = stop_container(&second);
    assert_eq!(state, "exited 0", "{log}");
}

// ---------------------------------------------------------------------------------------
// SIGTERM and SIGHUP on the binary.

/// A `layercache serve` this test starts and signals itself, its log in a file.
struct Serving {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    log: PathBuf,
}

impl Serving {
    /// Start `serve ARGS` with `env`; it listens on the port it prints.
    fn start(args: &[&str], env: &[(&str, &str)], log: &Path) -> Serving {
        let mut child = Command::new(BINARY)
            .arg("serve")
            .args(args)
            .env_remove("LAYERCACHE_SERVER")
            .env_remove(common::SOAK_EVENTS)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("layercache listening on http://")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        let port = url.rsplit(':').next().unwrap();
        Serving {
            child,
            addr: format!("127.0.0.1:{port}"),
            log: log.to_owned(),
        }
    }

    fn signal(&self, signal: &str) {
        common::run_ok(
            Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Wait for the process to end by itself.
    fn wait(&mut self) -> ExitStatus {
        let limit = Duration::from_secs(60);
        wait_for("the server to exit", limit, || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 request sent by hand, its body written in pieces as the test decides.
struct RawRequest {
    stream: tokio::net::TcpStream,
}

impl RawRequest {
    /// Send `PATCH path` announcing `len` bytes with `Expect: 100-continue`, and return
    /// once the server has answered `100 Continue`: its handler is reading the body.
    async fn patch(addr: &str, path: &str, len: usize) -> RawRequest {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut request = RawRequest { stream };
        let interim = request.head().await;
        assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
        request
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next response head (status line and headers).
    async fn head(&mut self) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = self.stream.read(&mut byte).await.unwrap();
            assert!(
                n == 1,
                "connection closed after {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }
}

/// A header's value in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// How many bytes an upload's `Range: 0-N` header says were received.
fn received(response: &reqwest::Response) -> usize {
    let range = response.headers()["range"].to_str().unwrap();
    let end: usize = range.strip_prefix("0-").unwrap().parse().unwrap();
    end + 1
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_an_upload_in_flight_and_leaves_a_stalled_one_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let mut serving = Serving::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[
            ("LAYERCACHE_SERVER__SHUTDOWN_TIMEOUT", "5s"),
            // A quota of its own, whatever else fills this machine's disk.
            ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
        ],
        &tmp.path().join("server.log"),
    );
    let base = format!("http://{}", serving.addr);
    let client = reqwest::Client::new();
    let repo = "deploy/uploads";
    let start_upload = || async {
        let response = client
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        response.headers()["location"].to_str().unwrap().to_owned()
    };
    let finishing: Vec<u8> = common::chunks(1, 6 << 20, 1 << 20).flatten().collect();
    let stalled: Vec<u8> = common::chunks(2, 8 << 20, 1 << 20).flatten().collect();
    let (half, first_chunk, sent_stalled) = (3 << 20, 2 << 20, 5 << 20);

    // The stalled upload has a first chunk stored before anything else happens.
    let stalled_at = start_upload().await;
    let response = client
        .patch(format!("{base}{stalled_at}"))
        .body(stalled[..first_chunk].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(received(&response), first_chunk);

    // Two requests in flight: half of one body, part of the other's next chunk.
    let finishing_at = start_upload().await;
    let mut finishing_request =
        RawRequest::patch(&serving.addr, &finishing_at, finishing.len()).await;
    finishing_request.send(&finishing[..half]).await;
    let rest = stalled.len() - first_chunk;
    let mut stalled_request = RawRequest::patch(&serving.addr, &stalled_at, rest).await;
    stalled_request
        .send(&stalled[first_chunk..first_chunk + sent_stalled])
        .await;

    serving.signal("TERM");
    // Shutting down: the listener is closed at once ...
    let addr = serving.addr.clone();
    wait_for("the listener to close", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_err().then_some(())
    });
    // ... and the request in flight still finishes.
    finishing_request.send(&finishing[half..]).await;
    let head = finishing_request.head().await;
    assert!(head.starts_with("HTTP/1.1 202"), "{head}");
    assert_eq!(
        header(&head, "range"),
        Some(format!("0-{}", finishing.len() - 1).as_str())
    );
    // The stalled one holds the drain until the deadline; then the process exits 0.
    let status = serving.wait();
    let log = serving.log();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("closed the connections still busy"), "{log}");
    assert!(log.contains("layercache stopped"), "{log}");
    drop(stalled_request);

    // After the restart: nothing of either is a blob before its PUT ...
    let mut restarted = common::Server::start_on_with_env(
        &data_dir,
        "127.0.0.1:0",
        &[("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0")],
    );
    let base = restarted.url.clone();
    let finishing_digest = common::digest_of(&finishing);
    let stalled_digest = common::digest_of(&stalled);
    let partial_digest = common::digest_of(&stalled[..first_chunk + sent_stalled]);
    for digest in [&finishing_digest, &stalled_digest, &partial_digest] {
        let response = client
            .head(format!("{base}/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{digest} is visible");
    }
    // ... the finished one's bytes are all there, and it completes ...
    let response = client
        .get(format!("{base}{finishing_at}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(received(&response), finishing.len());
    let response = client
        .put(format!("{base}{finishing_at}?digest={finishing_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    // ... and the cut-off one resumes from what was received.
    let response = client
        .get(format!("{base}{stalled_at}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let offset = received(&response);
    assert!(
        (first_chunk..=first_chunk + sent_stalled).contains(&offset),
        "resumes at {offset}"
    );
    let response = client
        .patch(format!("{base}{stalled_at}"))
        .header("content-range", format!("{offset}-{}", stalled.len() - 1))
        .body(stalled[offset..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let response = client
        .put(format!("{base}{stalled_at}?digest={stalled_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    for (digest, bytes) in [(&finishing_digest, &finishing), (&stalled_digest, &stalled)] {
        let response = client
            .get(format!("{base}/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(&response.bytes().await.unwrap()[..], &bytes[..]);
    }
    restarted.kill();
    common::assert_blob_files_match_their_names(&data_dir);
}

#[test]
fn probes_bypass_the_request_layer_and_readiness_follows_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let mut serving = Serving::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[],
        &tmp.path().join("server.log"),
    );
    let live = server::health::LIVE_PATH;
    let ready = server::health::READY_PATH;
    assert_eq!(
        http_get(&serving.addr, live),
        Some((200, r#"{"status":"ok"}"#.to_owned()))
    );
    assert_eq!(
        http_get(&serving.addr, ready),
        Some((200, r#"{"status":"ready"}"#.to_owned()))
    );
    // The data directory gone: not ready (the cause only in the log), still alive.
    let moved = tmp.path().join("moved");
    std::fs::rename(&data_dir, &moved).unwrap();
    assert_eq!(
        http_get(&serving.addr, ready),
        Some((503, r#"{"status":"store unavailable"}"#.to_owned()))
    );
    assert_eq!(http_status(&serving.addr, live), Some(200));
    std::fs::rename(&moved, &data_dir).unwrap();
    assert_eq!(http_status(&serving.addr, ready), Some(200));
    // Neither counted nor logged per request, unlike any other route (here the first
    // scrape, counted once it was answered).
    assert_eq!(http_status(&serving.addr, "/metrics"), Some(200));
    let (status, metrics) = http_get(&serving.addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("layercache_http_requests_total{"))
        .collect();
    assert!(
        !counted.is_empty() && counted.iter().all(|l| l.contains(r#"route="metrics""#)),
        "{counted:#?}"
    );
    serving.signal("TERM");
    assert!(serving.wait().success());
    let log = serving.log();
    assert!(log.contains("the store is not ready"), "{log}");
    assert!(
        !log.contains("path=/healthz") && !log.contains("path=/readyz"),
        "{log}"
    );
}

#[test]
fn sighup_keeps_serving_and_reports_a_changed_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("layercache.toml");
    std::fs::write(&config, "[server]\nshutdown_timeout = \"20s\"\n").unwrap();
    let data_dir = tmp.path().join("data");
    let mut serving = Serving::start(
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[],
        &tmp.path().join("server.log"),
    );
    let logged = |serving: &Serving, needle: &str| {
        wait_for(needle, Duration::from_secs(30), || {
            serving.log().contains(needle).then_some(())
        })
    };
    serving.signal("HUP");
    logged(&serving, "the configuration is unchanged");
    std::fs::write(&config, "[server]\nshutdown_timeout = \"5s\"\n").unwrap();
    serving.signal("HUP");
    logged(&serving, "takes effect at the next restart");
    assert!(
        serving.log().contains("sections=server"),
        "{}",
        serving.log()
    );
    std::fs::write(&config, "[server]\nshutdown_timeot = \"5s\"\n").unwrap();
    serving.signal("HUP");
    logged(&serving, "the configuration does not load");
    assert_eq!(
        http_status(&serving.addr, server::health::READY_PATH),
        Some(200)
    );
    serving.signal("TERM");
    let status = serving.wait();
    assert!(status.success(), "exit {status}:\n{}", serving.log());
}

// ---------------------------------------------------------------------------------------
// systemd and Kubernetes.

/// `server.shutdown_timeout` of the configuration `config` gives, as `--print-config`
/// shows it, in seconds.
fn shutdown_timeout(config: &Path, env: &[(&str, &str)]) -> u64 {
    let out = Command::new(BINARY)
        .args(["serve", "--print-config", "--config"])
        .arg(config)
        .env_remove("LAYERCACHE_SERVER")
        .env_remove(common::SOAK_EVENTS)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{} does not load: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("shutdown_timeout = "))
        .unwrap_or_else(|| panic!("no shutdown_timeout in\n{text}"));
    humantime::parse_duration(value.trim_matches('"'))
        .unwrap()
        .as_secs()
}

#[test]
fn systemd_accepts_the_unit_and_its_stop_timeout_outlasts_the_drain() {
    if !common::require_tool("systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(repo_root().join("deploy/layercache.service")).unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    for (key, expected) in [
        ("User", "layercache"),
        ("StateDirectory", "layercache"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(value(key), [expected], "{key}=");
    }
    assert_eq!(value("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    // The configuration the unit names is the one deploy/ ships, with its data in the
    // unit's state directory and a drain that ends before systemd's SIGKILL.
    let exec = value("ExecStart").pop().unwrap();
    let (program, args) = exec.split_once(' ').unwrap();
    assert_eq!(program, "/usr/local/bin/layercache");
    assert_eq!(args, "serve --config /etc/layercache/layercache.toml");
    let config = repo_root().join("deploy/layercache.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("data_dir = \"/var/lib/layercache\""),
        "{text}"
    );
    let stop = humantime::parse_duration(&value("TimeoutStopSec").pop().unwrap()).unwrap();
    assert!(
        stop.as_secs() > shutdown_timeout(&config, &[]),
        "TimeoutStopSec {stop:?} must outlast server.shutdown_timeout"
    );

    // `verify` needs ExecStart's program to exist: the copy checked names the binary
    // this test runs instead of /usr/local/bin/layercache, and is otherwise the unit.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("layercache.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/layercache",
            &format!("ExecStart={BINARY}"),
        ),
    )
    .unwrap();
    let (ok, out) = common::run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy),
    );
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    // The hardening as systemd scores it (0 to 10, lower is safer; 3 is its "OK" bound).
    let (ok, out) = common::run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=30", "--no-pager"])
            .arg(&copy),
    );
    assert!(ok, "systemd-analyze security:\n{out}");
}

/// Every document of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    use saphyr::{LoadableYamlNode, ScalarOwned, YamlOwned};
    fn json(node: &YamlOwned) -> Value {
        match node {
            YamlOwned::Value(ScalarOwned::Null) => Value::Null,
            YamlOwned::Value(ScalarOwned::Boolean(b)) => Value::Bool(*b),
            YamlOwned::Value(ScalarOwned::Integer(i)) => Value::from(*i),
            YamlOwned::Value(ScalarOwned::FloatingPoint(f)) => Value::from(f.into_inner()),
            YamlOwned::Value(ScalarOwned::String(s)) => Value::String(s.clone()),
            YamlOwned::Representation(s, ..) => Value::String(s.clone()),
            YamlOwned::Sequence(items) => Value::Array(items.iter().map(json).collect()),
            YamlOwned::Mapping(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| match json(k) {
                        Value::String(key) => (key, json(v)),
                        other => (other.to_string(), json(v)),
                    })
                    .collect(),
            ),
            YamlOwned::Tagged(_, inner) => json(inner),
            other => panic!("unexpected YAML node {other:?}"),
        }
    }
    let text = std::fs::read_to_string(path).unwrap();
    YamlOwned::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .iter()
        .map(json)
        .filter(|d| !d.is_null())
        .collect()
}

/// What the image promises, read from deploy/Dockerfile: the listen port, the data
/// volume, and the uid and gid it runs as.
struct ImageContract {
    port: u64,
    volume: String,
    uid: u64,
    gid: u64,
    env: Vec<(String, String)>,
}

fn image_contract() -> ImageContract {
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    // Instructions with their continuation lines joined.
    let joined = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instruction = |name: &str| -> String {
        joined
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in deploy/Dockerfile"))
            .trim()
            .to_owned()
    };
    let env: Vec<(String, String)> = instruction("ENV")
        .split_whitespace()
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let listen = &env
        .iter()
        .find(|(k, _)| k == "LAYERCACHE_SERVER__LISTEN")
        .unwrap()
        .1;
    let data_dir = &env
        .iter()
        .find(|(k, _)| k == "LAYERCACHE_STORE__DATA_DIR")
        .unwrap()
        .1;
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert!(listen.starts_with("0.0.0.0:"), "{listen}");
    assert_eq!(instruction("EXPOSE"), port.to_string());
    assert_eq!(&instruction("VOLUME"), data_dir);
    let user = instruction("USER");
    let (uid, gid) = user.split_once(':').unwrap();
    ImageContract {
        port,
        volume: data_dir.clone(),
        uid: uid.parse().unwrap(),
        gid: gid.parse().unwrap(),
        env,
    }
}

/// The container port a probe or Service names (by name or number).
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port.as_str().unwrap();
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[test]
fn kubernetes_manifests_name_the_servers_port_probes_volume_and_configuration() {
    let contract = image_contract();
    let dir = repo_root().join("deploy/kubernetes");
    let mut workloads = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        let documents = yaml_documents(&path);
        for d in &documents {
            for field in ["apiVersion", "kind"] {
                assert!(d[field].is_string(), "{file}: a document without {field}");
            }
            assert!(
                d["metadata"]["name"].is_string(),
                "{file}: a {} without a name",
                d["kind"]
            );
        }
        let of_kind = |kind: &'static str| documents.iter().filter(move |d| d["kind"] == kind);
        let config_maps: BTreeMap<&str, &Value> = of_kind("ConfigMap")
            .map(|d| (d["metadata"]["name"].as_str().unwrap(), &d["data"]))
            .collect();
        let workload = of_kind("StatefulSet")
            .chain(of_kind("Deployment"))
            .next()
            .unwrap_or_else(|| panic!("{file}: no StatefulSet or Deployment"));
        let pod = &workload["spec"]["template"];
        let labels = pod["metadata"]["labels"].as_object().unwrap();
        for (key, value) in workload["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(labels.get(key), Some(value), "{file}: the selector's {key}");
        }
        let spec = &pod["spec"];
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{file}");
        let container = &containers[0];

        // The port the image listens on, and the probes on the server's real paths.
        let ports = container["ports"].as_array().unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p["containerPort"].as_u64() == Some(contract.port)),
            "{file}: no containerPort {}",
            contract.port
        );
        let probe_path = |probe: &str| -> String {
            let get = &container[probe]["httpGet"];
            assert_eq!(
                resolve_port(container, &get["port"]),
                contract.port,
                "{file}: {probe}"
            );
            get["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no {probe}"))
                .to_owned()
        };
        assert_eq!(
            probe_path("livenessProbe"),
            server::health::LIVE_PATH,
            "{file}"
        );
        assert_eq!(
            probe_path("readinessProbe"),
            server::health::READY_PATH,
            "{file}"
        );
        assert_eq!(
            probe_path("startupProbe"),
            server::health::LIVE_PATH,
            "{file}"
        );
        for (kind, resource) in [
            ("requests", "cpu"),
            ("requests", "memory"),
            ("limits", "memory"),
        ] {
            assert!(
                container["resources"][kind][resource].is_string(),
                "{file}: no resources.{kind}.{resource}"
            );
        }
        // It runs as the image's user, which owns the volume.
        let security = &spec["securityContext"];
        assert_eq!(security["runAsUser"].as_u64(), Some(contract.uid), "{file}");
        assert_eq!(security["fsGroup"].as_u64(), Some(contract.gid), "{file}");
        assert_eq!(security["runAsNonRoot"], true, "{file}");

        // Every mount has its volume; the data volume is mounted where the image keeps
        // its data; the configuration file `--config` names is a key of a ConfigMap
        // mounted at its directory.
        let mut volumes: BTreeMap<String, Value> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
            .collect();
        for claim in workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = claim["metadata"]["name"].as_str().unwrap().to_owned();
            volumes.insert(
                name,
                serde_json::json!({ "persistentVolumeClaim": claim["spec"] }),
            );
        }
        let mounts: BTreeMap<String, String> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let name = m["name"].as_str().unwrap();
                assert!(
                    volumes.contains_key(name),
                    "{file}: mount of unknown volume {name}"
                );
                (m["mountPath"].as_str().unwrap().to_owned(), name.to_owned())
            })
            .collect();
        let data = mounts
            .get(&contract.volume)
            .unwrap_or_else(|| panic!("{file}: nothing mounted at {}", contract.volume));
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args.first(), Some(&"serve"), "{file}");
        let config_path = Path::new(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
        let config_volume = &volumes[&mounts[config_path.parent().unwrap().to_str().unwrap()]];
        let config_map = config_volume["configMap"]["name"].as_str().unwrap();
        let key = config_path.file_name().unwrap().to_str().unwrap();
        let toml = config_maps[config_map][key]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: ConfigMap {config_map} has no {key}"));

        // Each Service sends its port to the container's.
        for service in of_kind("Service") {
            for port in service["spec"]["ports"].as_array().unwrap() {
                assert_eq!(
                    resolve_port(container, &port["targetPort"]),
                    contract.port,
                    "{file}: Service {}",
                    service["metadata"]["name"]
                );
            }
            for (key, value) in service["spec"]["selector"].as_object().unwrap() {
                assert_eq!(
                    labels.get(key),
                    Some(value),
                    "{file}: the Service's selector"
                );
            }
        }

        // The configuration loads as the container would load it (the image's
        // environment, the manifest's plain values), and the pod's grace period
        // outlasts its drain.
        let tmp = tempfile::tempdir().unwrap();
        let config_file = tmp.path().join(key);
        std::fs::write(&config_file, toml).unwrap();
        let mut env: Vec<(String, String)> = contract.env.clone();
        for var in container["env"].as_array().into_iter().flatten() {
            if let Some(value) = var["value"].as_str() {
                env.push((var["name"].as_str().unwrap().to_owned(), value.to_owned()));
            }
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let drain = shutdown_timeout(&config_file, &env);
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > drain,
            "{file}: {grace} s of grace for a {drain} s drain"
        );
        workloads.insert(
            workload["kind"].as_str().unwrap().to_owned(),
            (
                file,
                toml.to_owned(),
                args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                volumes[data].clone(),
                container.clone(),
            ),
        );
    }

    // Single node: one replica on a claimed volume, local disk and SQLite. Started with
    // the manifest's arguments and configuration (on all interfaces, as in the pod, on
    // a free port), it answers the probes the manifest names.
    let (file, toml, args, data, container) = &workloads["StatefulSet"];
    assert!(data["persistentVolumeClaim"].is_object(), "{file}: {data}");
    assert!(
        !toml.contains("backend"),
        "{file}: the single node keeps the default stores"
    );
    let tmp = tempfile::tempdir().unwrap();
    let config_file = tmp.path().join("layercache.toml");
    std::fs::write(&config_file, toml).unwrap();
    let config_arg = args.iter().position(|a| a == "--config").unwrap() + 1;
    let mut args = args.clone();
    args[config_arg] = config_file.to_str().unwrap().to_owned();
    let args: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let data_dir = tmp.path().join("data");
    let mut serving = Serving::start(
        &args,
        &[
            ("LAYERCACHE_SERVER__LISTEN", "0.0.0.0:0"),
            ("LAYERCACHE_STORE__DATA_DIR", data_dir.to_str().unwrap()),
        ],
        &tmp.path().join("server.log"),
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(
            http_status(&serving.addr, path),
            Some(200),
            "{file}: {probe} {path}"
        );
    }
    // The auth mode the pod needs on 0.0.0.0 is set: the registry asks for credentials.
    assert_eq!(http_status(&serving.addr, "/v2/"), Some(401), "{file}");
    serving.signal("TERM");
    assert!(serving.wait().success(), "{}", serving.log());

    // Scaled out: stateless nodes on a bucket and PostgreSQL, nothing claimed.
    let (file, toml, _, data, _) = &workloads["Deployment"];
    assert!(data["emptyDir"].is_object(), "{file}: {data}");
    for backend in ["backend = \"s3\"", "backend = \"postgres\""] {
        assert!(toml.contains(backend), "{file}: no {backend}");
    }
}
