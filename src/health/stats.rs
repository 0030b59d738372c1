//! Per-dispatcher statistics for `GET /api/v1/dispatchers/{id}`: outcome counts, the latency of
//! its runs (min, p50, p90, p99, max), the last error and the last topic, kept in process.
//!
//! Bounded: one histogram (2 significant digits, 1 µs to 1 h, a few KiB) and two strings per
//! dispatcher, known at build. The dispatch path takes one uncontended-in-the-common-case lock
//! per dispatcher run, held for a histogram record and a string copy into reused capacity; the
//! last error is written only when an outcome has one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::engine::{
    DispatchInfo, DispatchResult, DispatcherRef, ExecutionResult, InstrumentationStrategy,
};

/// The longest latency recorded as itself, in microseconds (longer ones count as this).
const MAX_MICROS: u64 = 3_600_000_000;

/// The strategy that keeps the statistics, and where the API reads them.
pub struct DispatcherStats {
    slots: Box<[Mutex<Slot>]>,
    index_of: HashMap<Arc<str>, usize>,
}

struct Slot {
    /// By position in [`ExecutionResult::ALL`].
    counts: [u64; ExecutionResult::ALL.len()],
    /// Microseconds, of the runs that ran (refusals and skips have no latency).
    latency: Histogram<u64>,
    last_topic: String,
    last_error: Option<String>,
}

/// One dispatcher's statistics, as the API serves them.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StatsSnapshot {
    /// Every result (`success`, `error`, `timeout`, `rejected`, `denied`, `skipped`), zero
    /// included.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub counts: BTreeMap<&'static str, u64>,
    /// Of the runs that ran (`success`, `error`, `timeout`); absent before the first.
    pub latency_ms: Option<Latency>,
    /// Sanitized, as the dispatch result carried it.
    pub last_error: Option<String>,
    pub last_topic: Option<String>,
}

/// Latency in milliseconds; percentiles within 1 % (two significant digits).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = DispatcherLatency)]
pub struct Latency {
    pub count: u64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl DispatcherStats {
    /// `dispatcher_ids` in the engine's registration order.
    pub fn new<'a>(dispatcher_ids: impl IntoIterator<Item = &'a str>) -> DispatcherStats {
        let ids: Vec<&str> = dispatcher_ids.into_iter().collect();
        let slots = ids
            .iter()
            .map(|_| {
                Mutex::new(Slot {
                    counts: [0; ExecutionResult::ALL.len()],
                    // Constant, valid bounds: 1 ≤ low, high ≥ 2 × low, 2 significant digits.
                    latency: Histogram::new_with_bounds(1, MAX_MICROS, 2)
                        .expect("valid histogram bounds"),
                    last_topic: String::new(),
                    last_error: None,
                })
            })
            .collect();
        let index_of = ids
            .iter()
            .enumerate()
            .map(|(index, id)| (Arc::from(*id), index))
            .collect();
        DispatcherStats { slots, index_of }
    }

    /// `dispatcher_id`'s statistics now; `None` for an id the engine does not have.
    pub fn get(&self, dispatcher_id: &str) -> Option<StatsSnapshot> {
        let slot = lock(&self.slots[*self.index_of.get(dispatcher_id)?]);
        let counts = ExecutionResult::ALL
            .iter()
            .zip(slot.counts)
            .map(|(result, count)| (result.as_str(), count))
            .collect();
        let h = &slot.latency;
        let ms = |micros: u64| micros as f64 / 1_000.0;
        let latency_ms = (!h.is_empty()).then(|| Latency {
            count: h.len(),
            min: ms(h.min()),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        });
        Some(StatsSnapshot {
            counts,
            latency_ms,
            last_error: slot.last_error.clone(),
            last_topic: (!slot.last_topic.is_empty()).then(|| slot.last_topic.clone()),
        })
    }

    fn errors(&self, result: &DispatchResult) {
        for outcome in &result.dispatchers {
            let (Some(error), Some(&index)) = (
                &outcome.error_message,
                self.index_of.get(&outcome.dispatcher_id),
            ) else {
                continue;
            };
            let mut slot = lock(&self.slots[index]);
            match &mut slot.last_error {
                Some(last) => {
                    last.clear();
                    last.push_str(error);
                }
                none => *none = Some(error.clone()),
            }
        }
    }
}

impl InstrumentationStrategy for DispatcherStats {
    fn on_dispatcher_complete(
        &self,
        dispatch: &DispatchInfo<'_>,
        dispatcher: DispatcherRef<'_>,
        result: ExecutionResult,
        elapsed: Duration,
    ) {
        let Some(slot) = self.slots.get(dispatcher.index) else {
            return;
        };
        // A result a newer engine adds is not counted until it is placed in `ALL`.
        let position = ExecutionResult::ALL.iter().position(|r| *r == result);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let mut slot = lock(slot);
        if let Some(position) = position {
            slot.counts[position] += 1;
        }
        if result.ran() {
            slot.latency.saturating_record(micros.clamp(1, MAX_MICROS));
        }
        slot.last_topic.clear();
        slot.last_topic.push_str(dispatch.topic);
    }

    fn on_dispatch_success(&self, _: &DispatchInfo<'_>, result: &DispatchResult, _: Duration) {
        self.errors(result);
    }

    fn on_dispatch_error(&self, _: &DispatchInfo<'_>, result: &DispatchResult, _: Duration) {
        self.errors(result);
    }
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
