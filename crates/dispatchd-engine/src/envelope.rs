//! The message envelope and the output messages handlers produce.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One message as the engine sees it. The topic travels beside it, not inside it, because the
/// same envelope may be published to several topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Envelope {
    /// Unique per message; a UUID v4 when the sender gave none. De-duplication keys on it.
    pub message_id: String,
    /// Ties related messages together across hops; copied to outputs by convention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Selects dispatchers and routes that filter on it. Never a metric label.
    pub message_type: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// When the message was created, serialized as RFC 3339.
    #[serde(with = "humantime_serde")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub timestamp: SystemTime,
}

impl Envelope {
    /// A new envelope with a fresh UUID v4 id and the current time.
    pub fn new(message_type: impl Into<String>, payload: serde_json::Value) -> Envelope {
        Envelope {
            message_id: uuid::Uuid::new_v4().to_string(),
            correlation_id: None,
            message_type: message_type.into(),
            payload,
            headers: BTreeMap::new(),
            timestamp: SystemTime::now(),
        }
    }

    pub fn with_message_id(mut self, message_id: impl Into<String>) -> Envelope {
        self.message_id = message_id.into();
        self
    }

    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Envelope {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Envelope {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// A reply to this message: a new id, the same correlation id (or this message's id when it
    /// had none), so a chain of outputs can be followed back to its first message.
    pub fn derive(&self, message_type: impl Into<String>, payload: serde_json::Value) -> Envelope {
        let correlation_id = self
            .correlation_id
            .clone()
            .unwrap_or_else(|| self.message_id.clone());
        Envelope::new(message_type, payload).with_correlation_id(correlation_id)
    }
}

/// A message a handler asks the runtime to publish onward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutputMessage {
    pub topic: String,
    pub envelope: Envelope,
}

impl OutputMessage {
    pub fn new(topic: impl Into<String>, envelope: Envelope) -> OutputMessage {
        OutputMessage {
            topic: topic.into(),
            envelope,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_envelopes_get_distinct_uuid_ids() {
        let a = Envelope::new("t", serde_json::Value::Null);
        let b = Envelope::new("t", serde_json::Value::Null);
        assert_ne!(a.message_id, b.message_id);
        assert!(uuid::Uuid::parse_str(&a.message_id).is_ok());
    }

    #[test]
    fn derived_envelopes_keep_the_correlation() {
        let first = Envelope::new("order.placed", serde_json::json!({}));
        let reply = first.derive("order.confirmed", serde_json::json!({}));
        assert_eq!(
            reply.correlation_id.as_deref(),
            Some(first.message_id.as_str())
        );
        let second = reply.derive("order.shipped", serde_json::json!({}));
        assert_eq!(second.correlation_id, reply.correlation_id);
    }

    #[test]
    fn round_trips_through_json_with_an_rfc3339_timestamp() {
        let envelope = Envelope::new("t", serde_json::json!({"a": 1}))
            .with_header("k", "v")
            .with_correlation_id("c");
        let text = serde_json::to_string(&envelope).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(value["timestamp"].as_str().unwrap().ends_with('Z'));
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.message_id, envelope.message_id);
        assert_eq!(back.headers, envelope.headers);
    }
}
