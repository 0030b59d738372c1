//! Per-thread counts for the dispatch path: `dispatch_messages_total` and
//! `dispatcher_executions_total` ([`Counts`], which observable counters report) and the latency
//! histograms `dispatch_duration_seconds` and `dispatcher_execution_duration_seconds`
//! ([`LatencyHistogram`], which the scrape reads itself).
//!
//! Why per thread: an atomic add shared by threads is a locked instruction (about 20 cycles
//! even when no other core holds the line, and a trip between cores when one does), and a
//! dispatch made four of them. Here each thread has a stripe of its own
//! (`thread_local::ThreadLocal`: a thread's stripe is found from its thread id; a thread that
//! starts after another ended takes over the ended one's id and stripe), on cache lines of its
//! own, and adds with a plain load and store. A reader adds the stripes up.
//!
//! Why our own histograms: a record into the SDK's (0.33) bound histogram is a call through its
//! list of measures, the bucket search, and a mutex around the bucket update (a lock and an
//! unlock): about 30 ns, and a dispatch makes two (`docs/benchmarks.md`). OpenTelemetry has no
//! observable histogram and the SDK has no way for anything else to feed its readers, so
//! [`super::scrape`] writes these beside the SDK's families on `/metrics`, and the strategy
//! records into the SDK's histograms as well only when a reader other than `/metrics` exists
//! (OTLP), which then pays the SDK's price. Written by hand because no crate of the field does
//! this: the `prometheus` crate's histogram takes locked instructions per observation and would
//! bypass the naming and the exporter rules `/metrics` follows; this is the bucket array and
//! little else.
//!
//! Invariants: a stripe has one writer, its thread: a count is a load and a store, a record the
//! bucket search and two of each; no locked instruction, no lock, no allocation after a thread's
//! first use. Buckets are the SDK's: a value equal to a bound counts in that bound's bucket
//! (`le`), NaN and infinities are ignored. From one thread, the sum is added in the order of
//! the records, as the SDK adds it, so the two agree to the bit (a test holds `/metrics` to
//! opentelemetry-prometheus byte for byte). A reader does not stop writers: while a record is
//! under way it may see the record's count and not yet its sum; counts never go back.
//!
//! Must not: be written from a thread-local destructor that runs after the thread id's own (the
//! crate panics there). The engine records from tasks and calls, never from one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_utils::CachePadded;
use thread_local::ThreadLocal;

use super::catalog::LATENCY_BUCKETS;
use super::scrape::HistogramPoint;

/// Buckets per stripe: one per bound, and the one above the last bound.
const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// `N` counters, each thread adding to its own stripe.
pub(crate) struct Counts<const N: usize> {
    stripes: ThreadLocal<CachePadded<[AtomicU64; N]>>,
}

impl<const N: usize> Default for Counts<N> {
    fn default() -> Counts<N> {
        Counts {
            stripes: ThreadLocal::new(),
        }
    }
}

impl<const N: usize> Counts<N> {
    /// Adds one to counter `index` (below `N`).
    #[inline]
    pub(crate) fn add_one(&self, index: usize) {
        let stripe = self.stripes.get().unwrap_or_else(|| self.first_stripe());
        // This thread is the stripe's only writer.
        let count = &stripe[index];
        count.store(count.load(Relaxed) + 1, Relaxed);
    }

    #[cold]
    #[inline(never)]
    fn first_stripe(&self) -> &CachePadded<[AtomicU64; N]> {
        self.stripes
            .get_or(|| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
    }

    /// Every counter's total, in index order.
    pub(crate) fn totals(&self) -> [u64; N] {
        let mut totals = [0; N];
        for stripe in self.stripes.iter() {
            for (total, count) in totals.iter_mut().zip(stripe.iter()) {
                *total += count.load(Relaxed);
            }
        }
        totals
    }
}

/// One thread's counts. Atomics only so that a scrape may read them while the thread writes.
#[derive(Default)]
struct Stripe {
    counts: [AtomicU64; BUCKETS],
    /// An `f64`'s bits.
    sum: AtomicU64,
}

/// A histogram over [`LATENCY_BUCKETS`], in seconds.
#[derive(Default)]
pub(crate) struct LatencyHistogram {
    stripes: ThreadLocal<CachePadded<Stripe>>,
}

impl LatencyHistogram {
    pub(crate) fn new() -> LatencyHistogram {
        LatencyHistogram::default()
    }

    /// Counts one observation of `seconds`.
    #[inline]
    pub(crate) fn record(&self, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        let bucket = bucket(seconds);
        let stripe = self.stripes.get().unwrap_or_else(|| self.first_stripe());
        // This thread is the stripe's only writer: a load and a store, where a read-modify-write
        // would be a locked instruction (about 20 cycles each).
        let count = &stripe.counts[bucket];
        count.store(count.load(Relaxed) + 1, Relaxed);
        let sum = f64::from_bits(stripe.sum.load(Relaxed)) + seconds;
        stripe.sum.store(sum.to_bits(), Relaxed);
    }

    /// This thread's stripe, made: once per thread, out of the way of the record's code.
    #[cold]
    #[inline(never)]
    fn first_stripe(&self) -> &CachePadded<Stripe> {
        self.stripes.get_or_default()
    }

    /// How many observations it counted.
    pub(crate) fn count(&self) -> u64 {
        self.stripes
            .iter()
            .flat_map(|stripe| &stripe.counts)
            .map(|count| count.load(Relaxed))
            .sum()
    }

    /// The histogram now: cumulative counts per bound (no `+Inf`, which is `count`), the sum and
    /// the count.
    pub(crate) fn point(&self) -> HistogramPoint {
        let mut counts = [0u64; BUCKETS];
        let mut sum = 0.0;
        for stripe in self.stripes.iter() {
            for (total, count) in counts.iter_mut().zip(&stripe.counts) {
                *total += count.load(Relaxed);
            }
            sum += f64::from_bits(stripe.sum.load(Relaxed));
        }
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(counts)
            .map(|(&bound, count)| {
                cumulative += count;
                (bound, cumulative)
            })
            .collect();
        HistogramPoint {
            buckets,
            sum,
            count: counts.iter().sum(),
        }
    }
}

/// The bucket of `seconds`: how many bounds are below it, as the SDK's binary search counts them.
/// Found from its binary exponent instead: no two bounds share a binade (each is at least twice
/// the last), so a table by exponent gives the bounds below the binade and the one bound inside
/// it, and one comparison settles it. A binary search is five loads and compares, each waiting
/// for the last.
#[inline]
fn bucket(seconds: f64) -> usize {
    // Zero, negative, or not above the first bound (NaN too): the first bucket.
    if seconds.partial_cmp(&LATENCY_BUCKETS[0]) != Some(std::cmp::Ordering::Greater) {
        return 0;
    }
    // At least the first bound's exponent, since `seconds` is above it.
    match BINADES.get((exponent(seconds) - FIRST_EXPONENT) as usize) {
        Some(binade) => binade.below + usize::from(binade.bound < seconds),
        None => LATENCY_BUCKETS.len(),
    }
}

/// The unbiased binary exponent of a positive finite `x`: 2^e ≤ x < 2^(e+1).
const fn exponent(x: f64) -> i32 {
    ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

const FIRST_EXPONENT: i32 = exponent(LATENCY_BUCKETS[0]);
const LAST_EXPONENT: i32 = exponent(LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1]);

#[derive(Clone, Copy)]
struct Binade {
    /// How many bounds are below the binade.
    below: usize,
    /// The bound inside it, or infinity.
    bound: f64,
}

/// Per binade from the first bound's to the last's.
const BINADES: [Binade; (LAST_EXPONENT - FIRST_EXPONENT + 1) as usize] = {
    let mut binades = [Binade {
        below: 0,
        bound: f64::INFINITY,
    }; (LAST_EXPONENT - FIRST_EXPONENT + 1) as usize];
    let mut i = 0;
    while i < binades.len() {
        let e = FIRST_EXPONENT + i as i32;
        let mut found = false;
        let mut j = 0;
        while j < LATENCY_BUCKETS.len() {
            let bound = LATENCY_BUCKETS[j];
            assert!(bound > 0.0 && (j == 0 || bound > LATENCY_BUCKETS[j - 1]));
            if exponent(bound) < e {
                binades[i].below += 1;
            } else if exponent(bound) == e {
                assert!(!found, "two latency bounds in one binade");
                found = true;
                binades[i].bound = bound;
            }
            j += 1;
        }
        i += 1;
    }
    binades
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_on_a_bound_counts_in_that_bounds_bucket_and_non_finite_values_are_ignored() {
        let histogram = LatencyHistogram::new();
        for value in [0.0, 0.000_01, 0.000_010_1, 0.001, 10.0, 11.0, 1e300] {
            histogram.record(value);
        }
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            histogram.record(value);
        }
        let point = histogram.point();
        assert_eq!(point.count, 7);
        let at = |bound: f64| {
            point
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, count)| *count)
                .unwrap()
        };
        // 0 and 10 µs in the first bucket; 10.1 µs in the next.
        assert_eq!(at(0.000_01), 2);
        assert_eq!(at(0.000_025), 3);
        assert_eq!(at(0.000_5), 3);
        assert_eq!(at(0.001), 4);
        assert_eq!(at(10.0), 5);
        assert_eq!(point.buckets.len(), LATENCY_BUCKETS.len());
        assert_eq!(
            point.sum,
            0.0 + 0.000_01 + 0.000_010_1 + 0.001 + 10.0 + 11.0 + 1e300
        );
    }

    #[test]
    fn the_bucket_is_the_binary_searchs() {
        let mut values: Vec<f64> = LATENCY_BUCKETS
            .iter()
            .flat_map(|&b| {
                let (below, above) = (
                    f64::from_bits(b.to_bits() - 1),
                    f64::from_bits(b.to_bits() + 1),
                );
                [b, below, above, b * 0.7, b * 1.3, b * 2.0, b * 0.5]
            })
            .collect();
        values.extend([
            0.0,
            -0.0,
            -1.0,
            f64::MIN_POSITIVE,
            5e-324,
            1e-300,
            7.6e-6,
            15.99,
            16.0,
            1e300,
            f64::MAX,
            -f64::MAX,
        ]);
        for n in 0..10_000 {
            values.push(f64::from(n) * 1.7e-5);
        }
        // And from 100 ns to 1,000 s, spread evenly over the decades.
        let mut rng = fastrand::Rng::with_seed(19);
        values.extend((0..100_000).map(|_| 10f64.powf(rng.f64() * 10.0 - 7.0)));
        for value in values {
            assert_eq!(
                bucket(value),
                LATENCY_BUCKETS.partition_point(|&bound| bound < value),
                "{value}"
            );
        }
    }

    #[test]
    fn records_from_many_threads_are_all_counted() {
        let histogram = LatencyHistogram::new();
        let threads = 8;
        let each = 20_000u64;
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let histogram = &histogram;
                scope.spawn(move || {
                    // Multiples of 1/8 add exactly, in any order.
                    let value = 0.125 * (thread % 3) as f64;
                    for _ in 0..each {
                        histogram.record(value);
                    }
                });
            }
        });
        let point = histogram.point();
        assert_eq!(point.count, threads * each);
        let expected: f64 = (0..threads).map(|t| 0.125 * (t % 3) as f64).sum::<f64>() * each as f64;
        assert_eq!(point.sum, expected);
        // 0 is under the first bound; 0.125 and 0.25 both under 0.25.
        assert_eq!(point.buckets[0].1, 3 * each);
        assert_eq!(point.buckets.last().unwrap().1, threads * each);
    }

    /// Threads that end give their stripe to the threads that start after them: nothing counted
    /// is lost, and a reader running beside the writers never sees a count go back.
    #[test]
    fn stripes_of_ended_threads_carry_on_and_a_reader_never_sees_counts_go_back() {
        let histogram = LatencyHistogram::new();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut last = 0;
                let mut reads = 0u64;
                while !done.load(Relaxed) || reads == 0 {
                    let count = histogram.point().count;
                    assert!(count >= last, "{count} after {last}");
                    last = count;
                    reads += 1;
                }
                reads
            });
            for _ in 0..5 {
                std::thread::scope(|round| {
                    for _ in 0..4 {
                        round.spawn(|| {
                            for _ in 0..5_000 {
                                // 2^-10: sums of it are exact.
                                histogram.record(0.000_976_562_5);
                            }
                        });
                    }
                });
            }
            done.store(true, Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        let point = histogram.point();
        assert_eq!(point.count, 5 * 4 * 5_000);
        assert_eq!(point.sum, 100_000.0 * 0.000_976_562_5);
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let counts = Counts::<3>::default();
        std::thread::scope(|scope| {
            for thread in 0..6 {
                let counts = &counts;
                scope.spawn(move || {
                    for _ in 0..10_000 {
                        counts.add_one(thread % 3);
                    }
                    counts.add_one(0);
                });
            }
        });
        assert_eq!(counts.totals(), [20_006, 20_000, 20_000]);
    }

    #[test]
    fn an_empty_histogram_reads_as_zeros() {
        let point = LatencyHistogram::new().point();
        assert_eq!(point.count, 0);
        assert_eq!(point.sum, 0.0);
        assert!(point.buckets.iter().all(|(_, count)| *count == 0));
    }
}
