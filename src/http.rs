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

/// The full API. With a token, the POST routes require `Authorization: Bearer <token>`.
pub fn router(service: Arc<Service>, api_token: Option<String>) -> Router {
    let api = Router::new()
        .route("/recommend/{user_id}", post(recommend))
        .route_layer(middleware::from_fn_with_state(api_token.map(Arc::new), require_token));
    with_common(api, service)
}

async fn require_token(State(token): State<Option<Arc<String>>>, request: Request, next: Next) -> Response {
    if let Some(token) = token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // constant-time comparison
        let same =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !same {
            let why = if given.is_empty() { "a bearer token is required" } else { "the bearer token is not valid" };
            let mut response = Error::Unauthorized(why.into()).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// Health and metrics only (the `listen` mode).
pub fn ops_router(service: Arc<Service>) -> Router {
    with_common(Router::new(), service)
}

fn with_common(routes: Router<Arc<Service>>, service: Arc<Service>) -> Router {
    routes
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(service.clone(), track))
        .with_state(service)
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

/// Models loaded and warmed up, and Redis answering (`/health` and `/health/ready`).
async fn readiness(service: &Service) -> (bool, serde_json::Value) {
    let redis = service.store.ping().await;
    let (model_loaded, model, device, engine_problem) = match service.engine.state() {
        EngineState::Ready(info) => (true, json!(info.version), json!(info.device), None),
        EngineState::Loading => (false, json!(null), json!(null), Some("models are loading".to_string())),
        EngineState::Failed(reason) => {
            (false, json!(null), json!(null), Some(format!("models failed to load: {reason}")))
        }
    };
    let redis_status = match &redis {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let problems: Vec<String> = engine_problem.into_iter().chain(redis.err().map(|e| format!("redis: {e}"))).collect();
    let healthy = problems.is_empty();
    let mut body = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "model_loaded": model_loaded,
        "model_version": model,
        "redis": redis_status,
        "device": device,
        "catalog_items": service.catalog.len(),
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
