//! Real backing services for tests: a PostgreSQL server and a Garage (S3-compatible)
//! node, each started from its installed binaries in a temporary directory and stopped
//! when dropped or when the test process exits.

pub mod garage;
pub mod postgres;
mod process;

pub use process::{REQUIRE_VAR, required};

/// Send this process's log to the output of the test that logged it, which libtest
/// prints when the test fails: a store turns a database or object store error into
/// `Unavailable`, and the log line has the cause. `filter` applies unless `RUST_LOG` is
/// set; the first call in a process sets it.
pub fn log_to_test_output(filter: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
        // Another subscriber set first keeps its place.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_test_writer()
            .try_init();
    });
}
