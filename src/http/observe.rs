//! `GET /metrics` and `GET /api/v1/stats`.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState};
use crate::telemetry::{CONTENT_TYPE, RenderError, stats};

/// The Prometheus text exposition. Rendering is CPU work proportional to the number of series,
/// so it runs on the blocking pool rather than on a worker that serves requests.
pub(super) async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    metrics_of(State(state.telemetry.clone())).await
}

pub(super) async fn metrics_of(
    State(telemetry): State<crate::telemetry::Telemetry>,
) -> Result<Response, ApiError> {
    let rendered = tokio::task::spawn_blocking(move || telemetry.render())
        .await
        .map_err(|_| unavailable("rendering the metrics failed"))?
        .map_err(render_error)?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], rendered).into_response())
}

/// Totals, success rate, latency percentiles and per-dispatcher counts, as JSON.
pub(super) async fn stats(State(state): State<ApiState>) -> Result<Json<stats::Stats>, ApiError> {
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
