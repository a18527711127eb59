//! End to end: DESIGN.md scenario 1 with the real dockerd and BuildKit. A multi-stage
//! `FROM scratch` + busybox image of at least 1 GiB in several large layers is built with
//! inline cache and pushed to a server (cold); the builder is wiped and the image rebuilt
//! with `--cache-from` the pushed reference (warm). Every step must come from the cache.
//!
//! The builds run in a private dockerd started for the run (own data root, exec root and
//! socket, no bridge network), so wiping its images and build cache touches nothing else
//! on the machine and nothing else perturbs the timings.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::servers::{self, Kind};

/// Shape of the end-to-end scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// Size of each of the four large layers, in MiB.
    pub layer_mib: usize,
    /// Seconds of simulated compute in the compute variant, spread over its four
    /// `RUN` steps (which run one after another).
    pub compute_secs: u64,
}

/// Which build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The steps only write their layers.
    Plain,
    /// Each `RUN` also sleeps, standing in for compilation.
    Compute,
}

impl Variant {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Compute => "compute",
        }
    }
}

/// One cold build+push and warm rebuild against one server.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The server used as the cache.
    pub server: Kind,
    /// Which build.
    pub variant: Variant,
    /// Cold build plus push, in seconds.
    pub cold_secs: f64,
    /// Warm rebuild on a wiped builder with `--cache-from`, in seconds.
    pub warm_secs: f64,
    /// Size of the built image, in bytes.
    pub image_bytes: u64,
    /// Steps BuildKit reported as `CACHED` in the warm rebuild.
    pub cached_steps: usize,
}

/// Steps of the Dockerfile (`COPY`s and `RUN`s) that a warm rebuild must take from cache.
const STEPS: usize = 8;

/// The benchmark's Dockerfile: a base stage with busybox, two build stages chained one
/// after the other, and a final image of four `layer_mib` layers.
fn dockerfile(layer_mib: usize, sleep_per_step: u64) -> String {
    let run = |path: &str| {
        format!(
            "RUN dd if=/dev/urandom of={path} bs=1M count={layer_mib} && sleep {sleep_per_step}"
        )
    };
    format!(
        "FROM scratch AS base\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\n\
         FROM base AS deps\n{}\n\n\
         FROM deps AS build\n{}\n\n\
         FROM base\n\
         COPY --from=deps /deps.bin /opt/deps.bin\n\
         COPY --from=build /app.bin /opt/app.bin\n\
         {}\n{}\n",
        run("/deps.bin"),
        run("/app.bin"),
        run("/opt/assets.bin"),
        run("/opt/data.bin"),
    )
}

/// A private dockerd, stopped when dropped.
pub struct Daemon {
    child: Child,
    docker: PathBuf,
    host: String,
    log: PathBuf,
}

impl Daemon {
    /// Start `dockerd` with all its state under `dir`, and wait until it answers.
    pub async fn start(dockerd: &Path, docker: &Path, dir: &Path) -> Result<Daemon> {
        std::fs::create_dir_all(dir)?;
        let log = dir.join("dockerd.log");
        let sock = dir.join("docker.sock");
        let child = Command::new(dockerd)
            .args(["--iptables=false", "--ip-masq=false", "--bridge=none"])
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", dockerd.display()))?;
        let mut daemon = Daemon {
            child,
            docker: docker.to_owned(),
            host: format!("unix://{}", sock.display()),
            log,
        };
        let mut probe = tokio::process::Command::new(docker);
        probe.arg("info").env("DOCKER_HOST", &daemon.host);
        servers::wait_answering(&mut daemon.child, "dockerd", &daemon.log, &mut probe).await?;
        Ok(daemon)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run the docker client against this daemon; returns stdout and stderr together.
    pub(crate) async fn run(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&self.docker)
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .env("DOCKER_BUILDKIT", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", self.docker.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(30);
            bail!(
                "docker {} failed ({}):\n{}",
                args.join(" "),
                out.status,
                lines.into_iter().skip(from).collect::<Vec<_>>().join("\n")
            );
        }
        Ok(text)
    }

    /// Remove every image and all build cache.
    pub(crate) async fn wipe(&self) -> Result<()> {
        self.run(&["builder", "prune", "-af"]).await?;
        let ids = self.run(&["image", "ls", "-aq"]).await?;
        let mut ids: Vec<&str> = ids.split_whitespace().collect();
        ids.sort_unstable();
        ids.dedup();
        if !ids.is_empty() {
            let mut args = vec!["rmi", "-f"];
            args.extend(ids);
            self.run(&args).await?;
        }
        let left = self.run(&["image", "ls", "-aq"]).await?;
        ensure!(left.trim().is_empty(), "images left after wiping: {left}");
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A graceful stop lets dockerd stop its containerd and unmount its layers.
        servers::stop_daemon(&mut self.child);
    }
}

/// A build context for `variant`: busybox and the Dockerfile, in `dir`.
pub fn context(dir: &Path, busybox: &Path, plan: &Plan, variant: Variant) -> Result<PathBuf> {
    let ctx = dir.join(format!("context-{}", variant.name()));
    let sleep = match variant {
        Variant::Plain => 0,
        Variant::Compute => plan.compute_secs.div_ceil(4),
    };
    write_context(&ctx, busybox, &dockerfile(plan.layer_mib, sleep))?;
    Ok(ctx)
}

/// Create the build context `ctx` with the static `busybox` (the images' only binary, as
/// `busybox` at the context's root) and `dockerfile`.
pub fn write_context(ctx: &Path, busybox: &Path, dockerfile: &str) -> Result<()> {
    std::fs::create_dir_all(ctx)?;
    std::fs::copy(busybox, ctx.join("busybox"))
        .with_context(|| format!("copying {}", busybox.display()))?;
    std::fs::write(ctx.join("Dockerfile"), dockerfile)?;
    Ok(())
}

/// One Dockerfile step (`COPY`, `RUN`) of a build, as BuildKit's `--progress=plain`
/// output reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The vertex's name, such as `[web 4/6] COPY src/web/ /src/web/`.
    pub name: String,
    /// Whether BuildKit printed `CACHED` for it.
    pub cached: bool,
    /// Whether its process printed output (lines `#N <seconds> <text>`).
    pub printed: bool,
}

impl Step {
    /// Whether the step really ran: not `CACHED`, and for a `RUN` (every one in these
    /// Dockerfiles prints) its process printed. BuildKit 0.11 reports the last step of
    /// a target `DONE`, not `CACHED`, when all it did was fetch the step's imported
    /// layers for the export; its process did not run, so it printed nothing.
    pub fn ran(&self) -> bool {
        !self.cached && (self.printed || !self.name.contains("] RUN "))
    }
}

/// The Dockerfile steps of a build in the order BuildKit started them, from its
/// `--progress=plain` output: vertices named `[stage i/n] ...` (or `[i/n] ...` in an
/// unnamed stage), each cached if a `#N CACHED` line names its vertex number, printed if
/// a `#N <seconds> <text>` line does. A process's output that reached the printer before
/// its vertex had a number is labelled `#0` and printed under the vertex's own lines, so
/// it belongs to the vertex printed last. Internal vertices (`[internal] load ...`,
/// `exporting to image`, cache imports) are left out.
pub fn build_steps(out: &str) -> Vec<Step> {
    let mut steps: Vec<(u32, Step)> = Vec::new();
    let mut current = 0;
    for line in out.lines() {
        let Some((id, text)) = line.strip_prefix('#').and_then(|l| l.split_once(' ')) else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else {
            continue;
        };
        if id != 0 {
            current = id;
        }
        let id = current;
        let text = text.trim_end();
        let known = steps
            .iter_mut()
            .find(|(n, _)| *n == id)
            .map(|(_, step)| step);
        let is_output = text
            .split_once(' ')
            .is_some_and(|(secs, _)| secs.parse::<f64>().is_ok());
        match known {
            Some(step) if text == "CACHED" => step.cached = true,
            Some(step) if is_output => step.printed = true,
            Some(_) => {}
            None => {
                let is_step = text
                    .strip_prefix('[')
                    .and_then(|t| t.split_once(']'))
                    .and_then(|(label, _)| label.split_whitespace().last())
                    .and_then(|pos| pos.split_once('/'))
                    .is_some_and(|(i, n)| i.parse::<u32>().is_ok() && n.parse::<u32>().is_ok());
                if is_step {
                    steps.push((
                        id,
                        Step {
                            name: text.to_owned(),
                            cached: false,
                            printed: false,
                        },
                    ));
                }
            }
        }
    }
    steps.into_iter().map(|(_, step)| step).collect()
}

/// Cold build+push to `host`, wipe, warm rebuild from the pushed image's cache.
pub async fn scenario(
    daemon: &Daemon,
    server: Kind,
    host: &str,
    variant: Variant,
    ctx: &Path,
    layer_mib: usize,
) -> Result<Outcome> {
    let image = format!("{host}/e2e/{}:latest", variant.name());
    let ctx = ctx.to_str().context("context path is not UTF-8")?;
    daemon.wipe().await?;

    let start = Instant::now();
    daemon
        .run(&[
            "build",
            "--progress=plain",
            "--network=none",
            "--build-arg",
            "BUILDKIT_INLINE_CACHE=1",
            "-t",
            &image,
            ctx,
        ])
        .await?;
    daemon.run(&["push", &image]).await?;
    let cold_secs = start.elapsed().as_secs_f64();
    let image_bytes: u64 = daemon
        .run(&["image", "inspect", "--format", "{{.Size}}", &image])
        .await?
        .trim()
        .parse()
        .context("image size")?;
    let expected = (4 * layer_mib as u64) << 20;
    ensure!(
        image_bytes >= expected,
        "the image is {image_bytes} bytes, expected at least {expected}"
    );

    daemon.wipe().await?;
    let start = Instant::now();
    let out = daemon
        .run(&[
            "build",
            "--progress=plain",
            "--network=none",
            "--cache-from",
            &image,
            "-t",
            "bench-warm",
            ctx,
        ])
        .await?;
    let warm_secs = start.elapsed().as_secs_f64();
    let cached_steps = out.lines().filter(|l| l.ends_with(" CACHED")).count();
    ensure!(
        !out.contains("records in") && cached_steps >= STEPS,
        "the warm rebuild from {} ran steps again ({cached_steps} of {STEPS} cached):\n{out}",
        server.name()
    );
    Ok(Outcome {
        server,
        variant,
        cold_secs,
        warm_secs,
        image_bytes,
        cached_steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_steps_reads_names_cached_markers_and_output_by_vertex() {
        let out = "#1 [internal] load build definition from Dockerfile\n\
                   #1 DONE 0.0s\n\
                   #5 [base 1/2] COPY busybox /bin/busybox\n\
                   #5 CACHED\n\
                   #6 importing cache manifest from 127.0.0.1:5000/p/web:latest\n\
                   #7 [web 2/3] RUN dd if=/dev/urandom of=/a bs=1M count=1\n\
                   #7 0.101 1+0 records in\n\
                   #7 [web 2/3] RUN dd if=/dev/urandom of=/a bs=1M count=1\n\
                   #7 DONE 0.2s\n\
                   #8 [3/3] COPY src/ /src/\n\
                   #8 CACHED\n\
                   #9 [web 3/3] RUN sha256sum /a\n\
                   #9 sha256:953d8a 240B / 240B 0.0s done\n\
                   #9 DONE 0.2s\n\
                   #10 [api 3/3] RUN sha256sum /b\n\
                   #0 0.070 ab0d1d1b  /b\n\
                   #10 DONE 0.1s\n\
                   #11 exporting to image\n";
        let steps = build_steps(out);
        let got: Vec<(&str, bool, bool, bool)> = steps
            .iter()
            .map(|s| (s.name.as_str(), s.cached, s.printed, s.ran()))
            .collect();
        assert_eq!(
            got,
            [
                ("[base 1/2] COPY busybox /bin/busybox", true, false, false),
                (
                    "[web 2/3] RUN dd if=/dev/urandom of=/a bs=1M count=1",
                    false,
                    true,
                    true
                ),
                ("[3/3] COPY src/ /src/", true, false, false),
                // Its imported layers fetched for the export, its process never started.
                ("[web 3/3] RUN sha256sum /a", false, false, false),
                ("[api 3/3] RUN sha256sum /b", false, true, true),
            ]
        );
    }
}
