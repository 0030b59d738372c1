//! Reading an ingest body (`POST /api/v1/messages/{topic}`) into an envelope: the parse every
//! ingested message pays before dispatch, without and with the optional ids and timestamp (a
//! UTC one is read by humantime; one with an offset falls back to `time`'s RFC 3339 reader).
//! Then the two other per-message costs of the ingest path that grow with the message: redacting
//! its payload (the default deny-list, as the dispatch event and logs get it), writing its
//! result as the JSON answer, and its dispatch event: built from the result and the envelope
//! (redacting the payload), written as the file sink writes it, and dropped.

#![allow(clippy::unwrap_used)]

use async_trait::async_trait;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use dispatchd::engine::{
    Category, Dispatcher, Engine, Handler, HandlerError, Message, OutputMessage, Route,
};
use dispatchd::http::parse_envelope;

struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

const BODIES: [(&str, &str); 4] = [
    (
        "minimal",
        r#"{"message_type":"order.created","payload":{"order_id":"o-1","total":42.5}}"#,
    ),
    (
        "ids_and_headers",
        r#"{"message_type":"order.created","payload":{"order_id":"o-1","total":42.5},"message_id":"3f1c6a8e-5b7d-4a3e-9c2f-0d4b8e6a1f27","correlation_id":"c-8812","headers":{"tenant":"eu-1"}}"#,
    ),
    (
        "utc_timestamp",
        r#"{"message_type":"order.created","payload":{"order_id":"o-1","total":42.5},"timestamp":"2026-12-03T05:00:00.123Z"}"#,
    ),
    (
        "offset_timestamp",
        r#"{"message_type":"order.created","payload":{"order_id":"o-1","total":42.5},"timestamp":"2026-12-03T06:00:00.123+01:00"}"#,
    ),
];

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest/parse_envelope");
    for (label, body) in BODIES {
        group.bench_function(label, |b| {
            b.iter(|| parse_envelope(std::hint::black_box(body.as_bytes())).unwrap())
        });
    }
    group.finish();
}

/// The payload of `scripts/http-bench.sh`: thirteen keys, one of them a secret.
const PAYLOAD: &str = r#"{"order_id":"o-1842","amount":129.5,"currency":"EUR","items":[{"sku":"A-7","qty":2},{"sku":"B-3","qty":1}],"customer":{"id":"c-77","email":"ana@example.com","api_key":"sk_live_abc123"}}"#;

fn redact(c: &mut Criterion) {
    let redactor = dispatchd::engine::Redactor::default();
    let payload: serde_json::Value = serde_json::from_str(PAYLOAD).unwrap();
    c.bench_function("ingest/redact_payload", |b| {
        b.iter_batched_ref(
            || payload.clone(),
            |payload| redactor.redact_in_place(payload),
            BatchSize::SmallInput,
        )
    });
}

/// The result of dispatching `envelope` to one no-op `log` dispatcher.
fn one_dispatch(envelope: &dispatchd::engine::Envelope) -> dispatchd::engine::DispatchResult {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = Engine::builder()
        .dispatcher(Dispatcher::new("log", Category::Event, Noop))
        .route(Route::new("events-to-log", "**", Category::Event, "log"))
        .build()
        .unwrap();
    runtime.block_on(engine.dispatch("bench.events", envelope))
}

/// The answer of a one-dispatcher dispatch, as `POST /api/v1/messages/{topic}` writes it.
fn answer(c: &mut Criterion) {
    let body = format!(r#"{{"message_type":"order.placed","payload":{PAYLOAD}}}"#);
    let envelope = parse_envelope(body.as_bytes()).unwrap();
    let result = one_dispatch(&envelope);
    // What the ingest answers with (`DispatchResult::write_json`), and serde_json's derived
    // writer it replaced, which writes the same bytes.
    c.bench_function("ingest/answer_json", |b| {
        b.iter(|| {
            let mut body = Vec::with_capacity(1024);
            std::hint::black_box(&result).write_json(&mut body).unwrap();
            body
        })
    });
    c.bench_function("ingest/answer_json_serde", |b| {
        b.iter(|| {
            let mut body = Vec::with_capacity(1024);
            serde_json::to_writer(&mut body, std::hint::black_box(&result)).unwrap();
            body
        })
    });
}

/// The dispatch event of the same dispatch, whole: what the default config pays per message for
/// its file sink.
fn event(c: &mut Criterion) {
    let body = format!(
        r#"{{"message_type":"order.placed","payload":{PAYLOAD},"headers":{{"user_id":"c-77"}}}}"#
    );
    let envelope = parse_envelope(body.as_bytes()).unwrap();
    let result = one_dispatch(&envelope);
    let redactor = dispatchd::engine::Redactor::default();
    c.bench_function("ingest/dispatch_event", |b| {
        b.iter_batched(
            || envelope.clone(),
            |envelope| {
                let event = dispatchd::bus::DispatchEvent::from_dispatch_owned(
                    std::hint::black_box(&result),
                    envelope,
                    &redactor,
                );
                let mut line = Vec::with_capacity(1024);
                event.write_json(&mut line);
                line
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, parse, redact, answer, event);
criterion_main!(benches);
