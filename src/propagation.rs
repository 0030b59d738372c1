//! W3C trace context at the edges: read `traceparent`/`tracestate` from what arrives, write them
//! into what leaves, and name the current trace.
//!
//! Owns the one propagator (`TraceContextPropagator`, no global): the HTTP ingest and bus sources
//! extract a parent from it, the engine's `TraceContext` stamps results and output headers with
//! it, and the sinks put it on their requests. A malformed `traceparent` extracts as no parent: a
//! new trace starts, never an error.

use std::collections::BTreeMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::engine::TraceContext;

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

/// The engine's view of trace context, backed by the `tracing` span it runs in, sampling new
/// traces at `ratio` (parent-based: a parent's decision is followed).
#[derive(Debug, Clone, Copy)]
pub struct SpanTraceContext {
    ratio: f64,
    spans: bool,
}

impl Default for SpanTraceContext {
    fn default() -> SpanTraceContext {
        SpanTraceContext {
            ratio: 1.0,
            spans: true,
        }
    }
}

impl SpanTraceContext {
    pub fn new(ratio: f64) -> SpanTraceContext {
        SpanTraceContext {
            ratio: ratio.clamp(0.0, 1.0),
            spans: true,
        }
    }

    /// Whether the engine opens its own spans (dispatch, dispatcher, adapter). Without an
    /// exporter nobody would ever receive them, so `serve` turns them off then: results, outputs
    /// and events still carry the trace (the ingest span's ids), at no span cost.
    pub fn with_spans(mut self, spans: bool) -> SpanTraceContext {
        self.spans = spans;
        self
    }
}

impl TraceContext for SpanTraceContext {
    fn sampled(&self) -> bool {
        if !self.spans {
            return false;
        }
        let context = tracing::Span::current().context();
        let span = context.span();
        let parent = span.span_context();
        if parent.is_valid() {
            parent.is_sampled()
        } else {
            self.ratio >= 1.0 || fastrand::f64() < self.ratio
        }
    }

    fn current_ids(&self) -> Option<(String, String)> {
        current_ids()
    }

    fn inject(&self, headers: &mut BTreeMap<String, String>) {
        inject_current(headers);
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
    fn without_spans_nothing_is_sampled_whatever_the_ratio() {
        assert!(SpanTraceContext::new(1.0).sampled());
        assert!(!SpanTraceContext::new(0.0).sampled());
        assert!(!SpanTraceContext::new(1.0).with_spans(false).sampled());
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
