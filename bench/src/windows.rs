//! The gaps eviction's protection windows must cover, measured with the real clients
//! against a layercache that logs every request:
//!
//! * a push: from its first blob check or upload to the manifest PUT that references the
//!   blobs (`docker push`, `buildah push`, `skopeo copy`): what `push_window` covers;
//! * a build importing a cache: from BuildKit's read of the cache manifest to its fetch of
//!   a cached layer that a step needs only after another stage's long step: what `in_use`
//!   covers.
//!
//! On loopback the clients' own work (compressing layers) is the limit, so a push's gap
//! per byte is the slowest a client can go next to its cache; a slower network stretches
//! it further.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use rand::RngCore;
use serde::Serialize;

use crate::e2e::Daemon;
use crate::servers::Server;

/// What the workload needs.
pub struct Inputs<'a> {
    /// Scratch space.
    pub dir: &'a Path,
    /// The layercache binary.
    pub layercache_bin: &'a Path,
    /// dockerd and the docker client of Debian's docker.io.
    pub dockerd_bin: &'a Path,
    /// The docker client.
    pub docker_bin: &'a Path,
    /// A static busybox for the images.
    pub busybox: &'a Path,
    /// Size of each of the three layers pushed, in MiB.
    pub layer_mib: usize,
    /// Seconds the other stage's step runs before BuildKit needs the cached layer.
    pub step_secs: u64,
}

/// One measured gap.
#[derive(Clone, Debug, Serialize)]
pub struct Gap {
    /// The client.
    pub client: &'static str,
    /// What the gap is between.
    pub between: &'static str,
    /// Bytes the client moved within the gap (before compression).
    pub bytes: u64,
    /// The gap, in seconds.
    pub secs: f64,
}

impl Gap {
    /// Bytes per second within the gap.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-3)
    }
}

/// The workload's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Every gap measured.
    pub gaps: Vec<Gap>,
}

/// One `served` line of the server's log.
struct Served {
    at: SystemTime,
    path: String,
    endpoint: String,
}

/// The requests the server's log records, in order.
fn served(log: &Path) -> Result<Vec<Served>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.contains(" served ")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|v| {
                    v.trim_matches(|c| c == '"' || c == '}' || c == ':')
                        .to_owned()
                })
        };
        let (Some(stamp), Some(path), Some(endpoint)) = (
            line.split_whitespace().next(),
            field("path="),
            field("endpoint="),
        ) else {
            continue;
        };
        let at =
            humantime::parse_rfc3339(stamp).with_context(|| format!("timestamp of {line:?}"))?;
        out.push(Served { at, path, endpoint });
    }
    Ok(out)
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// From the first blob check or upload in `repo` to the last manifest PUT there.
fn push_gap(requests: &[Served], repo: &str) -> Result<f64> {
    let prefix = format!("/v2/{repo}/");
    let mine: Vec<&Served> = requests
        .iter()
        .filter(|r| r.path.starts_with(&prefix))
        .collect();
    let first = mine
        .iter()
        .find(|r| matches!(r.endpoint.as_str(), "head_blob" | "start_upload"))
        .with_context(|| format!("no blob check or upload in {repo}"))?;
    let put = mine
        .iter()
        .rfind(|r| r.endpoint == "put_manifest")
        .with_context(|| format!("no manifest PUT in {repo}"))?;
    Ok(secs_between(first.at, put.at))
}

/// From the first manifest read in `repo` at or after `since` to the end of the last blob
/// read there (a request is logged once its response is over).
fn import_gap(requests: &[Served], repo: &str, since: usize) -> Result<f64> {
    let prefix = format!("/v2/{repo}/");
    let mine: Vec<&Served> = requests
        .iter()
        .skip(since)
        .filter(|r| r.path.starts_with(&prefix))
        .collect();
    let manifest = mine
        .iter()
        .find(|r| r.endpoint == "get_manifest")
        .with_context(|| format!("no manifest read in {repo}"))?;
    let blob = mine
        .iter()
        .rfind(|r| r.endpoint == "get_blob")
        .with_context(|| format!("no blob read in {repo}"))?;
    Ok(secs_between(manifest.at, blob.at))
}

/// Run a command to success; its output.
async fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{} {} failed: {text}", program.display(), args.join(" "));
    }
    Ok(text)
}

/// A context of busybox and three incompressible layers, one `COPY` each.
fn push_context(dir: &Path, busybox: &Path, layer_mib: usize) -> Result<PathBuf> {
    let ctx = dir.join("push-context");
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy(busybox, ctx.join("busybox"))?;
    let mut rng = rand::rng();
    let mut dockerfile = String::from("FROM scratch\nCOPY busybox /bin/busybox\n");
    for i in 1..=3 {
        let mut bytes = vec![0u8; layer_mib << 20];
        rng.fill_bytes(&mut bytes);
        std::fs::write(ctx.join(format!("l{i}.bin")), bytes)?;
        dockerfile += &format!("COPY l{i}.bin /l{i}\n");
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile)?;
    Ok(ctx)
}

/// A two-stage context: the final image's cached layer is needed only after the other
/// stage's step of `step_secs`, which a new build argument makes run again.
fn import_context(push_ctx: &Path, dir: &Path, step_secs: u64) -> Result<PathBuf> {
    let ctx = dir.join("import-context");
    std::fs::create_dir_all(&ctx)?;
    for file in ["busybox", "l1.bin"] {
        std::fs::copy(push_ctx.join(file), ctx.join(file))?;
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM scratch AS work\n\
             COPY busybox /bin/busybox\n\
             ARG RUN=0\n\
             RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox sleep {step_secs}; echo $RUN > /out\"]\n\n\
             FROM scratch\n\
             COPY busybox /bin/busybox\n\
             COPY l1.bin /l1\n\
             COPY --from=work /out /out\n"
        ),
    )?;
    Ok(ctx)
}

/// Measure every gap.
pub async fn run_all(inputs: &Inputs<'_>) -> Result<Report> {
    let dir = inputs.dir.join("windows");
    std::fs::create_dir_all(&dir)?;
    let server = Server::start_layercache_with(
        inputs.layercache_bin,
        &dir.join("layercache"),
        &[("RUST_LOG".into(), "info".into())],
    )?;
    let log = dir.join("layercache/server.log");
    let host = server.host.clone();
    let daemon = Daemon::start(inputs.dockerd_bin, inputs.docker_bin, &dir.join("docker")).await?;
    let push_ctx = push_context(&dir, inputs.busybox, inputs.layer_mib)?;
    let pushed = (3 * inputs.layer_mib as u64) << 20;
    let ctx = push_ctx.to_str().context("context path is not UTF-8")?;
    let mut gaps = Vec::new();

    eprintln!("bench: windows: docker push of {} MiB", pushed >> 20);
    let docker_image = format!("{host}/windows/docker:1");
    daemon
        .run(&["build", "--network=none", "-t", &docker_image, ctx])
        .await?;
    daemon.run(&["push", &docker_image]).await?;
    gaps.push(Gap {
        client: "docker push",
        between: "first blob check, manifest PUT",
        bytes: pushed,
        secs: push_gap(&served(&log)?, "windows/docker")?,
    });

    eprintln!("bench: windows: buildah push");
    let buildah_root = dir.join("buildah");
    let root = format!("--root={}", buildah_root.join("root").display());
    let runroot = format!("--runroot={}", buildah_root.join("run").display());
    let buildah = Path::new("buildah");
    let buildah_image = format!("{host}/windows/buildah:1");
    let storage = [root.as_str(), runroot.as_str(), "--storage-driver=vfs"];
    let bud: Vec<&str> = storage
        .iter()
        .copied()
        .chain([
            "bud",
            "--isolation=chroot",
            "--layers",
            "-t",
            &buildah_image,
            ctx,
        ])
        .collect();
    run(buildah, &bud).await?;
    let push: Vec<&str> = storage
        .iter()
        .copied()
        .chain(["push", "--tls-verify=false", &buildah_image])
        .collect();
    run(buildah, &push).await?;
    gaps.push(Gap {
        client: "buildah push",
        between: "first blob check, manifest PUT",
        bytes: pushed,
        secs: push_gap(&served(&log)?, "windows/buildah")?,
    });

    eprintln!("bench: windows: skopeo copy");
    run(
        Path::new("skopeo"),
        &[
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{docker_image}"),
            &format!("docker://{host}/windows/skopeo:1"),
        ],
    )
    .await?;
    gaps.push(Gap {
        client: "skopeo copy",
        between: "first blob check, manifest PUT",
        bytes: pushed,
        secs: push_gap(&served(&log)?, "windows/skopeo")?,
    });

    eprintln!("bench: windows: BuildKit importing a cache");
    let import_ctx = import_context(&push_ctx, &dir, inputs.step_secs)?;
    let ctx = import_ctx.to_str().context("context path is not UTF-8")?;
    let cached = format!("{host}/windows/import:1");
    daemon
        .run(&[
            "build",
            "--network=none",
            "--build-arg",
            "BUILDKIT_INLINE_CACHE=1",
            "--build-arg",
            "RUN=1",
            "-t",
            &cached,
            ctx,
        ])
        .await?;
    daemon.run(&["push", &cached]).await?;
    daemon.wipe().await?;
    let since = served(&log)?.len();
    let started = Instant::now();
    let out = daemon
        .run(&[
            "build",
            "--progress=plain",
            "--network=none",
            "--cache-from",
            &cached,
            "--build-arg",
            "RUN=2",
            "-t",
            "windows-import",
            ctx,
        ])
        .await?;
    ensure!(
        out.contains("COPY l1.bin /l1") && out.lines().any(|l| l.ends_with(" CACHED")),
        "the rebuild did not take the layer from the imported cache:\n{out}"
    );
    let secs = import_gap(&served(&log)?, "windows/import", since)?;
    eprintln!(
        "bench: windows: build of {:.1} s fetched the cached layer {secs:.1} s after its manifest",
        started.elapsed().as_secs_f64()
    );
    gaps.push(Gap {
        client: "BuildKit --cache-from",
        between: "cache manifest read, cached layer read",
        bytes: (inputs.layer_mib as u64) << 20,
        secs,
    });
    drop(daemon);
    drop(server);
    Ok(Report { gaps })
}

/// The gaps as a table, with what the default windows cover at each push rate.
pub fn table(report: &Report) -> String {
    let mut out = String::from(
        "protection windows: gaps measured with the real clients\n\
         client                  between                                   MiB      gap s     MB/s   5 min covers\n",
    );
    for gap in &report.gaps {
        let covers = if gap.between.starts_with("first blob") {
            format!("{:.1} GB", gap.rate() * 300.0 / 1e9)
        } else {
            "-".to_owned()
        };
        out += &format!(
            "{:<23} {:<40} {:>6} {:>10.1} {:>8.0} {:>14}\n",
            gap.client,
            gap.between,
            gap.bytes >> 20,
            gap.secs,
            gap.rate() / 1e6,
            covers
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_come_from_the_served_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        std::fs::write(
            &log,
            "2026-12-02T07:41:04.000000Z  INFO layercache: layercache serving addr=127.0.0.1:1\n\
             2026-12-02T07:41:04.500000Z  INFO request{id=1 method=HEAD path=/v2/w/a/blobs/sha256:aa endpoint=\"head_blob\"}: server::app: served status=404 micros=1\n\
             2026-12-02T07:41:05.000000Z  INFO request{id=2 method=POST path=/v2/w/a/blobs/uploads/ endpoint=\"start_upload\" session=\"s\"}: server::app: served status=202 micros=1\n\
             2026-12-02T07:41:16.750000Z  INFO request{id=3 method=PUT path=/v2/w/a/manifests/1 endpoint=\"put_manifest\" session=\"s\"}: server::app: served status=201 micros=1\n\
             2026-12-02T07:42:00.000000Z  INFO request{id=4 method=GET path=/v2/w/a/manifests/1 endpoint=\"get_manifest\"}: server::app: served status=200 micros=1\n\
             2026-12-02T07:42:23.000000Z  INFO request{id=5 method=GET path=/v2/w/a/blobs/sha256:aa endpoint=\"get_blob\"}: server::app: served status=200 micros=1\n",
        )
        .unwrap();
        let requests = served(&log).unwrap();
        assert_eq!(requests.len(), 5);
        assert!((push_gap(&requests, "w/a").unwrap() - 12.25).abs() < 1e-6);
        assert!((import_gap(&requests, "w/a", 3).unwrap() - 23.0).abs() < 1e-6);
        assert!(push_gap(&requests, "w/b").is_err());
    }
}
