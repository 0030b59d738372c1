//! `GET /metrics` and `GET /api/v1/stats`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use super::openapi::ErrorBody;
use super::{ApiError, ApiState};
use crate::telemetry::{Format, RenderError, stats};

/// The Prometheus text exposition, or OpenMetrics 1.0 with exemplars when the `Accept` header
/// prefers it (as Prometheus does). Rendering is CPU work proportional to the number of series,
/// so it runs on the blocking pool rather than on a worker that serves requests.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "observe",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The Prometheus text exposition (0.0.4), or OpenMetrics 1.0 with exemplars when the `Accept` header prefers it",
            content(
                (String = "text/plain; version=0.0.4; charset=utf-8"),
                (String = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
            )),
        (status = 401, description = "`unauthorized`: a token with the `metrics` scope exists and none was sent", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `metrics` scope", body = ErrorBody),
        (status = 404, description = "`metrics_disabled`: `[metrics] enabled = false`", body = ErrorBody),
        (status = 500, description = "`metrics_encoding_failed`", body = ErrorBody),
        (status = 503, description = "`metrics_unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn metrics(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    metrics_of(State(state.telemetry.clone()), headers).await
}

pub(super) async fn metrics_of(
    State(telemetry): State<crate::telemetry::Telemetry>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let format = Format::negotiate((!accept.is_empty()).then_some(accept.as_str()));
    let rendered = tokio::task::spawn_blocking(move || telemetry.render_as(format))
        .await
        .map_err(|_| unavailable("rendering the metrics failed"))?
        .map_err(render_error)?;
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type()),
            // Caches must keep one answer per Accept.
            (header::VARY, "accept"),
        ],
        rendered,
    )
        .into_response())
}

/// Totals, success rate, latency percentiles and per-dispatcher counts, as JSON.
#[utoipa::path(
    get,
    path = "/api/v1/stats",
    operation_id = "stats",
    tag = "observe",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Totals, rates, latency and per-dispatcher counts", body = stats::Stats),
        (status = 401, description = "`unauthorized`: a token with the `metrics` scope exists and none was sent", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `metrics` scope", body = ErrorBody),
        (status = 404, description = "`metrics_disabled`: `[metrics] enabled = false`", body = ErrorBody),
        (status = 500, description = "`metrics_encoding_failed`", body = ErrorBody),
        (status = 503, description = "`metrics_unavailable`, `overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn stats(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<stats::Stats>, ApiError> {
    let telemetry = state.telemetry.clone();
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || {
        let families = telemetry.gather()?;
        let ids = engine.dispatchers().iter().map(|d| d.id());
        Ok(stats::compute(&families, telemetry.namespace(), ids))
    })
    .await
    .map_err(|_| unavailable("computing the stats failed"))?
    .map(Json)
    .map_err(render_error)
}

fn render_error(error: RenderError) -> ApiError {
    error.into()
}

fn unavailable(message: &'static str) -> ApiError {
    ApiError::MetricsUnavailable(message)
}
