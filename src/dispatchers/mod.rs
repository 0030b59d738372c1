//! The built-in dispatchers a config file can name: `log`, `jsonl`, and the network kinds
//! `http`, `redis_stream` and `nats` (docs/dispatchers.md).
//!
//! Owns: their I/O (a log line, an append-only file with group commit, an HTTP request, an
//! `XADD`, a NATS publish) and the one body format the network kinds send ([`WireMessage`]).
//! Each is an ordinary [`crate::engine::Handler`] (the `http` kind is also a
//! [`crate::engine::CommandAdapter`]); the engine knows nothing special about them, and runs
//! them under the dispatcher's timeout, retries, breaker, rate limit, concurrency limit and
//! de-duplication like any other.
//!
//! Invariants: a call answers `Ok` only once the other side has taken the message (a 2xx, an
//! `XADD` reply, a flushed publish or a JetStream ack); every wait on the network is bounded;
//! an error says whether retrying can help (transient) or not (permanent), and never carries a
//! secret (header values, credentials in URLs).
//!
//! Must not: retry by itself (the engine's retry policy does), or open a connection per message.

mod http;
mod jsonl;
mod log;
mod nats;
mod redis_stream;

pub use http::{HttpCommand, HttpDispatcher, HttpTarget, MAX_ANSWER_BYTES, http_client};
pub use jsonl::{JsonlFile, JsonlLine};
pub use log::LogDispatcher;
pub use nats::{NatsDispatcher, NatsTarget};
pub use redis_stream::{RedisStreamDispatcher, RedisStreamTarget};

use serde::Serialize;

use crate::engine::{Category, Envelope, HandlerError, Message};

/// What the network kinds send: the envelope, with the topic it was published on, its category,
/// the dispatch it is part of and its correlation id beside it, as one JSON object:
///
/// ```json
/// {"topic": "shop.orders.events", "category": "event",
///  "dispatch_id": "1b4e28ba-2fa1-4d3b-a3f5-ef19b5a7633b", "correlation_id": "order-17",
///  "envelope": {"message_id": "…", "correlation_id": "order-17", "message_type": "order.placed",
///               "payload": {…}, "headers": {…}, "timestamp": "2026-12-01T10:00:00Z"}}
/// ```
///
/// `topic` and `envelope` are the shape of a Redis source entry's `data` (an output message), so
/// a `redis_stream` dispatcher can feed another dispatchd's `[[sources]]`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WireMessage<'a> {
    pub topic: &'a str,
    pub category: Category,
    pub dispatch_id: uuid::Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<&'a str>,
    pub envelope: &'a Envelope,
}

impl<'a> WireMessage<'a> {
    pub fn of(message: &Message<'a>) -> WireMessage<'a> {
        WireMessage {
            topic: message.topic,
            category: message.category,
            dispatch_id: message.dispatch_id,
            correlation_id: message.envelope.correlation_id.as_deref(),
            envelope: message.envelope,
        }
    }

    /// The JSON bytes. A payload that cannot be serialized can never be sent: permanent.
    pub fn to_vec(&self) -> Result<Vec<u8>, HandlerError> {
        serde_json::to_vec(self)
            .map_err(|e| HandlerError::permanent(format!("the message cannot be serialized: {e}")))
    }
}

/// The W3C trace context to send along: this dispatcher's span when the engine traces the
/// dispatch, else the current `tracing` span's (the caller's trace, as outputs carry it).
fn trace_headers(message: &Message<'_>) -> std::collections::BTreeMap<String, String> {
    let mut headers = std::collections::BTreeMap::new();
    match message.trace {
        Some(span) => span.inject(&mut headers),
        None => crate::propagation::inject_current(&mut headers),
    }
    headers
}

/// A URL as it may appear in an error or a log: scheme, host, port and path, without the
/// credentials or the query string that could hold a secret.
pub(crate) fn display_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => {
            let host = url.host_str().unwrap_or("");
            match url.port() {
                Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
                None => format!("{}://{host}{}", url.scheme(), url.path()),
            }
        }
        Err(_) => "(an invalid URL)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_errors_lose_their_credentials_and_query() {
        assert_eq!(
            display_url("https://user:secret@billing.example:8443/hooks/in?token=abc"),
            "https://billing.example:8443/hooks/in"
        );
        assert_eq!(
            display_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(display_url("not a url"), "(an invalid URL)");
    }

    #[test]
    fn the_wire_format_is_the_envelope_with_its_context() {
        let envelope = Envelope::new("order.placed", serde_json::json!({"n": 1}))
            .with_correlation_id("order-17");
        let message = Message::new("shop.orders.events", Category::Event, &envelope);
        let body: serde_json::Value =
            serde_json::from_slice(&WireMessage::of(&message).to_vec().unwrap()).unwrap();
        assert_eq!(body["topic"], "shop.orders.events");
        assert_eq!(body["category"], "event");
        assert_eq!(body["dispatch_id"], message.dispatch_id.to_string());
        assert_eq!(body["correlation_id"], "order-17");
        assert_eq!(body["envelope"]["message_type"], "order.placed");
        assert_eq!(body["envelope"]["message_id"], envelope.message_id);
        // A Redis source reads it as an output message.
        let output: crate::engine::OutputMessage = serde_json::from_value(body).unwrap();
        assert_eq!(output.envelope, envelope);
    }
}
