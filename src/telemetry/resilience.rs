//! The protections' metrics, fed through `ResilienceObserver`.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};

use super::catalog::{self, InstrumentSpec, label};
use super::engine::{counter, histogram};
use crate::resilience::{
    BreakerState, CacheOperation, CacheResult, ClusterProtection, ResilienceObserver,
};

/// Breaker, rate limiter, retry and cache metrics. State changes are rare next to dispatches, so
/// these record unbound, with attributes in the catalog's fixed order.
pub struct ResilienceMetrics {
    breaker_state: Gauge<f64>,
    breaker_trips: Counter<u64>,
    rate_limiter_delay: Histogram<f64>,
    retries: Counter<u64>,
    cluster_fallbacks: Counter<u64>,
    cache_operations: Counter<u64>,
    cache_hit_ratio: Gauge<f64>,
}

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
        }
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
        self.cache_operations.add(
            1,
            &[
                KeyValue::new(label::CACHE, cache.to_owned()),
                KeyValue::new(label::OPERATION, operation.as_str()),
                KeyValue::new(label::RESULT, result.as_str()),
            ],
        );
    }

    fn cache_hit_ratio(&self, cache: &str, ratio: f64) {
        self.cache_hit_ratio
            .record(ratio, &[KeyValue::new(label::CACHE, cache.to_owned())]);
    }
}
