//! What a dispatch returns: the status, the outputs, and each dispatcher's outcome.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::envelope::{Envelope, OutputMessage};
use super::topic::Category;

/// The status of one dispatch. A closed set: it is a metric label and decides the HTTP status.
///
/// Three kinds of ending: a success (`success`, and `skipped` when nothing needed to run), an
/// error (something failed, or the message was wrong), and a refusal (`rejected`, `denied`): a
/// protection or a policy said no, which is dispatchd working as configured and never counts
/// toward an error ratio.
///
/// When the dispatchers of one message end differently, the worst outcome decides, in this order
/// (see [`DispatchStatus::of_outcomes`]):
///
/// | any dispatcher ended … | status | `error_code` | HTTP |
/// | --- | --- | --- | --- |
/// | `error` (also beside timeouts) | `dispatcher_error` | `dispatcher_failed` | 502 |
/// | `timeout` (and none `error`) | `timeout` | `timeout` | 504 |
/// | `rejected` (and none failed) | `rejected` | `rejected` | 503 |
/// | `denied` (and none failed or rejected) | `denied` | `policy_denied` | 403 |
/// | `success` (the others `success` or `skipped`) | `success` | none | 200 |
/// | every one `skipped` | `skipped` | none | 200 |
///
/// A real failure beats a refusal because the message then needs someone's attention; a
/// rejection beats a denial because "retry later" is the answer that can still succeed (the
/// denied part is denied again, at no cost). Outputs of the dispatchers that succeeded are
/// returned whatever the status, and publishing them afterwards can still fail: `publish_failed`
/// then replaces a refusal or a success (outputs were lost: a real failure), never an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DispatchStatus {
    /// Every dispatcher that ran succeeded (some may have skipped a duplicate).
    Success,
    /// Accepted for asynchronous processing; the only non-terminal status.
    Routed,
    /// No enabled route matched the topic, category and message type.
    NoDispatcher,
    /// At least one dispatcher failed (an error or a panic); see each dispatcher's outcome.
    DispatcherError,
    /// Every failing dispatcher failed by running out of time.
    Timeout,
    /// The topic or envelope was malformed; nothing ran.
    InvalidMessage,
    /// The dispatchers succeeded but their outputs could not be published.
    PublishFailed,
    /// Nothing ran on purpose: every dispatcher already handled this message (de-duplication).
    Skipped,
    /// A protection refused at least one dispatcher (its circuit breaker, rate limiter or
    /// concurrency limit) and none failed: not now, retry later (HTTP 503). A refusal, not an
    /// error. A retry runs the successful dispatchers again unless they de-duplicate.
    Rejected,
    /// A policy refused a command and nothing failed or was rejected: do not retry it as is
    /// (HTTP 403). A refusal, not an error.
    Denied,
}

impl DispatchStatus {
    pub const ALL: [DispatchStatus; 10] = [
        DispatchStatus::Success,
        DispatchStatus::Routed,
        DispatchStatus::NoDispatcher,
        DispatchStatus::DispatcherError,
        DispatchStatus::Timeout,
        DispatchStatus::InvalidMessage,
        DispatchStatus::PublishFailed,
        DispatchStatus::Skipped,
        DispatchStatus::Rejected,
        DispatchStatus::Denied,
    ];

    /// Its position in [`DispatchStatus::ALL`], for tables indexed by status.
    pub const fn index(self) -> usize {
        self as usize
    }

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
            DispatchStatus::Rejected => "rejected",
            DispatchStatus::Denied => "denied",
        }
    }

    /// Every status but `routed` is final.
    pub fn is_terminal(self) -> bool {
        self != DispatchStatus::Routed
    }

    pub fn is_successful(self) -> bool {
        self == DispatchStatus::Success
    }

    /// Something failed, or the message was wrong. Refusals (`rejected`, `denied`) and `skipped`
    /// are not errors.
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

    /// A protection or a policy refused: `rejected` or `denied`.
    pub fn is_refusal(self) -> bool {
        matches!(self, DispatchStatus::Rejected | DispatchStatus::Denied)
    }

    /// Worth sending again as is, later: the failure or refusal was about time, transport or
    /// load, not the message.
    pub fn requires_retry(self) -> bool {
        matches!(
            self,
            DispatchStatus::Timeout | DispatchStatus::PublishFailed | DispatchStatus::Rejected
        )
    }

    /// The status of a dispatch whose selected dispatchers ended with `results`, and its
    /// `error_code`, by the precedence in the type's documentation. `None` for no results (the
    /// engine answers `no_dispatcher` before it gets here).
    pub fn of_outcomes(
        results: impl IntoIterator<Item = ExecutionResult>,
    ) -> Option<(DispatchStatus, Option<ErrorCode>)> {
        let worst = results.into_iter().max_by_key(|r| r.precedence())?;
        Some(match worst {
            ExecutionResult::Error => (
                DispatchStatus::DispatcherError,
                Some(ErrorCode::DispatcherFailed),
            ),
            ExecutionResult::Timeout => (DispatchStatus::Timeout, Some(ErrorCode::Timeout)),
            ExecutionResult::Rejected => (DispatchStatus::Rejected, Some(ErrorCode::Rejected)),
            ExecutionResult::Denied => (DispatchStatus::Denied, Some(ErrorCode::PolicyDenied)),
            ExecutionResult::Success => (DispatchStatus::Success, None),
            ExecutionResult::Skipped => (DispatchStatus::Skipped, None),
        })
    }
}

/// Why a dispatch did not succeed, for machines: stable, and more specific than the status
/// where the status has several causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The topic or the envelope was malformed.
    InvalidMessage,
    /// No enabled route matched.
    NoDispatcher,
    /// A dispatcher ran and failed, or panicked.
    DispatcherFailed,
    /// Every failing dispatcher ran out of time.
    Timeout,
    /// A protection refused: the circuit breaker, the rate limiter or the concurrency limit.
    Rejected,
    /// A command policy refused.
    PolicyDenied,
    /// The dispatchers succeeded but their outputs could not be published.
    PublishFailed,
    /// Every refused dispatcher was a remote worker that could not be called (stale, or not
    /// registered, or registered without an endpoint): status `rejected`, retry later.
    WorkerUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::NoDispatcher => "no_dispatcher",
            ErrorCode::DispatcherFailed => "dispatcher_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Rejected => "rejected",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::PublishFailed => "publish_failed",
            ErrorCode::WorkerUnavailable => "worker_unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for DispatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one dispatcher's part in a dispatch ended. A metric label (`result`), so a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ExecutionResult {
    Success,
    /// It ran and failed (after any retries), or panicked.
    Error,
    /// It ran out of its timeout (after any retries).
    Timeout,
    /// Refused before running by a protection: the circuit breaker, the rate limiter or the
    /// concurrency limit. Not a failure of the dispatcher.
    Rejected,
    /// Refused before running by a command policy. Not a failure of the dispatcher.
    Denied,
    /// Not run because this dispatcher already handled the message (de-duplication).
    Skipped,
}

impl ExecutionResult {
    pub const ALL: [ExecutionResult; 6] = [
        ExecutionResult::Success,
        ExecutionResult::Error,
        ExecutionResult::Timeout,
        ExecutionResult::Rejected,
        ExecutionResult::Denied,
        ExecutionResult::Skipped,
    ];

    /// Its position in [`ExecutionResult::ALL`], for tables indexed by result.
    pub const fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionResult::Success => "success",
            ExecutionResult::Error => "error",
            ExecutionResult::Timeout => "timeout",
            ExecutionResult::Rejected => "rejected",
            ExecutionResult::Denied => "denied",
            ExecutionResult::Skipped => "skipped",
        }
    }

    /// Whether the dispatcher's code ran: `success`, `error`, `timeout`. Refusals and skips did
    /// not run, so they have no latency and say nothing about the dispatcher's health.
    pub fn ran(self) -> bool {
        matches!(
            self,
            ExecutionResult::Success | ExecutionResult::Error | ExecutionResult::Timeout
        )
    }

    /// Higher decides the dispatch status (see [`DispatchStatus`]).
    fn precedence(self) -> u8 {
        match self {
            ExecutionResult::Skipped => 0,
            ExecutionResult::Success => 1,
            ExecutionResult::Denied => 2,
            ExecutionResult::Rejected => 3,
            ExecutionResult::Timeout => 4,
            ExecutionResult::Error => 5,
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct DispatcherOutcome {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub dispatcher_id: Arc<str>,
    pub result: ExecutionResult,
    pub duration_ms: f64,
    pub output_count: usize,
    /// Tries made: 1, plus the retries; 0 when it was refused or skipped before running.
    pub attempts: u32,
    /// Sanitized; present when the result is `error`, `timeout`, `rejected` or `denied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// The policy that refused the command, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The enabled routes that selected this dispatcher for the message, in registration order.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub route_ids: Vec<Arc<str>>,
}

/// A wall-clock instant that serializes as RFC 3339 with milliseconds in UTC
/// (`2026-12-02T21:00:28.123Z`). Kept as a `SystemTime`, so the dispatch path only reads the
/// clock; the text is made when the result is serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(SystemTime::now())
    }
}

impl Default for Timestamp {
    fn default() -> Timestamp {
        Timestamp(SystemTime::UNIX_EPOCH)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Before 1970 cannot be written in RFC 3339 by humantime: the epoch stands in.
        let at = self.0.max(SystemTime::UNIX_EPOCH);
        fmt::Display::fmt(&humantime::format_rfc3339_millis(at), f)
    }
}

impl Serialize for Timestamp {
    /// Written into a buffer on the stack first: `collect_str` would pass each piece through
    /// the serializer's escaping writer (~900 instructions a timestamp, twice per result).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = Rfc3339Buffer::default();
        fmt::Write::write_fmt(&mut text, format_args!("{self}"))
            .map_err(|_| serde::ser::Error::custom("a timestamp past year 9999"))?;
        serializer.serialize_str(text.as_str())
    }
}

/// Room for `YYYY-MM-DDTHH:MM:SS.mmmZ` (24 bytes).
#[derive(Default)]
pub(crate) struct Rfc3339Buffer {
    bytes: [u8; 24],
    len: usize,
}

impl Rfc3339Buffer {
    pub(crate) fn as_str(&self) -> &str {
        // Only whole `&str`s are copied in.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for Rfc3339Buffer {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.len + text.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&text)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

/// The answer to one dispatch, as the HTTP API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[non_exhaustive]
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
    pub error_code: Option<ErrorCode>,
    pub correlation_id: Option<String>,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// Whether the trace of `trace_id` is sampled (the W3C `sampled` flag: the caller's, or the
    /// sampler's decision), for a `traceparent` written from this result, such as a dispatch
    /// event's. Not part of the HTTP answer; true when unknown.
    #[serde(skip, default = "sampled_when_unknown")]
    pub trace_sampled: bool,
    /// Each dispatcher that was selected, in registration order.
    pub dispatchers: Vec<DispatcherOutcome>,
    /// When the engine took the message.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub started_at: Timestamp,
    /// When the result was settled (after its outputs were published).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub completed_at: Timestamp,
}

impl DispatchResult {
    /// The result of a dispatch of `envelope` on `topic` before anything ran: `success`, no
    /// category, outputs or outcomes yet, started and completed now. The engine fills it in;
    /// embedders and tests build results with it because the type grows (it is
    /// `#[non_exhaustive]`).
    pub fn new(dispatch_id: Uuid, topic: &str, envelope: &Envelope) -> DispatchResult {
        let now = Timestamp::now();
        DispatchResult {
            started_at: now,
            completed_at: now,
            dispatch_id,
            status: DispatchStatus::Success,
            topic: echo_topic(topic),
            message_category: None,
            message_type: envelope.message_type.clone(),
            message_id: envelope.message_id.clone(),
            duration_ms: 0.0,
            outputs: Vec::new(),
            output_count: 0,
            error_message: None,
            error_code: None,
            correlation_id: envelope.correlation_id.clone(),
            trace_id: None,
            span_id: None,
            trace_sampled: true,
            dispatchers: Vec::new(),
        }
    }
}

fn sampled_when_unknown() -> bool {
    true
}

/// The topic as a result repeats it: a topic too long to be valid is cut at
/// [`MAX_TOPIC_LEN`](super::MAX_TOPIC_LEN) bytes (and marked with `…`), so a 6 KB topic is not
/// echoed back whole.
fn echo_topic(topic: &str) -> String {
    let max = super::MAX_TOPIC_LEN;
    if topic.len() <= max {
        return topic.to_owned();
    }
    let mut end = max;
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &topic[..end])
}

impl DispatcherOutcome {
    /// `dispatcher_id`'s outcome `result`, with no time, attempts, outputs or error yet.
    pub fn new(dispatcher_id: impl Into<Arc<str>>, result: ExecutionResult) -> DispatcherOutcome {
        DispatcherOutcome {
            dispatcher_id: dispatcher_id.into(),
            result,
            duration_ms: 0.0,
            output_count: 0,
            attempts: 0,
            error_message: None,
            policy: None,
            route_ids: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_predicates_follow_the_contract() {
        use DispatchStatus::*;
        let having = |predicate: fn(DispatchStatus) -> bool| -> Vec<DispatchStatus> {
            DispatchStatus::ALL
                .into_iter()
                .filter(|s| predicate(*s))
                .collect()
        };
        assert_eq!(having(DispatchStatus::is_terminal).len(), 9);
        assert!(!Routed.is_terminal());
        assert_eq!(having(DispatchStatus::is_successful), [Success]);
        assert_eq!(
            having(DispatchStatus::is_error),
            [
                NoDispatcher,
                DispatcherError,
                Timeout,
                InvalidMessage,
                PublishFailed
            ]
        );
        assert_eq!(having(DispatchStatus::is_refusal), [Rejected, Denied]);
        assert_eq!(
            having(DispatchStatus::requires_retry),
            [Timeout, PublishFailed, Rejected]
        );
        for refusal in [Rejected, Denied] {
            assert!(!refusal.is_error(), "{refusal} is a refusal, not an error");
        }
    }

    #[test]
    fn error_codes_serialize_as_the_strings_the_json_has_always_had() {
        for (code, text) in [
            (ErrorCode::InvalidMessage, "invalid_message"),
            (ErrorCode::NoDispatcher, "no_dispatcher"),
            (ErrorCode::DispatcherFailed, "dispatcher_failed"),
            (ErrorCode::Timeout, "timeout"),
            (ErrorCode::Rejected, "rejected"),
            (ErrorCode::PolicyDenied, "policy_denied"),
            (ErrorCode::PublishFailed, "publish_failed"),
            (ErrorCode::WorkerUnavailable, "worker_unavailable"),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), text);
            assert_eq!(code.as_str(), text);
            assert_eq!(
                serde_json::from_value::<ErrorCode>(text.into()).unwrap(),
                code
            );
        }
    }

    #[test]
    fn a_topic_too_long_to_be_valid_is_not_echoed_whole() {
        let envelope = Envelope::new("t", serde_json::Value::Null);
        let long = "é".repeat(3000);
        let result = DispatchResult::new(Uuid::nil(), &long, &envelope);
        assert!(result.topic.len() <= super::super::MAX_TOPIC_LEN + '…'.len_utf8());
        assert!(result.topic.ends_with('…'));
        let short = DispatchResult::new(Uuid::nil(), "a.events", &envelope);
        assert_eq!(short.topic, "a.events");
    }

    #[test]
    fn timestamps_serialize_as_rfc3339_millis_and_read_back() {
        let at =
            Timestamp(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_245_228_123));
        let json = serde_json::to_value(at).unwrap();
        assert_eq!(json, "2026-12-02T21:00:28.123Z");
        assert_eq!(serde_json::from_value::<Timestamp>(json).unwrap(), at);
        assert!(serde_json::from_value::<Timestamp>("yesterday".into()).is_err());
    }

    #[test]
    fn statuses_serialize_as_their_label() {
        for status in DispatchStatus::ALL {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        for result in ExecutionResult::ALL {
            assert_eq!(serde_json::to_value(result).unwrap(), result.as_str());
        }
        assert_eq!(
            serde_json::from_str::<DispatchStatus>("\"denied\"").unwrap(),
            DispatchStatus::Denied
        );
    }

    /// The documented precedence, as a table.
    #[test]
    fn mixed_outcomes_settle_by_the_documented_precedence() {
        use ExecutionResult as R;
        let table: &[(&[ExecutionResult], DispatchStatus, Option<&str>)] = &[
            (&[R::Success], DispatchStatus::Success, None),
            (&[R::Skipped], DispatchStatus::Skipped, None),
            (&[R::Skipped, R::Skipped], DispatchStatus::Skipped, None),
            (&[R::Success, R::Skipped], DispatchStatus::Success, None),
            (&[R::Denied], DispatchStatus::Denied, Some("policy_denied")),
            (
                &[R::Success, R::Denied],
                DispatchStatus::Denied,
                Some("policy_denied"),
            ),
            (&[R::Rejected], DispatchStatus::Rejected, Some("rejected")),
            (
                &[R::Success, R::Rejected],
                DispatchStatus::Rejected,
                Some("rejected"),
            ),
            (
                &[R::Denied, R::Rejected],
                DispatchStatus::Rejected,
                Some("rejected"),
            ),
            (
                &[R::Skipped, R::Rejected],
                DispatchStatus::Rejected,
                Some("rejected"),
            ),
            (&[R::Timeout], DispatchStatus::Timeout, Some("timeout")),
            (
                &[R::Rejected, R::Timeout],
                DispatchStatus::Timeout,
                Some("timeout"),
            ),
            (
                &[R::Success, R::Timeout],
                DispatchStatus::Timeout,
                Some("timeout"),
            ),
            (
                &[R::Error],
                DispatchStatus::DispatcherError,
                Some("dispatcher_failed"),
            ),
            (
                &[R::Timeout, R::Error],
                DispatchStatus::DispatcherError,
                Some("dispatcher_failed"),
            ),
            (
                &[R::Rejected, R::Denied, R::Error],
                DispatchStatus::DispatcherError,
                Some("dispatcher_failed"),
            ),
        ];
        for (results, status, code) in table {
            assert_eq!(
                DispatchStatus::of_outcomes(results.iter().copied()),
                Some((
                    *status,
                    code.map(|c: &str| serde_json::from_value(c.into()).unwrap())
                )),
                "{results:?}"
            );
        }
        assert_eq!(DispatchStatus::of_outcomes([]), None);
    }

    /// Every combination of up to three outcomes, against the rules as the docs word them.
    #[test]
    fn every_combination_follows_the_worded_rules() {
        fn worded(results: &[ExecutionResult]) -> DispatchStatus {
            let any = |r: ExecutionResult| results.contains(&r);
            if any(ExecutionResult::Error) {
                DispatchStatus::DispatcherError
            } else if any(ExecutionResult::Timeout) {
                DispatchStatus::Timeout
            } else if any(ExecutionResult::Rejected) {
                DispatchStatus::Rejected
            } else if any(ExecutionResult::Denied) {
                DispatchStatus::Denied
            } else if any(ExecutionResult::Success) {
                DispatchStatus::Success
            } else {
                DispatchStatus::Skipped
            }
        }
        let all = ExecutionResult::ALL;
        for a in all {
            for b in all {
                for c in all {
                    for results in [&[a][..], &[a, b], &[a, b, c]] {
                        let (status, _) =
                            DispatchStatus::of_outcomes(results.iter().copied()).unwrap();
                        assert_eq!(status, worded(results), "{results:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn index_is_the_position_in_all() {
        for (n, status) in DispatchStatus::ALL.into_iter().enumerate() {
            assert_eq!(status.index(), n, "{status:?}");
        }
        for (n, result) in ExecutionResult::ALL.into_iter().enumerate() {
            assert_eq!(result.index(), n, "{result:?}");
        }
    }
}
