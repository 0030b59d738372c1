use std::sync::Arc;

use async_trait::async_trait;
use axum::http::Method;
use serde_json::json;

use super::*;
use crate::config::MetricsConfig;
use crate::engine::{
    Category, CommandAdapter, Dispatcher, Effect, Engine, Envelope, Handler, HandlerError, Message,
    OutputMessage, Route, RulePolicy,
};

fn config(namespace: &str, cardinality_limit: usize) -> MetricsConfig {
    MetricsConfig {
        enabled: true,
        namespace: namespace.to_owned(),
        cardinality_limit,
    }
}

struct Ok1;

#[async_trait]
impl Handler for Ok1 {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

struct Broken;

#[async_trait]
impl Handler for Broken {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Err(HandlerError::permanent("no"))
    }
}

struct Adapter;

#[async_trait]
impl CommandAdapter for Adapter {
    fn name(&self) -> &'static str {
        "ops"
    }

    async fn execute(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

fn instrumented(telemetry: &Telemetry) -> Engine {
    let builder = Engine::builder()
        .dispatcher(Dispatcher::new("ok", Category::Event, Ok1))
        .dispatcher(Dispatcher::new("broken", Category::Intent, Broken))
        .dispatcher(
            Dispatcher::command("ops", Adapter)
                .with_policy(RulePolicy::new("freeze", Effect::Allow).deny("deploy")),
        )
        .route(Route::new("r1", "**", Category::Event, "ok"))
        .route(Route::new("r2", "**", Category::Intent, "broken"))
        .route(Route::new("r3", "**", Category::Command, "ops"));
    let ids: Vec<String> = builder.dispatcher_ids().map(str::to_owned).collect();
    let strategy = telemetry
        .engine_strategy(ids.iter().map(String::as_str))
        .unwrap();
    builder.instrumentation(Arc::new(strategy)).build().unwrap()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

#[tokio::test]
async fn dispatches_are_counted_by_category_status_dispatcher_and_result() {
    let telemetry = Telemetry::new(&config("", 2000));
    let engine = instrumented(&telemetry);
    for _ in 0..5 {
        engine
            .dispatch("a.events", &Envelope::new("t", json!({})))
            .await;
    }
    engine
        .dispatch("a.intents", &Envelope::new("t", json!({})))
        .await;
    engine
        .dispatch("not-a-topic", &Envelope::new("t", json!({})))
        .await;
    engine
        .dispatch("a.commands", &Envelope::new("restart", json!({})))
        .await;
    engine
        .dispatch("a.commands", &Envelope::new("deploy", json!({})))
        .await;

    let text = telemetry.render().unwrap();
    let at = |series: &str| sample(&text, series);
    assert_eq!(
        at(r#"dispatch_messages_total{category="event",status="success"}"#),
        Some(5.0)
    );
    assert_eq!(
        at(r#"dispatch_duration_seconds_count{category="event",status="success"}"#),
        Some(5.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="intent",status="dispatcher_error"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="unknown",status="invalid_message"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="ok",result="success"}"#),
        Some(5.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="broken",result="error"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="ops",result="denied"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="command",status="denied"}"#),
        Some(1.0),
        "a policy's refusal is not a dispatcher_error"
    );
    assert_eq!(
        at(r#"dispatcher_execution_duration_seconds_count{dispatcher_id="ok"}"#),
        Some(5.0)
    );
    assert_eq!(
        at(r#"dispatcher_execution_duration_seconds_count{dispatcher_id="ops"}"#),
        Some(1.0),
        "the denied call has no latency; the allowed one has"
    );
    assert_eq!(
        at(r#"dispatcher_adapter_invocations_total{adapter="ops",command_type="restart"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_policy_denials_total{policy="freeze"}"#),
        Some(1.0)
    );
    assert!(!text.contains("otel_scope"), "scope labels are off");
    assert!(text.contains(r#"target_info{service_name="dispatchd",service_version=""#));
}

/// The two dispatch counters are atomics the SDK observes at each scrape: an engine built again
/// on the same telemetry (a second strategy) adds to the same series, each message once, and the
/// counts of a dropped engine stay, so the counters never go back.
#[tokio::test]
async fn engines_built_again_count_into_the_same_series_and_never_go_back() {
    let telemetry = Telemetry::new(&config("", 2000));
    let first = instrumented(&telemetry);
    for _ in 0..3 {
        first
            .dispatch("a.events", &Envelope::new("t", json!({})))
            .await;
    }
    let text = telemetry.render().unwrap();
    assert_eq!(
        sample(
            &text,
            r#"dispatch_messages_total{category="event",status="success"}"#
        ),
        Some(3.0)
    );
    assert!(
        !text.contains(r#"dispatch_messages_total{category="intent""#),
        "a series appears with its first message"
    );
    let second = instrumented(&telemetry);
    drop(first);
    // A strategy made from the shared instruments directly, as an embedder would.
    let third = Engine::builder()
        .dispatcher(Dispatcher::new("ok", Category::Event, Ok1))
        .route(Route::new("r1", "**", Category::Event, "ok"))
        .instrumentation(Arc::new(MetricsStrategy::new(
            telemetry.engine_metrics().unwrap(),
            ["ok"],
        )))
        .build()
        .unwrap();
    third
        .dispatch("a.events", &Envelope::new("t", json!({})))
        .await;
    for _ in 0..2 {
        second
            .dispatch("a.events", &Envelope::new("t", json!({})))
            .await;
    }
    second
        .dispatch("a.intents", &Envelope::new("t", json!({})))
        .await;
    let text = telemetry.render().unwrap();
    let at = |series: &str| sample(&text, series);
    assert_eq!(
        at(r#"dispatch_messages_total{category="event",status="success"}"#),
        Some(6.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="ok",result="success"}"#),
        Some(6.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="intent",status="dispatcher_error"}"#),
        Some(1.0)
    );
    // The latency histograms are ours, shared the same way.
    assert_eq!(
        at(r#"dispatch_duration_seconds_count{category="event",status="success"}"#),
        Some(6.0)
    );
    assert_eq!(
        at(r#"dispatcher_execution_duration_seconds_count{dispatcher_id="ok"}"#),
        Some(6.0)
    );
    assert_eq!(
        text.matches("dispatch_duration_seconds_count{").count(),
        2,
        "each series once: {text}"
    );
    assert_eq!(
        text.matches("dispatch_messages_total{").count(),
        2,
        "each series once: {text}"
    );
    assert!(text.contains("# TYPE dispatch_messages_total counter"));
    assert!(text.contains("# TYPE dispatcher_executions_total counter"));
}

/// A dispatcher with de-duplication and a rate limiter of one token (never refilled on paused
/// time): a new message runs, its duplicate skips, another new message is rejected.
#[tokio::test(start_paused = true)]
async fn skips_and_rejections_are_counted_as_results_without_a_latency() {
    use crate::resilience::{
        DedupConfig, Protections, RateLimitConfig, RateLimitMode, ResilienceConfig,
    };
    use std::num::NonZeroU32;

    let telemetry = Telemetry::new(&config("", 2000));
    let protections = Protections::new(
        "guarded",
        &ResilienceConfig {
            dedup: Some(DedupConfig {
                scope: Default::default(),
                ttl: std::time::Duration::from_secs(60),
                capacity: 10,
            }),
            rate_limit: Some(RateLimitConfig {
                scope: Default::default(),
                per_second: NonZeroU32::MIN,
                burst: NonZeroU32::MIN,
                mode: RateLimitMode::Reject,
            }),
            ..ResilienceConfig::default()
        },
        None,
    );
    let builder = Engine::builder()
        .dispatcher(Dispatcher::new("guarded", Category::Event, Ok1).with_protections(protections))
        .route(Route::new("r", "**", Category::Event, "guarded"));
    let strategy = telemetry.engine_strategy(["guarded"]).unwrap();
    let engine = builder.instrumentation(Arc::new(strategy)).build().unwrap();
    let message = Envelope::new("t", json!({})).with_message_id("m-1");
    for (envelope, status) in [
        (message.clone(), "success"),
        (message, "skipped"),
        (Envelope::new("t", json!({})), "rejected"),
    ] {
        let result = engine.dispatch("a.events", &envelope).await;
        assert_eq!(result.status.as_str(), status);
    }

    let text = telemetry.render().unwrap();
    let at = |series: &str| sample(&text, series);
    for result in ["success", "skipped", "rejected"] {
        assert_eq!(
            at(&format!(
                r#"dispatcher_executions_total{{dispatcher_id="guarded",result="{result}"}}"#
            )),
            Some(1.0),
            "{result}"
        );
        assert_eq!(
            at(&format!(
                r#"dispatch_messages_total{{category="event",status="{result}"}}"#
            )),
            Some(1.0),
            "{result}"
        );
    }
    assert_eq!(
        at(r#"dispatcher_execution_duration_seconds_count{dispatcher_id="guarded"}"#),
        Some(1.0),
        "only the call that ran has a latency"
    );
}

#[tokio::test]
async fn command_type_labels_are_capped() {
    let telemetry = Telemetry::new(&config("", 2000));
    let engine = instrumented(&telemetry);
    for n in 0..(MAX_COMMAND_TYPE_LABELS + 10) {
        engine
            .dispatch("a.commands", &Envelope::new(format!("type{n}"), json!({})))
            .await;
    }
    // A type seen before the cap keeps its own series after it.
    engine
        .dispatch("a.commands", &Envelope::new("type0", json!({})))
        .await;
    let text = telemetry.render().unwrap();
    assert_eq!(
        sample(
            &text,
            r#"dispatcher_adapter_invocations_total{adapter="ops",command_type="type0"}"#
        ),
        Some(2.0)
    );
    let series = text
        .lines()
        .filter(|l| l.starts_with("dispatcher_adapter_invocations_total{"))
        .count();
    assert_eq!(series, MAX_COMMAND_TYPE_LABELS + 1);
    assert_eq!(
        sample(
            &text,
            r#"dispatcher_adapter_invocations_total{adapter="ops",command_type="other"}"#
        ),
        Some(10.0)
    );
}

#[tokio::test]
async fn a_namespace_prefixes_every_name() {
    let telemetry = Telemetry::new(&config("ns", 2000));
    let engine = instrumented(&telemetry);
    engine
        .dispatch("a.events", &Envelope::new("t", json!({})))
        .await;
    let text = telemetry.render().unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(names.contains(&"ns_dispatch_messages_total"), "{names:?}");
    assert!(names.contains(&"ns_dispatcher_worker_threads"), "{names:?}");
    for name in names {
        assert!(name.starts_with("ns_") || name == "target_info", "{name}");
    }
    assert_eq!(telemetry.namespace(), "ns");
}

#[test]
fn disabled_telemetry_builds_nothing() {
    let telemetry = Telemetry::new(&MetricsConfig {
        enabled: false,
        namespace: String::new(),
        cardinality_limit: 2000,
    });
    assert!(!telemetry.is_enabled());
    assert!(telemetry.engine_strategy(["a"]).is_none());
    assert!(telemetry.http_metrics().is_none());
    assert_eq!(telemetry.render(), Err(RenderError::Disabled));
    assert!(matches!(
        Telemetry::unavailable("boom").render(),
        Err(RenderError::Unavailable(reason)) if reason == "boom"
    ));
}

#[test]
fn passing_the_cardinality_limit_is_reported() {
    let telemetry = Telemetry::new(&config("", 5));
    let http = telemetry.http_metrics().unwrap();
    for n in 0..4 {
        http.request_finished(&format!("/route{n}"), &Method::GET, 200, 0.01);
    }
    assert!(
        !telemetry
            .render()
            .unwrap()
            .contains("metric_cardinality_overflow")
    );
    for n in 4..20 {
        http.request_finished(&format!("/route{n}"), &Method::GET, 200, 0.01);
    }
    let text = telemetry.render().unwrap();
    assert!(text.contains(r#"otel_metric_overflow="true""#), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"metric_cardinality_overflow{metric="http_server_request_duration_seconds"}"#
        ),
        Some(1.0)
    );
    assert!(text.contains("# TYPE metric_cardinality_overflow gauge"));
}

#[test]
fn cache_metrics_are_bound_per_cache_and_count_every_operation() {
    use crate::resilience::{CacheOperation, CacheResult, ResilienceObserver};
    let telemetry = Telemetry::new(&config("", 2000));
    let metrics = ResilienceMetrics::new(telemetry.meter().unwrap());
    for cache in ["dedup.a", "dedup.b"] {
        metrics.cache_operation(cache, CacheOperation::Get, CacheResult::Hit);
        metrics.cache_operation(cache, CacheOperation::Get, CacheResult::Hit);
        for _ in 0..41 {
            metrics.cache_operation(cache, CacheOperation::Expire, CacheResult::None);
        }
    }
    metrics.cache_hit_ratio("dedup.a", 0.25);
    metrics.cache_hit_ratio("dedup.a", 0.5);
    let text = telemetry.render().unwrap();
    for cache in ["dedup.a", "dedup.b"] {
        let series = |operation: &str, result: &str| {
            format!(
                r#"dispatcher_cache_operations_total{{cache="{cache}",operation="{operation}",result="{result}"}}"#
            )
        };
        assert_eq!(sample(&text, &series("get", "hit")), Some(2.0), "{text}");
        assert_eq!(sample(&text, &series("expire", "none")), Some(41.0));
    }
    assert_eq!(
        sample(&text, r#"dispatcher_cache_hit_ratio{cache="dedup.a"}"#),
        Some(0.5)
    );
}

/// A dedup cache records through the instruments its observer handed it when it was built, also
/// behind several observers at once, and the counts are the same as by name.
#[test]
fn a_dedup_cache_records_through_its_own_bound_instruments() {
    use std::sync::Arc;

    use crate::resilience::{DedupCache, DedupConfig, Observers, ResilienceObserver};
    let telemetry = Telemetry::new(&config("", 2000));
    let metrics: Arc<dyn ResilienceObserver> =
        Arc::new(ResilienceMetrics::new(telemetry.meter().unwrap()));
    let config = DedupConfig {
        scope: Default::default(),
        ttl: std::time::Duration::from_secs(60),
        capacity: 100,
    };
    let direct = DedupCache::new("dedup.a".into(), config, Some(metrics.clone()));
    let both = Observers(vec![metrics.clone(), Arc::new(Observers::default())]);
    let behind = DedupCache::new("dedup.b".into(), config, Some(Arc::new(both)));
    for cache in [&direct, &behind] {
        assert!(!cache.contains("m1"));
        cache.remember("m1");
        assert!(cache.contains("m1"));
        assert!(cache.contains("m1"));
    }
    let text = telemetry.render().unwrap();
    for cache in ["dedup.a", "dedup.b"] {
        let series = |operation: &str, result: &str| {
            format!(
                r#"dispatcher_cache_operations_total{{cache="{cache}",operation="{operation}",result="{result}"}}"#
            )
        };
        assert_eq!(sample(&text, &series("get", "miss")), Some(1.0), "{text}");
        assert_eq!(sample(&text, &series("get", "hit")), Some(2.0), "{text}");
        assert_eq!(sample(&text, &series("set", "none")), Some(1.0), "{text}");
        let ratio = format!(r#"dispatcher_cache_hit_ratio{{cache="{cache}"}}"#);
        let expected = 2.0 / 3.0;
        assert!(
            sample(&text, &ratio).is_some_and(|r| (r - expected).abs() < 1e-9),
            "{ratio}: {text}"
        );
    }
}

/// The SDK's copies of the latency histograms cost a dispatch about 30 ns each: they are
/// recorded only when a reader other than `/metrics` (OTLP) reads the SDK.
#[tokio::test]
async fn the_sdk_histograms_are_recorded_only_for_a_reader_of_their_own() {
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::reader::MetricReader;

    for sdk_histograms in [false, true] {
        let reader = scrape::Reader::new();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let metrics = EngineMetrics::new(&provider.meter("t"), 2000, sdk_histograms);
        let engine = Engine::builder()
            .dispatcher(Dispatcher::new("ok", Category::Event, Ok1))
            .route(Route::new("r1", "**", Category::Event, "ok"))
            .instrumentation(Arc::new(MetricsStrategy::new(metrics.clone(), ["ok"])))
            .build()
            .unwrap();
        for _ in 0..3 {
            engine
                .dispatch("a.events", &Envelope::new("t", json!({})))
                .await;
        }
        let mut collected = ResourceMetrics::default();
        reader.collect(&mut collected).unwrap();
        let counts: Vec<(String, u64)> = collected
            .scope_metrics()
            .flat_map(|scope| scope.metrics())
            .filter_map(|metric| match metric.data() {
                AggregatedMetrics::F64(MetricData::Histogram(histogram)) => Some((
                    metric.name().to_owned(),
                    histogram.data_points().map(|point| point.count()).sum(),
                )),
                _ => None,
            })
            .filter(|(_, count)| *count > 0)
            .collect();
        if sdk_histograms {
            assert_eq!(
                counts,
                [
                    ("dispatch_duration".to_owned(), 3),
                    ("dispatcher_execution_duration".to_owned(), 3)
                ]
            );
        } else {
            assert!(counts.is_empty(), "{counts:?}");
        }
        // Ours count either way.
        let own = metrics.own_families();
        let count = |n: usize| match &own[n].series[0].value {
            scrape::Point::Histogram(point) => point.count,
            scrape::Point::Number(_) => 0,
        };
        assert_eq!((count(0), count(1)), (3, 3));
    }
}
