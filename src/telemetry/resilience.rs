//! The protections' metrics, fed through `ResilienceObserver`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundGauge, Counter, Gauge, Histogram, Meter};
use parking_lot::RwLock;

use super::catalog::{self, InstrumentSpec, label};
use super::engine::{counter, histogram};
use crate::resilience::{
    BreakerState, CacheObserver, CacheOperation, CacheResult, ClusterProtection, ResilienceObserver,
};

/// Breaker, rate limiter, retry and cache metrics. State changes are rare next to dispatches, so
/// these record unbound, with attributes in the catalog's fixed order; the caches' metrics,
/// recorded twice per dispatch through a dedup cache, are bound once per cache name.
pub struct ResilienceMetrics {
    breaker_state: Gauge<f64>,
    breaker_trips: Counter<u64>,
    rate_limiter_delay: Histogram<f64>,
    retries: Counter<u64>,
    cluster_fallbacks: Counter<u64>,
    cache_operations: Counter<u64>,
    cache_hit_ratio: Gauge<f64>,
    caches: RwLock<HashMap<String, Arc<CacheInstruments>>>,
}

/// One cache's bound instruments: `dispatcher_cache_operations_total` by (operation, result),
/// in [`OPERATIONS`]' order, and its hit ratio.
struct CacheInstruments {
    operations: [BoundCounter<u64>; OPERATIONS.len()],
    hit_ratio: BoundGauge<f64>,
    /// For a pair [`OPERATIONS`] lacks: the unbound counter and this cache's label.
    unbound: Counter<u64>,
    name: KeyValue,
}

impl CacheObserver for CacheInstruments {
    fn operation(&self, operation: CacheOperation, result: CacheResult) {
        match OPERATIONS.iter().position(|o| *o == (operation, result)) {
            Some(index) => self.operations[index].add(1),
            // A pair no cache reports today: recorded unbound all the same.
            None => self.unbound.add(
                1,
                &[
                    self.name.clone(),
                    KeyValue::new(label::OPERATION, operation.as_str()),
                    KeyValue::new(label::RESULT, result.as_str()),
                ],
            ),
        }
    }

    fn hit_ratio(&self, ratio: f64) {
        self.hit_ratio.record(ratio);
    }
}

/// Every (operation, result) a cache reports.
const OPERATIONS: [(CacheOperation, CacheResult); 5] = [
    (CacheOperation::Get, CacheResult::Hit),
    (CacheOperation::Get, CacheResult::Miss),
    (CacheOperation::Set, CacheResult::None),
    (CacheOperation::Invalidate, CacheResult::None),
    (CacheOperation::Expire, CacheResult::None),
];

fn gauge(meter: &Meter, spec: InstrumentSpec) -> Gauge<f64> {
    meter
        .f64_gauge(spec.name)
        .with_description(spec.description)
        .with_unit(spec.unit)
        .build()
}

impl ResilienceMetrics {
    pub fn new(meter: &Meter) -> ResilienceMetrics {
        ResilienceMetrics {
            breaker_state: gauge(meter, catalog::DISPATCHER_CIRCUIT_BREAKER_STATE),
            breaker_trips: counter(meter, catalog::DISPATCHER_CIRCUIT_BREAKER_TRIPS),
            rate_limiter_delay: histogram(meter, catalog::DISPATCHER_RATE_LIMITER_DELAY),
            retries: counter(meter, catalog::DISPATCHER_RETRIES),
            cluster_fallbacks: counter(meter, catalog::DISPATCHER_CLUSTER_FALLBACKS),
            cache_operations: counter(meter, catalog::DISPATCHER_CACHE_OPERATIONS),
            cache_hit_ratio: gauge(meter, catalog::DISPATCHER_CACHE_HIT_RATIO),
            caches: RwLock::new(HashMap::new()),
        }
    }

    /// `cache`'s bound instruments, bound on first use.
    fn instruments(&self, cache: &str) -> Arc<CacheInstruments> {
        if let Some(found) = self.caches.read().get(cache) {
            return found.clone();
        }
        let name = KeyValue::new(label::CACHE, super::shared(cache));
        self.caches
            .write()
            .entry(cache.to_owned())
            .or_insert_with(|| {
                Arc::new(CacheInstruments {
                    operations: OPERATIONS.map(|(operation, result)| {
                        self.cache_operations.bind(&[
                            name.clone(),
                            KeyValue::new(label::OPERATION, operation.as_str()),
                            KeyValue::new(label::RESULT, result.as_str()),
                        ])
                    }),
                    hit_ratio: self.cache_hit_ratio.bind(std::slice::from_ref(&name)),
                    unbound: self.cache_operations.clone(),
                    name,
                })
            })
            .clone()
    }
}

fn id(dispatcher_id: &str) -> [KeyValue; 1] {
    [KeyValue::new(
        label::DISPATCHER_ID,
        dispatcher_id.to_owned(),
    )]
}

impl ResilienceObserver for ResilienceMetrics {
    fn breaker_state(&self, dispatcher_id: &str, state: BreakerState) {
        self.breaker_state
            .record(state.gauge_value(), &id(dispatcher_id));
    }

    fn breaker_tripped(&self, dispatcher_id: &str) {
        self.breaker_trips.add(1, &id(dispatcher_id));
    }

    fn rate_limit_delay(&self, dispatcher_id: &str, delay: Duration) {
        self.rate_limiter_delay
            .record(delay.as_secs_f64(), &id(dispatcher_id));
    }

    fn retried(&self, dispatcher_id: &str) {
        self.retries.add(1, &id(dispatcher_id));
    }

    fn cluster_scoped(&self, dispatcher_id: &str, protection: ClusterProtection) {
        self.cluster_fallbacks.add(
            0,
            &[
                KeyValue::new(label::DISPATCHER_ID, dispatcher_id.to_owned()),
                KeyValue::new(label::PROTECTION, protection.as_str()),
            ],
        );
    }

    fn cluster_fallback(&self, dispatcher_id: &str, protection: ClusterProtection) {
        self.cluster_fallbacks.add(
            1,
            &[
                KeyValue::new(label::DISPATCHER_ID, dispatcher_id.to_owned()),
                KeyValue::new(label::PROTECTION, protection.as_str()),
            ],
        );
    }

    fn cache_operation(&self, cache: &str, operation: CacheOperation, result: CacheResult) {
        self.instruments(cache).operation(operation, result);
    }

    fn cache_hit_ratio(&self, cache: &str, ratio: f64) {
        self.instruments(cache).hit_ratio(ratio);
    }

    /// The cache's bound instruments themselves: a dedup cache records through them with no
    /// lookup by name.
    fn cache(&self, cache: &str) -> Option<Arc<dyn CacheObserver>> {
        Some(self.instruments(cache))
    }
}
