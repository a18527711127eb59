//! OCI distribution conformance, category "Content Discovery": tag listing with `n` and
//! `last` and the `Link` header, the catalog, and the referrers API (`subject`,
//! `OCI-Subject`, `artifactType` filtering with `OCI-Filters-Applied`).
//! Written from the spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#content-discovery>.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod conformance_support;

use common::{Server, digest_of};
use conformance_support::*;
use reqwest::Method;
use serde_json::{Value, json};

const TAGS: [&str; 7] = ["b", "A1", "z-9", "a", "_x", "v1.0", "c"];

/// Push one image and point every tag of `tags` at it.
async fn tagged_repo(api: &Api, repo: &str, tags: &[&str]) -> Image {
    let image = api.push_image(repo, tags[0], 40).await;
    for tag in &tags[1..] {
        api.push_manifest(repo, tag, OCI_MANIFEST, &image.manifest)
            .await;
    }
    image
}

/// `GET path`: the JSON body and the `Link` target, if any.
async fn page(api: &Api, path: &str) -> (Value, Option<String>) {
    let resp = api.get(path).await;
    let link = maybe_header(&resp, "link");
    let body = json_ok(resp).await;
    let next = link.map(|l| {
        let (target, rel) = l.split_once(';').unwrap();
        assert_eq!(rel.trim(), "rel=\"next\"", "{l}");
        target
            .trim()
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or_else(|| panic!("Link target not in <>: {l}"))
            .to_owned()
    });
    (body, next)
}

fn sorted(tags: &[&str]) -> Vec<String> {
    let mut tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
    tags.sort();
    tags
}

#[tokio::test]
async fn tags_list_returns_every_tag_in_lexical_order() {
    let server = Server::start();
    let api = Api::new(&server);
    tagged_repo(&api, "disc/tags", &TAGS).await;
    let (body, link) = page(&api, "/v2/disc/tags/tags/list").await;
    assert_eq!(body, json!({ "name": "disc/tags", "tags": sorted(&TAGS) }));
    assert_eq!(link, None);
}

#[tokio::test]
async fn tags_list_pages_with_n_and_a_link_header_to_the_next_page() {
    let server = Server::start();
    let api = Api::new(&server);
    tagged_repo(&api, "disc/paged", &TAGS).await;
    let all = sorted(&TAGS);

    let mut seen = Vec::new();
    let mut next = Some("/v2/disc/paged/tags/list?n=2".to_owned());
    let mut pages = 0;
    while let Some(path) = next {
        let (body, link) = page(&api, &path).await;
        let tags: Vec<String> = serde_json::from_value(body["tags"].clone()).unwrap();
        assert_eq!(body["name"], "disc/paged");
        seen.extend(tags.clone());
        if let Some(link) = &link {
            assert_eq!(tags.len(), 2, "a full page before a Link");
            assert_eq!(
                link,
                &format!("/v2/disc/paged/tags/list?n=2&last={}", tags[1])
            );
        }
        next = link;
        pages += 1;
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, all);

    // Exactly all, or more than all: one page, no Link.
    for n in [7, 8, 1000] {
        let (body, link) = page(&api, &format!("/v2/disc/paged/tags/list?n={n}")).await;
        assert_eq!(body["tags"], json!(all), "n={n}");
        assert_eq!(link, None, "n={n}");
    }
    let (body, link) = page(&api, "/v2/disc/paged/tags/list?n=6").await;
    assert_eq!(body["tags"], json!(all[..6]));
    assert_eq!(
        link.as_deref(),
        Some(format!("/v2/disc/paged/tags/list?n=6&last={}", all[5]).as_str())
    );
}

#[tokio::test]
async fn tags_list_with_last_starts_after_that_tag() {
    let server = Server::start();
    let api = Api::new(&server);
    tagged_repo(&api, "disc/last", &TAGS).await;
    let all = sorted(&TAGS);
    let (body, link) = page(&api, "/v2/disc/last/tags/list?last=b").await;
    assert_eq!(body["tags"], json!(["c", "v1.0", "z-9"]));
    assert_eq!(link, None);
    let (body, _) = page(&api, "/v2/disc/last/tags/list?n=2&last=a").await;
    assert_eq!(body["tags"], json!(["b", "c"]));
    // `last` need not be a tag that exists.
    let (body, _) = page(&api, "/v2/disc/last/tags/list?last=bb").await;
    assert_eq!(body["tags"], json!(["c", "v1.0", "z-9"]));
    let (body, _) = page(&api, "/v2/disc/last/tags/list?last=0").await;
    assert_eq!(body["tags"], json!(all));
    let (body, link) = page(&api, "/v2/disc/last/tags/list?last=z-9").await;
    assert_eq!(body["tags"], json!([]));
    assert_eq!(link, None);
}

#[tokio::test]
async fn tags_list_with_n_zero_is_an_empty_list_without_link() {
    let server = Server::start();
    let api = Api::new(&server);
    tagged_repo(&api, "disc/zero", &TAGS).await;
    for path in [
        "/v2/disc/zero/tags/list?n=0",
        "/v2/disc/zero/tags/list?n=0&last=a",
    ] {
        let (body, link) = page(&api, path).await;
        assert_eq!(body, json!({ "name": "disc/zero", "tags": [] }), "{path}");
        assert_eq!(link, None, "{path}");
    }
}

#[tokio::test]
async fn tags_list_with_a_non_numeric_n_is_400() {
    let server = Server::start();
    let api = Api::new(&server);
    tagged_repo(&api, "disc/badn", &["v1"]).await;
    for n in ["x", "-1", "1.5", "1e3"] {
        let resp = api.get(&format!("/v2/disc/badn/tags/list?n={n}")).await;
        expect_error(resp, 400, "PAGINATION_NUMBER_INVALID").await;
    }
}

#[tokio::test]
async fn tags_list_of_an_unknown_repository_is_404_name_unknown() {
    let server = Server::start();
    let api = Api::new(&server);
    tagged_repo(&api, "disc/known", &["v1"]).await;
    for repo in ["disc/unknown", "disc", "disc/known/deeper"] {
        let resp = api.get(&format!("/v2/{repo}/tags/list")).await;
        expect_error(resp, 404, "NAME_UNKNOWN").await;
    }
}

/// A repository's tags can be listed once it holds a manifest, tagged or not, and exactly
/// while the catalog lists it. One that holds nothing, an upload or only blobs is
/// `NAME_UNKNOWN`, as distribution answers (zot lists no tags for those it has seen).
#[tokio::test]
async fn tags_list_is_name_unknown_until_the_repository_holds_a_manifest() {
    let server = Server::start();
    let api = Api::new(&server);
    api.start_upload("disc/uploading").await;
    api.push_blob("disc/blobs", b"a layer and no manifest")
        .await;
    let config = descriptor(OCI_CONFIG, b"{\"os\":\"linux\"}");
    api.push_blob("disc/by-digest", &config.bytes).await;
    let manifest = image_manifest(OCI_MANIFEST, &config, &[], None);
    api.push_manifest(
        "disc/by-digest",
        &digest_of(&manifest),
        OCI_MANIFEST,
        &manifest,
    )
    .await;
    api.push_image("disc/untagged", "v1", 44).await;
    expect_status(&api.delete("/v2/disc/untagged/manifests/v1").await, 202);
    let emptied = api.push_image("disc/emptied", "v1", 45).await;
    let path = format!("/v2/disc/emptied/manifests/{}", emptied.digest);
    expect_status(&api.delete(&path).await, 202);

    for repo in ["disc/never", "disc/uploading", "disc/blobs", "disc/emptied"] {
        let resp = api.get(&format!("/v2/{repo}/tags/list")).await;
        expect_error(resp, 404, "NAME_UNKNOWN").await;
    }
    for repo in ["disc/by-digest", "disc/untagged"] {
        let (body, link) = page(&api, &format!("/v2/{repo}/tags/list")).await;
        assert_eq!(body, json!({ "name": repo, "tags": [] }), "{repo}");
        assert_eq!(link, None, "{repo}");
    }
    let (catalog, _) = page(&api, "/v2/_catalog").await;
    assert_eq!(
        catalog["repositories"],
        json!(["disc/by-digest", "disc/untagged"])
    );
}

#[tokio::test]
async fn catalog_lists_repositories_in_order_with_paging() {
    let server = Server::start();
    let api = Api::new(&server);
    let repos = ["b/one", "a/two", "c", "a/one", "a/one/nested"];
    for repo in repos {
        api.push_image(repo, "v1", 41).await;
    }
    let mut all: Vec<&str> = repos.to_vec();
    all.sort();
    let (body, link) = page(&api, "/v2/_catalog").await;
    assert_eq!(body, json!({ "repositories": all }));
    assert_eq!(link, None);

    let mut seen: Vec<String> = Vec::new();
    let mut next = Some("/v2/_catalog?n=2".to_owned());
    while let Some(path) = next {
        let (body, link) = page(&api, &path).await;
        let names: Vec<String> = serde_json::from_value(body["repositories"].clone()).unwrap();
        if let Some(link) = &link {
            assert_eq!(link, &format!("/v2/_catalog?n=2&last={}", names[1]));
        }
        seen.extend(names);
        next = link;
    }
    assert_eq!(seen, all);
    let (body, link) = page(&api, "/v2/_catalog?n=0").await;
    assert_eq!(body, json!({ "repositories": [] }));
    assert_eq!(link, None);
}

/// A referrer artifact: an OCI manifest with `subject`, optionally an `artifactType`.
struct Referrer {
    body: Vec<u8>,
    digest: String,
    /// What the referrers API must report as its `artifactType`.
    reported_type: Option<String>,
    annotations: Value,
    media_type: &'static str,
}

async fn push_referrer_manifest(
    api: &Api,
    repo: &str,
    subject: &Value,
    artifact_type: Option<&str>,
    config_type: &str,
    kind: &str,
) -> Referrer {
    let config_bytes: &[u8] = if config_type == OCI_EMPTY {
        b"{}"
    } else {
        b"{\"signed\":true}"
    };
    let config = descriptor(config_type, config_bytes);
    let layer = descriptor("application/vnd.example.data", kind.as_bytes());
    api.push_blob(repo, &config.bytes).await;
    api.push_blob(repo, &layer.bytes).await;
    let annotations = json!({ "org.example.kind": kind });
    let mut extra = json!({ "subject": subject, "annotations": annotations });
    if let Some(t) = artifact_type {
        extra["artifactType"] = json!(t);
    }
    let body = image_manifest(OCI_MANIFEST, &config, &[layer], Some(extra));
    let digest = digest_of(&body);
    let resp = api.put_manifest(repo, &digest, OCI_MANIFEST, &body).await;
    expect_status(&resp, 201);
    assert_eq!(
        header(&resp, "oci-subject"),
        subject["digest"].as_str().unwrap()
    );
    Referrer {
        body,
        digest,
        reported_type: Some(artifact_type.unwrap_or(config_type).to_owned()),
        annotations,
        media_type: OCI_MANIFEST,
    }
}

async fn push_referrer_index(
    api: &Api,
    repo: &str,
    subject: &Value,
    artifact_type: Option<&str>,
    kind: &str,
) -> Referrer {
    let annotations = json!({ "org.example.kind": kind });
    let mut extra = json!({ "subject": subject, "annotations": annotations });
    if let Some(t) = artifact_type {
        extra["artifactType"] = json!(t);
    }
    let body = index(OCI_INDEX, &[], Some(extra));
    let digest = digest_of(&body);
    let resp = api.put_manifest(repo, kind, OCI_INDEX, &body).await;
    expect_status(&resp, 201);
    assert_eq!(
        header(&resp, "oci-subject"),
        subject["digest"].as_str().unwrap()
    );
    Referrer {
        body,
        digest,
        reported_type: artifact_type.map(str::to_owned),
        annotations,
        media_type: OCI_INDEX,
    }
}

/// The descriptor the referrers API must list for `r`.
fn expected_descriptor(r: &Referrer) -> Value {
    let mut d = json!({
        "mediaType": r.media_type,
        "digest": r.digest,
        "size": r.body.len(),
        "annotations": r.annotations,
    });
    if let Some(t) = &r.reported_type {
        d["artifactType"] = json!(t);
    }
    d
}

/// `GET /v2/<repo>/referrers/<subject>[?artifactType=]`: the index and whether the
/// filter was reported applied.
async fn referrers(api: &Api, repo: &str, subject: &str, filter: Option<&str>) -> (Value, bool) {
    let mut req = api.request(Method::GET, &format!("/v2/{repo}/referrers/{subject}"));
    if let Some(t) = filter {
        req = req.query(&[("artifactType", t)]);
    }
    let resp = req.send().await.unwrap();
    expect_status(&resp, 200);
    assert_eq!(header(&resp, "content-type"), OCI_INDEX);
    let applied = match maybe_header(&resp, "oci-filters-applied") {
        Some(v) => {
            assert_eq!(v, "artifactType");
            true
        }
        None => false,
    };
    let index: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    (index, applied)
}

fn by_digest(manifests: &Value) -> Vec<Value> {
    let mut list = manifests.as_array().unwrap().clone();
    list.sort_by_key(|d| d["digest"].as_str().unwrap().to_owned());
    list
}

fn expected_list(refs: &[&Referrer]) -> Vec<Value> {
    let mut list: Vec<Value> = refs.iter().map(|r| expected_descriptor(r)).collect();
    list.sort_by_key(|d| d["digest"].as_str().unwrap().to_owned());
    list
}

#[tokio::test]
async fn referrers_lists_every_manifest_with_that_subject_as_an_oci_index() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "disc/refs";
    let image = api.push_image(repo, "v1", 42).await;
    let subject = manifest_descriptor(OCI_MANIFEST, &image.manifest);

    let sbom = push_referrer_manifest(
        &api,
        repo,
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "sbom",
    )
    .await;
    // No artifactType: the config's media type stands in for it.
    let signature = push_referrer_manifest(
        &api,
        repo,
        &subject,
        None,
        "application/vnd.example.signature.config.v1+json",
        "signature",
    )
    .await;
    // An index referrer without artifactType reports none; with one, reports it.
    let bundle = push_referrer_index(&api, repo, &subject, None, "bundle").await;
    let typed_bundle = push_referrer_index(
        &api,
        repo,
        &subject,
        Some("application/vnd.example.bundle.v1"),
        "typed-bundle",
    )
    .await;
    // Same subject in another repository: not listed here.
    let other = api.push_image("disc/other", "v1", 42).await;
    assert_eq!(other.digest, image.digest);
    push_referrer_manifest(
        &api,
        "disc/other",
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "foreign",
    )
    .await;

    let (index, applied) = referrers(&api, repo, &image.digest, None).await;
    assert!(!applied);
    assert_eq!(
        by_digest(&index["manifests"]),
        expected_list(&[&sbom, &signature, &bundle, &typed_bundle])
    );
    // The listed digests are pullable manifests.
    for r in [&sbom, &signature, &bundle, &typed_bundle] {
        let got = api.get(&format!("/v2/{repo}/manifests/{}", r.digest)).await;
        expect_status(&got, 200);
        assert_eq!(got.bytes().await.unwrap().to_vec(), r.body);
    }
}

#[tokio::test]
async fn referrers_filter_by_artifact_type_reports_oci_filters_applied() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "disc/filter";
    let image = api.push_image(repo, "v1", 43).await;
    let subject = manifest_descriptor(OCI_MANIFEST, &image.manifest);
    let sbom_a = push_referrer_manifest(
        &api,
        repo,
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "sbom-a",
    )
    .await;
    let sbom_b = push_referrer_manifest(
        &api,
        repo,
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "sbom-b",
    )
    .await;
    let signature = push_referrer_manifest(
        &api,
        repo,
        &subject,
        None,
        "application/vnd.example.signature.config.v1+json",
        "signature",
    )
    .await;

    let (index, applied) = referrers(
        &api,
        repo,
        &image.digest,
        Some("application/vnd.example.sbom.v1"),
    )
    .await;
    assert!(applied);
    assert_eq!(
        by_digest(&index["manifests"]),
        expected_list(&[&sbom_a, &sbom_b])
    );
    // The config-derived type filters too (and its `+` survives query encoding).
    let (index, applied) = referrers(
        &api,
        repo,
        &image.digest,
        Some("application/vnd.example.signature.config.v1+json"),
    )
    .await;
    assert!(applied);
    assert_eq!(by_digest(&index["manifests"]), expected_list(&[&signature]));
    let (index, applied) = referrers(
        &api,
        repo,
        &image.digest,
        Some("application/vnd.example.none"),
    )
    .await;
    assert!(applied);
    assert_eq!(index["manifests"], json!([]));
}

#[tokio::test]
async fn referrers_of_an_unknown_subject_or_repository_is_an_empty_index() {
    let server = Server::start();
    let api = Api::new(&server);
    api.push_image("disc/empty", "v1", 44).await;
    for repo in ["disc/empty", "disc/never-pushed"] {
        let (index, applied) = referrers(&api, repo, ABSENT_DIGEST, None).await;
        assert!(!applied);
        assert_eq!(index["manifests"], json!([]), "{repo}");
        let (index, _) = referrers(&api, repo, ABSENT_DIGEST, Some("application/x")).await;
        assert_eq!(index["manifests"], json!([]));
    }
}

#[tokio::test]
async fn referrer_pushed_before_its_subject_is_accepted_and_listed() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "disc/early";
    // The subject's manifest is never pushed (the spec's "non-existent subject" case).
    let ghost = image_manifest(
        OCI_MANIFEST,
        &descriptor(OCI_CONFIG, b"{\"ghost\":1}"),
        &[],
        None,
    );
    let subject = manifest_descriptor(OCI_MANIFEST, &ghost);
    let early = push_referrer_manifest(
        &api,
        repo,
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "early",
    )
    .await;
    let (index, _) = referrers(&api, repo, &digest_of(&ghost), None).await;
    assert_eq!(by_digest(&index["manifests"]), expected_list(&[&early]));
}

#[tokio::test]
async fn manifest_put_by_tag_with_subject_answers_oci_subject_and_others_do_not() {
    let server = Server::start();
    let api = Api::new(&server);
    let repo = "disc/subject";
    let image = api.push_image(repo, "v1", 45).await;
    let config = descriptor(OCI_EMPTY, b"{}");
    api.push_blob(repo, &config.bytes).await;
    let body = image_manifest(
        OCI_MANIFEST,
        &config,
        &[],
        Some(json!({
            "artifactType": "application/vnd.example.note",
            "subject": manifest_descriptor(OCI_MANIFEST, &image.manifest),
        })),
    );
    let resp = api.put_manifest(repo, "note", OCI_MANIFEST, &body).await;
    expect_status(&resp, 201);
    assert_eq!(header(&resp, "oci-subject"), image.digest);

    let plain = image_manifest(OCI_MANIFEST, &config, &[], None);
    let resp = api.put_manifest(repo, "plain", OCI_MANIFEST, &plain).await;
    expect_status(&resp, 201);
    assert_eq!(maybe_header(&resp, "oci-subject"), None);
}
