//! `GET /api/v1/stats`: the structured view of the same numbers `/metrics` exports.
//!
//! Computed from the gathered metric families at request time, so it adds nothing to the
//! dispatch path, takes no lock there, and can never disagree with `/metrics`. Percentiles are
//! estimated from the histogram buckets the way Prometheus' `histogram_quantile` does (linear
//! within a bucket), so they are as precise as the buckets: see `catalog::LATENCY_BUCKETS`.

use std::collections::BTreeMap;

use prometheus::proto::{Metric, MetricFamily};
use serde::Serialize;

use super::catalog::{self, label};
use crate::engine::{DispatchStatus, ExecutionResult};

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub total_messages: u64,
    /// Messages by final status, every status present (`rejected` and `denied` included).
    #[schema(value_type = BTreeMap<String, u64>)]
    pub by_status: BTreeMap<&'static str, u64>,
    /// `success` / total; `null` before the first message.
    pub success_rate: Option<f64>,
    /// Messages with an error status ([`DispatchStatus::is_error`]) / total. Refusals are not
    /// errors: they have their own rate.
    pub error_rate: Option<f64>,
    /// `rejected` and `denied` / total: messages a protection or a policy refused.
    pub refusal_rate: Option<f64>,
    pub latency_ms: Latency,
    /// Every registered dispatcher, in registration order, also those that never ran.
    pub dispatchers: Vec<DispatcherStats>,
}

/// Engine latency per message, in milliseconds; `null` before the first message.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = StatsLatency)]
pub struct Latency {
    pub avg: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = StatsDispatcher)]
pub struct DispatcherStats {
    pub dispatcher_id: String,
    /// Runs that happened: success, error and timeout (refusals and skips did not run).
    pub execution_count: u64,
    /// Runs that failed: error and timeout.
    pub error_count: u64,
    pub timeout_count: u64,
    /// Calls a protection refused before running (the circuit breaker, the rate limiter, the
    /// concurrency limit).
    pub rejected_count: u64,
    /// Commands a policy refused before running.
    pub denied_count: u64,
    /// Messages this dispatcher had already handled (de-duplication).
    pub skipped_count: u64,
    /// `error_count / execution_count`, so refusals never raise it; `null` before the first run.
    pub error_rate: Option<f64>,
    pub avg_latency_ms: Option<f64>,
}

/// Builds the stats from gathered families for the given dispatchers.
pub fn compute<'a>(
    families: &[MetricFamily],
    namespace: &str,
    dispatcher_ids: impl IntoIterator<Item = &'a str>,
) -> Stats {
    let find = |spec: catalog::InstrumentSpec| {
        let name = spec.exported_name(namespace);
        families.iter().find(|f| f.name() == name)
    };

    let mut by_status: BTreeMap<&'static str, u64> = DispatchStatus::ALL
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    for metric in find(catalog::DISPATCH_MESSAGES)
        .map(|f| f.get_metric())
        .unwrap_or_default()
    {
        if let Some(status) = label_value(metric, label::STATUS) {
            if let Some(count) = DispatchStatus::ALL
                .iter()
                .find(|s| s.as_str() == status)
                .and_then(|s| by_status.get_mut(s.as_str()))
            {
                *count += metric.counter.value() as u64;
            }
        }
    }
    let total_messages: u64 = by_status.values().sum();
    let count = |status: DispatchStatus| by_status.get(status.as_str()).copied().unwrap_or(0);
    let success = count(DispatchStatus::Success);
    let errors: u64 = DispatchStatus::ALL
        .into_iter()
        .filter(|s| s.is_error())
        .map(count)
        .sum();
    let refusals: u64 = DispatchStatus::ALL
        .into_iter()
        .filter(|s| s.is_refusal())
        .map(count)
        .sum();

    let durations = find(catalog::DISPATCH_DURATION)
        .map(|f| f.get_metric())
        .unwrap_or_default();
    let merged = Merged::of(durations.iter());
    let latency_ms = Latency {
        avg: merged.average().map(to_ms),
        p50: merged.quantile(0.50).map(to_ms),
        p95: merged.quantile(0.95).map(to_ms),
        p99: merged.quantile(0.99).map(to_ms),
    };

    let executions = find(catalog::DISPATCHER_EXECUTIONS)
        .map(|f| f.get_metric())
        .unwrap_or_default();
    let execution_durations = find(catalog::DISPATCHER_EXECUTION_DURATION)
        .map(|f| f.get_metric())
        .unwrap_or_default();
    let dispatchers = dispatcher_ids
        .into_iter()
        .map(|id| {
            let mut counts = [0u64; ExecutionResult::ALL.len()];
            for metric in executions
                .iter()
                .filter(|m| label_value(m, label::DISPATCHER_ID) == Some(id))
            {
                if let Some(i) = label_value(metric, label::RESULT)
                    .and_then(|r| ExecutionResult::ALL.iter().position(|e| e.as_str() == r))
                {
                    counts[i] += metric.counter.value() as u64;
                }
            }
            let [success, error, timeout, rejected, denied, skipped] = counts;
            let execution_count = success + error + timeout;
            let latency = Merged::of(
                execution_durations
                    .iter()
                    .filter(|m| label_value(m, label::DISPATCHER_ID) == Some(id)),
            );
            DispatcherStats {
                dispatcher_id: id.to_owned(),
                execution_count,
                error_count: error + timeout,
                timeout_count: timeout,
                rejected_count: rejected,
                denied_count: denied,
                skipped_count: skipped,
                error_rate: ratio(error + timeout, execution_count),
                avg_latency_ms: latency.average().map(to_ms),
            }
        })
        .collect();

    Stats {
        total_messages,
        by_status,
        success_rate: ratio(success, total_messages),
        error_rate: ratio(errors, total_messages),
        refusal_rate: ratio(refusals, total_messages),
        latency_ms,
        dispatchers,
    }
}

/// The value of label `name` of a gathered series (the stats API and the status page read them).
pub fn label_value<'m>(metric: &'m Metric, name: &str) -> Option<&'m str> {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn to_ms(seconds: f64) -> f64 {
    seconds * 1_000.0
}

/// Histogram series summed into one: cumulative counts per upper bound, the sum and the count.
#[derive(Debug, Default)]
struct Merged {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl Merged {
    fn of<'m>(series: impl Iterator<Item = &'m Metric>) -> Merged {
        let mut merged = Merged::default();
        for metric in series {
            let histogram = metric.get_histogram();
            merged.sum += histogram.sample_sum();
            merged.count += histogram.sample_count();
            for (i, bucket) in histogram.get_bucket().iter().enumerate() {
                match merged.buckets.get_mut(i) {
                    Some((_, count)) => *count += bucket.cumulative_count(),
                    None => merged
                        .buckets
                        .push((bucket.upper_bound(), bucket.cumulative_count())),
                }
            }
        }
        merged
    }

    fn average(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// As `histogram_quantile`: the bucket holding the rank, interpolated linearly; past the
    /// last finite bound, that bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for &(upper_bound, count) in &self.buckets {
            if count as f64 >= rank {
                let in_bucket = (count - lower_count) as f64;
                let position = if in_bucket > 0.0 {
                    (rank - lower_count as f64) / in_bucket
                } else {
                    1.0
                };
                return Some(lower_bound + (upper_bound - lower_bound) * position);
            }
            lower_bound = upper_bound;
            lower_count = count;
        }
        // Above every finite bucket (the +Inf bucket is implicit in the text model).
        Some(lower_bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(buckets: &[(f64, u64)], count: u64, sum: f64) -> Merged {
        Merged {
            buckets: buckets.to_vec(),
            sum,
            count,
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        // 100 observations: 50 in (0, 0.1], 40 in (0.1, 0.2], 10 in (0.2, 0.4].
        let h = merged(&[(0.1, 50), (0.2, 90), (0.4, 100)], 100, 12.0);
        assert_eq!(h.quantile(0.5), Some(0.1));
        assert!((h.quantile(0.7).unwrap() - 0.15).abs() < 1e-12);
        assert!((h.quantile(0.95).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(h.average(), Some(0.12));
    }

    #[test]
    fn observations_past_the_last_bucket_report_the_last_bound() {
        let h = merged(&[(0.1, 0), (10.0, 1)], 3, 90.0);
        assert_eq!(h.quantile(0.99), Some(10.0));
    }

    #[test]
    fn no_observations_means_no_numbers() {
        let h = Merged::default();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.average(), None);
        assert_eq!(ratio(0, 0), None);
    }
}
