//! [`ActionsError`]: what went wrong in the cache service, mapped once to each of its
//! three wire formats (v1 JSON, twirp JSON, Azure XML).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A cache-service failure.
#[derive(Debug, thiserror::Error)]
pub enum ActionsError {
    /// No usable runtime token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The token may not write (GitHub's read-only contract: the text starts with
    /// `cache write denied:`).
    #[error("cache write denied: {0}")]
    WriteDenied(String),
    /// The token may not read.
    #[error("cache read denied: {0}")]
    ReadDenied(String),
    /// A signed URL was refused (bad, expired, or for another entry or use).
    #[error("{0}")]
    UrlDenied(String),
    /// The request is not valid (bad key, range, size, field).
    #[error("{0}")]
    Invalid(String),
    /// A requested byte range lies outside the entry.
    #[error("{0}")]
    RangeNotSatisfiable(String),
    /// The request body is not the JSON or XML it must be.
    #[error("{0}")]
    Malformed(String),
    /// No such route or method.
    #[error("{0}")]
    NoRoute(String),
    /// The caller is over its limits.
    #[error(transparent)]
    Limited(#[from] crate::limits::Refusal),
    /// A storage failure.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// This server is an edge, and its centre did not take a save passed through to it
    /// (the entry is kept here).
    #[error("the central cache did not take the entry: {message}")]
    Centre {
        /// How the centre failed.
        failure: store::SourceFailure,
        /// What it said.
        message: String,
    },
}

/// How a failure reads in each protocol.
struct Wire {
    status: StatusCode,
    /// twirp's code.
    twirp: &'static str,
    /// Azure Blob's code.
    azure: &'static str,
    /// The v1 API's exception type, when clients look for one.
    v1_type: Option<&'static str>,
}

impl ActionsError {
    /// A failure to pass a save through to the centre: the centre's, or this server's
    /// (reading its copy).
    pub(super) fn passing(error: store::Error) -> ActionsError {
        match error {
            store::Error::Source { failure, message } => ActionsError::Centre { failure, message },
            e => ActionsError::Store(e),
        }
    }

    fn wire(&self) -> Wire {
        use store::Error as E;
        let wire = |status, twirp, azure| Wire {
            status,
            twirp,
            azure,
            v1_type: None,
        };
        match self {
            ActionsError::Unauthenticated(_) => wire(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "NoAuthenticationInformation",
            ),
            ActionsError::WriteDenied(_) | ActionsError::ReadDenied(_) => wire(
                StatusCode::FORBIDDEN,
                "permission_denied",
                "AuthorizationPermissionMismatch",
            ),
            ActionsError::Limited(_) => wire(
                StatusCode::TOO_MANY_REQUESTS,
                "resource_exhausted",
                "ServerBusy",
            ),
            ActionsError::UrlDenied(_) => wire(
                StatusCode::FORBIDDEN,
                "permission_denied",
                "AuthenticationFailed",
            ),
            ActionsError::Invalid(_) => {
                wire(StatusCode::BAD_REQUEST, "invalid_argument", "InvalidInput")
            }
            ActionsError::RangeNotSatisfiable(_) => wire(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "out_of_range",
                "InvalidRange",
            ),
            ActionsError::Malformed(_) => {
                wire(StatusCode::BAD_REQUEST, "malformed", "InvalidXmlDocument")
            }
            ActionsError::NoRoute(_) => wire(StatusCode::NOT_FOUND, "bad_route", "InvalidUri"),
            // A refusal is final; an outage is worth the client's retry.
            ActionsError::Centre { failure, .. } => match failure {
                store::SourceFailure::Denied => wire(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    "AuthorizationPermissionMismatch",
                ),
                store::SourceFailure::Refused(_) | store::SourceFailure::NotFound => wire(
                    StatusCode::PRECONDITION_FAILED,
                    "failed_precondition",
                    "ConditionNotMet",
                ),
                _ => wire(StatusCode::BAD_GATEWAY, "unavailable", "ServerBusy"),
            },
            ActionsError::Store(e) => match e {
                E::NotFound(_) => wire(StatusCode::NOT_FOUND, "not_found", "BlobNotFound"),
                E::EntryExists => Wire {
                    status: StatusCode::CONFLICT,
                    twirp: "already_exists",
                    azure: "BlobAlreadyExists",
                    v1_type: Some("ArtifactCacheItemAlreadyExistsException"),
                },
                E::EntryFinished => wire(
                    StatusCode::CONFLICT,
                    "already_exists",
                    "BlobImmutableDueToPolicy",
                ),
                E::EntryIncomplete { .. } | E::ChunkLength { .. } => {
                    wire(StatusCode::BAD_REQUEST, "invalid_argument", "InvalidInput")
                }
                E::UnknownBlock(_) => wire(
                    StatusCode::BAD_REQUEST,
                    "invalid_argument",
                    "InvalidBlockList",
                ),
                E::EntryTooLarge { .. } => wire(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "resource_exhausted",
                    "RequestBodyTooLarge",
                ),
                E::Body(_) => wire(StatusCode::BAD_REQUEST, "malformed", "InvalidInput"),
                E::StorageFull => wire(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "resource_exhausted",
                    "InsufficientAccountPermissions",
                ),
                E::Unavailable(_) => {
                    wire(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "ServerBusy")
                }
                _ => {
                    tracing::error!(error = %e, "internal failure");
                    wire(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "InternalError",
                    )
                }
            },
        }
    }

    /// The message clients see; internal failures are not described (the centre's are).
    fn message(&self, wire: &Wire) -> String {
        if wire.status.is_server_error()
            && wire.status != StatusCode::INSUFFICIENT_STORAGE
            && wire.status != StatusCode::SERVICE_UNAVAILABLE
            && !matches!(self, ActionsError::Centre { .. })
        {
            "internal error".into()
        } else {
            self.to_string()
        }
    }

    /// `response` with a `Retry-After` when this is a refusal over limits or a shared
    /// backend away for a moment.
    fn with_retry_after(&self, mut response: Response) -> Response {
        let seconds = match self {
            ActionsError::Limited(refusal) => Some(refusal.retry_after_secs()),
            ActionsError::Store(store::Error::Unavailable(_)) => Some(1),
            _ => None,
        };
        if let Some(seconds) = seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }

    /// The v1 REST API's form: JSON with `message` (and `typeKey` where clients look
    /// for one). An oversized chunk is a plain 400 there.
    pub fn v1(self) -> Response {
        let mut wire = self.wire();
        if wire.status == StatusCode::PAYLOAD_TOO_LARGE {
            wire.status = StatusCode::BAD_REQUEST;
        }
        let message = self.message(&wire);
        let mut body = serde_json::json!({ "message": message });
        if let (Some(kind), Some(obj)) = (wire.v1_type, body.as_object_mut()) {
            obj.insert("typeName".into(), kind.into());
            obj.insert("typeKey".into(), kind.trim_end_matches("Exception").into());
        }
        self.with_retry_after((wire.status, axum::Json(body)).into_response())
    }

    /// twirp's form: `{"code", "msg"}`.
    pub fn twirp(self) -> Response {
        let wire = self.wire();
        let message = self.message(&wire);
        let body = serde_json::json!({ "code": wire.twirp, "msg": message });
        self.with_retry_after((wire.status, axum::Json(body)).into_response())
    }

    /// Azure Blob's form: an XML `<Error>` and the code in `x-ms-error-code`.
    pub fn azure(self) -> Response {
        let wire = self.wire();
        let message = self.message(&wire);
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{}</Code><Message>{}</Message></Error>",
            wire.azure,
            quick_xml::escape::escape(message.as_str())
        );
        let mut response = (
            wire.status,
            [(header::CONTENT_TYPE, "application/xml")],
            body,
        )
            .into_response();
        response
            .headers_mut()
            .insert("x-ms-error-code", HeaderValue::from_static(wire.azure));
        self.with_retry_after(response)
    }
}
