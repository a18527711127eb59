//! Parse a `/v2/...` request into a typed [`Endpoint`] before any work happens.
//!
//! Repository names may contain `/`, so the path is read from its tail: the last
//! segments say what is addressed and everything before them is the name. Every part is
//! validated here, so handlers receive only [`RepoName`], [`Digest`], [`Reference`] and
//! [`UploadId`] values.

use axum::http::{Method, header};
use oci::{Digest, ErrorCode, Reference, RepoName};
use store::UploadId;

use super::error::RegistryError;

/// One operation of the distribution API, with its validated path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v2/`: API version check.
    Base,
    /// `GET /v2/_catalog`.
    Catalog,
    /// `GET /v2/<name>/tags/list`.
    ListTags(RepoName),
    /// `GET /v2/<name>/manifests/<reference>`.
    GetManifest(RepoName, Reference),
    /// `HEAD /v2/<name>/manifests/<reference>`.
    HeadManifest(RepoName, Reference),
    /// `PUT /v2/<name>/manifests/<reference>`.
    PutManifest(RepoName, Reference),
    /// `DELETE /v2/<name>/manifests/<reference>`.
    DeleteManifest(RepoName, Reference),
    /// `GET /v2/<name>/blobs/<digest>`.
    GetBlob(RepoName, Digest),
    /// `HEAD /v2/<name>/blobs/<digest>`.
    HeadBlob(RepoName, Digest),
    /// `DELETE /v2/<name>/blobs/<digest>`.
    DeleteBlob(RepoName, Digest),
    /// `POST /v2/<name>/blobs/uploads/` (session, monolithic or mount).
    StartUpload(RepoName),
    /// `GET /v2/<name>/blobs/uploads/<id>`.
    GetUpload(RepoName, UploadId),
    /// `PATCH /v2/<name>/blobs/uploads/<id>`.
    AppendUpload(RepoName, UploadId),
    /// `PUT /v2/<name>/blobs/uploads/<id>?digest=`.
    FinishUpload(RepoName, UploadId),
    /// `DELETE /v2/<name>/blobs/uploads/<id>`.
    CancelUpload(RepoName, UploadId),
    /// `GET /v2/<name>/referrers/<digest>`.
    ListReferrers(RepoName, Digest),
}

impl Endpoint {
    /// The repository it addresses, if any.
    pub fn repo(&self) -> Option<&RepoName> {
        match self {
            Endpoint::Base | Endpoint::Catalog => None,
            Endpoint::ListTags(repo)
            | Endpoint::StartUpload(repo)
            | Endpoint::GetManifest(repo, _)
            | Endpoint::HeadManifest(repo, _)
            | Endpoint::PutManifest(repo, _)
            | Endpoint::DeleteManifest(repo, _)
            | Endpoint::GetBlob(repo, _)
            | Endpoint::HeadBlob(repo, _)
            | Endpoint::DeleteBlob(repo, _)
            | Endpoint::GetUpload(repo, _)
            | Endpoint::AppendUpload(repo, _)
            | Endpoint::FinishUpload(repo, _)
            | Endpoint::CancelUpload(repo, _)
            | Endpoint::ListReferrers(repo, _) => Some(repo),
        }
    }

    /// The `snake_case` name labelling spans and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::ListTags(..) => "list_tags",
            Endpoint::GetManifest(..) => "get_manifest",
            Endpoint::HeadManifest(..) => "head_manifest",
            Endpoint::PutManifest(..) => "put_manifest",
            Endpoint::DeleteManifest(..) => "delete_manifest",
            Endpoint::GetBlob(..) => "get_blob",
            Endpoint::HeadBlob(..) => "head_blob",
            Endpoint::DeleteBlob(..) => "delete_blob",
            Endpoint::StartUpload(..) => "start_upload",
            Endpoint::GetUpload(..) => "get_upload",
            Endpoint::AppendUpload(..) => "append_upload",
            Endpoint::FinishUpload(..) => "finish_upload",
            Endpoint::CancelUpload(..) => "cancel_upload",
            Endpoint::ListReferrers(..) => "list_referrers",
        }
    }

    /// Parse `method` and the percent-encoded `path` (which starts with `/v2`).
    pub fn parse(method: &Method, path: &str) -> Result<Endpoint, RegistryError> {
        let decoded = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| RegistryError::route_not_found())?;
        let rest = decoded
            .strip_prefix("/v2")
            .ok_or_else(RegistryError::route_not_found)?;
        let target = parse_target(rest, method)?;
        target.with_method(method)
    }
}

/// What a path addresses, before the method picks the operation.
enum Target {
    Base,
    Catalog,
    Tags(RepoName),
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    Uploads(RepoName),
    Upload(RepoName, UploadId),
    Referrers(RepoName, Digest),
}

fn repo(name: &str) -> Result<RepoName, RegistryError> {
    name.parse()
        .map_err(|e: oci::NameError| RegistryError::new(ErrorCode::NameInvalid, e.to_string()))
}

fn digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e: oci::DigestError| RegistryError::new(ErrorCode::DigestInvalid, e.to_string()))
}

fn parse_target(rest: &str, method: &Method) -> Result<Target, RegistryError> {
    if rest.is_empty() || rest == "/" {
        return Ok(Target::Base);
    }
    let rest = rest
        .strip_prefix('/')
        .ok_or_else(RegistryError::route_not_found)?;
    if rest == "_catalog" {
        return Ok(Target::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Target::Tags(repo(name)?));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads/")
        .or_else(|| rest.strip_suffix("/blobs/uploads"))
    {
        return Ok(Target::Uploads(repo(name)?));
    }
    let (prefix, last) = rest
        .rsplit_once('/')
        .ok_or_else(RegistryError::route_not_found)?;
    if let Some(name) = prefix.strip_suffix("/blobs/uploads") {
        let id = last.parse().map_err(|_| {
            RegistryError::new(ErrorCode::BlobUploadUnknown, "no such upload session")
        })?;
        return Ok(Target::Upload(repo(name)?, id));
    }
    if let Some(name) = prefix.strip_suffix("/manifests") {
        let reference = last.parse().map_err(|e: oci::NameError| match e {
            oci::NameError::Digest(e) => {
                RegistryError::new(ErrorCode::DigestInvalid, e.to_string())
            }
            // A tag that cannot exist is simply unknown, except to a push.
            other if method == Method::PUT => {
                RegistryError::new(ErrorCode::TagInvalid, other.to_string())
            }
            other => RegistryError::new(ErrorCode::ManifestUnknown, other.to_string()),
        })?;
        return Ok(Target::Manifest(repo(name)?, reference));
    }
    if let Some(name) = prefix.strip_suffix("/blobs") {
        return Ok(Target::Blob(repo(name)?, digest(last)?));
    }
    if let Some(name) = prefix.strip_suffix("/referrers") {
        return Ok(Target::Referrers(repo(name)?, digest(last)?));
    }
    Err(RegistryError::route_not_found())
}

impl Target {
    /// The methods this target answers, for the `Allow` header of a 405.
    fn allowed(&self) -> &'static str {
        match self {
            Target::Base => "GET, HEAD",
            Target::Catalog | Target::Tags(_) | Target::Referrers(..) => "GET",
            Target::Manifest(..) => "GET, HEAD, PUT, DELETE",
            Target::Blob(..) => "GET, HEAD, DELETE",
            Target::Uploads(_) => "POST",
            Target::Upload(..) => "GET, PATCH, PUT, DELETE",
        }
    }

    fn with_method(self, method: &Method) -> Result<Endpoint, RegistryError> {
        let m = method.clone();
        let allowed = self.allowed();
        let endpoint = match self {
            Target::Base if m == Method::GET || m == Method::HEAD => Endpoint::Base,
            Target::Catalog if m == Method::GET => Endpoint::Catalog,
            Target::Tags(r) if m == Method::GET => Endpoint::ListTags(r),
            Target::Manifest(r, x) if m == Method::GET => Endpoint::GetManifest(r, x),
            Target::Manifest(r, x) if m == Method::HEAD => Endpoint::HeadManifest(r, x),
            Target::Manifest(r, x) if m == Method::PUT => Endpoint::PutManifest(r, x),
            Target::Manifest(r, x) if m == Method::DELETE => Endpoint::DeleteManifest(r, x),
            Target::Blob(r, d) if m == Method::GET => Endpoint::GetBlob(r, d),
            Target::Blob(r, d) if m == Method::HEAD => Endpoint::HeadBlob(r, d),
            Target::Blob(r, d) if m == Method::DELETE => Endpoint::DeleteBlob(r, d),
            Target::Uploads(r) if m == Method::POST => Endpoint::StartUpload(r),
            Target::Upload(r, id) if m == Method::GET => Endpoint::GetUpload(r, id),
            Target::Upload(r, id) if m == Method::PATCH => Endpoint::AppendUpload(r, id),
            Target::Upload(r, id) if m == Method::PUT => Endpoint::FinishUpload(r, id),
            Target::Upload(r, id) if m == Method::DELETE => Endpoint::CancelUpload(r, id),
            Target::Referrers(r, d) if m == Method::GET => Endpoint::ListReferrers(r, d),
            _ => {
                return Err(RegistryError::new(
                    ErrorCode::Unsupported,
                    format!("method {method} is not supported here"),
                )
                .with_header(header::ALLOW, allowed.to_owned()));
            }
        };
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ID: &str = "9d1c8f6e-3b1a-4a7e-9d0a-2f4b6c8e0a1b";

    fn parse(method: Method, path: &str) -> Result<Endpoint, (ErrorCode, u16)> {
        Endpoint::parse(&method, path).map_err(|e| (e.code(), e.status().as_u16()))
    }

    #[test]
    fn spec_example_paths_parse_to_their_endpoints() {
        let repo: RepoName = "a/b/c".parse().unwrap();
        let d: Digest = D.parse().unwrap();
        let id: UploadId = ID.parse().unwrap();
        assert_eq!(parse(Method::GET, "/v2/"), Ok(Endpoint::Base));
        assert_eq!(parse(Method::GET, "/v2"), Ok(Endpoint::Base));
        assert_eq!(parse(Method::GET, "/v2/_catalog"), Ok(Endpoint::Catalog));
        assert_eq!(
            parse(Method::GET, "/v2/a/b/c/tags/list"),
            Ok(Endpoint::ListTags(repo.clone()))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/b/c/manifests/latest"),
            Ok(Endpoint::GetManifest(
                repo.clone(),
                "latest".parse().unwrap()
            ))
        );
        assert_eq!(
            parse(Method::HEAD, &format!("/v2/a/b/c/blobs/{D}")),
            Ok(Endpoint::HeadBlob(repo.clone(), d.clone()))
        );
        assert_eq!(
            parse(
                Method::HEAD,
                "/v2/a/b/c/blobs/sha256%3Ae3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            ),
            Ok(Endpoint::HeadBlob(repo.clone(), d.clone()))
        );
        assert_eq!(
            parse(Method::POST, "/v2/a/b/c/blobs/uploads/"),
            Ok(Endpoint::StartUpload(repo.clone()))
        );
        assert_eq!(
            parse(Method::PATCH, &format!("/v2/a/b/c/blobs/uploads/{ID}")),
            Ok(Endpoint::AppendUpload(repo.clone(), id))
        );
        assert_eq!(
            parse(Method::GET, &format!("/v2/a/b/c/referrers/{D}")),
            Ok(Endpoint::ListReferrers(repo, d))
        );
    }

    #[test]
    fn repositories_named_like_route_words_still_parse() {
        let got = parse(Method::GET, "/v2/blobs/manifests/manifests/v1");
        assert_eq!(
            got,
            Ok(Endpoint::GetManifest(
                "blobs/manifests".parse().unwrap(),
                "v1".parse().unwrap()
            ))
        );
    }

    #[test]
    fn invalid_parts_get_their_own_error_codes() {
        assert_eq!(
            parse(Method::GET, "/v2/UPPER/tags/list"),
            Err((ErrorCode::NameInvalid, 400))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/../b/tags/list"),
            Err((ErrorCode::NameInvalid, 400))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/blobs/sha256:xyz"),
            Err((ErrorCode::DigestInvalid, 400))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/manifests/sha256:xyz"),
            Err((ErrorCode::DigestInvalid, 400))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/manifests/-bad"),
            Err((ErrorCode::ManifestUnknown, 404))
        );
        assert_eq!(
            parse(Method::HEAD, "/v2/a/manifests/.INVALID_MANIFEST_NAME"),
            Err((ErrorCode::ManifestUnknown, 404))
        );
        assert_eq!(
            parse(Method::PUT, "/v2/a/manifests/-bad"),
            Err((ErrorCode::TagInvalid, 400))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/blobs/uploads/not-a-uuid"),
            Err((ErrorCode::BlobUploadUnknown, 404))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/blobs/uploads/..%2F..%2Fx"),
            Err((ErrorCode::Unsupported, 404))
        );
        assert_eq!(
            parse(Method::POST, "/v2/a/manifests/latest"),
            Err((ErrorCode::Unsupported, 405))
        );
        assert_eq!(
            parse(Method::GET, "/v2/a/nothing/here"),
            Err((ErrorCode::Unsupported, 404))
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const METHODS: [Method; 6] = [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_path_is_an_endpoint_or_a_client_error(
                method in 0..METHODS.len(),
                path in "/v2(/[a-z0-9._%:-]{0,12}){0,6}/?|/v2/\\PC{0,60}",
            ) {
                let method = &METHODS[method];
                match Endpoint::parse(method, &path) {
                    Ok(endpoint) => {
                        if let Some(repo) = endpoint.repo() {
                            let again: Option<RepoName> = repo.as_str().parse().ok();
                            prop_assert_eq!(again.as_ref(), Some(repo));
                        }
                    }
                    Err(error) => prop_assert!(error.status().is_client_error(), "{path}: {error:?}"),
                }
            }

            #[test]
            fn a_manifest_path_names_its_repository_and_reference(
                repo in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}",
                tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}",
            ) {
                let path = format!("/v2/{repo}/manifests/{tag}");
                prop_assert_eq!(
                    Endpoint::parse(&Method::GET, &path).ok(),
                    Some(Endpoint::GetManifest(repo.parse().unwrap(), tag.parse().unwrap()))
                );
            }
        }
    }
}
