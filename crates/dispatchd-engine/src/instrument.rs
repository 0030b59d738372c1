//! The instrumentation extension point: what the engine tells observers, and the guard that keeps
//! an observer from ever changing a dispatch.
//!
//! Implementations live in `crate::instrumentation`; the trait lives here because the engine is
//! what calls it, and the engine depends on nothing outside itself.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uuid::Uuid;

use super::result::{DispatchResult, ExecutionResult};
use super::topic::Category;

/// What every hook learns about the dispatch it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct DispatchInfo<'a> {
    pub dispatch_id: Uuid,
    pub topic: &'a str,
    /// `None` when the topic could not be parsed.
    pub category: Option<Category>,
    pub message_type: &'a str,
    pub message_id: &'a str,
    pub correlation_id: Option<&'a str>,
    /// Whether this dispatch is recorded as a trace (sampled); spans are opened only then.
    pub traced: bool,
    /// The dispatch's span, when it is traced: children hang off it.
    pub span: Option<&'a dyn TraceSpan>,
}

/// A dispatcher as hooks see it. `index` is its position in registration order, dense and fixed
/// for the engine's lifetime, so a strategy can keep per-dispatcher state (bound metric
/// instruments, say) in a `Vec` and find it without hashing.
#[derive(Debug, Clone, Copy)]
pub struct DispatcherRef<'a> {
    pub index: usize,
    pub id: &'a str,
}

/// Observes the engine. Every method has a no-op default, so an implementation overrides only
/// what it needs. Hooks run inline on the dispatch path: keep them cheap and never block.
///
/// A hook that panics is caught, logged at debug and counted
/// ([`crate::Engine::instrumentation_panics`]); the dispatch result is never affected.
pub trait InstrumentationStrategy: Send + Sync + 'static {
    /// Before any dispatcher runs; the dispatch's start time was taken before this hook.
    fn on_dispatch_start(&self, _dispatch: &DispatchInfo<'_>) {}

    /// The dispatch ended with a status that is not an error: `success`, `skipped`, `routed`, or a
    /// refusal (`rejected`, `denied`, with the reason in `error_code` and `error_message`), which
    /// is dispatchd's protections and policies working as configured.
    fn on_dispatch_success(
        &self,
        _dispatch: &DispatchInfo<'_>,
        _result: &DispatchResult,
        _elapsed: Duration,
    ) {
    }

    /// The dispatch ended with an error status ([`is_error`](super::DispatchStatus::is_error)); the result carries
    /// the sanitized error.
    fn on_dispatch_error(
        &self,
        _dispatch: &DispatchInfo<'_>,
        _result: &DispatchResult,
        _elapsed: Duration,
    ) {
    }

    /// One dispatcher finished (or was refused). Not in PRODUCT.md's list of hooks: it is what
    /// per-dispatcher metrics need, and it costs nothing to strategies that ignore it.
    fn on_dispatcher_complete(
        &self,
        _dispatch: &DispatchInfo<'_>,
        _dispatcher: DispatcherRef<'_>,
        _result: ExecutionResult,
        _elapsed: Duration,
    ) {
    }

    /// Every policy allowed the command and its adapter is about to run.
    fn on_adapter_invoke(
        &self,
        _dispatch: &DispatchInfo<'_>,
        _adapter: &str,
        _command_type: &str,
        _params: &serde_json::Value,
    ) {
    }

    /// A policy refused a command; its adapter does not run.
    fn on_policy_denied(
        &self,
        _dispatch: &DispatchInfo<'_>,
        _policy: &str,
        _command_type: &str,
        _reason: &str,
    ) {
    }
}

/// The engine's side of instrumentation: at most one strategy (compose several with
/// `instrumentation::Composite`), each call guarded against panics.
#[derive(Default)]
pub(crate) struct Hooks {
    strategy: Option<Arc<dyn InstrumentationStrategy>>,
    panics: AtomicU64,
}

impl Hooks {
    pub(crate) fn new(strategy: Option<Arc<dyn InstrumentationStrategy>>) -> Hooks {
        Hooks {
            strategy,
            panics: AtomicU64::new(0),
        }
    }

    /// Calls the strategy, if any. With none this is one branch.
    #[inline]
    pub(crate) fn emit(&self, hook: &'static str, call: impl FnOnce(&dyn InstrumentationStrategy)) {
        if let Some(strategy) = &self.strategy {
            if catch_unwind(AssertUnwindSafe(|| call(strategy.as_ref()))).is_err() {
                self.panics.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    hook,
                    "An instrumentation strategy panicked; the dispatch goes on."
                );
            }
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.strategy.is_some()
    }

    pub(crate) fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }
}

/// Trace context for the engine, without the engine knowing OpenTelemetry: called inside the
/// dispatch span to name the trace in the result and to carry it into output headers.
pub trait TraceContext: Send + Sync + 'static {
    /// The current trace id and span id (W3C lowercase hex), when the dispatch is traced.
    fn current_ids(&self) -> Option<(String, String)>;

    /// [`TraceContext::current_ids`] and whether that trace is sampled: the W3C `sampled` flag a
    /// `traceparent` written from them must carry (a caller's `-00` stays `-00`). The default
    /// says sampled, which is what a context that does not sample means; one that does should
    /// answer from one look at its context.
    fn current_trace(&self) -> Option<(String, String, bool)> {
        self.current_ids()
            .map(|(trace_id, span_id)| (trace_id, span_id, true))
    }

    /// Writes the current context (`traceparent`, `tracestate`) into outgoing headers.
    fn inject(&self, headers: &mut std::collections::BTreeMap<String, String>);

    /// Opens the span of a dispatch, as a child of the current context, when the dispatch is
    /// sampled (the parent's decision when there is one, else a ratio). `None` (the default, and
    /// an unsampled dispatch) opens none, at the cost of that decision only; the result still
    /// gets [`TraceContext::current_ids`].
    fn start_dispatch(&self, _span: &DispatchSpan<'_>) -> Option<Box<dyn TraceSpan>> {
        None
    }
}

/// What the dispatch span is made of (OpenTelemetry messaging conventions: its name is
/// `process <topic>`, its kind consumer).
#[derive(Debug, Clone, Copy)]
pub struct DispatchSpan<'a> {
    pub topic: &'a str,
    pub message_id: &'a str,
    pub correlation_id: Option<&'a str>,
    pub message_type: &'a str,
}

/// An attribute value the engine sets on its spans.
#[derive(Debug, Clone, Copy)]
pub enum SpanValue<'a> {
    Str(&'a str),
    Static(&'static str),
    Int(i64),
}

/// A span the engine opened through its [`TraceContext`]; it ends when dropped.
pub trait TraceSpan: Send + Sync + std::fmt::Debug {
    /// Its W3C trace id and span id, lowercase hex.
    fn ids(&self) -> (String, String);

    /// Whether it is sampled (recorded), the W3C `sampled` flag. Spans are opened for sampled
    /// dispatches, so the default says yes; a tracer whose own sampler may still decide otherwise
    /// answers from the span.
    fn sampled(&self) -> bool {
        true
    }

    /// Writes this span's context (`traceparent`, `tracestate`) into outgoing headers.
    fn inject(&self, headers: &mut std::collections::BTreeMap<String, String>);

    fn set_attributes(&mut self, attributes: &[(&'static str, SpanValue<'_>)]);

    /// Marks the span failed: status Error with `description`, and the attribute `error.type`
    /// set to `error_type` (low cardinality: a status or a result name, never free text). The
    /// default does nothing.
    fn set_error(&mut self, _error_type: &'static str, _description: &str) {}

    /// A child span (internal kind).
    fn child(&self, name: &str, attributes: &[(&'static str, SpanValue<'_>)])
    -> Box<dyn TraceSpan>;

    /// A `tracing` span that continues this one, for code that runs inside it and propagates
    /// from the current `tracing` span (command adapters calling out).
    fn scope(&self, name: &str, attributes: &[(&'static str, SpanValue<'_>)]) -> tracing::Span;
}
