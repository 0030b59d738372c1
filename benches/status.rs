//! The status page: rendering the HTML of a report, and the whole `GET /` and
//! `GET /api/v1/status` through the router (health, statistics, a metrics gather, the page).

#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::Request;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dispatchd::config::MetricsConfig;
use dispatchd::engine::Engine;
use dispatchd::health::HealthRegistry;
use dispatchd::http::{ApiState, StatusReport, render_status, router};
use dispatchd::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn report(dispatchers: usize) -> StatusReport {
    let rows: Vec<serde_json::Value> = (0..dispatchers)
        .map(|i| {
            serde_json::json!({
                "dispatcher_id": format!("worker-{i:04}"), "health": "healthy",
                "state": "running", "origin": "remote", "critical": false,
                "heartbeat_age_seconds": 1.5, "stale_threshold_seconds": 120.0, "reason": null,
                "calls": 123_456, "errors": 12, "refusals": 3, "error_ratio": 0.0001,
                "rate_per_second": 41.7, "latency_p50_ms": 1.25, "latency_p99_ms": 9.5,
                "breaker": "closed"
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "version": "0.1.0", "instance": "eu-1a", "uptime_seconds": 86_400.0,
        "readiness": {"status": "ready", "reasons": []},
        "dispatchers": rows,
        "sinks": [{"sink": "events", "queue_depth": 0, "received": 1, "sent": 1, "retried": 0,
                   "dropped": 0, "dead_lettered": 0}],
        "bus": {"kind": "memory", "publishing": "ok"}
    }))
    .unwrap()
}

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("status_render");
    for dispatchers in [10, 200] {
        let report = report(dispatchers);
        group.bench_with_input(
            BenchmarkId::from_parameter(dispatchers),
            &report,
            |b, report| b.iter(|| render_status(report, 5)),
        );
    }
    group.finish();
}

fn request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("status_request");
    for workers in [10, 200] {
        let app = runtime.block_on(async {
            let health = HealthRegistry::new(Default::default(), None);
            for i in 0..workers {
                health
                    .register_worker(&format!("worker-{i:04}"), None, false, Default::default())
                    .await
                    .unwrap();
            }
            let telemetry = Telemetry::new(&MetricsConfig {
                enabled: true,
                namespace: String::new(),
                cardinality_limit: 2000,
            });
            let state = ApiState::new(
                Engine::builder().build().unwrap(),
                telemetry,
                health,
                CancellationToken::new(),
            );
            router(state, 1024)
        });
        for path in ["/", "/api/v1/status"] {
            group.bench_function(BenchmarkId::new(path, workers), |b| {
                b.to_async(&runtime).iter(|| {
                    let app = app.clone();
                    async move {
                        let response = app
                            .oneshot(Request::get(path).body(Body::empty()).unwrap())
                            .await
                            .unwrap();
                        assert_eq!(response.status(), 200);
                        axum::body::to_bytes(response.into_body(), usize::MAX)
                            .await
                            .unwrap()
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, render, request);
criterion_main!(benches);
