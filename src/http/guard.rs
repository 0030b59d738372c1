//! What stands between a client and a handler: access control, load shedding and the request
//! deadline.
//!
//! Order, outermost first: the token check (cheapest, and an unauthenticated caller must not take
//! a slot), then the in-flight bound (a full server answers at once instead of queueing), then
//! the deadline. `/health`, `/ready` and `/metrics` are never shed or timed out: they are how an
//! operator sees an overloaded process.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;
use crate::auth::{Denied, Scope, Tokens};
use crate::telemetry::HttpMetrics;

/// The guard's configuration and counters. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    tokens: Arc<Tokens>,
    in_flight: Arc<Semaphore>,
    request_timeout: Duration,
    metrics: Option<HttpMetrics>,
}

impl Guard {
    pub fn new(
        tokens: Tokens,
        max_in_flight: usize,
        request_timeout: Duration,
        metrics: Option<HttpMetrics>,
    ) -> Guard {
        Guard {
            tokens: Arc::new(tokens),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            request_timeout,
            metrics,
        }
    }

    /// No tokens, a large bound and a long deadline: what `router` installs by default.
    pub fn open() -> Guard {
        Guard::new(
            Tokens::default(),
            Semaphore::MAX_PERMITS,
            Duration::from_secs(3600),
            None,
        )
    }

    /// The scope a request needs, or `None` when it is open to anyone.
    fn scope(&self, method: &Method, path: &str) -> Option<Scope> {
        if self.tokens.is_empty() {
            return None;
        }
        match path {
            "/health" | "/ready" => None,
            "/metrics" | "/api/v1/stats" => self
                .tokens
                .any_with(Scope::Metrics)
                .then_some(Scope::Metrics),
            _ if path.starts_with("/api/v1/messages/") && method == Method::POST => {
                Some(Scope::Ingest)
            }
            _ if path == "/api/v1/dispatchers" || path.starts_with("/api/v1/dispatchers/") => {
                Some(Scope::Admin)
            }
            // Anything else is a 404 or 405 whoever asks.
            _ => None,
        }
    }
}

/// Never shed or timed out.
fn is_observability(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

pub(super) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if let Some(scope) = guard.scope(request.method(), path) {
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if let Err(denied) = guard.tokens.check(authorization, scope) {
            if let Some(metrics) = &guard.metrics {
                metrics.auth_failed(denied.as_str());
            }
            return refused(denied);
        }
    }
    if is_observability(path) {
        return next.run(request).await;
    }
    let Ok(_permit) = guard.in_flight.clone().try_acquire_owned() else {
        if let Some(metrics) = &guard.metrics {
            metrics.shed("in_flight");
        }
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "dispatchd is handling as many requests as it allows; retry shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    match tokio::time::timeout(guard.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            if let Some(metrics) = &guard.metrics {
                metrics.shed("timeout");
            }
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "request_timeout",
                "the request was not answered within server.request_timeout; it may have been dispatched in part",
            )
            .into_response()
        }
    }
}

/// 401 for no token or an unknown one (the same answer for both: no hint about which tokens
/// exist), 403 for a known token without the scope.
fn refused(denied: Denied) -> Response {
    match denied {
        Denied::Missing | Denied::Invalid => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dispatchd\""),
            );
            response
        }
        Denied::Forbidden => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token does not allow this request",
        )
        .into_response(),
    }
}
