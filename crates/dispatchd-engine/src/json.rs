//! JSON written by hand where dispatchd writes it per message: [`DispatchResult::write_json`]
//! (the HTTP answer), [`Envelope::write_json_fields`] (the JSONL dispatcher's line), and
//! [`write_str`], [`write_str_array`], [`write_value`], [`write_outcomes`] and [`write_rfc3339`]
//! for writers elsewhere (the dispatch event's).
//!
//! Each writes byte for byte what `serde_json::to_writer` writes (property tests compare them on
//! arbitrary input), in fewer instructions: serde_json sends every key and string through its
//! escaping loop one byte at a time, where the keys here are literals and a string is copied
//! whole once a scan of eight bytes at a time found nothing to escape. The answer of a
//! one-dispatcher dispatch costs 5,100 instructions instead of 11,600; a `Value` tree gains less
//! (walking it costs as much as before). Anything rarer (a string that needs escaping, a number,
//! the outputs of a result) is still written by serde_json itself. The destructuring in
//! [`DispatchResult::write_json`] names every field, so a field added to the result does not
//! compile until it is written there too. Written here rather than taken from a crate: what
//! matters is the same bytes as serde_json's, which the tests hold it to.

use std::fmt;
use std::time::SystemTime;

use serde_json::Value;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::result::{DispatchResult, DispatcherOutcome, Rfc3339Buffer, Timestamp};

impl DispatchResult {
    /// Appends this result to `out` as JSON, exactly as `serde_json::to_writer(out, self)` would.
    /// Fails, as that does, only for a timestamp past year 9999 (then `out` holds part of it).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let DispatchResult {
            dispatch_id,
            status,
            topic,
            message_category,
            message_type,
            message_id,
            duration_ms,
            outputs,
            output_count,
            error_message,
            error_code,
            correlation_id,
            trace_id,
            span_id,
            // `#[serde(skip)]`: not part of the answer.
            trace_sampled: _,
            dispatchers,
            started_at,
            completed_at,
        } = self;
        out.extend_from_slice(b"{\"dispatch_id\":");
        uuid(out, dispatch_id);
        out.extend_from_slice(b",\"status\":");
        plain(out, status.as_str());
        out.extend_from_slice(b",\"topic\":");
        write_str(out, topic);
        out.extend_from_slice(b",\"message_category\":");
        match message_category {
            Some(category) => plain(out, category.as_str()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"message_type\":");
        write_str(out, message_type);
        out.extend_from_slice(b",\"message_id\":");
        write_str(out, message_id);
        out.extend_from_slice(b",\"duration_ms\":");
        serde_json::to_writer(&mut *out, duration_ms)?;
        out.extend_from_slice(b",\"outputs\":");
        serde_json::to_writer(&mut *out, outputs)?;
        out.extend_from_slice(b",\"output_count\":");
        serde_json::to_writer(&mut *out, output_count)?;
        out.extend_from_slice(b",\"error_message\":");
        optional(out, error_message.as_deref());
        out.extend_from_slice(b",\"error_code\":");
        match error_code {
            Some(code) => plain(out, code.as_str()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"correlation_id\":");
        optional(out, correlation_id.as_deref());
        out.extend_from_slice(b",\"trace_id\":");
        optional(out, trace_id.as_deref());
        out.extend_from_slice(b",\"span_id\":");
        optional(out, span_id.as_deref());
        out.extend_from_slice(b",\"dispatchers\":[");
        for (i, outcome) in dispatchers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_outcome(out, outcome)?;
        }
        out.extend_from_slice(b"],\"started_at\":");
        timestamp(out, started_at)?;
        out.extend_from_slice(b",\"completed_at\":");
        timestamp(out, completed_at)?;
        out.push(b'}');
        Ok(())
    }
}

impl Envelope {
    /// Appends this envelope's fields to `out`, as `serde_json` writes them inside an object
    /// (`"message_id":…,…,"timestamp":…`, no braces), for a writer that puts fields of its own
    /// beside them (the JSONL dispatcher's line, which flattens the envelope).
    pub fn write_json_fields(&self, out: &mut Vec<u8>) {
        let Envelope {
            message_id,
            correlation_id,
            message_type,
            payload,
            headers,
            timestamp,
        } = self;
        out.extend_from_slice(b"\"message_id\":");
        write_str(out, message_id);
        // `skip_serializing_if = "Option::is_none"`.
        if let Some(correlation_id) = correlation_id {
            out.extend_from_slice(b",\"correlation_id\":");
            write_str(out, correlation_id);
        }
        out.extend_from_slice(b",\"message_type\":");
        write_str(out, message_type);
        out.extend_from_slice(b",\"payload\":");
        write_value(out, payload);
        // `skip_serializing_if = "BTreeMap::is_empty"`.
        if !headers.is_empty() {
            out.extend_from_slice(b",\"headers\":{");
            comma_separated(out, headers, |out, (name, value)| {
                write_str(out, name);
                out.push(b':');
                write_str(out, value);
            });
            out.push(b'}');
        }
        out.extend_from_slice(b",\"timestamp\":");
        write_rfc3339(out, *timestamp);
    }
}

/// Writes `time` as `humantime_serde` does (RFC 3339 in UTC, nanoseconds when not whole),
/// through a buffer on the stack rather than a `String` and serde's escaping writer.
pub fn write_rfc3339(out: &mut Vec<u8>, time: SystemTime) {
    use std::io::Write as _;
    // `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` is 30 bytes.
    let mut buffer = [0u8; 32];
    let mut rest = &mut buffer[..];
    if write!(rest, "{}", humantime::format_rfc3339(time)).is_ok() {
        let len = 32 - rest.len();
        plain_owned(out, std::str::from_utf8(&buffer[..len]).unwrap_or_default());
    } else {
        // Longer than any time humantime writes; serde's way all the same.
        let _ = serde_json::to_writer(&mut *out, &humantime_serde::Serde::from(time));
    }
}

/// Writes `outcomes` as serde_json writes a `Vec<DispatcherOutcome>` (the dispatch event's
/// `output.dispatchers`).
pub fn write_outcomes(out: &mut Vec<u8>, outcomes: &[DispatcherOutcome]) {
    out.push(b'[');
    comma_separated(out, outcomes, |out, outcome| {
        // Writing numbers into a `Vec` cannot fail.
        let _ = write_outcome(out, outcome);
    });
    out.push(b']');
}

fn write_outcome(out: &mut Vec<u8>, outcome: &DispatcherOutcome) -> Result<(), serde_json::Error> {
    let DispatcherOutcome {
        dispatcher_id,
        result,
        duration_ms,
        output_count,
        attempts,
        error_message,
        policy,
        route_ids,
    } = outcome;
    out.extend_from_slice(b"{\"dispatcher_id\":");
    write_str(out, dispatcher_id);
    out.extend_from_slice(b",\"result\":");
    plain(out, result.as_str());
    out.extend_from_slice(b",\"duration_ms\":");
    serde_json::to_writer(&mut *out, duration_ms)?;
    out.extend_from_slice(b",\"output_count\":");
    serde_json::to_writer(&mut *out, output_count)?;
    out.extend_from_slice(b",\"attempts\":");
    serde_json::to_writer(&mut *out, attempts)?;
    // `skip_serializing_if = "Option::is_none"`.
    if let Some(message) = error_message {
        out.extend_from_slice(b",\"error_message\":");
        write_str(out, message);
    }
    if let Some(policy) = policy {
        out.extend_from_slice(b",\"policy\":");
        write_str(out, policy);
    }
    out.extend_from_slice(b",\"route_ids\":");
    write_str_array(out, route_ids);
    out.push(b'}');
    Ok(())
}

/// A string the engine wrote itself (an enum's name): nothing in it to escape.
fn plain(out: &mut Vec<u8>, text: &'static str) {
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// Writes `text` as a JSON string, as serde_json does: copied whole when nothing in it needs
/// escaping (what JSON escapes: `"`, `\` and the control characters below U+0020), else
/// written by serde_json, whose escaping it is.
pub fn write_str(out: &mut Vec<u8>, text: &str) {
    if needs_escaping(text.as_bytes()) {
        // Writing a string into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
        return;
    }
    out.reserve(text.len() + 2);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// Whether `bytes` hold a `"`, a `\` or a control character below U+0020, eight bytes at a
/// time (most strings here are 5 to 40 bytes: a byte loop, or a vector loop's scalar tail, spent
/// ~6 instructions a byte).
fn needs_escaping(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        found |= escapes_in(u64::from_le_bytes(word));
    }
    // The last 0 to 7 bytes, padded with spaces (which need no escaping).
    let rest = chunks.remainder();
    let mut word = [b' '; 8];
    word[..rest.len()].copy_from_slice(rest);
    found |= escapes_in(u64::from_le_bytes(word));
    found != 0
}

/// Non-zero when a byte of `word` is below 0x20, `"` or `\`. The classic "has a byte less
/// than n" test, `(x - n·0x01…) & !x & 0x80…`, which is exact for whether any byte is: a borrow
/// only starts at a byte that is.
fn escapes_in(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    below(word, 0x20) | below(quote, 1) | below(backslash, 1)
}

/// Writes `value` as serde_json's compact writer does (its objects in their map's order).
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // Writing a number into a `Vec` cannot fail.
        Value::Number(number) => {
            let _ = serde_json::to_writer(&mut *out, number);
        }
        Value::String(text) => write_str(out, text),
        Value::Array(items) => {
            out.push(b'[');
            comma_separated(out, items, write_value);
            out.push(b']');
        }
        Value::Object(fields) => {
            out.push(b'{');
            comma_separated(out, fields, |out, (key, item)| {
                write_str(out, key);
                out.push(b':');
                write_value(out, item);
            });
            out.push(b'}');
        }
    }
}

/// Writes `items` as a JSON array of strings, as serde_json writes a `Vec<String>`.
pub fn write_str_array<S: AsRef<str>>(out: &mut Vec<u8>, items: impl IntoIterator<Item = S>) {
    out.push(b'[');
    comma_separated(out, items, |out, item| write_str(out, item.as_ref()));
    out.push(b']');
}

/// Writes each of `items` with `write`, a comma between two.
fn comma_separated<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut write: impl FnMut(&mut Vec<u8>, T),
) {
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
}

fn optional(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => write_str(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

/// A UUID as its `Serialize` writes it for JSON: hyphenated, lower case.
fn uuid(out: &mut Vec<u8>, id: &Uuid) {
    let mut buffer = Uuid::encode_buffer();
    plain_owned(out, id.as_hyphenated().encode_lower(&mut buffer));
}

fn plain_owned(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// A timestamp as [`Timestamp`]'s `Serialize` writes it (RFC 3339, milliseconds, UTC).
fn timestamp(out: &mut Vec<u8>, at: &Timestamp) -> Result<(), serde_json::Error> {
    let mut text = Rfc3339Buffer::default();
    fmt::Write::write_fmt(&mut text, format_args!("{at}")).map_err(|_| {
        <serde_json::Error as serde::ser::Error>::custom("a timestamp past year 9999")
    })?;
    plain_owned(out, text.as_str());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use serde_json::{Value, json};

    use crate::{
        Category, DispatchResult, DispatchStatus, DispatcherOutcome, Envelope, ErrorCode,
        ExecutionResult, OutputMessage, Timestamp,
    };

    const ERROR_CODES: [ErrorCode; 8] = [
        ErrorCode::InvalidMessage,
        ErrorCode::NoDispatcher,
        ErrorCode::DispatcherFailed,
        ErrorCode::Timeout,
        ErrorCode::Rejected,
        ErrorCode::PolicyDenied,
        ErrorCode::PublishFailed,
        ErrorCode::WorkerUnavailable,
    ];

    /// Strings with what JSON must escape, what it must not (`/`, DEL, non-ASCII), and plain ones.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9._-]{0,24}",
            ".{0,24}",
            prop::collection::vec(
                prop_oneof![
                    Just('"'),
                    Just('\\'),
                    Just('/'),
                    Just('\u{7f}'),
                    Just('é'),
                    Just('\u{2028}'),
                    Just('😀'),
                    (0u8..0x20).prop_map(char::from),
                    Just('a'),
                ],
                0..40
            )
            .prop_map(|chars| chars.into_iter().collect()),
        ]
    }

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            (0u32..100_000).prop_map(|n| f64::from(n) / 1000.0),
            Just(0.0),
            Just(-0.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(1e21),
        ]
    }

    fn timestamp() -> impl Strategy<Value = Timestamp> {
        // From 1970 to past year 9999 (which neither side can write), and before 1970.
        prop_oneof![
            (0u64..400_000_000_000)
                .prop_map(|ms| { Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)) }),
            (1u64..1_000_000)
                .prop_map(|s| Timestamp(SystemTime::UNIX_EPOCH - Duration::from_secs(s))),
        ]
    }

    fn outcome() -> impl Strategy<Value = DispatcherOutcome> {
        (
            (
                text(),
                0..ExecutionResult::ALL.len(),
                number(),
                any::<usize>(),
                any::<u32>(),
            ),
            (
                prop::option::of(text()),
                prop::option::of(text()),
                prop::collection::vec(text(), 0..3),
            ),
        )
            .prop_map(
                |(
                    (id, result, duration_ms, output_count, attempts),
                    (error_message, policy, routes),
                )| DispatcherOutcome {
                    dispatcher_id: Arc::from(id),
                    result: ExecutionResult::ALL[result],
                    duration_ms,
                    output_count,
                    attempts,
                    error_message,
                    policy,
                    route_ids: routes.into_iter().map(Arc::from).collect(),
                },
            )
    }

    fn result() -> impl Strategy<Value = DispatchResult> {
        (
            (
                any::<u128>(),
                0..DispatchStatus::ALL.len(),
                text(),
                prop::option::of(0..Category::ALL.len()),
                text(),
                text(),
                number(),
            ),
            (
                prop::collection::vec((text(), text()), 0..2),
                any::<usize>(),
                prop::option::of(text()),
                prop::option::of(0..ERROR_CODES.len()),
                prop::option::of(text()),
                prop::option::of(text()),
                prop::option::of(text()),
            ),
            (
                any::<bool>(),
                prop::collection::vec(outcome(), 0..3),
                timestamp(),
                timestamp(),
            ),
        )
            .prop_map(
                |(
                    (id, status, topic, category, message_type, message_id, duration_ms),
                    (outputs, output_count, error_message, code, correlation_id, trace_id, span_id),
                    (trace_sampled, dispatchers, started_at, completed_at),
                )| DispatchResult {
                    dispatch_id: uuid::Uuid::from_u128(id),
                    status: DispatchStatus::ALL[status],
                    topic,
                    message_category: category.map(|c| Category::ALL[c]),
                    message_type,
                    message_id,
                    duration_ms,
                    outputs: outputs
                        .into_iter()
                        .map(|(topic, kind)| {
                            OutputMessage::new(topic, Envelope::new(kind, json!({"a": [1, "b"]})))
                        })
                        .collect(),
                    output_count,
                    error_message,
                    error_code: code.map(|c| ERROR_CODES[c]),
                    correlation_id,
                    trace_id,
                    span_id,
                    trace_sampled,
                    dispatchers,
                    started_at,
                    completed_at,
                },
            )
    }

    /// Arbitrary JSON values, a few levels deep, with every kind of number and string.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(text(), inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// `write_value` writes what serde_json writes.
        #[test]
        fn write_value_is_what_serde_writes(value in value()) {
            let mut ours = Vec::new();
            super::write_value(&mut ours, &value);
            prop_assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&value).unwrap()
            );
        }

        /// The hand-written answer is the derived one, byte for byte, or fails where it fails.
        #[test]
        fn write_json_is_what_serde_writes(result in result()) {
            let mut ours = Vec::new();
            let written = result.write_json(&mut ours);
            match serde_json::to_vec(&result) {
                Ok(theirs) => {
                    prop_assert!(written.is_ok(), "{written:?}");
                    prop_assert_eq!(
                        String::from_utf8(ours).unwrap(),
                        String::from_utf8(theirs).unwrap()
                    );
                }
                Err(_) => prop_assert!(written.is_err()),
            }
        }
    }

    /// The eight-bytes-at-a-time scan agrees with the definition for every byte value at every
    /// place of a chunk and of the tail, among bytes that need no escaping (also ones at the
    /// edges of the test: `!`, `#`, `[`, `]`, 0x80 and 0xFF).
    #[test]
    fn needs_escaping_is_exact_for_every_byte_anywhere() {
        let plain = |b: u8| !(b < 0x20 || b == b'"' || b == b'\\');
        for background in [b'a', b' ', b'!', b'#', b'[', b']', 0x80, 0xff] {
            for len in 1..=17 {
                for at in 0..len {
                    for byte in 0..=255u8 {
                        let mut bytes = vec![background; len];
                        bytes[at] = byte;
                        assert_eq!(
                            super::needs_escaping(&bytes),
                            !plain(byte),
                            "{byte:#x} at {at} of {len} among {background:#x}"
                        );
                    }
                }
            }
        }
        assert!(!super::needs_escaping(b""));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// An envelope's fields, in braces, are what serde writes of the envelope.
        #[test]
        fn an_envelopes_fields_are_what_serde_writes(
            (message_id, correlation_id, message_type) in (text(), prop::option::of(text()), text()),
            payload in value(),
            headers in prop::collection::btree_map(text(), text(), 0..3),
            nanos in 0u64..300_000_000_000_000_000,
        ) {
            let mut envelope = Envelope::new(message_type, payload);
            envelope.message_id = message_id;
            envelope.correlation_id = correlation_id;
            envelope.headers = headers;
            envelope.timestamp = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
            let mut ours = vec![b'{'];
            envelope.write_json_fields(&mut ours);
            ours.push(b'}');
            prop_assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&envelope).unwrap()
            );
        }
    }

    /// Every status, category, error code and outcome name is written as serde names it.
    #[test]
    fn every_enum_name_is_serdes() {
        for status in DispatchStatus::ALL {
            assert_eq!(json!(status), json!(status.as_str()));
        }
        for category in Category::ALL {
            assert_eq!(json!(category), json!(category.as_str()));
        }
        for code in ERROR_CODES {
            assert_eq!(json!(code), json!(code.as_str()));
        }
        for result in ExecutionResult::ALL {
            assert_eq!(json!(result), json!(result.as_str()));
        }
    }
}
