//! The HTTP API's own metrics: `http_server_request_duration_seconds`, `http_auth_failures_total`,
//! `http_requests_shed_total` and `http_connections_closed_total`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundHistogram, Counter, Histogram, Meter};
use parking_lot::RwLock;

use super::catalog::{self, label};
use super::engine::{counter, histogram};

/// Instruments for the HTTP server, created once.
#[derive(Clone)]
pub struct HttpMetrics {
    duration: Histogram<f64>,
    auth_failures: Counter<u64>,
    shed: Counter<u64>,
    connections_closed: Counter<u64>,
    /// `duration` bound to each (route, method, status) seen, so a request records without
    /// building attributes or the SDK looking its series up. Bounded: routes are the API's
    /// templates, methods the ten of [`method_label`], statuses the few the API answers.
    bound: Arc<RwLock<HashMap<String, Vec<BoundDuration>>>>,
}

/// `duration` bound to one route's method and status.
struct BoundDuration {
    method: &'static str,
    status: u16,
    histogram: BoundHistogram<f64>,
}

impl HttpMetrics {
    pub fn new(meter: &Meter) -> HttpMetrics {
        HttpMetrics {
            duration: histogram(meter, catalog::HTTP_SERVER_REQUEST_DURATION),
            auth_failures: counter(meter, catalog::HTTP_AUTH_FAILURES),
            shed: counter(meter, catalog::HTTP_REQUESTS_SHED),
            connections_closed: counter(meter, catalog::HTTP_CONNECTIONS_CLOSED),
            bound: Arc::default(),
        }
    }

    /// A request refused by access control; `reason` is `missing`, `invalid` or `forbidden`.
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures
            .add(1, &[KeyValue::new(label::REASON, reason)]);
    }

    /// A request refused instead of served; `reason` is `in_flight` or `timeout` (503) or
    /// `body_too_slow` (408).
    pub fn shed(&self, reason: &'static str) {
        self.shed.add(1, &[KeyValue::new(label::REASON, reason)]);
    }

    /// A connection the server closed on its own; `reason` is `idle` or `evicted`.
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .add(1, &[KeyValue::new(label::REASON, reason)]);
    }

    /// Runs `next` for `request`, then records how long it took under `route`, the matched
    /// template. A 405 is not recorded: it is the router's answer to a method the path does not
    /// have (the client's, like a path that matches no route), not a handler's.
    pub async fn time(&self, route: &str, request: Request, next: Next) -> Response {
        let started = Instant::now();
        let method = request.method().clone();
        let response = next.run(request).await;
        if response.status() != StatusCode::METHOD_NOT_ALLOWED {
            self.request_finished(
                route,
                &method,
                response.status().as_u16(),
                started.elapsed().as_secs_f64(),
            );
        }
        response
    }

    /// Records one request. `route` is the matched template (`/api/v1/messages/{topic}`),
    /// never the raw path, so a client cannot create series.
    pub fn request_finished(&self, route: &str, method: &Method, status: u16, seconds: f64) {
        let method = method_label(method);
        let matches = |bound: &&BoundDuration| bound.method == method && bound.status == status;
        if let Some(bound) = self.bound.read().get(route) {
            if let Some(bound) = bound.iter().find(matches) {
                bound.histogram.record(seconds);
                return;
            }
        }
        let mut routes = self.bound.write();
        let bound = routes.entry(route.to_owned()).or_default();
        if let Some(bound) = bound.iter().find(matches) {
            bound.histogram.record(seconds);
            return;
        }
        let histogram = self.duration.bind(&[
            KeyValue::new(label::HTTP_ROUTE, route.to_owned()),
            KeyValue::new(label::HTTP_REQUEST_METHOD, method),
            KeyValue::new(label::HTTP_RESPONSE_STATUS_CODE, i64::from(status)),
        ]);
        histogram.record(seconds);
        bound.push(BoundDuration {
            method,
            status,
            histogram,
        });
    }
}

/// The semantic-conventions method set; anything else is `_OTHER`, so a client cannot invent
/// label values with custom methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// Middleware (installed with `route_layer`, so it sees the matched route) that times each
/// request ([`HttpMetrics::time`]). Requests that match no route are not recorded: their paths
/// are the client's.
///
/// For an embedder's own router: dispatchd's API times its requests in its guard instead (one
/// layer less per request), through the same [`HttpMetrics::time`].
pub async fn record_http(
    State(metrics): State<HttpMetrics>,
    request: Request,
    next: Next,
) -> Response {
    // A reference-counted string: no copy of the template per request.
    match request.extensions().get::<MatchedPath>().cloned() {
        Some(route) => metrics.time(route.as_str(), request, next).await,
        None => next.run(request).await,
    }
}
