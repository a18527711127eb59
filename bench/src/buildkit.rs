//! A standalone BuildKit daemon (`buildkitd`, OCI worker on runc) driven by `buildctl`:
//! the builder that can export a registry cache with `mode=max`, which the docker CLI of
//! Debian 12 (no buildx) cannot. Neither binary is packaged by Debian; they are used when
//! given (`--buildkitd`, `--buildctl`) or found on `PATH`.
//!
//! Each daemon keeps all its state (root, socket, configuration) in a directory of its
//! own and reaches the servers' plain-HTTP registries through its configuration, so
//! wiping the builder is stopping it and removing that directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;

use crate::servers;

/// The two BuildKit binaries, found.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// The daemon.
    pub buildkitd: PathBuf,
    /// Its client.
    pub buildctl: PathBuf,
}

impl Binaries {
    /// The binaries given, else those on `PATH`; `None` when either is missing.
    pub fn find(buildkitd: Option<&Path>, buildctl: Option<&Path>) -> Option<Binaries> {
        let find = |given: Option<&Path>, name: &str| match given {
            Some(path) => path.is_file().then(|| path.to_owned()),
            None => std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|path| path.is_file())
            }),
        };
        Some(Binaries {
            buildkitd: find(buildkitd, "buildkitd")?,
            buildctl: find(buildctl, "buildctl")?,
        })
    }
}

/// A running buildkitd, stopped (and its directory removed) when dropped.
pub struct Daemon {
    child: Child,
    buildctl: PathBuf,
    dir: PathBuf,
    addr: String,
}

/// What one `buildctl build` printed and exported.
pub struct Build {
    /// Its `--progress=plain` output.
    pub progress: String,
    /// Bytes of the OCI archive, when the build exported one to `buildctl`.
    pub archive_bytes: Option<u64>,
}

impl Daemon {
    /// Start buildkitd with its state in `dir` (which must not exist), allowed to reach
    /// `registries` (`host:port`) over plain HTTP, and wait until it answers.
    pub async fn start(bins: &Binaries, dir: &Path, registries: &[&str]) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("buildkitd.toml");
        let hosts: String = registries
            .iter()
            .map(|host| format!("[registry.\"{host}\"]\nhttp = true\n\n"))
            .collect();
        std::fs::write(&config, hosts)?;
        let log = dir.join("buildkitd.log");
        let addr = format!("unix://{}", dir.join("buildkitd.sock").display());
        let child = Command::new(&bins.buildkitd)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.join("root"))
            .args(["--addr", &addr])
            .args(["--oci-worker=true", "--containerd-worker=false"])
            .args(["--oci-worker-net=host", "--oci-worker-gc=false"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bins.buildkitd.display()))?;
        let mut daemon = Daemon {
            child,
            buildctl: bins.buildctl.clone(),
            dir: dir.to_owned(),
            addr,
        };
        let mut probe = tokio::process::Command::new(&bins.buildctl);
        probe.args(["--addr", &daemon.addr, "debug", "workers"]);
        servers::wait_answering(&mut daemon.child, "buildkitd", &log, &mut probe).await?;
        Ok(daemon)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run `buildctl build` with `args` (after `--progress=plain`); with `archive`, the
    /// build's OCI archive comes to buildctl's standard output and is counted, not kept.
    pub async fn build(&self, args: &[String], archive: bool) -> Result<Build> {
        let mut command = tokio::process::Command::new(&self.buildctl);
        command
            .args(["--addr", &self.addr, "build", "--progress=plain"])
            .args(args);
        if archive {
            command.args(["--output", "type=oci,dest=-"]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.buildctl.display()))?;
        let mut stdout = child.stdout.take().context("buildctl stdout")?;
        let mut stderr = child.stderr.take().context("buildctl stderr")?;
        let count = async {
            if archive {
                let bytes = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await?;
                anyhow::Ok((Some(bytes), Vec::new()))
            } else {
                let mut text = Vec::new();
                stdout.read_to_end(&mut text).await?;
                anyhow::Ok((None, text))
            }
        };
        let progress = async {
            let mut text = Vec::new();
            stderr.read_to_end(&mut text).await?;
            anyhow::Ok(text)
        };
        let ((archive_bytes, out), err) = tokio::try_join!(count, progress)?;
        let status = child.wait().await?;
        let progress = format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        if !status.success() {
            let lines: Vec<&str> = progress.lines().collect();
            let from = lines.len().saturating_sub(30);
            bail!(
                "buildctl {} failed ({status}):\n{}",
                args.join(" "),
                lines.into_iter().skip(from).collect::<Vec<_>>().join("\n")
            );
        }
        Ok(Build {
            progress,
            archive_bytes,
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A graceful stop lets buildkitd unmount its snapshots before the directory goes.
        servers::stop_daemon(&mut self.child);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("bench: could not remove {}: {e}", self.dir.display());
        }
    }
}
