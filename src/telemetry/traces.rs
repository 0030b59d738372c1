//! Traces and logs: the tracer provider (sampling, optional OTLP export) and the `tracing`
//! subscriber that feeds it and writes the log.
//!
//! Dispatch spans (target `dispatchd::trace`) go to OpenTelemetry through `tracing-opentelemetry`;
//! log lines go to stdout, human-readable or JSON, with the fields of the spans they happen in,
//! including `trace_id` and `span_id` inside an HTTP dispatch. Export runs on a thread of its own
//! behind a bounded queue ([`BoundedProcessor`]): a slow or absent collector costs at most that
//! queue, never dispatch time, and spans that do not fit are dropped and counted
//! ([`DROPPED_SPANS`], exported as `trace_spans_dropped_total`). Exports that fail are counted
//! and logged at most once a minute ([`super::otlp`], `otlp_exports_failed_total`).

use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated `[tracing]` and `[otlp]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Parent-based: a caller's decision is followed; root traces are kept at this ratio.
    pub sampling_ratio: f64,
    /// An OTLP/HTTP collector base URL (`…/v1/traces` is appended); none exports nothing.
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
    /// Export the metrics to the same collector too (`…/v1/metrics`), beside `/metrics`.
    pub otlp_metrics: bool,
    /// How often metrics are pushed to the collector.
    pub otlp_metrics_interval: Duration,
    /// A tracing-subscriber filter for the log.
    pub log_filter: String,
    /// The resource's `service.instance.id` for spans: `[server] instance_id`, or host name and
    /// the configured port (none when the port is 0: it is only known once bound).
    pub instance_id: Option<String>,
}

impl Default for TracingConfig {
    /// Everything sampled, nothing exported, text logs at `info`: the embedded default.
    fn default() -> TracingConfig {
        TracingConfig {
            sampling_ratio: 1.0,
            otlp_endpoint: None,
            log_format: LogFormat::Text,
            otlp_metrics: false,
            otlp_metrics_interval: Duration::from_secs(60),
            log_filter: "info".into(),
            instance_id: None,
        }
    }
}

/// The resource traces and metrics describe: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
/// (read by the SDK) win; the service name defaults to `dispatchd`, the version is ours, and
/// `service.instance.id` is this instance's `[server] instance_id` when given, so an OTLP backend
/// and Prometheus' `target_info` tell the instances apart.
pub fn resource(instance_id: Option<&str>) -> Resource {
    // The SDK's builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES from the process
    // environment itself (the OpenTelemetry specification's configuration channel); this one
    // read only keeps its precedence when choosing our default name.
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |name| name.is_empty()) {
        resource = resource.with_service_name("dispatchd");
    }
    if let Some(id) = instance_id {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            id.to_owned(),
        ));
    }
    resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build()
}

/// The `tracing` → OpenTelemetry layer, configured for dispatch spans: none of the attributes
/// `tracing-opentelemetry` adds by default that a dispatch span does not need (source location,
/// thread, busy/idle time, target), and no OpenTelemetry context attached on every enter (our
/// propagation reads the span's own context). Together that halves a sampled dispatch's cost.
pub fn otel_layer<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_target(false)
        .with_context_activation(false)
}

/// The sampler of dispatchd's traces: parent-based (a caller's decision is followed), new traces
/// kept at `ratio`. The tracer provider and [`crate::propagation::Unexported`] share it.
pub fn sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

/// Keeps the tracer provider; [`Traces::shutdown`] flushes what is queued.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the tracer provider for `config`.
    pub fn provider(config: &TracingConfig) -> Result<SdkTracerProvider, String> {
        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource(config.instance_id.as_deref()))
            .with_sampler(sampler(config.sampling_ratio));
        if let Some(endpoint) = &config.otlp_endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| format!("the OTLP exporter for {endpoint}: {e}"))?;
            builder = builder.with_span_processor(BoundedProcessor::new(exporter, SPAN_QUEUE));
        }
        Ok(builder.build())
    }

    /// Installs the process's subscriber: the log (text or JSON, filtered) and the dispatch spans
    /// to OpenTelemetry. Call once.
    pub fn install(config: &TracingConfig) -> Result<Traces, String> {
        let provider = Traces::provider(config)?;
        let tracer = provider.tracer("dispatchd");
        let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let log = match config.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(ansi)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                // Every span in scope, so the ingest span's trace_id and span_id are on each
                // line logged anywhere inside the dispatch.
                .with_current_span(true)
                .with_span_list(true)
                .boxed(),
        };
        let spans = otel_layer(tracer)
            .with_filter(Targets::new().with_target("dispatchd::trace", tracing::Level::INFO));
        // The SDK logs each failed export request; `otlp` counts them and logs a summary instead.
        let filter = filter.and(tracing_subscriber::filter::filter_fn(|metadata| {
            !super::otlp::is_sdk_export_failure(metadata)
        }));
        tracing_subscriber::registry()
            .with(log.with_filter(filter))
            .with(spans)
            .try_init()
            .map_err(|e| e.to_string())?;
        Ok(Traces { provider })
    }

    /// The tracer the engine opens its spans with (`AppBuilder::tracer`).
    pub fn tracer(&self) -> opentelemetry_sdk::trace::SdkTracer {
        self.provider.tracer("dispatchd")
    }

    /// Exports what is queued and stops the provider.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "The tracer provider did not shut down cleanly.");
        }
    }
}

/// Spans waiting for export at most.
pub const SPAN_QUEUE: usize = 4096;
/// Spans per export request at most.
const EXPORT_BATCH: usize = 512;

/// Spans dropped because the export queue was full (a slow or absent collector). Process-wide,
/// like the subscriber that produces them.
pub static DROPPED_SPANS: AtomicU64 = AtomicU64::new(0);

enum Job {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
    Shutdown,
}

/// A span processor with a bounded queue and its own export thread. Written here rather than the
/// SDK's `BatchSpanProcessor` because that one drops silently (it only logs a count at
/// shutdown); this one counts every drop where a user can alert on it.
#[derive(Debug)]
pub struct BoundedProcessor {
    queue: SyncSender<Job>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    exporter: Arc<dyn ResourceSetter>,
}

/// The one exporter call the processor makes from outside its thread.
trait ResourceSetter: Send + Sync + std::fmt::Debug {
    fn set_resource(&self, resource: &Resource);
}

#[derive(Debug)]
struct Shared<E>(Mutex<E>);

impl<E: SpanExporter> ResourceSetter for Shared<E> {
    fn set_resource(&self, resource: &Resource) {
        if let Ok(mut exporter) = self.0.lock() {
            exporter.set_resource(resource);
        }
    }
}

impl BoundedProcessor {
    pub fn new<E: SpanExporter + 'static>(exporter: E, capacity: usize) -> BoundedProcessor {
        let (queue, jobs) = sync_channel(capacity);
        let exporter = Arc::new(Shared(Mutex::new(exporter)));
        let worker = {
            let exporter = exporter.clone();
            std::thread::Builder::new()
                .name("dispatchd-span-export".into())
                .spawn(move || export_loop(&exporter, &jobs))
                .ok()
        };
        BoundedProcessor {
            queue,
            worker: Mutex::new(worker),
            exporter,
        }
    }
}

fn export_loop<E: SpanExporter>(exporter: &Shared<E>, jobs: &Receiver<Job>) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(EXPORT_BATCH);
    let send = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::take(batch);
        if let Ok(exporter) = exporter.0.lock() {
            // The export's own timeout bounds this; the queue bounds what waits meanwhile.
            let exported = futures::executor::block_on(exporter.export(spans));
            super::otlp::failures(super::otlp::Signal::Traces).record(&exported);
        }
    };
    loop {
        match jobs.recv_timeout(Duration::from_secs(1)) {
            Ok(Job::Span(span)) => {
                batch.push(*span);
                if batch.len() >= EXPORT_BATCH {
                    send(&mut batch);
                }
            }
            Ok(Job::Flush(done)) => {
                send(&mut batch);
                let _ = done.send(());
            }
            Ok(Job::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                send(&mut batch);
                if let Ok(exporter) = exporter.0.lock() {
                    let _ = exporter.shutdown();
                }
                return;
            }
            Err(RecvTimeoutError::Timeout) => send(&mut batch),
        }
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(Job::Span(Box::new(span))).is_err() {
            // Full (the collector is slow or gone) or shut down: dropped, and counted.
            DROPPED_SPANS.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (done, finished) = sync_channel(1);
        self.queue
            .send(Job::Flush(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        finished
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| OTelSdkError::Timeout(Duration::from_secs(30)))
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        let _ = self.queue.send(Job::Shutdown);
        if let Some(worker) = self.worker.lock().ok().and_then(|mut w| w.take()) {
            let _ = worker.join();
        }
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.exporter.set_resource(resource);
    }
}
