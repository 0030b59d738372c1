//! Traces, in a test binary of their own: they install thread-local `tracing` subscribers, and
//! `tracing` caches each callsite's interest process-wide, so other tests dispatching without a
//! subscriber in the same process could leave these spans disabled.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

#[path = "it/support.rs"]
#[allow(dead_code)]
mod support;
#[path = "it/w3c_cases.rs"]
mod w3c_cases;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dispatchd::engine::{
    Category, Dispatcher, Engine, Envelope, Handler, HandlerError, Message, OutputMessage, Route,
};
use dispatchd::telemetry::traces::{LogFormat, Traces, TracingConfig};
use opentelemetry::trace::TracerProvider;
use serde_json::{Value, json};
use tracing_subscriber::layer::SubscriberExt;

use crate::support::TestApp;

/// Installs `subscriber` for this thread and makes every callsite see it.
fn traced(
    subscriber: impl tracing::Subscriber + Send + Sync + 'static,
) -> tracing::subscriber::DefaultGuard {
    let guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    guard
}

struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let reply = message.envelope.derive("order.confirmed", json!({}));
        Ok(vec![OutputMessage::new("shop.confirmations.events", reply)])
    }
}

fn config(otlp_endpoint: Option<String>) -> TracingConfig {
    TracingConfig {
        sampling_ratio: 1.0,
        otlp_endpoint,
        log_format: LogFormat::Text,
        log_filter: "warn".into(),
        ..TracingConfig::default()
    }
}

/// A subscriber for this thread only: dispatch spans to OpenTelemetry.
fn subscriber(
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::registry().with(dispatchd::telemetry::traces::otel_layer(
        provider.tracer("test"),
    ))
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

#[tokio::test]
async fn a_callers_traceparent_reaches_the_result_the_outputs_and_the_event() {
    let provider = Traces::provider(&config(None)).unwrap();
    let _guard = traced(subscriber(&provider));
    let app = TestApp::start_with(
        |_| {},
        |builder| {
            builder
                .dispatcher(Dispatcher::new("echo", Category::Intent, Echo))
                .route(Route::new(
                    "echo",
                    "orders.intents",
                    Category::Intent,
                    "echo",
                ))
        },
    )
    .await;
    let response = app
        .client
        .post(app.url("/api/v1/messages/orders.intents"))
        .header("traceparent", format!("00-{TRACE}-b7ad6b7169203331-01"))
        .json(&json!({"message_type": "order.place"}))
        .send()
        .await
        .unwrap();
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["trace_id"], TRACE);
    let span_id = result["span_id"].as_str().unwrap();
    assert_eq!(span_id.len(), 16);
    assert_ne!(
        span_id, "b7ad6b7169203331",
        "the dispatch is a child span of the caller's"
    );
    let traceparent = result["outputs"][0]["envelope"]["headers"]["traceparent"]
        .as_str()
        .unwrap();
    assert!(
        traceparent.starts_with(&format!("00-{TRACE}-")),
        "{traceparent}"
    );

    // A malformed traceparent is no error: a new trace starts.
    let response = app
        .client
        .post(app.url("/api/v1/messages/orders.intents"))
        .header("traceparent", "00-not-a-trace-01")
        .json(&json!({"message_type": "order.place"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let fresh: Value = response.json().await.unwrap();
    assert_eq!(fresh["trace_id"].as_str().unwrap().len(), 32);
    assert_ne!(fresh["trace_id"], TRACE);

    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let first: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["metadata"]["traceparent"],
        format!("00-{TRACE}-{span_id}-01")
    );
    drop(provider);
}

/// A caller that does not sample its trace (`-00`) gets no sampled trace back: the dispatch
/// event's `metadata.traceparent`, which sinks forward to services that trace, keeps its flag.
#[tokio::test]
async fn an_unsampled_callers_flag_reaches_the_event_unchanged() {
    let provider = Traces::provider(&config(None)).unwrap();
    let _guard = traced(subscriber(&provider));
    let app = TestApp::start().await;
    for flags in ["00", "01"] {
        let response = app
            .client
            .post(app.url("/api/v1/messages/shop.orders.events"))
            .header(
                "traceparent",
                format!("00-{TRACE}-b7ad6b7169203331-{flags}"),
            )
            .json(&json!({"message_type": "order.placed"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let flags: Vec<String> = events
        .lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).unwrap();
            let traceparent = event["metadata"]["traceparent"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(
                traceparent.starts_with(&format!("00-{TRACE}-")),
                "{traceparent}"
            );
            traceparent[traceparent.len() - 2..].to_owned()
        })
        .collect();
    assert_eq!(flags, ["00", "01"]);
    drop(provider);
}

/// What a POST of one W3C case answered: `Err` naming the case and what went wrong.
fn check_dispatch(
    case: &w3c_cases::Case,
    how: &str,
    result: &Value,
    sent: &[String],
) -> Result<(), String> {
    let fail = |what: String| Err(format!("{} ({how}): {what}: {result}", case.name));
    let trace_id = result["trace_id"].as_str().unwrap_or_default();
    let headers = &result["outputs"][0]["envelope"]["headers"];
    let traceparent = headers["traceparent"].as_str().unwrap_or_default();
    let fields: Vec<&str> = traceparent.split('-').collect();
    if fields.len() != 4 || fields[1] != trace_id {
        return fail(format!("the output's traceparent {traceparent:?}"));
    }
    match &case.trace {
        w3c_cases::Trace::New => {
            // A new trace: random, so nothing of the ids sent is in it (the SDK alone read
            // `00-{31 digits}-…` as `0{31 digits}`, which this catches).
            let fresh = trace_id.len() == 32
                && trace_id != "0".repeat(32)
                && (0..=20).all(|at| {
                    sent.iter()
                        .all(|value| !value.contains(&trace_id[at..at + 12]))
                });
            if !fresh {
                return fail(format!("a new trace expected, got {trace_id}"));
            }
            if headers["tracestate"] != "" {
                return fail("a new trace carries no tracestate".into());
            }
        }
        w3c_cases::Trace::Inherit {
            trace_id: expected,
            sampled,
            ..
        } => {
            if trace_id != expected {
                return fail(format!("trace {expected} expected"));
            }
            if fields[3] != if *sampled { "01" } else { "00" } {
                return fail(format!("sampled {sampled} expected"));
            }
            if headers["tracestate"] != case.state.header() {
                return fail(format!("tracestate {:?} expected", case.state));
            }
        }
    }
    Ok(())
}

/// Every case of `tests/data/traceparent-cases.txt` through `POST /api/v1/messages/{topic}`:
/// as HTTP headers, and as the envelope's own headers. The result's `trace_id` is the caller's
/// or a new one, and the output carries the sampled flag and the tracestate the case expects.
#[tokio::test]
async fn every_w3c_case_through_post_messages() {
    let provider = Traces::provider(&config(None)).unwrap();
    let _guard = traced(subscriber(&provider));
    let app = TestApp::start_with(
        |_| {},
        |builder| {
            builder
                .dispatcher(Dispatcher::new("echo", Category::Intent, Echo))
                .route(Route::new(
                    "echo",
                    "orders.intents",
                    Category::Intent,
                    "echo",
                ))
        },
    )
    .await;
    let cases = w3c_cases::cases();
    let mut failures = Vec::new();
    let (mut through_http, mut through_envelope) = (0, 0);
    // A traceparent that is there but cannot be followed is counted, by carrier.
    use dispatchd::propagation::{Carrier, invalid_trace_contexts};
    let invalid_before = Carrier::ALL.map(invalid_trace_contexts);
    let mut invalid_sent = [0u64; 2];
    let lost = |case: &w3c_cases::Case| {
        case.trace == w3c_cases::Trace::New
            && case
                .headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("traceparent"))
    };
    for case in &cases {
        let sent: Vec<String> = case
            .headers
            .iter()
            .map(|(_, value)| value.clone())
            .collect();
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &case.headers {
            if let Ok(value) = reqwest::header::HeaderValue::from_bytes(value.as_bytes()) {
                headers.append(
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value,
                );
            }
        }
        if headers.len() == case.headers.len() {
            through_http += 1;
            invalid_sent[Carrier::Http as usize] += u64::from(lost(case));
            let response = app
                .client
                .post(app.url("/api/v1/messages/orders.intents"))
                .headers(headers)
                .json(&json!({"message_type": "order.place"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", case.name);
            let result: Value = response.json().await.unwrap();
            failures.extend(check_dispatch(case, "HTTP", &result, &sent).err());
        }
        if let Some(map) = case.as_map() {
            through_envelope += 1;
            invalid_sent[Carrier::Envelope as usize] += u64::from(lost(case));
            let response = app
                .client
                .post(app.url("/api/v1/messages/orders.intents"))
                .json(&json!({"message_type": "order.place", "headers": map}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", case.name);
            let result: Value = response.json().await.unwrap();
            failures.extend(check_dispatch(case, "envelope", &result, &sent).err());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(cases.len() - through_http, 1, "cases HTTP cannot carry");
    assert_eq!(
        cases.len() - through_envelope,
        7,
        "cases a map cannot carry"
    );
    // At least: other tests of this binary may count their own meanwhile.
    let metrics = app.scrape().await;
    for carrier in Carrier::ALL {
        let (sent, counted) = (
            invalid_sent[carrier as usize],
            invalid_trace_contexts(carrier) - invalid_before[carrier as usize],
        );
        assert!(sent > 10, "the cases include invalid ones: {sent}");
        assert!(counted >= sent, "{carrier:?}: {counted} of {sent} counted");
        let exported = support::sample(
            &metrics,
            &format!(
                r#"trace_context_invalid_total{{carrier="{}"}}"#,
                carrier.as_str()
            ),
        )
        .unwrap_or_else(|| panic!("no {carrier:?} series in {metrics}"));
        assert!(exported >= sent as f64, "{carrier:?}: {exported} exported");
    }
    app.stop().await.unwrap();
    drop(provider);
}

/// A loopback OTLP/HTTP receiver (see `support::otlp_receiver`).
fn receiver() -> (String, support::Received) {
    support::otlp_receiver()
}

/// Every span the receiver got.
fn spans(received: &support::Received) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
    support::otlp_spans(received)
        .into_iter()
        .map(|(_, span)| span)
        .collect()
}

#[tokio::test]
async fn dispatch_spans_are_exported_over_otlp_with_their_children() {
    let (endpoint, received) = receiver();
    let provider = Traces::provider(&config(Some(endpoint))).unwrap();
    let engine = {
        let _guard = traced(subscriber(&provider));
        let engine = Engine::builder()
            .dispatcher(Dispatcher::new("echo", Category::Event, Echo))
            .route(Route::new("r", "**", Category::Event, "echo"))
            .trace_context(Arc::new(
                dispatchd::propagation::SpanTraceContext::default()
                    .with_tracer(provider.tracer("test")),
            ))
            .build()
            .unwrap();
        let result = engine
            .dispatch(
                "shop.orders.events",
                &Envelope::new("order.placed", json!({})),
            )
            .await;
        assert!(result.trace_id.is_some());
        engine
    };
    // Export happens on the SDK's thread; flushing waits for it.
    tokio::task::spawn_blocking({
        let provider = provider.clone();
        move || provider.force_flush().unwrap()
    })
    .await
    .unwrap();
    let spans = spans(&received);
    let dispatch = spans
        .iter()
        .find(|s| s.name == "process shop.orders.events")
        .expect("the dispatch span");
    let attribute = |span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .map(|v| format!("{:?}", v.value))
    };
    assert!(
        attribute(dispatch, "messaging.destination.name")
            .unwrap()
            .contains("shop.orders.events")
    );
    assert!(
        attribute(dispatch, "dispatchd.status")
            .unwrap()
            .contains("success")
    );
    let child = spans
        .iter()
        .find(|s| s.name == "dispatcher echo")
        .expect("the dispatcher's span");
    assert_eq!(
        child.parent_span_id, dispatch.span_id,
        "a child of the dispatch span"
    );
    assert_eq!(child.trace_id, dispatch.trace_id);
    assert!(
        attribute(child, "dispatchd.outcome")
            .unwrap()
            .contains("success")
    );
    drop(engine);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || provider.shutdown()),
    )
    .await;
}

struct Broken;

#[async_trait]
impl Handler for Broken {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Err(HandlerError::permanent("the warehouse said no"))
    }
}

/// An attribute's decoded OTLP value: its type is part of what is checked.
fn otlp_value(
    span: &opentelemetry_proto::tonic::trace::v1::Span,
    key: &str,
) -> Option<opentelemetry_proto::tonic::common::v1::any_value::Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

fn text(value: &str) -> Option<opentelemetry_proto::tonic::common::v1::any_value::Value> {
    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(value.into()))
}

fn int(value: i64) -> Option<opentelemetry_proto::tonic::common::v1::any_value::Value> {
    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(value))
}

/// The OTLP status code of a span (0 unset, 1 ok, 2 error).
fn status_code(span: &opentelemetry_proto::tonic::trace::v1::Span) -> i32 {
    span.status.as_ref().map_or(0, |status| status.code)
}

/// Served over HTTP, exported over OTLP/HTTP and decoded: the server span, the dispatch span and
/// the dispatcher span carry the semantic conventions' names, kinds, statuses and typed
/// attributes; a sink batch's size is an integer.
#[tokio::test]
async fn served_spans_follow_the_semantic_conventions_over_otlp() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

    let (endpoint, received) = receiver();
    let provider = Traces::provider(&config(Some(endpoint.clone()))).unwrap();
    let _guard = traced(subscriber(&provider));
    let app = TestApp::start_with(
        |config| config.tracing.otlp_endpoint = Some(endpoint),
        |builder| {
            builder
                .tracer(provider.tracer("test"))
                .dispatcher(Dispatcher::new("echo", Category::Event, Echo))
                .dispatcher(Dispatcher::new("broken", Category::Event, Broken))
                .route(Route::new(
                    "ok",
                    "shop.orders.events",
                    Category::Event,
                    "echo",
                ))
                .route(Route::new(
                    "no",
                    "shop.broken.events",
                    Category::Event,
                    "broken",
                ))
        },
    )
    .await;
    for (topic, status) in [
        ("shop.orders.events", 200),
        ("shop.broken.events", 502),
        ("ops.commands", 404),
    ] {
        let response = app
            .post_message(topic, json!({"message_type": "order.placed"}))
            .await;
        assert_eq!(response.status(), status, "{topic}");
    }
    // Stopping flushes the sinks, so the file sink's batch span exists too.
    app.stop().await.unwrap();
    tokio::task::spawn_blocking({
        let provider = provider.clone();
        move || provider.force_flush().unwrap()
    })
    .await
    .unwrap();
    let spans = spans(&received);
    let named = |name: &str| -> Vec<&opentelemetry_proto::tonic::trace::v1::Span> {
        spans.iter().filter(|s| s.name == name).collect()
    };
    let dispatch = |topic: &str| {
        *named(&format!("process {topic}"))
            .first()
            .unwrap_or_else(|| panic!("no dispatch span for {topic}: {spans:?}"))
    };

    // HTTP server spans: `{method} {route}`, kind server, the stable attributes, the status code
    // an integer; a 5xx is an error with `error.type`, a 4xx is not.
    let servers = named("POST /api/v1/messages/{topic}");
    assert_eq!(servers.len(), 3, "{spans:?}");
    for topic in ["shop.orders.events", "shop.broken.events", "ops.commands"] {
        let dispatch = dispatch(topic);
        let server = servers
            .iter()
            .find(|s| s.span_id == dispatch.parent_span_id)
            .expect("the dispatch span is a child of the server span");
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(otlp_value(server, "http.request.method"), text("POST"));
        assert_eq!(
            otlp_value(server, "http.route"),
            text("/api/v1/messages/{topic}")
        );
        assert_eq!(otlp_value(server, "url.scheme"), text("http"));
        assert_eq!(
            otlp_value(server, "url.path"),
            text(&format!("/api/v1/messages/{topic}"))
        );
        let (code, failed) = match topic {
            "shop.orders.events" => (200, false),
            "shop.broken.events" => (502, true),
            _ => (404, false),
        };
        assert_eq!(otlp_value(server, "http.response.status_code"), int(code));
        if failed {
            assert_eq!(status_code(server), StatusCode::Error as i32, "{server:?}");
            assert_eq!(otlp_value(server, "error.type"), text("502"));
        } else {
            assert_eq!(status_code(server), StatusCode::Unset as i32, "{server:?}");
            assert_eq!(otlp_value(server, "error.type"), None);
        }

        // The dispatch span: `process {destination}`, consumer, the messaging attributes.
        assert_eq!(dispatch.kind, SpanKind::Consumer as i32);
        assert_eq!(
            otlp_value(dispatch, "messaging.operation.name"),
            text("process")
        );
        assert_eq!(
            otlp_value(dispatch, "messaging.operation.type"),
            text("process")
        );
        assert_eq!(otlp_value(dispatch, "messaging.system"), text("dispatchd"));
        assert_eq!(
            otlp_value(dispatch, "messaging.destination.name"),
            text(topic)
        );
    }
    let ok = dispatch("shop.orders.events");
    assert_eq!(status_code(ok), StatusCode::Unset as i32);
    assert_eq!(otlp_value(ok, "error.type"), None);
    for (topic, status) in [
        ("shop.broken.events", "dispatcher_error"),
        ("ops.commands", "no_dispatcher"),
    ] {
        let failed = dispatch(topic);
        assert_eq!(status_code(failed), StatusCode::Error as i32, "{failed:?}");
        assert_eq!(otlp_value(failed, "error.type"), text(status));
        assert_eq!(otlp_value(failed, "dispatchd.status"), text(status));
    }

    // Dispatcher spans: a failing one is an error; `dispatchd.attempts` is an integer.
    let echo = named("dispatcher echo")[0];
    assert_eq!(status_code(echo), StatusCode::Unset as i32);
    assert_eq!(otlp_value(echo, "dispatchd.attempts"), int(1));
    let broken = named("dispatcher broken")[0];
    assert_eq!(
        broken.parent_span_id,
        dispatch("shop.broken.events").span_id
    );
    assert_eq!(status_code(broken), StatusCode::Error as i32, "{broken:?}");
    assert_eq!(otlp_value(broken, "error.type"), text("error"));
    assert!(
        broken
            .status
            .as_ref()
            .is_some_and(|s| s.message.contains("the warehouse said no")),
        "{broken:?}"
    );

    // The sink batch: `dispatchd.batch_size` is a number, not text.
    let batch = spans
        .iter()
        .find(|s| s.name.ends_with(" send"))
        .unwrap_or_else(|| panic!("no sink batch span: {spans:?}"));
    assert_eq!(batch.kind, SpanKind::Producer as i32);
    assert!(
        matches!(
            otlp_value(batch, "dispatchd.batch_size"),
            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(n)) if n >= 1
        ),
        "{batch:?}"
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || provider.shutdown()),
    )
    .await;
}

/// What the hook received: its `traceparent` header and its body.
type Request = (Option<String>, Value);

#[tokio::test]
async fn the_http_sink_sends_the_batch_span_and_each_events_traceparent() {
    use dispatchd::sinks::{DriverConfig, FullPolicy, SinkConfig, SinkDriver, build};

    let provider = Traces::provider(&config(None)).unwrap();
    let _guard = traced(subscriber(&provider));
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    let keep = seen.clone();
    let router = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let traceparent = headers
                    .get("traceparent")
                    .map(|v| v.to_str().unwrap().to_owned());
                keep.lock()
                    .unwrap()
                    .push((traceparent, serde_json::from_slice(&body).unwrap()));
                axum::http::StatusCode::OK
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let sink = build(&SinkConfig {
        name: "hook".into(),
        service: "http".into(),
        endpoint: Some(url),
        api_key: None,
        headers: Default::default(),
        timeout: Duration::from_secs(5),
        fsync: false,
    })
    .unwrap();
    let tracker = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let driver = DriverConfig {
        batch_size: 10,
        flush_interval: Duration::from_secs(60),
        buffer: 10,
        full: FullPolicy::Block,
        retry: dispatchd::resilience::RetryPolicy {
            attempts: 0,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        },
        shutdown_deadline: Duration::from_secs(5),
        send_timeout: Duration::from_secs(5),
        dead_letter: dir.path().join("dead.jsonl"),
    };
    let handle = SinkDriver::spawn(sink, driver, None, &tracker, stop.clone());
    let engine = Engine::builder()
        .dispatcher(Dispatcher::new("echo", Category::Event, Echo))
        .route(Route::new("r", "**", Category::Event, "echo"))
        .trace_context(Arc::new(
            dispatchd::propagation::SpanTraceContext::default()
                .with_tracer(provider.tracer("test")),
        ))
        .build()
        .unwrap();
    let envelope = Envelope::new("order.placed", json!({}));
    let result = engine.dispatch("shop.orders.events", &envelope).await;
    handle
        .offer(dispatchd::sinks::DispatchEvent::from_dispatch(
            &result,
            &envelope,
            &Default::default(),
        ))
        .await;
    stop.cancel();
    tracker.close();
    tracker.wait().await;

    let seen = seen.lock().unwrap().clone();
    let (header, body) = &seen[0];
    let trace_id = result.trace_id.unwrap();
    assert!(
        body[0]["metadata"]["traceparent"]
            .as_str()
            .unwrap()
            .contains(&trace_id),
        "{body}"
    );
    let header = header
        .as_ref()
        .expect("the request carries the batch span's traceparent");
    assert!(header.starts_with("00-") && header.len() == 55, "{header}");
    server.abort();
}

#[tokio::test]
async fn a_collector_that_hangs_costs_a_bounded_queue_and_counted_drops() {
    use dispatchd::telemetry::traces::{BoundedProcessor, DROPPED_SPANS};
    use opentelemetry_otlp::WithExportConfig;
    use std::sync::atomic::Ordering;

    // A collector that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for socket in listener.incoming().flatten() {
            held.push(socket);
        }
    });
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("http://{address}/v1/traces"))
        .with_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(BoundedProcessor::new(exporter, 64))
        .build();
    let _guard = traced(subscriber(&provider));
    let engine = Engine::builder()
        .dispatcher(Dispatcher::new("echo", Category::Event, Echo))
        .route(Route::new("r", "**", Category::Event, "echo"))
        .trace_context(Arc::new(
            dispatchd::propagation::SpanTraceContext::default()
                .with_tracer(provider.tracer("test")),
        ))
        .build()
        .unwrap();
    let before = DROPPED_SPANS.load(Ordering::Relaxed);
    for _ in 0..3000 {
        let result = engine
            .dispatch(
                "shop.orders.events",
                &Envelope::new("order.placed", json!({})),
            )
            .await;
        assert_eq!(result.status, dispatchd::engine::DispatchStatus::Success);
    }
    // 6,000 spans in a few milliseconds against a queue of 64 and an export thread that holds at
    // most a batch of 512 per 300 ms attempt: at most a few attempts' worth get through, the rest
    // are dropped and counted (other tests may add to the process-wide count, never subtract).
    let dropped = DROPPED_SPANS.load(Ordering::Relaxed) - before;
    assert!(dropped >= 6000 - 64 - 3 * 512, "dropped {dropped}");
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// Calls out "over HTTP": records the `traceparent` it would send.
struct Deploy(Arc<Mutex<Option<String>>>);

#[async_trait]
impl dispatchd::engine::CommandAdapter for Deploy {
    fn name(&self) -> &'static str {
        "deployer"
    }

    async fn execute(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let mut headers = std::collections::BTreeMap::new();
        dispatchd::propagation::inject_current(&mut headers);
        *self.0.lock().unwrap() = headers.get("traceparent").cloned();
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_command_adapter_runs_in_a_client_span_under_its_dispatcher_and_propagates_it() {
    let (endpoint, received) = receiver();
    let provider = Traces::provider(&config(Some(endpoint))).unwrap();
    let sent = Arc::new(Mutex::new(None));
    {
        let _guard = traced(subscriber(&provider));
        let engine = Engine::builder()
            .dispatcher(Dispatcher::command("ops", Deploy(sent.clone())))
            .route(Route::new("r", "ops.commands", Category::Command, "ops"))
            .trace_context(Arc::new(
                dispatchd::propagation::SpanTraceContext::default()
                    .with_tracer(provider.tracer("test")),
            ))
            .build()
            .unwrap();
        let result = engine
            .dispatch("ops.commands", &Envelope::new("deploy", json!({})))
            .await;
        assert_eq!(result.status.as_str(), "success", "{result:?}");
    }
    tokio::task::spawn_blocking({
        let provider = provider.clone();
        move || provider.force_flush().unwrap()
    })
    .await
    .unwrap();
    let spans = spans(&received);
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:?}"))
    };
    let dispatch = find("process ops.commands");
    let dispatcher = find("dispatcher ops");
    let adapter = find("deployer deploy");
    assert_eq!(dispatcher.parent_span_id, dispatch.span_id);
    assert_eq!(adapter.parent_span_id, dispatcher.span_id);
    assert_eq!(adapter.trace_id, dispatch.trace_id);
    assert_eq!(
        adapter.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32
    );
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let traceparent = sent
        .lock()
        .unwrap()
        .clone()
        .expect("the adapter propagated");
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", hex(&adapter.trace_id), hex(&adapter.span_id)),
        "the adapter's outbound request continues the adapter span"
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || provider.shutdown()),
    )
    .await;
}

/// A loopback receiver that keeps each request's `traceparent`.
async fn traceparent_receiver() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let keep = seen.clone();
    let router = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let keep = keep.clone();
        async move {
            keep.lock().unwrap().push(
                headers
                    .get("traceparent")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/in", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, seen)
}

#[tokio::test]
async fn http_dispatchers_send_the_traceparent_of_their_own_span() {
    use dispatchd::dispatchers::{HttpCommand, HttpDispatcher, HttpTarget, http_client};

    let (endpoint, received) = receiver();
    let provider = Traces::provider(&config(Some(endpoint))).unwrap();
    let (url, sent) = traceparent_receiver().await;
    let target = || HttpTarget::post(url.parse().unwrap());
    let client = http_client().unwrap();
    {
        let _guard = traced(subscriber(&provider));
        let engine = Engine::builder()
            .dispatcher(Dispatcher::new(
                "hook",
                Category::Event,
                HttpDispatcher::new(client.clone(), target()),
            ))
            .dispatcher(Dispatcher::command(
                "billing",
                HttpCommand::new(client, target()),
            ))
            .route(Route::new(
                "e",
                "shop.orders.events",
                Category::Event,
                "hook",
            ))
            .route(Route::new(
                "c",
                "shop.billing.commands",
                Category::Command,
                "billing",
            ))
            .trace_context(Arc::new(
                dispatchd::propagation::SpanTraceContext::default()
                    .with_tracer(provider.tracer("test")),
            ))
            .build()
            .unwrap();
        for (topic, message_type) in [
            ("shop.orders.events", "order.placed"),
            ("shop.billing.commands", "refund"),
        ] {
            let result = engine
                .dispatch(topic, &Envelope::new(message_type, json!({})))
                .await;
            assert_eq!(result.status.as_str(), "success", "{result:?}");
        }
    }
    tokio::task::spawn_blocking({
        let provider = provider.clone();
        move || provider.force_flush().unwrap()
    })
    .await
    .unwrap();
    let spans = spans(&received);
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}: {spans:?}"))
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let traceparent = |span: &opentelemetry_proto::tonic::trace::v1::Span| {
        Some(format!(
            "00-{}-{}-01",
            hex(&span.trace_id),
            hex(&span.span_id)
        ))
    };
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[0],
        traceparent(find("dispatcher hook")),
        "the event's request continues its dispatcher's span"
    );
    assert_eq!(
        sent[1],
        traceparent(find("http refund")),
        "the command's request continues its adapter's client span"
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || provider.shutdown()),
    )
    .await;
}
