//! The storage section of the configuration.

use std::path::PathBuf;

/// Where and how layercache stores its data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding blobs, upload staging files and the metadata database.
    pub data_dir: PathBuf,
    /// Largest manifest accepted, in bytes (larger ones get MANIFEST_INVALID / 413).
    pub max_manifest_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("layercache-data"),
            max_manifest_bytes: 4 * 1024 * 1024,
        }
    }
}
