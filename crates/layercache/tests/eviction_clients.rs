//! Eviction with real clients and a real disk.
//!
//! * docker and skopeo push image after image into a small quota: after every push the
//!   data directory, measured on disk, is back under the quota; the least recently used
//!   images are gone (manifests and blobs), the ones in use pull intact, and a BuildKit
//!   inline-cache rebuild from a recent image is still fully cached.
//! * On a size-limited tmpfs, an upload that does not fit fails cleanly with 507 and
//!   INSUFFICIENT_STORAGE, keeps what was stored intact and leaves no staging bytes;
//!   once tags are deleted the big upload goes through, and further pushes succeed as
//!   eviction keeps the store inside a quota the filesystem's size limits.
//! * On the defaults, on a filesystem other files have mostly filled, the quota is what
//!   `df` leaves less `min_free`, below `max_size`; the pass that evicts because of it
//!   says so once in the log, and `layercache gc` says why the quota is what it is.
//!
//! dockerd is one shared daemon, so everything touching it lives in one test function.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::registry::{
    assert_gone, assert_intact, blobs_of, disk_usage, error_code, field, get_blob, get_json,
    get_manifest, get_text, push_image, random_bytes, sample, upload,
};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::Value;

/// The Debian docker.io client: newer clients without buildx refuse `DOCKER_BUILDKIT=1`.
const DOCKER: &str = "/usr/bin/docker";

const MIB: u64 = 1 << 20;

/// Timestamps of use have a one-second resolution: uses further apart than this are
/// ordered.
const TICK: Duration = Duration::from_millis(1100);

/// Whether a real-client test must fail rather than skip when it cannot run (as
/// [`common::require_tool`] decides).
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1")
}

/// Wait until the server's passes have brought usage down to the high watermark, then
/// for any pass still running (a dry run waits for it); the status after that.
async fn settle(client: &reqwest::Client, server: &common::Server) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = get_json(client, &server.at("/api/v1/gc")).await;
        if field(&status, &["usage", "total"]) <= field(&status, &["quota", "high"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage stayed above the high watermark: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = client
        .post(server.at("/api/v1/gc?dry_run=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    get_json(client, &server.at("/api/v1/gc")).await
}

// ---- docker ----

/// One layer per file; `random.bin` is incompressible, so each image costs its size.
/// The first step is the same in every image: BuildKit builds it once and every image
/// shares its layer, which eviction must keep while any image still references it.
const DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
COPY nonce /nonce
COPY random.bin /data/random.bin
";

fn skopeo(args: &[&str]) -> Command {
    let mut command = Command::new("skopeo");
    command.args(args);
    command
}

fn image_id(reference: &str) -> String {
    common::run_ok(&mut common::docker(&[
        "image", "inspect", "--format", "{{.Id}}", reference,
    ]))
    .trim()
    .to_owned()
}

/// What makes an image the same image: its layers, creation time and run configuration
/// (everything in its config but BuildKit's inline cache metadata, which BuildKit does
/// not always reproduce for a step shared with other builds).
fn image_content(reference: &str) -> String {
    common::run_ok(&mut common::docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .RootFS.Layers}} {{.Created}} {{json .Config}}",
        reference,
    ]))
    .trim()
    .to_owned()
}

/// Leaves the daemon without this test's images and build cache, also on failure.
struct DockerCleanup {
    references: Vec<String>,
}

impl DockerCleanup {
    fn run(&self) -> (bool, String) {
        let pruned = common::run(&mut common::docker(&["builder", "prune", "-af"]));
        for reference in &self.references {
            common::run(&mut common::docker(&["image", "rm", "-f", reference]));
        }
        pruned
    }
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// A built image: its build context (kept for the cached rebuild), tag, id and content.
struct Image {
    repo: String,
    tag: String,
    context: tempfile::TempDir,
    id: String,
    content: String,
}

fn build_image(server: &common::Server, index: usize, layer: usize) -> Image {
    let context = common::busybox_context(server, "Dockerfile", DOCKERFILE);
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ index as u64;
    let random: Vec<u8> = common::chunks(seed, layer, 1 << 20)
        .flat_map(|c| c.to_vec())
        .collect();
    std::fs::write(context.path().join("random.bin"), random).unwrap();
    let repo = format!("evict/app{index}");
    let tag = format!("{}/{repo}:v1", server.host);
    common::docker_build(context.path(), &tag, true, None);
    let id = image_id(&tag);
    let content = image_content(&tag);
    Image {
        repo,
        tag,
        context,
        id,
        content,
    }
}

#[tokio::test]
async fn real_clients_stay_under_the_quota() {
    const QUOTA: u64 = 48 * MIB;
    const IMAGES: usize = 10;
    const LAYER: usize = 6 << 20;
    if !common::require_tool(DOCKER) || !common::require_tool("skopeo") {
        return;
    }
    let (ok, info) = common::run(&mut common::docker(&["info"]));
    assert!(
        ok,
        "dockerd is not answering (scripts/setup-clients.sh starts it):\n{info}"
    );
    // A grace of a few seconds: a push's layers are not swept before its manifest
    // arrives, and blobs of images pushed several pushes ago are past it.
    let server = common::Server::start_with_env(&[
        ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "48MiB"),
        ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
        ("LAYERCACHE_STORE__EVICTION__HIGH_WATERMARK", "90%"),
        ("LAYERCACHE_STORE__EVICTION__LOW_WATERMARK", "80%"),
        ("LAYERCACHE_STORE__EVICTION__GRACE", "2s"),
        ("LAYERCACHE_STORE__EVICTION__IN_USE", "1s"),
        ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "1s"),
        ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1s"),
    ]);
    let client = reqwest::Client::new();
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    assert_eq!(field(&status, &["quota", "limit"]), QUOTA, "{status:#}");
    assert_eq!(
        field(&status, &["quota", "high"]),
        QUOTA * 9 / 10,
        "{status:#}"
    );

    let mut cleanup = DockerCleanup {
        references: Vec::new(),
    };
    let started = Instant::now();
    let mut images = Vec::new();
    for index in 0..IMAGES {
        let image = build_image(&server, index, LAYER);
        cleanup.references.push(image.tag.clone());
        cleanup.references.push(image.id.clone());
        images.push(image);
    }
    eprintln!("built {IMAGES} images in {:?}", started.elapsed());

    // Push one after another; image 0 is in use all along, and so is the newest one.
    let mut manifests: Vec<Bytes> = Vec::new();
    let mut peak = (0, 0);
    for (index, image) in images.iter().enumerate() {
        if index % 2 == 0 {
            common::run_ok(&mut common::docker(&["push", &image.tag]));
        } else {
            common::run_ok(&mut skopeo(&[
                "copy",
                "--dest-tls-verify=false",
                &format!("docker-daemon:{}", image.tag),
                &format!("docker://{}", image.tag),
            ]));
        }
        let status = settle(&client, &server).await;
        let (apparent, allocated) = disk_usage(server.data_dir());
        eprintln!(
            "pushed {}: usage {} (high {}), on disk {apparent} bytes ({allocated} allocated)",
            image.tag,
            field(&status, &["usage", "total"]),
            field(&status, &["quota", "high"]),
        );
        assert!(
            apparent < QUOTA && allocated < QUOTA,
            "after pushing {}: {apparent} bytes ({allocated} allocated) on disk, over the \
             {QUOTA}-byte quota\n{status:#}",
            image.tag
        );
        peak = (peak.0.max(apparent), peak.1.max(allocated));

        let (code, manifest) = get_manifest(&client, &server, &image.repo, "v1").await;
        assert_eq!(code, 200, "{} is gone right after its push", image.tag);
        manifests.push(manifest);
        let (code, body) = get_manifest(&client, &server, &images[0].repo, "v1").await;
        assert_eq!(
            code,
            200,
            "image 0, used after every push, was evicted: {}",
            String::from_utf8_lossy(&body)
        );
        tokio::time::sleep(TICK).await;
    }
    eprintln!(
        "pushed {IMAGES} images in {:?}; peak on disk {} bytes ({} allocated)",
        started.elapsed(),
        peak.0,
        peak.1
    );

    // The least recently used images are gone, the others are all there.
    let mut kept = Vec::new();
    let mut evicted = Vec::new();
    for (index, image) in images.iter().enumerate() {
        let (code, body) = get_manifest(&client, &server, &image.repo, "v1").await;
        match code {
            200 => {
                assert_eq!(body, manifests[index], "{} changed", image.tag);
                kept.push(index);
            }
            404 => {
                assert_eq!(error_code(&body), "MANIFEST_UNKNOWN", "{}", image.tag);
                evicted.push(index);
            }
            _ => panic!("{}: {code} {}", image.tag, String::from_utf8_lossy(&body)),
        }
    }
    let all: Vec<String> = manifests.iter().flat_map(|m| blobs_of(m)).collect();
    let distinct: BTreeSet<&String> = all.iter().collect();
    eprintln!(
        "kept {kept:?}, evicted {evicted:?}; {} blobs referenced, {} distinct",
        all.len(),
        distinct.len()
    );
    assert!(
        evicted.len() >= 2,
        "{IMAGES} images of ~{LAYER} bytes in a {QUOTA}-byte quota, yet only {evicted:?} \
         were evicted"
    );
    assert!(kept.contains(&0), "image 0, in use all along, was evicted");
    // Least recently used first: apart from image 0, the evicted are the oldest pushes.
    let expected: Vec<usize> = (1..=evicted.len()).collect();
    assert_eq!(
        evicted, expected,
        "not least recently used first (kept {kept:?})"
    );
    assert!(
        kept.len() >= 4,
        "the quota holds more than {kept:?} of these images"
    );

    // The evicted images' own blobs are gone too.
    let referenced: BTreeSet<String> = kept.iter().flat_map(|&i| blobs_of(&manifests[i])).collect();
    for &index in &evicted {
        let repo = &images[index].repo;
        for digest in blobs_of(&manifests[index]) {
            if referenced.contains(&digest) {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match get_blob(&client, &server, repo, &digest).await {
                    Err((404, code)) => {
                        assert_eq!(code, "BLOB_UNKNOWN");
                        break;
                    }
                    other => assert!(
                        Instant::now() < deadline,
                        "{repo}: blob {digest} of an evicted image stays: {other:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    common::assert_blob_files_match_their_names(server.data_dir());

    // The images in use pull intact: skopeo gets every blob and checks it...
    let pulled = tempfile::tempdir().unwrap();
    let newest = IMAGES - 1;
    for index in [0, newest] {
        let dir = pulled.path().join(format!("image{index}"));
        common::run_ok(
            skopeo(&["copy", "--src-tls-verify=false"])
                .arg(format!("docker://{}", images[index].tag))
                .arg(format!("dir:{}", dir.display())),
        );
        assert_eq!(
            std::fs::read(dir.join("manifest.json")).unwrap(),
            manifests[index],
            "{}",
            images[index].tag
        );
        for digest in blobs_of(&manifests[index]) {
            let bytes = std::fs::read(dir.join(&digest[7..])).unwrap();
            assert_eq!(common::digest_of(&bytes), digest, "{}", images[index].tag);
        }
    }
    // ...and docker, on a daemon without them, gets the very images it built.
    for index in [0, newest - 1, newest] {
        let image = &images[index];
        common::run(&mut common::docker(&[
            "image", "rm", "-f", &image.tag, &image.id,
        ]));
        common::run_ok(&mut common::docker(&["pull", &image.tag]));
        assert_eq!(image_id(&image.tag), image.id, "{}", image.tag);
    }

    // A rebuild of the newest image on a wiped daemon takes every step from its inline
    // cache.
    let (pruned, out) = cleanup.run();
    assert!(pruned, "docker builder prune failed:\n{out}");
    let image = &images[newest];
    let warm = common::docker_build(image.context.path(), &image.tag, true, Some(&image.tag));
    assert!(
        warm.contains(&format!("importing cache manifest from {}", image.tag)),
        "{warm}"
    );
    let steps = common::step_outcomes(&warm);
    assert_eq!(steps.len(), 3, "{steps:#?}\n{warm}");
    let ran: Vec<_> = steps.iter().filter(|(_, end)| *end != "CACHED").collect();
    assert!(ran.is_empty(), "steps not CACHED: {ran:#?}\n{warm}");
    assert_eq!(
        image_content(&image.tag),
        image.content,
        "the cached rebuild is a different image"
    );

    let status = settle(&client, &server).await;
    let (apparent, allocated) = disk_usage(server.data_dir());
    assert!(
        apparent < QUOTA && allocated < QUOTA,
        "{apparent} bytes ({allocated} allocated) on disk\n{status:#}"
    );
    eprintln!("done in {:?}", started.elapsed());
}

// ---- a full disk ----

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` on `dir` (as root); when it cannot, skip (`None`), or fail
    /// when real clients are required.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let mounted = Tmpfs::try_mount(dir, size);
        if let Err(why) = &mounted {
            assert!(!required(), "{why} (required: CI=true)");
            eprintln!("SKIPPED: {why}");
        }
        mounted.ok()
    }

    fn try_mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let uid = common::run_ok(Command::new("id").arg("-u"));
        if uid.trim() != "0" {
            return Err(format!("mounting a tmpfs needs root (uid {})", uid.trim()));
        }
        std::fs::create_dir_all(dir).unwrap();
        let (ok, out) = common::run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        );
        if ok {
            Ok(Tmpfs {
                dir: dir.to_owned(),
            })
        } else {
            Err(format!("mount -t tmpfs failed: {out}"))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let (ok, out) = common::run(Command::new("umount").arg(&self.dir));
        if !ok {
            eprintln!("umount {}: {out}; detaching it", self.dir.display());
            common::run(Command::new("umount").arg("-l").arg(&self.dir));
        }
    }
}

/// Bytes in upload staging files.
fn staged_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn staged_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn disk_full_upload_fails_cleanly_then_eviction_makes_room() {
    const FS: u64 = 64 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("fs"), "64m") else {
        return;
    };
    let data_dir = mount.dir.join("data");
    // The quota is bigger than the filesystem and keeps nothing free: the filesystem's
    // size is what limits the store.
    let server = common::Server::start_on_with_env(
        &data_dir,
        "127.0.0.1:0",
        &[
            ("LAYERCACHE_STORE__EVICTION__MAX_SIZE", "1GiB"),
            ("LAYERCACHE_STORE__EVICTION__MIN_FREE", "0"),
            ("LAYERCACHE_STORE__EVICTION__HIGH_WATERMARK", "90%"),
            ("LAYERCACHE_STORE__EVICTION__LOW_WATERMARK", "80%"),
            ("LAYERCACHE_STORE__EVICTION__GRACE", "1s"),
            ("LAYERCACHE_STORE__EVICTION__IN_USE", "1s"),
            ("LAYERCACHE_STORE__EVICTION__PUSH_WINDOW", "1s"),
            ("LAYERCACHE_STORE__EVICTION__UPLOAD_EXPIRY", "3s"),
            ("LAYERCACHE_STORE__EVICTION__INTERVAL", "1s"),
        ],
    );
    let client = reqwest::Client::new();
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    let limit = field(&status, &["quota", "limit"]);
    assert!(
        limit <= FS && limit > FS - 4 * MIB,
        "the quota is not the filesystem's size: {status:#}"
    );

    // Three images that fit, used one after another.
    let mut kept = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        kept.push(
            push_image(
                &client,
                &server,
                &format!("full/{name}"),
                random_bytes(i as u64, 12 * MIB),
            )
            .await,
        );
        tokio::time::sleep(TICK).await;
    }
    let status = settle(&client, &server).await;
    for image in &kept {
        assert_intact(&client, &server, image).await;
    }

    // A blob bigger than what is left: 507 INSUFFICIENT_STORAGE, not a 500 or a hang,
    // and its bytes are given back at once.
    let free = field(&status, &["quota", "limit"]) - field(&status, &["usage", "total"]);
    let big = random_bytes(100, free + 8 * MIB);
    eprintln!("{free} bytes free; uploading {}", big.len());
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        upload(&client, &server, "full/big", big.clone()),
    )
    .await
    .expect("the upload that fills the disk hangs");
    let code = r.status();
    let body = r.bytes().await.unwrap();
    assert_eq!(code, 507, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&body), "INSUFFICIENT_STORAGE");
    assert_eq!(staged_bytes(&data_dir), 0, "{:?}", staged_files(&data_dir));

    // The same through an upload session: the chunk fails, the session stays at 0.
    let r = client
        .post(server.at("/v2/full/big/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let session = r.headers()["docker-upload-uuid"]
        .to_str()
        .unwrap()
        .to_owned();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        client
            .patch(server.at(&location))
            .header("content-type", "application/octet-stream")
            .body(big.clone())
            .send(),
    )
    .await
    .expect("the chunk that fills the disk hangs")
    .unwrap_or_else(|e| panic!("PATCH of {} bytes: {e:?}", big.len()));
    let code = r.status();
    let body = r.bytes().await.unwrap();
    assert_eq!(code, 507, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_code(&body), "INSUFFICIENT_STORAGE");
    assert_eq!(staged_bytes(&data_dir), 0, "{:?}", staged_files(&data_dir));
    let r = client.get(server.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 204, "the session of the failed chunk");

    // What was stored before reads back intact, and small pushes still work.
    for image in &kept {
        assert_intact(&client, &server, image).await;
    }
    common::assert_blob_files_match_their_names(&data_dir);
    let small = push_image(&client, &server, "full/small", random_bytes(3, MIB)).await;
    assert_intact(&client, &server, &small).await;
    tokio::time::sleep(TICK).await;

    // Nobody deletes anything: the full disk started a pass that makes room, least
    // recently used first, so retrying the big upload soon succeeds. Until it does,
    // each attempt answers 507 again (and asks for more room).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = upload(&client, &server, "full/big", big.clone()).await;
        let code = r.status();
        if code == 201 {
            break;
        }
        let body = r.bytes().await.unwrap();
        assert_eq!(code, 507, "{}", String::from_utf8_lossy(&body));
        assert!(
            Instant::now() < deadline,
            "eviction never made room for the upload: {:#}",
            get_json(&client, &server.at("/api/v1/gc")).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_gone(&client, &server, &kept[0]).await;
    let big = push_image(&client, &server, "full/big", big).await;
    assert_intact(&client, &server, &big).await;
    tokio::time::sleep(TICK).await;

    // Pushes keep succeeding far past the filesystem's size: eviction makes room, least
    // recently used first (b, c, small and big are all gone by the end).
    let mut newer = Vec::new();
    for i in 0..12 {
        let image = push_image(
            &client,
            &server,
            &format!("full/new{i}"),
            random_bytes(200 + i, 4 * MIB),
        )
        .await;
        let status = settle(&client, &server).await;
        assert!(
            field(&status, &["usage", "total"]) <= field(&status, &["quota", "high"]),
            "{status:#}"
        );
        newer.push(image);
        tokio::time::sleep(TICK).await;
    }
    for image in [&kept[1], &kept[2], &small, &big] {
        assert_gone(&client, &server, image).await;
    }
    for image in &newer[newer.len() - 3..] {
        assert_intact(&client, &server, image).await;
    }
    common::assert_blob_files_match_their_names(&data_dir);

    // The failed session's staging file expires with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !staged_files(&data_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "staging files stay: {:?} (the failed session was {session})",
            staged_files(&data_dir)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = client.get(server.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), 404, "the failed session outlived its expiry");
    drop(server);
}

/// `(size, available)` bytes of the filesystem holding `dir`, as `df` reports them.
fn df(dir: &Path) -> (u64, u64) {
    let out = common::run_ok(
        Command::new("df")
            .args(["-B1", "--output=size,avail"])
            .arg(dir),
    );
    let figures: Vec<u64> = out
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("df: {out}"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    (figures[0], figures[1])
}

#[tokio::test]
async fn a_filesystem_others_fill_squeezes_the_quota_and_the_server_says_so() {
    const WARNING: &str = "evicting to keep min_free free";
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("fs"), "64m") else {
        return;
    };
    // Another tenant of the filesystem takes half of it.
    std::fs::write(mount.dir.join("others.bin"), vec![1u8; 32 << 20]).unwrap();
    let data_dir = mount.dir.join("data");
    let server = common::Server::start_logged_on(&data_dir, &[]);
    let client = reqwest::Client::new();

    // The quota: max_size is 60 % of the filesystem, but what is free beside the store,
    // less min_free (10 %), is less.
    let status = get_json(&client, &server.at("/api/v1/gc")).await;
    let (size, available) = df(&mount.dir);
    let quota = |name| field(&status, &["quota", name]);
    assert_eq!(quota("max_size"), size * 6 / 10, "{status:#}");
    assert_eq!(quota("min_free"), size / 10, "{status:#}");
    let expected = field(&status, &["usage", "total"]) + available - size / 10;
    assert!(
        quota("limit").abs_diff(expected) < MIB && quota("limit") < quota("max_size"),
        "df: {size} bytes, {available} available; expected a limit of {expected}: {status:#}"
    );
    assert!(!server.log().contains(WARNING), "{}", server.log());

    // Pushes past the high watermark: a pass evicts the least recently used, because of
    // the free space alone (max_size would hold them all). The evicted images' blobs
    // stay for the push window, counted as gone already.
    let mut pushed = 0u64;
    let status = loop {
        push_image(
            &client,
            &server,
            &format!("squeezed/i{pushed}"),
            random_bytes(300 + pushed, 3 * MIB),
        )
        .await;
        pushed += 1;
        tokio::time::sleep(TICK).await;
        let status = get_json(&client, &server.at("/api/v1/gc")).await;
        if field(&status, &["usage", "released_bytes"]) > 0 {
            break status;
        }
        assert!(pushed < 9, "no pass evicted: {status:#}");
    };
    assert!(pushed * 3 * MIB < quota("max_size"), "{status:#}");
    let manifest = |i: u64| server.at(&format!("/v2/squeezed/i{i}/manifests/v1"));
    let oldest = client.head(manifest(0)).send().await.unwrap();
    assert_eq!(oldest.status(), 404, "the least recently used image stays");
    let newest = client.head(manifest(pushed - 1)).send().await.unwrap();
    assert_eq!(newest.status(), 200, "the newest image is gone");
    let log = server.log();
    assert_eq!(log.matches(WARNING).count(), 1, "{log}");

    // So do the metrics.
    let metrics = get_text(&client, &server.at("/metrics")).await;
    let gauge = |name| sample(&metrics, name).unwrap_or_else(|| panic!("no {name}:\n{metrics}"));
    assert_eq!(
        gauge("layercache_quota_max_size_bytes"),
        quota("max_size") as f64
    );
    assert!(gauge("layercache_quota_bytes") < gauge("layercache_quota_max_size_bytes"));

    // `layercache gc` says what sets the quota.
    let out = common::layercache(&["gc", "--dry-run", "--server", &server.url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("the filesystem's free space sets the quota: max_size allows"),
        "{text}"
    );
    drop(server);
}
