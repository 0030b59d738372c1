//! The `redis_stream` kind: each message is one `XADD` to a Redis stream, for competing
//! consumers elsewhere (a consumer group) to take.
//!
//! The entry has one field, `data`, holding the [`super::WireMessage`] JSON, and a `traceparent`
//! field when the dispatch is part of a trace. `data` is the shape a dispatchd `[[sources]]`
//! entry takes, so another dispatchd can consume the stream.
//!
//! The connection is made on the first message (and re-made by the connection manager when
//! Redis goes away), so a Redis that is down at startup makes the dispatcher unhealthy (its
//! heartbeat `PING` fails), not the service unable to start. Every call (connecting, `XADD`,
//! `PING`) is bounded by `call_timeout`: a hung Redis is a transient error, retried by the
//! dispatcher's retry policy, never a hang. An `XADD` that timed out may still have been
//! applied: a retry then appends a duplicate, which consumers recognize by the envelope's
//! `message_id`.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use super::{WireMessage, display_url, trace_headers};
use crate::engine::{Handler, HandlerError, Message, OutputMessage};

/// Where a `redis_stream` dispatcher appends: validated by the configuration.
#[derive(Clone, PartialEq)]
pub struct RedisStreamTarget {
    pub url: String,
    /// The stream; `None` appends to the stream named like the message's topic.
    pub stream: Option<String>,
    /// `XADD … MAXLEN ~ n`: trims old entries, possibly before every consumer read them.
    pub max_len: Option<usize>,
    /// Each Redis call must be answered within this.
    pub call_timeout: Duration,
}

impl std::fmt::Debug for RedisStreamTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamTarget")
            .field("url", &display_url(&self.url))
            .field("stream", &self.stream)
            .field("max_len", &self.max_len)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// Appends each message to a Redis stream.
pub struct RedisStreamDispatcher {
    target: RedisStreamTarget,
    connection: OnceCell<ConnectionManager>,
}

impl RedisStreamDispatcher {
    /// Checks the URL; connects on the first message.
    pub fn new(target: RedisStreamTarget) -> Result<RedisStreamDispatcher, String> {
        redis::Client::open(target.url.as_str())
            .map_err(|e| format!("{} is not a Redis URL: {e}", display_url(&target.url)))?;
        Ok(RedisStreamDispatcher {
            target,
            connection: OnceCell::new(),
        })
    }

    /// The connection, made within `call_timeout` if there is none yet.
    async fn connection(&self) -> Result<ConnectionManager, HandlerError> {
        let timeout = self.target.call_timeout;
        let connect = self.connection.get_or_try_init(|| async {
            // The connection's own response timeout is only a backstop: `call_timeout` (below)
            // answers first, with an error that says so.
            crate::bus::redis::connect(&self.target.url, timeout.saturating_mul(2))
                .await
                .map_err(|e| e.to_string())
        });
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(connection)) => Ok(connection.clone()),
            Ok(Err(error)) => Err(HandlerError::transient(format!(
                "cannot connect to Redis at {}: {error}",
                display_url(&self.target.url)
            ))),
            Err(_) => Err(HandlerError::transient(format!(
                "Redis at {} did not accept a connection within {timeout:?}",
                display_url(&self.target.url)
            ))),
        }
    }

    /// Runs `command` within `call_timeout`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
        what: &str,
    ) -> Result<T, HandlerError> {
        let mut connection = self.connection().await?;
        let timeout = self.target.call_timeout;
        match tokio::time::timeout(timeout, command.query_async(&mut connection)).await {
            Ok(Ok(answer)) => Ok(answer),
            // A stream key holding another type can never take an entry.
            Ok(Err(error)) if error.code() == Some("WRONGTYPE") => Err(HandlerError::permanent(
                format!("redis refused {what}: {error}"),
            )),
            Ok(Err(error)) => Err(HandlerError::transient(format!("redis {what}: {error}"))),
            Err(_) => Err(HandlerError::transient(format!(
                "redis did not answer {what} within {timeout:?}"
            ))),
        }
    }
}

#[async_trait]
impl Handler for RedisStreamDispatcher {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let data = WireMessage::of(message).to_vec()?;
        let stream = self.target.stream.as_deref().unwrap_or(message.topic);
        let mut command = redis::cmd("XADD");
        command.arg(stream);
        if let Some(max_len) = self.target.max_len {
            command.arg("MAXLEN").arg("~").arg(max_len);
        }
        command.arg("*").arg("data").arg(data);
        if let Some(traceparent) = trace_headers(message).remove("traceparent") {
            command.arg("traceparent").arg(traceparent);
        }
        let _id: String = self.query(&command, "XADD").await?;
        Ok(Vec::new())
    }

    /// Alive while Redis answers a `PING`.
    async fn heartbeat(&self) -> Result<(), HandlerError> {
        let _pong: String = self.query(&redis::cmd("PING"), "PING").await?;
        Ok(())
    }
}
