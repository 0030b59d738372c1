//! Routes: which dispatcher receives which topics.

use super::pattern::TopicPattern;
use super::topic::Category;

/// A route as registered: topics matching `topic_pattern` with category `category` (and, when
/// set, message type `message_type`) go to `dispatcher_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub route_id: String,
    pub topic_pattern: String,
    pub message_category: Category,
    pub dispatcher_id: String,
    pub message_type: Option<String>,
    pub enabled: bool,
}

impl Route {
    pub fn new(
        route_id: impl Into<String>,
        topic_pattern: impl Into<String>,
        message_category: Category,
        dispatcher_id: impl Into<String>,
    ) -> Route {
        Route {
            route_id: route_id.into(),
            topic_pattern: topic_pattern.into(),
            message_category,
            dispatcher_id: dispatcher_id.into(),
            message_type: None,
            enabled: true,
        }
    }

    pub fn with_message_type(mut self, message_type: impl Into<String>) -> Route {
        self.message_type = Some(message_type.into());
        self
    }

    /// Kept in the engine (it shows in listings) but never matched.
    pub fn disabled(mut self) -> Route {
        self.enabled = false;
        self
    }
}

/// A route after validation: the pattern compiled, the dispatcher resolved to its index.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRoute {
    pub(crate) route_id: std::sync::Arc<str>,
    pub(crate) pattern: TopicPattern,
    pub(crate) dispatcher: usize,
    pub(crate) message_type: Option<Box<str>>,
}

impl CompiledRoute {
    #[inline]
    pub(crate) fn matches(&self, segments: &[&str], message_type: &str) -> bool {
        self.message_type
            .as_deref()
            .is_none_or(|wanted| wanted == message_type)
            && self.pattern.matches(segments)
    }
}
