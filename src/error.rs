//! Typed errors, and their single mapping to an HTTP status and a JSON `{"error", "detail"}` body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Errors of configuration and model loading: fatal at start, never seen by a request.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("model directory {dir}: {reason}")]
    Model { dir: String, reason: String },
    #[error("device: {0}")]
    Device(String),
    #[error("{0}")]
    Load(String),
}

/// Errors a recommendation request can end in (Clone: requests sharing one computation through
/// single flight each receive its outcome).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid user id: {0}")]
    InvalidUserId(String),
    #[error("invalid k: {0}")]
    InvalidK(String),
    #[error("invalid profile at {key}: {reason}")]
    InvalidProfile { key: String, reason: String },
    #[error("the profile at {key} is {bytes} bytes, at most {max} are accepted (MAX_PROFILE_BYTES)")]
    ProfileTooLarge { key: String, bytes: u64, max: usize },
    #[error("the profile at {key} holds {items} item ids, at most {max} are accepted (MAX_PROFILE_ITEMS)")]
    ProfileTooLong { key: String, items: usize, max: usize },
    #[error("redis unavailable: {0}")]
    RedisUnavailable(String),
    #[error("redis refused the command: {0}")]
    Redis(String),
    #[error("inference queue is full ({0} requests waiting)")]
    Overloaded(usize),
    #[error("no result within the deadline of {0} ms")]
    DeadlineExceeded(u64),
    #[error("the models are loading; try again shortly")]
    ModelsLoading,
    #[error("inference engine is not running: {0}")]
    EngineStopped(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("internal error: {0}")]
    Internal(String),
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
    #[error("the reload did not finish within {0} s; the models in service keep serving")]
    ReloadTimeout(f64),
    #[error("a reload is already in progress")]
    ReloadInProgress,
    #[error("reload refused, the models in service keep serving: {0}")]
    ReloadRefused(String),
}

/// Every error the server sends: `{"error": "<code>", "detail": "<what and why>"}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code (README lists them).
    pub error: String,
    /// What went wrong and why, for a human.
    pub detail: String,
}

impl Error {
    /// The machine-readable `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidUserId(_) => "invalid_user_id",
            Error::InvalidK(_) => "invalid_k",
            Error::InvalidProfile { .. } => "invalid_profile",
            Error::ProfileTooLarge { .. } => "profile_too_large",
            Error::ProfileTooLong { .. } => "profile_too_long",
            Error::RedisUnavailable(_) => "redis_unavailable",
            Error::Redis(_) => "redis_error",
            Error::Overloaded(_) => "overloaded",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::ModelsLoading => "models_loading",
            Error::EngineStopped(_) => "engine_stopped",
            Error::Inference(_) => "inference_failed",
            Error::Internal(_) => "internal_error",
            Error::NotFound(_) => "not_found",
            Error::Unauthorized(_) => "unauthorized",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Forbidden(_) => "forbidden",
            Error::InvalidRequest(_) => "invalid_request",
            Error::InvalidBody(_) => "invalid_body",
            Error::HeadersTooLarge(_) => "headers_too_large",
            Error::PayloadTooLarge(_) => "payload_too_large",
            Error::UriTooLong(_) => "uri_too_long",
            Error::MalformedRequest(_) => "malformed_request",
            Error::HttpVersionNotSupported(_) => "http_version_not_supported",
            Error::UnsupportedTransferEncoding(_) => "unsupported_transfer_encoding",
            Error::RequestTimeout(_) => "request_timeout",
            Error::ReloadTimeout(_) => "reload_timeout",
            Error::ReloadInProgress => "reload_in_progress",
            Error::ReloadRefused(_) => "reload_refused",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidUserId(_) | Error::InvalidK(_) | Error::InvalidRequest(_) | Error::MalformedRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::InvalidProfile { .. }
            | Error::ProfileTooLarge { .. }
            | Error::ProfileTooLong { .. }
            | Error::InvalidBody(_)
            | Error::ReloadRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::RedisUnavailable(_)
            | Error::Redis(_)
            | Error::ModelsLoading
            | Error::EngineStopped(_)
            | Error::DeadlineExceeded(_)
            | Error::ReloadTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Inference(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Error::HttpVersionNotSupported(_) => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            Error::UnsupportedTransferEncoding(_) => StatusCode::NOT_IMPLEMENTED,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::ReloadInProgress => StatusCode::CONFLICT,
        }
    }

    /// The stored profile itself cannot be ranked (malformed, too large, too long): retrying does
    /// not help until the frontend rewrites it.
    pub fn is_profile_problem(&self) -> bool {
        matches!(self, Error::InvalidProfile { .. } | Error::ProfileTooLarge { .. } | Error::ProfileTooLong { .. })
    }

    pub fn body(&self) -> serde_json::Value {
        json!({ "error": self.code(), "detail": self.to_string() })
    }

    /// Errors after which the connection cannot carry another request (its body was not read, or
    /// the request could not be parsed): the response says `Connection: close`.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Error::PayloadTooLarge(_)
                | Error::MalformedRequest(_)
                | Error::HttpVersionNotSupported(_)
                | Error::UnsupportedTransferEncoding(_)
                | Error::RequestTimeout(_)
        )
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(
            self,
            Error::Overloaded(_) | Error::RedisUnavailable(_) | Error::ModelsLoading | Error::EngineStopped(_)
        ) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.closes_connection() {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Error::Unauthorized(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_json_body_with_error_and_detail() {
        let errors = [
            Error::InvalidUserId("empty".into()),
            Error::InvalidK("0".into()),
            Error::InvalidProfile { key: "user_profile:a".into(), reason: "not JSON".into() },
            Error::RedisUnavailable("refused".into()),
            Error::Overloaded(3),
            Error::DeadlineExceeded(10),
            Error::ModelsLoading,
            Error::EngineStopped("stopped".into()),
            Error::Inference("x".into()),
            Error::Internal("x".into()),
            Error::ProfileTooLarge { key: "user_profile:a".into(), bytes: 9, max: 8 },
            Error::ProfileTooLong { key: "user_profile:a".into(), items: 9, max: 8 },
            Error::Forbidden("admin".into()),
            Error::HeadersTooLarge("9000 bytes".into()),
            Error::PayloadTooLarge("20000 bytes".into()),
            Error::ReloadInProgress,
            Error::ReloadRefused("bad".into()),
            Error::UriTooLong("70000 bytes".into()),
            Error::MalformedRequest("bad Content-Length".into()),
            Error::HttpVersionNotSupported("HTTP/1.2".into()),
            Error::UnsupportedTransferEncoding("gzip".into()),
            Error::RequestTimeout("10 s".into()),
            Error::ReloadTimeout(1.5),
        ];
        let statuses: Vec<u16> = errors.iter().map(|e| e.status().as_u16()).collect();
        assert_eq!(
            statuses,
            vec![
                400, 400, 422, 503, 429, 503, 503, 503, 500, 500, 422, 422, 403, 431, 413, 409, 422, 414, 400, 505,
                501, 408, 503
            ]
        );
        for e in &errors {
            let body = e.body();
            assert_eq!(body["error"], e.code());
            assert!(body["detail"].as_str().unwrap().len() > 3);
        }
    }
}
