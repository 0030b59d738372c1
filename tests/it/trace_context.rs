//! W3C trace context, strictly: every case of `tests/data/traceparent-cases.txt` (the W3C test
//! suite's and the spec's) through `extract_http` and `extract_map`, then back out through
//! `inject_context`. The same cases go through real HTTP in `tests/traces.rs`.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use dispatchd::propagation::{
    TraceParent, extract_http, extract_map, inject_context, parse_tracestate,
};
use opentelemetry::Context;
use opentelemetry::trace::TraceContextExt;

use crate::w3c_cases::{Case, State, Trace, cases};

/// The case as HTTP headers, or `None` when HTTP cannot carry a value (a control character).
fn http_headers(case: &Case) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in &case.headers {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value.as_bytes()).ok()?,
        );
    }
    Some(headers)
}

/// What `context` says of the case, as `Err` with the case's name and what went wrong.
fn check(case: &Case, how: &str, context: &Context) -> Result<(), String> {
    let fail = |what: String| Err(format!("{} ({how}): {what}", case.name));
    let span = context.span();
    let span_context = span.span_context();
    let mut out = BTreeMap::new();
    inject_context(context, &mut out);
    match &case.trace {
        Trace::New => {
            if span_context.is_valid() || !out.is_empty() {
                return fail(format!(
                    "a new trace expected, got {span_context:?}, {out:?}"
                ));
            }
        }
        Trace::Inherit {
            trace_id,
            parent_id,
            sampled,
        } => {
            if !span_context.is_valid() || !span_context.is_remote() {
                return fail("the caller's trace expected, got none".into());
            }
            let got = (
                span_context.trace_id().to_string(),
                span_context.span_id().to_string(),
                span_context.is_sampled(),
            );
            if got != (trace_id.clone(), parent_id.clone(), *sampled) {
                return fail(format!(
                    "expected {trace_id} {parent_id} {sampled}, got {got:?}"
                ));
            }
            let flags = if *sampled { "01" } else { "00" };
            let traceparent = format!("00-{trace_id}-{parent_id}-{flags}");
            if out.get("traceparent") != Some(&traceparent) {
                return fail(format!("injected {out:?}, not {traceparent}"));
            }
            if out.get("tracestate").map(String::as_str) != Some(case.state.header()) {
                return fail(format!("injected {out:?}, not {:?}", case.state));
            }
        }
    }
    Ok(())
}

/// Every case, through both extractors: the inherited trace id, parent id and sampled flag, or
/// a new trace; and the tracestate that leaves with it.
#[test]
fn every_w3c_case_through_http_headers_and_envelope_headers() {
    let cases = cases();
    assert!(cases.len() >= 115, "{} cases", cases.len());
    let mut failures = Vec::new();
    let (mut through_http, mut through_map) = (0, 0);
    for case in &cases {
        if let Some(headers) = http_headers(case) {
            through_http += 1;
            failures.extend(check(case, "HTTP", &extract_http(&headers)).err());
        }
        if let Some(map) = case.as_map() {
            through_map += 1;
            failures.extend(check(case, "map", &extract_map(&map)).err());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Only values with a control character stay off HTTP; only mixed-case names and a second
    // traceparent stay off the map.
    assert_eq!(cases.len() - through_http, 1, "cases HTTP cannot carry");
    assert_eq!(cases.len() - through_map, 7, "cases a map cannot carry");
}

/// The parsers alone: `TraceParent::parse` accepts exactly the inherited cases' traceparent,
/// and `parse_tracestate` tells an invalid tracestate from an empty one.
#[test]
fn the_parsers_tell_invalid_from_empty() {
    for case in cases() {
        let lines = |wanted: &str| -> Vec<&str> {
            case.headers
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case(wanted))
                .map(|(_, value)| value.as_str())
                .collect()
        };
        let traceparents = lines("traceparent");
        if let [traceparent] = traceparents[..] {
            let parsed = TraceParent::parse(traceparent);
            assert_eq!(
                parsed.is_some(),
                matches!(case.trace, Trace::Inherit { .. }),
                "{}: {parsed:?}",
                case.name
            );
        }
        if matches!(case.trace, Trace::New) {
            continue;
        }
        let members = parse_tracestate(lines("tracestate"));
        let got = match members {
            None => State::Invalid,
            Some(members) if members.is_empty() => State::None,
            Some(members) => State::Keep(
                members
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        };
        assert_eq!(got, case.state, "{}", case.name);
    }
}

/// A multi-tenant key whose system id is 14 characters is valid, though the SDK's `TraceState`
/// refuses it: it still leaves with the trace, and with every span of that trace, but not with
/// another trace.
#[test]
fn a_tracestate_the_sdk_refuses_still_leaves_with_its_trace() {
    let mut headers = BTreeMap::new();
    headers.insert(
        "traceparent".to_owned(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
    );
    headers.insert("tracestate".to_owned(), "t@abcdefghijklmn=1".to_owned());
    let context = extract_map(&headers);
    let span = context.span();
    assert!(
        span.span_context().trace_state().header().is_empty(),
        "the SDK's TraceState cannot hold it"
    );
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
    let child = opentelemetry::trace::Tracer::start_with_context(&tracer, "child", &context);
    let child = context.with_span(child);
    let mut out = BTreeMap::new();
    inject_context(&child, &mut out);
    assert_eq!(out["tracestate"], "t@abcdefghijklmn=1");
    assert!(out["traceparent"].starts_with("00-0af7651916cd43dd8448eb211c80319c-"));

    let other = child.with_remote_span_context(opentelemetry::trace::SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes([7; 16]),
        opentelemetry::trace::SpanId::from_bytes([7; 8]),
        opentelemetry::trace::TraceFlags::SAMPLED,
        true,
        opentelemetry::trace::TraceState::NONE,
    ));
    let mut out = BTreeMap::new();
    inject_context(&other, &mut out);
    assert_eq!(out["tracestate"], "", "not carried into another trace");
}
