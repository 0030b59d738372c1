use std::sync::Arc;
use std::time::Duration;

use super::{HealthRegistry, Record};
use crate::engine::{DispatchInfo, DispatcherRef, ExecutionResult, InstrumentationStrategy};

/// Feeds dispatch outcomes into the registry: a success resets a dispatcher's consecutive
/// failures, an error or a timeout adds one. A refusal (`rejected` by its breaker, rate limiter
/// or concurrency limit, `denied` by a policy) or a de-duplication skip did not run the
/// dispatcher, says nothing about its own health, and is not counted either way. (An open
/// breaker shows in the health state as `degraded`, from the breaker itself.)
///
/// Holds each dispatcher's record by engine index, so recording is an atomic update with no
/// lookup and no lock.
pub struct HealthStrategy {
    records: Box<[Option<Arc<Record>>]>,
}

impl HealthStrategy {
    /// `dispatcher_ids` in the engine's registration order; each must be registered already.
    pub fn new<'a>(
        registry: &HealthRegistry,
        dispatcher_ids: impl IntoIterator<Item = &'a str>,
    ) -> HealthStrategy {
        HealthStrategy {
            records: dispatcher_ids
                .into_iter()
                .map(|id| registry.record(id).ok())
                .collect(),
        }
    }
}

impl InstrumentationStrategy for HealthStrategy {
    fn on_dispatcher_complete(
        &self,
        _: &DispatchInfo<'_>,
        dispatcher: DispatcherRef<'_>,
        result: ExecutionResult,
        _: Duration,
    ) {
        let Some(Some(record)) = self.records.get(dispatcher.index) else {
            return;
        };
        match result {
            ExecutionResult::Success => record.succeeded(),
            ExecutionResult::Error | ExecutionResult::Timeout => record.failed(),
            // Refusals and skips say nothing about the dispatcher's health; so does any outcome
            // a newer engine adds until it is placed here.
            _ => {}
        }
    }
}
