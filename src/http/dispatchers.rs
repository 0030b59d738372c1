//! Readiness, dispatcher health, and the lifecycle API for out-of-process workers.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

use super::error::Body;
use super::messages::check_content_type;
use super::openapi::ErrorBody;
use super::{ApiError, ApiState};
use crate::engine::is_valid_id;
use crate::health::{DispatcherHealth, Origin, RegistryUnavailable, StatsSnapshot, WorkerError};

/// The readiness answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Readiness {
    status: Verdict,
    dispatchers: Counts,
    /// Every unhealthy dispatcher, in-process or worker, and why.
    unhealthy: Vec<Unhealthy>,
    /// The event bus; absent when this process publishes no events.
    #[serde(skip_serializing_if = "Option::is_none")]
    bus: Option<BusView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum Verdict {
    Ready,
    NotReady,
    ShuttingDown,
}

impl Verdict {
    /// As `/ready` writes it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Verdict::Ready => "ready",
            Verdict::NotReady => "not_ready",
            Verdict::ShuttingDown => "shutting_down",
        }
    }

    pub(super) fn http_status(self) -> StatusCode {
        match self {
            Verdict::Ready => StatusCode::OK,
            Verdict::NotReady | Verdict::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct Counts {
    total: usize,
    healthy: usize,
    stale: usize,
}

#[derive(Debug, Serialize, ToSchema)]
struct Unhealthy {
    dispatcher_id: String,
    critical: bool,
    origin: Origin,
    reason: Option<String>,
}

/// The bus as `/ready` shows it.
#[derive(Debug, Serialize, ToSchema)]
struct BusView {
    /// `memory`, `redis`, or `custom` for an embedder's bus.
    kind: &'static str,
    publishing: crate::bus::Publishing,
}

/// `GET /ready`: 200 when the engine runs and every critical dispatcher of this process is
/// healthy; 503 with the reasons otherwise, and while shutting down. The body also shows the
/// bus's state. Out-of-process workers are listed but never count: a worker's health is not this
/// instance's fault, and making it unready would have a balancer drain a healthy instance.
#[utoipa::path(
    get,
    path = "/ready",
    operation_id = "ready",
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Ready: every critical in-process dispatcher is healthy", body = Readiness),
        (status = 503, description = "`not_ready` (a critical dispatcher is unhealthy) or `shutting_down`", body = Readiness),
    )
)]
pub(super) async fn ready(State(state): State<Arc<ApiState>>) -> (StatusCode, Json<Readiness>) {
    // Without waiting on a shared registry: the workers as of its last snapshot.
    let all = state.health.all();
    let unhealthy = all
        .iter()
        .filter(|h| !h.healthy)
        .map(|h| Unhealthy {
            dispatcher_id: h.dispatcher_id.clone(),
            critical: h.critical,
            origin: h.origin,
            reason: h.reason.clone(),
        })
        .collect();
    let dispatchers = Counts {
        total: all.len(),
        healthy: all.iter().filter(|h| h.healthy).count(),
        stale: all.iter().filter(|h| h.is_stale).count(),
    };
    let verdict = verdict(&state, &all);
    let status = verdict.http_status();
    // Reported, never a reason to be unready: every instance shares the bus, so failing
    // readiness on it would take all of them out of rotation while dispatch still works.
    let bus = state.events.as_ref().map(|bus| {
        let status = bus.status();
        BusView {
            kind: status.kind,
            publishing: status.publishing,
        }
    });
    (
        status,
        Json(Readiness {
            status: verdict,
            dispatchers,
            unhealthy,
            bus,
        }),
    )
}

/// `/ready`'s verdict on `all` (the registry's dispatchers now); the status page shows the same.
pub(super) fn verdict(state: &ApiState, all: &[DispatcherHealth]) -> Verdict {
    if state.draining.is_cancelled() {
        Verdict::ShuttingDown
    } else if all
        .iter()
        .any(|h| h.origin == Origin::InProcess && h.critical && !h.healthy)
    {
        Verdict::NotReady
    } else {
        Verdict::Ready
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DispatcherList {
    dispatchers: Vec<DispatcherHealth>,
    total: usize,
    healthy: usize,
    stale: usize,
}

/// `GET /api/v1/dispatchers`: with a shared registry, its workers as Redis holds them now (503
/// `registry_unavailable` when it cannot be read, never an old or "stale" answer).
#[utoipa::path(
    get,
    path = "/api/v1/dispatchers",
    operation_id = "list_dispatchers",
    tag = "dispatchers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every dispatcher's health, in-process and workers", body = DispatcherList),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `admin` scope", body = ErrorBody),
        (status = 503, description = "`registry_unavailable`, `overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<DispatcherList>, ApiError> {
    let dispatchers = state.health.list().await.map_err(unavailable)?;
    Ok(Json(DispatcherList {
        total: dispatchers.len(),
        healthy: dispatchers.iter().filter(|h| h.healthy).count(),
        stale: dispatchers.iter().filter(|h| h.is_stale).count(),
        dispatchers,
    }))
}

/// One dispatcher's health and, for a dispatcher of this engine, its statistics.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DispatcherDetail {
    #[serde(flatten)]
    health: DispatcherHealth,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<StatsSnapshot>,
}

/// The `{id}` of the dispatcher routes, as the description states it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct DispatcherId {
    /// A dispatcher id: 1 to 128 characters of `[A-Za-z0-9_.-]` (400 `invalid_dispatcher_id`
    /// otherwise on the worker routes).
    #[param(pattern = r"^[A-Za-z0-9_.-]{1,128}$")]
    id: String,
}

/// `GET /api/v1/dispatchers/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/dispatchers/{id}",
    operation_id = "get_dispatcher",
    tag = "dispatchers",
    params(DispatcherId),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Its health, and its statistics when it runs in this process", body = DispatcherDetail),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "`unknown_dispatcher`", body = ErrorBody),
        (status = 503, description = "`registry_unavailable`, `overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn one(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<DispatcherDetail>, ApiError> {
    let health = state
        .health
        .dispatcher(&id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| unknown(&id))?;
    let stats = state.stats.as_ref().and_then(|stats| stats.get(&id));
    Ok(Json(DispatcherDetail { health, stats }))
}

/// One route as `GET /api/v1/routes` lists it: the config's keys.
#[derive(Debug, Serialize, ToSchema)]
struct RouteView {
    route_id: String,
    topic_pattern: String,
    message_category: crate::engine::Category,
    message_type: Option<String>,
    dispatcher_id: String,
    enabled: bool,
}

/// Every route of the engine.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RouteList {
    total: usize,
    routes: Vec<RouteView>,
}

/// `GET /api/v1/routes`: every route of the engine, enabled or not, in registration order.
#[utoipa::path(
    get,
    path = "/api/v1/routes",
    operation_id = "list_routes",
    tag = "dispatchers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every route, enabled or not, in registration order", body = RouteList),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `admin` scope", body = ErrorBody),
        (status = 503, description = "`overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn routes(State(state): State<Arc<ApiState>>) -> Json<RouteList> {
    let routes: Vec<RouteView> = state
        .engine
        .routes()
        .iter()
        .map(|r| RouteView {
            route_id: r.route_id.to_string(),
            topic_pattern: r.topic_pattern.to_string(),
            message_category: r.message_category,
            message_type: r.message_type.as_deref().map(str::to_owned),
            dispatcher_id: r.dispatcher_id.to_string(),
            enabled: r.enabled,
        })
        .collect();
    Json(RouteList {
        total: routes.len(),
        routes,
    })
}

fn unavailable(error: RegistryUnavailable) -> ApiError {
    ApiError::RegistryUnavailable(error.to_string())
}

/// The optional body of a registration.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterBody {
    /// Seconds without a heartbeat after which it is stale: from 0.001 to
    /// `[health] max_stale_threshold` (the description served states this instance's, as
    /// `maximum`); default `[health] stale_threshold`.
    #[schema(minimum = 0.001)]
    stale_threshold_seconds: Option<f64>,
    #[serde(default)]
    critical: bool,
    /// An http(s) URL: messages routed to a `worker` dispatcher of this id are pushed there.
    #[schema(format = "uri", pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]+")]
    endpoint: Option<String>,
}

/// `POST /api/v1/dispatchers/{id}/register`: a worker announces itself (again, after a
/// restart).
#[utoipa::path(
    post,
    path = "/api/v1/dispatchers/{id}/register",
    operation_id = "register_worker",
    tag = "dispatchers",
    params(DispatcherId),
    request_body(content = Option<RegisterBody>, description = "Optional: no body, or `null`, registers with the defaults", content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Registered (again): its health now", body = DispatcherHealth),
        (status = 400, description = "`invalid_dispatcher_id`, `invalid_json` or `invalid_body`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `admin` scope", body = ErrorBody),
        (status = 409, description = "`in_process_dispatcher`: the id is a dispatcher of this process", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 408, description = "`body_too_slow`", body = ErrorBody),
        (status = 503, description = "`registry_unavailable`, `overloaded` or `request_timeout`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a body that is not JSON", body = ErrorBody),
        (status = 422, description = "`invalid_registration`", body = ErrorBody),
        (status = 429, description = "`too_many_workers`: `[health] max_workers` are registered", body = ErrorBody),
    )
)]
pub(super) async fn register(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<DispatcherHealth>, ApiError> {
    valid_id(&id)?;
    let body: RegisterBody = if body.iter().all(u8::is_ascii_whitespace) {
        RegisterBody::default()
    } else {
        check_content_type(&headers)?;
        // `null`, like no body, registers with the defaults (the description's body is an
        // optional object).
        serde_json::from_slice::<Option<RegisterBody>>(&body)
            .map_err(|error| ApiError::from_json(&body, &error, "registration"))?
            .unwrap_or_default()
    };
    let stale_threshold = match body.stale_threshold_seconds {
        None => None,
        Some(seconds) if seconds.is_finite() && (0.001..=1e9).contains(&seconds) => {
            Some(std::time::Duration::from_secs_f64(seconds))
        }
        Some(_) => {
            return Err(ApiError::InvalidRegistration(
                "stale_threshold_seconds must be a number of seconds from 0.001".to_owned(),
            ));
        }
    };
    let mut extra = serde_json::Map::new();
    if let Some(text) = body.endpoint.as_deref() {
        // Validated here, stored as given: the registry carries it to every instance.
        endpoint(text)?;
        extra.insert("endpoint".to_owned(), text.into());
    }
    state
        .health
        .register_worker(&id, stale_threshold, body.critical, extra)
        .await
        .map(Json)
        .map_err(|error| worker_error(&id, error))
}

/// A worker's endpoint: an absolute http(s) URL with a host.
fn endpoint(text: &str) -> Result<reqwest::Url, ApiError> {
    let invalid = |why: String| {
        ApiError::InvalidRegistration(format!(
            "endpoint must be an http(s) URL such as http://10.0.0.7:8080/dispatch: {why}"
        ))
    };
    let url = reqwest::Url::parse(text).map_err(|error| invalid(error.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("the scheme is `{}`", url.scheme())));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".to_owned()));
    }
    Ok(url)
}

/// `POST /api/v1/dispatchers/{id}/heartbeat`.
#[utoipa::path(
    post,
    path = "/api/v1/dispatchers/{id}/heartbeat",
    operation_id = "heartbeat_worker",
    tag = "dispatchers",
    params(DispatcherId),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Its health now", body = DispatcherHealth),
        (status = 400, description = "`invalid_dispatcher_id`", body = ErrorBody),
        (status = 404, description = "`unknown_dispatcher`: register first", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `admin` scope", body = ErrorBody),
        (status = 409, description = "`in_process_dispatcher`: the id is a dispatcher of this process", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 408, description = "`body_too_slow`", body = ErrorBody),
        (status = 503, description = "`registry_unavailable`, `overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn heartbeat(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<DispatcherHealth>, ApiError> {
    valid_id(&id)?;
    state
        .health
        .heartbeat_worker(&id)
        .await
        .map(Json)
        .map_err(|error| worker_error(&id, error))
}

/// The answer to an unregistration.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Unregistered {
    dispatcher_id: String,
    /// Always true.
    unregistered: bool,
}

/// `POST /api/v1/dispatchers/{id}/unregister`.
#[utoipa::path(
    post,
    path = "/api/v1/dispatchers/{id}/unregister",
    operation_id = "unregister_worker",
    tag = "dispatchers",
    params(DispatcherId),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Unregistered", body = Unregistered),
        (status = 400, description = "`invalid_dispatcher_id`", body = ErrorBody),
        (status = 404, description = "`unknown_dispatcher`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `admin` scope", body = ErrorBody),
        (status = 409, description = "`in_process_dispatcher`: the id is a dispatcher of this process", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 408, description = "`body_too_slow`", body = ErrorBody),
        (status = 503, description = "`registry_unavailable`, `overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn unregister(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Unregistered>, ApiError> {
    valid_id(&id)?;
    state
        .health
        .unregister_worker(&id)
        .await
        .map_err(|error| worker_error(&id, error))?;
    Ok(Json(Unregistered {
        dispatcher_id: id,
        unregistered: true,
    }))
}

/// The answer a worker gets when its registration, heartbeat or unregistration fails.
fn worker_error(id: &str, error: WorkerError) -> ApiError {
    match error {
        WorkerError::Refused(error) => error.into(),
        WorkerError::Unknown(_) => unknown(id),
        error @ WorkerError::Unavailable(_) => ApiError::RegistryUnavailable(error.to_string()),
    }
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(invalid_id())
    }
}

fn invalid_id() -> ApiError {
    ApiError::InvalidDispatcherId
}

fn unknown(id: &str) -> ApiError {
    ApiError::UnknownDispatcher(id.to_owned())
}
