//! Getting the run's tools: the release `layercache` (built from this workspace), the
//! Debian packages of the peer and of the end-to-end clients, and a description of the
//! machine for the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

/// The machine the run happened on.
#[derive(Serialize)]
pub struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
}

/// The workspace this crate belongs to.
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .context("bench has no parent directory")
}

/// The part of a `cargo build --message-format=json` line the build step reads.
#[derive(serde::Deserialize)]
struct CargoMessage {
    reason: String,
    #[serde(default)]
    target: CargoTarget,
    executable: Option<PathBuf>,
}

/// The target a cargo message is about.
#[derive(serde::Deserialize, Default)]
struct CargoTarget {
    name: String,
}

/// The Cargo profile layercache is deployed with, and so measured with.
const PROFILE: &str = "dist";

/// `cargo build --profile dist -p layercache`; returns the binary's path.
pub fn build_layercache(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let command = format!("cargo build --profile {PROFILE} -p layercache");
    eprintln!("bench: {command}");
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--profile",
            PROFILE,
            "-p",
            "layercache",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(out.status.success(), "{command} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<CargoMessage>(line).ok())
        .filter(|msg| msg.reason == "compiler-artifact" && msg.target.name == "layercache")
        .find_map(|msg| msg.executable)
        .context("cargo build produced no layercache executable")
}

/// Install Debian `package` if `bin` is missing (as root), else fail with a hint.
pub fn ensure_installed(bin: &Path, package: &str) -> Result<()> {
    if bin.exists() {
        return Ok(());
    }
    ensure!(
        is_root(),
        "{} is missing: apt-get install {package} (as root)",
        bin.display()
    );
    eprintln!("bench: installing {package}");
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        ensure!(status.success(), "apt-get {} failed", args.join(" "));
        Ok(())
    };
    apt(&["update", "-qq"])?;
    apt(&["install", "-y", "-qq", package])?;
    ensure!(
        bin.exists(),
        "{package} installed but {} is still missing",
        bin.display()
    );
    Ok(())
}

/// Whether this process runs as root (real uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The machine this run is on.
pub fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let memory_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
    }
}
