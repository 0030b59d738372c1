//! A strategy that remembers every hook call, for tests (the crate's and users').

use std::sync::Mutex;
use std::time::Duration;

use crate::{
    DispatchInfo, DispatchResult, DispatchStatus, DispatcherRef, ExecutionResult,
    InstrumentationStrategy,
};

/// One hook call as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Recorded {
    Start {
        topic: String,
    },
    Success {
        status: DispatchStatus,
        elapsed: Duration,
    },
    Error {
        status: DispatchStatus,
        error_code: Option<crate::ErrorCode>,
        elapsed: Duration,
    },
    DispatcherComplete {
        dispatcher_id: String,
        index: usize,
        result: ExecutionResult,
    },
    AdapterInvoke {
        adapter: String,
        command_type: String,
        params: serde_json::Value,
    },
    PolicyDenied {
        policy: String,
        command_type: String,
    },
}

/// Records hook calls in order. Takes a lock per call: meant for tests, not production.
#[derive(Debug, Default)]
pub struct RecordingStrategy {
    calls: Mutex<Vec<Recorded>>,
}

impl RecordingStrategy {
    pub fn new() -> RecordingStrategy {
        RecordingStrategy::default()
    }

    /// Everything recorded so far, in call order.
    pub fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn push(&self, call: Recorded) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

impl InstrumentationStrategy for RecordingStrategy {
    fn on_dispatch_start(&self, dispatch: &DispatchInfo<'_>) {
        self.push(Recorded::Start {
            topic: dispatch.topic.to_owned(),
        });
    }

    fn on_dispatch_success(
        &self,
        _: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        self.push(Recorded::Success {
            status: result.status,
            elapsed,
        });
    }

    fn on_dispatch_error(&self, _: &DispatchInfo<'_>, result: &DispatchResult, elapsed: Duration) {
        self.push(Recorded::Error {
            status: result.status,
            error_code: result.error_code,
            elapsed,
        });
    }

    fn on_dispatcher_complete(
        &self,
        _: &DispatchInfo<'_>,
        dispatcher: DispatcherRef<'_>,
        result: ExecutionResult,
        _: Duration,
    ) {
        self.push(Recorded::DispatcherComplete {
            dispatcher_id: dispatcher.id.to_owned(),
            index: dispatcher.index,
            result,
        });
    }

    fn on_adapter_invoke(
        &self,
        _: &DispatchInfo<'_>,
        adapter: &str,
        command_type: &str,
        params: &serde_json::Value,
    ) {
        self.push(Recorded::AdapterInvoke {
            adapter: adapter.to_owned(),
            command_type: command_type.to_owned(),
            params: params.clone(),
        });
    }

    fn on_policy_denied(&self, _: &DispatchInfo<'_>, policy: &str, command_type: &str, _: &str) {
        self.push(Recorded::PolicyDenied {
            policy: policy.to_owned(),
            command_type: command_type.to_owned(),
        });
    }
}
