//! The official GitHub Actions cache client (`@actions/cache`, driven by
//! `tests/actions-cache/cache.mjs`) run as a job step would, for the tests that save and
//! restore through it.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::Digest as _;

/// The npm package holding the client and `cache.mjs`.
pub const CLIENT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/actions-cache");

/// How long one run of a small save or restore may take.
pub const SMALL_RUN: Duration = Duration::from_secs(120);

/// Environment of the test process that must not reach the client.
pub const CLEARED_ENV: &[&str] = &[
    "ACTIONS_CACHE_URL",
    "ACTIONS_RESULTS_URL",
    "ACTIONS_CACHE_SERVICE_V2",
    "ACTIONS_CACHE_MODE",
    "ACTIONS_RUNTIME_TOKEN",
    "ACTIONS_STEP_DEBUG",
    "CACHE_UPLOAD_CONCURRENCY",
    "CACHE_UPLOAD_CHUNK_SIZE",
    "GITHUB_REF",
    "GITHUB_SERVER_URL",
    "GITHUB_WORKSPACE",
    "RUNNER_DEBUG",
    "RUNNER_TEMP",
    "SEGMENT_DOWNLOAD_TIMEOUT_MINS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// Whether the client is installed; if not, skip (or fail when real clients are required).
pub fn client_ready() -> bool {
    if !super::require_tool("node") || !super::require_tool("zstd") {
        return false;
    }
    let installed = Path::new(CLIENT_DIR)
        .join("node_modules/@actions/cache/package.json")
        .is_file();
    if !installed {
        let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "@actions/cache is required but not installed in {CLIENT_DIR} \
             (scripts/setup-clients.sh runs npm ci there)"
        );
        eprintln!("SKIPPED: @actions/cache is not installed (npm ci in {CLIENT_DIR})");
    }
    installed
}

/// The cache protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Legacy REST: `ACTIONS_CACHE_URL`.
    V1,
    /// Twirp + Azure Blob: `ACTIONS_RESULTS_URL`, `ACTIONS_CACHE_SERVICE_V2`.
    V2,
}

/// `cache.mjs` run as a job step would: with the runner's environment for one protocol,
/// a token, a fresh `RUNNER_TEMP` and the working directory at `GITHUB_WORKSPACE`.
pub struct Client<'a> {
    /// The protocol it speaks.
    pub protocol: Protocol,
    /// The base URL, with its trailing slash.
    pub url: String,
    /// Its runtime token.
    pub token: &'a str,
}

impl<'a> Client<'a> {
    /// A client of `server` speaking `protocol` with `token`.
    pub fn new(protocol: Protocol, server: &super::Server, token: &'a str) -> Client<'a> {
        Client {
            protocol,
            url: format!("{}/", server.url),
            token,
        }
    }

    /// `node cache.mjs args...` in `workspace`, with `runner_temp`.
    pub fn command(&self, workspace: &Path, runner_temp: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("node");
        command
            .arg(Path::new(CLIENT_DIR).join("cache.mjs"))
            .args(args)
            .current_dir(workspace);
        for var in CLEARED_ENV {
            command.env_remove(var);
        }
        command
            .env("RUNNER_TEMP", runner_temp)
            .env("GITHUB_WORKSPACE", workspace)
            .env("ACTIONS_RUNTIME_TOKEN", self.token);
        match self.protocol {
            Protocol::V1 => command.env("ACTIONS_CACHE_URL", &self.url),
            Protocol::V2 => command
                .env("ACTIONS_RESULTS_URL", &self.url)
                .env("ACTIONS_CACHE_SERVICE_V2", "true")
                .env("GITHUB_SERVER_URL", "https://github.com"),
        };
        command
    }

    /// Run `cache.mjs args...`; the `result` it printed and its output.
    pub fn run(&self, workspace: &Path, args: &[&str], limit: Duration) -> (Value, String) {
        let runner_temp = tempfile::tempdir().unwrap();
        let mut running = Running::spawn(self.command(workspace, runner_temp.path(), args));
        let (status, output) = running.finish(limit);
        assert!(
            status.success(),
            "{:?} cache.mjs {args:?} failed ({status}):\n{output}",
            self.protocol
        );
        (result_of(&output), output)
    }

    /// `saveCache(paths, key)` from `workspace`: the cache id (-1: not saved) and the output.
    pub fn save(
        &self,
        workspace: &Path,
        key: &str,
        paths: &[&str],
        limit: Duration,
    ) -> (i64, String) {
        let args: Vec<&str> = ["save", key].iter().chain(paths).copied().collect();
        let (result, output) = self.run(workspace, &args, limit);
        let id = result
            .as_i64()
            .unwrap_or_else(|| panic!("save result {result} is not a number:\n{output}"));
        (id, output)
    }

    /// `restoreCache(paths, primary, restore_keys)` into `workspace`: the matched key and
    /// the output.
    pub fn restore(
        &self,
        workspace: &Path,
        primary: &str,
        restore_keys: &[&str],
        paths: &[&str],
        limit: Duration,
    ) -> (Option<String>, String) {
        let keys = if restore_keys.is_empty() {
            "-".to_owned()
        } else {
            restore_keys.join(",")
        };
        let args: Vec<&str> = ["restore", primary, &keys]
            .iter()
            .copied()
            .chain(paths.iter().copied())
            .collect();
        let (result, output) = self.run(workspace, &args, limit);
        let matched = match result {
            Value::Null => None,
            Value::String(key) => Some(key),
            other => panic!("restore result {other} is neither a key nor null:\n{output}"),
        };
        (matched, output)
    }

    /// A small save that must succeed: the cache id.
    pub fn save_ok(&self, workspace: &Path, key: &str, paths: &[&str]) -> i64 {
        let (id, output) = self.save(workspace, key, paths, SMALL_RUN);
        assert!(
            id > 0,
            "{:?} save of {key} failed (id {id}):\n{output}",
            self.protocol
        );
        id
    }

    /// A small restore into a fresh workspace: the matched key, the restored tree's
    /// digests (empty on a miss) and the output.
    pub fn restore_fresh(
        &self,
        primary: &str,
        restore_keys: &[&str],
        paths: &[&str],
    ) -> (Option<String>, BTreeMap<String, String>, String) {
        let workspace = tempfile::tempdir().unwrap();
        let (matched, output) =
            self.restore(workspace.path(), primary, restore_keys, paths, SMALL_RUN);
        (matched, tree_digests(workspace.path()), output)
    }
}

/// The `result` of the last `{"result": ...}` line of `output`.
pub fn result_of(output: &str) -> Value {
    let line = output
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"result\""))
        .unwrap_or_else(|| panic!("no result line in:\n{output}"));
    let parsed: Value = serde_json::from_str(line).unwrap();
    parsed["result"].clone()
}

/// A child process whose stdout and stderr lines are collected as they come.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// The lines collected so far.
    pub output: String,
}

impl Running {
    pub fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        fn forward(from: impl Read + Send + 'static, to: mpsc::Sender<String>) {
            std::thread::spawn(move || {
                for line in BufReader::new(from).lines() {
                    let Ok(line) = line else { return };
                    if to.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        forward(stdout, send.clone());
        forward(stderr, send);
        Running {
            child,
            lines,
            output: String::new(),
        }
    }

    /// Collect the lines available now, and those arriving within `wait`.
    pub fn drain(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.output.push_str(&line);
                    self.output.push('\n');
                }
                Err(_) => return,
            }
        }
    }

    /// Wait (up to `limit`) for a line containing `needle`; whether one came.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.output.contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.output.push_str(&line);
                    self.output.push('\n');
                }
                Err(_) => return self.output.contains(needle),
            }
        }
    }

    /// Wait for the process to end (killing it after `limit`): its status and output.
    pub fn finish(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.output.push_str(&line);
                    self.output.push('\n');
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the client did not finish within {limit:?}; its output:\n{}",
                    self.output
                );
            }
        }
        let status = self.child.wait().unwrap();
        (status, std::mem::take(&mut self.output))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every regular file under `dir`: its path relative to `dir` → `sha256` hex.
pub fn tree_digests(dir: &Path) -> BTreeMap<String, String> {
    pub fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(root, &path, into);
            } else {
                let mut hasher = sha2::Sha256::new();
                std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut hasher).unwrap();
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                into.insert(relative, hex::encode(hasher.finalize()));
            }
        }
    }
    let mut digests = BTreeMap::new();
    walk(dir, dir, &mut digests);
    digests
}

/// Write `files` (path under `dir`, length) of pseudo-random bytes from stream `seed`;
/// their digests as [`tree_digests`] of `dir` reports them.
pub fn write_tree(dir: &Path, seed: u64, files: &[(&str, usize)]) -> BTreeMap<String, String> {
    let mut digests = BTreeMap::new();
    for (i, &(name, len)) in files.iter().enumerate() {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = std::fs::File::create(&path).unwrap();
        let mut hasher = sha2::Sha256::new();
        for chunk in super::chunks(seed * 1000 + i as u64, len, 8 << 20) {
            hasher.update(&chunk);
            file.write_all(&chunk).unwrap();
        }
        let relative = path
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        digests.insert(relative, hex::encode(hasher.finalize()));
    }
    digests
}
