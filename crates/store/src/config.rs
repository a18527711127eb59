//! The storage section of the configuration.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where and how layercache stores its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding blobs, upload staging files and the metadata database.
    pub data_dir: PathBuf,
    /// Largest manifest accepted, in bytes (larger ones get MANIFEST_INVALID / 413).
    pub max_manifest_bytes: usize,
    /// Largest blob accepted (larger uploads get BLOB_UPLOAD_INVALID / 413)
    /// [default: no limit but the quota].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_blob_size: Option<bytesize::ByteSize>,
    /// How the store keeps itself inside its disk quota.
    pub eviction: Eviction,
    /// Where blob bytes live.
    pub blobs: Blobs,
    /// Where the metadata lives.
    pub meta: Meta,
}

/// The blob backend: the data directory, or an S3-compatible bucket shared by nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum Blobs {
    /// Files under `<data_dir>/blobs`.
    #[default]
    Fs,
    /// Objects in an S3-compatible bucket.
    S3(S3),
}

/// An S3-compatible bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3 {
    /// The service's URL (`http://garage:3900`); AWS S3 when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: String,
    /// The region the bucket lives in (Garage's default is `garage`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Key prefix under which layercache keeps its objects (`""`: the bucket's root).
    #[serde(default)]
    pub prefix: String,
    /// The access key id [default: `AWS_ACCESS_KEY_ID`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// A file holding the secret access key [default: `AWS_SECRET_ACCESS_KEY`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key_file: Option<PathBuf>,
    /// Address buckets as `bucket.endpoint` instead of `endpoint/bucket`.
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Answer blob GETs with a `307` to a presigned URL valid this long, so clients read
    /// from the object store directly (only where clients can reach it).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub redirect: Option<Duration>,
}

impl fmt::Display for Blobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blobs::Fs => f.write_str("files in the data directory"),
            Blobs::S3(s3) => {
                write!(f, "s3://{}/{}", s3.bucket, s3.prefix)?;
                match &s3.endpoint {
                    Some(endpoint) => write!(f, " at {endpoint}"),
                    None => write!(f, " in {}", s3.region),
                }
            }
        }
    }
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Meta::Sqlite => f.write_str("sqlite in the data directory"),
            // Never a password.
            Meta::Postgres(postgres) => match url::Url::parse(&postgres.url) {
                Ok(mut url) => {
                    let _ = url.set_password(None);
                    write!(f, "{url}")
                }
                Err(_) => f.write_str("postgres (unparsable URL)"),
            },
        }
    }
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// The metadata backend: an embedded database in the data directory, or PostgreSQL
/// shared by nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum Meta {
    /// SQLite in `<data_dir>/meta.db`.
    #[default]
    Sqlite,
    /// A PostgreSQL database.
    Postgres(Postgres),
}

/// A PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// Connection URL, `postgres://user@host:5432/database` (a password in it works,
    /// but prefer `password_file` or `PGPASSWORD`).
    pub url: String,
    /// A file holding the password [default: the URL's, or `PGPASSWORD`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Most connections this node opens for queries (as many again may hold the locks
    /// nodes coordinate with).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    16
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("layercache-data"),
            max_manifest_bytes: 4 * 1024 * 1024,
            max_blob_size: None,
            eviction: Eviction::default(),
            blobs: Blobs::default(),
            meta: Meta::default(),
        }
    }
}

/// Eviction: a disk quota kept online, least recently used first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Eviction {
    /// The most the data directory may hold: bytes (`"200GiB"`) or a share of its
    /// filesystem (`"60%"`).
    pub max_size: Size,
    /// Free space to leave on the data directory's filesystem, whoever else uses it:
    /// bytes or a share of the filesystem. The effective quota shrinks to keep it.
    pub min_free: Size,
    /// Usage (share of the quota) at which eviction starts.
    pub high_watermark: Percent,
    /// Usage (share of the quota) eviction brings the store back down to.
    pub low_watermark: Percent,
    /// Unreferenced blobs written, linked or read more recently than this are kept (a
    /// client may push layers well before the manifest that references them); never less
    /// than `push_window`.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// After a manifest is read, it and everything it references are kept at least this
    /// long, so a client that got the manifest can fetch the rest (a BuildKit build that
    /// imported a cache fetches its layers as its steps need them).
    #[serde(with = "humantime_serde")]
    pub in_use: Duration,
    /// A blob uploaded, checked, mounted or read this recently stays when the last root
    /// referencing it is evicted or deleted, so the manifest PUT that ends a push finds
    /// the layers the push checked; after it, the blob leaves at the next pass.
    #[serde(with = "humantime_serde")]
    pub push_window: Duration,
    /// Upload sessions (and staging files) idle for this long are abandoned and removed.
    #[serde(with = "humantime_serde")]
    pub upload_expiry: Duration,
    /// How often the quota, the rules and the expiries are checked without a write
    /// prompting it.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Per-repository rules, applied in order (the first whose pattern matches wins).
    pub rules: Vec<Rule>,
}

impl Default for Eviction {
    fn default() -> Self {
        Eviction {
            max_size: Size::Percent(Percent(60)),
            min_free: Size::Percent(Percent(10)),
            high_watermark: Percent(90),
            low_watermark: Percent(80),
            grace: Duration::from_secs(2 * 3600),
            in_use: Duration::from_secs(3600),
            push_window: Duration::from_secs(5 * 60),
            upload_expiry: Duration::from_secs(24 * 3600),
            interval: Duration::from_secs(60),
            rules: Vec::new(),
        }
    }
}

/// What eviction may and may not do in some repositories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The repositories this rule covers: a glob over the name (`*` stays within one
    /// path segment, `**` crosses them), e.g. `"cache/*"`.
    pub repositories: String,
    /// Tags never evicted: regular expressions matched against the whole tag.
    #[serde(default)]
    pub pin_tags: Vec<String>,
    /// Evict images and caches not used for this long, whatever the quota.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// A whole percentage, written `"90%"` (or `90`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(pub u8);

impl Percent {
    /// `share` of `total`.
    pub fn of(self, total: u64) -> u64 {
        (u128::from(total) * u128::from(self.0) / 100) as u64
    }
}

/// A size in bytes, or a share of the data directory's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A share of the filesystem's total size.
    Percent(Percent),
}

impl Size {
    /// The size in bytes on a filesystem of `filesystem` bytes.
    pub fn resolve(self, filesystem: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Percent(p) => p.of(filesystem),
        }
    }
}

/// A size or percentage that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a size (like \"200GiB\", \"512MB\" or \"60%\")")]
pub struct InvalidSize(String);

impl FromStr for Percent {
    type Err = InvalidSize;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim().trim_end_matches('%').trim();
        match digits.parse::<u8>() {
            Ok(p) if p <= 100 => Ok(Percent(p)),
            _ => Err(InvalidSize(s.to_owned())),
        }
    }
}

impl FromStr for Size {
    type Err = InvalidSize;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().ends_with('%') {
            return s.parse().map(Size::Percent);
        }
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size::Bytes(b.as_u64()))
            .map_err(|_| InvalidSize(s.to_owned()))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Bytes(b) => {
                // Exact, so the printed configuration reads back the same.
                let unit = [
                    ("TiB", 1u64 << 40),
                    ("GiB", 1 << 30),
                    ("MiB", 1 << 20),
                    ("KiB", 1 << 10),
                ]
                .into_iter()
                .find(|&(_, size)| *b >= size && b % size == 0);
                match unit {
                    Some((name, size)) => write!(f, "{}{name}", b / size),
                    None => write!(f, "{b}"),
                }
            }
            Size::Percent(p) => p.fmt(f),
        }
    }
}

/// Serialize as the string form; deserialize from it or from a plain number.
macro_rules! string_or_number {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Number(u64),
                    Text(String),
                }
                let text = match Raw::deserialize(d)? {
                    Raw::Number(n) => n.to_string(),
                    Raw::Text(t) => t,
                };
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_or_number!(Percent);
string_or_number!(Size);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_people_write_them() {
        assert_eq!("200GiB".parse::<Size>().unwrap(), Size::Bytes(200 << 30));
        assert_eq!("64 MiB".parse::<Size>().unwrap(), Size::Bytes(64 << 20));
        assert_eq!("1000".parse::<Size>().unwrap(), Size::Bytes(1000));
        assert_eq!("60%".parse::<Size>().unwrap(), Size::Percent(Percent(60)));
        assert!("101%".parse::<Size>().is_err());
        assert!("lots".parse::<Size>().is_err());
        assert_eq!(Size::Percent(Percent(50)).resolve(1000), 500);
    }

    #[test]
    fn sizes_round_trip_through_toml() {
        let eviction: Eviction = toml::from_str(
            "max_size = \"2GiB\"\nhigh_watermark = 95\ngrace = \"0s\"\n\
             [[rules]]\nrepositories = \"cache/*\"\npin_tags = [\"main\"]\nmax_age = \"7d\"",
        )
        .unwrap();
        assert_eq!(eviction.max_size, Size::Bytes(2 << 30));
        assert_eq!(eviction.high_watermark, Percent(95));
        assert_eq!(eviction.grace, Duration::ZERO);
        let text = toml::to_string(&eviction).unwrap();
        assert_eq!(toml::from_str::<Eviction>(&text).unwrap(), eviction);
    }

    #[test]
    fn backends_default_to_the_data_directory_and_read_back() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!((config.blobs, config.meta), (Blobs::Fs, Meta::Sqlite));
        let config: Config = toml::from_str(
            "[blobs]\nbackend = \"s3\"\nendpoint = \"http://garage:3900\"\nbucket = \"cache\"\n\
             region = \"garage\"\nredirect = \"5m\"\n\
             [meta]\nbackend = \"postgres\"\nurl = \"postgres://layercache@db/layercache\"",
        )
        .unwrap();
        let Blobs::S3(s3) = &config.blobs else {
            panic!("{:?}", config.blobs)
        };
        assert_eq!(s3.redirect, Some(Duration::from_secs(300)));
        assert!(matches!(&config.meta, Meta::Postgres(p) if p.max_connections == 16));
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
        assert!(toml::from_str::<Config>("[blobs]\nbackend = \"tape\"").is_err());
        let secret = Meta::Postgres(Postgres {
            url: "postgres://lc:hunter2@db:5432/cache".into(),
            password_file: None,
            max_connections: 4,
        });
        assert_eq!(secret.to_string(), "postgres://lc@db:5432/cache");
    }
}
