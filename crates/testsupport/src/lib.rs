//! Real backing services for tests: a PostgreSQL server and a Garage (S3-compatible)
//! node, each started from its installed binaries in a temporary directory and stopped
//! when dropped or when the test process exits.

pub mod garage;
pub mod postgres;
mod process;

pub use process::{REQUIRE_VAR, required};
