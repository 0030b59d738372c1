//! `POST /api/v1/messages/{topic}`: one message in, its `DispatchResult` out.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use opentelemetry::trace::TraceContextExt;
use serde::Deserialize;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::error::{Body, PathParam};
use super::{ApiError, ApiState};
use crate::engine::{DispatchResult, DispatchStatus, Envelope};
use crate::sinks::DispatchEvent;

/// The longest `message_id` or `correlation_id` accepted, in bytes.
const MAX_ID_LEN: usize = 256;

/// The request body. Unknown fields are refused so a misspelt `payload` is not silently empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestBody {
    pub message_type: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, with = "humantime_serde")]
    pub timestamp: Option<SystemTime>,
}

pub(super) async fn ingest(
    State(state): State<ApiState>,
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
    let span = tracing::info_span!(
        target: "dispatchd::trace",
        "ingest",
        otel.name = "POST /api/v1/messages/{topic}",
        otel.kind = "server",
        // The stable HTTP server conventions; the span name is `{method} {http.route}`.
        http.request.method = "POST",
        http.route = "/api/v1/messages/{topic}",
        url.path = uri.path(),
        url.scheme = "http",
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    if let Some((trace_id, span_id)) = crate::propagation::ids(&span.context()) {
        // Every log line inside this dispatch carries them.
        span.record("trace_id", trace_id.as_str());
        span.record("span_id", span_id.as_str());
    }
    let result = tokio::select! {
        result = state.engine.dispatch(&topic, &envelope).instrument(span.clone()) => result,
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
            .publish(DispatchEvent::from_dispatch(
                &result,
                &envelope,
                state.engine.redactor(),
            ))
            .await;
    }
    Ok((status, Json(result)).into_response())
}

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
            if value.is_empty() || value.len() > MAX_ID_LEN {
                return Err(ApiError::InvalidEnvelope(format!(
                    "{field} must be 1 to {MAX_ID_LEN} bytes"
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
