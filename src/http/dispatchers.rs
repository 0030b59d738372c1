//! Readiness, dispatcher health, and the lifecycle API for out-of-process workers.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::Body;
use super::messages::check_content_type;
use super::{ApiError, ApiState};
use crate::engine::is_valid_id;
use crate::health::{DispatcherHealth, Origin, RegistryUnavailable, StatsSnapshot, WorkerError};

/// `GET /ready`: 200 when the engine runs and every critical dispatcher of this process is
/// healthy; 503 with the reasons otherwise, and while shutting down. The body also shows the
/// bus's state. Out-of-process workers are listed but never count: a worker's health is not this
/// instance's fault, and making it unready would have a balancer drain a healthy instance.
pub(super) async fn ready(State(state): State<ApiState>) -> Response {
    // Without waiting on a shared registry: the workers as of its last snapshot.
    let all = state.health.all();
    let unhealthy: Vec<serde_json::Value> = all
        .iter()
        .filter(|h| !h.healthy)
        .map(|h| {
            json!({
                "dispatcher_id": h.dispatcher_id,
                "critical": h.critical,
                "origin": h.origin,
                "reason": h.reason,
            })
        })
        .collect();
    let counts = json!({
        "total": all.len(),
        "healthy": all.iter().filter(|h| h.healthy).count(),
        "stale": all.iter().filter(|h| h.is_stale).count(),
    });
    let (verdict, status) = verdict(&state, &all);
    let mut body = json!({ "status": verdict, "dispatchers": counts, "unhealthy": unhealthy });
    // Reported, never a reason to be unready: every instance shares the bus, so failing
    // readiness on it would take all of them out of rotation while dispatch still works.
    if let Some(bus) = &state.events {
        body["bus"] = json!(bus.status());
    }
    (status, Json(body)).into_response()
}

/// `/ready`'s verdict on `all` (the registry's dispatchers now), and its HTTP status; the status
/// page shows the same.
pub(super) fn verdict(state: &ApiState, all: &[DispatcherHealth]) -> (&'static str, StatusCode) {
    if state.draining.is_cancelled() {
        ("shutting_down", StatusCode::SERVICE_UNAVAILABLE)
    } else if all
        .iter()
        .any(|h| h.origin == Origin::InProcess && h.critical && !h.healthy)
    {
        ("not_ready", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ready", StatusCode::OK)
    }
}

#[derive(Debug, Serialize)]
pub(super) struct DispatcherList {
    dispatchers: Vec<DispatcherHealth>,
    total: usize,
    healthy: usize,
    stale: usize,
}

/// `GET /api/v1/dispatchers`: with a shared registry, its workers as Redis holds them now (503
/// `registry_unavailable` when it cannot be read, never an old or "stale" answer).
pub(super) async fn list(State(state): State<ApiState>) -> Result<Json<DispatcherList>, ApiError> {
    let dispatchers = state.health.list().await.map_err(unavailable)?;
    Ok(Json(DispatcherList {
        total: dispatchers.len(),
        healthy: dispatchers.iter().filter(|h| h.healthy).count(),
        stale: dispatchers.iter().filter(|h| h.is_stale).count(),
        dispatchers,
    }))
}

/// One dispatcher's health and, for a dispatcher of this engine, its statistics.
#[derive(Debug, Serialize)]
pub(super) struct DispatcherDetail {
    #[serde(flatten)]
    health: DispatcherHealth,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<StatsSnapshot>,
}

/// `GET /api/v1/dispatchers/{id}`.
pub(super) async fn one(
    State(state): State<ApiState>,
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
#[derive(Debug, Serialize)]
struct RouteView<'a> {
    route_id: &'a str,
    topic_pattern: &'a str,
    message_category: crate::engine::Category,
    message_type: Option<&'a str>,
    dispatcher_id: &'a str,
    enabled: bool,
}

/// `GET /api/v1/routes`: every route of the engine, enabled or not, in registration order.
pub(super) async fn routes(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let routes: Vec<RouteView<'_>> = state
        .engine
        .routes()
        .iter()
        .map(|r| RouteView {
            route_id: &r.route_id,
            topic_pattern: &r.topic_pattern,
            message_category: r.message_category,
            message_type: r.message_type.as_deref(),
            dispatcher_id: &r.dispatcher_id,
            enabled: r.enabled,
        })
        .collect();
    Json(json!({ "total": routes.len(), "routes": routes }))
}

fn unavailable(error: RegistryUnavailable) -> ApiError {
    ApiError::RegistryUnavailable(error.to_string())
}

/// The optional body of a registration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    stale_threshold_seconds: Option<f64>,
    #[serde(default)]
    critical: bool,
    /// An http(s) URL: messages routed to a `worker` dispatcher of this id are pushed there.
    endpoint: Option<String>,
}

/// `POST /api/v1/dispatchers/{id}/register`: a worker announces itself (again, after a
/// restart).
pub(super) async fn register(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<DispatcherHealth>, ApiError> {
    valid_id(&id)?;
    let body: RegisterBody = if body.iter().all(u8::is_ascii_whitespace) {
        RegisterBody::default()
    } else {
        check_content_type(&headers)?;
        serde_json::from_slice(&body)
            .map_err(|error| ApiError::from_json(&body, &error, "registration"))?
    };
    let stale_threshold = match body.stale_threshold_seconds {
        None => None,
        Some(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 1e9 => {
            Some(std::time::Duration::from_secs_f64(seconds))
        }
        Some(_) => {
            return Err(ApiError::InvalidRegistration(
                "stale_threshold_seconds must be a number of seconds above 0".to_owned(),
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
pub(super) async fn heartbeat(
    State(state): State<ApiState>,
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

/// `POST /api/v1/dispatchers/{id}/unregister`.
pub(super) async fn unregister(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    valid_id(&id)?;
    state
        .health
        .unregister_worker(&id)
        .await
        .map_err(|error| worker_error(&id, error))?;
    Ok(Json(json!({ "dispatcher_id": id, "unregistered": true })))
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
