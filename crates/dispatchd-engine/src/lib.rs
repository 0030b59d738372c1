//! The dispatch engine: topics in, dispatchers run, a [`DispatchResult`] out.
//!
//! Owns: topic parsing, route matching, running the selected dispatchers concurrently under their
//! timeouts, command policies, collecting outputs, aggregating and sanitizing errors, and calling
//! the instrumentation hooks.
//!
//! Invariants: an [`Engine`] is frozen at [`EngineBuilder::build`], which validated everything;
//! the dispatch path takes no lock and allocates only what the result holds. One dispatcher's
//! failure, timeout or panic never hides another's success, and an instrumentation strategy
//! never changes a result.
//!
//! Must not: import any I/O crate (no axum, redis, reqwest, OpenTelemetry SDK). It sees traits
//! ([`Handler`], [`CommandAdapter`], [`OutputPublisher`], [`InstrumentationStrategy`]) and
//! nothing else of the outside world. It runs on tokio's timer, so dispatch inside a tokio
//! runtime with time enabled.

pub mod instrumentation;
pub mod json;
pub mod resilience;

mod builder;
mod command;
mod dispatcher;
mod envelope;
mod instrument;
mod pattern;
mod redact;
mod result;
mod route;
mod sanitize;
mod topic;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use tracing::Instrument;

use crate::resilience::{Claim, Prepared, Protections, Refusal};
use thiserror::Error;
use uuid::Uuid;

pub use builder::{BuildError, BuildProblem, EngineBuilder, MAX_ID_LEN, is_valid_id};
pub use command::{CommandAdapter, Condition, Decision, Effect, ParamRule, Policy, RulePolicy};
pub use dispatcher::{DEFAULT_TIMEOUT, Dispatcher, ErrorKind, Handler, HandlerError, Message};
pub use envelope::{Envelope, OutputMessage};
pub use instrument::{
    DispatchInfo, DispatchSpan, DispatcherRef, InstrumentationStrategy, SpanValue, TraceContext,
    TraceSpan,
};
pub use pattern::{PatternError, TopicPattern};
pub use redact::{DEFAULT_DENY, REDACTED, Redactor};
pub use result::{
    DispatchResult, DispatchStatus, DispatcherOutcome, ErrorCode, ExecutionResult, Timestamp,
};
pub use route::Route;
pub use sanitize::{MAX_ERROR_CHARS, sanitize};
pub use topic::{Category, MAX_TOPIC_LEN, Topic, TopicError, UnknownCategory};

use builder::category_slot;
use dispatcher::Kind;
use instrument::Hooks;
use route::CompiledRoute;

/// The longest message type, in characters.
pub const MAX_MESSAGE_TYPE_LEN: usize = 255;

/// Publishes handler outputs onward (to the bus). A failure makes the dispatch `publish_failed`.
#[async_trait]
pub trait OutputPublisher: Send + Sync + 'static {
    async fn publish(&self, outputs: &[OutputMessage]) -> Result<(), PublishError>;
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PublishError(pub String);

/// A built engine. Cheap to clone (one `Arc`), `Send + Sync`, and immutable.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    dispatchers: Box<[Dispatcher]>,
    routes: Box<[Route]>,
    /// Enabled routes only, split by category because a topic's category must equal its route's.
    routes_by_category: [Box<[CompiledRoute]>; 3],
    hooks: Hooks,
    publisher: Option<Arc<dyn OutputPublisher>>,
    trace_context: Option<Arc<dyn TraceContext>>,
    redactor: Redactor,
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    /// How data leaving through instrumentation is redacted.
    pub fn redactor(&self) -> &Redactor {
        &self.inner.redactor
    }

    /// The registered dispatchers, in registration order (the order of [`DispatcherRef::index`]).
    pub fn dispatchers(&self) -> &[Dispatcher] {
        &self.inner.dispatchers
    }

    /// Every registered route, enabled or not, in registration order.
    pub fn routes(&self) -> &[Route] {
        &self.inner.routes
    }

    /// How many times an instrumentation hook panicked (and was contained).
    pub fn instrumentation_panics(&self) -> u64 {
        self.inner.hooks.panics()
    }

    pub fn is_instrumented(&self) -> bool {
        self.inner.hooks.is_enabled()
    }

    /// The dispatchers a message would reach, in registration order, each at most once.
    pub fn select(&self, topic: &Topic<'_>, message_type: &str) -> Vec<usize> {
        // The same walk as `select_with_routes`, without collecting route ids.
        let routes = &self.inner.routes_by_category[category_slot(topic.category)];
        let mut selected: Vec<usize> = Vec::new();
        for route in routes.iter() {
            if route.matches(&topic.segments, message_type)
                && self.inner.dispatchers[route.dispatcher].accepts_type(message_type)
                && !selected.contains(&route.dispatcher)
            {
                selected.push(route.dispatcher);
            }
        }
        selected.sort_unstable();
        selected
    }

    /// [`Engine::select`], each dispatcher with the ids of the routes that selected it, in route
    /// registration order.
    fn select_with_routes(&self, topic: &Topic<'_>, message_type: &str) -> Vec<Selected> {
        let routes = &self.inner.routes_by_category[category_slot(topic.category)];
        let mut selected: Vec<Selected> = Vec::new();
        for route in routes.iter() {
            if route.matches(&topic.segments, message_type)
                && self.inner.dispatchers[route.dispatcher].accepts_type(message_type)
            {
                match selected.iter_mut().find(|s| s.index == route.dispatcher) {
                    Some(s) => s.route_ids.push(route.route_id.clone()),
                    None => selected.push(Selected {
                        index: route.dispatcher,
                        route_ids: vec![route.route_id.clone()],
                        prepared: Prepared::default(),
                    }),
                }
            }
        }
        selected.sort_unstable_by_key(|s| s.index);
        selected
    }

    /// Dispatches one message published on `topic`. Never fails: every outcome, including a
    /// malformed message, is a [`DispatchResult`] status.
    pub async fn dispatch(&self, topic: &str, envelope: &Envelope) -> DispatchResult {
        // Untraced engines (the library's default) and unsampled dispatches open no span.
        let mut span = self.inner.trace_context.as_ref().and_then(|t| {
            t.start_dispatch(&DispatchSpan {
                topic,
                message_id: &envelope.message_id,
                correlation_id: envelope.correlation_id.as_deref(),
                message_type: &envelope.message_type,
            })
        });
        let result = self.dispatch_traced(topic, envelope, span.as_deref()).await;
        if let Some(span) = &mut span {
            let mut id = uuid::Uuid::encode_buffer();
            let id = result.dispatch_id.as_hyphenated().encode_lower(&mut id);
            let status = (
                "dispatchd.status",
                SpanValue::Static(result.status.as_str()),
            );
            let id = ("dispatchd.dispatch_id", SpanValue::Str(id));
            match result.message_category {
                Some(category) => span.set_attributes(&[
                    id,
                    status,
                    ("dispatchd.category", SpanValue::Static(category.as_str())),
                ]),
                None => span.set_attributes(&[id, status]),
            }
            if result.status.is_error() {
                span.set_error(
                    result.status.as_str(),
                    result.error_message.as_deref().unwrap_or_default(),
                );
            }
        }
        result
    }

    async fn dispatch_traced(
        &self,
        topic: &str,
        envelope: &Envelope,
        span: Option<&dyn TraceSpan>,
    ) -> DispatchResult {
        let started = Instant::now();
        // Routed first, before the result and the hooks: the dedup keys of the dispatchers it
        // picked are made now and their places in memory fetched while the rest is set up
        // (`DedupCache::prefetch`). Routing has no side effect, so nothing else sees the order.
        let mut category = None;
        let routed = match Topic::parse(topic) {
            Err(error) => Err(error.to_string()),
            Ok(parsed) => {
                category = Some(parsed.category);
                validate(envelope).map(|()| (parsed.category, self.route(&parsed, envelope)))
            }
        };
        let dispatch_id = Uuid::new_v4();
        let hooks = &self.inner.hooks;
        let info = DispatchInfo {
            dispatch_id,
            topic,
            category,
            message_type: &envelope.message_type,
            message_id: &envelope.message_id,
            correlation_id: envelope.correlation_id.as_deref(),
            traced: span.is_some(),
            span,
        };
        hooks.emit("on_dispatch_start", |s| s.on_dispatch_start(&info));

        let mut result = DispatchResult::new(dispatch_id, topic, envelope);
        result.message_category = info.category;

        match routed {
            Err(reason) => fail(
                &mut result,
                DispatchStatus::InvalidMessage,
                ErrorCode::InvalidMessage,
                &reason,
            ),
            Ok((category, selected)) => {
                if selected.is_empty() {
                    let reason = format!(
                        "no enabled route sends {category} messages of type `{}` on this topic to a dispatcher",
                        envelope.message_type
                    );
                    fail(
                        &mut result,
                        DispatchStatus::NoDispatcher,
                        ErrorCode::NoDispatcher,
                        &reason,
                    );
                } else {
                    let message = Message {
                        topic,
                        category,
                        envelope,
                        dispatch_id,
                        trace: None,
                    };
                    self.run_selected(selected, &message, &info, &mut result)
                        .await;
                    // Outputs continue this trace wherever they are consumed.
                    if let Some(span) = span {
                        for output in &mut result.outputs {
                            span.inject(&mut output.envelope.headers);
                        }
                    } else if let Some(trace) = &self.inner.trace_context {
                        for output in &mut result.outputs {
                            trace.inject(&mut output.envelope.headers);
                        }
                    }
                    self.publish(&mut result).await;
                }
            }
        }

        let ids = match span {
            Some(span) => {
                let (trace_id, span_id) = span.ids();
                Some((trace_id, span_id, span.sampled()))
            }
            None => self
                .inner
                .trace_context
                .as_ref()
                .and_then(|t| t.current_trace()),
        };
        if let Some((trace_id, span_id, sampled)) = ids {
            result.trace_id = Some(trace_id);
            result.span_id = Some(span_id);
            result.trace_sampled = sampled;
        }
        let elapsed = started.elapsed();
        result.duration_ms = millis(elapsed);
        result.completed_at = Timestamp::now();
        // Refusals (`rejected`, `denied`) are not errors: strategies see them as outcomes.
        if result.status.is_error() {
            hooks.emit("on_dispatch_error", |s| {
                s.on_dispatch_error(&info, &result, elapsed)
            });
        } else {
            hooks.emit("on_dispatch_success", |s| {
                s.on_dispatch_success(&info, &result, elapsed)
            });
        }
        result
    }

    /// The dispatchers `envelope` goes to, each with its dedup key made and its place in the
    /// table being fetched.
    fn route(&self, topic: &Topic<'_>, envelope: &Envelope) -> Vec<Selected> {
        let mut selected = self.select_with_routes(topic, &envelope.message_type);
        for s in &mut selected {
            if let Some(protections) = &self.inner.dispatchers[s.index].protections {
                s.prepared = protections.prepare(&envelope.message_id);
            }
        }
        selected
    }

    async fn run_selected(
        &self,
        selected: Vec<Selected>,
        message: &Message<'_>,
        info: &DispatchInfo<'_>,
        result: &mut DispatchResult,
    ) {
        let runs: Vec<Run> = if let [only] = &selected[..] {
            vec![self.run_one(only.index, only.prepared, message, info).await]
        } else {
            futures::future::join_all(
                selected
                    .iter()
                    .map(|s| self.run_one(s.index, s.prepared, message, info)),
            )
            .await
        };

        let mut reasons = Vec::new();
        // `worker_unavailable` only when every refusal was a worker no one could call.
        let mut unavailable = false;
        let mut other_refusal = false;
        for ((mut outcome, outputs, no_worker), selected) in runs.into_iter().zip(selected) {
            outcome.route_ids = selected.route_ids;
            if outcome.result == ExecutionResult::Rejected {
                unavailable |= no_worker;
                other_refusal |= !no_worker;
            }
            result.outputs.extend(outputs);
            if !matches!(
                outcome.result,
                ExecutionResult::Success | ExecutionResult::Skipped
            ) {
                reasons.push(format_failure(&outcome));
            }
            result.dispatchers.push(outcome);
        }
        result.output_count = result.outputs.len();
        // The worst outcome decides: see `DispatchStatus`'s precedence table.
        let settled = DispatchStatus::of_outcomes(result.dispatchers.iter().map(|d| d.result));
        let Some((status, code)) = settled else {
            return;
        };
        let code = match code {
            Some(ErrorCode::Rejected) if unavailable && !other_refusal => {
                Some(ErrorCode::WorkerUnavailable)
            }
            code => code,
        };
        match code {
            Some(code) => fail(result, status, code, &reasons.join("; ")),
            None => result.status = status,
        }
    }

    async fn run_one(
        &self,
        index: usize,
        prepared: Prepared,
        message: &Message<'_>,
        info: &DispatchInfo<'_>,
    ) -> Run {
        let Some(parent) = info.span else {
            return self.run_one_traced(index, prepared, message, info).await;
        };
        let dispatcher = &self.inner.dispatchers[index];
        let mut span = parent.child(
            &dispatcher.span_name,
            &[("dispatchd.dispatcher_id", SpanValue::Str(&dispatcher.id))],
        );
        let inside = DispatchInfo {
            span: Some(&*span),
            ..*info
        };
        // A handler that calls out continues this dispatcher's span.
        let message = Message {
            trace: Some(&*span),
            ..*message
        };
        let (outcome, outputs, unavailable) = self
            .run_one_traced(index, prepared, &message, &inside)
            .await;
        span.set_attributes(&[
            (
                "dispatchd.outcome",
                SpanValue::Static(outcome.result.as_str()),
            ),
            (
                "dispatchd.attempts",
                SpanValue::Int(i64::from(outcome.attempts)),
            ),
        ]);
        // Refusals and skips are not failures of the dispatcher: their status stays unset.
        if matches!(
            outcome.result,
            ExecutionResult::Error | ExecutionResult::Timeout
        ) {
            span.set_error(
                outcome.result.as_str(),
                outcome.error_message.as_deref().unwrap_or_default(),
            );
        }
        (outcome, outputs, unavailable)
    }

    async fn run_one_traced(
        &self,
        index: usize,
        prepared: Prepared,
        message: &Message<'_>,
        info: &DispatchInfo<'_>,
    ) -> Run {
        let dispatcher = &self.inner.dispatchers[index];
        let hooks = &self.inner.hooks;
        let started = Instant::now();
        let mut policy = None;
        let mut attempts = 0;

        let denial = dispatcher
            .policies
            .iter()
            .find_map(|p| match p.check(message) {
                Decision::Allow => None,
                Decision::Deny { reason } => Some((p.name(), reason)),
            });
        let run = match denial {
            Some((name, reason)) => {
                let command_type = message.envelope.message_type.as_str();
                hooks.emit("on_policy_denied", |s| {
                    s.on_policy_denied(info, name, command_type, &reason)
                });
                policy = Some(name.to_owned());
                Err(Failure::new(
                    ExecutionResult::Denied,
                    format!("policy `{name}` denied: {reason}"),
                ))
            }
            None => {
                self.protected(dispatcher, prepared, message, info, &mut attempts)
                    .await
            }
        };

        let elapsed = started.elapsed();
        let unavailable = run.as_ref().is_err_and(|failure| failure.unavailable);
        let (execution, outputs, error_message) = match run {
            Ok(outputs) => (ExecutionResult::Success, outputs, None),
            Err(failure) if failure.result == ExecutionResult::Skipped => {
                (ExecutionResult::Skipped, Vec::new(), None)
            }
            Err(failure) => (
                failure.result,
                Vec::new(),
                Some(sanitize(&failure.message).into_owned()),
            ),
        };
        let dispatcher_ref = DispatcherRef {
            index,
            id: &dispatcher.id,
        };
        hooks.emit("on_dispatcher_complete", |s| {
            s.on_dispatcher_complete(info, dispatcher_ref, execution, elapsed)
        });
        if let Some(reason) = &error_message {
            tracing::debug!(
                dispatcher_id = %dispatcher.id,
                result = execution.as_str(),
                attempts,
                error = %reason,
                "A dispatcher did not succeed."
            );
        }
        let outcome = DispatcherOutcome {
            dispatcher_id: dispatcher.id.clone(),
            result: execution,
            duration_ms: millis(elapsed),
            output_count: outputs.len(),
            attempts,
            error_message,
            policy,
            route_ids: Vec::new(),
        };
        (outcome, outputs, unavailable)
    }

    /// Dedup → rate limit → breaker → concurrency → timeout and retries (see
    /// `crate::resilience` for why in this order).
    async fn protected(
        &self,
        dispatcher: &Dispatcher,
        prepared: Prepared,
        message: &Message<'_>,
        info: &DispatchInfo<'_>,
        attempts: &mut u32,
    ) -> Result<Vec<OutputMessage>, Failure> {
        let Some(protections) = &dispatcher.protections else {
            return self
                .attempts(dispatcher, None, message, info, attempts)
                .await;
        };
        let message_id = message.envelope.message_id.as_str();
        let claimed = match protections.claim_prepared(message_id, prepared).await {
            Claim::Run(claimed) => claimed,
            Claim::Duplicate => {
                return Err(Failure::new(ExecutionResult::Skipped, String::new()));
            }
            Claim::InProgress => {
                return Err(Failure::new(
                    ExecutionResult::Rejected,
                    Refusal::InProgressElsewhere.to_string(),
                ));
            }
        };
        let admitted = match protections.admit().await {
            Ok(admitted) => admitted,
            Err(refusal) => {
                if claimed.holds_cluster_claim() {
                    protections.settle(claimed, message_id, false).await;
                }
                return Err(Failure::new(ExecutionResult::Rejected, refusal.to_string()));
            }
        };
        let run = self
            .attempts(dispatcher, Some(protections), message, info, attempts)
            .await;
        match &run {
            // Nothing was called: the breaker learns nothing about the other side.
            Err(failure) if failure.unavailable => protections.release(admitted),
            _ => protections.finish(admitted, run.is_ok(), &claimed),
        }
        if claimed.holds_cluster_claim() {
            protections.settle(claimed, message_id, run.is_ok()).await;
        }
        run
    }

    /// The first try and the retries: transient errors and timeouts are retried while the
    /// policy allows; permanent errors and panics never are.
    async fn attempts(
        &self,
        dispatcher: &Dispatcher,
        protections: Option<&Protections>,
        message: &Message<'_>,
        info: &DispatchInfo<'_>,
        attempts: &mut u32,
    ) -> Result<Vec<OutputMessage>, Failure> {
        loop {
            *attempts += 1;
            let failure = match self.attempt(dispatcher, message, info).await {
                Ok(outputs) => return Ok(outputs),
                Err(failure) => failure,
            };
            let delay = failure
                .transient
                .then(|| protections.and_then(|p| p.retry_delay(*attempts)))
                .flatten()
                .map(|delay| match (failure.retry_after, protections) {
                    // The other side asked for a pause (`Retry-After`): at least that, within
                    // the policy's cap.
                    (Some(asked), Some(p)) => delay.max(asked.min(p.max_backoff())),
                    _ => delay,
                });
            match delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Err(failure),
            }
        }
    }

    async fn attempt(
        &self,
        dispatcher: &Dispatcher,
        message: &Message<'_>,
        info: &DispatchInfo<'_>,
    ) -> Result<Vec<OutputMessage>, Failure> {
        match &dispatcher.kind {
            Kind::Handler(handler) => guarded(dispatcher.timeout, handler.handle(message)).await,
            Kind::Command(adapter) => {
                // A `tracing` span, so an adapter that calls out propagates from it.
                let span = info.span.map_or_else(tracing::Span::none, |parent| {
                    parent.scope(
                        &format!("{} {}", adapter.name(), message.envelope.message_type),
                        &[
                            ("dispatchd.adapter", SpanValue::Str(adapter.name())),
                            (
                                "dispatchd.command_type",
                                SpanValue::Str(&message.envelope.message_type),
                            ),
                        ],
                    )
                });
                if self.inner.hooks.is_enabled() {
                    // Strategies log and export what they see: never a secret param.
                    let params = self.inner.redactor.redact(&message.envelope.payload);
                    self.inner.hooks.emit("on_adapter_invoke", |s| {
                        s.on_adapter_invoke(
                            info,
                            adapter.name(),
                            &message.envelope.message_type,
                            &params,
                        )
                    });
                }
                guarded(dispatcher.timeout, adapter.execute(message))
                    .instrument(span)
                    .await
            }
        }
    }

    async fn publish(&self, result: &mut DispatchResult) {
        let Some(publisher) = &self.inner.publisher else {
            return;
        };
        if result.outputs.is_empty() {
            return;
        }
        if let Err(error) = publisher.publish(&result.outputs).await {
            let reason = format!(
                "publishing {} outputs failed: {error}",
                result.outputs.len()
            );
            // Lost outputs are a real failure: they outrank a refusal or a success, while an
            // error status stays and only gains the reason.
            let reason = match result.error_message.take() {
                Some(previous) => format!("{previous}; {reason}"),
                None => reason,
            };
            if result.status.is_error() {
                result.error_message = Some(sanitize(&reason).into_owned());
            } else {
                fail(
                    result,
                    DispatchStatus::PublishFailed,
                    ErrorCode::PublishFailed,
                    &reason,
                );
            }
        }
    }
}

/// A dispatcher routing picked: the ids of the routes that picked it, and its dedup key made
/// ahead of its run.
struct Selected {
    index: usize,
    route_ids: Vec<Arc<str>>,
    prepared: Prepared,
}

/// One dispatcher's outcome, its outputs, and whether it was refused because its worker could
/// not be called ([`ErrorKind::Unavailable`]).
type Run = (DispatcherOutcome, Vec<OutputMessage>, bool);

/// Why one dispatcher's call did not succeed.
struct Failure {
    result: ExecutionResult,
    message: String,
    /// Worth retrying: a transient error or a timeout.
    transient: bool,
    /// The handler's `HandlerError::retry_after`: the least wait before a retry.
    retry_after: Option<Duration>,
    /// The handler had no worker to call ([`ErrorKind::Unavailable`]).
    unavailable: bool,
}

impl Failure {
    fn new(result: ExecutionResult, message: String) -> Failure {
        Failure {
            result,
            message,
            transient: false,
            retry_after: None,
            unavailable: false,
        }
    }
}

/// Runs a handler future under its timeout (dropping it when time runs out) and turns a panic
/// into an error of this dispatcher alone.
async fn guarded(
    timeout: Duration,
    run: impl Future<Output = Result<Vec<OutputMessage>, HandlerError>>,
) -> Result<Vec<OutputMessage>, Failure> {
    match tokio::time::timeout(timeout, AssertUnwindSafe(run).catch_unwind()).await {
        Ok(Ok(Ok(outputs))) => Ok(outputs),
        Ok(Ok(Err(error))) if error.kind() == ErrorKind::Unavailable => Err(Failure {
            unavailable: true,
            ..Failure::new(ExecutionResult::Rejected, error.message().to_owned())
        }),
        Ok(Ok(Err(error))) => Err(Failure {
            result: ExecutionResult::Error,
            transient: error.kind() == ErrorKind::Transient,
            retry_after: error.retry_after(),
            message: error.message().to_owned(),
            unavailable: false,
        }),
        Ok(Err(panic)) => Err(Failure::new(
            ExecutionResult::Error,
            format!("panicked: {}", panic_text(&panic)),
        )),
        Err(_) => Err(Failure {
            result: ExecutionResult::Timeout,
            message: format!("timed out after {timeout:?}"),
            transient: true,
            retry_after: None,
            unavailable: false,
        }),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-text panic payload")
}

fn validate(envelope: &Envelope) -> Result<(), String> {
    let message_type = envelope.message_type.as_str();
    if message_type.is_empty() {
        return Err("message_type is empty".to_owned());
    }
    // Characters, as the HTTP API's description (`maxLength`) counts them; counted only when
    // the bytes could be too many.
    if message_type.len() > MAX_MESSAGE_TYPE_LEN
        && message_type.chars().count() > MAX_MESSAGE_TYPE_LEN
    {
        return Err(format!(
            "message_type is longer than {MAX_MESSAGE_TYPE_LEN} characters"
        ));
    }
    if envelope.message_id.is_empty() {
        return Err("message_id is empty".to_owned());
    }
    Ok(())
}

fn format_failure(outcome: &DispatcherOutcome) -> String {
    let reason = outcome.error_message.as_deref().unwrap_or("failed");
    format!(
        "dispatcher `{}` {}: {reason}",
        outcome.dispatcher_id, outcome.result
    )
}

fn fail(result: &mut DispatchResult, status: DispatchStatus, code: ErrorCode, reason: &str) {
    result.status = status;
    result.error_code = Some(code);
    result.error_message = Some(sanitize(reason).into_owned());
}

fn millis(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1_000.0
}

#[cfg(test)]
mod tests;

/// Cases per property test: `default`, or `PROPTEST_CASES` when set (CI runs a long pass with
/// it; see `.ci/run`).
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default)
}
