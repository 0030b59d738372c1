//! The `http` kind: each message is one request to a URL.
//!
//! The body is the [`WireMessage`] JSON; the headers are the configured ones (secret ones from
//! the environment, marked sensitive), `content-type: application/json`, `idempotency-key` (the
//! message id, the same on every retry, so a receiver can drop a repeat) and the W3C trace
//! context (`traceparent`, `tracestate`) of the dispatcher's span.
//!
//! How the answer is read:
//! - 2xx: success. A JSON answer `{"outputs": [{"topic": …, "envelope": {…}}]}` carries outputs
//!   (published like any handler's); in an output envelope only `message_type` is required:
//!   `message_id` defaults to a new UUID, `correlation_id` to the incoming message's (or its id),
//!   `timestamp` to now. Any other answer carries none. Outputs that are not of that shape, or an
//!   answer larger than [`MAX_ANSWER_BYTES`], are a permanent error (the receiver took the
//!   message; sending it again would not mend its answer).
//! - 408, 429 and 5xx: transient, retried by the dispatcher's retry policy, which waits at least
//!   the `Retry-After` the answer asks for (capped by the policy's `max_backoff`).
//! - Any other status (3xx included: redirects are not followed) is permanent.
//! - No answer (refused, reset, dropped): transient. The request may have arrived: receivers
//!   de-duplicate on `idempotency-key`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::Deserialize;

use super::{WireMessage, display_url, trace_headers};
use crate::engine::{CommandAdapter, Envelope, Handler, HandlerError, Message, OutputMessage};

/// The largest answer read for outputs; a larger one is a permanent error.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// How much of an error answer's body goes into the error message.
const ERROR_BODY_CHARS: usize = 200;

/// The one client every `http` dispatcher of a service shares: one keep-alive connection pool,
/// so a busy dispatcher reuses its connections instead of paying a TCP (and TLS) handshake per
/// message. The dispatcher's `timeout` bounds each request (the engine drops it when time runs
/// out); connecting has its own, shorter bound, so an unreachable host fails fast and is retried.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("dispatchd/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Where and how an `http` dispatcher sends: validated by the configuration.
#[derive(Clone, PartialEq)]
pub struct HttpTarget {
    pub url: reqwest::Url,
    pub method: reqwest::Method,
    /// Sent with every request; values from the environment are marked sensitive (never
    /// printed, never in an HTTP/2 header table).
    pub headers: HeaderMap,
}

impl fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTarget")
            .field("url", &display_url(self.url.as_str()))
            .field("method", &self.method)
            .field("headers", &self.headers)
            .finish()
    }
}

impl HttpTarget {
    /// A `POST` of the message to `url`, with no extra header.
    pub fn post(url: reqwest::Url) -> HttpTarget {
        HttpTarget {
            url,
            method: reqwest::Method::POST,
            headers: HeaderMap::new(),
        }
    }

    /// Sends `message` with the trace context `trace` and reads the answer.
    pub(super) async fn call(
        &self,
        client: &reqwest::Client,
        message: &Message<'_>,
        trace: BTreeMap<String, String>,
    ) -> Result<Vec<OutputMessage>, HandlerError> {
        let body = WireMessage::of(message).to_vec()?;
        let mut request = client
            .request(self.method.clone(), self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Ok(id) = HeaderValue::from_str(&message.envelope.message_id) {
            request = request.header(HeaderName::from_static("idempotency-key"), id);
        }
        for (name, value) in trace {
            request = request.header(name, value);
        }
        let where_to = || display_url(self.url.as_str());
        let mut response = request.send().await.map_err(|error| {
            // No answer: the request may or may not have arrived. reqwest's text names the URL,
            // which may hold a secret: it is left out.
            HandlerError::transient(format!(
                "no answer from {}: {}",
                where_to(),
                error_chain(&error.without_url())
            ))
        })?;
        let status = response.status();
        if status.is_success() {
            let answer = read_bounded(&mut response).await.map_err(|error| {
                HandlerError::permanent(format!("reading the answer of {}: {error}", where_to()))
            })?;
            let json = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("json"));
            if !json || answer.is_empty() {
                return Ok(Vec::new());
            }
            return outputs(&answer, message.envelope).map_err(|error| {
                HandlerError::permanent(format!(
                    "{} answered {status} with outputs that cannot be read: {error}",
                    where_to()
                ))
            });
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::sinks::parse_retry_after);
        let text = read_bounded(&mut response).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
        let reason = format!("{} answered {status}: {}", where_to(), excerpt.trim());
        let code = status.as_u16();
        if code == 408 || code == 429 || status.is_server_error() {
            let error = HandlerError::transient(reason);
            Err(match retry_after {
                Some(wait) => error.with_retry_after(wait),
                None => error,
            })
        } else {
            Err(HandlerError::permanent(reason))
        }
    }
}

/// The error and its causes, which is where reqwest says what went wrong (refused, reset).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The answer's body, at most [`MAX_ANSWER_BYTES`].
async fn read_bounded(response: &mut reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Deserialize)]
struct Answer {
    outputs: Option<Vec<AnswerOutput>>,
}

#[derive(Deserialize)]
struct AnswerOutput {
    topic: String,
    envelope: AnswerEnvelope,
}

#[derive(Deserialize)]
struct AnswerEnvelope {
    message_id: Option<String>,
    correlation_id: Option<String>,
    message_type: String,
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    timestamp: Option<String>,
}

/// The outputs a 2xx JSON answer carries (none when it has no `outputs` field).
fn outputs(answer: &[u8], incoming: &Envelope) -> Result<Vec<OutputMessage>, String> {
    let answer: serde_json::Value = match serde_json::from_slice(answer) {
        Ok(answer) => answer,
        // Not JSON after all (a content type that says otherwise): no outputs.
        Err(_) => return Ok(Vec::new()),
    };
    if answer.get("outputs").is_none_or(serde_json::Value::is_null) {
        return Ok(Vec::new());
    }
    let answer: Answer = serde_json::from_value(answer).map_err(|e| e.to_string())?;
    answer
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|output| {
            let e = output.envelope;
            let timestamp = match e.timestamp {
                None => SystemTime::now(),
                Some(text) => humantime::parse_rfc3339_weak(&text)
                    .map_err(|error| format!("timestamp `{text}`: {error}"))?,
            };
            let mut envelope = incoming.derive(e.message_type, e.payload);
            if let Some(id) = e.message_id {
                envelope.message_id = id;
            }
            if e.correlation_id.is_some() {
                envelope.correlation_id = e.correlation_id;
            }
            envelope.headers = e.headers;
            envelope.timestamp = timestamp;
            Ok(OutputMessage::new(output.topic, envelope))
        })
        .collect()
}

/// Delivers events and intents to an [`HttpTarget`].
#[derive(Clone)]
pub struct HttpDispatcher {
    client: reqwest::Client,
    target: Arc<HttpTarget>,
}

impl HttpDispatcher {
    /// `client` is shared by every `http` dispatcher ([`http_client`]).
    pub fn new(client: reqwest::Client, target: HttpTarget) -> HttpDispatcher {
        HttpDispatcher {
            client,
            target: Arc::new(target),
        }
    }
}

#[async_trait]
impl Handler for HttpDispatcher {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        self.target
            .call(&self.client, message, trace_headers(message))
            .await
    }
}

/// Carries out commands by sending them to an [`HttpTarget`], after the dispatcher's policies
/// allowed them. Its adapter name (the `adapter` label) is `http`.
#[derive(Clone)]
pub struct HttpCommand {
    client: reqwest::Client,
    target: Arc<HttpTarget>,
}

impl HttpCommand {
    pub fn new(client: reqwest::Client, target: HttpTarget) -> HttpCommand {
        HttpCommand {
            client,
            target: Arc::new(target),
        }
    }
}

#[async_trait]
impl CommandAdapter for HttpCommand {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn execute(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        // The engine runs adapters inside a client span of their own (when it traces): the
        // current `tracing` span is that one.
        let mut trace = BTreeMap::new();
        crate::propagation::inject_current(&mut trace);
        self.target.call(&self.client, message, trace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_take_defaults_from_the_incoming_message() {
        let incoming = Envelope::new("order.placed", json!({})).with_correlation_id("c-1");
        let answer = json!({"outputs": [
            {"topic": "shop.invoices.events", "envelope": {"message_type": "invoice.created", "payload": {"n": 1}}},
            {"topic": "shop.mail.intents", "envelope": {"message_type": "mail.send", "message_id": "m-2",
             "correlation_id": "c-2", "headers": {"k": "v"}, "timestamp": "2026-12-01T10:00:00Z"}}
        ]});
        let outputs = outputs(answer.to_string().as_bytes(), &incoming).unwrap();
        assert_eq!(outputs.len(), 2);
        assert_eq!(outputs[0].topic, "shop.invoices.events");
        assert_eq!(outputs[0].envelope.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(outputs[0].envelope.payload, json!({"n": 1}));
        assert!(uuid::Uuid::parse_str(&outputs[0].envelope.message_id).is_ok());
        assert_eq!(outputs[1].envelope.message_id, "m-2");
        assert_eq!(outputs[1].envelope.correlation_id.as_deref(), Some("c-2"));
        assert_eq!(outputs[1].envelope.headers["k"], "v");
        assert_eq!(
            humantime::format_rfc3339(outputs[1].envelope.timestamp).to_string(),
            "2026-12-01T10:00:00Z"
        );
    }

    #[test]
    fn answers_without_outputs_carry_none_and_malformed_outputs_are_refused() {
        let incoming = Envelope::new("t", json!({}));
        for none in [
            &b""[..],
            b"{}",
            b"{\"ok\":true}",
            b"{\"outputs\":null}",
            b"[1]",
            b"no",
        ] {
            assert_eq!(outputs(none, &incoming), Ok(Vec::new()));
        }
        for bad in [
            json!({"outputs": {"topic": "a"}}),
            json!({"outputs": [{"topic": "a.events"}]}),
            json!({"outputs": [{"topic": "a.events", "envelope": {"payload": {}}}]}),
            json!({"outputs": [{"topic": "a.events", "envelope": {"message_type": "t", "timestamp": "soon"}}]}),
        ] {
            assert!(
                outputs(bad.to_string().as_bytes(), &incoming).is_err(),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn the_shared_client_speaks_https() {
        // Nothing listens on port 1: the error is about connecting, not about a scheme the
        // client cannot speak (which is what a client built without TLS answers).
        let error = http_client()
            .unwrap()
            .get("https://127.0.0.1:1/")
            .send()
            .await
            .unwrap_err();
        let text = error_chain(&error);
        assert!(text.contains("Connection refused"), "{text}");
    }

    #[test]
    fn a_target_prints_without_its_secrets() {
        let mut target = HttpTarget::post("http://u:pw@127.0.0.1:9/in?key=k".parse().unwrap());
        let mut secret = HeaderValue::from_static("Bearer s3cr3t");
        secret.set_sensitive(true);
        target.headers.insert("authorization", secret);
        let printed = format!("{target:?}");
        assert!(
            !printed.contains("pw") && !printed.contains("s3cr3t") && !printed.contains("key=k")
        );
        assert!(printed.contains("http://127.0.0.1:9/in"), "{printed}");
    }
}
