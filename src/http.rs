//! Routes, extractors and response shapes. No business logic: handlers call `Service`.

use std::collections::HashMap;
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
    /// Largest request target plus headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
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
        .layer(middleware::from_fn_with_state(access.max_header_bytes, limit_request))
        .with_state(service)
}

/// `Ok` when no token is configured or the request carries it (constant-time comparison).
fn check_token(token: Option<&str>, request: &Request) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same =
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    match (same, given.is_empty()) {
        (true, _) => Ok(()),
        (false, true) => Err(Error::Unauthorized("a bearer token is required".into())),
        (false, false) => Err(Error::Unauthorized("the bearer token is not valid".into())),
    }
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

/// 431 when the request target and headers together exceed the limit; 413 when the declared body
/// is larger than BODY_LIMIT (an undeclared one is cut off there by the extractors).
async fn limit_request(State(max): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if declared > BODY_LIMIT as u64 {
        // The body is not read, so the connection cannot carry another request: say so.
        let mut response =
            Error::PayloadTooLarge(format!("{declared} bytes, at most {BODY_LIMIT} are accepted")).into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let target = request.uri().to_string().len();
    let headers: usize = request.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if target + headers > max {
        return Error::HeadersTooLarge(format!(
            "the request target and headers take {} bytes, at most {max} are accepted",
            target + headers
        ))
        .into_response();
    }
    next.run(request).await
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
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, Error> {
    let Path(user_id) = user_id.map_err(|e| Error::InvalidUserId(e.body_text()))?;
    let Query(query) =
        query.map_err(|e| Error::InvalidK(format!("the query string is not valid: {}", e.body_text())))?;
    let k = service.parse_k(query.get("k").map(String::as_str))?;
    let rec = service.recommend(&user_id, k).await?;
    Ok(Json(rec).into_response())
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

/// Models loaded and warmed up, and Redis accepting writes (`/health` and `/health/ready`).
async fn readiness(service: &Service) -> (bool, serde_json::Value) {
    let redis = service.store.check_writable().await;
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
