//! [`RegistryError`]: the one place storage and parsing failures become the
//! distribution spec's error JSON, `{"errors":[{"code","message","detail"}]}`.
//! Internal causes are logged inside the request's span, never sent to the client.

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use oci::ErrorCode;
use store::error::Missing;

/// An error answered in the distribution spec's format (boxed: errors are rare, results common).
#[derive(Debug)]
pub struct RegistryError(Box<Inner>);

#[derive(Debug)]
struct Inner {
    code: ErrorCode,
    status: StatusCode,
    message: String,
    detail: Option<serde_json::Value>,
    headers: HeaderMap,
}

impl RegistryError {
    /// An error with `code`'s usual status and a specific message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RegistryError {
        RegistryError(Box::new(Inner {
            code,
            status: StatusCode::from_u16(code.status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
            detail: None,
            headers: HeaderMap::new(),
        }))
    }

    /// A path that names no API endpoint.
    pub fn route_not_found() -> RegistryError {
        RegistryError::new(ErrorCode::Unsupported, "no such API endpoint")
            .with_status(StatusCode::NOT_FOUND)
    }

    /// Answer with `status` instead of the code's usual one.
    pub fn with_status(mut self, status: StatusCode) -> RegistryError {
        self.0.status = status;
        self
    }

    /// Attach the spec's free-form `detail`.
    pub fn with_detail(mut self, detail: serde_json::Value) -> RegistryError {
        self.0.detail = Some(detail);
        self
    }

    /// Add a response header (e.g. `Range` on a 416).
    pub fn with_header(mut self, name: HeaderName, value: String) -> RegistryError {
        if let Ok(value) = HeaderValue::try_from(value) {
            self.0.headers.insert(name, value);
        }
        self
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0.message
    }
}

impl From<crate::limits::Refusal> for RegistryError {
    fn from(refusal: crate::limits::Refusal) -> Self {
        RegistryError::new(ErrorCode::TooManyRequests, refusal.to_string())
            .with_header(RETRY_AFTER, refusal.retry_after_secs().to_string())
    }
}

impl From<crate::auth::Refused> for RegistryError {
    fn from(refused: crate::auth::Refused) -> Self {
        let message = refused.to_string();
        match refused {
            crate::auth::Refused::Credentials(_) => {
                RegistryError::new(ErrorCode::Unauthorized, message)
            }
            crate::auth::Refused::Throttled(wait) => {
                RegistryError::new(ErrorCode::TooManyRequests, message)
                    .with_header(RETRY_AFTER, wait.as_secs().max(1).to_string())
            }
        }
    }
}

impl From<store::Error> for RegistryError {
    fn from(e: store::Error) -> Self {
        use store::Error as E;
        match e {
            E::NotFound(Missing::Blob) => {
                RegistryError::new(ErrorCode::BlobUnknown, ErrorCode::BlobUnknown.message())
            }
            E::NotFound(Missing::Manifest) => RegistryError::new(
                ErrorCode::ManifestUnknown,
                ErrorCode::ManifestUnknown.message(),
            ),
            E::NotFound(Missing::Repository) => {
                RegistryError::new(ErrorCode::NameUnknown, ErrorCode::NameUnknown.message())
            }
            E::NotFound(Missing::Upload) => RegistryError::new(
                ErrorCode::BlobUploadUnknown,
                ErrorCode::BlobUploadUnknown.message(),
            ),
            E::DigestMismatch { .. } => RegistryError::new(ErrorCode::DigestInvalid, e.to_string()),
            E::RangeInvalid {
                expected_offset, ..
            } => RegistryError::new(ErrorCode::BlobUploadInvalid, e.to_string())
                .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                .with_header(axum::http::header::RANGE, range_header(expected_offset)),
            E::ManifestBlobUnknown { ref digest, .. } => {
                let detail = serde_json::json!({ "digest": digest.to_string() });
                RegistryError::new(ErrorCode::ManifestBlobUnknown, e.to_string())
                    .with_detail(detail)
            }
            E::ManifestInvalid(_) | E::ManifestSizeMismatch { .. } => {
                RegistryError::new(ErrorCode::ManifestInvalid, e.to_string())
            }
            E::BlobTooLarge { .. } => {
                RegistryError::new(ErrorCode::BlobUploadInvalid, e.to_string())
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            }
            E::ManifestTooLarge { .. } => {
                RegistryError::new(ErrorCode::ManifestInvalid, e.to_string())
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            }
            E::Body(_) => RegistryError::new(ErrorCode::BlobUploadInvalid, e.to_string()),
            // Cache-entry failures; the registry never asks for entries.
            E::NotFound(Missing::Entry)
            | E::EntryExists
            | E::EntryFinished
            | E::EntryIncomplete { .. }
            | E::EntryTooLarge { .. }
            | E::UnknownBlock(_)
            | E::ChunkLength { .. } => RegistryError::new(ErrorCode::Unsupported, e.to_string())
                .with_status(StatusCode::BAD_REQUEST),
            E::StorageFull => RegistryError::new(ErrorCode::InsufficientStorage, e.to_string()),
            E::Source { failure, message } => upstream_failure(failure, message),
            // A shared backend is away for a moment: clients retry a 503.
            E::Unavailable(_) => RegistryError::new(ErrorCode::Unavailable, e.to_string())
                .with_header(axum::http::header::RETRY_AFTER, "1".to_owned()),
            E::Io(_)
            | E::Database(_)
            | E::Postgres(_)
            | E::ObjectStore(_)
            | E::Commit(_)
            | E::Config(_)
            | E::DataDirInUse(_)
            | E::Task(_) => {
                tracing::error!(error = %e, "internal failure");
                RegistryError::new(ErrorCode::Unknown, ErrorCode::Unknown.message())
            }
        }
    }
}

/// A mirrored read or a pushed-through write the upstream did not complete.
fn upstream_failure(failure: store::SourceFailure, message: String) -> RegistryError {
    use store::SourceFailure as F;
    match failure {
        F::NotFound => RegistryError::new(ErrorCode::ManifestUnknown, message),
        F::Denied => RegistryError::new(ErrorCode::Denied, message),
        F::Unavailable => RegistryError::new(ErrorCode::Unavailable, message),
        F::RateLimited(retry_after) => {
            let error = RegistryError::new(ErrorCode::TooManyRequests, message);
            match retry_after {
                Some(seconds) => {
                    error.with_header(axum::http::header::RETRY_AFTER, seconds.to_string())
                }
                None => error,
            }
        }
        F::Corrupt => {
            RegistryError::new(ErrorCode::Unavailable, message).with_status(StatusCode::BAD_GATEWAY)
        }
        F::Refused(status) => RegistryError::new(ErrorCode::Denied, message)
            .with_status(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)),
    }
}

/// The spec's `Range` value for an upload holding `len` bytes: `0-<last byte>`.
pub fn range_header(len: u64) -> String {
    format!("0-{}", len.saturating_sub(1))
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let this = *self.0;
        if this.status.is_client_error() {
            tracing::debug!(code = this.code.as_str(), message = %this.message, "client error");
        }
        let mut entry = serde_json::json!({ "code": this.code.as_str(), "message": this.message });
        if let (Some(detail), Some(obj)) = (this.detail, entry.as_object_mut()) {
            obj.insert("detail".into(), detail);
        }
        let body = serde_json::json!({ "errors": [entry] }).to_string();
        let mut response = (
            this.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        response.headers_mut().extend(this.headers);
        response
    }
}
