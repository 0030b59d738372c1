//! W3C trace context at the edges: read `traceparent`/`tracestate` from what arrives, write them
//! into what leaves, and name the current trace.
//!
//! Owns the one propagator (`TraceContextPropagator`, no global): the HTTP ingest and bus sources
//! extract a parent from it, the engine's `TraceContext` stamps results and output headers with
//! it, and the sinks put it on their requests. A malformed `traceparent` extracts as no parent: a
//! new trace starts, never an error.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::engine::{DispatchSpan, SpanValue, TraceContext, TraceSpan};

struct HeaderMapExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderMapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MapCarrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The caller's context from HTTP headers (empty when absent or malformed).
pub fn extract_http(headers: &axum::http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderMapExtractor(headers))
}

/// The sender's context from envelope headers (empty when absent or malformed).
pub fn extract_map(headers: &BTreeMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(&MapExtractor(headers))
}

/// Writes the current span's context as `traceparent` (and `tracestate`) into `headers`.
pub fn inject_current(headers: &mut BTreeMap<String, String>) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MapCarrier(headers));
}

/// The current span's trace id and span id, lowercase hex, when it is part of a trace.
pub fn current_ids() -> Option<(String, String)> {
    ids(&tracing::Span::current().context())
}

/// [`current_ids`] and whether that trace is sampled, from one look at the current context.
pub fn current_trace() -> Option<(String, String, bool)> {
    let context = tracing::Span::current().context();
    let sampled = context.span().span_context().is_sampled();
    ids(&context).map(|(trace_id, span_id)| (trace_id, span_id, sampled))
}

pub fn ids(context: &Context) -> Option<(String, String)> {
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        (
            hex(&span_context.trace_id().to_bytes()),
            hex(&span_context.span_id().to_bytes()),
        )
    })
}

/// Lowercase hex, without the formatting machinery (this runs on every traced dispatch).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// The engine's view of trace context: the parent is the current `tracing` span's context (the
/// ingest span, a bus source's span), new traces are sampled at `ratio` (parent-based: a parent's
/// decision is followed), and the engine's own spans (dispatch, dispatcher, command adapter) are
/// opened through the OpenTelemetry API directly with `tracer`.
///
/// Why not `tracing` spans for those: through `tracing-opentelemetry` a sampled dispatch cost
/// +2.8 µs (each field becomes an owned attribute in the registry, the SDK span is built at
/// close); opened directly, with static keys and values the engine already holds, it costs well
/// under 1 µs (docs/benchmarks.md). Without a tracer the engine opens no span: results, outputs
/// and events still carry the parent's trace, which is what `serve` does when nothing exports.
#[derive(Clone)]
pub struct SpanTraceContext {
    ratio: f64,
    tracer: Option<SdkTracer>,
}

impl std::fmt::Debug for SpanTraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanTraceContext")
            .field("ratio", &self.ratio)
            .field("spans", &self.tracer.is_some())
            .finish()
    }
}

impl Default for SpanTraceContext {
    /// Every trace kept, no spans of the engine's own.
    fn default() -> SpanTraceContext {
        SpanTraceContext::new(1.0)
    }
}

impl SpanTraceContext {
    pub fn new(ratio: f64) -> SpanTraceContext {
        SpanTraceContext {
            ratio: ratio.clamp(0.0, 1.0),
            tracer: None,
        }
    }

    /// Opens the engine's spans with `tracer` (`provider.tracer("…")`).
    pub fn with_tracer(mut self, tracer: SdkTracer) -> SpanTraceContext {
        self.tracer = Some(tracer);
        self
    }
}

impl SpanTraceContext {
    /// Whether a dispatch under `parent` is kept: the parent's decision, else the ratio.
    fn keeps(&self, parent: &Context) -> bool {
        let span = parent.span();
        let parent = span.span_context();
        if parent.is_valid() {
            parent.is_sampled()
        } else {
            self.ratio >= 1.0 || fastrand::f64() < self.ratio
        }
    }
}

impl TraceContext for SpanTraceContext {
    fn current_ids(&self) -> Option<(String, String)> {
        current_ids()
    }

    fn current_trace(&self) -> Option<(String, String, bool)> {
        current_trace()
    }

    fn inject(&self, headers: &mut BTreeMap<String, String>) {
        inject_current(headers);
    }

    fn start_dispatch(&self, span: &DispatchSpan<'_>) -> Option<Box<dyn TraceSpan>> {
        let tracer = self.tracer.as_ref()?;
        let parent = tracing::Span::current().context();
        if !self.keeps(&parent) {
            return None;
        }
        let mut attributes = Vec::with_capacity(9);
        attributes.push(KeyValue::new("messaging.system", "dispatchd"));
        attributes.push(KeyValue::new("messaging.operation.type", "process"));
        attributes.push(KeyValue::new(
            "messaging.destination.name",
            span.topic.to_owned(),
        ));
        attributes.push(KeyValue::new(
            "messaging.message.id",
            span.message_id.to_owned(),
        ));
        if let Some(correlation_id) = span.correlation_id {
            attributes.push(KeyValue::new(
                "messaging.message.conversation_id",
                correlation_id.to_owned(),
            ));
        }
        attributes.push(KeyValue::new(
            "dispatchd.message_type",
            span.message_type.to_owned(),
        ));
        let started = tracer
            .span_builder(format!("{} process", span.topic))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Some(Box::new(EngineSpan {
            context: parent.with_span(started),
            tracer: tracer.clone(),
        }))
    }
}

/// A span of the engine's, opened directly through the OpenTelemetry API; ends when dropped.
struct EngineSpan {
    /// The parent's context with this span active.
    context: Context,
    tracer: SdkTracer,
}

impl std::fmt::Debug for EngineSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSpan")
            .field("span_context", self.context.span().span_context())
            .finish()
    }
}

fn value(value: SpanValue<'_>) -> opentelemetry::Value {
    match value {
        SpanValue::Str(text) => opentelemetry::Value::from(text.to_owned()),
        SpanValue::Static(text) => opentelemetry::Value::from(text),
        SpanValue::Int(number) => opentelemetry::Value::I64(number),
    }
}

impl TraceSpan for EngineSpan {
    fn sampled(&self) -> bool {
        self.context.span().span_context().is_sampled()
    }

    fn ids(&self) -> (String, String) {
        let span = self.context.span();
        let span_context = span.span_context();
        (
            hex(&span_context.trace_id().to_bytes()),
            hex(&span_context.span_id().to_bytes()),
        )
    }

    fn inject(&self, headers: &mut BTreeMap<String, String>) {
        TraceContextPropagator::new().inject_context(&self.context, &mut MapCarrier(headers));
    }

    fn set_attributes(&mut self, attributes: &[(&'static str, SpanValue<'_>)]) {
        self.context.span().set_attributes(
            attributes
                .iter()
                .map(|&(key, v)| KeyValue::new(key, value(v))),
        );
    }

    fn child(
        &self,
        name: &str,
        attributes: &[(&'static str, SpanValue<'_>)],
    ) -> Box<dyn TraceSpan> {
        let started = self
            .tracer
            .span_builder(name.to_owned())
            .with_kind(SpanKind::Internal)
            .with_attributes(
                attributes
                    .iter()
                    .map(|&(key, v)| KeyValue::new(key, value(v))),
            )
            .start_with_context(&self.tracer, &self.context);
        Box::new(EngineSpan {
            context: self.context.with_span(started),
            tracer: self.tracer.clone(),
        })
    }

    fn scope(&self, name: &str, attributes: &[(&'static str, SpanValue<'_>)]) -> tracing::Span {
        let span = tracing::info_span!(
            target: "dispatchd::trace",
            "command adapter",
            otel.name = name,
            otel.kind = "client",
            dispatchd.adapter = tracing::field::Empty,
            dispatchd.command_type = tracing::field::Empty,
        );
        for &(key, v) in attributes {
            match v {
                SpanValue::Str(text) => span.record(key, text),
                SpanValue::Static(text) => span.record(key, text),
                SpanValue::Int(number) => span.record(key, number),
            };
        }
        let _ = span.set_parent(self.context.clone());
        span
    }
}

impl Drop for EngineSpan {
    fn drop(&mut self) {
        // Ends now, even if a clone of the context (a child's parent) lives on.
        self.context.span().end();
    }
}

/// The span context a `traceparent` value names, if it is well-formed.
pub fn parse_traceparent(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    let mut headers = BTreeMap::new();
    headers.insert("traceparent".to_owned(), traceparent.to_owned());
    let context = extract_map(&headers);
    let span = context.span();
    let span_context = span.span_context().clone();
    span_context.is_valid().then_some(span_context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_need_a_tracer_and_follow_the_ratio() {
        let span = |context: SpanTraceContext| {
            context.start_dispatch(&DispatchSpan {
                topic: "a.b.events",
                message_id: "m",
                correlation_id: None,
                message_type: "t",
            })
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = || opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        assert!(span(SpanTraceContext::new(1.0).with_tracer(tracer())).is_some());
        assert!(span(SpanTraceContext::new(0.0).with_tracer(tracer())).is_none());
        assert!(
            span(SpanTraceContext::default()).is_none(),
            "no tracer, no spans"
        );
    }

    #[test]
    fn ids_are_lowercase_w3c_hex() {
        assert_eq!(hex(&[0x4b, 0xf9, 0x00, 0x0a]), "4bf9000a");
        let parent =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let context = Context::new().with_remote_span_context(parent);
        assert_eq!(
            ids(&context),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned()
            ))
        );
    }
}
