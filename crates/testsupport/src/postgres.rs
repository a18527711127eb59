//! A throwaway PostgreSQL server: a cluster `initdb`'d in a temporary directory (UTF-8,
//! with an `en-US` default collation where the server has ICU), served by `postgres` on
//! a free loopback port with `trust` authentication and `fsync=off`.
//!
//! The server is killed with the test process (`setpriv --pdeathsig KILL`, from a thread
//! that lives as long as the process) and stopped when its [`PostgresServer`] is dropped.
//! Clusters left behind by test processes that are gone are removed when the next one
//! starts.

use crate::process::{free_port, run, spawn_from_lasting_thread};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming the directory holding `initdb`, `postgres` and `psql`.
pub const BIN_DIR_VAR: &str = "LAYERCACHE_PG_BIN";
pub use crate::process::REQUIRE_VAR;

/// The operating-system user that owns the cluster when the tests run as root
/// (`postgres` refuses to run as root).
const SERVICE_USER: &str = "postgres";
/// The database superuser every URL connects as.
const SUPERUSER: &str = "postgres";
/// Prefix of the temporary directory of every cluster, followed by the owning pid.
const DIR_PREFIX: &str = "layercache-pg-";
/// How long a start may take before it is a failure.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or stopped, see [`stop`](Self::stop)) PostgreSQL server of its own.
#[derive(Debug)]
pub struct PostgresServer {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    as_service_user: bool,
    server: Mutex<Option<Child>>,
    // Last: removed after the server is stopped.
    _dir: tempfile::TempDir,
}

impl PostgresServer {
    /// Initialise a cluster in a new temporary directory and start a server on it.
    pub fn start_new() -> io::Result<PostgresServer> {
        let bin = bin_dir().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("PostgreSQL binaries not found (set {BIN_DIR_VAR})"),
            )
        })?;
        crate::process::remove_abandoned(DIR_PREFIX);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let as_service_user = running_as_root()?;
        let (data, socket_dir) = (dir.path().join("data"), dir.path().join("socket"));
        std::fs::create_dir(&socket_dir)?;
        if as_service_user {
            run(Command::new("chown")
                .arg("-R")
                .arg(format!("{SERVICE_USER}:{SERVICE_USER}"))
                .arg(dir.path()))?;
        }
        // A linguistic default collation, as on most production servers, so that a query
        // relying on byte order without saying so fails here too; where the server lacks
        // ICU, the C locale.
        let locales: [&[&str]; 2] = [
            &[
                "--locale",
                "C.UTF-8",
                "--locale-provider",
                "icu",
                "--icu-locale",
                "en-US",
            ],
            &["--no-locale"],
        ];
        let mut initialised = Err(io::Error::other("initdb was not run"));
        for locale in locales {
            let mut initdb = service_command(&bin.join("initdb"), as_service_user, false);
            initdb
                .arg("--pgdata")
                .arg(&data)
                .args(["--username", SUPERUSER, "--auth", "trust"])
                .args(["--encoding", "UTF8", "--no-sync"])
                .args(locale);
            initialised = run(&mut initdb);
            if initialised.is_ok() {
                break;
            }
        }
        initialised?;
        let server = PostgresServer {
            bin,
            data,
            socket_dir,
            port: free_port()?,
            as_service_user,
            server: Mutex::new(None),
            _dir: dir,
        };
        server.try_start()?;
        Ok(server)
    }

    /// The server every test of this process shares, started on first use.
    ///
    /// # Panics
    ///
    /// When it cannot be started (see [`require`] to skip where PostgreSQL is missing).
    #[allow(clippy::panic)]
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            PostgresServer::start_new()
                .unwrap_or_else(|e| panic!("starting the test PostgreSQL server: {e}"))
        })
    }

    /// The TCP port it listens on (on 127.0.0.1), the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `name` on this server, as the superuser.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Create a fresh, empty database with a unique name; returns its URL.
    ///
    /// # Panics
    ///
    /// When the server does not create it (it is stopped, or failing).
    #[allow(clippy::panic)]
    pub fn create_database(&self) -> String {
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        self.url(&name)
    }

    /// Run `sql` in `database` with `psql` (stopping at the first error); returns its
    /// unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> io::Result<String> {
        let output = run(Command::new(self.bin.join("psql"))
            .args(["--no-psqlrc", "--quiet", "--tuples-only", "--no-align"])
            .args(["--set", "ON_ERROR_STOP=1", "--host", "127.0.0.1"])
            .args(["--port", &self.port.to_string(), "--username", SUPERUSER])
            .args(["--dbname", database, "--command", sql]))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Stop the server (a fast shutdown: open sessions are ended) and wait until it is
    /// gone; a no-op when it is stopped.
    ///
    /// # Panics
    ///
    /// When it cannot be signalled.
    #[allow(clippy::panic)]
    pub fn stop(&self) {
        self.try_stop()
            .unwrap_or_else(|e| panic!("stopping the test PostgreSQL server: {e}"));
    }

    /// Start the server again on the same port and data directory, and wait until it
    /// accepts connections; a no-op when it is running.
    ///
    /// # Panics
    ///
    /// When it does not come up.
    #[allow(clippy::panic)]
    pub fn start(&self) {
        self.try_start()
            .unwrap_or_else(|e| panic!("starting the test PostgreSQL server: {e}"));
    }

    /// Whether the server process is running.
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
        let mut postgres = service_command(&self.bin.join("postgres"), self.as_service_user, true);
        postgres
            .arg("-D")
            .arg(&self.data)
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.socket_dir.display()
            ))
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(["-c", "shared_buffers=64MB", "-c", "log_min_messages=fatal"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn_from_lasting_thread(postgres)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "postgres exited with {status} while starting"
                )));
            }
            if self.accepts_connections() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "postgres did not accept connections in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *server = Some(child);
        Ok(())
    }

    fn accepts_connections(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args([
                "--quiet",
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
            ])
            .args(["--username", SUPERUSER, "--dbname", "postgres"])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn try_stop(&self) -> io::Result<()> {
        let mut server = self.server();
        let Some(mut child) = server.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        // SIGINT: the fast shutdown, which ends sessions and removes the shared memory
        // so the next start on this data directory succeeds.
        run(Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .stdin(Stdio::null()))?;
        child.wait()?;
        Ok(())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.try_stop().is_err()
            && let Some(mut child) = self.server().take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the PostgreSQL binaries are installed.
pub fn available() -> bool {
    bin_dir().is_some()
}

pub use crate::process::required;

/// The shared server, or `None` (with a note on stderr) when PostgreSQL is not
/// installed and [`REQUIRE_VAR`] is unset, so the calling test can return early.
///
/// # Panics
///
/// When PostgreSQL is missing and [`REQUIRE_VAR`] is set, or when it fails to start.
#[allow(clippy::panic)]
pub fn require() -> Option<&'static PostgresServer> {
    if available() {
        return Some(PostgresServer::shared());
    }
    if required() {
        panic!("PostgreSQL is not installed (set {BIN_DIR_VAR}) and {REQUIRE_VAR} is set");
    }
    eprintln!(
        "skipped: PostgreSQL is not installed (set {BIN_DIR_VAR}, or {REQUIRE_VAR}=1 to fail)"
    );
    None
}

/// The directory holding the PostgreSQL server binaries: [`BIN_DIR_VAR`], else the
/// newest `/usr/lib/postgresql/<version>/bin`, else the one `pg_config` names.
fn bin_dir() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "postgres", "psql", "pg_isready"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os(BIN_DIR_VAR) {
        return Some(PathBuf::from(dir)).filter(|d| complete(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| complete(d)) {
        return Some(dir);
    }
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    (output.status.success() && complete(&dir)).then_some(dir)
}

/// `program`, run as [`SERVICE_USER`] when `as_service_user`, and killed when the
/// thread that spawns it exits with `die_with_parent`.
fn service_command(program: &Path, as_service_user: bool, die_with_parent: bool) -> Command {
    if !as_service_user && !die_with_parent {
        return Command::new(program);
    }
    let mut command = Command::new("setpriv");
    if as_service_user {
        command
            .args(["--reuid", SERVICE_USER, "--regid", SERVICE_USER])
            .arg("--clear-groups");
    }
    if die_with_parent {
        command.args(["--pdeathsig", "KILL"]);
    }
    command.arg(program);
    command
}

fn running_as_root() -> io::Result<bool> {
    let output = run(Command::new("id").arg("-u"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_serves_fresh_databases_and_comes_back_after_a_stop() {
        if !available() && !required() {
            return;
        }
        let server = PostgresServer::start_new().unwrap();
        let url = server.create_database();
        let name = url.rsplit('/').next().unwrap().to_owned();
        assert_ne!(server.create_database(), url);
        let provider = server
            .psql(
                &name,
                "SELECT datlocprovider FROM pg_database WHERE datname = current_database()",
            )
            .unwrap();
        if provider.trim() == "i" {
            let linguistic = server.psql(&name, "SELECT 'a' < 'B'").unwrap();
            assert_eq!(linguistic.trim(), "t");
        }
        server
            .psql(&name, "CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
            .unwrap();
        server.stop();
        assert!(!server.is_running());
        assert!(server.psql(&name, "SELECT 1").is_err());
        server.start();
        assert!(server.is_running());
        assert_eq!(server.psql(&name, "SELECT v FROM t").unwrap().trim(), "7");
        let dir = server._dir.path().to_owned();
        drop(server);
        assert!(!dir.exists());
    }
}
