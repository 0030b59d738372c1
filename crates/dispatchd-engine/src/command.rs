//! Commands: messages of category command run a [`CommandAdapter`] after every [`Policy`] of
//! their dispatcher allowed them.
//!
//! Instrumentation sees `on_policy_denied` when a policy refuses (and the adapter never runs),
//! and `on_adapter_invoke` after all policies allowed and just before the adapter runs.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

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

/// Allow and deny rules by command type and by parameter values, with a default for commands
/// no rule matches. [`ParamRule`]s are checked first, in the order they were added, and the
/// first that matches decides; then the plain type rules of [`RulePolicy::allow`] and
/// [`RulePolicy::deny`]; then the default.
#[derive(Debug, Clone, PartialEq)]
pub struct RulePolicy {
    name: &'static str,
    ordered: Vec<ParamRule>,
    rules: HashMap<String, Effect>,
    default: Effect,
}

/// A rule that matches a command by its type (any type when `None`) and the values of its
/// parameters (the payload's fields): it matches when every condition holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamRule {
    pub effect: Effect,
    pub command_type: Option<String>,
    /// A payload field (a dotted path such as `customer.tier` reaches into objects) and what
    /// its value must be. A missing field satisfies no condition.
    pub params: Vec<(String, Condition)>,
}

/// What a parameter's value must be for a [`ParamRule`] to match.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Equal to one of these values.
    OneOf(Vec<serde_json::Value>),
    /// A number within these bounds (inclusive; either may be absent).
    Range { min: Option<f64>, max: Option<f64> },
}

impl Condition {
    fn holds(&self, value: &serde_json::Value) -> bool {
        match self {
            Condition::OneOf(values) => values.iter().any(|v| same(v, value)),
            Condition::Range { min, max } => value
                .as_f64()
                .is_some_and(|n| min.is_none_or(|min| n >= min) && max.is_none_or(|max| n <= max)),
        }
    }
}

/// JSON equality where numbers compare by value (`5` equals `5.0`, as a config author means).
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

impl ParamRule {
    fn matches(&self, message: &Message<'_>) -> bool {
        let envelope = message.envelope;
        self.command_type
            .as_deref()
            .is_none_or(|t| t == envelope.message_type)
            && self.params.iter().all(|(path, condition)| {
                path.split('.')
                    .try_fold(&envelope.payload, |value, key| value.get(key))
                    .is_some_and(|value| condition.holds(value))
            })
    }
}

/// Policy names are metric labels and [`Policy::name`] returns them as `&'static str`; names
/// that come from a configuration are interned here, so building the same service again (tests,
/// a reload) does not leak a copy each time.
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(known) = names.get(name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

impl RulePolicy {
    pub fn new(name: &'static str, default: Effect) -> RulePolicy {
        RulePolicy {
            name,
            ordered: Vec::new(),
            rules: HashMap::new(),
            default,
        }
    }

    /// A policy whose name is known only at run time (a configuration's).
    pub fn named(name: &str, default: Effect) -> RulePolicy {
        RulePolicy::new(intern(name), default)
    }

    /// Adds a rule checked after those added before it, and before the plain type rules.
    pub fn rule(mut self, rule: ParamRule) -> RulePolicy {
        self.ordered.push(rule);
        self
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
        if let Some((index, rule)) = self
            .ordered
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches(message))
        {
            return match rule.effect {
                Effect::Allow => Decision::Allow,
                // The parameters' names, never their values: they may be anything.
                Effect::Deny if rule.params.is_empty() => Decision::Deny {
                    reason: format!("command type `{command_type}` is not allowed (rule {index})"),
                },
                Effect::Deny => {
                    let names: Vec<&str> = rule.params.iter().map(|(p, _)| p.as_str()).collect();
                    Decision::Deny {
                        reason: format!(
                            "command type `{command_type}` is not allowed with these values of {} (rule {index})",
                            names.join(", ")
                        ),
                    }
                }
            };
        }
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
    use crate::{Category, Envelope};

    fn check(policy: &RulePolicy, command_type: &str) -> Decision {
        check_with(policy, command_type, serde_json::Value::Null)
    }

    fn check_with(policy: &RulePolicy, command_type: &str, payload: serde_json::Value) -> Decision {
        let envelope = Envelope::new(command_type, payload);
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

    #[test]
    fn parameter_rules_match_in_order_by_type_and_values() {
        use serde_json::json;
        let policy = RulePolicy::named("billing", Effect::Deny)
            .rule(ParamRule {
                effect: Effect::Deny,
                command_type: Some("refund".into()),
                params: vec![(
                    "amount".into(),
                    Condition::Range {
                        min: Some(500.01),
                        max: None,
                    },
                )],
            })
            .rule(ParamRule {
                effect: Effect::Allow,
                command_type: Some("refund".into()),
                params: vec![(
                    "order.currency".into(),
                    Condition::OneOf(vec![json!("EUR"), json!("USD")]),
                )],
            })
            .rule(ParamRule {
                effect: Effect::Allow,
                command_type: None,
                params: vec![("tier".into(), Condition::OneOf(vec![json!(1)]))],
            });
        assert_eq!(policy.name(), "billing");
        let refund = |amount: serde_json::Value, currency: &str| {
            check_with(
                &policy,
                "refund",
                json!({"amount": amount, "order": {"currency": currency}}),
            )
        };
        assert_eq!(refund(json!(20), "EUR"), Decision::Allow);
        assert_eq!(
            refund(json!(500), "USD"),
            Decision::Allow,
            "bounds are inclusive"
        );
        assert_eq!(
            refund(json!(900), "EUR"),
            Decision::Deny {
                reason: "command type `refund` is not allowed with these values of amount (rule 0)"
                    .into()
            },
            "the first matching rule decides, and the value is not in the reason"
        );
        assert!(
            matches!(refund(json!(20), "GBP"), Decision::Deny { .. }),
            "default"
        );
        assert!(
            matches!(check(&policy, "refund"), Decision::Deny { .. }),
            "a missing parameter satisfies no condition"
        );
        // Any type, and numbers compare by value.
        assert_eq!(
            check_with(&policy, "ping", json!({"tier": 1.0})),
            Decision::Allow
        );
        assert!(matches!(
            check_with(&policy, "ping", json!({"tier": "1"})),
            Decision::Deny { .. }
        ));
        // Names from a configuration are interned: the same name is the same &'static str.
        assert!(std::ptr::eq(
            RulePolicy::named("billing", Effect::Allow).name(),
            policy.name()
        ));
    }
}
