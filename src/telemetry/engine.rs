//! The engine's metrics, fed by an instrumentation strategy.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

// parking_lot's locks do not poison: a panicking strategy elsewhere cannot wedge the metrics.
use parking_lot::RwLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};

use super::catalog::{self, InstrumentSpec, label};
use super::exemplars::{self, ExemplarStore, SeriesExemplars};
use crate::engine::{
    Category, DispatchInfo, DispatchResult, DispatchStatus, DispatcherRef, ExecutionResult,
    InstrumentationStrategy,
};

/// How many distinct command types become `command_type` label values before the rest are
/// counted as `other`. Command types come from requests, so they must be bounded.
pub const MAX_COMMAND_TYPE_LABELS: usize = 64;

/// The label value for a topic whose category could not be parsed.
const UNKNOWN_CATEGORY: &str = "unknown";

/// The engine's instruments, created once.
#[derive(Clone)]
pub struct EngineMetrics {
    messages: Counter<u64>,
    duration: Histogram<f64>,
    executions: Counter<u64>,
    execution_duration: Histogram<f64>,
    adapter_invocations: Counter<u64>,
    policy_denials: Counter<u64>,
}

impl EngineMetrics {
    pub fn new(meter: &Meter) -> EngineMetrics {
        EngineMetrics {
            messages: counter(meter, catalog::DISPATCH_MESSAGES),
            duration: histogram(meter, catalog::DISPATCH_DURATION),
            executions: counter(meter, catalog::DISPATCHER_EXECUTIONS),
            execution_duration: histogram(meter, catalog::DISPATCHER_EXECUTION_DURATION),
            adapter_invocations: counter(meter, catalog::DISPATCHER_ADAPTER_INVOCATIONS),
            policy_denials: counter(meter, catalog::DISPATCHER_POLICY_DENIALS),
        }
    }
}

pub(super) fn counter(meter: &Meter, spec: InstrumentSpec) -> Counter<u64> {
    meter
        .u64_counter(spec.name)
        .with_description(spec.description)
        .with_unit(spec.unit)
        .build()
}

pub(super) fn histogram(meter: &Meter, spec: InstrumentSpec) -> Histogram<f64> {
    meter
        .f64_histogram(spec.name)
        .with_description(spec.description)
        .with_unit(spec.unit)
        .with_boundaries(spec.buckets.to_vec())
        .build()
}

/// A counter and a histogram bound to one (category, status) pair.
struct Outcome {
    messages: BoundCounter<u64>,
    duration: BoundHistogram<f64>,
}

/// One dispatcher's bound instruments, bound on first use so that dispatchers that never ran
/// export no empty series.
struct DispatcherSlots {
    id: KeyValue,
    results: [OnceLock<BoundCounter<u64>>; ExecutionResult::ALL.len()],
    duration: OnceLock<BoundHistogram<f64>>,
    exemplars: Option<Arc<SeriesExemplars>>,
}

/// Records `dispatch_*` and `dispatcher_*` metrics from the engine's hooks.
///
/// Every label set on the dispatch path is known when the engine is built (categories, statuses,
/// dispatcher ids, results), so each is bound once, on first use, and later recordings skip the
/// SDK's attribute hashing: a `OnceLock` load and an atomic add. Command types and policy names
/// are interned in a map (a read lock on the command path only), with command types capped at
/// [`MAX_COMMAND_TYPE_LABELS`].
pub struct MetricsStrategy {
    metrics: EngineMetrics,
    /// Indexed by category slot (event, command, intent, unknown), then status.
    outcomes: [[OnceLock<Outcome>; DispatchStatus::ALL.len()]; 4],
    dispatchers: Box<[DispatcherSlots]>,
    commands: RwLock<Commands>,
    policies: RwLock<HashMap<String, BoundCounter<u64>>>,
    /// Where sampled dispatches leave their trace for OpenMetrics exemplars; `None` keeps none.
    exemplars: Option<Arc<ExemplarStore>>,
}

/// The label value that command types past [`MAX_COMMAND_TYPE_LABELS`] are counted under.
const OTHER_COMMAND_TYPE: &str = "other";

/// The bound `adapter_invocations` counters, by adapter then command type: looked up with the
/// borrowed names, so a command that was seen before allocates nothing.
#[derive(Default)]
struct Commands {
    by_adapter: HashMap<String, HashMap<String, BoundCounter<u64>>>,
    /// (adapter, command type) pairs bound so far, `other` included.
    pairs: usize,
}

impl Commands {
    /// The counter for this command, or, once the cap is reached, its adapter's `other`.
    fn find(&self, adapter: &str, command_type: &str) -> Option<&BoundCounter<u64>> {
        let types = self.by_adapter.get(adapter)?;
        types.get(command_type).or_else(|| {
            (self.pairs >= MAX_COMMAND_TYPE_LABELS)
                .then(|| types.get(OTHER_COMMAND_TYPE))
                .flatten()
        })
    }
}

impl MetricsStrategy {
    /// `dispatcher_ids` in the engine's registration order ([`DispatcherRef::index`]).
    pub fn new<'a>(
        metrics: EngineMetrics,
        dispatcher_ids: impl IntoIterator<Item = &'a str>,
    ) -> MetricsStrategy {
        let dispatchers = dispatcher_ids
            .into_iter()
            .map(|id| DispatcherSlots {
                id: KeyValue::new(label::DISPATCHER_ID, super::shared(id)),
                results: Default::default(),
                duration: OnceLock::new(),
                exemplars: None,
            })
            .collect();
        MetricsStrategy {
            metrics,
            outcomes: Default::default(),
            dispatchers,
            commands: RwLock::new(Commands::default()),
            policies: RwLock::new(HashMap::new()),
            exemplars: None,
        }
    }

    /// Keeps, per latency bucket, the last sampled dispatch's trace in `store` (the exemplars
    /// of `/metrics` in OpenMetrics). Unsampled dispatches cost one branch more.
    pub fn with_exemplars(mut self, store: Arc<ExemplarStore>) -> MetricsStrategy {
        for slots in self.dispatchers.iter_mut() {
            slots.exemplars = Some(store.execution(slots.id.value.as_str().as_ref()));
        }
        self.exemplars = Some(store);
        self
    }

    fn record_outcome(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        let status = result.status;
        let (slot, category) = match dispatch.category {
            Some(Category::Event) => (0, Category::Event.as_str()),
            Some(Category::Command) => (1, Category::Command.as_str()),
            Some(Category::Intent) => (2, Category::Intent.as_str()),
            None => (3, UNKNOWN_CATEGORY),
        };
        let index = status_index(status);
        let outcome = self.outcomes[slot][index].get_or_init(|| {
            let attributes = [
                KeyValue::new(label::CATEGORY, category),
                KeyValue::new(label::STATUS, status.as_str()),
            ];
            Outcome {
                messages: self.metrics.messages.bind(&attributes),
                duration: self.metrics.duration.bind(&attributes),
            }
        });
        outcome.messages.add(1);
        let seconds = elapsed.as_secs_f64();
        outcome.duration.record(seconds);
        if let (Some(store), true, true, Some(trace_id), Some(span_id)) = (
            &self.exemplars,
            dispatch.traced,
            result.trace_sampled,
            &result.trace_id,
            &result.span_id,
        ) {
            store
                .dispatch(exemplars::category_slot(dispatch.category), index)
                .record(seconds, trace_id, span_id);
        }
    }
}

fn status_index(status: DispatchStatus) -> usize {
    DispatchStatus::ALL
        .iter()
        .position(|s| *s == status)
        .unwrap_or(0)
}

fn result_index(result: ExecutionResult) -> usize {
    ExecutionResult::ALL
        .iter()
        .position(|r| *r == result)
        .unwrap_or(0)
}

impl InstrumentationStrategy for MetricsStrategy {
    fn on_dispatch_success(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        self.record_outcome(dispatch, result, elapsed);
    }

    fn on_dispatch_error(
        &self,
        dispatch: &DispatchInfo<'_>,
        result: &DispatchResult,
        elapsed: Duration,
    ) {
        self.record_outcome(dispatch, result, elapsed);
    }

    fn on_dispatcher_complete(
        &self,
        dispatch: &DispatchInfo<'_>,
        dispatcher: DispatcherRef<'_>,
        result: ExecutionResult,
        elapsed: Duration,
    ) {
        // Every outcome counts, skips and refusals included (`result="skipped"`, `"rejected"`,
        // `"denied"`); only calls that ran have a latency.
        let Some(slots) = self.dispatchers.get(dispatcher.index) else {
            // An engine other than the one this strategy was built for: record unbound, still
            // with a dispatcher id the engine validated.
            let id = KeyValue::new(label::DISPATCHER_ID, super::shared(dispatcher.id));
            self.metrics.executions.add(
                1,
                &[id.clone(), KeyValue::new(label::RESULT, result.as_str())],
            );
            if result.ran() {
                self.metrics
                    .execution_duration
                    .record(elapsed.as_secs_f64(), &[id]);
            }
            return;
        };
        slots.results[result_index(result)]
            .get_or_init(|| {
                self.metrics.executions.bind(&[
                    slots.id.clone(),
                    KeyValue::new(label::RESULT, result.as_str()),
                ])
            })
            .add(1);
        if result.ran() {
            let seconds = elapsed.as_secs_f64();
            slots
                .duration
                .get_or_init(|| {
                    self.metrics
                        .execution_duration
                        .bind(std::slice::from_ref(&slots.id))
                })
                .record(seconds);
            // The dispatch span's ids: the run's own span is its child, in the same trace.
            if let (Some(exemplars), Some(span)) = (&slots.exemplars, dispatch.span) {
                if span.sampled() {
                    let (trace_id, span_id) = span.ids();
                    exemplars.record(seconds, &trace_id, &span_id);
                }
            }
        }
    }

    fn on_adapter_invoke(
        &self,
        _: &DispatchInfo<'_>,
        adapter: &str,
        command_type: &str,
        _: &serde_json::Value,
    ) {
        if let Some(bound) = self.commands.read().find(adapter, command_type) {
            bound.add(1);
            return;
        }
        let mut commands = self.commands.write();
        let Commands { by_adapter, pairs } = &mut *commands;
        let types = by_adapter.entry(adapter.to_owned()).or_default();
        let command_type = if *pairs < MAX_COMMAND_TYPE_LABELS || types.contains_key(command_type) {
            command_type
        } else {
            OTHER_COMMAND_TYPE
        };
        types
            .entry(command_type.to_owned())
            .or_insert_with(|| {
                *pairs += 1;
                self.metrics.adapter_invocations.bind(&[
                    KeyValue::new(label::ADAPTER, super::shared(adapter)),
                    KeyValue::new(label::COMMAND_TYPE, super::shared(command_type)),
                ])
            })
            .add(1);
    }

    fn on_policy_denied(&self, _: &DispatchInfo<'_>, policy: &str, _: &str, _: &str) {
        if let Some(bound) = self.policies.read().get(policy) {
            bound.add(1);
            return;
        }
        self.policies
            .write()
            .entry(policy.to_owned())
            .or_insert_with_key(|policy| {
                self.metrics
                    .policy_denials
                    .bind(&[KeyValue::new(label::POLICY, policy.clone())])
            })
            .add(1);
    }
}
