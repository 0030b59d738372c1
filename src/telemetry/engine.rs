//! The engine's metrics, fed by an instrumentation strategy.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

// parking_lot's locks do not poison: a panicking strategy elsewhere cannot wedge the metrics.
use parking_lot::RwLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};

use super::catalog::{self, InstrumentSpec, label};
use super::exemplars::{self, ExemplarStore, SeriesExemplars};
use super::scrape::{OwnFamily, Point, Series};
use super::striped::{Counts, LatencyHistogram};
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
    /// The SDK's copies of the two latency histograms, recorded only when `sdk_histograms`.
    duration: Histogram<f64>,
    execution_duration: Histogram<f64>,
    adapter_invocations: Counter<u64>,
    policy_denials: Counter<u64>,
    /// What `dispatch_messages_total`, `dispatcher_executions_total` and the two latency
    /// histograms report.
    counts: Arc<EngineCounts>,
    /// Whether a reader other than `/metrics` (OTLP) reads the SDK: then the latency histograms
    /// are recorded into the SDK's instruments too, which is the only way to hand them to it.
    sdk_histograms: bool,
}

impl EngineMetrics {
    /// The engine's instruments on `meter`. Only [`super::Telemetry`] makes them, once per
    /// meter, and hands out clones ([`super::Telemetry::engine_metrics`]):
    /// `dispatch_messages_total` and `dispatcher_executions_total` are observed from counts
    /// these instruments own, and of two sets on one meter the SDK would keep one set's
    /// observations and drop the other's counts.
    ///
    /// `cardinality_limit` bounds the dispatcher series of the latency histogram of our own as
    /// the SDK bounds its own; `sdk_histograms` is [`EngineMetrics::sdk_histograms`].
    pub(super) fn new(
        meter: &Meter,
        cardinality_limit: usize,
        sdk_histograms: bool,
    ) -> EngineMetrics {
        let counts = Arc::new(EngineCounts {
            durations: Default::default(),
            executions: RwLock::default(),
            execution_series: AtomicUsize::new(0),
            cardinality_limit,
            execution_overflow: OnceLock::new(),
        });
        let messages = counts.clone();
        // Every outcome is one observation of `dispatch_duration_seconds` with the same labels:
        // the counter is that histogram's count, and a dispatch adds to one of them, not two.
        observed_counter(meter, catalog::DISPATCH_MESSAGES, move |observe| {
            for (slot, statuses) in messages.durations.iter().enumerate() {
                for (status, histogram) in DispatchStatus::ALL.iter().zip(statuses) {
                    let count = histogram.get().map_or(0, LatencyHistogram::count);
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
                let totals = row.execution.results.totals();
                for (result, &count) in ExecutionResult::ALL.iter().zip(&totals) {
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
            sdk_histograms,
        }
    }

    /// The latency histograms of our own, as the scrape writes them.
    pub(super) fn own_families(&self) -> Vec<OwnFamily> {
        self.counts.own_families()
    }
}

/// What every dispatch adds to, kept here per thread ([`super::striped`]): the two latency
/// histograms ([`LatencyHistogram`], each series made on its first observation), which the
/// scrape reads, and `dispatcher_executions_total`, which the SDK reads at each collection
/// (observable counters) with `dispatch_messages_total` (the count of
/// `dispatch_duration_seconds`), for `/metrics` and OTLP alike. A dispatch adds with a load and a
/// store each, where the SDK's bound counter is a call through its list of measures (about 40
/// instructions) and an atomic add a locked instruction. Only counts above zero are reported, so
/// a series appears with its first message, as a counter bound on first use did.
///
/// Shared by every strategy made from one [`EngineMetrics`]: the series of an engine that was
/// replaced carry on in the next one's, so nothing on `/metrics` goes back.
struct EngineCounts {
    /// `dispatch_duration_seconds` and, by its count, `dispatch_messages_total`, by category slot
    /// (see [`exemplars::category_slot`]), then status.
    durations: [[OnceLock<LatencyHistogram>; DispatchStatus::ALL.len()]; exemplars::CATEGORY_SLOTS],
    /// `dispatcher_executions_total` and `dispatcher_execution_duration_seconds`, by dispatcher
    /// id. A row is never removed.
    executions: RwLock<HashMap<String, ExecutionRow>>,
    /// Dispatcher series of `dispatcher_execution_duration_seconds` made so far (and attempts
    /// past the limit).
    execution_series: AtomicUsize,
    cardinality_limit: usize,
    /// Where dispatchers past the cardinality limit record, labelled as the SDK labels its
    /// overflow series (which `metric_cardinality_overflow` then reports).
    execution_overflow: OnceLock<Arc<LatencyHistogram>>,
}

type ResultCounts = Counts<{ ExecutionResult::ALL.len() }>;

/// One dispatcher's counts by result and its latency histogram.
#[derive(Default)]
struct Execution {
    results: ResultCounts,
    duration: OnceLock<Arc<LatencyHistogram>>,
}

struct ExecutionRow {
    id: KeyValue,
    execution: Arc<Execution>,
}

impl EngineCounts {
    /// `dispatcher_id`'s counts, made on first use.
    fn row(&self, dispatcher_id: &str) -> Arc<Execution> {
        if let Some(row) = self.executions.read().get(dispatcher_id) {
            return row.execution.clone();
        }
        self.executions
            .write()
            .entry(dispatcher_id.to_owned())
            .or_insert_with(|| ExecutionRow {
                id: KeyValue::new(label::DISPATCHER_ID, super::shared(dispatcher_id)),
                execution: Arc::default(),
            })
            .execution
            .clone()
    }

    /// The latency histogram of a dispatcher's row, made on first use: its own while there are
    /// fewer than the cardinality limit, the overflow series after.
    #[inline]
    fn execution_duration<'a>(&'a self, execution: &'a Execution) -> &'a LatencyHistogram {
        execution.duration.get_or_init(|| {
            if self.execution_series.fetch_add(1, Ordering::Relaxed) < self.cardinality_limit {
                Arc::default()
            } else {
                self.execution_overflow.get_or_init(Arc::default).clone()
            }
        })
    }

    /// `dispatch_duration_seconds` and `dispatcher_execution_duration_seconds` as they stand.
    fn own_families(&self) -> Vec<OwnFamily> {
        let mut outcomes = Vec::new();
        for (slot, statuses) in self.durations.iter().enumerate() {
            for (status, histogram) in DispatchStatus::ALL.iter().zip(statuses) {
                if let Some(histogram) = histogram.get() {
                    outcomes.push(Series {
                        labels: vec![
                            (
                                Cow::Borrowed(label::CATEGORY),
                                Cow::Borrowed(exemplars::CATEGORIES[slot]),
                            ),
                            (Cow::Borrowed(label::STATUS), Cow::Borrowed(status.as_str())),
                        ],
                        value: Point::Histogram(Box::new(histogram.point())),
                    });
                }
            }
        }
        let mut executions: Vec<Series<'static>> = self
            .executions
            .read()
            .values()
            .filter_map(|row| {
                let histogram = row.execution.duration.get()?;
                // Read after the row's: a row that holds the overflow series was given it after
                // the overflow series was made, so this sees it.
                let overflow = self.execution_overflow.get();
                if overflow.is_some_and(|overflow| Arc::ptr_eq(overflow, histogram)) {
                    return None;
                }
                Some(Series {
                    labels: vec![(
                        Cow::Borrowed(label::DISPATCHER_ID),
                        Cow::Owned(row.id.value.as_str().into_owned()),
                    )],
                    value: Point::Histogram(Box::new(histogram.point())),
                })
            })
            .collect();
        if let Some(overflow) = self.execution_overflow.get() {
            executions.push(Series {
                labels: vec![(Cow::Borrowed(super::OVERFLOW_LABEL), Cow::Borrowed("true"))],
                value: Point::Histogram(Box::new(overflow.point())),
            });
        }
        vec![
            OwnFamily {
                spec: catalog::DISPATCH_DURATION,
                series: outcomes,
            },
            OwnFamily {
                spec: catalog::DISPATCHER_EXECUTION_DURATION,
                series: executions,
            },
        ]
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

/// One dispatcher's counts and latency histogram, and the SDK's copy of the histogram (when
/// [`EngineMetrics::sdk_histograms`]) bound on first use so that dispatchers that never ran
/// export no empty series.
struct DispatcherSlots {
    id: KeyValue,
    execution: Arc<Execution>,
    sdk_duration: OnceLock<BoundHistogram<f64>>,
    exemplars: Option<Arc<SeriesExemplars>>,
}

/// Records `dispatch_*` and `dispatcher_*` metrics from the engine's hooks.
///
/// Every label set on the dispatch path is known when the engine is built (categories, statuses,
/// dispatcher ids, results): the two counters are atomics indexed by them ([`EngineCounts`]),
/// and so are the two latency histograms ([`LatencyHistogram`]); when OTLP reads the SDK, the
/// SDK's copies are bound once, on first use, so later recordings skip its attribute hashing.
/// Command types and policy names
/// are interned in a map (a read lock on the command path only), with command types capped at
/// [`MAX_COMMAND_TYPE_LABELS`].
pub struct MetricsStrategy {
    metrics: EngineMetrics,
    /// The SDK's copy of `dispatch_duration_seconds`, by category slot (see
    /// [`exemplars::category_slot`]), then status.
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
                execution: metrics.counts.row(id),
                sdk_duration: OnceLock::new(),
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
        let counts = &*self.metrics.counts;
        let seconds = elapsed.as_secs_f64();
        counts.durations[slot][index]
            .get_or_init(LatencyHistogram::new)
            .record(seconds);
        if self.metrics.sdk_histograms {
            self.outcomes[slot][index]
                .get_or_init(|| {
                    self.metrics.duration.bind(&[
                        KeyValue::new(label::CATEGORY, exemplars::CATEGORIES[slot]),
                        KeyValue::new(label::STATUS, status.as_str()),
                    ])
                })
                .record(seconds);
        }
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
            let counts = &*self.metrics.counts;
            let execution = counts.row(dispatcher.id);
            execution.results.add_one(result.index());
            if result.ran() {
                let seconds = elapsed.as_secs_f64();
                counts.execution_duration(&execution).record(seconds);
                if self.metrics.sdk_histograms {
                    let id = KeyValue::new(label::DISPATCHER_ID, super::shared(dispatcher.id));
                    self.metrics.execution_duration.record(seconds, &[id]);
                }
            }
            return;
        };
        slots.execution.results.add_one(result.index());
        if result.ran() {
            let seconds = elapsed.as_secs_f64();
            self.metrics
                .counts
                .execution_duration(&slots.execution)
                .record(seconds);
            if self.metrics.sdk_histograms {
                slots
                    .sdk_duration
                    .get_or_init(|| {
                        self.metrics
                            .execution_duration
                            .bind(std::slice::from_ref(&slots.id))
                    })
                    .record(seconds);
            }
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
