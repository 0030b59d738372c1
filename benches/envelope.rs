//! Reading an ingest body (`POST /api/v1/messages/{topic}`) into an envelope: the parse every
//! ingested message pays before dispatch, without and with the optional ids and timestamp (a
//! UTC one is read by humantime; one with an offset falls back to `time`'s RFC 3339 reader).

#![allow(clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use dispatchd::http::parse_envelope;

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

criterion_group!(benches, parse);
criterion_main!(benches);
