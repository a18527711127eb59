//! The pull-through workload: one blob, pushed once to an upstream registry, pulled
//! through a mirror twice (the miss fills the mirror, the hit is served from it), by
//! layercache (an `[[upstreams]]` named `docker.io`) and by distribution's own proxy
//! mode on the same upstream, against the upstream's own GET and against a pull of the
//! same blob pushed to a plain layercache.
//!
//! * **Upstream.** A distribution registry on loopback over plain HTTP, holding the blob
//!   in `library/big`. It keeps its address when stopped and started again.
//! * **Direct.** The blob straight from the upstream: the ceiling of a miss.
//! * **Local.** The blob from a plain layercache it was pushed to: what a hit should
//!   match.
//! * **Miss and hit.** Every round starts each mirror on a fresh data directory (their
//!   order alternating between rounds). The miss is the first GET (layercache:
//!   `/v2/docker.io/library/big/blobs/<digest>`; distribution: `/v2/library/big/blobs/
//!   <digest>`). Once the mirror holds the blob on disk, the upstream is stopped, so the
//!   second GET, the hit, can only be served from the mirror's own storage; the upstream
//!   is started again afterwards.
//! * **Until stored.** layercache holds the last byte of a miss back until the blob is
//!   verified, durable and linked, so its miss ends with the blob stored. Distribution
//!   2.8's proxy (`registry/proxy/proxyblobstore.go`, `ServeBlob`) instead streams the
//!   upstream's response to the client unverified while a goroutine fetches the blob a
//!   second time into its storage (`storeLocal`); until that copy is committed, a pull
//!   goes to the upstream again. The time from the miss's request until the mirror's
//!   data directory holds the whole blob is reported beside the miss, and so are the
//!   bytes the upstream sent for it (its `wchar` in `/proc/<pid>/io`).
//! * **Memory.** The mirror's peak resident memory (`VmHWM`) after the miss, in a
//!   process started for that round, must stay flat: well under the blob's size.
//!
//! Every body is checked: its length, and its SHA-256 against the digest. Each is copied
//! into one resident buffer as it arrives and hashed once the clock has stopped, so the
//! client's hashing (on cores the servers share) is in no figure; the copy is in all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::limits::mbps;
use crate::payload::{Base, Blob, MIB};
use crate::registry::Registry;
use crate::report::{self, Samples};
use crate::servers::{self, Kind, Server};

/// The repository the upstream holds the blob in (and the plain layercache too).
const REPO: &str = "library/big";
/// The name of layercache's upstream: the first path component of what it mirrors.
const HUB: &str = "docker.io";
/// How often a mirror's data directory is looked at for the stored blob.
const POLL: Duration = Duration::from_millis(10);
/// The longest a mirror may take to store the blob after the miss began.
const STORE_TIMEOUT: Duration = Duration::from_secs(600);

/// What the workload needs from the run.
pub struct Inputs<'a> {
    /// The run's temporary directory (the workload works in `mirror/` under it).
    pub dir: &'a Path,
    /// The payload the blob is cut from.
    pub base: &'a Base,
    /// The benchmark's HTTP client.
    pub http: &'a reqwest::Client,
    /// The release layercache.
    pub layercache_bin: &'a Path,
    /// The distribution registry.
    pub registry_bin: &'a Path,
    /// Size of the blob, in MiB.
    pub blob_mib: usize,
    /// Rounds.
    pub rounds: usize,
}

/// What the JSON report holds of the workload.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Size of the blob, in MiB.
    pub blob_mib: usize,
    /// Its length in bytes.
    pub blob_bytes: u64,
    /// Its digest.
    pub digest: String,
    /// The repository the upstream holds it in.
    pub upstream_repo: &'static str,
    /// Every round's transfers.
    pub rounds: Vec<Round>,
}

/// One round: the two references, then each mirror.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    /// Round, from 1.
    pub round: usize,
    /// The blob straight from the upstream.
    pub direct: Transfer,
    /// The blob from the plain layercache it was pushed to.
    pub local: Transfer,
    /// Each mirror's miss and hit, in the order they ran.
    pub mirrors: Vec<Mirrored>,
}

/// One checked GET.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Transfer {
    /// From the request to the last byte.
    pub secs: f64,
    /// Bytes received (checked against the blob's length and digest).
    pub bytes: u64,
    /// MB/s.
    pub mb_s: f64,
}

/// One mirror's round.
#[derive(Clone, Debug, Serialize)]
pub struct Mirrored {
    /// Which mirror.
    pub server: Kind,
    /// The path both GETs asked for.
    pub path: String,
    /// The first GET, filled from the upstream.
    pub miss: Transfer,
    /// From the miss's request until the mirror's data directory held the whole blob.
    pub stored_secs: f64,
    /// Bytes the upstream wrote (to its sockets) from before the miss until the blob
    /// was stored: one blob for a single fetch.
    pub upstream_sent_bytes: u64,
    /// The mirror's peak resident memory after the miss, in MiB.
    pub peak_rss_mib: f64,
    /// The second GET, with the upstream stopped.
    pub hit: Transfer,
}

/// The upstream registry, which can be stopped and started again on its address.
struct Upstream<'a> {
    bin: &'a Path,
    dir: PathBuf,
    host: String,
    registry: Registry,
    server: Option<Server>,
}

impl<'a> Upstream<'a> {
    /// Start a distribution registry in `dir` on a free port.
    async fn start(ctx: &Inputs<'a>, dir: PathBuf) -> Result<Upstream<'a>> {
        let host = format!("127.0.0.1:{}", servers::free_port()?);
        let registry = Registry::new(ctx.http.clone(), &format!("http://{host}"))?;
        let mut upstream = Upstream {
            bin: ctx.registry_bin,
            dir,
            host,
            registry,
            server: None,
        };
        upstream.resume().await?;
        Ok(upstream)
    }

    /// `http://127.0.0.1:PORT`.
    fn url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Start it again on its storage and address (it is stopped), and wait for it.
    async fn resume(&mut self) -> Result<()> {
        let mut server = Server::start_distribution_on(self.bin, &self.dir, &self.host, "")?;
        server
            .wait_ready(&self.registry)
            .await
            .context("the upstream")?;
        self.server = Some(server);
        Ok(())
    }

    /// Stop it (killed: it only serves reads by then).
    fn pause(&mut self) {
        self.server = None;
    }

    /// Bytes it has written so far (`wchar`: sockets, and its log).
    fn written(&self) -> Result<u64> {
        let server = self.server.as_ref().context("the upstream is stopped")?;
        let pid = server.pid();
        let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .with_context(|| format!("reading /proc/{pid}/io"))?;
        io.lines()
            .find_map(|l| l.strip_prefix("wchar:"))
            .and_then(|v| v.trim().parse().ok())
            .context("wchar in /proc/<pid>/io")
    }
}

/// Push the blob to the upstream and to a plain layercache, then every round: the
/// upstream's own GET, the plain layercache's, and each mirror's miss and hit. Figures
/// go to `samples`.
pub async fn run(
    ctx: &Inputs<'_>,
    samples: &mut BTreeMap<&'static str, Samples>,
) -> Result<Report> {
    let work = ctx.dir.join("mirror");
    let blob = ctx.base.blob(ctx.blob_mib, "mirror")?;
    let mut upstream = Upstream::start(ctx, work.join("upstream")).await?;
    eprintln!(
        "bench: mirror: upstream distribution at {}, pushing {REPO}@{}",
        upstream.url(),
        blob.digest
    );
    upstream.registry.push(REPO, &blob).await?;
    let mut local = Server::start_layercache(ctx.layercache_bin, &work.join("local"))?;
    let local_registry = Registry::new(ctx.http.clone(), &local.url)?;
    local.wait_ready(&local_registry).await?;
    local_registry.push(REPO, &blob).await?;
    let mut body = Body::new(blob.len)?;

    let mut record = |round: usize, key: &'static str, kind: Kind, value: f64| {
        eprintln!(
            "bench: mirror round {} {:<12} {key:<20} {}",
            round + 1,
            kind.name(),
            report::num(value)
        );
        samples.entry(key).or_default().push(kind, value);
    };
    let mut report = Report {
        blob_mib: ctx.blob_mib,
        blob_bytes: blob.len,
        digest: blob.digest.clone(),
        upstream_repo: REPO,
        rounds: Vec::new(),
    };
    for round in 0..ctx.rounds {
        crate::settle();
        let direct = get(&upstream.registry, REPO, &blob, &mut body).await?;
        record(round, "mirror_direct_mb_s", Kind::Distribution, direct.mb_s);
        local.check_alive()?;
        crate::settle();
        let local_pull = get(&local_registry, REPO, &blob, &mut body).await?;
        record(
            round,
            "mirror_local_mb_s",
            Kind::Layercache,
            local_pull.mb_s,
        );
        let order = if round % 2 == 0 {
            [Kind::Layercache, Kind::Distribution]
        } else {
            [Kind::Distribution, Kind::Layercache]
        };
        let mut mirrors = Vec::new();
        for kind in order {
            let m = through(ctx, kind, round, &blob, &mut body, &mut upstream).await?;
            record(round, "mirror_miss_mb_s", kind, m.miss.mb_s);
            record(
                round,
                "mirror_stored_mb_s",
                kind,
                mbps(blob.len, m.stored_secs)?,
            );
            record(round, "mirror_hit_mb_s", kind, m.hit.mb_s);
            record(round, "mirror_rss_mib", kind, m.peak_rss_mib);
            mirrors.push(m);
        }
        report.rounds.push(Round {
            round: round + 1,
            direct,
            local: local_pull,
            mirrors,
        });
    }
    local.check_alive()?;
    Ok(report)
}

/// One mirror's round: start `kind` as a mirror of `upstream` on a fresh data directory,
/// GET the blob through it (the miss), wait until it is stored, stop the upstream, GET
/// it again (the hit), start the upstream again, and remove the mirror.
async fn through(
    ctx: &Inputs<'_>,
    kind: Kind,
    round: usize,
    blob: &Blob,
    body: &mut Body,
    upstream: &mut Upstream<'_>,
) -> Result<Mirrored> {
    let dir = ctx
        .dir
        .join("mirror")
        .join(format!("{}-r{}", kind.name(), round + 1));
    std::fs::create_dir_all(&dir)?;
    let (mut server, repo) = match kind {
        Kind::Layercache => {
            let config = dir.join("mirror.toml");
            std::fs::write(
                &config,
                format!(
                    "[[upstreams]]\nname = \"{HUB}\"\nurl = \"{}\"\n",
                    upstream.url()
                ),
            )
            .with_context(|| format!("writing {}", config.display()))?;
            let env = [(
                "LAYERCACHE_CONFIG".to_owned(),
                config.to_string_lossy().into_owned(),
            )];
            let server = Server::start_layercache_with(ctx.layercache_bin, &dir, &env)?;
            (server, format!("{HUB}/{REPO}"))
        }
        Kind::Distribution => {
            let host = format!("127.0.0.1:{}", servers::free_port()?);
            let proxy = format!("proxy:\n  remoteurl: {}\n", upstream.url());
            let server = Server::start_distribution_on(ctx.registry_bin, &dir, &host, &proxy)?;
            (server, REPO.to_owned())
        }
    };
    let registry = Registry::new(ctx.http.clone(), &server.url)?;
    server.wait_ready(&registry).await?;
    let stored = stored_paths(kind, &server.data_dir, &blob.digest)?;
    ensure!(
        !is_stored(&stored, blob.len),
        "the fresh {} mirror already holds the blob",
        kind.name()
    );
    let name = kind.name();
    eprintln!("bench: mirror {name} at {}, pulling {repo}", server.url);

    let sent_before = upstream.written()?;
    crate::settle();
    let start = Instant::now();
    let watcher = tokio::spawn(watch_stored(stored, blob.len, start));
    let miss = match get(&registry, &repo, blob, body).await {
        Ok(miss) => miss,
        Err(e) => {
            watcher.abort();
            return Err(e.context(format!("the miss through {name}")));
        }
    };
    let stored_secs = watcher
        .await?
        .with_context(|| format!("{name} storing the blob"))?;
    let upstream_sent_bytes = upstream.written()?.saturating_sub(sent_before);
    server.check_alive()?;
    let peak_rss_mib = server.peak_rss()? as f64 / MIB as f64;

    upstream.pause();
    crate::settle();
    let hit = get(&registry, &repo, blob, body).await;
    upstream.resume().await?;
    let hit = hit.with_context(|| format!("the hit through {name}, the upstream stopped"))?;
    server.check_alive()?;
    drop(server);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(Mirrored {
        server: kind,
        path: format!("/v2/{repo}/blobs/{}", blob.digest),
        miss,
        stored_secs,
        upstream_sent_bytes,
        peak_rss_mib,
        hit,
    })
}

/// Where every GET's body is copied as it arrives, to be hashed once the clock has
/// stopped: one buffer the blob's length, written through once beforehand so that no
/// transfer pays for faulting pages in, and reused, so each pays the same copy. (Keeping
/// the received chunks instead costs each transfer a different share of fresh pages,
/// as the allocator happens to reuse or unmap them.)
struct Body(Vec<u8>);

impl Body {
    /// A buffer for `len` bytes, its pages already resident.
    fn new(len: u64) -> Result<Body> {
        let len = usize::try_from(len)?;
        let mut buf = vec![1u8; len];
        buf.clear();
        Ok(Body(buf))
    }
}

/// GET `repo`'s `blob` from `registry` into `body`, timed to its last byte, then checked:
/// its length, and its SHA-256 (computed after the clock stopped).
async fn get(registry: &Registry, repo: &str, blob: &Blob, body: &mut Body) -> Result<Transfer> {
    body.0.clear();
    let start = Instant::now();
    registry.pull_into(repo, &blob.digest, &mut body.0).await?;
    let secs = start.elapsed().as_secs_f64();
    let buf = std::mem::take(&mut body.0);
    let (buf, digest) = tokio::task::spawn_blocking(move || {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&buf)));
        (buf, digest)
    })
    .await?;
    body.0 = buf;
    let bytes = body.0.len() as u64;
    ensure!(
        bytes == blob.len,
        "GET {repo}@{}: {bytes} bytes, expected {}",
        blob.digest,
        blob.len
    );
    ensure!(
        digest == blob.digest,
        "GET {repo}@{}: the body hashes to {digest}",
        blob.digest
    );
    Ok(Transfer {
        secs,
        bytes,
        mb_s: mbps(bytes, secs)?,
    })
}

/// The files that exist once `kind` has stored blob `digest` of [`REPO`] under
/// `data_dir`, the blob's bytes first.
fn stored_paths(kind: Kind, data_dir: &Path, digest: &str) -> Result<Vec<PathBuf>> {
    let (algorithm, hex) = digest.split_once(':').context("a digest without ':'")?;
    let prefix = hex.get(..2).context("a short digest")?;
    Ok(match kind {
        // `blobs/<alg>/<hex[0..2]>/<hex>`, renamed into place once verified and synced.
        Kind::Layercache => vec![
            data_dir
                .join("blobs")
                .join(algorithm)
                .join(prefix)
                .join(hex),
        ],
        // The blob's data, and its link into the repository (written after it).
        Kind::Distribution => {
            let v2 = data_dir.join("docker/registry/v2");
            vec![
                v2.join("blobs")
                    .join(algorithm)
                    .join(prefix)
                    .join(hex)
                    .join("data"),
                v2.join("repositories")
                    .join(REPO)
                    .join("_layers")
                    .join(algorithm)
                    .join(hex)
                    .join("link"),
            ]
        }
    })
}

/// Whether the first of `paths` holds `len` bytes and the others exist.
fn is_stored(paths: &[PathBuf], len: u64) -> bool {
    let mut paths = paths.iter();
    paths
        .next()
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.len() == len)
        && paths.all(|p| p.exists())
}

/// Seconds from `start` until [`is_stored`], looked at every [`POLL`].
async fn watch_stored(paths: Vec<PathBuf>, len: u64, start: Instant) -> Result<f64> {
    loop {
        if is_stored(&paths, len) {
            return Ok(start.elapsed().as_secs_f64());
        }
        ensure!(
            start.elapsed() < STORE_TIMEOUT,
            "{} not stored after {} s",
            paths
                .first()
                .map_or_else(String::new, |p| p.display().to_string()),
            STORE_TIMEOUT.as_secs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Every round's transfers as a table.
pub fn table(report: &Report) -> String {
    let mut rows = Vec::new();
    for round in &report.rounds {
        for (i, m) in round.mirrors.iter().enumerate() {
            let first = |v: String| if i == 0 { v } else { String::new() };
            rows.push(vec![
                first(round.round.to_string()),
                first(report::num(round.direct.mb_s)),
                first(report::num(round.local.mb_s)),
                m.server.name().to_owned(),
                report::num(m.miss.mb_s),
                format!("{:.2}", m.stored_secs),
                report::num(m.hit.mb_s),
                format!(
                    "{:.2}",
                    m.upstream_sent_bytes as f64 / report.blob_bytes as f64
                ),
                report::num(m.peak_rss_mib),
            ]);
        }
    }
    report::render(
        &[
            "round",
            "direct MB/s",
            "local MB/s",
            "mirror",
            "miss MB/s",
            "until stored s",
            "hit MB/s",
            "upstream sent / blob",
            "peak RSS MiB",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_paths_follow_each_layout() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let lc = stored_paths(Kind::Layercache, Path::new("/d"), &digest).unwrap();
        assert_eq!(
            lc,
            vec![PathBuf::from(format!(
                "/d/blobs/sha256/ab/{}",
                "ab".repeat(32)
            ))]
        );
        let dist = stored_paths(Kind::Distribution, Path::new("/d"), &digest).unwrap();
        assert_eq!(dist.len(), 2);
        assert!(dist[0].ends_with(format!("sha256/ab/{}/data", "ab".repeat(32))));
        assert!(dist[1].starts_with("/d/docker/registry/v2/repositories/library/big/_layers"));
        assert!(stored_paths(Kind::Layercache, Path::new("/d"), "nocolon").is_err());
    }

    #[test]
    fn stored_means_full_length_and_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let (data, link) = (dir.path().join("data"), dir.path().join("link"));
        let paths = vec![data.clone(), link.clone()];
        assert!(!is_stored(&paths, 3));
        std::fs::write(&data, b"ab").unwrap();
        std::fs::write(&link, b"").unwrap();
        assert!(!is_stored(&paths, 3));
        std::fs::write(&data, b"abc").unwrap();
        assert!(is_stored(&paths, 3));
    }
}
