//! What a dispatch returns: the status, the outputs, and each dispatcher's outcome.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::envelope::OutputMessage;
use super::topic::Category;

/// The status of one dispatch. A closed set: it is a metric label and decides the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchStatus {
    /// Every dispatcher that ran succeeded.
    Success,
    /// Accepted for asynchronous processing; the only non-terminal status.
    Routed,
    /// No enabled route matched the topic, category and message type.
    NoDispatcher,
    /// At least one dispatcher failed or was refused; see each dispatcher's outcome.
    DispatcherError,
    /// Every failing dispatcher failed by running out of time.
    Timeout,
    /// The topic or envelope was malformed; nothing ran.
    InvalidMessage,
    /// The dispatchers succeeded but their outputs could not be published.
    PublishFailed,
    /// Nothing ran on purpose, for example a duplicate message.
    Skipped,
}

impl DispatchStatus {
    pub const ALL: [DispatchStatus; 8] = [
        DispatchStatus::Success,
        DispatchStatus::Routed,
        DispatchStatus::NoDispatcher,
        DispatchStatus::DispatcherError,
        DispatchStatus::Timeout,
        DispatchStatus::InvalidMessage,
        DispatchStatus::PublishFailed,
        DispatchStatus::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DispatchStatus::Success => "success",
            DispatchStatus::Routed => "routed",
            DispatchStatus::NoDispatcher => "no_dispatcher",
            DispatchStatus::DispatcherError => "dispatcher_error",
            DispatchStatus::Timeout => "timeout",
            DispatchStatus::InvalidMessage => "invalid_message",
            DispatchStatus::PublishFailed => "publish_failed",
            DispatchStatus::Skipped => "skipped",
        }
    }

    /// Every status but `routed` is final.
    pub fn is_terminal(self) -> bool {
        self != DispatchStatus::Routed
    }

    pub fn is_successful(self) -> bool {
        self == DispatchStatus::Success
    }

    pub fn is_error(self) -> bool {
        matches!(
            self,
            DispatchStatus::NoDispatcher
                | DispatchStatus::DispatcherError
                | DispatchStatus::Timeout
                | DispatchStatus::InvalidMessage
                | DispatchStatus::PublishFailed
        )
    }

    /// Worth sending again as is: the failure was about time or transport, not the message.
    pub fn requires_retry(self) -> bool {
        matches!(
            self,
            DispatchStatus::Timeout | DispatchStatus::PublishFailed
        )
    }
}

impl fmt::Display for DispatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one dispatcher's run ended. A metric label (`result`), so a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionResult {
    Success,
    Error,
    Timeout,
    /// Refused before running: a policy, the circuit breaker, the rate limiter or the
    /// concurrency limit.
    Rejected,
    /// Not run because this dispatcher already handled the message (de-duplication). Not an
    /// execution: the metrics do not count it in `dispatcher_executions_total`.
    Skipped,
}

impl ExecutionResult {
    pub const ALL: [ExecutionResult; 5] = [
        ExecutionResult::Success,
        ExecutionResult::Error,
        ExecutionResult::Timeout,
        ExecutionResult::Rejected,
        ExecutionResult::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionResult::Success => "success",
            ExecutionResult::Error => "error",
            ExecutionResult::Timeout => "timeout",
            ExecutionResult::Rejected => "rejected",
            ExecutionResult::Skipped => "skipped",
        }
    }
}

impl fmt::Display for ExecutionResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dispatcher's part in a dispatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatcherOutcome {
    pub dispatcher_id: Arc<str>,
    pub result: ExecutionResult,
    pub duration_ms: f64,
    pub output_count: usize,
    /// Tries made: 1, plus the retries; 0 when it was refused or skipped before running.
    pub attempts: u32,
    /// Sanitized; present when the result is `error`, `timeout` or `rejected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The policy that refused the command, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// The answer to one dispatch, as the HTTP API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchResult {
    pub dispatch_id: Uuid,
    pub status: DispatchStatus,
    pub topic: String,
    /// Absent when the topic could not be parsed.
    pub message_category: Option<Category>,
    pub message_type: String,
    pub message_id: String,
    pub duration_ms: f64,
    /// Outputs of every dispatcher that succeeded, in dispatcher order, also when another failed.
    pub outputs: Vec<OutputMessage>,
    pub output_count: usize,
    /// Sanitized and capped; `None` on success.
    pub error_message: Option<String>,
    /// A stable machine-readable reason (`invalid_topic`, `dispatcher_failed`, ...).
    pub error_code: Option<String>,
    pub correlation_id: Option<String>,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// Each dispatcher that was selected, in registration order.
    pub dispatchers: Vec<DispatcherOutcome>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_predicates_follow_the_contract() {
        use DispatchStatus::*;
        let terminal: Vec<_> = DispatchStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal.len(), 7);
        assert!(!Routed.is_terminal());
        let successful: Vec<_> = DispatchStatus::ALL
            .into_iter()
            .filter(|s| s.is_successful())
            .collect();
        assert_eq!(successful, [Success]);
        let errors: Vec<_> = DispatchStatus::ALL
            .into_iter()
            .filter(|s| s.is_error())
            .collect();
        assert_eq!(
            errors,
            [
                NoDispatcher,
                DispatcherError,
                Timeout,
                InvalidMessage,
                PublishFailed
            ]
        );
        let retry: Vec<_> = DispatchStatus::ALL
            .into_iter()
            .filter(|s| s.requires_retry())
            .collect();
        assert_eq!(retry, [Timeout, PublishFailed]);
    }

    #[test]
    fn statuses_serialize_as_their_label() {
        for status in DispatchStatus::ALL {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        for result in ExecutionResult::ALL {
            assert_eq!(serde_json::to_value(result).unwrap(), result.as_str());
        }
    }
}
