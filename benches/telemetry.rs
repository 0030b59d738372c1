//! Metric recording and scrape rendering.

#![allow(clippy::unwrap_used)]

mod common;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dispatchd::config::MetricsConfig;
use dispatchd::telemetry::Telemetry;
use opentelemetry::KeyValue;

fn telemetry(cardinality_limit: usize) -> Telemetry {
    Telemetry::new(&MetricsConfig {
        enabled: true,
        namespace: String::new(),
        cardinality_limit,
    })
}

/// What the SDK costs per recording, unbound (attributes hashed per call) and bound.
fn recording(c: &mut Criterion) {
    let telemetry = telemetry(2000);
    let meter = telemetry.meter().unwrap();
    let counter = meter.u64_counter("bench_counter").build();
    let histogram = meter
        .f64_histogram("bench_histogram")
        .with_boundaries(vec![0.001, 0.01, 0.1, 1.0])
        .build();
    let attributes = [
        KeyValue::new("category", "event"),
        KeyValue::new("status", "success"),
    ];
    let mut group = c.benchmark_group("record");
    group.bench_function("counter_add_2_attributes", |b| {
        b.iter(|| counter.add(1, &attributes))
    });
    group.bench_function("histogram_record_2_attributes", |b| {
        b.iter(|| histogram.record(0.004, &attributes))
    });
    let bound_counter = counter.bind(&attributes);
    let bound_histogram = histogram.bind(&attributes);
    group.bench_function("bound_counter_add", |b| b.iter(|| bound_counter.add(1)));
    group.bench_function("bound_histogram_record", |b| {
        b.iter(|| bound_histogram.record(0.004))
    });
    group.finish();
}

/// `http_server_request_duration_seconds` per request, as the API's guard records it after each
/// answer: on one thread, and on two at once (each thread's time per request), as the service's
/// workers do.
fn http_request(c: &mut Criterion) {
    use axum::http::Method;
    let telemetry = telemetry(2000);
    let http = telemetry.http_metrics().unwrap();
    let record = || {
        http.request_finished(
            std::hint::black_box("/api/v1/messages/{topic}"),
            &Method::POST,
            200,
            std::hint::black_box(0.000_42),
        )
    };
    record();
    let mut group = c.benchmark_group("http_metrics");
    group.bench_function("request_finished", |b| b.iter(record));
    group.bench_function("request_finished_2_threads", |b| {
        b.iter_custom(|iters| common::on_two_threads(iters, record))
    });
    group.finish();
}

/// Rendering `/metrics` with N counter series beside dispatchd's own, in both formats, and the
/// way it was rendered before (opentelemetry-prometheus, `Registry::gather`, `TextEncoder`) on
/// the same series, measured in the same run.
fn render(c: &mut Criterion) {
    use dispatchd::telemetry::Format;
    use opentelemetry::metrics::MeterProvider;
    use prometheus::Encoder;

    let mut group = c.benchmark_group("render");
    group.sample_size(20);
    for series in [1_000, 10_000] {
        let telemetry = telemetry(series + 10);
        let counter = telemetry
            .meter()
            .unwrap()
            .u64_counter("bench_series")
            .build();
        for n in 0..series {
            counter.add(1, &[KeyValue::new("shard", n.to_string())]);
        }
        let text = telemetry.render().unwrap();
        assert!(
            text.lines()
                .filter(|l| l.starts_with("bench_series_total{"))
                .count()
                == series
        );
        group.bench_function(
            BenchmarkId::from_parameter(format!("{series}_series")),
            |b| b.iter(|| telemetry.render().unwrap()),
        );
        // The same series with shared label values, as dispatchd makes its own (the SDK copies
        // every series' attributes at each collect; a shared string is a reference count).
        let shared = self::telemetry(series + 10);
        let counter = shared.meter().unwrap().u64_counter("bench_series").build();
        for n in 0..series {
            let value = std::sync::Arc::<str>::from(n.to_string());
            counter.add(1, &[KeyValue::new("shard", value)]);
        }
        group.bench_function(
            BenchmarkId::new("shared_labels", format!("{series}_series")),
            |b| b.iter(|| shared.render().unwrap()),
        );
        group.bench_function(
            BenchmarkId::new("openmetrics", format!("{series}_series")),
            |b| b.iter(|| telemetry.render_as(Format::OpenMetrics).unwrap()),
        );
        group.bench_function(
            BenchmarkId::new("gather_only", format!("{series}_series")),
            |b| b.iter(|| telemetry.gather().unwrap()),
        );

        // The reference: the exporter dispatchd used before, on an SDK provider of its own.
        let registry = prometheus::Registry::new();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(
                opentelemetry_prometheus::exporter()
                    .with_registry(registry.clone())
                    .scope_info_enabled(false)
                    .build()
                    .unwrap(),
            )
            .with_view(move |_: &opentelemetry_sdk::metrics::Instrument| {
                opentelemetry_sdk::metrics::Stream::builder()
                    .with_cardinality_limit(series + 10)
                    .build()
                    .ok()
            })
            .build();
        let counter = provider.meter("bench").u64_counter("bench_series").build();
        for n in 0..series {
            counter.add(1, &[KeyValue::new("shard", n.to_string())]);
        }
        // The SDK's collect alone, on a provider with only a manual reader: the floor of any
        // encoder over OpenTelemetry's data.
        let reader =
            std::sync::Arc::new(opentelemetry_sdk::metrics::ManualReader::builder().build());
        let bare = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(SharedReader(reader.clone()))
            .with_view(move |_: &opentelemetry_sdk::metrics::Instrument| {
                opentelemetry_sdk::metrics::Stream::builder()
                    .with_cardinality_limit(series + 10)
                    .build()
                    .ok()
            })
            .build();
        let counter = bare.meter("bench").u64_counter("bench_series").build();
        for n in 0..series {
            counter.add(1, &[KeyValue::new("shard", n.to_string())]);
        }
        group.bench_function(
            BenchmarkId::new("sdk_collect_only", format!("{series}_series")),
            |b| {
                b.iter(|| {
                    use opentelemetry_sdk::metrics::reader::MetricReader;
                    let mut collected =
                        opentelemetry_sdk::metrics::data::ResourceMetrics::default();
                    reader.collect(&mut collected).unwrap();
                    collected
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("reference_exporter", format!("{series}_series")),
            |b| {
                b.iter(|| {
                    let mut buffer = Vec::with_capacity(64 * 1024);
                    prometheus::TextEncoder::new()
                        .encode(&registry.gather(), &mut buffer)
                        .unwrap();
                    buffer
                })
            },
        );
    }
    group.finish();
}

/// A manual reader the bench keeps a handle on while the provider owns it.
#[derive(Debug)]
struct SharedReader(std::sync::Arc<opentelemetry_sdk::metrics::ManualReader>);

impl opentelemetry_sdk::metrics::reader::MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(
        &self,
        rm: &mut opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(
        &self,
        kind: opentelemetry_sdk::metrics::InstrumentKind,
    ) -> opentelemetry_sdk::metrics::Temporality {
        self.0.temporality(kind)
    }
}

criterion_group!(benches, recording, http_request, render);
criterion_main!(benches);
