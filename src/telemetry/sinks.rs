//! The event pipeline's metrics, fed through `SinkObserver`, and those of the appended files.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};

use super::catalog::{self, label};
use super::engine::{counter, histogram};
use crate::appender::{FileKind, FileObserver};
use crate::bus::BusObserver;
use crate::bus::redis::Backlog;
use crate::sinks::{Outcome, SinkObserver};

/// `sink_events_total`, `sink_batch_size`, `sink_request_duration_seconds`, `sink_queue_depth`.
pub struct SinkMetrics {
    events: Counter<u64>,
    batch_size: Histogram<f64>,
    request_duration: Histogram<f64>,
    queue_depth: Gauge<f64>,
    files: Arc<FileMetrics>,
}

impl SinkMetrics {
    pub fn new(meter: &Meter) -> SinkMetrics {
        let depth = catalog::SINK_QUEUE_DEPTH;
        SinkMetrics {
            events: counter(meter, catalog::SINK_EVENTS),
            batch_size: histogram(meter, catalog::SINK_BATCH_SIZE),
            request_duration: histogram(meter, catalog::SINK_REQUEST_DURATION),
            queue_depth: meter
                .f64_gauge(depth.name)
                .with_description(depth.description)
                .with_unit(depth.unit)
                .build(),
            files: Arc::new(FileMetrics::new(meter)),
        }
    }
}

fn sink(name: &str) -> KeyValue {
    KeyValue::new(label::SINK, super::shared(name))
}

impl SinkObserver for SinkMetrics {
    fn events(&self, name: &str, outcome: Outcome, count: u64) {
        self.events.add(
            count,
            &[sink(name), KeyValue::new(label::OUTCOME, outcome.as_str())],
        );
    }

    fn batch(&self, name: &str, size: usize) {
        self.batch_size.record(size as f64, &[sink(name)]);
    }

    fn request(&self, name: &str, status_family: &str, elapsed: Duration) {
        self.request_duration.record(
            elapsed.as_secs_f64(),
            &[
                sink(name),
                KeyValue::new(label::STATUS_FAMILY, super::shared(status_family)),
            ],
        );
    }

    fn queue_depth(&self, name: &str, depth: usize) {
        self.queue_depth.record(depth as f64, &[sink(name)]);
    }

    fn file_observer(&self) -> Option<Arc<dyn FileObserver>> {
        Some(self.files.clone())
    }
}

/// `file_torn_tails_total` and `file_slow_writes_total`.
pub struct FileMetrics {
    torn_tails: Counter<u64>,
    slow_writes: Counter<u64>,
}

impl FileMetrics {
    pub fn new(meter: &Meter) -> FileMetrics {
        FileMetrics {
            torn_tails: counter(meter, catalog::FILE_TORN_TAILS),
            slow_writes: counter(meter, catalog::FILE_SLOW_WRITES),
        }
    }
}

impl FileObserver for FileMetrics {
    fn appending(&self, kind: FileKind) {
        let kind = [KeyValue::new(label::FILE_KIND, kind.as_str())];
        self.torn_tails.add(0, &kind);
        self.slow_writes.add(0, &kind);
    }

    fn torn_tail(&self, kind: FileKind, _bytes: u64) {
        self.torn_tails
            .add(1, &[KeyValue::new(label::FILE_KIND, kind.as_str())]);
    }

    fn slow_write(&self, kind: FileKind) {
        self.slow_writes
            .add(1, &[KeyValue::new(label::FILE_KIND, kind.as_str())]);
    }
}

/// The consumers' backlogs as last read, by (stream, group): what the backlog gauges report at
/// scrape time.
type Backlogs = Arc<Mutex<BTreeMap<(String, String), Backlog>>>;

/// `bus_redis_pending_entries`, `bus_redis_consumer_lag`,
/// `bus_redis_oldest_undelivered_age_seconds`, `bus_redis_reconnects_total`,
/// `bus_redis_events_total`, `bus_redis_read_errors_total`,
/// `bus_redis_group_recreated_total`, `bus_redis_unreadable_entries_total`,
/// `bus_redis_ack_errors_total` and `bus_redis_abandoned_entries_total`.
///
/// The backlog gauges are observable: each scrape reads the values the consumers' backlog tasks
/// last stored (at most about a second old), never Redis itself, so a scrape never waits for
/// Redis. Build it once per meter ([`super::Telemetry::bus_metrics`] does): each build registers
/// the gauges' callbacks.
pub struct BusMetrics {
    backlogs: Backlogs,
    reconnects: Counter<u64>,
    events: Counter<u64>,
    read_errors: Counter<u64>,
    recreated: Counter<u64>,
    unreadable: Counter<u64>,
    ack_errors: Counter<u64>,
    abandoned: Counter<u64>,
}

impl BusMetrics {
    pub fn new(meter: &Meter) -> BusMetrics {
        let backlogs: Backlogs = Arc::default();
        let gauge = |spec: catalog::InstrumentSpec, value: fn(&Backlog) -> Option<u64>| {
            let backlogs = backlogs.clone();
            // The instrument lives as long as the provider, which keeps its callback.
            let _ = meter
                .u64_observable_gauge(spec.name)
                .with_description(spec.description)
                .with_unit(spec.unit)
                .with_callback(move |observer| {
                    let Ok(backlogs) = backlogs.lock() else {
                        return;
                    };
                    for ((stream, group), backlog) in backlogs.iter() {
                        if let Some(value) = value(backlog) {
                            observer.observe(value, &stream_group(stream, group));
                        }
                    }
                })
                .build();
        };
        gauge(catalog::BUS_PENDING_ENTRIES, |b| Some(b.pending));
        gauge(catalog::BUS_CONSUMER_LAG, |b| b.lag);
        let spec = catalog::BUS_UNDELIVERED_AGE;
        let ages = backlogs.clone();
        let _ = meter
            .f64_observable_gauge(spec.name)
            .with_description(spec.description)
            .with_unit(spec.unit)
            .with_callback(move |observer| {
                let Ok(backlogs) = ages.lock() else {
                    return;
                };
                for ((stream, group), backlog) in backlogs.iter() {
                    if let Some(age) = backlog.undelivered_age {
                        observer.observe(age.as_secs_f64(), &stream_group(stream, group));
                    }
                }
            })
            .build();
        BusMetrics {
            backlogs,
            reconnects: counter(meter, catalog::BUS_RECONNECTS),
            events: counter(meter, catalog::BUS_EVENTS),
            read_errors: counter(meter, catalog::BUS_READ_ERRORS),
            recreated: counter(meter, catalog::BUS_GROUP_RECREATED),
            unreadable: counter(meter, catalog::BUS_UNREADABLE),
            ack_errors: counter(meter, catalog::BUS_ACK_ERRORS),
            abandoned: counter(meter, catalog::BUS_ABANDONED),
        }
    }
}

fn stream_group(stream: &str, group: &str) -> [KeyValue; 2] {
    [
        KeyValue::new(label::STREAM, super::shared(stream)),
        KeyValue::new(label::GROUP, super::shared(group)),
    ]
}

impl BusObserver for BusMetrics {
    fn backlog(&self, stream: &str, group: &str, backlog: Option<Backlog>) {
        let Ok(mut backlogs) = self.backlogs.lock() else {
            return;
        };
        let key = (stream.to_owned(), group.to_owned());
        match backlog {
            Some(backlog) => {
                backlogs.insert(key, backlog);
            }
            None => {
                backlogs.remove(&key);
            }
        }
    }

    fn reconnected(&self, stream: &str) {
        self.reconnects
            .add(1, &[KeyValue::new(label::STREAM, super::shared(stream))]);
    }

    fn published(&self, stream: &str, outcome: &'static str) {
        self.events.add(
            1,
            &[
                KeyValue::new(label::STREAM, super::shared(stream)),
                KeyValue::new(label::OUTCOME, outcome),
            ],
        );
    }

    fn consumer_started(&self, stream: &str, group: &str) {
        let labels = stream_group(stream, group);
        self.read_errors.add(0, &labels);
        self.recreated.add(0, &labels);
        self.unreadable.add(0, &labels);
        self.ack_errors.add(0, &labels);
        self.abandoned.add(0, &labels);
    }

    fn read_failed(&self, stream: &str, group: &str) {
        self.read_errors.add(1, &stream_group(stream, group));
    }

    fn group_recreated(&self, stream: &str, group: &str) {
        self.recreated.add(1, &stream_group(stream, group));
    }

    fn unreadable(&self, stream: &str, group: &str) {
        self.unreadable.add(1, &stream_group(stream, group));
    }

    fn ack_failed(&self, stream: &str, group: &str) {
        self.ack_errors.add(1, &stream_group(stream, group));
    }

    fn entries_abandoned(&self, stream: &str, group: &str, entries: u64) {
        self.abandoned.add(entries, &stream_group(stream, group));
    }
}
