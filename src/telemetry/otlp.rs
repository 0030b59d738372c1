//! OTLP export failures, per signal: counted (`otlp_exports_failed_total{signal}`) and logged at
//! most once a minute per signal, with how many failed since the last such line.
//!
//! The SDK reports a failed export only in its own log, once per request (a warning from the
//! exporter's retry loop, an error from the periodic metric reader): a collector that is down
//! would write a line every second, and no metric would show it. Our span processor checks each
//! export's result itself, and the metrics exporter is wrapped ([`CountingExporter`]) to do the
//! same; the SDK's per-request lines are left out of the log ([`is_sdk_export_failure`]).
//!
//! Process-wide, like the tracer provider and its export thread: every exporter of a signal in
//! the process counts into the same counter.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;

/// What is exported over OTLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    pub const ALL: [Signal; 2] = [Signal::Traces, Signal::Metrics];

    /// The `signal` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }
}

/// At most one failure line per signal in this long.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// One signal's failed exports.
#[derive(Debug)]
pub struct ExportFailures {
    signal: Signal,
    failed: AtomicU64,
    log: Mutex<LogWindow>,
}

static TRACES: ExportFailures = ExportFailures::new(Signal::Traces);
static METRICS: ExportFailures = ExportFailures::new(Signal::Metrics);

/// The process's failed exports of `signal`.
pub fn failures(signal: Signal) -> &'static ExportFailures {
    match signal {
        Signal::Traces => &TRACES,
        Signal::Metrics => &METRICS,
    }
}

impl ExportFailures {
    const fn new(signal: Signal) -> ExportFailures {
        ExportFailures {
            signal,
            failed: AtomicU64::new(0),
            log: Mutex::new(LogWindow::new()),
        }
    }

    /// Export requests that failed since the process started.
    pub fn count(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records one export's result: a failure is counted, and logged when no failure of this
    /// signal was logged in the last minute; the first success after logged failures says so.
    pub fn record(&self, result: &OTelSdkResult) {
        let signal = self.signal.as_str();
        let Ok(mut log) = self.log.lock() else {
            return;
        };
        match result {
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(failed) = log.failed(Instant::now()) {
                    tracing::warn!(signal, failed, %error, "Exporting to the OTLP collector failed: its data is lost. `failed` counts the failures since the last such line (at most one a minute per signal; all are in otlp_exports_failed_total).");
                }
            }
            Ok(()) => {
                if log.succeeded() {
                    tracing::info!(signal, "Exporting to the OTLP collector works again.");
                }
            }
        }
    }
}

/// When to log: the first failure, then at most one line per [`LOG_EVERY`], each carrying the
/// failures since the previous one.
#[derive(Debug)]
struct LogWindow {
    last_logged: Option<Instant>,
    /// Failures since the last line, this one excluded.
    unlogged: u64,
    /// A failure was logged and no success since: the next success is worth a line.
    failing: bool,
}

impl LogWindow {
    const fn new() -> LogWindow {
        LogWindow {
            last_logged: None,
            unlogged: 0,
            failing: false,
        }
    }

    /// A failure at `now`: `Some(failures since the last line, this one included)` when it is
    /// time for a line.
    fn failed(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= LOG_EVERY);
        if !due {
            self.unlogged += 1;
            return None;
        }
        let failed = self.unlogged + 1;
        self.unlogged = 0;
        self.last_logged = Some(now);
        self.failing = true;
        Some(failed)
    }

    /// A success: `true` once after failures were logged (a flapping collector gets at most one
    /// such line per failure line).
    fn succeeded(&mut self) -> bool {
        std::mem::replace(&mut self.failing, false)
    }
}

/// Whether a log event is one of the SDK's per-request export failure reports, which
/// [`ExportFailures`] replaces with a counted, rate-limited line.
pub fn is_sdk_export_failure(metadata: &tracing::Metadata<'_>) -> bool {
    match metadata.target() {
        "opentelemetry-otlp" => metadata.name().starts_with("Export.Failed"),
        "opentelemetry_sdk" => metadata.name() == "PeriodicReader.ExportError",
        _ => false,
    }
}

/// A metrics exporter that records each export's result in [`failures`]`(Signal::Metrics)`
/// and otherwise is the exporter it wraps.
#[derive(Debug)]
pub struct CountingExporter<E>(pub E);

impl<E: PushMetricExporter> PushMetricExporter for CountingExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.0.export(metrics).await;
        failures(Signal::Metrics).record(&result);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.0.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_logged_then_at_most_one_line_a_minute_with_the_count() {
        let mut log = LogWindow::new();
        let start = Instant::now();
        assert_eq!(log.failed(start), Some(1));
        for second in 1..60 {
            assert_eq!(log.failed(start + Duration::from_secs(second)), None);
        }
        // 59 unlogged, and this one.
        assert_eq!(log.failed(start + LOG_EVERY), Some(60));
        assert_eq!(log.failed(start + LOG_EVERY + Duration::from_secs(1)), None);
        assert_eq!(log.failed(start + 2 * LOG_EVERY), Some(2));
    }

    #[test]
    fn recovery_is_logged_once_after_logged_failures() {
        let mut log = LogWindow::new();
        assert!(!log.succeeded(), "nothing failed");
        let start = Instant::now();
        assert_eq!(log.failed(start), Some(1));
        assert!(log.succeeded());
        assert!(!log.succeeded(), "once");
        // A flapping collector: the failure within the minute is not logged, nor its recovery.
        assert_eq!(log.failed(start + Duration::from_secs(1)), None);
        assert!(!log.succeeded());
        assert_eq!(log.failed(start + LOG_EVERY), Some(2));
        assert!(log.succeeded());
    }

    #[test]
    fn failures_are_counted_per_signal() {
        let before = (
            failures(Signal::Traces).count(),
            failures(Signal::Metrics).count(),
        );
        failures(Signal::Metrics).record(&Err(
            opentelemetry_sdk::error::OTelSdkError::InternalFailure("refused".into()),
        ));
        failures(Signal::Metrics).record(&Ok(()));
        assert_eq!(failures(Signal::Metrics).count(), before.1 + 1);
        assert!(failures(Signal::Traces).count() >= before.0);
    }
}
