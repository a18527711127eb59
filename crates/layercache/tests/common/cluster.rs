//! Several `layercache serve` nodes sharing one Garage bucket (blobs) and one PostgreSQL
//! database (metadata), as a scale-out deployment runs them: each node a [`Server`] on
//! its own port and data directory (its audit log, its lock), all signing Actions cache
//! tokens with one key so a token minted for one verifies on every node. Nodes can be
//! killed (`kill -9`) and restarted one at a time; the backing services can be stopped
//! and started for fault injection (a test that does so runs its own instances, so
//! parallel tests keep theirs). A [`RoundRobin`] TCP proxy puts the nodes behind one
//! address, as a load balancer does.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use testsupport::garage::{self, Garage};
use testsupport::postgres::{self, PostgresServer};

use super::Server;

/// Nodes in a cluster unless a test asks for another number.
pub const DEFAULT_NODES: usize = 3;

/// A backing service: the test process's shared instance, or one this cluster owns.
enum Service<T: 'static> {
    Shared(&'static T),
    Own(T),
}

impl<T> std::ops::Deref for Service<T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Service::Shared(service) => service,
            Service::Own(service) => service,
        }
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    nodes: usize,
    own_services: bool,
    env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nodes: DEFAULT_NODES,
            own_services: false,
            env: Vec::new(),
        }
    }
}

impl Options {
    /// Start `count` nodes.
    pub fn nodes(mut self, count: usize) -> Options {
        self.nodes = count;
        self
    }

    /// Run a Garage and a PostgreSQL server of the cluster's own, which the test may
    /// stop and start without disturbing other tests.
    pub fn own_services(mut self) -> Options {
        self.own_services = true;
        self
    }

    /// One more configuration variable for every node (`LAYERCACHE_…`), over the
    /// cluster's own.
    pub fn env(mut self, name: &str, value: &str) -> Options {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// Nodes over one bucket and one database.
pub struct Cluster {
    /// Declared first: the nodes stop before the services they use.
    nodes: Vec<Server>,
    garage: Service<Garage>,
    postgres: Service<PostgresServer>,
    bucket: String,
    database_url: String,
    /// Holds the shared Actions signing key (`actions.key`) and the S3 secret.
    shared: tempfile::TempDir,
}

impl Cluster {
    /// Three nodes on the test process's Garage and PostgreSQL (a bucket and a database
    /// of the cluster's own); `None` when the services are not installed and the test
    /// may skip.
    pub fn start() -> Option<Cluster> {
        Cluster::start_with(Options::default())
    }

    /// A cluster as `options` say; `None` when the services are not installed and the
    /// test may skip (under `REQUIRE_REAL_CLIENTS=1` or `CI=true` that fails instead).
    pub fn start_with(options: Options) -> Option<Cluster> {
        let services = if options.own_services {
            own_garage()
                .map(Service::Own)
                .zip(own_postgres().map(Service::Own))
        } else {
            garage::require()
                .map(Service::Shared)
                .zip(postgres::require().map(Service::Shared))
        };
        let Some((garage, postgres)) = services else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "Garage and PostgreSQL are required (CI=true)");
            return None;
        };
        let bucket = unique_name("cluster");
        garage
            .create_bucket(&bucket)
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
        let database_url = postgres.create_database();
        let shared = tempfile::tempdir().unwrap();
        let key: [u8; 32] = rand::random();
        std::fs::write(shared.path().join("actions.key"), hex::encode(key)).unwrap();
        let secret_file = shared.path().join("s3-secret");
        std::fs::write(&secret_file, garage.secret()).unwrap();

        let mut cluster = Cluster {
            nodes: Vec::new(),
            garage,
            postgres,
            bucket,
            database_url,
            shared,
        };
        let mut env = cluster.backend_env(&secret_file);
        env.extend(options.env);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // One after another: the first creates the database's schema.
        for _ in 0..options.nodes {
            cluster.nodes.push(Server::start_logged(&env));
        }
        Some(cluster)
    }

    /// The configuration every node gets: the bucket, the database, the shared key.
    fn backend_env(&self, secret_file: &Path) -> Vec<(String, String)> {
        [
            ("LAYERCACHE_STORE__BLOBS__BACKEND", "s3".to_owned()),
            ("LAYERCACHE_STORE__BLOBS__ENDPOINT", self.garage.endpoint()),
            ("LAYERCACHE_STORE__BLOBS__BUCKET", self.bucket.clone()),
            (
                "LAYERCACHE_STORE__BLOBS__REGION",
                self.garage.region().to_owned(),
            ),
            ("LAYERCACHE_STORE__BLOBS__PREFIX", "layercache".to_owned()),
            (
                "LAYERCACHE_STORE__BLOBS__ACCESS_KEY_ID",
                self.garage.key_id().to_owned(),
            ),
            (
                "LAYERCACHE_STORE__BLOBS__SECRET_ACCESS_KEY_FILE",
                path_text(secret_file),
            ),
            // A bucket has no size to take a share of: the quota is a size (tests
            // that evict set their own).
            ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "4GiB".to_owned()),
            ("LAYERCACHE_STORE__META__BACKEND", "postgres".to_owned()),
            ("LAYERCACHE_STORE__META__URL", self.database_url.clone()),
            ("LAYERCACHE_ACTIONS__KEY_FILE", path_text(&self.key_path())),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// The shared Actions signing key.
    fn key_path(&self) -> PathBuf {
        self.shared.path().join("actions.key")
    }

    /// Node `index`.
    pub fn node(&self, index: usize) -> &Server {
        &self.nodes[index]
    }

    /// Every node.
    pub fn nodes(&self) -> &[Server] {
        &self.nodes
    }

    /// `kill -9` node `index` (no shutdown code runs).
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
    }

    /// Start node `index` again (killing it first if it runs), on its data directory
    /// and port.
    pub fn restart(&mut self, index: usize) {
        self.nodes[index].restart();
    }

    /// The Garage the blobs are in.
    pub fn garage(&self) -> &Garage {
        &self.garage
    }

    /// The PostgreSQL server the metadata is in.
    pub fn postgres(&self) -> &PostgresServer {
        &self.postgres
    }

    /// The bucket the blobs are in.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The database's URL.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// An Actions cache runtime token (`layercache token` with `args`) that every node
    /// accepts.
    pub fn token(&self, args: &[&str]) -> String {
        // `token` reads `actions.key` in the data directory it is given.
        super::mint_token(self.shared.path(), args)
    }

    /// The responses every node has logged so far, counted by status.
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut counts = BTreeMap::new();
        for node in &self.nodes {
            for status in served_statuses(&node.log()) {
                *counts.entry(status).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The logs of every node, one after another, for a failure's message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for (index, node) in self.nodes.iter().enumerate() {
            all.push_str(&format!("---- node {index} ({}) ----\n", node.url));
            all.push_str(&node.log());
        }
        all
    }

    /// A round-robin proxy in front of every node.
    pub fn round_robin(&self) -> RoundRobin {
        let hosts: Vec<String> = self.nodes.iter().map(|n| n.host.clone()).collect();
        RoundRobin::start(&hosts)
    }
}

/// A Garage of the caller's own; `None` when Garage is not installed and the test may
/// skip.
fn own_garage() -> Option<Garage> {
    if !garage::available() {
        // Skips, or fails when real services are required.
        garage::require();
        return None;
    }
    Some(Garage::start_new().unwrap_or_else(|e| panic!("starting Garage: {e}")))
}

/// A PostgreSQL server of the caller's own; `None` when PostgreSQL is not installed and
/// the test may skip.
fn own_postgres() -> Option<PostgresServer> {
    if !postgres::available() {
        // Skips, or fails when real services are required.
        postgres::require();
        return None;
    }
    Some(PostgresServer::start_new().unwrap_or_else(|e| panic!("starting PostgreSQL: {e}")))
}

/// The status of every `served` line of a node's log.
fn served_statuses(log: &str) -> impl Iterator<Item = u16> + '_ {
    log.lines()
        .filter(|line| line.contains(" served"))
        .filter_map(|line| {
            let (_, rest) = line.split_once(" status=")?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
}

/// A name no other cluster of any test process uses (a bucket's: lowercase, digits
/// and dashes).
fn unique_name(kind: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("a UTF-8 path").to_owned()
}

// ---- a load balancer ----

/// A TCP proxy that sends each new connection to the next node that accepts one, in
/// turn, as a round-robin load balancer does: a client that retries after its node died
/// lands on another. Stops (and cuts its connections) when dropped.
pub struct RoundRobin {
    /// `127.0.0.1:PORT`, as registry clients want it.
    pub host: String,
    upstreams: Arc<Vec<Upstream>>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<Weak<TcpStream>>>>,
    accepting: Option<JoinHandle<()>>,
}

/// One node behind the proxy and what went to it.
struct Upstream {
    host: String,
    connections: AtomicUsize,
    bytes_in: AtomicU64,
}

impl RoundRobin {
    /// Start a proxy in front of `hosts` (`HOST:PORT` each).
    pub fn start(hosts: &[String]) -> RoundRobin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let upstreams: Arc<Vec<Upstream>> = Arc::new(
            hosts
                .iter()
                .map(|host| Upstream {
                    host: host.clone(),
                    connections: AtomicUsize::new(0),
                    bytes_in: AtomicU64::new(0),
                })
                .collect(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let accepting = {
            let (upstreams, stop, open) = (upstreams.clone(), stop.clone(), open.clone());
            std::thread::spawn(move || accept(listener, &upstreams, &stop, &open))
        };
        RoundRobin {
            host,
            upstreams,
            stop,
            open,
            accepting: Some(accepting),
        }
    }

    /// `http://` + the proxy's address.
    pub fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Connections sent to each node so far.
    pub fn connections(&self) -> Vec<usize> {
        self.upstreams
            .iter()
            .map(|u| u.connections.load(Ordering::SeqCst))
            .collect()
    }

    /// Bytes clients sent to each node so far.
    pub fn bytes_in(&self) -> Vec<u64> {
        self.upstreams
            .iter()
            .map(|u| u.bytes_in.load(Ordering::SeqCst))
            .collect()
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.host);
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.join();
        }
        for stream in self.open.lock().unwrap().drain(..) {
            if let Some(stream) = stream.upgrade() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Accept connections until `stop`, each proxied to the next upstream that takes it.
fn accept(
    listener: TcpListener,
    upstreams: &Arc<Vec<Upstream>>,
    stop: &AtomicBool,
    open: &Mutex<Vec<Weak<TcpStream>>>,
) {
    let mut next = 0;
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let connected = (0..upstreams.len()).find_map(|attempt| {
            let index = (next + attempt) % upstreams.len();
            let address = upstreams[index].host.parse().unwrap();
            TcpStream::connect_timeout(&address, Duration::from_secs(2))
                .ok()
                .map(|server| (index, server))
        });
        next = (next + 1) % upstreams.len();
        let Some((index, server)) = connected else {
            // No node is up: the client sees its connection closed.
            continue;
        };
        upstreams[index].connections.fetch_add(1, Ordering::SeqCst);
        let (client, server) = (Arc::new(client), Arc::new(server));
        {
            let mut open = open.lock().unwrap();
            open.retain(|stream| stream.strong_count() > 0);
            open.extend([Arc::downgrade(&client), Arc::downgrade(&server)]);
        }
        let upstreams = upstreams.clone();
        let (client_side, server_side) = (client.clone(), server.clone());
        std::thread::spawn(move || {
            pipe(&client_side, &server_side, |n| {
                upstreams[index].bytes_in.fetch_add(n, Ordering::SeqCst);
            })
        });
        std::thread::spawn(move || pipe(&server, &client, |_| {}));
    }
}

/// Copy `from` to `to` until either end closes, telling `count` how many bytes went;
/// then cut both, so the other direction ends too (a node killed in the middle of a
/// request cuts its client off, as a balancer does).
fn pipe(from: &TcpStream, to: &TcpStream, count: impl Fn(u64)) {
    let (mut reader, mut writer) = (from, to);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    break;
                }
                count(n as u64);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
