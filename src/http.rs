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
use tracing::Instrument;

use crate::engine::{EngineState, Reloaded};
use crate::error::{Error, ErrorBody};
use crate::redis::topology::TopologyReport;
use crate::service::{Ask, Recommendation, Service};

/// Largest request body accepted (the API takes none; this bounds what a client can send).
const BODY_LIMIT: usize = 16 * 1024;

/// What the routers need besides the service.
#[derive(Debug, Clone)]
pub struct Access {
    /// Largest body of `POST /recommend` (a history sent in the request): MAX_PROFILE_BYTES plus
    /// room for the JSON around it.
    pub history_body_limit: usize,
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
            history_body_limit: cfg.max_profile_bytes + 4096,
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
            .route("/recommendations/{user_id}", get(recommendations))
            .route(
                "/recommend",
                post(recommend_history).layer(axum::extract::DefaultBodyLimit::max(access.history_body_limit)),
            )
            .route_layer(middleware::from_fn_with_state(token.clone(), require_token));
    }
    if !matches!(routes, Routes::Admin) {
        app = app
            .route("/health", get(health))
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/openapi.json", get(openapi_json));
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
/// body (declared or received) over what the route accepts (BODY_LIMIT; `POST /recommend` takes a
/// history up to MAX_PROFILE_BYTES), 408 when the body does not arrive within the body read
/// timeout. A body is read here, whole, so every route sees it already received.
async fn limit_request(State(access): State<Access>, request: Request, next: Next) -> Response {
    match checked(&access, request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

async fn checked(access: &Access, request: Request) -> Result<Request, Error> {
    let max = access.max_header_bytes;
    let body_limit = if request.uri().path() == "/recommend" { access.history_body_limit } else { BODY_LIMIT };
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
    if declared > body_limit as u64 {
        return Err(Error::PayloadTooLarge(format!("{declared} bytes, at most {body_limit} are accepted")));
    }
    if declared == 0 && !chunked {
        return Ok(request);
    }
    let (parts, body) = request.into_parts();
    let timeout = access.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, body_limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large =
                std::error::Error::source(&e).is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                Error::PayloadTooLarge(format!("the body is over {body_limit} bytes"))
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

#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Directory to load; absent: the directory in service, read again.
    #[schema(value_type = Option<String>)]
    model_dir: Option<std::path::PathBuf>,
}

/// A successful reload.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ReloadAnswer {
    /// Always `reloaded`.
    pub status: String,
    #[serde(flatten)]
    pub reloaded: Reloaded,
}

/// Loads a model directory beside the one in service, validates it and swaps it in.
#[utoipa::path(
    post,
    path = "/admin/reload",
    tag = "admin",
    request_body(content = Option<ReloadRequest>, description = "Optional: the directory to load (default: the one in service, read again)"),
    responses(
        (status = 200, description = "The new model set is in service", body = ReloadAnswer),
        (status = 400, description = "invalid_request: the body is not {\"model_dir\": ...}", body = ErrorBody),
        (status = 401, description = "unauthorized: API_TOKEN is set and the bearer token is missing or wrong", body = ErrorBody),
        (status = 403, description = "forbidden: admin routes on the public port need API_TOKEN", body = ErrorBody),
        (status = 409, description = "reload_in_progress", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 422, description = "reload_refused: the directory failed validation; the old one keeps serving", body = ErrorBody),
        (status = 503, description = "models_loading / engine_stopped", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
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
    Ok(Json(ReloadAnswer { status: "reloaded".into(), reloaded: outcome }).into_response())
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

/// The query of the ranking routes: `k` (list length) and `explain` (per-stage trace).
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RankQuery {
    /// Items to return, 1..=MAX_K (default DEFAULT_K, 10).
    #[param(minimum = 1, maximum = 100)]
    pub k: Option<i64>,
    /// Add each item's score and rank after every stage, and the candidate counts and time per
    /// stage (costs nothing when off).
    pub explain: Option<bool>,
}

/// The ask from the query string: `k` and `explain`, each at most once.
fn ask(service: &Service, query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Ask, Error> {
    let Query(pairs) =
        query.map_err(|e| Error::InvalidK(format!("the query string is not valid: {}", e.body_text())))?;
    let k = service.parse_k(k_param(&pairs)?)?;
    let explain = match single(&pairs, "explain").map_err(Error::InvalidRequest)? {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Error::InvalidRequest(format!("explain must be true or false, got {other:?}")));
        }
    };
    Ok(Ask { k, explain })
}

/// The user id in the path of the ranking routes (documentation: the handlers take it as a string
/// and `service::validate_user_id` checks it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct UserIdPath {
    /// 1..128 bytes; no whitespace, control, format (zero-width, bidi) or unassigned characters.
    #[param(pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$", max_length = 128)]
    user_id: String,
}

/// The errors of ranking a stored profile (`POST /recommend/{user_id}`, `GET /recommendations/{user_id}`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum ProfileRankErrors {
    #[response(status = 400, description = "invalid_user_id / invalid_k / invalid_request")]
    BadRequest(ErrorBody),
    #[response(status = 401, description = "unauthorized (API_TOKEN set)")]
    Unauthorized(ErrorBody),
    #[response(status = 422, description = "invalid_profile / profile_too_large / profile_too_long")]
    Unprocessable(ErrorBody),
    #[response(status = 429, description = "overloaded (Retry-After)")]
    Overloaded(ErrorBody),
    #[response(status = 500, description = "inference_failed / internal_error")]
    Internal(ErrorBody),
    #[response(
        status = 503,
        description = "redis_unavailable / redis_error / deadline_exceeded / models_loading / engine_stopped"
    )]
    Unavailable(ErrorBody),
}

fn user(user_id: Result<Path<String>, PathRejection>) -> Result<String, Error> {
    user_id.map(|Path(id)| id).map_err(|e| Error::InvalidUserId(e.body_text()))
}

/// Ranks the stored profile `user_profile:{user_id}` and writes `recommendations:{user_id}`.
#[utoipa::path(
    post,
    path = "/recommend/{user_id}",
    tag = "recommendations",
    params(UserIdPath, RankQuery),
    responses((status = 200, description = "Computed now and written to Redis", body = Recommendation), ProfileRankErrors),
    security((), ("bearer" = [])),
)]
async fn recommend(
    State(service): State<Arc<Service>>,
    user_id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Recommendation>, Error> {
    let user_id = user(user_id)?;
    let ask = ask(&service, query)?;
    Ok(Json(service.recommend(&user_id, ask).await?))
}

/// Cache-first read: the stored list when it was computed from the profile as it is now by the
/// model version in service and holds at least `k` items (`source: cache`); otherwise computed
/// and written as `POST /recommend/{user_id}` (`source: computed`).
#[utoipa::path(
    get,
    path = "/recommendations/{user_id}",
    tag = "recommendations",
    params(UserIdPath, RankQuery),
    responses((status = 200, description = "From Redis or computed now (see `source`)", body = Recommendation), ProfileRankErrors),
    security((), ("bearer" = [])),
)]
async fn recommendations(
    State(service): State<Arc<Service>>,
    user_id: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Recommendation>, Error> {
    let user_id = user(user_id)?;
    let ask = ask(&service, query)?;
    Ok(Json(service.recommendations(&user_id, ask).await?))
}

/// The one `k` of a query: given at most once, and only ASCII digits (no sign, no spaces, no
/// `+` or `%20`); its range is checked by `Service::parse_k`.
fn k_param(query: &[(String, String)]) -> Result<Option<&str>, Error> {
    match single(query, "k").map_err(Error::InvalidK)? {
        Some(raw) if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) => {
            Err(Error::InvalidK(format!("k must be an integer written in digits only, got {raw:?}")))
        }
        k => Ok(k),
    }
}

/// The value of a query parameter that may be given at most once.
fn single<'a>(query: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, String> {
    let mut values = query.iter().filter(|(n, _)| n == name).map(|(_, value)| value.as_str());
    let first = values.next();
    match values.count() {
        0 => Ok(first),
        more => Err(format!("{name} is given {} times, give it once", more + 1)),
    }
}

/// A history that is not in Redis (an anonymous session).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    /// Item ids, oldest first, as in `user_profile:<id>` (at most MAX_PROFILE_ITEMS).
    pub history: Vec<String>,
    /// Items to return, 1..=MAX_K (default DEFAULT_K).
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 100)]
    pub k: Option<serde_json::Number>,
}

/// Ranks a history sent in the body (a shopper who is not logged in); writes nothing.
#[utoipa::path(
    post,
    path = "/recommend",
    tag = "recommendations",
    params(("explain" = Option<bool>, Query, description = "Add the per-stage trace")),
    request_body = HistoryRequest,
    responses(
        (status = 200, description = "Computed now; nothing is written", body = Recommendation),
        (status = 400, description = "invalid_k / invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized (API_TOKEN set)", body = ErrorBody),
        (status = 413, description = "payload_too_large: over MAX_PROFILE_BYTES", body = ErrorBody),
        (status = 422, description = "invalid_body / profile_too_long", body = ErrorBody),
        (status = 429, description = "overloaded (Retry-After)", body = ErrorBody),
        (status = 500, description = "inference_failed / internal_error", body = ErrorBody),
        (status = 503, description = "deadline_exceeded / models_loading / engine_stopped", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
async fn recommend_history(
    State(service): State<Arc<Service>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Recommendation>, Error> {
    let Ask { explain, .. } = ask(&service, query)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(e.body_text()),
        _ => Error::InvalidBody(e.body_text()),
    })?;
    let request: HistoryRequest = serde_json::from_slice(&body).map_err(|e| {
        Error::InvalidBody(format!("expected {{\"history\": [\"<item id>\", ...], \"k\": <1..>}}: {e}"))
    })?;
    // JSON Schema's integers include 30.0.
    let k = match request.k.map(|n| n.as_i64().or(n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))) {
        None => service.parse_k(None)?,
        Some(Some(k)) => service.parse_k(Some(&k.to_string()))?,
        Some(None) => return Err(Error::InvalidK("k must be an integer".into())),
    };
    Ok(Json(service.rank_history(&request.history, Ask { k, explain }).await?))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health/live", tag = "ops", responses((status = 200, description = "Alive", body = Live)))]
async fn live() -> Json<Live> {
    Json(Live { status: "alive".into() })
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Live {
    /// Always `alive`.
    pub status: String,
}

/// Readiness: the models are loaded and warmed up, and Redis accepts writes.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub model_loaded: bool,
    pub model_version: Option<String>,
    pub model_dir: Option<String>,
    /// `ok`, or `error: <why>`.
    pub redis: String,
    /// The Redis deployment (single, cluster, sentinel) and each node's role and state.
    pub redis_topology: TopologyReport,
    pub device: Option<String>,
    pub catalog_items: Option<usize>,
    /// Stage 1's candidate search: `exact`, or `ivf lists=L probes=P` (the approximate index).
    pub candidate_search: Option<String>,
    /// With the Kafka ingestion in this process: `ok`, or `failing: <why>; fallback: file <path>`
    /// (or `none`) while dead letters cannot be written to the topic (ingestion goes on; status 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_dead_letter: Option<String>,
    /// `unhealthy`, when unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Models loaded and warmed up, and Redis accepting writes (`/health` and `/health/ready`).
async fn readiness(service: &Service) -> Health {
    let (redis, redis_topology) = tokio::join!(service.store.check_writable(), service.store.topology_report());
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
    Health {
        status: if healthy { "healthy" } else { "unhealthy" }.into(),
        model_loaded: set.is_some(),
        model_version: set.as_ref().map(|s| s.info.version.clone()),
        model_dir: set.as_ref().map(|s| s.dir.display().to_string()),
        redis: redis_status,
        redis_topology,
        device: set.as_ref().map(|s| s.info.device.clone()),
        catalog_items: set.as_ref().map(|s| s.catalog.len()),
        candidate_search: set.as_ref().map(|s| s.info.candidate_search.clone()),
        ingest_dead_letter: service.ingest_dead_letter.report(),
        error: (!healthy).then(|| "unhealthy".into()),
        detail: (!healthy).then(|| problems.join("; ")),
    }
}

/// Readiness (the same as `/health/ready`).
#[utoipa::path(
    get,
    path = "/health",
    tag = "ops",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: the reason is in `detail`", body = Health),
    ),
)]
async fn health(State(service): State<Arc<Service>>) -> Response {
    let body = readiness(&service).await;
    let status = if body.error.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Readiness, for orchestrators that probe it by this name.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "ops",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: the reason is in `detail`", body = Health),
    ),
)]
async fn ready(state: State<Arc<Service>>) -> Response {
    health(state).await
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")),
)]
async fn metrics(State(service): State<Arc<Service>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], service.metrics.render()).into_response()
}

async fn not_found(request: Request) -> Error {
    Error::NotFound(format!("no route for {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

/// This document: OpenAPI 3.1, generated from the route and type definitions.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")),
)]
async fn openapi_json() -> Response {
    static DOC: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| <ApiDoc as utoipa::OpenApi>::openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], DOC.as_str()).into_response()
}

/// The API's OpenAPI document (served at `/openapi.json`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "model-service",
        description = "Recommendations: LightGCN -> DIN -> RankNet between Redis and HTTP. Every error is JSON {\"error\", \"detail\"}."
    ),
    paths(recommend, recommendations, recommend_history, health, ready, live, metrics, openapi_json, reload),
    modifiers(&BearerScheme),
    tags(
        (name = "recommendations", description = "Ranking and cache-first reads"),
        (name = "ops", description = "Health, metrics, this document"),
        (name = "admin", description = "Model reload (API_TOKEN, or the loopback ADMIN_PORT)"),
    ),
)]
pub struct ApiDoc;

/// The `bearer` security scheme (`Authorization: Bearer <API_TOKEN>`), required when API_TOKEN is set.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
