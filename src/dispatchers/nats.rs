//! The `nats` kind: each message is published on a NATS subject, with the official client
//! (`async-nats`).
//!
//! The payload is the [`super::WireMessage`] JSON; the headers carry the W3C trace context
//! (`traceparent`, `tracestate`). Two guarantees, chosen per dispatcher:
//! - Core NATS (`jetstream = false`): the call succeeds once the message was written to the
//!   server connection (published and flushed). NATS itself is at-most-once: a subject nobody
//!   subscribes to drops it, and so does a server that dies before routing it.
//! - JetStream (`jetstream = true`): the call succeeds only when the stream that captures the
//!   subject acknowledged the message (it is stored). `Nats-Msg-Id` is the envelope's
//!   `message_id`, so JetStream's own de-duplication (within the stream's duplicate window,
//!   2 minutes by default) drops a message sent twice: a retry after a lost ack, or the same
//!   message ingested again.
//!
//! The client connects in the background and reconnects by itself; while it is not connected a
//! call fails at once (transient) instead of queueing in the client, and the heartbeat fails, so
//! the dispatcher goes unhealthy. Every call is bounded by `call_timeout`.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_trait::async_trait;

use super::{WireMessage, display_url, trace_headers};
use crate::engine::{Handler, HandlerError, Message, OutputMessage};

/// Where a `nats` dispatcher publishes: validated by the configuration.
#[derive(Clone, PartialEq)]
pub struct NatsTarget {
    pub url: String,
    /// The subject; `None` publishes on the message's topic (topics are valid subjects).
    pub subject: Option<String>,
    /// Wait for the JetStream ack, and set `Nats-Msg-Id`.
    pub jetstream: bool,
    /// Each publish (and its flush or ack) must be done within this.
    pub call_timeout: Duration,
}

impl std::fmt::Debug for NatsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTarget")
            .field("url", &display_url(&self.url))
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// Publishes each message on a NATS subject.
pub struct NatsDispatcher {
    target: NatsTarget,
    client: async_nats::Client,
    jetstream: Option<async_nats::jetstream::Context>,
}

impl NatsDispatcher {
    /// Starts connecting in the background; fails only for a URL that is not a NATS address.
    pub async fn connect(target: NatsTarget) -> Result<NatsDispatcher, String> {
        let address: async_nats::ServerAddr = target
            .url
            .parse()
            .map_err(|e| format!("{} is not a NATS URL: {e}", display_url(&target.url)))?;
        let client = async_nats::ConnectOptions::new()
            .name("dispatchd")
            .retry_on_initial_connect()
            .connection_timeout(target.call_timeout)
            .request_timeout(Some(target.call_timeout))
            // Quick reconnection after a server restart: 100 ms doubling, at most 2 s.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100u64 << attempts.min(5)).min(Duration::from_secs(2))
            })
            .connect(address)
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to NATS at {}: {e}",
                    display_url(&target.url)
                )
            })?;
        let jetstream = target
            .jetstream
            .then(|| async_nats::jetstream::new(client.clone()));
        Ok(NatsDispatcher {
            target,
            client,
            jetstream,
        })
    }

    fn connected(&self) -> Result<(), HandlerError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(HandlerError::transient(format!(
                "not connected to NATS at {} ({state})",
                display_url(&self.target.url)
            ))),
        }
    }

    async fn publish(&self, message: &Message<'_>) -> Result<(), HandlerError> {
        let payload = WireMessage::of(message).to_vec()?;
        let subject = self
            .target
            .subject
            .clone()
            .unwrap_or_else(|| message.topic.to_owned());
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in trace_headers(message) {
            headers.insert(name, value);
        }
        match &self.jetstream {
            Some(jetstream) => {
                let publish = PublishMessage::build()
                    .payload(payload.into())
                    .headers(headers)
                    .message_id(&message.envelope.message_id);
                let ack = jetstream
                    .send_publish(subject, publish)
                    .await
                    .map_err(|e| HandlerError::transient(format!("JetStream publish: {e}")))?;
                // A duplicate (`ack.duplicate`) was stored before: delivered all the same.
                ack.await.map_err(|e| match e.kind() {
                    // Not retried: the stream refused it for what it is.
                    PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
                        HandlerError::permanent(format!("JetStream refused the message: {e}"))
                    }
                    // No stream captures the subject (yet: a server still recovering its
                    // streams answers so too), a lost ack, a broken connection: retry.
                    _ => HandlerError::transient(format!("JetStream ack: {e}")),
                })?;
            }
            None => {
                self.client
                    .publish_with_headers(subject, headers, payload.into())
                    .await
                    .map_err(|e| HandlerError::transient(format!("NATS publish: {e}")))?;
                self.client
                    .flush()
                    .await
                    .map_err(|e| HandlerError::transient(format!("NATS flush: {e}")))?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Handler for NatsDispatcher {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        self.connected()?;
        let timeout = self.target.call_timeout;
        match tokio::time::timeout(timeout, self.publish(message)).await {
            Ok(published) => published.map(|()| Vec::new()),
            Err(_) => Err(HandlerError::transient(format!(
                "NATS did not take the message within {timeout:?}"
            ))),
        }
    }

    /// Alive while the client is connected.
    async fn heartbeat(&self) -> Result<(), HandlerError> {
        self.connected()
    }
}
