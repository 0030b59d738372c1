//! The event pipeline's metrics, fed through `SinkObserver`, and those of the appended files.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};

use super::catalog::{self, label};
use super::engine::{counter, histogram};
use crate::appender::{FileKind, FileObserver};
use crate::sinks::service::BusObserver;
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
                .build(),
            files: Arc::new(FileMetrics::new(meter)),
        }
    }
}

fn sink(name: &str) -> KeyValue {
    KeyValue::new(label::SINK, name.to_owned())
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
                KeyValue::new(label::STATUS_FAMILY, status_family.to_owned()),
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

/// `file_torn_tails_total`.
pub struct FileMetrics {
    torn_tails: Counter<u64>,
}

impl FileMetrics {
    pub fn new(meter: &Meter) -> FileMetrics {
        FileMetrics {
            torn_tails: counter(meter, catalog::FILE_TORN_TAILS),
        }
    }
}

impl FileObserver for FileMetrics {
    fn torn_tail(&self, kind: FileKind, _bytes: u64) {
        self.torn_tails
            .add(1, &[KeyValue::new(label::FILE_KIND, kind.as_str())]);
    }
}

/// `bus_redis_pending_entries`, `bus_redis_consumer_lag`, `bus_redis_reconnects_total` and
/// `bus_redis_events_total`.
pub struct BusMetrics {
    pending: Gauge<f64>,
    lag: Gauge<f64>,
    reconnects: Counter<u64>,
    events: Counter<u64>,
}

impl BusMetrics {
    pub fn new(meter: &Meter) -> BusMetrics {
        let gauge = |spec: catalog::InstrumentSpec| {
            meter
                .f64_gauge(spec.name)
                .with_description(spec.description)
                .build()
        };
        BusMetrics {
            pending: gauge(catalog::BUS_PENDING_ENTRIES),
            lag: gauge(catalog::BUS_CONSUMER_LAG),
            reconnects: counter(meter, catalog::BUS_RECONNECTS),
            events: counter(meter, catalog::BUS_EVENTS),
        }
    }
}

impl BusObserver for BusMetrics {
    fn backlog(&self, stream: &str, group: &str, pending: u64, lag: Option<u64>) {
        let attributes = [
            KeyValue::new(label::STREAM, stream.to_owned()),
            KeyValue::new(label::GROUP, group.to_owned()),
        ];
        self.pending.record(pending as f64, &attributes);
        if let Some(lag) = lag {
            self.lag.record(lag as f64, &attributes);
        }
    }

    fn reconnected(&self, stream: &str) {
        self.reconnects
            .add(1, &[KeyValue::new(label::STREAM, stream.to_owned())]);
    }

    fn published(&self, stream: &str, outcome: &'static str) {
        self.events.add(
            1,
            &[
                KeyValue::new(label::STREAM, stream.to_owned()),
                KeyValue::new(label::OUTCOME, outcome),
            ],
        );
    }
}
