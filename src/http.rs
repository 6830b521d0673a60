//! Routes, extractors and response shapes. No business logic: handlers call `Service`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::Instrument;

use crate::engine::EngineState;
use crate::error::Error;
use crate::service::Service;

/// Largest request body accepted (the API takes none; this bounds what a client can send).
const BODY_LIMIT: usize = 16 * 1024;

/// What the routers need besides the service.
#[derive(Debug, Clone)]
pub struct Access {
    /// When set, POST and admin routes require `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// Largest request target plus headers, in bytes (431 beyond; 414 for the target alone).
    pub max_header_bytes: usize,
    /// Time allowed to receive a request body once its head has arrived (408 beyond).
    pub body_read_timeout: std::time::Duration,
}

impl Access {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            api_token: cfg.api_token.clone(),
            max_header_bytes: cfg.max_header_bytes,
            body_read_timeout: cfg.body_read_timeout(),
        }
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// POST /recommend, /health, /metrics, and the admin routes unless they have their own port.
    Api { admin: bool },
    /// /health and /metrics (the `listen` mode), and the admin routes unless they have their own port.
    Ops { admin: bool },
    /// The admin routes alone, on their loopback-only port: open without a token when none is set.
    Admin,
}

pub fn router(service: Arc<Service>, routes: Routes, access: &Access) -> Router {
    let token = access.api_token.clone().map(Arc::new);
    let mut app = Router::new();
    if let Routes::Api { .. } = routes {
        app = app
            .route("/recommend/{user_id}", post(recommend))
            .route_layer(middleware::from_fn_with_state(token.clone(), require_token));
    }
    if !matches!(routes, Routes::Admin) {
        app = app
            .route("/health", get(health))
            .route("/health/live", get(live))
            .route("/health/ready", get(health))
            .route("/metrics", get(metrics));
    }
    if matches!(routes, Routes::Api { admin: true } | Routes::Ops { admin: true } | Routes::Admin) {
        let guard = AdminGuard { token, open_without_token: routes == Routes::Admin };
        app = app.merge(
            Router::new()
                .route("/admin/reload", post(reload))
                .route_layer(middleware::from_fn_with_state(guard, require_admin)),
        );
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(service.clone(), track))
        .layer(middleware::from_fn_with_state(access.clone(), limit_request))
        .with_state(service)
}

/// `Ok` when no token is configured or the request carries it (constant-time comparison).
fn check_token(token: Option<&str>, request: &Request) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .unwrap_or("");
    let same =
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    match (same, given.is_empty()) {
        (true, _) => Ok(()),
        (false, true) => Err(Error::Unauthorized("a bearer token is required".into())),
        (false, false) => Err(Error::Unauthorized("the bearer token is not valid".into())),
    }
}

/// The credentials of an `Authorization: Bearer <token>` value; the scheme name is
/// case-insensitive (RFC 7235 section 2.1), the token is not.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim_start_matches(' '))
}

async fn require_token(State(token): State<Option<Arc<String>>>, request: Request, next: Next) -> Response {
    match check_token(token.as_deref().map(String::as_str), &request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

#[derive(Clone)]
struct AdminGuard {
    token: Option<Arc<String>>,
    /// True on the loopback-only admin port.
    open_without_token: bool,
}

/// Admin routes need the token when one is set; without one they are served only on the
/// loopback-only admin port (403 on the public port).
async fn require_admin(State(guard): State<AdminGuard>, request: Request, next: Next) -> Response {
    if guard.token.is_none() && !guard.open_without_token {
        return Error::Forbidden(
            "admin routes on the public port need API_TOKEN; set API_TOKEN, or ADMIN_PORT to serve them on loopback"
                .into(),
        )
        .into_response();
    }
    match check_token(guard.token.as_deref().map(String::as_str), &request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// Bounds on the request before any route runs: 414 for a target over MAX_HEADER_BYTES, 431 when
/// target and headers together exceed it, 501 for a transfer coding other than chunked, 413 for a
/// body (declared or received) over BODY_LIMIT, 408 when the body does not arrive within the body
/// read timeout. A body is read here, whole, so every route sees it already received.
async fn limit_request(State(access): State<Access>, request: Request, next: Next) -> Response {
    match checked(&access, request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

async fn checked(access: &Access, request: Request) -> Result<Request, Error> {
    let max = access.max_header_bytes;
    let target = request.uri().to_string().len();
    if target > max {
        return Err(Error::UriTooLong(format!("the request target takes {target} bytes, at most {max} are accepted")));
    }
    let headers: usize = request.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if target + headers > max {
        return Err(Error::HeadersTooLarge(format!(
            "the request target and headers take {} bytes, at most {max} are accepted",
            target + headers
        )));
    }
    let chunked = match request.headers().get(header::TRANSFER_ENCODING) {
        None => false,
        Some(codings) => {
            let codings = codings.to_str().unwrap_or("?");
            if !codings.split(',').all(|c| c.trim().eq_ignore_ascii_case("chunked")) {
                return Err(Error::UnsupportedTransferEncoding(format!("{codings:?}: only chunked is understood")));
            }
            true
        }
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if declared > BODY_LIMIT as u64 {
        return Err(Error::PayloadTooLarge(format!("{declared} bytes, at most {BODY_LIMIT} are accepted")));
    }
    if declared == 0 && !chunked {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let timeout = access.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, BODY_LIMIT)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large =
                std::error::Error::source(&e).is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                Error::PayloadTooLarge(format!("the body is over {BODY_LIMIT} bytes"))
            } else {
                Error::MalformedRequest(format!("the body could not be read: {e}"))
            });
        }
        Err(_) => {
            return Err(Error::RequestTimeout(format!(
                "the body did not arrive within {} s (BODY_READ_TIMEOUT_SECS)",
                timeout.as_secs_f64()
            )))
        }
    };
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadRequest {
    /// Directory to load; absent: the directory in service, read again.
    model_dir: Option<std::path::PathBuf>,
}

/// POST /admin/reload, body optional: `{"model_dir": "/path/to/new/version"}`.
async fn reload(
    State(service): State<Arc<Service>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, Error> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(format!("at most {BODY_LIMIT} bytes are accepted")),
        _ => Error::InvalidRequest(e.body_text()),
    })?;
    let request: ReloadRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReloadRequest::default()
    } else {
        serde_json::from_slice::<Option<ReloadRequest>>(&body)
            .map_err(|e| {
                Error::InvalidRequest(format!("the body must be empty or {{\"model_dir\": \"<path>\"}}: {e}"))
            })?
            .unwrap_or_default()
    };
    let outcome = service.engine.reload(request.model_dir).await?;
    tracing::info!(version = %outcome.model_version, previous = %outcome.previous_version,
        dir = %outcome.model_dir, ms = outcome.elapsed_ms, "models reloaded");
    let mut body = serde_json::to_value(&outcome).map_err(|e| Error::Inference(e.to_string()))?;
    body["status"] = json!("reloaded");
    Ok(Json(body).into_response())
}

pub const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id (the client's `x-request-id` when it is a sane token, else a new
/// UUID), logs the request in a span carrying it, returns it in the `x-request-id` response
/// header, and counts and times the response by route template and status.
async fn track(State(service): State<Arc<Service>>, mut request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let header_value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request.headers_mut().insert(REQUEST_ID, header_value.clone());
    let span = tracing::info_span!("request", request_id = %id, method = %request.method(), route = %route);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), ms = elapsed.as_secs_f64() * 1e3, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), ms = elapsed.as_secs_f64() * 1e3, "request");
        }
    });
    response.headers_mut().insert(REQUEST_ID, header_value);
    let m = &service.metrics;
    m.http_requests.with_label_values(&[route.as_str(), status.as_str()]).inc();
    m.http_duration.with_label_values(&[route.as_str()]).observe(elapsed.as_secs_f64());
    response
}

async fn recommend(
    State(service): State<Arc<Service>>,
    user_id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Error> {
    let Path(user_id) = user_id.map_err(|e| Error::InvalidUserId(e.body_text()))?;
    let Query(query) =
        query.map_err(|e| Error::InvalidK(format!("the query string is not valid: {}", e.body_text())))?;
    let k = service.parse_k(k_param(&query)?)?;
    let rec = service.recommend(&user_id, k).await?;
    Ok(Json(rec).into_response())
}

/// The one `k` of a query: given at most once, and only ASCII digits (no sign, no spaces, no
/// `+` or `%20`); its range is checked by `Service::parse_k`.
fn k_param(query: &[(String, String)]) -> Result<Option<&str>, Error> {
    let mut ks = query.iter().filter(|(name, _)| name == "k").map(|(_, value)| value.as_str());
    let k = ks.next();
    let more = ks.count();
    if more > 0 {
        return Err(Error::InvalidK(format!("k is given {} times, give it once", more + 1)));
    }
    match k {
        Some(raw) if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) => {
            Err(Error::InvalidK(format!("k must be an integer written in digits only, got {raw:?}")))
        }
        k => Ok(k),
    }
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// Models loaded and warmed up, and Redis answering (`/health` and `/health/ready`).
async fn readiness(service: &Service) -> (bool, serde_json::Value) {
    let redis = service.store.ping().await;
    let (set, engine_problem) = match service.engine.state() {
        EngineState::Ready(set) => (Some(set), None),
        EngineState::Loading => (None, Some("models are loading".to_string())),
        EngineState::Failed(reason) => (None, Some(format!("models failed to load: {reason}"))),
    };
    let redis_status = match &redis {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let problems: Vec<String> = engine_problem.into_iter().chain(redis.err().map(|e| format!("redis: {e}"))).collect();
    let healthy = problems.is_empty();
    let mut body = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "model_loaded": set.is_some(),
        "model_version": set.as_ref().map(|s| s.info.version.clone()),
        "model_dir": set.as_ref().map(|s| s.dir.display().to_string()),
        "redis": redis_status,
        "device": set.as_ref().map(|s| s.info.device.clone()),
        "catalog_items": set.as_ref().map(|s| s.catalog.len()),
    });
    if !healthy {
        body["error"] = json!("unhealthy");
        body["detail"] = json!(problems.join("; "));
    }
    (healthy, body)
}

async fn health(State(service): State<Arc<Service>>) -> Response {
    let (healthy, body) = readiness(&service).await;
    let status = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(service): State<Arc<Service>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], service.metrics.render()).into_response()
}

async fn not_found(request: Request) -> Error {
    Error::NotFound(format!("no route for {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}
