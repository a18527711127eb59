//! The PostgreSQL metadata store against a real server, with several connection pools
//! standing for several nodes: the schema is migrated once however many nodes start at
//! once; registry metadata reads back as written; a write that loses a serialization
//! conflict is retried, so a manifest never commits referencing a blob a concurrent
//! sweep forgot; blob locks and the leader lock exclude across nodes and are released
//! when dropped; an outage is `Unavailable`, and the store recovers when the server
//! is back.
//!
//! Each test gets a database of its own on the process's shared server, except the
//! outage test, which stops and restarts a server of its own.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use oci::{CacheRecords, Digest, ManifestReference, RefKind, Reference, RepoName, Tag};
use store::config::Postgres;
use store::meta::{ManifestRecord, MetaStore, PgMeta, SessionFilter, Touch};
use store::{Error, SessionRecord, UploadId};
use testsupport::postgres::{PostgresServer, require};

/// Config for database `url`, with a small pool like a node's.
fn config(url: &str) -> Postgres {
    Postgres {
        url: url.to_owned(),
        password_file: None,
        max_connections: 4,
    }
}

/// A store on a fresh database of the shared server, with its URL; `None` when
/// PostgreSQL is missing and not required.
async fn fresh() -> Option<(PgMeta, String)> {
    let url = require()?.create_database();
    Some((PgMeta::connect(&config(&url)).await.unwrap(), url))
}

fn repo(name: &str) -> RepoName {
    name.parse().unwrap()
}

fn tag(name: &str) -> Tag {
    name.parse().unwrap()
}

/// A manifest with `content` referencing `blobs` (digest and size), all required.
fn manifest(content: &str, blobs: &[(&Digest, u64)]) -> ManifestRecord {
    ManifestRecord {
        digest: Digest::sha256_of(content.as_bytes()),
        media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
        artifact_type: None,
        subject: None,
        annotations: BTreeMap::new(),
        content: Bytes::copy_from_slice(content.as_bytes()),
        references: blobs
            .iter()
            .map(|(digest, size)| ManifestReference {
                digest: (*digest).clone(),
                kind: RefKind::Blob,
                required: true,
                size: *size,
            })
            .collect(),
        cache: CacheRecords::Without,
    }
}

/// Advisory locks held in the database at `url`, by anyone.
async fn advisory_locks(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

/// Wait (a few seconds at most) until `url` holds no advisory lock.
async fn until_no_advisory_locks(url: &str) {
    for _ in 0..100 {
        if advisory_locks(url).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("advisory locks still held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_starting_at_once_migrate_the_schema_once() {
    let Some(server) = require() else { return };
    let url = server.create_database();
    let config = config(&url);
    let (a, b, c) = tokio::join!(
        PgMeta::connect(&config),
        PgMeta::connect(&config),
        PgMeta::connect(&config),
    );
    let (a, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    // And a restart finds it migrated.
    let again = PgMeta::connect(&config).await.unwrap();
    let name = url.rsplit('/').next().unwrap();
    let applied = server
        .psql(name, "SELECT count(*) FROM _sqlx_migrations WHERE success")
        .unwrap();
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(
        applied.trim(),
        migrations.to_string(),
        "each migration once"
    );
    let blob = Digest::sha256_of(b"layer");
    a.link_blob(&repo("one/app"), &blob, 5).await.unwrap();
    assert_eq!(again.known_blob(&blob).await.unwrap(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_or_password_file_is_a_configuration_error() {
    let bad_url = PgMeta::connect(&config("not a url")).await;
    assert!(
        matches!(bad_url, Err(Error::Config(_))),
        "{:?}",
        bad_url.err()
    );
    let Some(server) = require() else { return };
    let mut missing_file = config(&server.create_database());
    missing_file.password_file = Some("/nonexistent/password".into());
    let result = PgMeta::connect(&missing_file).await;
    assert!(
        matches!(result, Err(Error::Config(_))),
        "{:?}",
        result.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_tags_and_referrers_read_back_as_written() {
    let Some((meta, _)) = fresh().await else {
        return;
    };
    let app = repo("octo/app");
    let (layer, config_blob) = (Digest::sha256_of(b"layer"), Digest::sha256_of(b"config"));
    meta.link_blob(&app, &layer, 5).await.unwrap();
    assert_eq!(meta.linked_blob(&app, &layer).await.unwrap(), Some(5));
    assert_eq!(
        meta.linked_blob(&repo("other/app"), &layer).await.unwrap(),
        None
    );

    // A reference the repository lacks, then one with the wrong size, are refused
    // and record nothing.
    let image = manifest("image", &[(&layer, 5), (&config_blob, 6)]);
    let missing = meta
        .put_manifest(&app, image.clone(), Some(&tag("v1")))
        .await;
    assert!(
        matches!(&missing, Err(Error::ManifestBlobUnknown { digest, kind: "blob" }) if *digest == config_blob),
        "{missing:?}"
    );
    meta.link_blob(&app, &config_blob, 6).await.unwrap();
    let wrong = manifest("wrong", &[(&layer, 4)]);
    let mismatch = meta.put_manifest(&app, wrong, None).await;
    assert!(
        matches!(
            mismatch,
            Err(Error::ManifestSizeMismatch {
                declared: 4,
                stored: 5,
                ..
            })
        ),
        "{mismatch:?}"
    );
    // Blobs and no manifest: no tags to list.
    assert_eq!(meta.tags(&app, 10, None).await.unwrap(), None);
    assert!(meta.has_repository(&app).await.unwrap());

    meta.put_manifest(&app, image.clone(), Some(&tag("v1")))
        .await
        .unwrap();
    // Pushed again (idempotent), under more tags; byte order, not the locale's.
    for name in ["b", "B", "a-1", "Z"] {
        meta.put_manifest(&app, image.clone(), Some(&tag(name)))
            .await
            .unwrap();
    }
    let by_tag = meta
        .get_manifest(&app, &Reference::Tag(tag("v1")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_tag.digest, image.digest);
    assert_eq!(by_tag.content, image.content);
    assert_eq!(by_tag.cache, Some(CacheRecords::Without));
    let by_digest = meta
        .get_manifest(&app, &Reference::Digest(image.digest.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_digest.media_type, image.media_type);

    let first = meta.tags(&app, 2, None).await.unwrap().unwrap();
    assert_eq!(
        (first.items.as_slice(), first.more),
        (&["B".to_owned(), "Z".to_owned()][..], true)
    );
    let rest = meta.tags(&app, 10, Some("Z")).await.unwrap().unwrap();
    assert_eq!(
        (rest.items.as_slice(), rest.more),
        (
            &["a-1".to_owned(), "b".to_owned(), "v1".to_owned()][..],
            false
        )
    );
    assert_eq!(
        meta.tags(&repo("nobody/here"), 10, None).await.unwrap(),
        None
    );
    let repos = meta.repositories(10, None).await.unwrap();
    assert_eq!(repos.items, ["octo/app"]);

    // Referrers: by subject, optionally by artifact type, oldest first.
    let mut signature = manifest("signature", &[]);
    signature.subject = Some(image.digest.clone());
    signature.artifact_type = Some("application/vnd.example.signature".to_owned());
    signature
        .annotations
        .insert("org.example".into(), "yes".into());
    meta.put_manifest(&app, signature.clone(), None)
        .await
        .unwrap();
    let mut sbom = manifest("sbom", &[]);
    sbom.subject = Some(image.digest.clone());
    sbom.artifact_type = Some("application/spdx+json".to_owned());
    meta.put_manifest(&app, sbom.clone(), None).await.unwrap();
    let all = meta.referrers(&app, &image.digest, None).await.unwrap();
    assert_eq!(all.len(), 2);
    let signed = meta
        .referrers(
            &app,
            &image.digest,
            Some("application/vnd.example.signature"),
        )
        .await
        .unwrap();
    assert_eq!(signed.len(), 1);
    assert_eq!(signed[0].digest, signature.digest);
    assert_eq!(signed[0].size, signature.content.len() as u64);
    assert_eq!(
        signed[0].annotations.get("org.example").map(String::as_str),
        Some("yes")
    );

    assert!(meta.delete_tag(&app, &tag("b")).await.unwrap());
    assert!(!meta.delete_tag(&app, &tag("b")).await.unwrap());
    let references = meta
        .delete_manifest(&app, &image.digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(references.len(), 2);
    assert_eq!(
        meta.delete_manifest(&app, &image.digest).await.unwrap(),
        None
    );
    assert!(
        meta.get_manifest(&app, &Reference::Tag(tag("v1")))
            .await
            .unwrap()
            .is_none()
    );
    assert!(meta.unlink_blob(&app, &layer).await.unwrap());
    assert!(!meta.unlink_blob(&app, &layer).await.unwrap());
    assert_eq!(meta.linked_blob(&app, &layer).await.unwrap(), None);
    assert_eq!(meta.blob_size(&layer).await.unwrap(), Some(5));
    assert_eq!(meta.footprint().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_touches_and_sessions_are_recorded() {
    let Some((meta, url)) = fresh().await else {
        return;
    };
    let app = repo("octo/app");
    let id = UploadId::random();
    meta.create_upload(&id, &app).await.unwrap();
    assert_eq!(meta.upload_repo(&id).await.unwrap(), Some(app.clone()));
    assert_eq!(meta.uploads().await.unwrap().len(), 1);
    meta.remove_upload(&id).await.unwrap();
    assert_eq!(meta.upload_repo(&id).await.unwrap(), None);

    let layer = Digest::sha256_of(b"layer");
    meta.link_blob(&app, &layer, 5).await.unwrap();
    let image = manifest("image", &[(&layer, 5)]);
    meta.put_manifest(&app, image.clone(), Some(&tag("v1")))
        .await
        .unwrap();
    let later = i64::from(u32::MAX);
    meta.touch(vec![
        (Touch::Blob(layer.clone()), later - 1),
        (Touch::Blob(layer.clone()), later),
        (Touch::Manifest(app.clone(), image.digest.clone()), later),
        (Touch::Tag(app.clone(), tag("v1")), later),
        (Touch::Tag(app.clone(), tag("absent")), later),
        // Older than what is recorded: no effect.
        (Touch::Blob(layer.clone()), 1),
    ])
    .await
    .unwrap();
    meta.touch(Vec::new()).await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let accessed: Vec<i64> = sqlx::query_scalar(
        "SELECT accessed_at FROM blobs UNION ALL SELECT accessed_at FROM manifests
         UNION ALL SELECT accessed_at FROM tags",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(accessed, [later, later, later]);
    pool.close().await;

    let session = |id: &str, repos: &[&str], ended_at| SessionRecord {
        id: id.to_owned(),
        name: Some("build".to_owned()),
        repositories: repos.iter().map(|r| (*r).to_owned()).collect(),
        started_at: 100,
        ended_at,
        report: "{}".to_owned(),
    };
    meta.save_session(session("s1", &["octo/app"], 200))
        .await
        .unwrap();
    meta.save_session(session("s1", &["octo/app", "octo/lib"], 300))
        .await
        .unwrap();
    meta.save_session(session("s2", &["octo/application"], 250))
        .await
        .unwrap();
    let all = meta
        .sessions(0, SessionFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert_eq!(all[0].repositories, ["octo/app", "octo/lib"]);
    let filter = SessionFilter {
        repo: Some("octo/app".to_owned()),
        session: None,
    };
    let only = meta.sessions(0, filter, 10).await.unwrap();
    assert_eq!(only.len(), 1, "a repository matches whole names only");
    assert_eq!(meta.prune_sessions(260).await.unwrap(), 1);
    assert_eq!(
        meta.sessions(0, SessionFilter::default(), 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_never_commits_referencing_a_blob_a_concurrent_sweep_forgot() {
    let Some((a, url)) = fresh().await else {
        return;
    };
    let b = PgMeta::connect(&config(&url)).await.unwrap();
    let c = PgMeta::connect(&config(&url)).await.unwrap();
    let app = repo("octo/app");
    let (mut stored, mut forgotten) = (0, 0);
    for round in 0..40 {
        let layer = Digest::sha256_of(format!("layer {round}").as_bytes());
        a.link_blob(&app, &layer, 7).await.unwrap();
        let image = manifest(&format!("image {round}"), &[(&layer, 7)]);
        // Anything unreferenced is sweepable at once.
        let latest = tag("latest");
        let (put, swept, swept_again) = tokio::join!(
            a.put_manifest(&app, image.clone(), Some(&latest)),
            b.forget_blobs(vec![layer.clone()], i64::MAX, i64::MAX),
            c.forget_blobs(vec![layer.clone()], i64::MAX, i64::MAX),
        );
        let swept = swept.unwrap().len() + swept_again.unwrap().len();
        let kept = a
            .get_manifest(&app, &Reference::Digest(image.digest.clone()))
            .await
            .unwrap()
            .is_some();
        match put {
            Ok(()) => {
                assert_eq!(
                    swept, 0,
                    "round {round}: a stored manifest's blob was forgotten"
                );
                assert!(kept);
                assert_eq!(a.linked_blob(&app, &layer).await.unwrap(), Some(7));
                stored += 1;
            }
            Err(Error::ManifestBlobUnknown { .. }) => {
                assert_eq!(swept, 1, "round {round}: forgotten by exactly one sweep");
                assert!(!kept);
                forgotten += 1;
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
    }
    eprintln!("{stored} manifests stored, {forgotten} blobs forgotten first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_of_one_tag_from_three_nodes_all_succeed() {
    let Some((a, url)) = fresh().await else {
        return;
    };
    let nodes = [
        a,
        PgMeta::connect(&config(&url)).await.unwrap(),
        PgMeta::connect(&config(&url)).await.unwrap(),
    ];
    let app = repo("octo/new");
    let writes = nodes.iter().enumerate().flat_map(|(n, node)| {
        let app = app.clone();
        (0..10).map(move |i| {
            let app = app.clone();
            async move {
                let image = manifest(&format!("image {n} {i}"), &[]);
                node.put_manifest(&app, image, Some(&tag("latest"))).await
            }
        })
    });
    for result in futures::future::join_all(writes).await {
        result.unwrap();
    }
    let tags = nodes[0].tags(&app, 10, None).await.unwrap().unwrap();
    assert_eq!(tags.items, ["latest"]);
    assert_eq!(
        nodes[1].repositories(10, None).await.unwrap().items,
        ["octo/new"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_locks_exclude_across_nodes_until_dropped() {
    let Some((a, url)) = fresh().await else {
        return;
    };
    let b = PgMeta::connect(&config(&url)).await.unwrap();
    let (one, two, three) = (
        Digest::sha256_of(b"one"),
        Digest::sha256_of(b"two"),
        Digest::sha256_of(b"three"),
    );
    let held = a
        .lock_blobs(&[two.clone(), one.clone(), two.clone()])
        .await
        .unwrap()
        .expect("a lock across nodes");
    // Other digests are free.
    drop(b.lock_blobs(std::slice::from_ref(&three)).await.unwrap());
    let contended = one.clone();
    let waiting = tokio::spawn(async move {
        let lock = b.lock_blobs(&[three, contended]).await.unwrap();
        (b, lock)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a second node locked a held blob");
    drop(held);
    let (b, lock) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the lock was released")
        .unwrap();
    drop(lock);
    until_no_advisory_locks(&url).await;
    // Nothing is left on the pool's connections either: the lock is free again.
    let again = a.lock_blobs(std::slice::from_ref(&one)).await.unwrap();
    drop(again);
    drop(b);
    assert!(a.lock_blobs(&[]).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_request_abandoned_while_waiting_leaves_nothing_held() {
    let Some((a, url)) = fresh().await else {
        return;
    };
    let b = PgMeta::connect(&config(&url)).await.unwrap();
    let blob = Digest::sha256_of(b"contended");
    let held = a.lock_blobs(std::slice::from_ref(&blob)).await.unwrap();
    let wanted = [blob.clone()];
    let abandoned = tokio::time::timeout(Duration::from_millis(300), b.lock_blobs(&wanted));
    assert!(abandoned.await.is_err(), "the lock was not held");
    drop(held);
    until_no_advisory_locks(&url).await;
    let lock = tokio::time::timeout(Duration::from_secs(10), b.lock_blobs(&[blob]))
        .await
        .expect("the blob stays lockable")
        .unwrap();
    drop(lock);
    until_no_advisory_locks(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_leads_at_a_time_until_its_lock_is_dropped() {
    let Some((a, url)) = fresh().await else {
        return;
    };
    let b = PgMeta::connect(&config(&url)).await.unwrap();
    let lead = a.lead(false).await.unwrap().expect("a leads");
    assert!(b.lead(false).await.unwrap().is_none());
    assert!(
        a.lead(false).await.unwrap().is_none(),
        "one lead per database"
    );
    let waiting = tokio::spawn(async move { b.lead(true).await.unwrap().map(|lock| (b, lock)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    drop(lead);
    let (_b, lock) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the lead was released")
        .unwrap()
        .expect("b leads");
    assert!(a.lead(false).await.unwrap().is_none());
    drop(lock);
    until_no_advisory_locks(&url).await;
    assert!(a.lead(false).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_and_the_store_recovers_once_the_server_is_back() {
    if require().is_none() {
        return;
    }
    let server = PostgresServer::start_new().unwrap();
    let url = server.create_database();
    let meta = PgMeta::connect(&config(&url)).await.unwrap();
    let app = repo("octo/app");
    let layer = Digest::sha256_of(b"layer");
    meta.link_blob(&app, &layer, 5).await.unwrap();
    let lead = meta.lead(false).await.unwrap().unwrap();

    server.stop();
    let read = meta.linked_blob(&app, &layer).await;
    assert!(matches!(read, Err(Error::Unavailable(_))), "{read:?}");
    let write = meta.link_blob(&app, &layer, 5).await;
    assert!(matches!(write, Err(Error::Unavailable(_))), "{write:?}");
    let lock = meta.lock_blobs(std::slice::from_ref(&layer)).await;
    assert!(
        matches!(lock, Err(Error::Unavailable(_))),
        "{:?}",
        lock.map(|_| ())
    );
    // Its session is gone: dropping the lead must not hang or fail.
    drop(lead);
    let connect = PgMeta::connect(&config(&url)).await;
    assert!(
        matches!(connect, Err(Error::Unavailable(_))),
        "{:?}",
        connect.map(|_| ())
    );

    server.start();
    assert_eq!(meta.linked_blob(&app, &layer).await.unwrap(), Some(5));
    meta.link_blob(&app, &repo_blob(), 3).await.unwrap();
    // The lead went with the server's sessions.
    assert!(meta.lead(false).await.unwrap().is_some());
}

fn repo_blob() -> Digest {
    Digest::sha256_of(b"after the outage")
}
