//! The metadata backends every contract suite runs on: SQLite in the data directory (the
//! default) and PostgreSQL (a fresh database on the shared test server for each store),
//! with the direct reads and writes of the metadata that some suites make, in SQL both
//! accept (the two schemas have the same tables and columns).
//!
//! [`on_each_backend!`] turns each test written as `fn name(backend: Backend)` into
//! `sqlite::name` and `postgres::name`, so a failure names its backend.

#![allow(dead_code, reason = "each suite uses a part of it")]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use store::config::{Meta, Postgres};
use store::{Config, Store};
use testsupport::postgres::PostgresServer;

/// A kind of metadata store.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// SQLite in `<data_dir>/meta.db`.
    Sqlite,
    /// PostgreSQL, on this server.
    Postgres(&'static PostgresServer),
}

impl Backend {
    /// PostgreSQL on the shared test server; `None` (the test skips, with a note) where
    /// PostgreSQL is not installed and not required.
    pub fn postgres() -> Option<Backend> {
        testsupport::postgres::require().map(Backend::Postgres)
    }

    /// The backend's name, for messages.
    pub fn name(self) -> &'static str {
        self.pick("SQLite", "PostgreSQL")
    }

    /// `sqlite` on SQLite, `postgres` on PostgreSQL.
    pub fn pick<T>(self, sqlite: T, postgres: T) -> T {
        match self {
            Backend::Sqlite => sqlite,
            Backend::Postgres(_) => postgres,
        }
    }

    /// Fresh, empty metadata for a store keeping its files in `data_dir`.
    pub fn create(self, data_dir: &Path) -> Metadata {
        log_to_test_output();
        let (meta, database) = match self {
            Backend::Sqlite => (Meta::Sqlite, Database::Sqlite(data_dir.join("meta.db"))),
            Backend::Postgres(server) => {
                let url = server.create_database();
                let session = PgSession::connect(url.clone());
                let meta = Meta::Postgres(Postgres {
                    url,
                    password_file: None,
                    max_connections: 16,
                });
                (meta, Database::Postgres(session))
            }
        };
        Metadata {
            data_dir: data_dir.to_owned(),
            meta,
            database,
        }
    }
}

/// One store's metadata: the configuration that opens a store on it, and direct access
/// to its tables (reads that are no use of what they read, and changes no API makes).
#[derive(Clone)]
pub struct Metadata {
    data_dir: PathBuf,
    meta: Meta,
    database: Database,
}

#[derive(Clone)]
enum Database {
    Sqlite(PathBuf),
    Postgres(PgSession),
}

/// A row of a query's result, read from either database: a tuple of `i64`, `String`,
/// `Vec<u8>` or `Option`s of them.
pub trait Row:
    for<'a> TryFrom<&'a rusqlite::Row<'a>, Error = rusqlite::Error> + for<'r> sqlx::FromRow<'r, PgRow>
{
}

impl<R> Row for R where
    R: for<'a> TryFrom<&'a rusqlite::Row<'a>, Error = rusqlite::Error>
        + for<'r> sqlx::FromRow<'r, PgRow>
{
}

impl Metadata {
    /// The default configuration with this data directory and this metadata.
    pub fn config(&self) -> Config {
        Config {
            data_dir: self.data_dir.clone(),
            meta: self.meta.clone(),
            ..Config::default()
        }
    }

    /// Open a store with `config` (made from [`config`](Self::config)) on a runtime of
    /// its own, let its startup pass finish, and drop that runtime with the store's
    /// background tasks (the access-time flusher and the evictor): from then on the only
    /// passes and recorded reads are the ones the test makes, on whatever runtime it
    /// drives the store.
    ///
    /// The connections to PostgreSQL the store opened there are bound to that runtime's
    /// I/O driver: kept but never driven again, it would leave them waiting for ever;
    /// dropped, it leaves them failing, but only when a read finds no reply buffered yet,
    /// so one may pass the pool's check and fail the query after it. Their sessions are
    /// ended first, so every one of them fails the check and the pool opens new ones on
    /// the runtime that uses it.
    pub fn open_without_background_tasks(&self, config: &Config) -> Store {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = runtime.block_on(async {
            let store = Store::open(config).await.unwrap();
            while store.last_gc().is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            store
        });
        drop(runtime);
        if let Database::Postgres(session) = &self.database {
            session.end_other_sessions();
        }
        store
    }

    /// The SQLite database file, on SQLite.
    pub fn sqlite_file(&self) -> Option<&Path> {
        match &self.database {
            Database::Sqlite(path) => Some(path),
            Database::Postgres(_) => None,
        }
    }

    /// Run one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str) -> u64 {
        match &self.database {
            Database::Sqlite(path) => {
                let changed = sqlite(path).execute(sql, []);
                changed.unwrap_or_else(|e| panic!("{sql}: {e}")) as u64
            }
            Database::Postgres(session) => session.execute(sql),
        }
    }

    /// Run `;`-separated statements in one transaction (on SQLite one that takes the
    /// write lock at once, so it never has to wait for it half done).
    pub fn transaction(&self, script: &str) {
        match &self.database {
            Database::Sqlite(path) => {
                let mut db = sqlite(path);
                let tx = db
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .unwrap();
                tx.execute_batch(script)
                    .unwrap_or_else(|e| panic!("{script}: {e}"));
                tx.commit().unwrap();
            }
            Database::Postgres(session) => session.script(script),
        }
    }

    /// Every row `sql` selects.
    pub fn query<R: Row>(&self, sql: &str) -> Vec<R> {
        match &self.database {
            Database::Sqlite(path) => {
                let db = sqlite(path);
                let mut statement = db.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                statement
                    .query_map([], |row| R::try_from(row))
                    .and_then(Iterator::collect)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
            Database::Postgres(session) => session
                .query(sql)
                .iter()
                .map(|row| R::from_row(row).unwrap_or_else(|e| panic!("{sql}: {e}")))
                .collect(),
        }
    }
}

/// Show the store's warnings in the output of the test that logged them. (PostgreSQL's
/// notices are left out: ending sessions that are ending already draws one each.)
fn log_to_test_output() {
    testsupport::log_to_test_output("warn,sqlx::postgres::notice=error");
}

/// A runtime for a test that drives stores opened by
/// [`Metadata::open_without_background_tasks`].
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A connection to the SQLite database at `path` that waits for the store's writer.
fn sqlite(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).unwrap();
    db.busy_timeout(Duration::from_secs(30)).unwrap();
    db
}

/// A connection to a PostgreSQL database, served by a thread and a runtime of its own:
/// usable from any thread, in a runtime or not, and independent of the runtimes a test
/// drives and drops.
#[derive(Clone)]
struct PgSession {
    requests: mpsc::Sender<Request>,
}

enum Request {
    Execute(String, mpsc::Sender<sqlx::Result<u64>>),
    Script(String, mpsc::Sender<sqlx::Result<()>>),
    Query(String, mpsc::Sender<sqlx::Result<Vec<PgRow>>>),
}

impl PgSession {
    /// Connect to `url`; the thread ends when the last clone is dropped.
    fn connect(url: String) -> PgSession {
        let (requests, incoming) = mpsc::channel::<Request>();
        let (connected, outcome) = mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut db = match runtime.block_on(PgConnection::connect(&url)) {
                Ok(db) => {
                    connected.send(Ok(())).unwrap();
                    db
                }
                Err(e) => {
                    connected.send(Err(e)).unwrap();
                    return;
                }
            };
            for request in incoming {
                runtime.block_on(async {
                    // A test that stopped waiting for the answer is failing already.
                    let _answered = match request {
                        Request::Execute(sql, reply) => {
                            let done = sqlx::query(AssertSqlSafe(sql)).execute(&mut db).await;
                            reply.send(done.map(|done| done.rows_affected())).ok()
                        }
                        Request::Script(sql, reply) => {
                            // One message: the server runs it as one transaction.
                            let done = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut db).await;
                            reply.send(done.map(drop)).ok()
                        }
                        Request::Query(sql, reply) => {
                            let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut db).await;
                            reply.send(rows).ok()
                        }
                    };
                });
            }
        });
        outcome
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
        PgSession { requests }
    }

    fn ask<T>(
        &self,
        sql: &str,
        request: fn(String, mpsc::Sender<sqlx::Result<T>>) -> Request,
    ) -> T {
        let (reply, answer) = mpsc::channel();
        self.requests.send(request(sql.to_owned(), reply)).unwrap();
        answer
            .recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn execute(&self, sql: &str) -> u64 {
        self.ask(sql, Request::Execute)
    }

    fn script(&self, sql: &str) {
        self.ask(sql, Request::Script)
    }

    fn query(&self, sql: &str) -> Vec<PgRow> {
        self.ask(sql, Request::Query)
    }

    /// End every other session on this database, and wait until they are gone.
    fn end_other_sessions(&self) {
        let others =
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()";
        self.query(&format!("SELECT pg_terminate_backend(pid) {others}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.query(&format!("SELECT pid {others}")).is_empty() {
            assert!(
                Instant::now() < deadline,
                "sessions on the test database would not end"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Run each listed test on every backend: `sqlite::<name>` and `postgres::<name>` call
/// `<name>(backend)` (the PostgreSQL ones return at once, with a note, where PostgreSQL
/// is not installed and not required), with the attributes given:
///
/// ```ignore
/// on_each_backend! {
///     #[tokio::test] async fn restores_search_scopes_in_order;
///     #[test] fn entries_are_evicted_least_recently_restored_first;
/// }
/// ```
macro_rules! on_each_backend {
    (@tests [$backend:expr]) => {};
    (@tests [$backend:expr] $(#[$attr:meta])* async fn $name:ident; $($rest:tt)*) => {
        $(#[$attr])*
        async fn $name() {
            if let Some(backend) = $backend {
                super::$name(backend).await;
            }
        }
        $crate::backend::on_each_backend!(@tests [$backend] $($rest)*);
    };
    (@tests [$backend:expr] $(#[$attr:meta])* fn $name:ident; $($rest:tt)*) => {
        $(#[$attr])*
        fn $name() {
            if let Some(backend) = $backend {
                super::$name(backend);
            }
        }
        $crate::backend::on_each_backend!(@tests [$backend] $($rest)*);
    };
    ($($tests:tt)*) => {
        mod sqlite {
            $crate::backend::on_each_backend!(
                @tests [Some($crate::backend::Backend::Sqlite)] $($tests)*
            );
        }
        mod postgres {
            $crate::backend::on_each_backend!(
                @tests [$crate::backend::Backend::postgres()] $($tests)*
            );
        }
    };
}

pub(crate) use on_each_backend;
