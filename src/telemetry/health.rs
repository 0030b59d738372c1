//! Lifecycle and health metrics: counters fed by the registry's events, gauges read from the
//! registry at scrape time.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter, UpDownCounter};

use super::catalog::{self, InstrumentSpec, label};
use super::engine::counter;
use crate::health::{DispatcherHealth, HealthRegistry, LifecycleEvent, LifecycleObserver, Origin};

/// `dispatcher_active_total`, `dispatcher_heartbeat_total` and
/// `dispatcher_lifecycle_events_total`, recorded as the registry reports them.
pub struct LifecycleMetrics {
    active: UpDownCounter<i64>,
    heartbeats: Counter<u64>,
    events: Counter<u64>,
}

impl LifecycleMetrics {
    pub fn new(meter: &Meter) -> LifecycleMetrics {
        let spec = catalog::DISPATCHER_ACTIVE;
        LifecycleMetrics {
            active: meter
                .i64_up_down_counter(spec.name)
                .with_description(spec.description)
                .with_unit(spec.unit)
                .build(),
            heartbeats: counter(meter, catalog::DISPATCHER_HEARTBEAT),
            events: counter(meter, catalog::DISPATCHER_LIFECYCLE_EVENTS),
        }
    }
}

impl LifecycleObserver for LifecycleMetrics {
    fn on_event(&self, dispatcher_id: &str, event: LifecycleEvent) {
        self.events.add(
            1,
            &[
                KeyValue::new(label::DISPATCHER_ID, super::shared(dispatcher_id)),
                KeyValue::new(label::EVENT, event.as_str()),
            ],
        );
    }

    fn on_heartbeat(&self, dispatcher_id: &str) {
        self.heartbeats.add(
            1,
            &[KeyValue::new(
                label::DISPATCHER_ID,
                super::shared(dispatcher_id),
            )],
        );
    }

    fn on_active(&self, dispatcher_id: &str, delta: i64) {
        self.active.add(
            delta,
            &[KeyValue::new(
                label::DISPATCHER_ID,
                super::shared(dispatcher_id),
            )],
        );
    }
}

/// Registers the observable gauges over `registry`: each scrape reads every dispatcher's health
/// then, so the values are never older than the scrape, reading them changes nothing, and an
/// unregistered dispatcher's series are simply not observed any more.
pub(super) fn observe(meter: &Meter, registry: &HealthRegistry) {
    gauge(meter, catalog::DISPATCHER_UPTIME, registry, |h| {
        (h.uptime_seconds, None)
    });
    gauge(meter, catalog::DISPATCHER_HEALTH_STATUS, registry, |h| {
        (
            if h.healthy { 1.0 } else { 0.0 },
            Some([
                KeyValue::new(label::IS_STALE, if h.is_stale { "true" } else { "false" }),
                KeyValue::new(
                    label::ORIGIN,
                    match h.origin {
                        Origin::InProcess => "in_process",
                        Origin::Remote => "remote",
                    },
                ),
            ]),
        )
    });
    gauge(meter, catalog::DISPATCHER_HEARTBEAT_AGE, registry, |h| {
        (h.heartbeat_age_seconds, None)
    });
    gauge(
        meter,
        catalog::DISPATCHER_CONSECUTIVE_FAILURES,
        registry,
        |h| (f64::from(h.consecutive_failures), None),
    );
    let spec = catalog::DISPATCHER_REGISTRY_UP;
    let registry = registry.clone();
    let _ = meter
        .f64_observable_gauge(spec.name)
        .with_description(spec.description)
        .with_unit(spec.unit)
        .with_callback(move |observer| {
            if let Some(up) = registry.store_available() {
                observer.observe(if up { 1.0 } else { 0.0 }, &[]);
            }
        })
        .build();
}

fn gauge(
    meter: &Meter,
    spec: InstrumentSpec,
    registry: &HealthRegistry,
    value: impl Fn(&DispatcherHealth) -> (f64, Option<[KeyValue; 2]>) + Send + Sync + 'static,
) {
    let registry = registry.clone();
    let value = Arc::new(value);
    // The instrument lives as long as the provider, which keeps the callback.
    let _ = meter
        .f64_observable_gauge(spec.name)
        .with_description(spec.description)
        .with_unit(spec.unit)
        .with_callback(move |observer| {
            for health in registry.all() {
                let (measurement, extra) = value(&health);
                let id = KeyValue::new(label::DISPATCHER_ID, health.dispatcher_id);
                match extra {
                    Some([a, b]) => observer.observe(measurement, &[id, a, b]),
                    None => observer.observe(measurement, &[id]),
                }
            }
        })
        .build();
}
