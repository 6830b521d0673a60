//! The one mapping from errors to HTTP: status, `Retry-After`, `Connection: close`,
//! `WWW-Authenticate`, and the JSON `{"error", "detail"}` body every error answer carries.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::Error;
use crate::inference::error::InferenceError;

/// An answer other than 2xx: the service's errors, and those of HTTP itself.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Service(#[from] Error),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid request body: {0}")]
    InvalidBody(String),
    #[error("request headers too large: {0}")]
    HeadersTooLarge(String),
    #[error("request body too large: {0}")]
    PayloadTooLarge(String),
    #[error("request target too long: {0}")]
    UriTooLong(String),
    #[error("malformed HTTP request: {0}")]
    MalformedRequest(String),
    #[error("HTTP version not supported: {0}")]
    HttpVersionNotSupported(String),
    #[error("transfer coding not supported: {0}")]
    UnsupportedTransferEncoding(String),
    #[error("request body not received in time: {0}")]
    RequestTimeout(String),
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> Self {
        ApiError::Service(e.into())
    }
}

/// Every error the server sends: `{"error": "<code>", "detail": "<what and why>"}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code (README lists them).
    pub error: String,
    /// What went wrong and why, for a human.
    pub detail: String,
}

impl ApiError {
    /// The machine-readable `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Service(e) => e.code(),
            ApiError::NotFound(_) => "not_found",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::MalformedRequest(_) => "malformed_request",
            ApiError::HttpVersionNotSupported(_) => "http_version_not_supported",
            ApiError::UnsupportedTransferEncoding(_) => "unsupported_transfer_encoding",
            ApiError::RequestTimeout(_) => "request_timeout",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Service(e) => service_status(e),
            ApiError::InvalidRequest(_) | ApiError::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidBody(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HttpVersionNotSupported(_) => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ApiError::UnsupportedTransferEncoding(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Worth retrying after a second: the queue is full, Redis is away, or the models are not
    /// (yet) serving.
    fn retry_after(&self) -> bool {
        use crate::redis::Error as R;
        matches!(
            self,
            ApiError::Service(
                Error::Inference(
                    InferenceError::Overloaded(_) | InferenceError::ModelsLoading | InferenceError::EngineStopped(_)
                ) | Error::Redis(R::Unavailable(_))
            )
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({ "error": self.code(), "detail": self.to_string() })
    }

    /// Errors after which the connection cannot carry another request (its body was not read, or
    /// the request could not be parsed): the response says `Connection: close`.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ApiError::PayloadTooLarge(_)
                | ApiError::MalformedRequest(_)
                | ApiError::HttpVersionNotSupported(_)
                | ApiError::UnsupportedTransferEncoding(_)
                | ApiError::RequestTimeout(_)
        )
    }
}

fn service_status(e: &Error) -> StatusCode {
    use crate::redis::Error as R;
    match e {
        Error::InvalidUserId(_) | Error::InvalidK(_) | Error::InvalidExclude(_) => StatusCode::BAD_REQUEST,
        Error::Profile(_) | Error::Redis(R::Profile(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        Error::Redis(R::Unavailable(_) | R::Refused(_)) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Redis(R::Internal(_)) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Inference(e) => match e {
            InferenceError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            InferenceError::DeadlineExceeded(_)
            | InferenceError::ModelsLoading
            | InferenceError::EngineStopped(_)
            | InferenceError::ReloadTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            InferenceError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InferenceError::ReloadInProgress => StatusCode::CONFLICT,
            InferenceError::ReloadRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
        },
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.closes_connection() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::error::ProfileError;
    use crate::redis::Error as R;

    /// One error of every kind the server can answer with, and the status, code and headers the
    /// HTTP contract (README "HTTP API") gives it. `every_kind` fails to compile when a variant
    /// is added without a row here.
    fn every_kind() -> Vec<(ApiError, u16, &'static str, bool)> {
        let profile = |p: ProfileError| ApiError::Service(Error::Profile(p));
        let inference = |e: InferenceError| ApiError::Service(Error::Inference(e));
        let all = vec![
            (ApiError::Service(Error::InvalidUserId("empty".into())), 400, "invalid_user_id", false),
            (ApiError::Service(Error::InvalidK("0".into())), 400, "invalid_k", false),
            (ApiError::Service(Error::InvalidExclude("501 ids".into())), 400, "invalid_exclude", false),
            (
                profile(ProfileError::Invalid { key: "k".into(), reason: "not JSON".into() }),
                422,
                "invalid_profile",
                false,
            ),
            (profile(ProfileError::TooLarge { key: "k".into(), bytes: 9, max: 8 }), 422, "profile_too_large", false),
            (profile(ProfileError::TooLong { key: "k".into(), items: 9, max: 8 }), 422, "profile_too_long", false),
            (ApiError::Service(Error::Redis(R::Unavailable("refused".into()))), 503, "redis_unavailable", true),
            (ApiError::Service(Error::Redis(R::Refused("WRONGTYPE".into()))), 503, "redis_error", false),
            (ApiError::Service(Error::Redis(R::Internal("x".into()))), 500, "internal_error", false),
            (ApiError::Service(Error::Internal("x".into())), 500, "internal_error", false),
            (inference(InferenceError::Overloaded(3)), 429, "overloaded", true),
            (inference(InferenceError::DeadlineExceeded(10)), 503, "deadline_exceeded", false),
            (inference(InferenceError::ModelsLoading), 503, "models_loading", true),
            (inference(InferenceError::EngineStopped("stopped".into())), 503, "engine_stopped", true),
            (inference(InferenceError::Failed("x".into())), 500, "inference_failed", false),
            (inference(InferenceError::ReloadTimeout(1.5)), 503, "reload_timeout", false),
            (inference(InferenceError::ReloadInProgress), 409, "reload_in_progress", false),
            (inference(InferenceError::ReloadRefused("bad".into())), 422, "reload_refused", false),
            (ApiError::NotFound("/x".into()), 404, "not_found", false),
            (ApiError::Unauthorized("no token".into()), 401, "unauthorized", false),
            (ApiError::MethodNotAllowed, 405, "method_not_allowed", false),
            (ApiError::Forbidden("admin".into()), 403, "forbidden", false),
            (ApiError::InvalidRequest("x".into()), 400, "invalid_request", false),
            (ApiError::InvalidBody("x".into()), 422, "invalid_body", false),
            (ApiError::HeadersTooLarge("9000 bytes".into()), 431, "headers_too_large", false),
            (ApiError::PayloadTooLarge("20000 bytes".into()), 413, "payload_too_large", false),
            (ApiError::UriTooLong("70000 bytes".into()), 414, "uri_too_long", false),
            (ApiError::MalformedRequest("bad Content-Length".into()), 400, "malformed_request", false),
            (ApiError::HttpVersionNotSupported("HTTP/1.2".into()), 505, "http_version_not_supported", false),
            (ApiError::UnsupportedTransferEncoding("gzip".into()), 501, "unsupported_transfer_encoding", false),
            (ApiError::RequestTimeout("10 s".into()), 408, "request_timeout", false),
        ];
        // Exhaustive on purpose: a new variant breaks this match until it has a row above.
        for (e, ..) in &all {
            match e {
                ApiError::Service(
                    Error::InvalidUserId(_) | Error::InvalidK(_) | Error::InvalidExclude(_) | Error::Profile(_),
                )
                | ApiError::Service(Error::Redis(_) | Error::Inference(_) | Error::Internal(_))
                | ApiError::NotFound(_)
                | ApiError::Unauthorized(_)
                | ApiError::MethodNotAllowed
                | ApiError::Forbidden(_)
                | ApiError::InvalidRequest(_)
                | ApiError::InvalidBody(_)
                | ApiError::HeadersTooLarge(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::UriTooLong(_)
                | ApiError::MalformedRequest(_)
                | ApiError::HttpVersionNotSupported(_)
                | ApiError::UnsupportedTransferEncoding(_)
                | ApiError::RequestTimeout(_) => {}
            }
        }
        all
    }

    #[tokio::test]
    async fn every_error_answers_with_its_status_code_and_a_json_body() {
        for (error, status, code, retry) in every_kind() {
            let detail = error.to_string();
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{code}");
            assert_eq!(response.headers().contains_key(header::RETRY_AFTER), retry, "{code}: Retry-After");
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body, json!({ "error": code, "detail": detail }), "{code}");
            assert!(detail.len() > 5, "{code}: {detail:?}");
        }
    }

    #[test]
    fn codes_are_distinct_but_for_the_internal_errors() {
        let mut seen = std::collections::HashMap::new();
        for (_, _, code, _) in every_kind() {
            *seen.entry(code).or_insert(0) += 1;
        }
        let repeated: Vec<_> = seen.into_iter().filter(|(c, n)| *n > 1 && *c != "internal_error").collect();
        assert!(repeated.is_empty(), "{repeated:?}");
    }
}
