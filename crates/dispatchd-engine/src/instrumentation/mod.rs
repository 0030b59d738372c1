//! Built-in instrumentation strategies: composition, a tracing log, and a recorder for tests.
//!
//! The trait itself is [`crate::InstrumentationStrategy`] (the engine owns the extension
//! point it calls); this module owns implementations. The OpenTelemetry metrics strategy lives
//! beside the instruments it feeds, in `crate::telemetry`.
//!
//! Must not: block, or do I/O on the calling task. Hooks run inline on the dispatch path.

mod recording;

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::time::Duration;

pub use crate::{DispatchInfo, DispatcherRef, InstrumentationStrategy};
use crate::{DispatchResult, DispatchStatus, ExecutionResult};
pub use recording::{Recorded, RecordingStrategy};

/// Runs several strategies, in order, for every hook. Each strategy is called even when an
/// earlier one panicked: the panic is contained per strategy.
#[derive(Default, Clone)]
pub struct Composite {
    strategies: Vec<Arc<dyn InstrumentationStrategy>>,
}

impl Composite {
    pub fn new() -> Composite {
        Composite::default()
    }

    pub fn with(mut self, strategy: Arc<dyn InstrumentationStrategy>) -> Composite {
        self.strategies.push(strategy);
        self
    }

    pub fn len(&self) -> usize {
        self.strategies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strategies.is_empty()
    }

    /// Calls every strategy even when one panics, then re-raises the first panic so the engine
    /// still counts it.
    fn each(&self, call: impl Fn(&dyn InstrumentationStrategy)) {
        let mut first_panic = None;
        for strategy in &self.strategies {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| call(strategy.as_ref()))) {
                first_panic.get_or_insert(panic);
            }
        }
        if let Some(panic) = first_panic {
            resume_unwind(panic);
        }
    }
}

impl InstrumentationStrategy for Composite {
    fn on_dispatch_start(&self, dispatch: &DispatchInfo<'_>) {
        self.each(|s| s.on_dispatch_start(dispatch));
    }

    fn on_dispatch_success(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        self.each(|s| s.on_dispatch_success(dispatch, result, elapsed));
    }

    fn on_dispatch_error(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        self.each(|s| s.on_dispatch_error(dispatch, result, elapsed));
    }

    fn on_dispatcher_complete(
        &self,
        dispatch: &DispatchInfo<'_>,
        dispatcher: DispatcherRef<'_>,
        result: ExecutionResult,
        elapsed: Duration,
    ) {
        self.each(|s| s.on_dispatcher_complete(dispatch, dispatcher, result, elapsed));
    }

    fn on_adapter_invoke(
        &self,
        dispatch: &DispatchInfo<'_>,
        adapter: &str,
        command_type: &str,
        params: &serde_json::Value,
    ) {
        self.each(|s| s.on_adapter_invoke(dispatch, adapter, command_type, params));
    }

    fn on_policy_denied(
        &self,
        dispatch: &DispatchInfo<'_>,
        policy: &str,
        command_type: &str,
        reason: &str,
    ) {
        self.each(|s| s.on_policy_denied(dispatch, policy, command_type, reason));
    }
}

/// Logs every dispatch through `tracing`: outcomes at debug, errors at warn. Fields use the
/// project's vocabulary (`dispatch_id`, `topic`, `category`, `status`, `dispatcher_id`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingStrategy;

impl InstrumentationStrategy for TracingStrategy {
    /// Outcomes log at debug, refusals (`rejected`, `denied`) included: they are the system
    /// working as configured, their rate is on the metrics, and a line each would flood the log
    /// while a breaker is open.
    fn on_dispatch_success(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        tracing::debug!(
            dispatch_id = %dispatch.dispatch_id,
            topic = dispatch.topic,
            category = dispatch.category.map(|c| c.as_str()),
            message_type = dispatch.message_type,
            status = result.status.as_str(),
            error_code = result.error_code.map(crate::ErrorCode::as_str),
            error = result.error_message.as_deref(),
            outputs = result.output_count,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "Dispatched a message."
        );
    }

    /// Failures the client caused (`invalid_message`, `no_dispatcher`) log at debug, so a
    /// misbehaving client cannot flood the log; failures of dispatchers and of publishing log at
    /// warn.
    fn on_dispatch_error(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        macro_rules! log_failure {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    dispatch_id = %dispatch.dispatch_id,
                    topic = dispatch.topic,
                    category = dispatch.category.map(|c| c.as_str()),
                    message_type = dispatch.message_type,
                    status = result.status.as_str(),
                    error_code = result.error_code.map(crate::ErrorCode::as_str),
                    error = result.error_message.as_deref(),
                    elapsed_ms = elapsed.as_secs_f64() * 1e3,
                    "A dispatch failed."
                )
            };
        }
        match result.status {
            DispatchStatus::InvalidMessage | DispatchStatus::NoDispatcher => {
                log_failure!(tracing::Level::DEBUG)
            }
            _ => log_failure!(tracing::Level::WARN),
        }
    }

    fn on_policy_denied(
        &self,
        dispatch: &DispatchInfo<'_>,
        policy: &str,
        command_type: &str,
        reason: &str,
    ) {
        tracing::info!(
            dispatch_id = %dispatch.dispatch_id,
            policy,
            command_type,
            reason,
            "A policy denied a command."
        );
    }
}

#[cfg(test)]
mod tests;
