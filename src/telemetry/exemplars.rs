//! Exemplars: per histogram series and bucket, the last sampled dispatch that landed there (its
//! trace id, span id, value and time), served with the buckets in OpenMetrics so that a latency
//! spike on a dashboard leads to a trace.
//!
//! Why our own: the OpenTelemetry Rust SDK (0.33) collects no exemplars. Owns: one fixed array of
//! slots per series of `dispatch_duration_seconds` (category × status, known at build) and of
//! `dispatcher_execution_duration_seconds` (one per dispatcher id, made when the engine's strategy
//! is built). Memory is bounded by those label sets times the buckets, never by traffic.
//!
//! Invariants: recording is lock-free (a per-slot sequence counter, a compare-and-swap and six
//! relaxed stores) and happens only for sampled dispatches; a reader never waits for a writer.
//! Two writers racing for one slot: one wins, the other's exemplar is dropped (each is only "a
//! recent one"). Must not: allocate or lock on the dispatch path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

use super::catalog::{self, label};
use crate::engine::{Category, DispatchStatus};

/// One exemplar as it is served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    pub trace_id: u128,
    pub span_id: u64,
    /// The observed value (seconds).
    pub value: f64,
    /// When it was observed, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// One bucket's latest exemplar, a seqlock over atomics: an odd `seq` means a write is under way.
#[derive(Default)]
struct Slot {
    seq: AtomicU64,
    trace_hi: AtomicU64,
    trace_lo: AtomicU64,
    span: AtomicU64,
    value: AtomicU64,
    at_ms: AtomicU64,
}

impl Slot {
    fn store(&self, exemplar: &Exemplar) {
        let seq = self.seq.load(Ordering::Relaxed);
        // Another writer holds the slot: its exemplar is as good as ours.
        if seq & 1 == 1
            || self
                .seq
                .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        fence(Ordering::Release);
        self.trace_hi
            .store((exemplar.trace_id >> 64) as u64, Ordering::Relaxed);
        self.trace_lo
            .store(exemplar.trace_id as u64, Ordering::Relaxed);
        self.span.store(exemplar.span_id, Ordering::Relaxed);
        self.value
            .store(exemplar.value.to_bits(), Ordering::Relaxed);
        self.at_ms.store(exemplar.timestamp_ms, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }

    fn load(&self) -> Option<Exemplar> {
        // A few tries: a write takes nanoseconds, and a scrape can do without one exemplar.
        for _ in 0..4 {
            let before = self.seq.load(Ordering::Acquire);
            if before == 0 {
                return None;
            }
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let exemplar = Exemplar {
                trace_id: (u128::from(self.trace_hi.load(Ordering::Relaxed)) << 64)
                    | u128::from(self.trace_lo.load(Ordering::Relaxed)),
                span_id: self.span.load(Ordering::Relaxed),
                value: f64::from_bits(self.value.load(Ordering::Relaxed)),
                timestamp_ms: self.at_ms.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == before {
                return Some(exemplar);
            }
        }
        None
    }
}

/// The exemplars of one histogram series: a slot per bucket, the `+Inf` bucket last.
pub struct SeriesExemplars {
    bounds: &'static [f64],
    slots: Box<[Slot]>,
}

impl SeriesExemplars {
    fn new(bounds: &'static [f64]) -> SeriesExemplars {
        SeriesExemplars {
            bounds,
            slots: (0..=bounds.len()).map(|_| Slot::default()).collect(),
        }
    }

    /// Keeps `value` as the exemplar of its bucket, for the sampled span `trace_id`/`span_id`
    /// (W3C lowercase hex). Ids that do not parse, or are all zero (invalid in W3C), are ignored.
    pub fn record(&self, value: f64, trace_id: &str, span_id: &str) {
        let (Some(trace_id), Some(span_id)) = (parse_hex_u128(trace_id), parse_hex_u64(span_id))
        else {
            return;
        };
        // A bucket holds the values up to and including its bound, as the SDK counts them.
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.slots[bucket].store(&Exemplar {
            trace_id,
            span_id,
            value,
            timestamp_ms,
        });
    }

    /// The exemplar of bucket `index` (in bound order, `+Inf` last), if one was recorded.
    pub fn get(&self, index: usize) -> Option<Exemplar> {
        self.slots.get(index).and_then(Slot::load)
    }

    /// The exemplar of the bucket whose upper bound is `bound`.
    pub(crate) fn for_bound(&self, bound: f64) -> Option<Exemplar> {
        let index = if bound.is_infinite() {
            self.bounds.len()
        } else {
            self.bounds.iter().position(|b| *b == bound)?
        };
        self.get(index)
    }
}

fn parse_hex_u128(hex: &str) -> Option<u128> {
    (hex.len() == 32)
        .then(|| u128::from_str_radix(hex, 16).ok())
        .flatten()
        .filter(|id| *id != 0)
}

fn parse_hex_u64(hex: &str) -> Option<u64> {
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
        .filter(|id| *id != 0)
}

pub(crate) const CATEGORY_SLOTS: usize = 4;
/// The `category` label of each category slot; the last is a topic that did not parse.
pub(crate) const CATEGORIES: [&str; CATEGORY_SLOTS] = ["event", "command", "intent", "unknown"];

/// The category slot of a dispatch, as [`CATEGORIES`] names them.
pub(crate) fn category_slot(category: Option<Category>) -> usize {
    match category {
        Some(Category::Event) => 0,
        Some(Category::Command) => 1,
        Some(Category::Intent) => 2,
        None => 3,
    }
}

/// Every exemplar dispatchd keeps. One per [`super::Telemetry`], shared by its strategies and
/// read by the OpenMetrics encoder.
pub struct ExemplarStore {
    dispatch_family: String,
    execution_family: String,
    /// `dispatch_duration_seconds` by category slot, then [`DispatchStatus::ALL`] index.
    dispatch: Box<[SeriesExemplars]>,
    /// `dispatcher_execution_duration_seconds` by dispatcher id; written only when a strategy is
    /// built, never on the dispatch path (which holds its own `Arc`).
    executions: RwLock<HashMap<String, Arc<SeriesExemplars>>>,
}

impl ExemplarStore {
    /// A store for the histograms as exported under `namespace`.
    pub fn new(namespace: &str) -> ExemplarStore {
        let statuses = DispatchStatus::ALL.len();
        ExemplarStore {
            dispatch_family: catalog::DISPATCH_DURATION.exported_name(namespace),
            execution_family: catalog::DISPATCHER_EXECUTION_DURATION.exported_name(namespace),
            dispatch: (0..CATEGORY_SLOTS * statuses)
                .map(|_| SeriesExemplars::new(catalog::DISPATCH_DURATION.buckets))
                .collect(),
            executions: RwLock::new(HashMap::new()),
        }
    }

    /// The `dispatch_duration_seconds` series of one category slot and status index.
    pub(crate) fn dispatch(&self, category_slot: usize, status_index: usize) -> &SeriesExemplars {
        &self.dispatch[category_slot * DispatchStatus::ALL.len() + status_index]
    }

    /// The `dispatcher_execution_duration_seconds` series of `dispatcher_id`, made on first ask.
    pub(crate) fn execution(&self, dispatcher_id: &str) -> Arc<SeriesExemplars> {
        if let Some(series) = self.executions.read().get(dispatcher_id) {
            return series.clone();
        }
        self.executions
            .write()
            .entry(dispatcher_id.to_owned())
            .or_insert_with(|| {
                Arc::new(SeriesExemplars::new(
                    catalog::DISPATCHER_EXECUTION_DURATION.buckets,
                ))
            })
            .clone()
    }

    /// The exemplars of the series of `family` whose labels `value` reads, if it is one of the
    /// histograms that carry exemplars.
    pub(crate) fn series<'l>(
        &self,
        family: &str,
        value: impl Fn(&str) -> Option<&'l str>,
    ) -> Option<SeriesRef<'_>> {
        if family == self.dispatch_family {
            let category = value(label::CATEGORY)?;
            let slot = CATEGORIES.iter().position(|c| *c == category)?;
            let status = value(label::STATUS)?;
            let index = DispatchStatus::ALL
                .iter()
                .position(|s| s.as_str() == status)?;
            Some(SeriesRef::Borrowed(self.dispatch(slot, index)))
        } else if family == self.execution_family {
            let id = value(label::DISPATCHER_ID)?;
            self.executions
                .read()
                .get(id)
                .cloned()
                .map(SeriesRef::Shared)
        } else {
            None
        }
    }
}

/// A series' exemplars, borrowed from the store or shared with a strategy.
pub(crate) enum SeriesRef<'a> {
    Borrowed(&'a SeriesExemplars),
    Shared(Arc<SeriesExemplars>),
}

impl std::ops::Deref for SeriesRef<'_> {
    type Target = SeriesExemplars;

    fn deref(&self) -> &SeriesExemplars {
        match self {
            SeriesRef::Borrowed(series) => series,
            SeriesRef::Shared(series) => series,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn a_value_lands_in_the_bucket_whose_bound_holds_it() {
        static BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];
        let series = SeriesExemplars::new(&BOUNDS);
        series.record(0.1, TRACE, SPAN);
        series.record(5.0, TRACE, "00f067aa0ba902b8");
        assert_eq!(series.get(0), None);
        let at_bound = series.get(1).unwrap();
        assert_eq!(at_bound.value, 0.1);
        assert_eq!(at_bound.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(at_bound.span_id, 0x00f067aa0ba902b7);
        assert!(at_bound.timestamp_ms > 1_600_000_000_000);
        assert_eq!(
            series.for_bound(f64::INFINITY).unwrap().span_id,
            0x00f067aa0ba902b8
        );
        assert_eq!(series.for_bound(0.1), series.get(1));
        assert_eq!(series.for_bound(0.5), None);
    }

    #[test]
    fn the_last_sampled_dispatch_wins_and_bad_ids_are_ignored() {
        static BOUNDS: [f64; 1] = [1.0];
        let series = SeriesExemplars::new(&BOUNDS);
        series.record(0.5, TRACE, SPAN);
        series.record(0.25, "ffffffffffffffffffffffffffffffff", SPAN);
        for (trace, span) in [
            ("00000000000000000000000000000000", SPAN),
            ("not hex", SPAN),
            (TRACE, "0000000000000000"),
            (TRACE, "00f067aa0ba902b7aa"),
        ] {
            series.record(0.75, trace, span);
        }
        let kept = series.get(0).unwrap();
        assert_eq!(kept.trace_id, u128::MAX);
        assert_eq!(kept.value, 0.25);
    }

    #[test]
    fn concurrent_writers_never_tear_an_exemplar() {
        static BOUNDS: [f64; 1] = [1.0];
        let series = Arc::new(SeriesExemplars::new(&BOUNDS));
        // Each writer's trace id, span id and value are derived from one number, so a torn read
        // (fields from two writes) would not agree with itself.
        let writers: Vec<_> = (1..=4u64)
            .map(|writer| {
                let series = series.clone();
                std::thread::spawn(move || {
                    for n in 0..20_000u64 {
                        let id = writer * 1_000_000 + n;
                        series.record(
                            id as f64 / 1e9,
                            &format!("{id:032x}"),
                            &format!("{id:016x}"),
                        );
                    }
                })
            })
            .collect();
        let mut seen = 0;
        while writers.iter().any(|w| !w.is_finished()) {
            if let Some(exemplar) = series.get(0) {
                assert_eq!(exemplar.trace_id, u128::from(exemplar.span_id));
                assert_eq!(exemplar.value, exemplar.span_id as f64 / 1e9);
                seen += 1;
            }
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert!(series.get(0).is_some());
        let _ = seen;
    }

    #[test]
    fn the_store_finds_series_by_their_exported_labels() {
        let store = ExemplarStore::new("ns");
        let labels = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        };
        let success = DispatchStatus::ALL
            .iter()
            .position(|s| s.as_str() == "success")
            .unwrap();
        store.dispatch(1, success).record(0.002, TRACE, SPAN);
        let command = labels(&[("category", "command"), ("status", "success")]);
        let series = store
            .series("ns_dispatch_duration_seconds", command)
            .unwrap();
        assert_eq!(
            series.for_bound(0.0025).unwrap().span_id,
            0x00f067aa0ba902b7
        );
        assert!(store.series("dispatch_duration_seconds", command).is_none());

        let executions = "ns_dispatcher_execution_duration_seconds";
        let billing = labels(&[("dispatcher_id", "billing")]);
        assert!(store.series(executions, billing).is_none());
        store.execution("billing").record(0.3, TRACE, SPAN);
        let series = store.series(executions, billing).unwrap();
        assert!((0..=catalog::LATENCY_BUCKETS.len()).any(|i| series.get(i).is_some()));
    }
}
