//! Routes, extractors and response shapes. No business logic: handlers call `Service`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tracing::Instrument;

use crate::api::error::{ApiError, ErrorBody};
use crate::error::Error;
use crate::inference::engine::{EngineState, Reloaded};
use crate::inference::lineup::{Lineup, Variant};
use crate::inference::model_set::ModelSet;
use crate::redis::topology::TopologyReport;
use crate::service::{Ask, Recommendation, Service, MAX_USER_ID_CHARS};

/// Largest request body accepted (the API takes none; this bounds what a client can send).
const BODY_LIMIT: usize = 16 * 1024;

/// What the routers need besides the service.
#[derive(Debug, Clone)]
pub struct Access {
    /// Largest body of `POST /recommend` (a history sent in the request): MAX_PROFILE_BYTES plus
    /// room for the JSON around it.
    pub history_body_limit: usize,
    /// When set, the ranking and admin routes require `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// Largest request target plus headers, in bytes (431 beyond; 414 for the target alone).
    pub max_header_bytes: usize,
    /// Time allowed to receive a request body once its head has arrived (408 beyond).
    pub body_read_timeout: std::time::Duration,
}

impl Access {
    /// From the HTTP settings; an anonymous history's body may be as large as the largest stored
    /// profile read (`max_profile_bytes`) and its JSON wrapping.
    pub fn new(http: &crate::api::settings::HttpArgs, max_profile_bytes: usize) -> Self {
        Self {
            api_token: http.api_token.clone(),
            max_header_bytes: http.max_header_bytes,
            body_read_timeout: http.body_read_timeout(),
            history_body_limit: max_profile_bytes + 4096,
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
    // A route layer added later runs first: the token is checked before a byte of the body is read.
    let read = middleware::from_fn_with_state(access.clone(), read_body);
    let mut app = Router::new();
    if let Routes::Api { .. } = routes {
        app = app.merge(
            Router::new()
                .route("/recommend/{user_id}", post(recommend))
                .route("/recommendations/{user_id}", get(recommendations))
                .route(
                    "/recommend",
                    post(recommend_history).layer(axum::extract::DefaultBodyLimit::max(access.history_body_limit)),
                )
                .route_layer(read.clone())
                .route_layer(middleware::from_fn_with_state(token.clone(), require_token)),
        );
    }
    if !matches!(routes, Routes::Admin) {
        app = app
            .merge(
                Router::new()
                    .route("/health", get(health))
                    .route("/health/ready", get(ready))
                    .route_layer(middleware::from_fn_with_state(token.clone(), note_token)),
            )
            .route("/health/live", get(live))
            .route("/metrics", get(metrics))
            .route("/openapi.json", get(openapi_json))
            .merge(crate::api::docs::routes());
    }
    if matches!(routes, Routes::Api { admin: true } | Routes::Ops { admin: true } | Routes::Admin) {
        let guard = AdminGuard { token, open_without_token: routes == Routes::Admin };
        app = app.merge(
            Router::new()
                .route("/admin/reload", post(reload))
                .route_layer(read)
                .route_layer(middleware::from_fn_with_state(guard, require_admin)),
        );
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(access.clone(), limit_head))
        // outermost: every answer is counted, the head checks' refusals included
        .layer(middleware::from_fn_with_state(service.clone(), track))
        .with_state(service)
}

/// `Ok` when no token is configured or the request carries it (constant-time comparison).
fn check_token(token: Option<&str>, request: &Request) -> Result<(), ApiError> {
    let Some(token) = token else { return Ok(()) };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .unwrap_or("");
    match (same_token(given, token), given.is_empty()) {
        (true, _) => Ok(()),
        (false, true) => Err(ApiError::Unauthorized("a bearer token is required".into())),
        (false, false) => Err(ApiError::Unauthorized("the bearer token is not valid".into())),
    }
}

/// Whether `given` is `token`, in time that depends on neither: the SHA-1 digests of both (20
/// bytes whatever their lengths) are compared byte for byte without stopping at the first
/// difference, so neither the token's length nor a matching prefix shows in the answer's timing.
fn same_token(given: &str, token: &str) -> bool {
    use sha1::{Digest, Sha1};
    let (given, token) = (Sha1::digest(given.as_bytes()), Sha1::digest(token.as_bytes()));
    std::hint::black_box(given.iter().zip(token.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b))) == 0
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

/// The request carries the valid bearer token (API_TOKEN set): `/health` shows the model
/// directory and the Redis nodes' addresses in full only then.
#[derive(Debug, Clone, Copy)]
struct Privileged(bool);

async fn note_token(State(token): State<Option<Arc<String>>>, mut request: Request, next: Next) -> Response {
    let privileged = token.is_some() && check_token(token.as_deref().map(String::as_str), &request).is_ok();
    request.extensions_mut().insert(Privileged(privileged));
    next.run(request).await
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
        return ApiError::Forbidden(
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

/// Bounds on the request head before any route runs: 414 for a target over MAX_HEADER_BYTES, 431
/// when target and headers together exceed it, 501 for a transfer coding other than chunked, 413
/// for a declared body over what the route accepts (BODY_LIMIT; `POST /recommend` takes a history
/// up to MAX_PROFILE_BYTES). No body byte is read here: `read_body` reads it under the token check.
async fn limit_head(State(access): State<Access>, request: Request, next: Next) -> Response {
    match check_head(&access, &request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// Largest body the route of `path` accepts.
fn body_limit(access: &Access, path: &str) -> usize {
    if path == "/recommend" {
        access.history_body_limit
    } else {
        BODY_LIMIT
    }
}

fn check_head(access: &Access, request: &Request) -> Result<(), ApiError> {
    let max = access.max_header_bytes;
    let body_limit = body_limit(access, request.uri().path());
    let target = request.uri().to_string().len();
    if target > max {
        return Err(ApiError::UriTooLong(format!(
            "the request target takes {target} bytes, at most {max} are accepted"
        )));
    }
    let headers: usize = request.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if target + headers > max {
        return Err(ApiError::HeadersTooLarge(format!(
            "the request target and headers take {} bytes, at most {max} are accepted",
            target + headers
        )));
    }
    if let Some(codings) = request.headers().get(header::TRANSFER_ENCODING) {
        let codings = codings.to_str().unwrap_or("?");
        if !codings.split(',').all(|c| c.trim().eq_ignore_ascii_case("chunked")) {
            return Err(ApiError::UnsupportedTransferEncoding(format!("{codings:?}: only chunked is understood")));
        }
    }
    let declared = declared_length(request);
    if declared > body_limit as u64 {
        return Err(ApiError::PayloadTooLarge(format!("{declared} bytes, at most {body_limit} are accepted")));
    }
    Ok(())
}

fn declared_length(request: &Request) -> u64 {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Reads the body whole, so the handler sees it already received: 413 past what the route
/// accepts, 408 when it does not arrive within the body read timeout. A route layer, run after
/// `require_token` / `require_admin`: a request without the token is refused before its body is
/// read, so a client without it cannot hold a connection open by sending a body slowly.
async fn read_body(State(access): State<Access>, request: Request, next: Next) -> Response {
    match received(&access, request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

async fn received(access: &Access, request: Request) -> Result<Request, ApiError> {
    let body_limit = body_limit(access, request.uri().path());
    if declared_length(&request) == 0 && !request.headers().contains_key(header::TRANSFER_ENCODING) {
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
                ApiError::PayloadTooLarge(format!("the body is over {body_limit} bytes"))
            } else {
                ApiError::MalformedRequest(format!("the body could not be read: {e}"))
            });
        }
        Err(_) => {
            return Err(ApiError::RequestTimeout(format!(
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
        (status = 408, description = "request_timeout: the body did not arrive within BODY_READ_TIMEOUT_SECS", body = ErrorBody),
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
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!("at most {BODY_LIMIT} bytes are accepted")),
        _ => ApiError::InvalidRequest(e.body_text()),
    })?;
    let request: ReloadRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReloadRequest::default()
    } else {
        serde_json::from_slice::<Option<ReloadRequest>>(&body)
            .map_err(|e| {
                ApiError::InvalidRequest(format!("the body must be empty or {{\"model_dir\": \"<path>\"}}: {e}"))
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
    /// Add each item's score and rank after every stage, the candidate counts and time per
    /// stage, and what the filters kept out (costs nothing when off).
    pub explain: Option<bool>,
    /// Item ids to leave out of this answer, comma-separated (at most MAX_EXCLUDE, 500; ids not in
    /// the catalog are ignored and counted in `unknown_excluded`). The stored list is the one
    /// without them.
    pub exclude: Option<String>,
}

/// The ask from the query string: `k` and `explain`, each at most once.
fn ask(service: &Service, query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Ask, ApiError> {
    let Query(pairs) =
        query.map_err(|e| Error::InvalidK(format!("the query string is not valid: {}", e.body_text())))?;
    let k = service.parse_k(k_param(&pairs)?)?;
    let explain = match single(&pairs, "explain").map_err(ApiError::InvalidRequest)? {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!("explain must be true or false, got {other:?}")));
        }
    };
    Ok(Ask { k, explain })
}

/// The `exclude` of a query: comma-separated item ids, given at most once (empty entries are
/// skipped); its length is checked by the service (MAX_EXCLUDE).
fn exclude_param(query: &Result<Query<Vec<(String, String)>>, QueryRejection>) -> Result<Vec<String>, ApiError> {
    let Ok(Query(pairs)) = query else { return Ok(Vec::new()) };
    let raw = single(pairs, "exclude").map_err(Error::InvalidExclude)?;
    Ok(raw.map(|r| r.split(',').filter(|id| !id.is_empty()).map(str::to_string).collect()).unwrap_or_default())
}

/// The user id in the path of the ranking routes (documentation: the handlers take it as a string
/// and `service::validate_user_id` checks it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct UserIdPath {
    /// 1..128 characters (Unicode scalar values, as maxLength counts them), each printable: no
    /// whitespace and nothing of the Unicode category Other (control, format such as zero-width
    /// and bidirectional characters or the byte order mark, private use, unassigned). The pattern
    /// lists the allowed characters of the Basic Multilingual Plane (generated from the server's
    /// rule); beyond it, which the pattern leaves out, the server accepts assigned characters that
    /// are not private use or format characters.
    #[param(max_length = 128)]
    user_id: String,
}

/// The errors of ranking a stored profile (`POST /recommend/{user_id}`, `GET /recommendations/{user_id}`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum ProfileRankErrors {
    #[response(
        status = 400,
        description = "invalid_user_id / invalid_k / invalid_exclude (over MAX_EXCLUDE ids, or given twice) / invalid_request"
    )]
    BadRequest(ErrorBody),
    #[response(status = 401, description = "unauthorized (API_TOKEN set)")]
    Unauthorized(ErrorBody),
    #[response(
        status = 408,
        description = "request_timeout: a declared body did not arrive within BODY_READ_TIMEOUT_SECS"
    )]
    Timeout(ErrorBody),
    #[response(status = 413, description = "payload_too_large: a body over 16 KiB (the route reads none)")]
    TooLarge(ErrorBody),
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
    headers: HeaderMap,
) -> Result<Json<Recommendation>, ApiError> {
    let user_id = user(user_id)?;
    let exclude = exclude_param(&query)?;
    let ask = ask(&service, query)?;
    let rec = service.recommend(&user_id, ask, &exclude).await?;
    service.served(request_id(&headers), &user_id, &rec);
    Ok(Json(rec))
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
    headers: HeaderMap,
) -> Result<Json<Recommendation>, ApiError> {
    let user_id = user(user_id)?;
    let exclude = exclude_param(&query)?;
    let ask = ask(&service, query)?;
    let rec = service.recommendations(&user_id, ask, &exclude).await?;
    service.served(request_id(&headers), &user_id, &rec);
    Ok(Json(rec))
}

/// The id `track` gave the request (its `x-request-id`).
fn request_id(headers: &HeaderMap) -> &str {
    headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("")
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
    pub k: Option<Box<serde_json::value::RawValue>>,
    /// Item ids to leave out of the answer (at most MAX_EXCLUDE, 500; ids not in the catalog are
    /// ignored and counted in `unknown_excluded`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The session's id, for the experiment's assignment (as a user id's; it is only hashed, never
    /// stored); absent: the first variant.
    #[schema(min_length = 1, max_length = 128)]
    #[serde(default)]
    pub session_id: Option<String>,
}

/// The `k` of a history request: an integer in 1..=MAX_K (JSON Schema counts 30.0 among the
/// integers); a refusal names it as the client wrote it, however large.
fn body_k(service: &Service, k: Option<&serde_json::value::RawValue>) -> Result<usize, Error> {
    let Some(raw) = k else { return service.parse_k(None) };
    let text = raw.get().trim();
    let number: serde_json::Number =
        serde_json::from_str(text).map_err(|_| Error::InvalidK(format!("k must be an integer, got {text}")))?;
    let integral = number
        .as_i64()
        .or_else(|| number.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < i64::MAX as f64).map(|f| f as i64));
    match integral {
        Some(k) => service.parse_k(Some(&k.to_string())),
        None if number.as_f64().is_some_and(|f| f.fract() != 0.0) => {
            Err(Error::InvalidK(format!("k must be an integer, got {text}")))
        }
        None => Err(Error::InvalidK(format!("k must be between 1 and {}, got {text}", service.max_k()))),
    }
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
        (status = 400, description = "invalid_k / invalid_exclude (over MAX_EXCLUDE ids) / invalid_request (also: k or exclude given in the query; they go in the body)", body = ErrorBody),
        (status = 401, description = "unauthorized (API_TOKEN set)", body = ErrorBody),
        (status = 408, description = "request_timeout: the body did not arrive within BODY_READ_TIMEOUT_SECS", body = ErrorBody),
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
) -> Result<Json<Recommendation>, ApiError> {
    if let Ok(Query(pairs)) = &query {
        if pairs.iter().any(|(name, _)| name == "k") {
            return Err(ApiError::InvalidRequest(
                "k goes in the body of POST /recommend ({\"history\": [...], \"k\": N}), not in the query".into(),
            ));
        }
        if pairs.iter().any(|(name, _)| name == "exclude") {
            return Err(ApiError::InvalidRequest(
                "exclude goes in the body of POST /recommend ({\"history\": [...], \"exclude\": [...]}), not in the query"
                    .into(),
            ));
        }
    }
    let Ask { explain, .. } = ask(&service, query)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(e.body_text()),
        _ => ApiError::InvalidBody(e.body_text()),
    })?;
    let request: HistoryRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::InvalidBody(format!("expected {{\"history\": [\"<item id>\", ...], \"k\": <1..>}}: {e}"))
    })?;
    let k = body_k(&service, request.k.as_deref())?;
    if let Some(session) = &request.session_id {
        let chars = session.chars().count();
        if !(1..=MAX_USER_ID_CHARS).contains(&chars) {
            return Err(ApiError::InvalidRequest(format!(
                "session_id is {chars} characters; 1 to {MAX_USER_ID_CHARS} are allowed"
            )));
        }
    }
    let session = request.session_id.as_deref();
    Ok(Json(service.rank_history(&request.history, session, Ask { k, explain }, &request.exclude).await?))
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
    /// The model directory in service: in full with the API token, else its last component.
    pub model_dir: Option<String>,
    /// `ok`, or `error: <why>`.
    pub redis: String,
    /// The Redis deployment (single, cluster, sentinel) and each node's role and state.
    pub redis_topology: TopologyReport,
    pub device: Option<String>,
    pub catalog_items: Option<usize>,
    /// Stage 1's candidate search: `exact`, or `ivf lists=L probes=P` (the approximate index).
    pub candidate_search: Option<String>,
    /// With EXPERIMENT_FILE: the experiment's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// The model sets in service: each variant (one, `default`, without an experiment), then the
    /// shadow set. The fields above describe the first variant's.
    pub sets: Vec<SetHealth>,
    /// With the Kafka ingestion in this process: `ok`, or `failing: <why>; fallback: file <path>`
    /// (or `none`) while dead letters cannot be written to the topic (ingestion goes on; status 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_dead_letter: Option<String>,
    /// The cached set of unavailable items (`items:unavailable`): its size, its age and, while
    /// Redis holds a value that is refused (another type, over MAX_UNAVAILABLE), why; the last
    /// good set serves meanwhile (status 200).
    pub unavailable_items: crate::service::filters::UnavailableStatus,
    /// `unhealthy`, when unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One model set in service.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SetHealth {
    /// The variant's name (or the shadow set's).
    pub name: String,
    /// `variant` or `shadow`.
    pub role: String,
    /// A variant's percent of the users; the shadow set's percent of the served answers.
    pub share: f64,
    pub model_version: String,
    /// As `model_dir` above: in full with the API token, else its last component.
    pub model_dir: String,
    pub lightgcn_candidates: usize,
    pub din_candidates: usize,
    /// Which form runs each stage (STAGE_RUNTIME): `lightgcn=torchscript din=compiled (batches up
    /// to 1) ranknet=compiled`.
    pub runtime: String,
}

fn set_health(variant: &Variant<ModelSet>, role: &str, share: f64, privileged: bool) -> SetHealth {
    SetHealth {
        name: variant.name.clone(),
        role: role.into(),
        share,
        model_version: variant.set.info.version.clone(),
        model_dir: shown_dir(&variant.set.dir, privileged),
        lightgcn_candidates: variant.candidates.lightgcn,
        din_candidates: variant.candidates.din,
        runtime: variant
            .set
            .info
            .stages
            .iter()
            .map(|s| format!("{}={}", s.stage, s.runtime))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn shown_dir(dir: &std::path::Path, privileged: bool) -> String {
    match (privileged, dir.file_name()) {
        (false, Some(name)) => name.to_string_lossy().into_owned(),
        _ => dir.display().to_string(),
    }
}

fn sets_health(lineup: &Lineup<ModelSet>, privileged: bool) -> Vec<SetHealth> {
    let variants = lineup.variants.iter().map(|v| set_health(v, "variant", v.share, privileged));
    let shadow = lineup.shadow.iter().map(|s| set_health(&s.variant, "shadow", s.sample * 100.0, privileged));
    variants.chain(shadow).collect()
}

/// Models loaded and warmed up, and Redis accepting writes (`/health` and `/health/ready`).
/// Unless `privileged`, the model directory is shown by its last component only and the Redis
/// nodes without their addresses: the probe is open, and these name the host's layout and the
/// network's.
async fn readiness(service: &Service, privileged: bool) -> Health {
    let (redis, redis_topology) = tokio::join!(service.store.check_writable(), service.store.topology_report());
    let (lineup, engine_problem) = match service.engine.state() {
        EngineState::Ready(lineup) => (Some(lineup), None),
        EngineState::Loading => (None, Some("models are loading".to_string())),
        EngineState::Failed(reason) => (None, Some(format!("models failed to load: {reason}"))),
    };
    let redis_status = match &redis {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let set = lineup.as_ref().map(|l| &l.primary().set);
    let problems: Vec<String> = engine_problem.into_iter().chain(redis.err().map(|e| format!("redis: {e}"))).collect();
    let healthy = problems.is_empty();
    Health {
        status: if healthy { "healthy" } else { "unhealthy" }.into(),
        model_loaded: set.is_some(),
        model_version: set.map(|s| s.info.version.clone()),
        model_dir: set.map(|s| shown_dir(&s.dir, privileged)),
        redis: redis_status,
        redis_topology: if privileged { redis_topology } else { redis_topology.without_addresses() },
        device: set.map(|s| s.info.device.clone()),
        catalog_items: set.map(|s| s.catalog.len()),
        candidate_search: set.map(|s| s.info.candidate_search.clone()),
        experiment: lineup.as_ref().and_then(|l| l.experiment.as_ref()).map(|e| e.name.clone()),
        sets: lineup.as_ref().map(|l| sets_health(l, privileged)).unwrap_or_default(),
        ingest_dead_letter: service.ingest_dead_letter.report(),
        unavailable_items: {
            service.unavailable().await; // read again when due, so the report is current
            service.unavailable_status()
        },
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
async fn health(
    State(service): State<Arc<Service>>,
    Extension(Privileged(privileged)): Extension<Privileged>,
) -> Response {
    let body = readiness(&service, privileged).await;
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
async fn ready(state: State<Arc<Service>>, privileged: Extension<Privileged>) -> Response {
    health(state, privileged).await
}

/// Prometheus text exposition.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")),
)]
async fn metrics(State(service): State<Arc<Service>>) -> Response {
    service.unavailable_status(); // sets the set's age
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], service.metrics.render()).into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("no route for {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// This document: OpenAPI 3.1, generated from the route and type definitions.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")),
)]
async fn openapi_json(State(service): State<Arc<Service>>) -> Response {
    // one configuration per process
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let doc = DOC.get_or_init(|| openapi_document(service.max_k()).to_string());
    ([(header::CONTENT_TYPE, "application/json")], doc.as_str()).into_response()
}

/// The OpenAPI document as served: `ApiDoc` with what the server decides at run time written in,
/// so the document and the server agree: `k`'s maximum is the configured MAX_K, and the user id's
/// pattern is generated from the rule `service::validate_user_id` applies.
pub fn openapi_document(max_k: usize) -> serde_json::Value {
    let mut doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap_or_default();
    let pattern = crate::service::user_id_pattern();
    let operations = doc
        .get_mut("paths")
        .and_then(serde_json::Value::as_object_mut)
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|methods| methods.values_mut());
    for operation in operations {
        let parameters = operation.get_mut("parameters").and_then(serde_json::Value::as_array_mut);
        for parameter in parameters.into_iter().flatten() {
            let name = parameter.get("name").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
            let Some(schema) = parameter.get_mut("schema").and_then(serde_json::Value::as_object_mut) else { continue };
            match name.as_str() {
                "k" => {
                    schema.insert("maximum".into(), max_k.into());
                }
                "user_id" => {
                    schema.insert("pattern".into(), pattern.clone().into());
                }
                _ => {}
            }
        }
    }
    if let Some(k) =
        doc.pointer_mut("/components/schemas/HistoryRequest/properties/k").and_then(serde_json::Value::as_object_mut)
    {
        k.insert("maximum".into(), max_k.into());
    }
    doc
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_itself_is_accepted_whatever_the_length_of_the_others() {
        let token = "s3cret-token";
        assert!(same_token(token, token));
        let long = "x".repeat(4096);
        for other in ["", "s", "s3cret-toke", "s3cret-token ", "s3cret-token-longer", "S3cret-token", long.as_str()] {
            assert!(!same_token(other, token), "{other:?}");
        }
        let request = |authorization: &str| {
            Request::builder().header(header::AUTHORIZATION, authorization).body(axum::body::Body::empty()).unwrap()
        };
        assert!(check_token(Some(token), &request("Bearer s3cret-token")).is_ok());
        for refused in ["Bearer s3cret-tok", "Bearer s3cret-token-and-more", "Bearer ", "Bearer x"] {
            assert!(check_token(Some(token), &request(refused)).is_err(), "{refused}");
        }
    }
}
