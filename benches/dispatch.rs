//! The dispatch hot path: routing, running no-op dispatchers and building the result.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dispatchd::config::MetricsConfig;
use dispatchd::engine::{
    Category, Dispatcher, Engine, EngineBuilder, Envelope, Handler, HandlerError,
    InstrumentationStrategy, Message, OutputMessage, Route, Topic,
};
use dispatchd::telemetry::Telemetry;

struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

/// Overrides nothing: measures what the hook calls themselves cost.
struct NoopStrategy;

impl InstrumentationStrategy for NoopStrategy {}

#[derive(Clone, Copy)]
enum Observer {
    None,
    Noop,
    Metrics,
    /// The metrics strategy with OTLP on: the SDK's latency histograms are recorded too.
    MetricsOtlp,
    /// The per-dispatcher statistics of `GET /api/v1/dispatchers/{id}`.
    Stats,
}

fn engine(fan_out: usize, observer: Observer) -> Engine {
    let mut builder = EngineBuilder::new();
    for n in 0..fan_out {
        let id = format!("d{n}");
        builder = builder
            .dispatcher(Dispatcher::new(id.as_str(), Category::Event, Noop))
            .route(Route::new(
                format!("r{n}"),
                "shop.*.events",
                Category::Event,
                id,
            ));
    }
    match observer {
        Observer::None => {}
        Observer::Noop => builder = builder.instrumentation(Arc::new(NoopStrategy)),
        Observer::Metrics | Observer::MetricsOtlp => {
            let config = MetricsConfig {
                enabled: true,
                namespace: String::new(),
                cardinality_limit: 2000,
            };
            let telemetry = if matches!(observer, Observer::Metrics) {
                Telemetry::new(&config)
            } else {
                // Nothing listens there, and nothing is pushed within a benchmark's hour.
                Telemetry::with_otlp(
                    &config,
                    "http://127.0.0.1:9",
                    std::time::Duration::from_secs(3600),
                )
            };
            let ids: Vec<String> = builder.dispatcher_ids().map(str::to_owned).collect();
            let strategy = telemetry
                .engine_strategy(ids.iter().map(String::as_str))
                .unwrap();
            builder = builder.instrumentation(Arc::new(strategy));
            // Kept for the process's life: the OTLP reader's thread, as in the service.
            std::mem::forget(telemetry);
        }
        Observer::Stats => {
            let stats = dispatchd::health::DispatcherStats::new(builder.dispatcher_ids());
            builder = builder.instrumentation(Arc::new(stats));
        }
    }
    builder.build().unwrap()
}

fn dispatch(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let envelope = Envelope::new("order.placed", serde_json::json!({"order_id": 42}));
    let mut group = c.benchmark_group("dispatch");
    for fan_out in [1, 4] {
        for (label, observer) in [
            ("no_strategy", Observer::None),
            ("noop_strategy", Observer::Noop),
            ("metrics_strategy", Observer::Metrics),
            ("metrics_strategy_otlp", Observer::MetricsOtlp),
            ("stats_strategy", Observer::Stats),
        ] {
            let engine = engine(fan_out, observer);
            group.bench_function(
                BenchmarkId::new(label, format!("{fan_out}_dispatchers")),
                |b| {
                    b.to_async(&runtime)
                        .iter(|| engine.dispatch("shop.orders.events", &envelope));
                },
            );
        }
    }
    group.finish();
}

/// 100 routes, a mix of literal, `*` and `**` patterns (a fifth of them start with a wildcard,
/// so they cannot be rejected on the first segment); one of them matches.
fn routing(c: &mut Criterion) {
    let mut builder = EngineBuilder::new().dispatcher(Dispatcher::new("d", Category::Event, Noop));
    for n in 0..100 {
        let pattern = match n % 5 {
            0 => format!("team{n}.orders.events"),
            1 => format!("team{n}.*.events"),
            2 => format!("team{n}.**.events"),
            3 => format!("team{n}.**"),
            _ => format!("*.team{n}.**"),
        };
        builder = builder.route(Route::new(format!("r{n}"), pattern, Category::Event, "d"));
    }
    let engine = builder.build().unwrap();
    let topic = Topic::parse("team98.billing.invoices.events").unwrap();
    assert_eq!(engine.select(&topic, "t").len(), 1);
    c.bench_function("routing/select_100_routes", |b| {
        b.iter(|| engine.select(std::hint::black_box(&topic), "t"));
    });
    c.bench_function("routing/parse_and_select_100_routes", |b| {
        b.iter(|| {
            let topic =
                Topic::parse(std::hint::black_box("team98.billing.invoices.events")).unwrap();
            engine.select(&topic, "t")
        });
    });
}

/// The protections when nothing trips: retry, breaker, a generous rate limiter and dedup, against
/// the same dispatcher bare. Each message has a fresh id (dedup would skip a repeat), in both.
fn protections(c: &mut Criterion) {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use criterion::BatchSize;
    use dispatchd::resilience::{
        BreakerConfig, DedupConfig, Protections, RateLimitConfig, RateLimitMode, ResilienceConfig,
        RetryPolicy, Trip,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = ResilienceConfig {
        retry: Some(RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }),
        breaker: Some(BreakerConfig {
            trip: Trip::ConsecutiveFailures(5),
            cool_down: Duration::from_secs(30),
            half_open_successes: 1,
        }),
        rate_limit: Some(RateLimitConfig {
            scope: Default::default(),
            per_second: NonZeroU32::new(1_000_000_000).unwrap(),
            burst: NonZeroU32::new(1_000_000_000).unwrap(),
            mode: RateLimitMode::Wait {
                max_wait: Duration::from_secs(1),
            },
        }),
        concurrency: None,
        dedup: Some(DedupConfig {
            scope: Default::default(),
            ttl: Duration::from_secs(600),
            capacity: 100_000,
        }),
    };
    let bare = engine(1, Observer::None);
    let protected = runtime.block_on(async {
        EngineBuilder::new()
            .dispatcher(
                Dispatcher::new("d0", Category::Event, Noop)
                    .with_protections(Protections::new("d0", &config, None)),
            )
            .route(Route::new("r0", "shop.*.events", Category::Event, "d0"))
            .build()
            .unwrap()
    });
    let without_dedup = ResilienceConfig {
        dedup: None,
        ..config.clone()
    };
    let only_dedup = ResilienceConfig {
        dedup: config.dedup,
        ..ResilienceConfig::default()
    };
    let build = |config: &ResilienceConfig| {
        runtime.block_on(async {
            EngineBuilder::new()
                .dispatcher(
                    Dispatcher::new("d0", Category::Event, Noop)
                        .with_protections(Protections::new("d0", config, None)),
                )
                .route(Route::new("r0", "shop.*.events", Category::Event, "d0"))
                .build()
                .unwrap()
        })
    };
    let without_dedup = build(&without_dedup);
    let only_dedup = build(&only_dedup);
    let mut group = c.benchmark_group("protections");
    // The cache alone, as a dispatch uses it for a fresh id (one key, a miss, then remembered),
    // full: what `dedup` costs beyond the protected call path it also brings. At 1,000 ids its
    // table (64 KiB) stays in the core's cache; at 100,000 (8 MiB) each fresh id's bucket is a
    // trip to memory.
    let ids: Vec<String> = (0..1_000_000).map(|n| format!("m{n}")).collect();
    for capacity in [1_000u64, 100_000] {
        let cache = dispatchd::resilience::DedupCache::new(
            "dedup.d0".into(),
            DedupConfig {
                capacity,
                ..config.dedup.unwrap()
            },
            None,
        );
        let mut next = 0usize;
        let label = if capacity == 100_000 {
            "dedup_cache_alone".to_owned()
        } else {
            format!("dedup_cache_alone/capacity_{capacity}")
        };
        group.bench_function(label, |b| {
            b.iter(|| {
                let id = &ids[next % ids.len()];
                next += 1;
                let key = cache.key(id);
                let seen = cache.contains_key(key);
                cache.remember_key(key);
                seen
            });
        });
    }
    // The protected call path with a protection that does nothing: a retry policy of one
    // attempt.
    let path_only = build(&ResilienceConfig {
        retry: Some(RetryPolicy {
            attempts: 1,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }),
        ..ResilienceConfig::default()
    });
    // Dedup whose table (64 KiB) stays in the core's cache: the instructions without the trip to
    // memory.
    let small_dedup = build(&ResilienceConfig {
        dedup: Some(DedupConfig {
            capacity: 1_000,
            ..config.dedup.unwrap()
        }),
        ..ResilienceConfig::default()
    });
    let mut n = 0u64;
    for (label, engine) in [
        ("bare", bare),
        ("dedup_capacity_1000", small_dedup),
        ("retry_breaker_rate_limit", without_dedup),
        ("protected_path_only", path_only),
        ("dedup", only_dedup),
        ("retry_breaker_rate_limit_dedup", protected),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&runtime).iter_batched(
                || {
                    n += 1;
                    Envelope::new("order.placed", serde_json::Value::Null)
                        .with_message_id(format!("m{n}"))
                },
                |envelope| {
                    let engine = engine.clone();
                    async move { engine.dispatch("shop.orders.events", &envelope).await }
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// The strategies `dispatchd serve` installs (tracing, health, metrics), against none.
fn service_strategies(c: &mut Criterion) {
    use dispatchd::health::{HealthConfig, HealthRegistry, HealthStrategy, Origin, Registration};
    use dispatchd::instrumentation::{Composite, TracingStrategy};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let envelope = Envelope::new("order.placed", serde_json::json!({"order_id": 42}));
    let engine = runtime.block_on(async {
        let telemetry = Telemetry::new(&MetricsConfig {
            enabled: true,
            namespace: String::new(),
            cardinality_limit: 2000,
        });
        let health = HealthRegistry::new(HealthConfig::default(), None);
        health
            .register(
                "d0",
                Registration {
                    origin: Origin::InProcess,
                    stale_threshold: None,
                    critical: false,
                    endpoint: None,
                },
            )
            .unwrap();
        let builder = EngineBuilder::new()
            .dispatcher(Dispatcher::new("d0", Category::Event, Noop))
            .route(Route::new("r0", "shop.*.events", Category::Event, "d0"));
        let strategies = Composite::new()
            .with(Arc::new(TracingStrategy))
            .with(Arc::new(HealthStrategy::new(&health, ["d0"])))
            .with(Arc::new(dispatchd::health::DispatcherStats::new(["d0"])))
            .with(Arc::new(telemetry.engine_strategy(["d0"]).unwrap()));
        builder
            .instrumentation(Arc::new(strategies))
            .build()
            .unwrap()
    });
    c.bench_function("dispatch/service_strategies/1_dispatchers", |b| {
        b.to_async(&runtime)
            .iter(|| engine.dispatch("shop.orders.events", &envelope));
    });
}

/// Tracing: off (no trace context, no subscriber), on and sampled, on and not sampled.
fn tracing_cost(c: &mut Criterion) {
    use dispatchd::telemetry::traces::{LogFormat, Traces, TracingConfig};
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let envelope = Envelope::new("order.placed", serde_json::json!({"order_id": 42}));
    let traced = |ratio: f64, provider: &opentelemetry_sdk::trace::SdkTracerProvider| {
        EngineBuilder::new()
            .dispatcher(Dispatcher::new("d0", Category::Event, Noop))
            .route(Route::new("r0", "shop.*.events", Category::Event, "d0"))
            .trace_context(Arc::new(
                dispatchd::propagation::SpanTraceContext::new(ratio)
                    .with_tracer(provider.tracer("bench")),
            ))
            .build()
            .unwrap()
    };
    let untraced = engine(1, Observer::None);
    let mut group = c.benchmark_group("tracing");
    group.bench_function("off", |b| {
        b.to_async(&runtime)
            .iter(|| untraced.dispatch("shop.orders.events", &envelope));
    });
    for (label, ratio) in [("sampled", 1.0), ("not_sampled", 0.0)] {
        let config = TracingConfig {
            sampling_ratio: ratio,
            otlp_endpoint: None,
            log_format: LogFormat::Text,
            log_filter: "off".into(),
            ..TracingConfig::default()
        };
        let provider = Traces::provider(&config).unwrap();
        let subscriber = tracing_subscriber::registry().with(
            dispatchd::telemetry::traces::otel_layer(provider.tracer("bench")),
        );
        let _guard = tracing::subscriber::set_default(subscriber);
        let engine = traced(ratio, &provider);
        group.bench_function(label, |b| {
            b.to_async(&runtime)
                .iter(|| engine.dispatch("shop.orders.events", &envelope));
        });
    }
    // A collector that accepts connections and never answers: the export thread waits out its
    // timeout while the bounded queue fills and further spans are dropped (and counted).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = TracingConfig {
        sampling_ratio: 1.0,
        otlp_endpoint: Some(format!("http://{}", dead.local_addr().unwrap())),
        log_filter: "off".into(),
        ..TracingConfig::default()
    };
    let provider = runtime
        .block_on(async { Traces::provider(&config) })
        .unwrap();
    let subscriber = tracing_subscriber::registry().with(dispatchd::telemetry::traces::otel_layer(
        provider.tracer("bench"),
    ));
    let guard = tracing::subscriber::set_default(subscriber);
    let engine = traced(1.0, &provider);
    let before = resident_kib();
    group.bench_function("sampled_dead_collector", |b| {
        b.to_async(&runtime)
            .iter(|| engine.dispatch("shop.orders.events", &envelope));
    });
    eprintln!(
        "tracing/sampled_dead_collector: {} spans dropped and counted; resident memory {} KiB before, {} KiB after",
        dispatchd::telemetry::traces::DROPPED_SPANS.load(std::sync::atomic::Ordering::Relaxed),
        before,
        resident_kib(),
    );
    drop(guard);
    group.finish();
    // Shutting down waits for the export thread, which waits for its request to time out.
    std::thread::spawn(move || provider.shutdown());
}

/// This process's resident set (VmRSS), in KiB; 0 where /proc is not there.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `scope = "cluster"` against the machine's Redis (127.0.0.1:6379, or
/// `DISPATCHD_TEST_REDIS_URL`): dedup of a fresh id (a claim and a `done`: two round trips) and
/// the shared rate limiter (one script round trip), beside the same protections per instance.
fn cluster_protections(c: &mut Criterion) {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use criterion::BatchSize;
    use dispatchd::resilience::{
        DedupConfig, Protections, RateLimitConfig, RateLimitMode, ResilienceConfig, Scope,
    };
    use dispatchd::resilience_redis::{ClusterRedis, RedisDedup, RedisRateLimit};

    let url = std::env::var("DISPATCHD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reachable = runtime.block_on(async {
        match redis::Client::open(url.as_str()) {
            Ok(client) => client.get_multiplexed_async_connection().await.is_ok(),
            Err(_) => false,
        }
    });
    if !reachable {
        eprintln!("SKIPPED cluster_protections: no Redis at {url}");
        return;
    }
    let dedup = |scope| ResilienceConfig {
        dedup: Some(DedupConfig {
            ttl: Duration::from_secs(60),
            capacity: 100_000,
            scope,
        }),
        ..ResilienceConfig::default()
    };
    let limit = |scope| ResilienceConfig {
        rate_limit: Some(RateLimitConfig {
            per_second: NonZeroU32::new(1_000_000).unwrap(),
            burst: NonZeroU32::new(1_000_000).unwrap(),
            mode: RateLimitMode::Reject,
            scope,
        }),
        ..ResilienceConfig::default()
    };
    let redis = ClusterRedis::new(&url).unwrap();
    let id = format!("bench-{}", std::process::id());
    let build = |config: &ResilienceConfig| {
        let mut protections = Protections::new(&id, config, None);
        if let Some(dedup) = config.dedup.filter(|d| d.scope == Scope::Cluster) {
            let store = RedisDedup::new(redis.clone(), &id, Duration::from_secs(5), dedup.ttl);
            protections = protections.with_cluster_dedup(Arc::new(store));
        }
        if let Some(limit) = config.rate_limit.filter(|r| r.scope == Scope::Cluster) {
            let store = RedisRateLimit::new(redis.clone(), &id, &limit);
            protections = protections.with_cluster_rate_limit(Arc::new(store));
        }
        runtime.block_on(async {
            EngineBuilder::new()
                .dispatcher(
                    Dispatcher::new(id.as_str(), Category::Event, Noop)
                        .with_protections(protections),
                )
                .route(Route::new(
                    "r0",
                    "shop.*.events",
                    Category::Event,
                    id.as_str(),
                ))
                .build()
                .unwrap()
        })
    };
    let mut group = c.benchmark_group("cluster_protections");
    let mut n = 0u64;
    for (label, engine) in [
        ("dedup_instance", build(&dedup(Scope::Instance))),
        ("dedup_cluster", build(&dedup(Scope::Cluster))),
        ("rate_limit_instance", build(&limit(Scope::Instance))),
        ("rate_limit_cluster", build(&limit(Scope::Cluster))),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&runtime).iter_batched(
                || {
                    n += 1;
                    Envelope::new("order.placed", serde_json::Value::Null)
                        .with_message_id(format!("{id}-m{n}"))
                },
                |envelope| {
                    let engine = engine.clone();
                    async move { engine.dispatch("shop.orders.events", &envelope).await }
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// The exemplar record on the dispatch path: sampled dispatches (a tracer with no exporter),
/// the metrics strategy with and without exemplars. Unsampled dispatches skip it on one branch.
fn exemplars(c: &mut Criterion) {
    use dispatchd::telemetry::MetricsStrategy;
    use dispatchd::telemetry::traces::{LogFormat, Traces, TracingConfig};
    use opentelemetry::trace::TracerProvider;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let envelope = Envelope::new("order.placed", serde_json::json!({"order_id": 42}));
    let provider = Traces::provider(&TracingConfig {
        sampling_ratio: 1.0,
        otlp_endpoint: None,
        log_format: LogFormat::Text,
        log_filter: "off".into(),
        ..TracingConfig::default()
    })
    .unwrap();
    let mut group = c.benchmark_group("exemplars");
    for (label, keep) in [
        ("sampled_without_exemplars", false),
        ("sampled_with_exemplars", true),
    ] {
        let telemetry = Telemetry::new(&MetricsConfig {
            enabled: true,
            namespace: String::new(),
            cardinality_limit: 2000,
        });
        let strategy = if keep {
            telemetry.engine_strategy(["d0"]).unwrap()
        } else {
            MetricsStrategy::new(telemetry.engine_metrics().unwrap(), ["d0"])
        };
        let engine = EngineBuilder::new()
            .dispatcher(Dispatcher::new("d0", Category::Event, Noop))
            .route(Route::new("r0", "shop.*.events", Category::Event, "d0"))
            .trace_context(Arc::new(
                dispatchd::propagation::SpanTraceContext::new(1.0)
                    .with_tracer(provider.tracer("bench")),
            ))
            .instrumentation(Arc::new(strategy))
            .build()
            .unwrap();
        // A filter on the command line may skip this one, which then keeps nothing.
        let mut ran = false;
        group.bench_function(label, |b| {
            ran = true;
            b.to_async(&runtime)
                .iter(|| engine.dispatch("shop.orders.events", &envelope));
        });
        if keep && ran {
            let text = telemetry
                .render_as(dispatchd::telemetry::Format::OpenMetrics)
                .unwrap();
            assert!(text.contains("# {trace_id=\""), "exemplars were kept");
        }
    }
    group.finish();
}

/// The metrics strategy alone: the three hooks one dispatch to one dispatcher calls (start, the
/// dispatcher's completion, the outcome), with no engine around them, so that what is measured
/// is the strategy and not the dispatch's own variation.
fn strategy_hooks(c: &mut Criterion) {
    use dispatchd::engine::{
        DispatchInfo, DispatchResult, DispatchStatus, DispatcherRef, ExecutionResult,
    };
    use std::hint::black_box;
    use std::time::Duration;

    let envelope = Envelope::new("order.placed", serde_json::json!({"order_id": 42}));
    let mut result = DispatchResult::new(uuid::Uuid::nil(), "shop.orders.events", &envelope);
    result.status = DispatchStatus::Success;
    result.message_category = Some(Category::Event);
    let info = DispatchInfo {
        dispatch_id: uuid::Uuid::nil(),
        topic: "shop.orders.events",
        category: Some(Category::Event),
        message_type: "order.placed",
        message_id: "m-1",
        correlation_id: None,
        traced: false,
        span: None,
    };
    let telemetry = Telemetry::new(&MetricsConfig {
        enabled: true,
        namespace: String::new(),
        cardinality_limit: 2000,
    });
    let strategy = telemetry.engine_strategy(["d0"]).unwrap();
    let dispatcher = DispatcherRef { index: 0, id: "d0" };
    c.bench_function("metrics_strategy/hooks_of_one_dispatch", |b| {
        b.iter(|| {
            let elapsed = black_box(Duration::from_micros(12));
            strategy.on_dispatch_start(black_box(&info));
            strategy.on_dispatcher_complete(&info, dispatcher, ExecutionResult::Success, elapsed);
            strategy.on_dispatch_success(&info, black_box(&result), elapsed);
        });
    });
    // The same from two threads at once, as the service's workers record: per dispatch, each
    // thread's time (shared counters move between the cores' caches here).
    c.bench_function("metrics_strategy/hooks_of_one_dispatch_2_threads", |b| {
        b.iter_custom(|iters| {
            common::on_two_threads(iters, || {
                let elapsed = black_box(Duration::from_micros(12));
                strategy.on_dispatch_start(black_box(&info));
                strategy.on_dispatcher_complete(
                    &info,
                    dispatcher,
                    ExecutionResult::Success,
                    elapsed,
                );
                strategy.on_dispatch_success(&info, black_box(&result), elapsed);
            })
        });
    });
}

criterion_group!(
    benches,
    dispatch,
    strategy_hooks,
    exemplars,
    routing,
    protections,
    cluster_protections,
    service_strategies,
    tracing_cost
);
criterion_main!(benches);
