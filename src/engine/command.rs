//! Commands: messages of category command run a [`CommandAdapter`] after every [`Policy`] of
//! their dispatcher allowed them.
//!
//! Instrumentation sees `on_policy_denied` when a policy refuses (and the adapter never runs),
//! and `on_adapter_invoke` after all policies allowed and just before the adapter runs.

use std::collections::HashMap;

use async_trait::async_trait;

use super::dispatcher::{HandlerError, Message};
use super::envelope::OutputMessage;

/// Carries out commands, usually by calling another system.
#[async_trait]
pub trait CommandAdapter: Send + Sync + 'static {
    /// The adapter's name as a metric label: a fixed string, never derived from input.
    fn name(&self) -> &'static str;

    /// Runs the command; its type is `message.envelope.message_type` and its parameters are
    /// the payload.
    async fn execute(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError>;

    /// Whether the adapter can still do its work; see `Handler::heartbeat`.
    async fn heartbeat(&self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A policy's verdict on one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { reason: String },
}

/// Decides whether a command may run. Must be cheap and must not block: it runs on the dispatch
/// path before the adapter.
pub trait Policy: Send + Sync + 'static {
    /// The policy's name as a metric label and in the result: a fixed string.
    fn name(&self) -> &'static str;

    fn check(&self, message: &Message<'_>) -> Decision;
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

/// Allow and deny rules by command type, with a default for types no rule names.
#[derive(Debug, Clone)]
pub struct RulePolicy {
    name: &'static str,
    rules: HashMap<String, Effect>,
    default: Effect,
}

impl RulePolicy {
    pub fn new(name: &'static str, default: Effect) -> RulePolicy {
        RulePolicy {
            name,
            rules: HashMap::new(),
            default,
        }
    }

    pub fn allow(mut self, command_type: impl Into<String>) -> RulePolicy {
        self.rules.insert(command_type.into(), Effect::Allow);
        self
    }

    pub fn deny(mut self, command_type: impl Into<String>) -> RulePolicy {
        self.rules.insert(command_type.into(), Effect::Deny);
        self
    }
}

impl Policy for RulePolicy {
    fn name(&self) -> &'static str {
        self.name
    }

    fn check(&self, message: &Message<'_>) -> Decision {
        let command_type = message.envelope.message_type.as_str();
        match self
            .rules
            .get(command_type)
            .copied()
            .unwrap_or(self.default)
        {
            Effect::Allow => Decision::Allow,
            Effect::Deny => Decision::Deny {
                reason: format!("command type `{command_type}` is not allowed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Category, Envelope};

    fn check(policy: &RulePolicy, command_type: &str) -> Decision {
        let envelope = Envelope::new(command_type, serde_json::Value::Null);
        let message = Message::new("a.commands", Category::Command, &envelope);
        policy.check(&message)
    }

    #[test]
    fn rules_override_the_default() {
        let deny_by_default = RulePolicy::new("p", Effect::Deny).allow("refund");
        assert_eq!(check(&deny_by_default, "refund"), Decision::Allow);
        assert!(matches!(
            check(&deny_by_default, "delete"),
            Decision::Deny { .. }
        ));

        let allow_by_default = RulePolicy::new("p", Effect::Allow).deny("delete");
        assert_eq!(check(&allow_by_default, "refund"), Decision::Allow);
        assert_eq!(
            check(&allow_by_default, "delete"),
            Decision::Deny {
                reason: "command type `delete` is not allowed".into()
            }
        );
    }
}
