//! `POST /api/v1/messages/{topic}`: one message in, its `DispatchResult` out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::future::Either;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use serde::Deserialize;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::error::{Body, PathParam};
use super::openapi::{DispatchResultOrError, ErrorBody};
use super::{ApiError, ApiState};
use crate::engine::{DispatchResult, DispatchStatus, Envelope};
use crate::sinks::DispatchEvent;

/// The longest `message_id` or `correlation_id` accepted, in characters.
const MAX_ID_LEN: usize = 256;

/// The request body. Unknown fields are refused so a misspelt `payload` is not silently empty.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestBody {
    /// Selects the dispatchers and routes that filter on it.
    #[schema(min_length = 1, max_length = 255)]
    pub message_type: String,
    /// Any JSON value; handed to the dispatchers as is.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Unique per message (de-duplication keys on it); a UUID v4 when absent.
    #[schema(min_length = 1, max_length = 256)]
    pub message_id: Option<String>,
    #[schema(min_length = 1, max_length = 256)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// When the message was created: RFC 3339 (`2026-12-03T05:00:00Z`, `…+01:00`), from 1970 to
    /// 9999 in UTC; now when absent.
    #[serde(default, deserialize_with = "rfc3339")]
    #[schema(value_type = Option<String>, format = DateTime, pattern = "^(19[7-9][0-9]|[2-9][0-9]{3})-")]
    pub timestamp: Option<SystemTime>,
}

/// The first instant an RFC 3339 timestamp cannot show in four year digits (10000-01-01).
const YEAR_10000: std::time::Duration = std::time::Duration::from_secs(253_402_300_800);

/// An RFC 3339 timestamp with any UTC offset (read by `time`: humantime, which the envelope's
/// own serialization uses, took an offset for `Z`), and also humantime's looser forms without an
/// offset (`2026-12-03 05:00:00`) as before. Outside 1970..10000 it is refused: the envelope is
/// written as RFC 3339 in UTC again, which cannot show those.
fn rfc3339<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SystemTime>, D::Error> {
    use serde::de::Error;
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    // humantime reads `+01:00` as if it were `Z`, an hour off: a time with an offset is `time`'s
    // alone.
    let offset = text.get(19..).is_some_and(|rest| rest.contains(['+', '-']));
    let time = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .ok()
        .or_else(|| {
            (!offset)
                .then(|| humantime::parse_rfc3339_weak(&text).ok())
                .flatten()
        })
        .ok_or_else(|| D::Error::custom("timestamp must be an RFC 3339 date-time"))?;
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since < YEAR_10000 => Ok(Some(time)),
        _ => Err(D::Error::custom(
            "timestamp must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z",
        )),
    }
}

/// The server span's name, `{method} {http.route}` (the stable HTTP server conventions).
const INGEST_SPAN_NAME: &str = "POST /api/v1/messages/{topic}";

/// The ingest span, with `target` (a literal): `dispatchd::trace` when it is exported,
/// `dispatchd::ingest` when it only carries the trace into log lines.
macro_rules! ingest_span {
    ($target:literal, $uri:expr) => {
        tracing::info_span!(
            target: $target,
            "ingest",
            otel.name = INGEST_SPAN_NAME,
            otel.kind = "server",
            // The stable HTTP server conventions; the span name is `{method} {http.route}`.
            http.request.method = "POST",
            http.route = "/api/v1/messages/{topic}",
            url.path = $uri.path(),
            url.scheme = "http",
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        )
    };
}
/// Records `context`'s trace id and span id on `span`: every log line inside the dispatch
/// carries them.
fn record_ids(span: &tracing::Span, context: &opentelemetry::Context) {
    if let Some((trace_id, span_id)) = crate::propagation::ids(context) {
        span.record("trace_id", trace_id.as_str());
        span.record("span_id", span_id.as_str());
    }
}

/// The topic of `POST /api/v1/messages/{topic}`, as the description states it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct Topic {
    /// Dot-separated segments of `[A-Za-z0-9_-]`, one category among them (`events`, `event`,
    /// `evt`, `commands`, `command`, `cmd`, `intents`, `intent`; another category's words may
    /// not appear too): `orders.order.events`, `dev.user.cmd.v1`. Anything else is answered 400
    /// `invalid_message`.
    #[param(
        max_length = 255,
        pattern = r"^(?!(?:.*\.)?(?:events?|evt)(?:\..*)?\.(?:commands?|cmd|intents?)(?:\.|$))(?!(?:.*\.)?(?:commands?|cmd)(?:\..*)?\.(?:events?|evt|intents?)(?:\.|$))(?!(?:.*\.)?intents?(?:\..*)?\.(?:events?|evt|commands?|cmd)(?:\.|$))(?:[A-Za-z0-9_-]+\.)*(?:events?|evt|commands?|cmd|intents?)(?:\.[A-Za-z0-9_-]+)*$"
    )]
    topic: String,
}

/// `POST /api/v1/messages/{topic}`.
#[utoipa::path(
    post,
    path = "/api/v1/messages/{topic}",
    operation_id = "dispatch_message",
    tag = "ingest",
    params(Topic),
    request_body(content = IngestBody, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`success` or `skipped` (a duplicate)", body = DispatchResult),
        (status = 202, description = "`routed`: accepted for asynchronous processing", body = DispatchResult),
        (status = 400, description = "`invalid_message` (a result), or `invalid_json`, `invalid_topic`, `invalid_body`", body = DispatchResultOrError),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`denied` by a policy (a result), or `forbidden`: the token lacks the `ingest` scope", body = DispatchResultOrError),
        (status = 404, description = "`no_dispatcher`: no enabled route matched", body = DispatchResult),
        (status = 408, description = "`body_too_slow`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_envelope`: JSON, but not an envelope", body = ErrorBody),
        (status = 502, description = "`dispatcher_error` or `publish_failed`", body = DispatchResult),
        (status = 503, description = "`rejected` by a protection (a result), or `overloaded`, `request_timeout`, `shutting_down`", body = DispatchResultOrError),
        (status = 504, description = "`timeout`", body = DispatchResult),
    )
)]
pub(super) async fn ingest(
    State(state): State<Arc<ApiState>>,
    PathParam(topic): PathParam,
    uri: Uri,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    check_content_type(&headers)?;
    let envelope = parse_envelope(&body)?;
    // The caller's traceparent (a malformed one is no parent: a new trace starts), else the
    // envelope's own.
    let mut parent = crate::propagation::extract_http(&headers);
    if !parent.has_active_span() {
        parent = crate::propagation::extract_map(&envelope.headers);
    }
    // With spans exported, the ingest span is the trace's server span. Without, the context is
    // made directly (`Unexported`: the same ids, sampling and propagation, without a span nobody
    // reads) and the span is a log span only, which costs nothing while logs are off.
    let (span, context) = match &state.unexported {
        None => {
            let span = ingest_span!("dispatchd::trace", uri);
            let _ = span.set_parent(parent);
            let context = span.context();
            record_ids(&span, &context);
            // Not attached: inside, the current `tracing` span is the one to follow (an
            // adapter's, when the engine traces).
            (span, None)
        }
        Some(unexported) => {
            let span = ingest_span!("dispatchd::ingest", uri);
            let context = unexported.child(&parent, INGEST_SPAN_NAME, SpanKind::Server);
            if !span.is_disabled() {
                record_ids(&span, &context);
            }
            (span, Some(context))
        }
    };
    // Biased: the dispatch first, so one that finishes on its first poll (most do) never
    // registers a waker with the shutdown token (a lock in its tree).
    let dispatch = state
        .engine
        .dispatch(&topic, &envelope)
        .instrument(span.clone());
    let dispatch = match context {
        None => Either::Left(dispatch),
        Some(context) => Either::Right(dispatch.with_context(context)),
    };
    let result = tokio::select! {
        biased;
        result = dispatch => result,
        () = state.abandon.cancelled() => {
            let error = ApiError::ShuttingDown;
            record_response(&span, error.status());
            return Err(error);
        }
    };
    let status = status_code(&result);
    record_response(&span, status);
    drop(span);
    if let Some(events) = state.events.as_ref().filter(|bus| bus.has_subscribers()) {
        // Under the sinks' `block` policy this waits for room: backpressure, not loss.
        events
            .publish(DispatchEvent::from_dispatch_owned(
                &result,
                envelope,
                state.engine.redactor(),
            ))
            .await;
    }
    Ok(answer(status, result))
}

/// The answer to a dispatch: its result as JSON, written into one buffer sized for a usual
/// result by [`DispatchResult::write_json`] (the derived `Serialize`'s bytes, at a third of
/// serde_json's cost). axum's `Json` starts at 128 bytes and grows by copying, through a
/// `BytesMut` writer that checks its capacity on each of ~90 pieces.
fn answer(status: StatusCode, result: DispatchResult) -> Response {
    let mut body = Vec::with_capacity(RESULT_CAPACITY);
    match result.write_json(&mut body) {
        Ok(()) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        // Cannot happen for a result (its timestamps are before year 10000); axum's answer to
        // it, a 500, if it ever does.
        Err(_) => Json(result).into_response(),
    }
}

/// Room for a result with a few dispatchers and no large outputs (~600 bytes with one).
const RESULT_CAPACITY: usize = 1024;

/// `http.response.status_code` (an integer attribute); a 5xx also makes the server span an error,
/// with `error.type` the status code (4xx answers are the client's doing and leave it unset).
fn record_response(span: &tracing::Span, status: StatusCode) {
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("error.type", status.as_str());
        span.record("otel.status_code", "error");
    }
}

/// The HTTP status for a dispatch, by its status alone. Refusals answer otherwise than an
/// error, because nothing upstream failed: `denied` (a policy) is 403, do not retry as is;
/// `rejected` (an open circuit breaker, the rate limiter, the concurrency limit) is 503, retry
/// later.
pub fn status_code(result: &DispatchResult) -> StatusCode {
    match result.status {
        DispatchStatus::Success | DispatchStatus::Skipped => StatusCode::OK,
        DispatchStatus::Routed => StatusCode::ACCEPTED,
        DispatchStatus::NoDispatcher => StatusCode::NOT_FOUND,
        DispatchStatus::InvalidMessage => StatusCode::BAD_REQUEST,
        DispatchStatus::Denied => StatusCode::FORBIDDEN,
        DispatchStatus::Rejected => StatusCode::SERVICE_UNAVAILABLE,
        DispatchStatus::DispatcherError | DispatchStatus::PublishFailed => StatusCode::BAD_GATEWAY,
        DispatchStatus::Timeout => StatusCode::GATEWAY_TIMEOUT,
        // A status a newer engine adds answers 500 until it is mapped here (a test checks that
        // every status the engine has today is).
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// JSON, or no content type at all; anything else is most likely a client sending a form.
pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Parses the JSON body of `POST /api/v1/messages/{topic}` into an envelope, or answers the
/// 4xx error the endpoint returns for it. Arbitrary bytes never panic (property tests and the
/// `envelope` fuzz target).
pub fn parse_envelope(body: &[u8]) -> Result<Envelope, ApiError> {
    let body: IngestBody = serde_json::from_slice(body)
        .map_err(|error| ApiError::from_json(body, &error, "envelope"))?;
    for (field, value) in [
        ("message_id", &body.message_id),
        ("correlation_id", &body.correlation_id),
    ] {
        if let Some(value) = value {
            // Characters, as the description's `maxLength` counts them.
            if value.is_empty() || value.chars().count() > MAX_ID_LEN {
                return Err(ApiError::InvalidEnvelope(format!(
                    "{field} must be 1 to {MAX_ID_LEN} characters"
                )));
            }
        }
    }
    let mut envelope = Envelope::new(body.message_type, body.payload);
    if let Some(id) = body.message_id {
        envelope.message_id = id;
    }
    envelope.correlation_id = body.correlation_id;
    envelope.headers = body.headers;
    if let Some(timestamp) = body.timestamp {
        envelope.timestamp = timestamp;
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::status_code;
    use crate::engine::{DispatchStatus, Envelope};

    #[test]
    fn every_status_has_its_http_status_refusals_included() {
        let envelope = Envelope::new("t", serde_json::Value::Null);
        for (status, expected) in [
            (DispatchStatus::Success, StatusCode::OK),
            (DispatchStatus::Skipped, StatusCode::OK),
            (DispatchStatus::Routed, StatusCode::ACCEPTED),
            (DispatchStatus::NoDispatcher, StatusCode::NOT_FOUND),
            (DispatchStatus::InvalidMessage, StatusCode::BAD_REQUEST),
            (DispatchStatus::Denied, StatusCode::FORBIDDEN),
            (DispatchStatus::Rejected, StatusCode::SERVICE_UNAVAILABLE),
            (DispatchStatus::DispatcherError, StatusCode::BAD_GATEWAY),
            (DispatchStatus::PublishFailed, StatusCode::BAD_GATEWAY),
            (DispatchStatus::Timeout, StatusCode::GATEWAY_TIMEOUT),
        ] {
            let mut result =
                crate::engine::DispatchResult::new(uuid::Uuid::nil(), "a.events", &envelope);
            result.status = status;
            // The status alone decides, whatever the code says.
            result.error_code = Some(crate::engine::ErrorCode::DispatcherFailed);
            assert_eq!(status_code(&result), expected, "{status}");
        }
    }

    fn timestamp(text: &str) -> Result<std::time::SystemTime, String> {
        let body = serde_json::json!({"message_type": "t", "timestamp": text}).to_string();
        super::parse_envelope(body.as_bytes())
            .map(|envelope| envelope.timestamp)
            .map_err(|error| format!("{} {}", error.code(), error))
    }

    /// What the description promises (RFC 3339 date-times from 1970 to 9999, any offset) is
    /// read, and a time the envelope could not be written with again is refused, never a panic.
    #[test]
    fn timestamps_are_rfc_3339_with_any_offset_within_what_can_be_written_again() {
        let utc = timestamp("2026-12-03T05:00:00.5Z").unwrap();
        assert_eq!(timestamp("2026-12-03T06:00:00.5+01:00").unwrap(), utc);
        assert_eq!(timestamp("2026-12-03T04:30:00.5-00:30").unwrap(), utc);
        // humantime's looser form, accepted before, still is; with an offset it is read with it
        // (humantime read it an hour off).
        assert!(timestamp("2026-12-03 05:00:00").is_ok());
        assert_eq!(timestamp("2026-12-03 06:00:00.5+01:00").unwrap(), utc);
        for refused in [
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2026-02-30T00:00:00Z",
            "yesterday",
        ] {
            let error = timestamp(refused).unwrap_err();
            assert!(error.starts_with("invalid_envelope "), "{refused}: {error}");
        }
        let body = br#"{"message_type":"t","timestamp":null}"#;
        assert!(super::parse_envelope(body).is_ok());
    }

    /// Ids are limited in characters, as `maxLength` counts them.
    #[test]
    fn ids_are_limited_in_characters() {
        let id = |text: String| {
            let body = serde_json::json!({"message_type": "t", "message_id": text}).to_string();
            super::parse_envelope(body.as_bytes()).map(|envelope| envelope.message_id)
        };
        assert!(id("é".repeat(256)).is_ok(), "512 bytes, 256 characters");
        assert!(id("a".repeat(257)).is_err());
        assert!(id(String::new()).is_err());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::parse_envelope;

    /// Arbitrary JSON values, a few levels deep.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,10}", inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(500)))]

        /// Whatever a client sends, the answer is an envelope or a 4xx error: never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Err(error) = parse_envelope(&body) {
                prop_assert!(error.status().is_client_error());
            }
        }

        /// Any JSON value: an envelope or a 4xx.
        #[test]
        fn arbitrary_json_never_panics(value in json_value()) {
            let body = serde_json::to_vec(&value).unwrap();
            if let Err(error) = parse_envelope(&body) {
                prop_assert!(error.status().is_client_error());
            }
        }

        /// A well-formed envelope comes back field for field.
        #[test]
        fn well_formed_envelopes_round_trip(
            message_type in "[a-z][a-z._]{0,30}",
            message_id in prop::option::of("[ -~]{1,64}"),
            correlation_id in prop::option::of("[ -~]{1,64}"),
            headers in prop::collection::btree_map("[a-z-]{1,20}", ".{0,30}", 0..4),
            payload in json_value(),
        ) {
            let body = json!({
                "message_type": message_type,
                "message_id": message_id,
                "correlation_id": correlation_id,
                "headers": headers,
                "payload": payload,
            });
            let envelope = parse_envelope(&serde_json::to_vec(&body).unwrap()).unwrap();
            prop_assert_eq!(&envelope.message_type, &message_type);
            if let Some(id) = &message_id {
                prop_assert_eq!(&envelope.message_id, id);
            }
            prop_assert_eq!(&envelope.correlation_id, &correlation_id);
            prop_assert_eq!(&envelope.headers, &headers);
            prop_assert_eq!(&envelope.payload, &payload);
            // And the envelope itself survives serialization.
            let again: crate::engine::Envelope =
                serde_json::from_str(&serde_json::to_string(&envelope).unwrap()).unwrap();
            prop_assert_eq!(again.payload, envelope.payload);
            prop_assert_eq!(again.message_id, envelope.message_id);
        }
    }
}
