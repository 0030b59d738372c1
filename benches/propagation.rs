//! Reading W3C trace context on ingest: dispatchd's strict `extract_http` against the SDK's
//! `TraceContextPropagator` alone (what ingest did before validation), on the same headers.

#![allow(clippy::unwrap_used)]

use axum::http::{HeaderMap, HeaderValue};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The SDK's view of a header map, as ingest had it.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for &(name, value) in pairs {
        headers.append(name, HeaderValue::from_static(value));
    }
    headers
}

fn extract(c: &mut Criterion) {
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let inputs = [
        ("none", headers(&[("content-type", "application/json")])),
        ("traceparent", headers(&[("traceparent", traceparent)])),
        (
            "traceparent_tracestate_2",
            headers(&[
                ("traceparent", traceparent),
                ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ]),
        ),
        (
            "traceparent_tracestate_8",
            headers(&[
                ("traceparent", traceparent),
                (
                    "tracestate",
                    "a=1,b=2,c=3,d=4,rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,t@sys=x,z=9",
                ),
            ]),
        ),
        (
            "invalid",
            headers(&[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            )]),
        ),
    ];
    let mut group = c.benchmark_group("extract");
    for (name, headers) in &inputs {
        group.bench_with_input(BenchmarkId::new("strict", name), headers, |b, headers| {
            b.iter(|| dispatchd::propagation::extract_http(headers))
        });
        group.bench_with_input(BenchmarkId::new("sdk", name), headers, |b, headers| {
            b.iter(|| TraceContextPropagator::new().extract(&Headers(headers)))
        });
    }
    group.finish();
}

criterion_group!(benches, extract);
criterion_main!(benches);
