//! Traces and logs: the tracer provider (sampling, optional OTLP export) and the `tracing`
//! subscriber that feeds it and writes the log.
//!
//! Dispatch spans (target `dispatchd::trace`) go to OpenTelemetry through `tracing-opentelemetry`;
//! log lines go to stdout, human-readable or JSON, with the fields of the spans they happen in,
//! including `trace_id` and `span_id` inside an HTTP dispatch. Export runs on the SDK's batch
//! processor thread with a bounded queue: a slow or absent collector costs at most that queue,
//! never dispatch time; spans that do not fit are dropped by the SDK (and reported by it).

use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
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
    /// A tracing-subscriber filter for the log.
    pub log_filter: String,
}

/// Keeps the tracer provider; [`Traces::shutdown`] flushes what is queued.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the tracer provider for `config`.
    pub fn provider(config: &TracingConfig) -> Result<SdkTracerProvider, String> {
        let mut resource = Resource::builder();
        // The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the name defaults to ours.
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("dispatchd");
        }
        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))));
        if let Some(endpoint) = &config.otlp_endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .map_err(|e| format!("the OTLP exporter for {endpoint}: {e}"))?;
            let batch = BatchConfigBuilder::default()
                .with_max_queue_size(4096)
                .build();
            builder = builder.with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            );
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
                .with_current_span(true)
                .with_span_list(false)
                .boxed(),
        };
        let spans = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(Targets::new().with_target("dispatchd::trace", tracing::Level::INFO));
        tracing_subscriber::registry()
            .with(log.with_filter(filter))
            .with(spans)
            .try_init()
            .map_err(|e| e.to_string())?;
        Ok(Traces { provider })
    }

    /// Exports what is queued and stops the provider.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::debug!(%error, "The tracer provider did not shut down cleanly.");
        }
    }
}
