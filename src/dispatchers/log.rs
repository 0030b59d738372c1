use async_trait::async_trait;

use crate::engine::{Handler, HandlerError, Message, OutputMessage, Redactor, sanitize};

/// Logs each message at info, with the payload redacted (values of keys naming a secret),
/// sanitized and capped so a log line can neither leak a `password` nor grow without bound.
#[derive(Debug, Default, Clone)]
pub struct LogDispatcher {
    redactor: Redactor,
}

impl LogDispatcher {
    pub fn new(redactor: Redactor) -> LogDispatcher {
        LogDispatcher { redactor }
    }
}

#[async_trait]
impl Handler for LogDispatcher {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        // Nothing would print the line: no redaction, no formatting (the filter is read once per
        // callsite and cached by tracing, so this costs a load and a compare).
        if !tracing::enabled!(tracing::Level::INFO) {
            return Ok(Vec::new());
        }
        let envelope = message.envelope;
        let payload = self.redactor.redact(&envelope.payload).to_string();
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
