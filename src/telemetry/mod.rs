//! Telemetry: the one place that builds the OpenTelemetry meter provider, declares every
//! instrument and renders `/metrics`.
//!
//! Owns: the `SdkMeterProvider` with a manual reader that belongs to this [`Telemetry`] (never a
//! global, so tests run in parallel), read at each scrape by [`scrape`] and written by
//! [`exposition`] in the 0.0.4 text (what opentelemetry-prometheus wrote, byte for byte) or in
//! OpenMetrics with the [`exemplars`] it keeps; the instrument [`catalog`], typed handles per
//! part ([`EngineMetrics`] through [`MetricsStrategy`], [`HttpMetrics`]), the cardinality limit
//! and its overflow signal, and the structured [`stats`] view.
//!
//! Invariants: instruments are created once, at build; recording goes through named methods
//! with attributes in a fixed order, and the dispatch path records into per-thread counts that
//! observable counters report and into latency histograms of our own ([`striped`]) that the
//! scrape writes beside the SDK's families (and, only when OTLP reads the SDK, into the SDK's
//! copies of them too).
//! Label values come from configuration or closed enums, never from a request.
//!
//! Must not: be required. With `metrics.enabled = false` no provider is built, no strategy is
//! installed and `/metrics` answers 404; if the exporter cannot be built, dispatchd still serves
//! and `/metrics` answers 503.

pub mod catalog;
mod engine;
pub mod exemplars;
pub mod exposition;
mod health;
mod http;
pub mod otlp;
mod resilience;
pub mod scrape;
mod sinks;
pub mod stats;
mod striped;
pub mod traces;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::{Instrument, SdkMeterProvider, Stream};
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use std::borrow::Cow;
use thiserror::Error;

use crate::config::MetricsConfig;
pub use engine::{EngineMetrics, MAX_COMMAND_TYPE_LABELS, MetricsStrategy};
pub use exposition::Format;
pub use health::LifecycleMetrics;
pub use http::{HttpMetrics, record_http};
pub use resilience::ResilienceMetrics;
pub use sinks::{BusMetrics, FileMetrics, SinkMetrics};

/// The content type of the Prometheus text exposition format served on `/metrics` by default.
pub const CONTENT_TYPE: &str = exposition::TEXT_CONTENT_TYPE;

/// The label the SDK puts on the series that absorbs label sets past the cardinality limit.
const OVERFLOW_LABEL: &str = "otel_metric_overflow";

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("metrics are disabled (metrics.enabled = false)")]
    Disabled,
    #[error("the metrics exporter is unavailable: {0}")]
    Unavailable(String),
    #[error("encoding the metrics failed: {0}")]
    Encode(String),
}

/// The service's telemetry. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    state: Arc<State>,
}

enum State {
    Disabled,
    Failed(String),
    Enabled(Box<Enabled>),
}

struct Enabled {
    scraper: scrape::Scraper,
    provider: SdkMeterProvider,
    meter: Meter,
    namespace: String,
    bus: std::sync::OnceLock<Arc<BusMetrics>>,
    /// Made once (see [`EngineMetrics::new`]) and shared by every engine strategy.
    engine: std::sync::OnceLock<EngineMetrics>,
    /// Made once and shared by every router: its request histogram is read by the scrape.
    http: std::sync::OnceLock<HttpMetrics>,
    cardinality_limit: usize,
    /// Whether a reader other than `/metrics`' reads the SDK (OTLP, or the reference exporter
    /// in tests), so that the engine's latency histograms must be recorded into it as well.
    sdk_histograms: bool,
    exemplars: Arc<exemplars::ExemplarStore>,
    /// The length of the last page rendered, to size the next one's buffer: growing a page of
    /// hundreds of KiB by doubling copies it several times and faults in fresh pages each time.
    last_len: std::sync::atomic::AtomicUsize,
}

impl Telemetry {
    /// Builds the meter provider and exporter per `config`. Never fails: an exporter that cannot
    /// be built is logged, and `/metrics` then answers 503 while everything else runs.
    pub fn new(config: &MetricsConfig) -> Telemetry {
        Telemetry::build(config, None, None)
    }

    /// Like [`Telemetry::new`] (or [`Telemetry::with_otlp`] with `otlp`), with `instance_id` as
    /// the resource's `service.instance.id`: a label of `target_info`, and of every metric an
    /// OTLP backend receives.
    pub fn for_instance(
        config: &MetricsConfig,
        otlp: Option<(&str, Duration)>,
        instance_id: &str,
    ) -> Telemetry {
        Telemetry::build(config, otlp, Some(instance_id))
    }

    /// Like [`Telemetry::new`], and also pushes every metric to an OTLP/HTTP collector
    /// (`{endpoint}/v1/metrics`, cumulative) every `interval`, from a thread of the SDK's own: a
    /// slow or absent collector delays only that thread, never a dispatch or a scrape.
    pub fn with_otlp(config: &MetricsConfig, endpoint: &str, interval: Duration) -> Telemetry {
        Telemetry::build(config, Some((endpoint, interval)), None)
    }

    fn build(
        config: &MetricsConfig,
        otlp: Option<(&str, Duration)>,
        instance_id: Option<&str>,
    ) -> Telemetry {
        if !config.enabled {
            return Telemetry {
                state: Arc::new(State::Disabled),
            };
        }
        let state = match Enabled::new(config, otlp, instance_id, None) {
            Ok(enabled) => State::Enabled(Box::new(enabled)),
            Err(error) => {
                tracing::error!(%error, "The metrics exporter could not be built; /metrics will answer 503.");
                State::Failed(error)
            }
        };
        Telemetry {
            state: Arc::new(state),
        }
    }

    /// Telemetry that records nothing and costs nothing.
    pub fn disabled() -> Telemetry {
        Telemetry {
            state: Arc::new(State::Disabled),
        }
    }

    /// Telemetry whose exporter failed: nothing is recorded and `/metrics` answers 503. What
    /// [`Telemetry::new`] returns when the exporter cannot be built; public so the 503 path can
    /// be tested.
    pub fn unavailable(reason: impl Into<String>) -> Telemetry {
        Telemetry {
            state: Arc::new(State::Failed(reason.into())),
        }
    }

    /// The meter behind dispatchd's own instruments, for embedders who want their instruments
    /// exported on the same `/metrics` (and namespaced the same way). `None` when metrics are off.
    pub fn meter(&self) -> Option<&Meter> {
        self.enabled().map(|enabled| &enabled.meter)
    }

    pub fn is_enabled(&self) -> bool {
        matches!(*self.state, State::Enabled(_))
    }

    fn enabled(&self) -> Option<&Enabled> {
        match &*self.state {
            State::Enabled(enabled) => Some(enabled),
            _ => None,
        }
    }

    /// The strategy that feeds the engine's metrics for these dispatchers (in registration
    /// order), or `None` when metrics are off.
    pub fn engine_strategy<'a>(
        &self,
        dispatcher_ids: impl IntoIterator<Item = &'a str>,
    ) -> Option<MetricsStrategy> {
        let enabled = self.enabled()?;
        Some(
            MetricsStrategy::new(self.engine_metrics()?, dispatcher_ids)
                .with_exemplars(enabled.exemplars.clone()),
        )
    }

    /// The engine's instruments, made once and shared: every strategy built from them, for any
    /// engine, counts into the same series. `None` when metrics are off.
    pub fn engine_metrics(&self) -> Option<EngineMetrics> {
        let enabled = self.enabled()?;
        Some(
            enabled
                .engine
                .get_or_init(|| {
                    EngineMetrics::new(
                        &enabled.meter,
                        enabled.cardinality_limit,
                        enabled.sdk_histograms,
                    )
                })
                .clone(),
        )
    }

    /// The lifecycle counters, to observe the health registry with; `None` when metrics are
    /// off.
    pub fn lifecycle_metrics(&self) -> Option<LifecycleMetrics> {
        self.enabled()
            .map(|enabled| LifecycleMetrics::new(&enabled.meter))
    }

    /// Exports the registry's health as gauges read at scrape time. Call once per registry.
    pub fn observe_health(&self, registry: &crate::health::HealthRegistry) {
        if let Some(enabled) = self.enabled() {
            health::observe(&enabled.meter, registry);
        }
    }

    /// The protections' metrics, or `None` when metrics are off.
    pub fn resilience_metrics(&self) -> Option<ResilienceMetrics> {
        self.enabled()
            .map(|enabled| ResilienceMetrics::new(&enabled.meter))
    }

    /// The event pipeline's metrics, or `None` when metrics are off.
    pub fn sink_metrics(&self) -> Option<SinkMetrics> {
        self.enabled()
            .map(|enabled| SinkMetrics::new(&enabled.meter))
    }

    /// The Redis bus's metrics, or `None` when metrics are off. Built on the first call and
    /// shared after it: the publisher and every consumer report to the same instruments.
    pub fn bus_metrics(&self) -> Option<Arc<BusMetrics>> {
        self.enabled().map(|enabled| {
            enabled
                .bus
                .get_or_init(|| Arc::new(BusMetrics::new(&enabled.meter)))
                .clone()
        })
    }

    /// The appended files' metrics (torn tails repaired), or `None` when metrics are off.
    pub fn file_metrics(&self) -> Option<FileMetrics> {
        self.enabled()
            .map(|enabled| FileMetrics::new(&enabled.meter))
    }

    /// The HTTP API's metrics, or `None` when metrics are off. Made once and shared: every
    /// router built from this telemetry records into the same series.
    pub fn http_metrics(&self) -> Option<HttpMetrics> {
        self.enabled().map(|enabled| {
            enabled
                .http
                .get_or_init(|| {
                    HttpMetrics::new(
                        &enabled.meter,
                        enabled.cardinality_limit,
                        enabled.sdk_histograms,
                    )
                })
                .clone()
        })
    }

    /// The configured namespace (empty for none).
    pub fn namespace(&self) -> &str {
        self.enabled()
            .map_or("", |enabled| enabled.namespace.as_str())
    }

    /// Collects every metric family, the overflow signal included, as `prometheus` protobuf
    /// families (what the stats API reads).
    pub fn gather(&self) -> Result<Vec<MetricFamily>, RenderError> {
        self.scrape(|families| families.iter().map(to_proto).collect())
    }

    /// Collects now and hands `f` the families `/metrics` writes, the overflow signal last.
    fn scrape<R>(&self, f: impl FnOnce(&[scrape::Family<'_>]) -> R) -> Result<R, RenderError> {
        let enabled = match &*self.state {
            State::Disabled => return Err(RenderError::Disabled),
            State::Failed(reason) => return Err(RenderError::Unavailable(reason.clone())),
            State::Enabled(enabled) => enabled,
        };
        let mut own = enabled
            .engine
            .get()
            .map(EngineMetrics::own_families)
            .unwrap_or_default();
        own.extend(enabled.http.get().map(HttpMetrics::own_family));
        enabled
            .scraper
            .scrape(own, |mut families| {
                // A family with no series is not written; no overflow, no family.
                if let Some(overflow) = overflow_family(&families, &enabled.namespace) {
                    families.push(overflow);
                }
                f(&families)
            })
            .map_err(RenderError::Encode)
    }

    /// Renders the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> Result<String, RenderError> {
        self.render_as(Format::Text)
    }

    /// Renders `/metrics` in `format`: the 0.0.4 text, or OpenMetrics 1.0 with the exemplars
    /// of the latency histograms.
    pub fn render_as(&self, format: Format) -> Result<String, RenderError> {
        use std::sync::atomic::Ordering::Relaxed;
        let exemplars = self.exemplars();
        let last_len = self
            .enabled()
            .map_or(0, |enabled| enabled.last_len.load(Relaxed));
        let out = self.scrape(|families| {
            // The last page's length and an eighth more: one allocation for a steady scrape.
            let mut out = String::with_capacity((last_len + last_len / 8).max(16 * 1024));
            match format {
                Format::Text => exposition::encode_text(families, &mut out),
                Format::OpenMetrics => {
                    exposition::encode_openmetrics(families, exemplars, &mut out)
                }
            }
            out
        })?;
        if let Some(enabled) = self.enabled() {
            enabled.last_len.store(out.len(), Relaxed);
        }
        Ok(out)
    }

    /// The exemplars kept for the latency histograms; `None` when metrics are off.
    pub fn exemplars(&self) -> Option<&exemplars::ExemplarStore> {
        self.enabled().map(|enabled| &*enabled.exemplars)
    }

    /// Pushes the current values to the OTLP collector now, when there is one.
    pub fn flush(&self) {
        if let Some(enabled) = self.enabled() {
            if let Err(error) = enabled.provider.force_flush() {
                tracing::debug!(%error, "Flushing the metrics did not finish.");
            }
        }
    }

    /// Flushes and stops the meter provider. Call once, last, at shutdown.
    pub fn shutdown(&self) {
        if let Some(enabled) = self.enabled() {
            if let Err(error) = enabled.provider.shutdown() {
                tracing::debug!(%error, "The meter provider did not shut down cleanly.");
            }
        }
    }
}

impl Enabled {
    fn new(
        config: &MetricsConfig,
        otlp: Option<(&str, Duration)>,
        instance_id: Option<&str>,
        reference: Option<prometheus::Registry>,
    ) -> Result<Enabled, String> {
        let reader = scrape::Reader::new();
        let limit = config.cardinality_limit;
        let sdk_histograms = otlp.is_some() || reference.is_some();
        let mut builder = SdkMeterProvider::builder()
            .with_resource(traces::resource(instance_id))
            .with_reader(reader.clone());
        #[cfg(test)]
        if let Some(registry) = reference {
            // opentelemetry-prometheus, which `/metrics` is held to byte for byte in tests.
            let mut exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry)
                .scope_info_enabled(false);
            if !config.namespace.is_empty() {
                exporter = exporter.with_namespace(config.namespace.clone());
            }
            builder = builder.with_reader(exporter.build().map_err(|error| error.to_string())?);
        }
        if let Some((endpoint, interval)) = otlp {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/metrics", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| format!("the OTLP metrics exporter for {endpoint}: {e}"))?;
            builder = builder.with_reader(
                opentelemetry_sdk::metrics::PeriodicReader::builder(otlp::CountingExporter(
                    exporter,
                ))
                .with_interval(interval)
                .build(),
            );
        }
        let provider = builder
            // Deliberate, and the same for every instrument: past it, new label sets fold into
            // one overflow series, which `metric_cardinality_overflow` reports.
            .with_view(move |_: &Instrument| {
                Stream::builder().with_cardinality_limit(limit).build().ok()
            })
            .build();
        let meter = provider.meter("dispatchd");

        let workers = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .unwrap_or(0) as u64;
        let spec = catalog::DISPATCHER_WORKER_THREADS;
        // The instrument lives as long as the provider, which keeps its callback.
        let _ = meter
            .u64_observable_gauge(spec.name)
            .with_description(spec.description)
            .with_unit(spec.unit)
            .with_callback(move |observer| observer.observe(workers, &[]))
            .build();

        let spec = catalog::TRACE_SPANS_DROPPED;
        let _ = meter
            .u64_observable_counter(spec.name)
            .with_description(spec.description)
            .with_unit(spec.unit)
            .with_callback(|observer| {
                let dropped = traces::DROPPED_SPANS.load(std::sync::atomic::Ordering::Relaxed);
                observer.observe(dropped, &[]);
            })
            .build();

        let spec = catalog::TRACE_CONTEXT_INVALID;
        let _ = meter
            .u64_observable_counter(spec.name)
            .with_description(spec.description)
            .with_unit(spec.unit)
            .with_callback(|observer| {
                for carrier in crate::propagation::Carrier::ALL {
                    observer.observe(
                        crate::propagation::invalid_trace_contexts(carrier),
                        &[opentelemetry::KeyValue::new(
                            catalog::label::CARRIER,
                            carrier.as_str(),
                        )],
                    );
                }
            })
            .build();

        let spec = catalog::OTLP_EXPORTS_FAILED;
        let _ = meter
            .u64_observable_counter(spec.name)
            .with_description(spec.description)
            .with_unit(spec.unit)
            .with_callback(|observer| {
                for signal in otlp::Signal::ALL {
                    observer.observe(
                        otlp::failures(signal).count(),
                        &[opentelemetry::KeyValue::new(
                            catalog::label::SIGNAL,
                            signal.as_str(),
                        )],
                    );
                }
            })
            .build();

        Ok(Enabled {
            scraper: scrape::Scraper::new(reader, &config.namespace),
            provider,
            meter,
            namespace: config.namespace.clone(),
            bus: std::sync::OnceLock::new(),
            engine: std::sync::OnceLock::new(),
            http: std::sync::OnceLock::new(),
            cardinality_limit: limit,
            sdk_histograms,
            exemplars: Arc::new(exemplars::ExemplarStore::new(&config.namespace)),
            last_len: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

/// A label value made once and shared. The SDK copies every series' attributes at each collect:
/// a shared string is a reference count there, an owned one an allocation and a copy (a third
/// of a 10,000-series scrape, profiled). It costs the same as an owned one to make.
pub(crate) fn shared(value: &str) -> opentelemetry::Value {
    opentelemetry::Value::from(Arc::<str>::from(value))
}

/// `metric_cardinality_overflow{metric}`: one series per metric whose SDK overflow series exists.
fn overflow_family<'a>(
    families: &[scrape::Family<'a>],
    namespace: &str,
) -> Option<scrape::Family<'a>> {
    let spec = catalog::METRIC_CARDINALITY_OVERFLOW;
    let series: Vec<scrape::Series<'a>> = families
        .iter()
        .filter(|family| {
            family
                .series
                .iter()
                .any(|series| series.labels.iter().any(|(name, _)| name == OVERFLOW_LABEL))
        })
        .map(|family| scrape::Series {
            labels: vec![(Cow::Borrowed(catalog::label::METRIC), family.name.clone())],
            value: scrape::Point::Number(1.0),
        })
        .collect();
    (!series.is_empty()).then(|| scrape::Family {
        name: Cow::Owned(spec.exported_name(namespace)),
        help: Cow::Borrowed(spec.description),
        kind: scrape::Kind::Gauge,
        series,
    })
}

/// A family as the `prometheus` crate's protobuf types hold it.
fn to_proto(family: &scrape::Family<'_>) -> MetricFamily {
    let mut proto = MetricFamily::default();
    proto.set_name(family.name.clone().into_owned());
    proto.set_help(family.help.clone().into_owned());
    proto.set_field_type(match family.kind {
        scrape::Kind::Counter => MetricType::COUNTER,
        scrape::Kind::Gauge => MetricType::GAUGE,
        scrape::Kind::Histogram => MetricType::HISTOGRAM,
    });
    for series in &family.series {
        let labels = series
            .labels
            .iter()
            .map(|(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.clone().into_owned());
                pair.set_value(value.clone().into_owned());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(labels);
        match (&series.value, family.kind) {
            (scrape::Point::Number(value), scrape::Kind::Counter) => {
                let mut counter = prometheus::proto::Counter::default();
                counter.set_value(*value);
                metric.set_counter(counter);
            }
            (scrape::Point::Number(value), _) => {
                let mut gauge = Gauge::default();
                gauge.set_value(*value);
                metric.set_gauge(gauge);
            }
            (scrape::Point::Histogram(point), _) => {
                let mut histogram = prometheus::proto::Histogram::default();
                histogram.set_sample_sum(point.sum);
                histogram.set_sample_count(point.count);
                histogram.set_bucket(
                    point
                        .buckets
                        .iter()
                        .map(|(bound, cumulative)| {
                            let mut bucket = prometheus::proto::Bucket::default();
                            bucket.set_upper_bound(*bound);
                            bucket.set_cumulative_count(*cumulative);
                            bucket
                        })
                        .collect(),
                );
                metric.set_histogram(histogram);
            }
        }
        proto.mut_metric().push(metric);
    }
    proto
}

/// [`Telemetry::new`] with opentelemetry-prometheus reading the same provider into `registry`:
/// the reference `/metrics` is compared against.
#[cfg(test)]
pub(crate) fn with_reference(config: &MetricsConfig) -> (Telemetry, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let enabled = Enabled::new(config, None, None, Some(registry.clone())).unwrap();
    (
        Telemetry {
            state: Arc::new(State::Enabled(Box::new(enabled))),
        },
        registry,
    )
}

#[cfg(test)]
mod tests;
