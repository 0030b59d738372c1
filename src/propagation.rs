//! W3C trace context at the edges: read `traceparent`/`tracestate` from what arrives, write them
//! into what leaves, and name the current trace.
//!
//! What arrives is checked here against W3C Trace Context Level 1 (and its rule for future
//! versions) before anything is built from it: an invalid `traceparent` is no parent (a new trace
//! starts, never an error, and its `tracestate` is ignored); an invalid `tracestate` is dropped
//! whole while the `traceparent` still holds. The span context is built here from the checked
//! bytes rather than by the SDK's `TraceContextPropagator`, which takes values the spec says
//! must start a new trace (signs, short ids, a trailing `-`, versions `0`/`000`/`CC`) and refuses
//! a valid multi-tenant key whose system id is 14 characters long. What leaves is written by the
//! SDK's propagator (no global): the engine's `TraceContext` stamps results and output headers
//! with it, and the sinks put it on their requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, ShouldSample,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::engine::{DispatchSpan, SpanValue, TraceContext, TraceSpan};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The most list-members a `tracestate` may have; one more and it is dropped whole.
const MAX_MEMBERS: usize = 32;

/// A `traceparent` value that follows W3C Trace Context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// `00` for this layout; a later version was read by the same layout.
    pub version: u8,
    /// Never all zero.
    pub trace_id: [u8; 16],
    /// The caller's span id; never all zero.
    pub parent_id: [u8; 8],
    /// All eight bits as sent; only the sampled bit (`0x01`) is carried on.
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value: optional whitespace (spaces, tabs) around it, then
    /// `version-traceid-parentid-flags` in lowercase hex (2, 32, 16, 2 digits), with neither id
    /// all zero. Version `00` is exactly that (55 characters); a later version may go on after a
    /// `-` with fields this version does not read; version `ff` is invalid.
    pub fn parse(value: &str) -> Option<TraceParent> {
        TraceParent::parse_bytes(value.as_bytes())
    }

    /// [`TraceParent::parse`] of raw bytes, as an HTTP header value may carry beyond ASCII in
    /// the fields a later version adds.
    pub fn parse_bytes(value: &[u8]) -> Option<TraceParent> {
        let ows = |c: &u8| *c == b' ' || *c == b'\t';
        let start = value.iter().position(|c| !ows(c)).unwrap_or(value.len());
        let end = value
            .iter()
            .rposition(|c| !ows(c))
            .map_or(start, |last| last + 1);
        let value = &value[start..end];
        if value.len() < 55 {
            return None;
        }
        let version = hex_byte(value[0], value[1])?;
        let length_fits = match version {
            0xff => false,
            0 => value.len() == 55,
            _ => value.len() == 55 || value[55] == b'-',
        };
        if !length_fits || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(&value[3..35])?;
        let parent_id: [u8; 8] = hex_bytes(&value[36..52])?;
        let flags = hex_byte(value[53], value[54])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            version,
            trace_id,
            parent_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & 0x01 != 0
    }
}

/// One lowercase hex digit's value.
fn hex_digit(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(high: u8, low: u8) -> Option<u8> {
    Some(hex_digit(high)? << 4 | hex_digit(low)?)
}

/// `N` bytes from exactly `2 * N` lowercase hex digits.
fn hex_bytes<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N {
        return None;
    }
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = hex_byte(pair[0], pair[1])?;
    }
    Some(bytes)
}

/// Parses `tracestate`, given as the header's lines in the order they arrived (several lines are
/// one list, joined with `,`). `None` when it is invalid, which drops it whole: a list-member
/// that is not `key=value` by the W3C grammar, more than 32 list-members, or a key twice. Empty
/// and whitespace-only list-members are allowed and skipped; spaces and tabs around a
/// list-member are not part of it.
///
/// A key is `[a-z][a-z0-9_*/-]{0,255}`, or `tenant@system` with the tenant
/// `[a-z0-9][a-z0-9_*/-]{0,240}` and the system `[a-z][a-z0-9_*/-]{0,13}`. A value is 1 to 256
/// printable ASCII characters (0x20–0x7E) other than `,` and `=`, not ending in a space.
pub fn parse_tracestate<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> Option<Vec<(&'a str, &'a str)>> {
    let mut members: Vec<(&str, &str)> = Vec::new();
    for member in lines.into_iter().flat_map(|line| line.split(',')) {
        let member = member.trim_matches([' ', '\t']);
        if member.is_empty() {
            continue;
        }
        let (key, value) = member.split_once('=')?;
        if members.len() == MAX_MEMBERS
            || !valid_key(key)
            || !valid_value(value)
            || members.iter().any(|&(seen, _)| seen == key)
        {
            return None;
        }
        members.push((key, value));
    }
    Some(members)
}

fn valid_key(key: &str) -> bool {
    let key_char = |c: &u8| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/');
    match key.split_once('@') {
        None => {
            let key = key.as_bytes();
            (1..=256).contains(&key.len())
                && key[0].is_ascii_lowercase()
                && key.iter().all(key_char)
        }
        Some((tenant, system)) => {
            let (tenant, system) = (tenant.as_bytes(), system.as_bytes());
            (1..=241).contains(&tenant.len())
                && (tenant[0].is_ascii_lowercase() || tenant[0].is_ascii_digit())
                && tenant.iter().all(key_char)
                && (1..=14).contains(&system.len())
                && system[0].is_ascii_lowercase()
                && system.iter().all(key_char)
        }
    }
}

fn valid_value(value: &str) -> bool {
    let value = value.as_bytes();
    (1..=256).contains(&value.len())
        && value.last() != Some(&b' ')
        && value
            .iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
}

/// The `tracestate` a caller sent, kept beside the span context when the SDK's `TraceState`
/// refuses it (its key check is off by one: a 14-character system id fails), so that it still
/// leaves unchanged. Only for the trace it came with.
#[derive(Debug)]
struct ReceivedTraceState {
    trace_id: TraceId,
    header: String,
}

/// The context to continue: the caller's span, remote, with its `tracestate` (if it had a valid
/// one), on top of the current context.
fn remote_context(parent: TraceParent, members: &[(&str, &str)]) -> Context {
    let trace_id = TraceId::from_bytes(parent.trace_id);
    let (trace_state, received) = match TraceState::from_key_value(members.iter().copied()) {
        Ok(trace_state) => (trace_state, None),
        Err(_) => {
            let mut header = String::new();
            for (index, (key, value)) in members.iter().enumerate() {
                if index > 0 {
                    header.push(',');
                }
                header.push_str(key);
                header.push('=');
                header.push_str(value);
            }
            (
                TraceState::NONE,
                Some(ReceivedTraceState { trace_id, header }),
            )
        }
    };
    let span_context = SpanContext::new(
        trace_id,
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags) & TraceFlags::SAMPLED,
        true,
        trace_state,
    );
    let context = Context::current().with_remote_span_context(span_context);
    match received {
        Some(received) => context.with_value(received),
        None => context,
    }
}

/// What carried a trace context into dispatchd: an HTTP request's headers, or an envelope's
/// (the message's own headers, over HTTP or from a `[[sources]]` stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    Http,
    Envelope,
}

impl Carrier {
    pub const ALL: [Carrier; 2] = [Carrier::Http, Carrier::Envelope];

    /// The `carrier` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Carrier::Http => "http",
            Carrier::Envelope => "envelope",
        }
    }
}

/// `traceparent`s that were there but invalid, by [`Carrier`]: the caller meant a trace that
/// dispatchd could not continue (`trace_context_invalid_total`). Process-wide, like the trace
/// pipeline it describes.
static INVALID: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// How many `traceparent`s carried by `carrier` were invalid, since the process started.
pub fn invalid_trace_contexts(carrier: Carrier) -> u64 {
    INVALID[carrier as usize].load(Ordering::Relaxed)
}

/// A `traceparent` as it arrived.
#[derive(Debug, PartialEq, Eq)]
enum Arrived {
    Absent,
    /// Malformed, or sent more than once.
    Invalid,
    Valid(TraceParent),
}

impl Arrived {
    fn parent(self, carrier: Carrier) -> Option<TraceParent> {
        match self {
            Arrived::Absent => None,
            Arrived::Invalid => {
                INVALID[carrier as usize].fetch_add(1, Ordering::Relaxed);
                None
            }
            Arrived::Valid(parent) => Some(parent),
        }
    }
}

fn http_traceparent(headers: &axum::http::HeaderMap) -> Arrived {
    let mut traceparents = headers.get_all(TRACEPARENT).iter();
    match (traceparents.next(), traceparents.next()) {
        (None, _) => Arrived::Absent,
        (Some(value), None) => {
            TraceParent::parse_bytes(value.as_bytes()).map_or(Arrived::Invalid, Arrived::Valid)
        }
        (Some(_), Some(_)) => Arrived::Invalid,
    }
}

fn map_traceparent(headers: &BTreeMap<String, String>) -> Arrived {
    match headers.get(TRACEPARENT) {
        None => Arrived::Absent,
        Some(value) => TraceParent::parse(value).map_or(Arrived::Invalid, Arrived::Valid),
    }
}

/// The caller's context from HTTP headers; the current context (no parent: a new trace) when
/// `traceparent` is absent, sent more than once, or invalid (those two counted).
pub fn extract_http(headers: &axum::http::HeaderMap) -> Context {
    let Some(parent) = http_traceparent(headers).parent(Carrier::Http) else {
        return Context::current();
    };
    // A line that is not visible ASCII makes the whole list invalid, like a bad member.
    let lines: Option<Vec<&str>> = headers
        .get_all(TRACESTATE)
        .iter()
        .map(|line| line.to_str().ok())
        .collect();
    let members = lines.and_then(parse_tracestate).unwrap_or_default();
    remote_context(parent, &members)
}

/// The sender's context from envelope headers (`traceparent` and `tracestate`, lowercase keys),
/// by the same rules as [`extract_http`].
pub fn extract_map(headers: &BTreeMap<String, String>) -> Context {
    let Some(parent) = map_traceparent(headers).parent(Carrier::Envelope) else {
        return Context::current();
    };
    let members = headers
        .get(TRACESTATE)
        .and_then(|value| parse_tracestate([value.as_str()]))
        .unwrap_or_default();
    remote_context(parent, &members)
}

struct MapCarrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Writes `context`'s span as `traceparent` and `tracestate` into `headers` (nothing when it has
/// no valid span). `traceparent` is version `00` with only the sampled flag.
pub fn inject_context(context: &Context, headers: &mut BTreeMap<String, String>) {
    TraceContextPropagator::new().inject_context(context, &mut MapCarrier(headers));
    if let Some(received) = context.get::<ReceivedTraceState>() {
        if context.span().span_context().trace_id() == received.trace_id {
            headers.insert(TRACESTATE.to_owned(), received.header.clone());
        }
    }
}

/// The current trace context: the one an [`Unexported`] context attached to the running future
/// (`FutureExt::with_context`), else the current `tracing` span's.
pub fn current_context() -> Context {
    let attached = Context::current();
    if attached.has_active_span() {
        attached
    } else {
        tracing::Span::current().context()
    }
}

/// Writes the current span's context as `traceparent` (and `tracestate`) into `headers`.
pub fn inject_current(headers: &mut BTreeMap<String, String>) {
    inject_context(&current_context(), headers);
}

/// The current span's trace id and span id, lowercase hex, when it is part of a trace.
pub fn current_ids() -> Option<(String, String)> {
    ids(&current_context())
}

/// [`current_ids`] and whether that trace is sampled, from one look at the current context.
pub fn current_trace() -> Option<(String, String, bool)> {
    let context = current_context();
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

/// Trace context without spans, for when nothing exports them (`serve` without an OTLP
/// endpoint).
///
/// [`Unexported::child`] makes the context a span would have had: the parent's trace or a new
/// one, a new span id, the sampler's decision (the same parent-based ratio sampler as the tracer
/// provider's) and the parent's `tracestate`, built the way the SDK's tracer builds it. The
/// caller attaches it to the dispatch with `opentelemetry::context::FutureExt::with_context`;
/// [`current_context`] reads it there, so results, outputs, dispatch events and outgoing
/// requests carry it as they would the span's.
///
/// Why: through `tracing-opentelemetry` the ingest span cost about 13,500 instructions per
/// request (its attributes owned in the registry, its context read back, the SDK span built
/// and dropped at close) for a span nobody reads; this costs about 540: two random ids and the
/// sampling decision (docs/benchmarks.md, "Fifth round").
#[derive(Debug)]
pub struct Unexported {
    sampler: Sampler,
    ids: RandomIdGenerator,
}

impl Unexported {
    /// Sampling as the tracer provider samples: parent-based, new traces kept at `ratio`.
    pub fn new(ratio: f64) -> Unexported {
        Unexported {
            sampler: crate::telemetry::traces::sampler(ratio),
            ids: RandomIdGenerator::default(),
        }
    }

    /// The context of a span named `name` of `kind`, a child of `parent`'s span (a new trace
    /// when it has no valid one), on top of `parent` (its other values, such as a `tracestate`
    /// the SDK refused, stay).
    pub fn child(&self, parent: &Context, name: &str, kind: SpanKind) -> Context {
        let parent_span = parent.span();
        let parent_context = parent_span.span_context();
        let (trace_id, flags) = if parent_context.is_valid() {
            (parent_context.trace_id(), parent_context.trace_flags())
        } else {
            (self.ids.new_trace_id(), TraceFlags::default())
        };
        let span_id = self.ids.new_span_id();
        let sampling = self
            .sampler
            .should_sample(Some(parent), trace_id, name, &kind, &[], &[]);
        let sampled = sampling.decision == SamplingDecision::RecordAndSample;
        let span_context = SpanContext::new(
            trace_id,
            span_id,
            flags.with_sampled(sampled),
            false,
            sampling.trace_state,
        );
        parent.with_remote_span_context(span_context)
    }
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
        let parent = current_context();
        if !self.keeps(&parent) {
            return None;
        }
        let mut attributes = Vec::with_capacity(10);
        attributes.push(KeyValue::new("messaging.system", "dispatchd"));
        attributes.push(KeyValue::new("messaging.operation.name", "process"));
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
            // `{messaging.operation.name} {messaging.destination.name}` (semconv 1.26 and later).
            .span_builder(format!("process {}", span.topic))
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
        inject_context(&self.context, headers);
    }

    fn set_attributes(&mut self, attributes: &[(&'static str, SpanValue<'_>)]) {
        self.context.span().set_attributes(
            attributes
                .iter()
                .map(|&(key, v)| KeyValue::new(key, value(v))),
        );
    }

    fn set_error(&mut self, error_type: &'static str, description: &str) {
        let span = self.context.span();
        span.set_attribute(KeyValue::new("error.type", error_type));
        span.set_status(opentelemetry::trace::Status::error(description.to_owned()));
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

/// The span context a `traceparent` value names, if it is valid ([`TraceParent::parse`]).
pub fn parse_traceparent(traceparent: &str) -> Option<SpanContext> {
    let parent = TraceParent::parse(traceparent)?;
    Some(SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags) & TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Only a `traceparent` that is there and cannot be followed counts as invalid: absent is a
    /// new trace by design; twice, or malformed, is a caller's trace lost.
    #[test]
    fn a_traceparent_is_invalid_only_when_present_and_unusable() {
        const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let http = |values: &[&str]| {
            let mut headers = axum::http::HeaderMap::new();
            for value in values {
                headers.append(TRACEPARENT, value.parse().unwrap());
            }
            http_traceparent(&headers)
        };
        assert_eq!(http(&[]), Arrived::Absent);
        assert!(matches!(http(&[VALID]), Arrived::Valid(_)));
        assert_eq!(http(&["00-xyz"]), Arrived::Invalid);
        assert_eq!(http(&[VALID, VALID]), Arrived::Invalid);
        let map = |value: Option<&str>| {
            let headers = value
                .map(|value| BTreeMap::from([(TRACEPARENT.to_owned(), value.to_owned())]))
                .unwrap_or_default();
            map_traceparent(&headers)
        };
        assert_eq!(map(None), Arrived::Absent);
        assert!(matches!(map(Some(VALID)), Arrived::Valid(_)));
        assert_eq!(map(Some("")), Arrived::Invalid);

        let before = invalid_trace_contexts(Carrier::Envelope);
        assert_eq!(Arrived::Invalid.parent(Carrier::Envelope), None);
        assert!(invalid_trace_contexts(Carrier::Envelope) > before);
    }

    /// What `Unexported` makes is what the SDK's tracer makes for the same parent: the parent's
    /// trace (or a new, valid one), a new span id, the parent-based ratio decision and the
    /// parent's `tracestate`; and, attached to a future, it is the current context there.
    #[tokio::test]
    async fn unexported_contexts_match_what_the_tracer_would_make() {
        let none = Context::new();
        let parent = |flags: &str, tracestate: Option<&str>| {
            let mut headers = BTreeMap::from([(
                TRACEPARENT.to_owned(),
                format!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"),
            )]);
            if let Some(state) = tracestate {
                headers.insert(TRACESTATE.to_owned(), state.to_owned());
            }
            extract_map(&headers)
        };
        let made = |ratio: f64, parent: &Context| {
            let context = Unexported::new(ratio).child(parent, "ingest", SpanKind::Server);
            let span = context.span();
            let span_context = span.span_context().clone();
            (context, span_context)
        };
        let the_tracer = |ratio: f64, parent: &Context| {
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_sampler(crate::telemetry::traces::sampler(ratio))
                .build();
            let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
            let span = tracer.start_with_context("ingest", parent);
            opentelemetry::trace::Span::span_context(&span).clone()
        };
        for ratio in [0.0, 1.0] {
            // New traces: valid, new ids; the ratio decides.
            let (_, fresh) = made(ratio, &none);
            assert!(fresh.is_valid());
            assert_eq!(fresh.is_sampled(), ratio == 1.0);
            assert_eq!(fresh.is_sampled(), the_tracer(ratio, &none).is_sampled());
            assert_ne!(fresh.trace_id(), made(ratio, &none).1.trace_id());
            // A caller's trace: its id and decision, whatever the ratio; a span id of our own.
            for flags in ["00", "01"] {
                let caller = parent(flags, Some("congo=t61rcWkgMzE"));
                let (_, child) = made(ratio, &caller);
                let tracer = the_tracer(ratio, &caller);
                assert_eq!(child.trace_id(), tracer.trace_id());
                assert_eq!(child.is_sampled(), flags == "01");
                assert_eq!(child.is_sampled(), tracer.is_sampled());
                assert_eq!(child.trace_state(), tracer.trace_state());
                assert_eq!(child.trace_state().header(), "congo=t61rcWkgMzE");
                assert_ne!(
                    child.span_id(),
                    SpanId::from_hex("b7ad6b7169203331").unwrap()
                );
            }
        }
        // A tracestate the SDK refuses still leaves with the trace.
        let refused = "a-fourteen-chr@sys=v";
        let (context, child) = made(1.0, &parent("01", Some(refused)));
        let mut out = BTreeMap::new();
        inject_context(&context, &mut out);
        assert_eq!(out[TRACESTATE], refused);
        // Attached to a future, it is what the dispatch reads.
        let ids = opentelemetry::context::FutureExt::with_context(
            async { (current_ids(), current_trace()) },
            context,
        )
        .await;
        let expected = (
            hex(&child.trace_id().to_bytes()),
            hex(&child.span_id().to_bytes()),
        );
        assert_eq!(ids.0, Some(expected.clone()));
        assert_eq!(ids.1, Some((expected.0, expected.1, true)));
        assert_eq!(current_ids(), None, "nothing is attached outside it");
    }

    /// Text of a length in `length`, drawn from `alphabet` (cheaper than a regex strategy).
    fn text(alphabet: &str, length: std::ops::Range<usize>) -> impl Strategy<Value = String> {
        let alphabet: Vec<char> = alphabet.chars().collect();
        prop::collection::vec(prop::sample::select(alphabet), length)
            .prop_map(|chars| chars.into_iter().collect())
    }

    const LOWER_HEX: &str = "0123456789abcdef";
    const KEY_CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
    /// Printable ASCII, and a tab.
    const PRINTABLE: &str = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\t";
    /// What a value may hold but a space.
    const VALUE_CHARS: &str = "!\"#$%&'()*+-./0123456789:;<>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";

    /// `traceparent` values: valid ones of every version but `ff`, with whatever a later version
    /// adds, and near-valid ones (each field right, or a digit short or long, with uppercase,
    /// signs, dots and spaces, under versions old, future and forbidden).
    fn traceparent() -> impl Strategy<Value = String> {
        let valid = (
            prop_oneof![
                Just(0),
                any::<u8>().prop_filter("ff is invalid", |v| *v != 0xff)
            ],
            any::<[u8; 16]>(),
            any::<[u8; 8]>(),
            any::<u8>(),
            text(PRINTABLE, 0..10),
        )
            .prop_map(|(version, trace_id, parent_id, flags, rest)| {
                let rest = if version == 0 {
                    String::new()
                } else {
                    format!("-{rest}")
                };
                format!(
                    "{version:02x}-{}-{}-{flags:02x}{rest}",
                    hex(&trace_id),
                    hex(&parent_id)
                )
            });
        let field = |digits: usize| {
            prop_oneof![
                3 => text(LOWER_HEX, digits..digits + 1),
                1 => text("0123456789abcdefABCDEF+. -", digits - 1..digits + 2),
                1 => Just("0".repeat(digits)),
            ]
        };
        let version = prop_oneof![
            Just("00".to_owned()),
            Just("cc".to_owned()),
            Just("ff".to_owned()),
            text("0123456789abcdefABCDEF+", 1..4),
        ];
        let rest = prop_oneof![
            Just(String::new()),
            (text("-.", 1..2), text(PRINTABLE, 0..10)).prop_map(|(dash, rest)| dash + &rest),
        ];
        let near = (version, field(32), field(16), field(2), rest).prop_map(
            |(version, trace_id, parent_id, flags, rest)| {
                format!("{version}-{trace_id}-{parent_id}-{flags}{rest}")
            },
        );
        let ows = || text(" \t", 0..3);
        (ows(), prop_oneof![valid, near], ows())
            .prop_map(|(before, value, after)| format!("{before}{value}{after}"))
    }

    /// `tracestate` values: list-members by the grammar (a few, or around the limit of 32), or
    /// a few near it; with whitespace and empty members between them.
    fn tracestate() -> impl Strategy<Value = String> {
        let simple_key = (
            text("abcdefghijklmnopqrstuvwxyz", 1..2),
            text(KEY_CHARS, 0..9),
        )
            .prop_map(|(first, rest)| first + &rest);
        let tenant_key = (
            text("abcdefghijklmnopqrstuvwxyz0123456789", 1..2),
            text(KEY_CHARS, 0..5),
            text("abcdefghijklmnopqrstuvwxyz", 1..2),
            text(KEY_CHARS, 0..14),
        )
            .prop_map(|(first, tenant, system_first, system)| {
                format!("{first}{tenant}@{system_first}{system}")
            });
        let valid_key = prop_oneof![simple_key, tenant_key].boxed();
        let valid_value = prop_oneof![
            text(VALUE_CHARS, 1..9),
            text(VALUE_CHARS, 1..5).prop_map(|value| format!(" {value}")),
        ]
        .boxed();
        let key = prop_oneof![3 => valid_key.clone(), 1 => text(PRINTABLE, 0..7)].boxed();
        let value = prop_oneof![3 => valid_value.clone(), 1 => text(PRINTABLE, 0..7)].boxed();
        let member = |key: BoxedStrategy<String>, value: BoxedStrategy<String>| {
            prop_oneof![
                8 => (key, value).prop_map(|(key, value)| format!("{key}={value}")),
                1 => Just(String::new()),
            ]
        };
        let list = |key: &BoxedStrategy<String>,
                    value: &BoxedStrategy<String>,
                    count: std::ops::Range<usize>| {
            prop::collection::vec(
                (member(key.clone(), value.clone()), text(" \t", 0..3)),
                count,
            )
            .prop_map(|members| {
                members
                    .into_iter()
                    .map(|(member, ows)| format!("{ows}{member}{ows}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
        };
        prop_oneof![
            3 => list(&valid_key, &valid_value, 0..6),
            // Around the limit of 32 list-members (empty ones do not count).
            1 => list(&valid_key, &valid_value, 30..36),
            2 => list(&key, &value, 0..6),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(1000)))]

        /// Whatever arrives, the parsers answer; they never panic (nor slice inside a character).
        #[test]
        fn arbitrary_values_never_panic(
            traceparent in prop::collection::vec(any::<char>(), 0..80)
                .prop_map(String::from_iter),
            tracestate in prop::collection::vec(any::<char>(), 0..80)
                .prop_map(String::from_iter),
            bytes in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let _ = TraceParent::parse(&traceparent);
            let _ = TraceParent::parse_bytes(&bytes);
            let _ = parse_tracestate([tracestate.as_str(), traceparent.as_str()]);
        }

        /// What the validator accepts leaves as it came: `traceparent` as version 00 with the
        /// same ids and sampled flag, `tracestate` with the same list-members in the same order;
        /// and reading that back gives the same context.
        #[test]
        fn accepted_headers_round_trip_through_inject(
            traceparent in traceparent(),
            tracestate in tracestate(),
        ) {
            let parsed = TraceParent::parse(&traceparent);
            let members = parse_tracestate([tracestate.as_str()]);
            let mut sent = BTreeMap::new();
            sent.insert(TRACEPARENT.to_owned(), traceparent.clone());
            sent.insert(TRACESTATE.to_owned(), tracestate.clone());
            let context = extract_map(&sent);
            let mut out = BTreeMap::new();
            inject_context(&context, &mut out);
            let Some(parsed) = parsed else {
                prop_assert!(out.is_empty(), "{traceparent:?} was refused, yet {out:?}");
                return Ok(());
            };
            prop_assert_eq!(
                &out[TRACEPARENT],
                &format!(
                    "00-{}-{}-{:02x}",
                    hex(&parsed.trace_id),
                    hex(&parsed.parent_id),
                    parsed.flags & 0x01
                )
            );
            let members = members.unwrap_or_default();
            prop_assert_eq!(parse_tracestate([out[TRACESTATE].as_str()]), Some(members));
            let again = extract_map(&out);
            prop_assert_eq!(
                again.span().span_context().clone(),
                context.span().span_context().clone()
            );
            let mut twice = BTreeMap::new();
            inject_context(&again, &mut twice);
            prop_assert_eq!(twice, out);
        }
    }

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
