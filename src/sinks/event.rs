//! The dispatch event: what every dispatch becomes on the events stream and in every sink.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::{DispatchResult, Envelope, Redactor};

/// One dispatch, in the payload schema the original service defined (`type`, `event`, `runId`,
/// `parentRunId`, `name`, `timestamp`, `input`, `output`, `userId`, `tokensUsage`, `metadata`,
/// `tags`, `log_id`). Sinks receive it as is, or transformed for their service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchEvent {
    /// `tool` for commands, `chain` for events and intents.
    #[serde(rename = "type")]
    pub kind: String,
    /// `end` when the dispatch succeeded (or was skipped), `error` otherwise.
    pub event: String,
    /// The dispatch id.
    #[serde(rename = "runId")]
    pub run_id: String,
    /// The message's correlation id, which ties a chain of dispatches together.
    #[serde(
        rename = "parentRunId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub parent_run_id: Option<String>,
    /// The topic.
    pub name: String,
    /// When the dispatch finished, RFC 3339.
    #[serde(with = "humantime_serde")]
    pub timestamp: SystemTime,
    /// `message_type`, `message_id` and the payload.
    pub input: Value,
    /// The status, the outputs' count and each dispatcher's outcome.
    pub output: Value,
    /// From the envelope's `user_id` header, when it has one.
    #[serde(rename = "userId", default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// From the payload's `usage` or `tokensUsage`, when it has one.
    #[serde(
        rename = "tokensUsage",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub tokens_usage: Option<Value>,
    /// Category, status, duration, error code and (sanitized) error message.
    pub metadata: Value,
    pub tags: Vec<String>,
    /// Unique per event: sinks and services de-duplicate on it.
    pub log_id: String,
}

impl DispatchEvent {
    /// The event of one finished dispatch of `envelope`.
    /// The event of one dispatch. The payload goes through `redactor`: sinks forward events to
    /// third parties, and a secret in a message must not travel with it.
    pub fn from_dispatch(
        result: &DispatchResult,
        envelope: &Envelope,
        redactor: &Redactor,
    ) -> DispatchEvent {
        let category = result.message_category.map_or("unknown", |c| c.as_str());
        let kind = if category == "command" {
            "tool"
        } else {
            "chain"
        };
        let tokens_usage = envelope
            .payload
            .get("tokensUsage")
            .or_else(|| envelope.payload.get("usage"))
            .cloned();
        DispatchEvent {
            kind: kind.to_owned(),
            event: if result.status.is_error() {
                "error"
            } else {
                "end"
            }
            .to_owned(),
            run_id: result.dispatch_id.to_string(),
            parent_run_id: result.correlation_id.clone(),
            name: result.topic.clone(),
            timestamp: SystemTime::now(),
            input: json!({
                "message_type": result.message_type,
                "message_id": result.message_id,
                "payload": redactor.redact(&envelope.payload),
            }),
            output: json!({
                "status": result.status,
                "output_count": result.output_count,
                "dispatchers": result.dispatchers,
            }),
            user_id: envelope.headers.get("user_id").cloned(),
            tokens_usage,
            metadata: json!({
                "traceparent": match (&result.trace_id, &result.span_id) {
                    (Some(trace), Some(span)) => Some(format!("00-{trace}-{span}-01")),
                    _ => None,
                },
                "category": category,
                "status": result.status,
                "duration_ms": result.duration_ms,
                "error_code": result.error_code,
                "error_message": result.error_message,
            }),
            tags: vec![category.to_owned(), result.status.as_str().to_owned()],
            log_id: result.dispatch_id.to_string(),
        }
    }
}
