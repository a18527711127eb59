//! A throwaway Garage node: an S3-compatible object store run from its installed binary
//! in a temporary directory, with a single-node layout, an access key and a bucket the
//! key may read, write and own.
//!
//! The node is killed with the test process (`setpriv --pdeathsig KILL`, from a thread
//! that lives as long as the process) and stopped when its [`Garage`] is dropped. Nodes
//! left behind by test processes that are gone are removed when the next one starts.

use crate::process::{free_port, run, spawn_from_lasting_thread};
use std::io;
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming the `garage` binary to run.
pub const BIN_VAR: &str = "GARAGE_BIN";
pub use crate::process::REQUIRE_VAR;
/// The S3 region the node answers for.
pub const REGION: &str = "garage";

/// Prefix of the temporary directory of every node, followed by the owning pid.
const DIR_PREFIX: &str = "layercache-garage-";
/// How long a start may take before it is a failure.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The bucket every node starts with.
const DEFAULT_BUCKET: &str = "layercache";

/// A running (or stopped, see [`stop`](Self::stop)) Garage node of its own.
#[derive(Debug)]
pub struct Garage {
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    key_id: String,
    secret: String,
    server: Mutex<Option<Child>>,
    // Last: removed after the node is stopped.
    dir: tempfile::TempDir,
}

impl Garage {
    /// Configure a node in a new temporary directory, start it and wait until its
    /// bucket can be used.
    pub fn start_new() -> io::Result<Garage> {
        let binary = binary().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("garage not found (set {BIN_VAR}, or install it with cargo)"),
            )
        })?;
        crate::process::remove_abandoned(DIR_PREFIX);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let (s3_port, rpc_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        let config = dir.path().join("garage.toml");
        let text = format!(
            "metadata_dir = {meta:?}\n\
             data_dir = {data:?}\n\
             db_engine = \"sqlite\"\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_secret = \"{rpc_secret}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             \n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin_port}\"\n\
             admin_token = \"{admin_token}\"\n",
            meta = dir.path().join("meta"),
            data = dir.path().join("data"),
            rpc_secret = random_hex(64),
            admin_token = random_hex(32),
        );
        // The file holds secrets: Garage wants it private.
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&config)?,
            text.as_bytes(),
        )?;
        let garage = Garage {
            binary,
            log: dir.path().join("garage.log"),
            config,
            s3_port,
            // Garage's formats: `GK` and 24 hex digits; 64 hex digits.
            key_id: format!("GK{}", random_hex(24)),
            secret: random_hex(64),
            server: Mutex::new(None),
            dir,
        };
        garage.try_start()?;
        Ok(garage)
    }

    /// The node every test of this process shares, started on first use. Tests that
    /// stop their node start one of their own with [`start_new`](Self::start_new).
    ///
    /// # Panics
    ///
    /// When it cannot be started (see [`require`] to skip where Garage is missing).
    #[allow(clippy::panic)]
    pub fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(|| {
            Garage::start_new().unwrap_or_else(|e| panic!("starting the test Garage node: {e}"))
        })
    }

    /// The S3 API's URL, the same across restarts.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The S3 region the node answers for.
    pub fn region(&self) -> &str {
        REGION
    }

    /// The access key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The secret access key.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The bucket the node starts with.
    pub fn bucket(&self) -> &str {
        DEFAULT_BUCKET
    }

    /// Create bucket `name` that the key may read, write and own.
    pub fn create_bucket(&self, name: &str) -> io::Result<()> {
        let created = self.admin("CreateBucket", &serde_json::json!({ "globalAlias": name }))?;
        let id = created
            .get("id")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| io::Error::other(format!("CreateBucket answered {created}")))?;
        self.admin(
            "AllowBucketKey",
            &serde_json::json!({
                "bucketId": id,
                "accessKeyId": self.key_id,
                "permissions": { "read": true, "write": true, "owner": true },
            }),
        )?;
        Ok(())
    }

    /// Stop the node at once (`SIGKILL`, as a crash or a lost machine would) and wait
    /// until it is gone; a no-op when it is stopped.
    ///
    /// # Panics
    ///
    /// When it cannot be signalled.
    #[allow(clippy::panic)]
    pub fn stop(&self) {
        self.try_stop()
            .unwrap_or_else(|e| panic!("stopping the test Garage node: {e}"));
    }

    /// Start the node again on the same ports and data, and wait until its bucket can be
    /// used; a no-op when it is running.
    ///
    /// # Panics
    ///
    /// When it does not come up.
    #[allow(clippy::panic)]
    pub fn start(&self) {
        self.try_start()
            .unwrap_or_else(|e| panic!("starting the test Garage node: {e}"));
    }

    /// Freeze the node (`SIGSTOP`) and wait until every thread of it has stopped: its
    /// connections stay open and nothing answers, as with a hung store;
    /// [`resume`](Self::resume) thaws it.
    ///
    /// # Panics
    ///
    /// When it is not running, cannot be signalled or does not stop within seconds.
    pub fn pause(&self) {
        let pid = self.signal("STOP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(pid) {
            assert!(
                Instant::now() < deadline,
                "the test Garage node did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Let a [`pause`](Self::pause)d node go on (`SIGCONT`).
    ///
    /// # Panics
    ///
    /// When it is not running or cannot be signalled.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Send the node's process the signal `name`; returns its pid.
    #[allow(clippy::panic)]
    fn signal(&self, name: &str) -> u32 {
        let pid = match self.server().as_ref() {
            Some(child) => child.id(),
            None => panic!("the test Garage node is not running"),
        };
        run(Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string()))
        .unwrap_or_else(|e| panic!("signalling the test Garage node: {e}"));
        pid
    }

    /// Whether the node's process is running.
    pub fn is_running(&self) -> bool {
        let mut server = self.server();
        match server.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *server = None;
                false
            }
            None => false,
        }
    }

    fn server(&self) -> MutexGuard<'_, Option<Child>> {
        self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_start(&self) -> io::Result<()> {
        let mut server = self.server();
        if let Some(child) = server.as_mut()
            && child.try_wait()?.is_none()
        {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(&self.binary)
            .arg("--config")
            .arg(&self.config)
            // Garage lays out the single node, creates the key from the environment
            // (the same one at every start) and the bucket with every right for it.
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret)
            .env("GARAGE_DEFAULT_BUCKET", DEFAULT_BUCKET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn_from_lasting_thread(command)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "garage exited with {status} while starting: {}",
                    self.log_tail()
                )));
            }
            if self.is_ready() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("garage was not ready in time: {}", self.log_tail()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *server = Some(child);
        Ok(())
    }

    /// Whether the layout is healthy, the bucket exists and the S3 API accepts
    /// connections.
    fn is_ready(&self) -> bool {
        let healthy = self
            .admin("GetClusterHealth", &serde_json::Value::Null)
            .is_ok_and(|health| {
                health.get("status").and_then(serde_json::Value::as_str) == Some("healthy")
            });
        healthy
            && self
                .admin(
                    "GetBucketInfo",
                    &serde_json::json!({ "globalAlias": DEFAULT_BUCKET }),
                )
                .is_ok()
            && TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok()
    }

    /// Call the admin API's `endpoint` (`GetBucketInfo`, `ListKeys`...) through the
    /// command line; returns its JSON answer.
    pub fn admin(
        &self,
        endpoint: &str,
        payload: &serde_json::Value,
    ) -> io::Result<serde_json::Value> {
        let output = run(Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .args(["json-api", endpoint, &payload.to_string()]))?;
        serde_json::from_slice(&output.stdout).map_err(io::Error::other)
    }

    /// The last 20 lines of the node's log (its warnings and errors).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(20);
        lines.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
    }

    fn try_stop(&self) -> io::Result<()> {
        let mut server = self.server();
        let Some(mut child) = server.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            child.kill()?;
        }
        child.wait()?;
        Ok(())
    }

    /// Where the node keeps its files (its configuration and its log among them).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.try_stop();
    }
}

/// Whether every thread of process `pid` is stopped (state `T` in its `stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().all(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command's closing parenthesis.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}

/// Whether a `garage` binary is installed.
pub fn available() -> bool {
    binary().is_some()
}

pub use crate::process::required;

/// The shared node, or `None` (with a note on stderr) when Garage is not installed and
/// [`REQUIRE_VAR`] is unset, so the calling test can return early.
///
/// # Panics
///
/// When Garage is missing and [`REQUIRE_VAR`] is set, or when it fails to start.
#[allow(clippy::panic)]
pub fn require() -> Option<&'static Garage> {
    if available() {
        return Some(Garage::shared());
    }
    if required() {
        panic!("garage is not installed (set {BIN_VAR}) and {REQUIRE_VAR} is set");
    }
    eprintln!("skipped: garage is not installed (set {BIN_VAR}, or {REQUIRE_VAR}=1 to fail)");
    None
}

/// The `garage` binary: [`BIN_VAR`], else `~/.cargo/bin/garage`, else `garage` on the
/// `PATH`.
fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(BIN_VAR) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin").join("garage"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("garage"));
    cargo_bin.into_iter().chain(on_path).find(|p| p.is_file())
}

/// `len` random hexadecimal digits.
fn random_hex(len: usize) -> String {
    let mut hex = String::with_capacity(len + 32);
    while hex.len() < len {
        hex.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    hex.truncate(len);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_serves_its_bucket_and_comes_back_after_a_stop_on_the_same_port() {
        if !available() && !required() {
            return;
        }
        let garage = Garage::start_new().unwrap();
        let endpoint = garage.endpoint();
        garage.create_bucket("second").unwrap();
        garage.stop();
        assert!(!garage.is_running());
        assert!(TcpStream::connect(("127.0.0.1", garage.s3_port)).is_err());
        garage.start();
        assert!(garage.is_running());
        assert_eq!(garage.endpoint(), endpoint);
        let buckets = garage
            .admin("ListBuckets", &serde_json::json!({}))
            .unwrap()
            .to_string();
        assert!(buckets.contains("second") && buckets.contains(DEFAULT_BUCKET));
        let dir = garage.dir().to_owned();
        drop(garage);
        assert!(!dir.exists());
    }
}
