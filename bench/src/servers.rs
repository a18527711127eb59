//! The two servers under test, each a child process on a free loopback port with its data
//! in the run's temporary directory. A [`Server`] kills its process when dropped, so both
//! stop whether the run succeeds or fails.

use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::registry::Registry;

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// This project's server.
    Layercache,
    /// The CNCF distribution registry (Debian `docker-registry`).
    Distribution,
}

impl Kind {
    /// Lower-case name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Layercache => "layercache",
            Kind::Distribution => "distribution",
        }
    }
}

/// What layercache's store did beside the workloads, from its `/metrics`. On a nearly
/// full disk the filesystem's free space sets the quota; once the store passes the low
/// watermark it evicts while the workloads run, and the kernel's page cost rises, so
/// such a run's figures are not comparable with a roomy disk's.
#[derive(Debug, Serialize)]
pub struct StoreState {
    /// Eviction passes run.
    pub eviction_passes: u64,
    /// Bytes the data directory held at the end.
    pub stored_bytes: u64,
    /// The quota in force.
    pub quota_bytes: u64,
    /// What the last pass could not free.
    pub shortfall_bytes: u64,
}

/// The default low watermark, as a share of the quota: eviction brings usage down to it.
const LOW_WATERMARK: f64 = 0.8;

impl StoreState {
    /// Read it from the server at `url`.
    pub async fn read(url: &str) -> Result<StoreState> {
        let text = reqwest::get(format!("{url}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        let value = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .with_context(|| format!("{name} in /metrics"))
        };
        Ok(StoreState {
            eviction_passes: value("layercache_eviction_passes_total")?,
            stored_bytes: value("layercache_stored_bytes")?,
            quota_bytes: value("layercache_quota_bytes")?,
            shortfall_bytes: value("layercache_eviction_shortfall_bytes")?,
        })
    }

    /// A line for the report: the passes and the usage, with a warning when the store
    /// is where eviction works.
    pub fn describe(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut line = format!(
            "layercache ran {} eviction pass(es); it holds {:.1} GiB of a {:.1} GiB quota",
            self.eviction_passes,
            gib(self.stored_bytes),
            gib(self.quota_bytes)
        );
        let evicting = self.stored_bytes as f64 > LOW_WATERMARK * self.quota_bytes as f64;
        if evicting || self.shortfall_bytes > 0 {
            line += &format!(
                "; WARNING: it is past the low watermark ({:.1} GiB short of the quota at the \
                 last pass), where eviction works during the workloads: free the disk, whose \
                 free space sets the quota, for figures comparable with a roomy disk's",
                gib(self.shortfall_bytes)
            );
        }
        line
    }
}

/// A running server.
pub struct Server {
    /// Which server this is.
    pub kind: Kind,
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// `127.0.0.1:PORT`, as image references want it.
    pub host: String,
    /// Where the server keeps its data (`layercache token` reads its key there).
    pub data_dir: PathBuf,
    log: PathBuf,
    /// The highest `VmHWM` read before the kernel's was last reset, in bytes.
    earlier_peak: AtomicU64,
}

impl Server {
    /// Start `layercache serve` on a free port with its data in `dir/data`.
    pub fn start_layercache(bin: &Path, dir: &Path) -> Result<Server> {
        Server::start_layercache_with(bin, dir, &[])
    }

    /// Start `layercache serve` on a free port with its data in `dir/data` (kept from a
    /// previous start, if any) and extra environment (such as `LAYERCACHE_CONFIG`); its log,
    /// at the default level (a line per request, as users run it), is appended to
    /// `dir/server.log`. Distribution runs quieter (errors only, no access log), which can
    /// only favour it.
    pub fn start_layercache_with(
        bin: &Path,
        dir: &Path,
        env: &[(String, String)],
    ) -> Result<Server> {
        std::fs::create_dir_all(dir)?;
        let log = dir.join("server.log");
        let data_dir = dir.join("data");
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env_remove("RUST_LOG")
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(File::options().create(true).append(true).open(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("layercache stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("layercache listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "layercache printed {line:?} instead of its address; log:\n{}",
                tail(&log)
            );
        };
        let url = url.to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        let mut out = File::create(dir.join("stdout.log"))?;
        std::thread::spawn(move || std::io::copy(&mut reader, &mut out));
        let host = url.trim_start_matches("http://").to_owned();
        Ok(Server {
            kind: Kind::Layercache,
            child,
            url,
            host,
            data_dir,
            log,
            earlier_peak: AtomicU64::new(0),
        })
    }

    /// Start the distribution registry on a free port: filesystem storage in `dir/data`,
    /// deletes enabled, errors-only logging, and the in-memory blob descriptor cache of
    /// Debian's packaged configuration.
    pub fn start_distribution(bin: &Path, dir: &Path) -> Result<Server> {
        let host = format!("127.0.0.1:{}", free_port()?);
        Server::start_distribution_on(bin, dir, &host, "")
    }

    /// Start the distribution registry as [`Server::start_distribution`] does, on `host`
    /// (`127.0.0.1:PORT`, so a restart keeps the address), with `extra` top-level YAML
    /// appended to its configuration (such as a `proxy:` section).
    pub fn start_distribution_on(
        bin: &Path,
        dir: &Path,
        host: &str,
        extra: &str,
    ) -> Result<Server> {
        std::fs::create_dir_all(dir)?;
        let data_dir = dir.join("data");
        let config = distribution_config(dir);
        let mut f = File::create(&config)?;
        write!(
            f,
            "version: 0.1\n\
             log:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  cache:\n    blobdescriptor: inmemory\n  \
             filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n{extra}",
            data_dir.display()
        )?;
        let log = dir.join("server.log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(File::create(dir.join("stdout.log"))?)
            .stderr(File::options().create(true).append(true).open(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Server {
            kind: Kind::Distribution,
            child,
            url: format!("http://{host}"),
            host: host.to_owned(),
            data_dir,
            log,
            earlier_peak: AtomicU64::new(0),
        })
    }

    /// Wait until `GET /v2/` answers 200, for up to 20 s.
    pub async fn wait_ready(&mut self, registry: &Registry) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status}; log:\n{}",
                    self.kind.name(),
                    tail(&self.log)
                );
            }
            match registry.ping().await {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    return Err(e.context(format!("{} did not become ready", self.kind.name())));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Stop the server as an operator would: `SIGTERM`, then up to 60 s for it to exit
    /// (killed after that).
    pub async fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("running kill")?;
        if status.success() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if self.child.try_wait()?.is_some() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("{} did not stop on SIGTERM", self.kind.name())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CPU time the server has spent so far.
    pub fn cpu(&self) -> Result<Cpu> {
        Cpu::of(&self.child.id().to_string(), false)
    }

    /// What the server has read from the disk so far.
    pub fn disk_reads(&self) -> Result<DiskReads> {
        DiskReads::of(self.child.id())
    }

    /// Fail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; log:\n{}",
                self.kind.name(),
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// Peak resident memory over the whole run so far, in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        Ok(self
            .window_peak_rss()?
            .max(self.earlier_peak.load(Ordering::Relaxed)))
    }

    /// Start measuring a new peak for [`Server::window_peak_rss`]: the kernel's `VmHWM`
    /// is reset to the current resident memory (`clear_refs` 5), after the peak so far is
    /// kept for [`Server::peak_rss`]; returns the resident memory the window starts from.
    pub fn new_peak_window(&self) -> Result<u64> {
        self.earlier_peak
            .fetch_max(self.window_peak_rss()?, Ordering::Relaxed);
        let pid = self.child.id();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
            .with_context(|| format!("resetting the peak RSS of {pid}"))?;
        self.window_peak_rss()
    }

    /// Peak resident memory since the last [`Server::new_peak_window`] (or the start):
    /// `VmHWM` from `/proc/<pid>/status`, in bytes.
    pub fn window_peak_rss(&self) -> Result<u64> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM in /proc status")?;
        Ok(kib * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time spent by a process, from `/proc/PID/stat` in USER_HZ (100 on Linux).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Seconds in user space.
    pub user: f64,
    /// Seconds in the kernel.
    pub system: f64,
}

impl Cpu {
    /// Of process `pid` ("self" for this one), or with `children` of the children it
    /// has waited for.
    pub fn of(pid: &str, children: bool) -> Result<Cpu> {
        // utime and stime are fields 14 and 15, cutime and cstime 16 and 17.
        let skip = if children { 13 } else { 11 };
        let fields = stat_fields(pid)?;
        let mut ticks = fields.iter().skip(skip).map(|f| f.parse::<u64>());
        let mut next =
            || -> Result<f64> { Ok(ticks.next().context("/proc stat")?? as f64 / 100.0) };
        Ok(Cpu {
            user: next()?,
            system: next()?,
        })
    }

    /// User and kernel seconds together.
    pub fn total(self) -> f64 {
        self.user + self.system
    }

    /// What was spent between `before` and this reading.
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user - before.user,
            system: self.system - before.system,
        }
    }
}

/// The fields of `/proc/<pid>/stat` ("self" for this process) from field 3 (the state)
/// on: those after the command name's closing parenthesis, which may hold spaces.
pub fn stat_fields(pid: &str) -> Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let (_, rest) = stat.rsplit_once(')').context("/proc stat")?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// What a process has read from the disk, all its threads together: the bytes it had the
/// block layer read for it (`read_bytes` of `/proc/PID/io`, which counts the page faults
/// and read-ahead it caused, not reads the page cache answered) and its major page
/// faults (`/proc/PID/stat`).
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskReads {
    /// Bytes read from the disk.
    pub bytes: u64,
    /// Page faults that waited for the disk.
    pub major_faults: u64,
}

impl DiskReads {
    /// Of process `pid` so far.
    pub fn of(pid: u32) -> Result<DiskReads> {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .with_context(|| format!("reading /proc/{pid}/io"))?;
        let bytes = io
            .lines()
            .find_map(|l| l.strip_prefix("read_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .context("read_bytes in /proc io")?;
        // majflt is field 12.
        let major_faults = stat_fields(&pid.to_string())?
            .get(9)
            .and_then(|v| v.parse().ok())
            .context("majflt in /proc stat")?;
        Ok(DiskReads {
            bytes,
            major_faults,
        })
    }

    /// What was read between `before` and this reading.
    pub fn since(self, before: DiskReads) -> DiskReads {
        DiskReads {
            bytes: self.bytes.saturating_sub(before.bytes),
            major_faults: self.major_faults.saturating_sub(before.major_faults),
        }
    }
}

/// CPU seconds the whole machine has spent in processes and kernel threads, plus the
/// hypervisor's steal (not idle, I/O wait or interrupts), from the first line of
/// `/proc/stat` in USER_HZ (100 on Linux).
pub fn machine_busy_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    // cpu user nice system idle iowait irq softirq steal (guest time is inside user).
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 7))
        .map(|(_, v)| v)
        .sum();
    Ok(busy as f64 / 100.0)
}

/// Bytes the whole machine has read from its disks so far (`pgpgin` of `/proc/vmstat`,
/// in KiB).
pub fn machine_disk_read_bytes() -> Result<u64> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").context("reading /proc/vmstat")?;
    let kib: u64 = vmstat
        .lines()
        .find_map(|l| l.strip_prefix("pgpgin "))
        .and_then(|v| v.trim().parse().ok())
        .context("pgpgin in /proc/vmstat")?;
    Ok(kib << 10)
}

/// The configuration file of a distribution registry started in `dir`.
pub fn distribution_config(dir: &Path) -> PathBuf {
    dir.join("config.yml")
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Wait until the daemon `child` (`name`, logging to `log`) answers, that is until
/// `probe`, a command of its client, succeeds: an error if the daemon exits first or
/// 60 s pass.
pub async fn wait_answering(
    child: &mut Child,
    name: &str,
    log: &Path,
    probe: &mut tokio::process::Command,
) -> Result<()> {
    probe
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited with {status}:\n{}", tail(log));
        }
        if probe.status().await.is_ok_and(|s| s.success()) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{name} did not answer in 60 s:\n{}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stop the daemon `child` gracefully, so it can unmount what it mounted: `SIGTERM`, up
/// to 30 s to exit, killed after that.
pub fn stop_daemon(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    lines.into_iter().skip(from).collect::<Vec<_>>().join("\n")
}
