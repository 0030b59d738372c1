use async_trait::async_trait;

use crate::engine::{Handler, HandlerError, Message, OutputMessage, sanitize};

/// Logs each message at info, with the payload sanitized and capped so a log line can neither
/// leak a `password=` nor grow without bound.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogDispatcher;

#[async_trait]
impl Handler for LogDispatcher {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let envelope = message.envelope;
        let payload = envelope.payload.to_string();
        tracing::info!(
            topic = message.topic,
            category = message.category.as_str(),
            message_type = %envelope.message_type,
            message_id = %envelope.message_id,
            correlation_id = envelope.correlation_id.as_deref(),
            payload = %sanitize(&payload),
            "Received a message."
        );
        Ok(Vec::new())
    }
}
