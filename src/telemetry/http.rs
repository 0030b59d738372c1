//! The HTTP API's own metrics: `http_server_request_duration_seconds`, `http_auth_failures_total`,
//! `http_requests_shed_total` and `http_connections_closed_total`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
use super::scrape::{OwnFamily, Point, Series};
use super::striped::LatencyHistogram;

/// Instruments for the HTTP server, created once per [`super::Telemetry`] and shared.
#[derive(Clone)]
pub struct HttpMetrics {
    durations: Arc<Durations>,
    auth_failures: Counter<u64>,
    shed: Counter<u64>,
    connections_closed: Counter<u64>,
}

/// `http_server_request_duration_seconds`, kept by dispatchd per thread ([`super::striped`])
/// as the engine's latency histograms are, and written by the scrape; into the SDK's histogram
/// too only when a reader other than `/metrics` reads it (OTLP).
struct Durations {
    /// By route template, then (method, status): a row per label set seen. Bounded: routes are
    /// the API's templates, methods the ten of [`method_label`], statuses the few the API
    /// answers; past the cardinality limit, rows record into the overflow series.
    rows: RwLock<HashMap<String, Vec<Row>>>,
    /// Series made so far (and attempts past the limit).
    series: AtomicUsize,
    cardinality_limit: usize,
    /// Labelled as the SDK labels its overflow series (`metric_cardinality_overflow` reports it).
    overflow: OnceLock<Arc<LatencyHistogram>>,
    sdk: Option<Histogram<f64>>,
}

/// One route's method and status.
struct Row {
    method: &'static str,
    status: u16,
    histogram: Arc<LatencyHistogram>,
    sdk: Option<BoundHistogram<f64>>,
}

impl Row {
    fn record(&self, seconds: f64) {
        self.histogram.record(seconds);
        if let Some(sdk) = &self.sdk {
            sdk.record(seconds);
        }
    }
}

impl HttpMetrics {
    pub(super) fn new(
        meter: &Meter,
        cardinality_limit: usize,
        sdk_histograms: bool,
    ) -> HttpMetrics {
        HttpMetrics {
            durations: Arc::new(Durations {
                rows: RwLock::default(),
                series: AtomicUsize::new(0),
                cardinality_limit,
                overflow: OnceLock::new(),
                sdk: sdk_histograms
                    .then(|| histogram(meter, catalog::HTTP_SERVER_REQUEST_DURATION)),
            }),
            auth_failures: counter(meter, catalog::HTTP_AUTH_FAILURES),
            shed: counter(meter, catalog::HTTP_REQUESTS_SHED),
            connections_closed: counter(meter, catalog::HTTP_CONNECTIONS_CLOSED),
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
        let matches = |row: &&Row| row.method == method && row.status == status;
        if let Some(rows) = self.durations.rows.read().get(route) {
            if let Some(row) = rows.iter().find(matches) {
                row.record(seconds);
                return;
            }
        }
        let mut routes = self.durations.rows.write();
        let rows = routes.entry(route.to_owned()).or_default();
        if let Some(row) = rows.iter().find(matches) {
            row.record(seconds);
            return;
        }
        let durations = &self.durations;
        let histogram =
            if durations.series.fetch_add(1, Ordering::Relaxed) < durations.cardinality_limit {
                Arc::default()
            } else {
                durations.overflow.get_or_init(Arc::default).clone()
            };
        let row = Row {
            method,
            status,
            histogram,
            sdk: durations.sdk.as_ref().map(|sdk| {
                sdk.bind(&[
                    KeyValue::new(label::HTTP_ROUTE, route.to_owned()),
                    KeyValue::new(label::HTTP_REQUEST_METHOD, method),
                    KeyValue::new(label::HTTP_RESPONSE_STATUS_CODE, i64::from(status)),
                ])
            }),
        };
        row.record(seconds);
        rows.push(row);
    }

    /// `http_server_request_duration_seconds` as it stands, for the scrape.
    pub(super) fn own_family(&self) -> OwnFamily {
        let durations = &self.durations;
        let mut series: Vec<Series<'static>> = Vec::new();
        for (route, rows) in durations.rows.read().iter() {
            for row in rows {
                // Read after the row: a row that holds the overflow series was given it after
                // the overflow series was made, so this sees it.
                let overflow = durations.overflow.get();
                if overflow.is_some_and(|overflow| Arc::ptr_eq(overflow, &row.histogram)) {
                    continue;
                }
                // As the exporter writes the SDK's attributes: sorted by key, and the keys'
                // dots made underscores.
                series.push(Series {
                    labels: vec![
                        (
                            Cow::Borrowed("http_request_method"),
                            Cow::Borrowed(row.method),
                        ),
                        (
                            Cow::Borrowed("http_response_status_code"),
                            Cow::Owned(row.status.to_string()),
                        ),
                        (Cow::Borrowed("http_route"), Cow::Owned(route.clone())),
                    ],
                    value: Point::Histogram(Box::new(row.histogram.point())),
                });
            }
        }
        if let Some(overflow) = durations.overflow.get() {
            series.push(Series {
                labels: vec![(Cow::Borrowed(super::OVERFLOW_LABEL), Cow::Borrowed("true"))],
                value: Point::Histogram(Box::new(overflow.point())),
            });
        }
        OwnFamily {
            spec: catalog::HTTP_SERVER_REQUEST_DURATION,
            series,
        }
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
