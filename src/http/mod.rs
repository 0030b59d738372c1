//! The HTTP interface: health, ingest, and (with later parts) metrics and admin.
//!
//! Owns: the axum `Router`, request parsing, the JSON error shape and the mapping from a
//! dispatch status to an HTTP status.
//!
//! Invariants: every error answer is `{"error":{"code","message"}}` with a 4xx/5xx status,
//! including unknown paths, wrong methods and oversized bodies; nothing a client sends can
//! panic a handler; internal error text is never sent as is.
//!
//! Must not: hold any state of its own beyond what [`ApiState`] carries, or bind sockets (the
//! `app` binds; tests call [`router`] with `oneshot`).

mod error;
mod messages;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
pub use error::ApiError;
pub use messages::{IngestBody, status_code};

/// What the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub engine: Engine,
    pub started: Instant,
    /// Cancelled when the shutdown grace period ends: requests still dispatching then answer
    /// 503 instead of holding the process open.
    pub abandon: CancellationToken,
}

impl ApiState {
    pub fn new(engine: Engine) -> ApiState {
        ApiState {
            engine,
            started: Instant::now(),
            abandon: CancellationToken::new(),
        }
    }
}

/// Builds the whole API. `max_body_bytes` bounds every request body.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/messages/{topic}", post(messages::ingest))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Liveness: answers while the process serves, whatever the dispatchers' state.
async fn health(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
    }))
}
