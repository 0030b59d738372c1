//! The engine's metrics, fed by an instrumentation strategy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

// parking_lot's locks do not poison: a panicking strategy elsewhere cannot wedge the metrics.
use parking_lot::RwLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};

use super::catalog::{self, InstrumentSpec, label};
use super::exemplars::{self, ExemplarStore, SeriesExemplars};
use crate::engine::{
    DispatchInfo, DispatchResult, DispatchStatus, DispatcherRef, ExecutionResult,
    InstrumentationStrategy,
};

/// How many distinct command types become `command_type` label values before the rest are
/// counted as `other`. Command types come from requests, so they must be bounded.
pub const MAX_COMMAND_TYPE_LABELS: usize = 64;

/// The engine's instruments, created once per meter.
#[derive(Clone)]
pub struct EngineMetrics {
    duration: Histogram<f64>,
    execution_duration: Histogram<f64>,
    adapter_invocations: Counter<u64>,
    policy_denials: Counter<u64>,
    /// What `dispatch_messages_total` and `dispatcher_executions_total` report.
    counts: Arc<EngineCounts>,
}

impl EngineMetrics {
    /// The engine's instruments on `meter`. Only [`super::Telemetry`] makes them, once per
    /// meter, and hands out clones ([`super::Telemetry::engine_metrics`]):
    /// `dispatch_messages_total` and `dispatcher_executions_total` are observed from counts
    /// these instruments own, and of two sets on one meter the SDK would keep one set's
    /// observations and drop the other's counts.
    pub(super) fn new(meter: &Meter) -> EngineMetrics {
        let counts = Arc::new(EngineCounts::default());
        let messages = counts.clone();
        observed_counter(meter, catalog::DISPATCH_MESSAGES, move |observe| {
            for (slot, statuses) in messages.messages.iter().enumerate() {
                for (status, count) in DispatchStatus::ALL.iter().zip(statuses) {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        observe(
                            count,
                            &[
                                KeyValue::new(label::CATEGORY, exemplars::CATEGORIES[slot]),
                                KeyValue::new(label::STATUS, status.as_str()),
                            ],
                        );
                    }
                }
            }
        });
        let duration = histogram(meter, catalog::DISPATCH_DURATION);
        let executions = counts.clone();
        observed_counter(meter, catalog::DISPATCHER_EXECUTIONS, move |observe| {
            for row in executions.executions.read().values() {
                for (result, count) in ExecutionResult::ALL.iter().zip(row.counts.iter()) {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        observe(
                            count,
                            &[
                                row.id.clone(),
                                KeyValue::new(label::RESULT, result.as_str()),
                            ],
                        );
                    }
                }
            }
        });
        EngineMetrics {
            duration,
            execution_duration: histogram(meter, catalog::DISPATCHER_EXECUTION_DURATION),
            adapter_invocations: counter(meter, catalog::DISPATCHER_ADAPTER_INVOCATIONS),
            policy_denials: counter(meter, catalog::DISPATCHER_POLICY_DENIALS),
            counts,
        }
    }
}

/// The two counters every dispatch adds to, kept here as atomics and read by the SDK at each
/// collection (observable counters), for `/metrics` and OTLP alike. A dispatch adds with one
/// relaxed atomic instruction each, where the SDK's bound counter is a call through its list
/// of measures (about 40 instructions). Only counts above zero are reported, so a series
/// appears with its first message, as a counter bound on first use did.
#[derive(Default)]
struct EngineCounts {
    /// `dispatch_messages_total`, by category slot (see [`exemplars::category_slot`]), then status.
    messages: [[AtomicU64; DispatchStatus::ALL.len()]; exemplars::CATEGORY_SLOTS],
    /// `dispatcher_executions_total`, by dispatcher id. A row is never removed: the counts of
    /// an engine that was replaced carry on in the next one's, so the counters never go back.
    executions: RwLock<HashMap<String, ExecutionRow>>,
}

type ResultCounts = [AtomicU64; ExecutionResult::ALL.len()];

struct ExecutionRow {
    id: KeyValue,
    counts: Arc<ResultCounts>,
}

impl EngineCounts {
    /// `dispatcher_id`'s counts by result, made on first use.
    fn row(&self, dispatcher_id: &str) -> Arc<ResultCounts> {
        if let Some(row) = self.executions.read().get(dispatcher_id) {
            return row.counts.clone();
        }
        self.executions
            .write()
            .entry(dispatcher_id.to_owned())
            .or_insert_with(|| ExecutionRow {
                id: KeyValue::new(label::DISPATCHER_ID, super::shared(dispatcher_id)),
                counts: Arc::default(),
            })
            .counts
            .clone()
    }
}

/// An observable `u64` counter whose callback reports through `observe(count, attributes)`.
fn observed_counter(
    meter: &Meter,
    spec: InstrumentSpec,
    report: impl Fn(&mut dyn FnMut(u64, &[KeyValue])) + Send + Sync + 'static,
) {
    meter
        .u64_observable_counter(spec.name)
        .with_description(spec.description)
        .with_unit(spec.unit)
        .with_callback(move |observer| {
            report(&mut |count, attributes| observer.observe(count, attributes))
        })
        .build();
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

/// One dispatcher's counts and latency histogram, the histogram bound on first use so that
/// dispatchers that never ran export no empty series.
struct DispatcherSlots {
    id: KeyValue,
    results: Arc<ResultCounts>,
    duration: OnceLock<BoundHistogram<f64>>,
    exemplars: Option<Arc<SeriesExemplars>>,
}

/// Records `dispatch_*` and `dispatcher_*` metrics from the engine's hooks.
///
/// Every label set on the dispatch path is known when the engine is built (categories, statuses,
/// dispatcher ids, results): the two counters are atomics indexed by them ([`EngineCounts`]),
/// and each latency histogram is bound once, on first use, so later recordings skip the SDK's
/// attribute hashing. Command types and policy names
/// are interned in a map (a read lock on the command path only), with command types capped at
/// [`MAX_COMMAND_TYPE_LABELS`].
pub struct MetricsStrategy {
    metrics: EngineMetrics,
    /// `dispatch_duration_seconds`, by category slot (see [`exemplars::category_slot`]), then status.
    outcomes:
        [[OnceLock<BoundHistogram<f64>>; DispatchStatus::ALL.len()]; exemplars::CATEGORY_SLOTS],
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
                results: metrics.counts.row(id),
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
        let slot = exemplars::category_slot(dispatch.category);
        let index = status.index();
        self.metrics.counts.messages[slot][index].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        self.outcomes[slot][index]
            .get_or_init(|| {
                self.metrics.duration.bind(&[
                    KeyValue::new(label::CATEGORY, exemplars::CATEGORIES[slot]),
                    KeyValue::new(label::STATUS, status.as_str()),
                ])
            })
            .record(seconds);
        if let (Some(store), true, true, Some(trace_id), Some(span_id)) = (
            &self.exemplars,
            dispatch.traced,
            result.trace_sampled,
            &result.trace_id,
            &result.span_id,
        ) {
            store
                .dispatch(slot, index)
                .record(seconds, trace_id, span_id);
        }
    }
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
            self.metrics.counts.row(dispatcher.id)[result.index()].fetch_add(1, Ordering::Relaxed);
            let id = KeyValue::new(label::DISPATCHER_ID, super::shared(dispatcher.id));
            if result.ran() {
                self.metrics
                    .execution_duration
                    .record(elapsed.as_secs_f64(), &[id]);
            }
            return;
        };
        slots.results[result.index()].fetch_add(1, Ordering::Relaxed);
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
