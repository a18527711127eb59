//! Shared harness for end-to-end tests: one `layercache serve` per test, on a free
//! port, in its own temporary data directory, killed when dropped.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod actions;
pub mod cache_client;
pub mod cluster;
pub mod hostile;
pub mod jwt;
pub mod load;
pub mod registry;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How many events the eviction soak runs (a test's setting, never the server's).
pub const SOAK_EVENTS: &str = "LAYERCACHE_SOAK_EVENTS";

/// The path prefix of the requests [`Server::log`] marks the log with.
const LOG_MARK: &str = "/log-mark/";

/// A running server.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` (`https://` when serving TLS).
    pub url: String,
    /// `127.0.0.1:PORT`, as registry clients want it.
    pub host: String,
    data_dir: PathBuf,
    /// Extra environment (configuration such as `LAYERCACHE_STORE__EVICTION__MAX_SIZE`),
    /// kept for restarts.
    env: Vec<(String, String)>,
    /// Where the server's log goes (`RUST_LOG=info`), when started with a log.
    log: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Start a server on a fresh data directory.
    pub fn start() -> Server {
        Server::start_with_env(&[])
    }

    /// Start a server on a fresh data directory with extra environment variables.
    pub fn start_with_env(env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut server = Server::start_on_with_env(&dir, "127.0.0.1:0", env);
        server._tmp = Some(tmp);
        server
    }

    /// Start a server on a fresh data directory with extra environment variables, its
    /// log (`RUST_LOG=info`: one `served` line per request) appended to a file; see
    /// [`Server::log`].
    pub fn start_logged(env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let log = tmp.path().join("server.log");
        let mut server = Server::spawn(&dir, "127.0.0.1:0", env, Some(&log));
        server._tmp = Some(tmp);
        server
    }

    /// Start a server on `data_dir` with `env`, its log beside it (`<data_dir>.log`,
    /// read with [`Server::log`]).
    pub fn start_logged_on(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::spawn(
            data_dir,
            "127.0.0.1:0",
            env,
            Some(&data_dir.with_extension("log")),
        )
    }

    /// Start a server on `data_dir`, listening on `listen`.
    pub fn start_on(data_dir: &Path, listen: &str) -> Server {
        Server::start_on_with_env(data_dir, listen, &[])
    }

    /// Start a server on `data_dir`, listening on `listen`, with extra environment.
    pub fn start_on_with_env(data_dir: &Path, listen: &str, env: &[(&str, &str)]) -> Server {
        Server::spawn(data_dir, listen, env, None)
    }

    /// Start a server; with `log`, its stderr is appended to that file at `RUST_LOG=info`.
    fn spawn(data_dir: &Path, listen: &str, env: &[(&str, &str)], log: Option<&Path>) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_layercache"));
        command
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            // The tests' own settings: the server reads every `LAYERCACHE_` variable as
            // configuration and refuses the ones it does not know.
            .env_remove(SOAK_EVENTS)
            .envs(env.iter().copied())
            .stdout(Stdio::piped());
        match log {
            Some(log) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap();
                command.env("RUST_LOG", "info").stderr(file);
            }
            None => {
                command
                    .env(
                        "RUST_LOG",
                        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                    )
                    .stderr(Stdio::inherit());
            }
        }
        let mut child = command.spawn().expect("spawn layercache");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("layercache listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let host = url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_owned();
        Server {
            child: Some(child),
            url,
            host,
            data_dir: data_dir.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: log.map(Path::to_owned),
            _tmp: None,
        }
    }

    /// The log so far of a server started with [`Server::start_logged`], with the line of
    /// every request answered before the call.
    ///
    /// The server writes its log from a thread of its own, so a request's line can land
    /// just after its response. A running server is first sent a request of its own (a
    /// 404 outside the registry API); once that request's line is in the file, so is
    /// every line before it. Those lines are left out of what is returned.
    pub fn log(&self) -> String {
        let path = self
            .log
            .as_ref()
            .expect("the server was started with a log");
        if let Some(mark) = self.mark_log() {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !std::fs::read_to_string(path).unwrap().contains(&mark) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the request {mark} never reached the log"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|line| !line.contains(LOG_MARK))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// Send a plain-HTTP server a request under [`LOG_MARK`]; its path, if it was answered.
    fn mark_log(&self) -> Option<String> {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicU64, Ordering};
        static MARKS: AtomicU64 = AtomicU64::new(0);
        let host = self.url.strip_prefix("http://")?;
        let mark = format!("{LOG_MARK}{}", MARKS.fetch_add(1, Ordering::Relaxed));
        let mut stream = std::net::TcpStream::connect(host).ok()?;
        write!(
            stream,
            "GET {mark} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        answer.starts_with("HTTP/1.1 404").then_some(mark)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `kill -9` the process (no shutdown code runs).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill the process and start a new one on the same directory and port.
    pub fn restart(&mut self) {
        self.kill();
        let tmp = self._tmp.take();
        let mut last = None;
        for _ in 0..50 {
            // The port may linger briefly after the kill.
            let env: Vec<(&str, &str)> = self
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let fresh = std::panic::catch_unwind(|| {
                Server::spawn(&self.data_dir, &self.host, &env, self.log.as_deref())
            });
            match fresh {
                Ok(mut fresh) => {
                    self.child = fresh.child.take();
                    self._tmp = tmp;
                    return;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::panic::resume_unwind(last.unwrap());
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of field `name` in a log line (`… name=value …` or `name="value"`).
pub fn log_field(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let end = rest.find([' ', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_owned())
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    digest_with("sha256", bytes)
}

/// Whether `tool` is a command on `PATH`.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a real-client test must fail (CI) rather than skip when `tool` is missing.
pub fn require_tool(tool: &str) -> bool {
    let found = on_path(tool);
    if !found {
        let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1");
        assert!(!required, "{tool} is required (CI=true) but not installed");
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// The `sha256:` digest of the file at `path`.
pub fn file_digest(path: &Path) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut hasher).unwrap();
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Run `layercache expect` against `server` for `repo` since `since`, with `checks`.
pub fn expect(server: &Server, repo: &str, since: &str, checks: &[&str]) -> std::process::Output {
    let mut args = vec![
        "expect",
        "--server",
        &server.url,
        "--repo",
        repo,
        "--since",
        since,
    ];
    args.extend(checks);
    layercache(&args)
}

/// Deterministic pseudo-random bytes: `len` bytes of stream `seed`, generated in chunks.
pub fn chunks(seed: u64, len: usize, chunk: usize) -> impl Iterator<Item = bytes::Bytes> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(chunk);
        left -= n;
        let mut buf = vec![0u8; n];
        rng.fill_bytes(&mut buf);
        Some(bytes::Bytes::from(buf))
    })
}

/// The digest of `chunks(seed, len, chunk)`.
pub fn digest_of_chunks(seed: u64, len: usize, chunk: usize) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for c in chunks(seed, len, chunk) {
        h.update(&c);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Every committed blob file under the data directory hashes to its name.
pub fn assert_blob_files_match_their_names(data_dir: &Path) {
    for (digest, _) in load::blob_file_sizes(data_dir) {
        let (algorithm, hex) = digest.split_once(':').unwrap();
        let path = data_dir
            .join("blobs")
            .join(algorithm)
            .join(&hex[..2])
            .join(hex);
        // Deleted since the listing: nothing to check.
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        assert_eq!(
            digest_with(algorithm, &bytes),
            digest,
            "{} is corrupt",
            path.display()
        );
    }
}

/// The digest of `bytes` with `algorithm` (`sha256`, `sha512` or `blake3`).
pub fn digest_with(algorithm: &str, bytes: &[u8]) -> String {
    use sha2::Digest;
    let hex = match algorithm {
        "sha256" => hex::encode(sha2::Sha256::digest(bytes)),
        "sha512" => hex::encode(sha2::Sha512::digest(bytes)),
        "blake3" => blake3::hash(bytes).to_hex().to_string(),
        other => panic!("no digest algorithm {other}"),
    };
    format!("{algorithm}:{hex}")
}

/// Peak resident memory of a process, in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status");
    kib * 1024
}

/// Run a client command: whether it succeeded, and its output (stdout and stderr
/// interleaved as written).
pub fn run(command: &mut Command) -> (bool, String) {
    use std::io::{Read, Seek};
    let mut log = tempfile::tempfile().unwrap();
    let status = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log.try_clone().unwrap())
        .status()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let mut bytes = Vec::new();
    log.rewind().unwrap();
    log.read_to_end(&mut bytes).unwrap();
    (
        status.success(),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Run the `layercache` binary (without a `LAYERCACHE_SERVER` from the environment).
pub fn layercache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_layercache"))
        .args(args)
        .env_remove("LAYERCACHE_SERVER")
        .output()
        .unwrap()
}

/// `layercache serve` with the configuration file `config` and data in `data_dir`, on a
/// free loopback port: its output, for a start that must be refused.
pub fn serve_refused(config: &Path, data_dir: &Path) -> std::process::Output {
    layercache(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
}

/// Run `command` with `input` on its standard input; its output.
pub fn output_with_input(command: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Run a client command that must succeed; its output.
pub fn run_ok(command: &mut Command) -> String {
    let (ok, text) = run(command);
    assert!(ok, "{command:?} failed:\n{text}");
    text
}

/// A build context holding the static busybox, a nonce unique to this run (so no earlier
/// run's local cache can serve it) and `file_name` with `contents`.
pub fn busybox_context(server: &Server, file_name: &str, contents: &str) -> tempfile::TempDir {
    let context = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", context.path().join("busybox"))
        .expect("a static busybox at /bin/busybox (Debian busybox-static)");
    let nonce = format!("{} {:?}", server.host, std::time::SystemTime::now());
    std::fs::write(context.path().join("nonce"), nonce).unwrap();
    std::fs::write(context.path().join(file_name), contents).unwrap();
    context
}

/// `--progress=plain` output reduced to its build steps (`#N [stage i/n] INSTRUCTION`,
/// without `[internal]` or `[auth]` ones): step text → how it ended (`CACHED`, `DONE …`, `ERROR …`).
pub fn step_outcomes(output: &str) -> std::collections::BTreeMap<String, String> {
    let mut names = std::collections::BTreeMap::new();
    let mut ends = std::collections::BTreeMap::new();
    for line in output.lines() {
        let Some((id, rest)) = line.strip_prefix('#').and_then(|l| l.split_once(' ')) else {
            continue;
        };
        if rest.starts_with('[') && !rest.starts_with("[internal]") && !rest.starts_with("[auth]") {
            names.insert(id.to_owned(), rest.to_owned());
        } else if rest == "CACHED" || rest.starts_with("DONE") || rest.starts_with("ERROR") {
            ends.insert(id.to_owned(), rest.to_owned());
        }
    }
    names
        .into_iter()
        .map(|(id, name)| {
            let end = ends.remove(&id).unwrap_or_else(|| "(no end)".into());
            (name, end)
        })
        .collect()
}

/// The docker client of Debian's `docker.io` (a newer client without buildx refuses
/// `DOCKER_BUILDKIT=1`), with BuildKit on.
pub fn docker(args: &[&str]) -> Command {
    let mut command = Command::new("/usr/bin/docker");
    command.env("DOCKER_BUILDKIT", "1").args(args);
    command
}

/// `docker build` of `context` as `tag` without network for `RUN` (the steps need
/// none), with the inline cache if `inline_cache` and `--cache-from` if given; the
/// output.
pub fn docker_build(
    context: &Path,
    tag: &str,
    inline_cache: bool,
    cache_from: Option<&str>,
) -> String {
    let mut command = docker(&["build", "--network=none", "--progress=plain", "-t", tag]);
    if inline_cache {
        command.args(["--build-arg", "BUILDKIT_INLINE_CACHE=1"]);
    }
    if let Some(from) = cache_from {
        command.args(["--cache-from", from]);
    }
    run_ok(command.arg(context))
}

/// A ustar header for a regular file.
pub fn tar_header(path: &str, len: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let mut field =
        |offset: usize, value: &[u8]| h[offset..offset + value.len()].copy_from_slice(value);
    field(0, path.as_bytes());
    field(100, b"0000644\0");
    field(108, b"0000000\0");
    field(116, b"0000000\0");
    field(124, format!("{len:011o}\0").as_bytes());
    field(136, b"00000000000\0");
    field(148, b"        ");
    field(156, b"0");
    field(257, b"ustar\0");
    field(263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Mint an Actions cache runtime token with `layercache token --data-dir DIR ARGS…`.
pub fn mint_token(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_layercache"))
        .arg("token")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("LAYERCACHE_SERVER")
        .env_remove(SOAK_EVENTS)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "layercache token {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");
    token
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Assert that the build that printed `warm` ran the same steps as the one whose
/// [`step_outcomes`] are `cold`, each of them `CACHED`.
pub fn assert_same_steps_all_cached(cold: &std::collections::BTreeMap<String, String>, warm: &str) {
    let warm_steps = step_outcomes(warm);
    assert_eq!(
        warm_steps.keys().collect::<Vec<_>>(),
        cold.keys().collect::<Vec<_>>(),
        "{warm}"
    );
    let ran: Vec<_> = warm_steps
        .iter()
        .filter(|(_, end)| *end != "CACHED")
        .collect();
    assert!(ran.is_empty(), "steps not CACHED: {ran:#?}\n{warm}");
}
