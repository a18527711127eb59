//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// layercache: a build-cache server for CI container builds.
#[derive(Debug, Parser)]
#[command(name = "layercache", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the cache server (OCI distribution API and GitHub Actions cache service).
    Serve(ServeArgs),
    /// Run one eviction pass on a running server now and print what it freed.
    Gc(GcArgs),
    /// Show what recent builds read from and wrote to the cache.
    Report(ReportArgs),
    /// Show the audit log: who pushed, tagged, mounted, deleted, saved cache entries, ran
    /// eviction passes, and who was denied.
    Audit(AuditArgs),
    /// Fail (exit 1) unless builds used the cache as required: for a CI step.
    Expect(ExpectArgs),
    /// Explain why a build missed the cache: compare two images or cache exports, check
    /// an image meant for --cache-from, or go through a build session's misses.
    Explain(crate::commands::explain::ExplainArgs),
    /// Check Dockerfiles, compose, bake and GitHub workflow files for the mistakes that
    /// silently lose the cache.
    Lint(crate::commands::lint::LintArgs),
    /// Mint a runtime token for the Actions cache service (ACTIONS_RUNTIME_TOKEN), signed
    /// with the server's key.
    Token(TokenArgs),
    /// Certificates for HTTPS ([server.tls]).
    Tls(TlsArgs),
    /// Exit 0 when a running server is ready (its /readyz answers 200), 1 otherwise: a
    /// container's HEALTHCHECK (the image has no shell or curl).
    Health(HealthArgs),
}

/// Options of `layercache health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The running server.
    #[command(flatten)]
    pub server: ServerArg,
    /// Check liveness instead (/healthz: the process serves HTTP; the store is not asked).
    #[arg(long)]
    pub live: bool,
    /// How long the answer may take.
    #[arg(long, default_value = "5s")]
    pub timeout: humantime::Duration,
}

/// Options of `layercache tls`.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: TlsCommand,
}

/// Subcommands of `layercache tls`.
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a private CA (kept if it exists) and a server certificate signed by it, and
    /// print where each client wants the CA.
    Init(TlsInitArgs),
}

/// Options of `layercache tls init`.
#[derive(Debug, Args)]
pub struct TlsInitArgs {
    /// A DNS name or IP address clients reach the server by; repeat for more (the first
    /// also names the certificate).
    #[arg(long = "host", value_name = "NAME", required = true)]
    pub hosts: Vec<String>,
    /// Where to write ca.crt, ca.key, server.crt and server.key [default: the data
    /// directory's tls/].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How many days the server certificate is valid (a new CA: at least ten years).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Replace an existing CA (every client must then be given the new ca.crt).
    #[arg(long)]
    pub force: bool,
    /// The server's TOML configuration file (for its data directory and port).
    #[arg(long, env = "LAYERCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's data directory [default: ./layercache-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Options of `layercache token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The server's TOML configuration file (for its key file and data directory).
    #[arg(long, env = "LAYERCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The server's data directory, which holds its key [default: ./layercache-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A scope (git ref) the token may read, e.g. refs/heads/main; repeat for more, in
    /// lookup order after the write scope.
    #[arg(long = "read", value_name = "REF")]
    pub read: Vec<String>,
    /// The one scope the token writes (and reads first), e.g. refs/pull/7/merge.
    #[arg(long = "write", value_name = "REF")]
    pub write: Option<String>,
    /// How long the token is valid.
    #[arg(long, default_value = "6h")]
    pub ttl: humantime::Duration,
    /// The repository whose cache it reaches (entries of different repositories never
    /// mix).
    #[arg(long, default_value = "0")]
    pub repository: String,
    /// Name the build session its requests are recorded in.
    #[arg(long)]
    pub session: Option<String>,
    /// Registry repositories it may pull, as globs (`cache/org/app/**`; `*` stays within
    /// one path segment); repeat for more.
    #[arg(long, value_name = "GLOB")]
    pub pull: Vec<String>,
    /// Registry repositories it may push to (and pull).
    #[arg(long, value_name = "GLOB")]
    pub push: Vec<String>,
    /// Registry repositories it may delete manifests, tags and blobs in.
    #[arg(long, value_name = "GLOB")]
    pub delete: Vec<String>,
    /// It may read layercache's API (sessions for report and expect), /metrics and /ui.
    #[arg(long)]
    pub view: bool,
    /// It may also run eviction passes through the API (layercache gc); implies --view.
    #[arg(long)]
    pub admin: bool,
}

/// Options of `layercache report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The running server.
    #[command(flatten)]
    pub server: ServerArg,
    /// Sessions active since: a duration ago ("15m"), a time ("2026-11-23T12:03:00Z")
    /// or seconds since the epoch.
    #[arg(long, default_value = "1h")]
    pub since: String,
    /// Only sessions that touched this repository.
    #[arg(long)]
    pub repo: Option<String>,
    /// Only this session (its name or id).
    #[arg(long)]
    pub session: Option<String>,
    /// Print the sessions as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `layercache audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The running server.
    #[command(flatten)]
    pub server: ServerArg,
    /// Lines recorded since: a duration ago ("15m"), a time ("2026-11-23T12:03:00Z") or
    /// seconds since the epoch.
    #[arg(long, default_value = "1h")]
    pub since: String,
    /// Most lines to show (the newest) [default: the server's, 10000].
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print the JSON lines as stored.
    #[arg(long)]
    pub json: bool,
}

/// Options of `layercache expect`: at least one check.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("check")
        .required(true)
        .multiple(true)
        .args(["reads", "writes", "min_hit_ratio"])
))]
pub struct ExpectArgs {
    /// The running server.
    #[command(flatten)]
    pub server: ServerArg,
    /// The cache repository the build should have used.
    #[arg(long)]
    pub repo: String,
    /// Since when: a duration ago ("15m"), a time, or seconds since the epoch.
    #[arg(long)]
    pub since: String,
    /// Only this session (its name or id).
    #[arg(long)]
    pub session: Option<String>,
    /// Require cache reads: cache records the build obtained (a cache export, or an image
    /// with inline cache, fetched; Actions cache entries found). An image without cache
    /// metadata is no cache read.
    #[arg(long)]
    pub reads: bool,
    /// Require cache writes (layers or manifests stored).
    #[arg(long)]
    pub writes: bool,
    /// Require at least this share of the repository's lookups to find cache (0 to 1); a
    /// check of a tag the build then pushed, or of an image without cache metadata, is
    /// no lookup.
    #[arg(long)]
    pub min_hit_ratio: Option<f64>,
}

/// Options of `layercache gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// The running server.
    #[command(flatten)]
    pub server: ServerArg,
    /// Change nothing: print what a pass would evict and free.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the server's JSON report instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Options of `layercache serve`; flags win over the environment and the config file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LAYERCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5000].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Data directory [default: ./layercache-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Most the data directory may hold: bytes ("200GiB") or a share of its filesystem
    /// ("60%") [default: 60%].
    #[arg(long)]
    pub max_size: Option<store::config::Size>,
    /// Serve without authentication even on a non-loopback address (`[server.auth]
    /// mode = "open"`).
    #[arg(long)]
    pub open: bool,
    /// Run as an edge in front of the central layercache at this URL: reads are filled
    /// from it, pushes pass through to it (an `[[upstreams]]` entry without a name).
    #[arg(long, value_name = "URL", env = "LAYERCACHE_UPSTREAM")]
    pub upstream: Option<String>,
    /// A file holding the token (from `layercache token` on the centre) the edge
    /// presents to its upstream.
    #[arg(
        long,
        value_name = "FILE",
        requires = "upstream",
        env = "LAYERCACHE_UPSTREAM_TOKEN_FILE"
    )]
    pub upstream_token_file: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The running server a command talks to.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// The running server's URL.
    #[arg(
        long = "server",
        env = "LAYERCACHE_SERVER",
        default_value = "http://127.0.0.1:5000"
    )]
    pub url: String,
}
