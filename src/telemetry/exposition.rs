//! The two text formats of `/metrics`, written from one [`super::scrape`]: the Prometheus text
//! format 0.0.4 (byte for byte what opentelemetry-prometheus and `prometheus::TextEncoder`
//! write, which a test holds it to) and OpenMetrics 1.0 with exemplars.
//!
//! Why hand-written: `prometheus::TextEncoder` knows no OpenMetrics, and `prometheus-client`'s
//! encoder works on its own registry types, not on the SDK's collected data, nor on exemplars
//! kept outside it. Writing both formats here, straight into one `String` with no per-sample
//! allocation, is what brings a 10,000-series scrape near the SDK's own collect time.
//!
//! OpenMetrics choices, each allowed by the specification:
//! - a counter family is named without `_total` (`# TYPE dispatch_messages counter`) and its
//!   sample with it; `target_info` is an `info` family named `target`;
//! - `# UNIT` is written where the name ends with a unit (`_seconds`, `_bytes`, `_ratio`);
//! - no `_created` series: the OpenTelemetry exporter does not gather a start time per series,
//!   and a made-up one (the process start) would mislead; the specification makes them optional
//!   and Prometheus treats a missing `_created` as unknown, exactly as with 0.0.4;
//! - bucket bounds in their canonical form (`1.0`, `+Inf`), counts as integers;
//! - exemplars on histogram buckets only, with `trace_id` and `span_id` and a timestamp.

use std::fmt::Write as _;

use super::exemplars::{Exemplar, ExemplarStore};
use super::scrape::{Family, Kind, Point, Series};

/// The content type of the Prometheus text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of OpenMetrics 1.0.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A text format `/metrics` can answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0, with exemplars.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }

    /// The format an `Accept` header asks for. OpenMetrics only when it is strictly preferred
    /// to the 0.0.4 text (by q-value, `*/*` and `text/*` counting for the text), so a client that
    /// names neither, or both alike, keeps getting 0.0.4. Prometheus sends
    /// `application/openmetrics-text;version=1.0.0,…;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut openmetrics = 0.0f32;
        let mut text = 0.0f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for parameter in parts {
                let Some((key, value)) = parameter.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match key.trim().to_ascii_lowercase().as_str() {
                    // A q that does not parse ranks the range last rather than failing.
                    "q" => q = value.parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0),
                    "version" => version = Some(value.to_owned()),
                    _ => {}
                }
            }
            match media.as_str() {
                // 0.0.1 is OpenMetrics' draft version, which 1.0.0 answers as well.
                "application/openmetrics-text"
                    if matches!(version.as_deref(), None | Some("1.0.0" | "0.0.1")) =>
                {
                    openmetrics = openmetrics.max(q)
                }
                "text/plain" if matches!(version.as_deref(), None | Some("0.0.4")) => {
                    text = text.max(q)
                }
                "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics > text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// Writes `families` in the Prometheus text format 0.0.4, as `prometheus::TextEncoder` writes
/// what opentelemetry-prometheus gathers.
pub fn encode_text(families: &[Family<'_>], out: &mut String) {
    let mut bound = String::new();
    for family in families {
        let name = family.name.as_ref();
        if !family.help.is_empty() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape(&family.help, false, out);
            out.push('\n');
        }
        out.push_str("# TYPE ");
        out.push_str(name);
        out.push(' ');
        out.push_str(type_name(family.kind));
        out.push('\n');
        for series in &family.series {
            match &series.value {
                Point::Number(value) => text_sample(out, name, "", series, None, *value),
                Point::Histogram(histogram) => {
                    let mut inf_seen = false;
                    for (upper, cumulative) in &histogram.buckets {
                        bound.clear();
                        let _ = write!(bound, "{upper}");
                        text_sample(
                            out,
                            name,
                            "_bucket",
                            series,
                            Some(("le", &bound)),
                            *cumulative as f64,
                        );
                        inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    let count = histogram.count as f64;
                    if !inf_seen {
                        text_sample(out, name, "_bucket", series, Some(("le", "+Inf")), count);
                    }
                    text_sample(out, name, "_sum", series, None, histogram.sum);
                    text_sample(out, name, "_count", series, None, count);
                }
            }
        }
    }
}

fn type_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    }
}

fn text_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    series: &Series<'_>,
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    labels(out, series, extra);
    out.push(' ');
    text_number(out, value);
    out.push('\n');
}

/// `f64`'s `Display`, as `TextEncoder` writes values (`1`, `0.5`, `inf`, `NaN`), with a fast
/// path for whole numbers, which most samples are.
fn text_number(out: &mut String, value: f64) {
    if value.fract() == 0.0 && value.abs() < 1e15 && !(value == 0.0 && value.is_sign_negative()) {
        out.push_str(itoa::Buffer::new().format(value as i64));
    } else {
        let _ = write!(out, "{value}");
    }
}

fn labels(out: &mut String, series: &Series<'_>, extra: Option<(&str, &str)>) {
    if series.labels.is_empty() && extra.is_none() {
        return;
    }
    let mut separator = '{';
    for (name, value) in &series.labels {
        out.push(separator);
        out.push_str(name);
        out.push_str("=\"");
        escape(value, true, out);
        out.push('"');
        separator = ',';
    }
    if let Some((name, value)) = extra {
        out.push(separator);
        out.push_str(name);
        out.push_str("=\"");
        escape(value, true, out);
        out.push('"');
    }
    out.push('}');
}

/// Escapes `\` and newline (and `"` in label values), as both formats want.
fn escape(value: &str, quote: bool, out: &mut String) {
    let special = |c: char| c == '\\' || c == '\n' || (quote && c == '"');
    if !value.contains(special) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// The unit a family name ends with, as OpenMetrics' `# UNIT` names it.
fn unit_of(base: &str) -> Option<&'static str> {
    ["seconds", "bytes", "ratio"].into_iter().find(|unit| {
        base.strip_suffix(unit)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('_'))
    })
}

/// Writes `families` as OpenMetrics 1.0, with the exemplars `store` keeps on the buckets of the
/// histograms it knows, and the closing `# EOF`.
pub fn encode_openmetrics(
    families: &[Family<'_>],
    store: Option<&ExemplarStore>,
    out: &mut String,
) {
    let mut bound = String::new();
    // Every sample name a written family owns: OpenMetrics forbids two families sharing one
    // (a gauge `x` and a counter `x_total` both own `x`).
    let mut taken = std::collections::HashSet::new();
    for family in families {
        let name = family.name.as_ref();
        let (base, om_type) = match family.kind {
            Kind::Counter => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            Kind::Gauge if name == "target_info" => ("target", "info"),
            Kind::Gauge => (name, "gauge"),
            Kind::Histogram => (name, "histogram"),
        };
        let suffixes: &[&str] = match om_type {
            "counter" => &["", "_total", "_created"],
            "histogram" => &["", "_bucket", "_count", "_sum", "_created"],
            "info" => &["", "_info"],
            _ => &[""],
        };
        let owned: Vec<String> = suffixes.iter().map(|s| format!("{base}{s}")).collect();
        if owned.iter().any(|n| taken.contains(n)) {
            // Only an embedder's instruments can clash (a test parses dispatchd's own with
            // prometheus_client): the first family in name order keeps the name.
            tracing::debug!(
                family = name,
                "A metric family clashes with another in OpenMetrics and is left out of it."
            );
            continue;
        }
        taken.extend(owned);
        out.push_str("# TYPE ");
        out.push_str(base);
        out.push(' ');
        out.push_str(om_type);
        out.push('\n');
        if let Some(unit) = unit_of(base).filter(|_| om_type != "info") {
            out.push_str("# UNIT ");
            out.push_str(base);
            out.push(' ');
            out.push_str(unit);
            out.push('\n');
        }
        if !family.help.is_empty() {
            out.push_str("# HELP ");
            out.push_str(base);
            out.push(' ');
            escape(&family.help, true, out);
            out.push('\n');
        }
        for series in &family.series {
            match (&series.value, om_type) {
                (Point::Number(_), "info") => {
                    om_sample(out, base, "_info", series, None);
                    out.push_str("1\n");
                }
                (Point::Number(value), _) => {
                    let suffix = if family.kind == Kind::Counter {
                        "_total"
                    } else {
                        ""
                    };
                    om_sample(out, base, suffix, series, None);
                    om_number(out, *value);
                    out.push('\n');
                }
                (Point::Histogram(histogram), _) => {
                    let exemplars =
                        store.and_then(|store| store.series(name, |key| series.label(key)));
                    let exemplar = |upper: f64| exemplars.as_ref().and_then(|e| e.for_bound(upper));
                    let mut inf_seen = false;
                    for (upper, cumulative) in &histogram.buckets {
                        bound.clear();
                        om_bound(&mut bound, *upper);
                        om_sample(out, base, "_bucket", series, Some(("le", &bound)));
                        out.push_str(itoa::Buffer::new().format(*cumulative));
                        if let Some(exemplar) = exemplar(*upper) {
                            om_exemplar(out, &exemplar);
                        }
                        out.push('\n');
                        inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    if !inf_seen {
                        om_sample(out, base, "_bucket", series, Some(("le", "+Inf")));
                        out.push_str(itoa::Buffer::new().format(histogram.count));
                        if let Some(exemplar) = exemplar(f64::INFINITY) {
                            om_exemplar(out, &exemplar);
                        }
                        out.push('\n');
                    }
                    om_sample(out, base, "_sum", series, None);
                    om_number(out, histogram.sum);
                    out.push('\n');
                    om_sample(out, base, "_count", series, None);
                    out.push_str(itoa::Buffer::new().format(histogram.count));
                    out.push('\n');
                }
            }
        }
    }
    out.push_str("# EOF\n");
}

/// A sample's name and labels and the space before its value.
fn om_sample(
    out: &mut String,
    base: &str,
    suffix: &str,
    series: &Series<'_>,
    extra: Option<(&str, &str)>,
) {
    out.push_str(base);
    out.push_str(suffix);
    labels(out, series, extra);
    out.push(' ');
}

/// An OpenMetrics number: `+Inf`, `-Inf`, `NaN` or a decimal.
fn om_number(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        text_number(out, value);
    }
}

/// A bucket bound in the canonical form OpenMetrics asks for: `1.0`, `0.25`, `+Inf`.
fn om_bound(out: &mut String, value: f64) {
    if value.is_finite() && value.fract() == 0.0 {
        let _ = write!(out, "{value:.1}");
    } else {
        om_number(out, value);
    }
}

fn om_exemplar(out: &mut String, exemplar: &Exemplar) {
    let _ = write!(
        out,
        " # {{trace_id=\"{:032x}\",span_id=\"{:016x}\"}} ",
        exemplar.trace_id, exemplar.span_id
    );
    om_number(out, exemplar.value);
    let millis = exemplar.timestamp_ms;
    let _ = write!(out, " {}.{:03}", millis / 1000, millis % 1000);
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use opentelemetry::KeyValue;
    use prometheus::{Encoder, TextEncoder};

    use super::*;
    use crate::config::MetricsConfig;
    use crate::telemetry::{Telemetry, with_reference};
    use serde_json::json;

    fn reference(registry: &prometheus::Registry) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut buffer)
            .unwrap();
        steady(&String::from_utf8(buffer).unwrap())
    }

    /// Without the samples of process-wide counters, which tests running beside this one move
    /// between our collect and the reference's.
    fn steady(text: &str) -> String {
        text.lines()
            .filter(|line| {
                // With or without a namespace.
                !line.contains("otlp_exports_failed_total{")
                    && !line.contains("trace_spans_dropped_total ")
                    && !line.contains("trace_context_invalid_total{")
            })
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// Many series through the SDK, read by our scrape and by opentelemetry-prometheus at once,
    /// with names and labels that need care: escaping, non-ASCII, keys to sanitize and keys that
    /// sanitize alike, every value type, fractions, large and negative numbers, units.
    fn tricky(namespace: &str) -> (Telemetry, prometheus::Registry) {
        let (telemetry, registry) = with_reference(&MetricsConfig {
            enabled: true,
            namespace: namespace.into(),
            cardinality_limit: 5000,
        });
        let meter = telemetry.meter().unwrap();
        let counter = meter
            .u64_counter("om_things")
            .with_description("Things,\nwith a \\ \"help\".")
            .build();
        for n in 0..3000 {
            counter.add(n, &[KeyValue::new("shard", n.to_string())]);
        }
        // Values that tie on their first eight bytes (and some that are prefixes of others), in
        // series of one, two and three labels: the order's slow path.
        let tied = meter.u64_counter("om_tied").build();
        for n in (0..400).rev() {
            let value = format!("tenant-0000{}", n % 40);
            let labels = [
                KeyValue::new("a", value.clone()),
                KeyValue::new("b", format!("bucket-000{}", n / 40)),
                KeyValue::new("c", format!("{}", n % 3)),
            ];
            tied.add(1, &labels[..1 + n % 3]);
        }
        let gauge = meter.f64_gauge("om.level").with_unit("By").build();
        for (n, value) in [-0.0, 0.1, 1e21, -3.5, 1e-9, 123456789.0, f64::MAX]
            .into_iter()
            .enumerate()
        {
            gauge.record(
                value,
                &[
                    KeyValue::new("case", format!("{n} \"quoted\" \\ back\nslash é")),
                    KeyValue::new("z.key", n as i64),
                    KeyValue::new("a:key", n % 2 == 0),
                    KeyValue::new("f", 0.5 * n as f64),
                ],
            );
        }
        // Keys that sanitize alike are joined; a name that needs sanitizing; a per-unit.
        meter
            .i64_up_down_counter("om.lives-x/y")
            .with_unit("m/s")
            .build()
            .add(
                -7,
                &[KeyValue::new("a.b", "dot"), KeyValue::new("a_b", "under")],
            );
        let histogram = meter
            .f64_histogram("om_wait")
            .with_unit("s")
            .with_boundaries(vec![0.001, 0.5, 1.0, 100.0])
            .build();
        for value in [0.0005, 0.5, 0.75, 99.0, 1000.0, f64::MAX / 2.0] {
            histogram.record(value, &[KeyValue::new("kind", "a")]);
        }
        histogram.record(1.0, &[KeyValue::new("kind", "b")]);
        meter
            .u64_histogram("om_sizes")
            .with_unit("By")
            .with_boundaries(vec![10.0, 1000.0])
            .build()
            .record(20, &[]);
        // Two instruments under one name and type: one family; another type: dropped.
        meter
            .f64_counter("om_twice")
            .build()
            .add(1.5, &[KeyValue::new("v", "f")]);
        meter
            .u64_counter("om_twice")
            .build()
            .add(2, &[KeyValue::new("v", "u")]);
        meter
            .i64_gauge("om_twice")
            .build()
            .record(3, &[KeyValue::new("v", "g")]);
        // An instrument that never recorded writes nothing.
        let _ = meter.u64_counter("om_silent").build();
        (telemetry, registry)
    }

    #[test]
    fn the_text_format_is_byte_for_byte_the_reference_exporters() {
        for namespace in ["", "ns"] {
            let (telemetry, registry) = tricky(namespace);
            let ours = steady(&telemetry.render().unwrap());
            let expected = reference(&registry);
            assert!(expected.contains("\\\"quoted\\\" \\\\ back\\nslash é"));
            assert!(
                expected
                    .lines()
                    .filter(|l| l.contains("om_things_total{"))
                    .count()
                    == 3000
            );
            assert!(expected.contains("om_lives_x_y_meters_per_second{"));
            assert!(expected.contains("a_b=\"dot;under\""));
            for (n, (a, b)) in ours.lines().zip(expected.lines()).enumerate() {
                assert_eq!(a, b, "line {n}");
            }
            assert_eq!(ours, expected);
            // And a second scrape, after more recordings, still.
            telemetry
                .meter()
                .unwrap()
                .u64_counter("om_things")
                .with_description("Things,\nwith a \\ \"help\".")
                .build()
                .add(1, &[KeyValue::new("shard", "late")]);
            assert_eq!(steady(&telemetry.render().unwrap()), reference(&registry));
        }
    }

    /// The engine's latency histograms are ours ([`crate::telemetry::striped`]); with the
    /// reference exporter reading the SDK, the strategy records into the SDK's copies as well,
    /// so opentelemetry-prometheus writes the same observations from the SDK's aggregation.
    /// Six dispatchers under a cardinality limit of three: three series and the overflow one.
    #[test]
    fn the_engine_latency_histograms_are_byte_for_byte_the_reference_exporters() {
        use crate::engine::{Category, Dispatcher, Engine, Envelope, Route};
        use std::sync::Arc;

        use crate::engine::{Handler, HandlerError, Message, OutputMessage};

        struct Fails;
        #[async_trait::async_trait]
        impl Handler for Fails {
            async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
                Err(HandlerError::permanent("no"))
            }
        }
        struct Succeeds;
        #[async_trait::async_trait]
        impl Handler for Succeeds {
            async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
                Ok(Vec::new())
            }
        }

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for namespace in ["", "ns"] {
            let (telemetry, registry) = with_reference(&MetricsConfig {
                enabled: true,
                namespace: namespace.into(),
                cardinality_limit: 3,
            });
            let mut builder = Engine::builder()
                .dispatcher(Dispatcher::new("fails", Category::Intent, Fails))
                .route(Route::new("r-fails", "**", Category::Intent, "fails"));
            for n in 0..6 {
                builder = builder
                    .dispatcher(Dispatcher::new(format!("d{n}"), Category::Event, Succeeds))
                    .route(Route::new(
                        format!("r{n}"),
                        format!("t{n}.**"),
                        Category::Event,
                        format!("d{n}"),
                    ));
            }
            let ids: Vec<String> = builder.dispatcher_ids().map(str::to_owned).collect();
            let strategy = telemetry
                .engine_strategy(ids.iter().map(String::as_str))
                .unwrap();
            let engine = builder.instrumentation(Arc::new(strategy)).build().unwrap();
            runtime.block_on(async {
                for round in 0..5 {
                    for n in 0..6 {
                        if n <= round {
                            let topic = format!("t{n}.orders.events");
                            engine
                                .dispatch(&topic, &Envelope::new("t", json!({})))
                                .await;
                        }
                    }
                    engine
                        .dispatch("a.b.intents", &Envelope::new("t", json!({})))
                        .await;
                    engine
                        .dispatch("nowhere.events", &Envelope::new("t", json!({})))
                        .await;
                }
            });
            let ours: String = steady(&telemetry.render().unwrap())
                .lines()
                .filter(|line| !line.contains("metric_cardinality_overflow"))
                .map(|line| format!("{line}\n"))
                .collect();
            let expected = reference(&registry);
            let duration = format!(
                "{}dispatcher_execution_duration_seconds",
                if namespace.is_empty() { "" } else { "ns_" }
            );
            assert!(
                expected.contains(&format!("{duration}_count{{dispatcher_id=\"d0\"}} 5\n")),
                "{expected}"
            );
            assert!(
                expected.contains(&format!(
                    "{duration}_count{{otel_metric_overflow=\"true\"}}"
                )),
                "{expected}"
            );
            assert!(
                expected.contains("status=\"dispatcher_error\""),
                "{expected}"
            );
            assert_same_page(&ours, &expected);
            assert_overflowing(&telemetry, &duration);
        }
    }

    /// `ours` is `expected`, line for line (the first differing line named).
    fn assert_same_page(ours: &str, expected: &str) {
        for (n, (a, b)) in ours.lines().zip(expected.lines()).enumerate() {
            assert_eq!(a, b, "line {n}");
        }
        assert_eq!(ours, expected);
    }

    /// `metric_cardinality_overflow` reports `family` as overflowing.
    fn assert_overflowing(telemetry: &Telemetry, family: &str) {
        let page = telemetry.render().unwrap();
        assert!(
            page.contains(&format!("overflow{{metric=\"{family}\"}} 1\n")),
            "{page}"
        );
    }

    /// The HTTP request histogram is ours too: requests on several routes, methods and
    /// statuses, past a cardinality limit of four, give opentelemetry-prometheus's page byte for
    /// byte, in both exposition routes (`render` and, through `gather`, the stats API).
    #[test]
    fn the_http_request_histogram_is_byte_for_byte_the_reference_exporters() {
        use axum::http::Method;
        for namespace in ["", "ns"] {
            let (telemetry, registry) = with_reference(&MetricsConfig {
                enabled: true,
                namespace: namespace.into(),
                cardinality_limit: 4,
            });
            let http = telemetry.http_metrics().unwrap();
            let requests = [
                ("/api/v1/messages/{topic}", Method::POST, 200, 0.000_37),
                ("/api/v1/messages/{topic}", Method::POST, 200, 0.004),
                ("/api/v1/messages/{topic}", Method::POST, 503, 0.25),
                ("/health", Method::GET, 200, 0.000_01),
                ("/api/v1/messages/{topic}", Method::POST, 200, 1.5),
                ("/metrics", Method::GET, 200, 0.002),
                // The fifth series, past the limit of four: the overflow series.
                ("/api/v1/messages/{topic}", Method::PATCH, 404, 7.0),
                ("/health", Method::GET, 200, 0.1),
                ("/metrics", Method::GET, 200, 60.0),
            ];
            for (route, method, status, seconds) in &requests {
                http.request_finished(route, method, *status, *seconds);
            }
            let ours: String = steady(&telemetry.render().unwrap())
                .lines()
                .filter(|line| !line.contains("metric_cardinality_overflow"))
                .map(|line| {
                    format!(
                        "{line}
"
                    )
                })
                .collect();
            let expected = reference(&registry);
            let name = format!(
                "{}http_server_request_duration_seconds",
                if namespace.is_empty() { "" } else { "ns_" }
            );
            assert!(
                expected.contains(&format!(
                    "{name}_count{{http_request_method=\"POST\",http_response_status_code=\"200\",http_route=\"/api/v1/messages/{{topic}}\"}} 3\n"
                )),
                "{expected}"
            );
            assert!(
                expected.contains(&format!(
                    "{name}_count{{otel_metric_overflow=\"true\"}} 1\n"
                )),
                "{expected}"
            );
            assert_same_page(&ours, &expected);
            assert_overflowing(&telemetry, &name);
            let process_wide = |f: &prometheus::proto::MetricFamily| {
                !f.name().contains("otlp_exports_failed")
                    && !f.name().contains("trace_spans_dropped")
                    && !f.name().contains("trace_context_invalid")
                    && !f.name().contains("metric_cardinality_overflow")
            };
            let mut gathered = telemetry.gather().unwrap();
            let mut theirs = registry.gather();
            gathered.retain(process_wide);
            theirs.retain(process_wide);
            assert_eq!(gathered, theirs);
        }
    }

    #[test]
    fn gather_gives_the_reference_families_for_the_stats_api() {
        let (telemetry, registry) = tricky("");
        let process_wide = |f: &prometheus::proto::MetricFamily| {
            !matches!(
                f.name(),
                "otlp_exports_failed_total"
                    | "trace_spans_dropped_total"
                    | "trace_context_invalid_total"
            )
        };
        let mut ours = telemetry.gather().unwrap();
        let mut theirs = registry.gather();
        ours.retain(process_wide);
        theirs.retain(process_wide);
        assert!(ours.len() > 8);
        assert_eq!(ours, theirs);
    }

    fn series(labels: &[(&'static str, &'static str)], value: Point) -> Series<'static> {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| (Cow::Borrowed(*k), Cow::Borrowed(*v)))
                .collect(),
            value,
        }
    }

    #[test]
    fn non_finite_values_are_written_as_each_format_spells_them() {
        let family = Family {
            name: "g".into(),
            help: "".into(),
            kind: Kind::Gauge,
            series: [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0, 2.5e-7]
                .into_iter()
                .map(|v| series(&[], Point::Number(v)))
                .collect(),
        };
        let histogram = Family {
            name: "h".into(),
            help: "".into(),
            kind: Kind::Histogram,
            series: vec![series(
                &[("l", "x")],
                Point::Histogram(Box::new(crate::telemetry::scrape::HistogramPoint {
                    buckets: vec![(0.5, 1), (f64::INFINITY, 2)],
                    sum: f64::NAN,
                    count: 2,
                })),
            )],
        };
        let families = [family, histogram];
        let mut text = String::new();
        encode_text(&families, &mut text);
        assert_eq!(
            text,
            "# TYPE g gauge\ng NaN\ng inf\ng -inf\ng -0\ng 0.00000025\n# TYPE h histogram\nh_bucket{l=\"x\",le=\"0.5\"} 1\nh_bucket{l=\"x\",le=\"inf\"} 2\nh_sum{l=\"x\"} NaN\nh_count{l=\"x\"} 2\n"
        );
        let mut text = String::new();
        encode_openmetrics(&families, None, &mut text);
        assert_eq!(
            text,
            "# TYPE g gauge\ng NaN\ng +Inf\ng -Inf\ng -0\ng 0.00000025\n# TYPE h histogram\nh_bucket{l=\"x\",le=\"0.5\"} 1\nh_bucket{l=\"x\",le=\"+Inf\"} 2\nh_sum{l=\"x\"} NaN\nh_count{l=\"x\"} 2\n# EOF\n"
        );
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_writes_units_and_eof() {
        let (telemetry, _) = tricky("ns");
        let text = telemetry.render_as(Format::OpenMetrics).unwrap();
        assert!(text.ends_with("\n# EOF\n"), "{}", &text[text.len() - 100..]);
        assert!(text.contains("# TYPE ns_om_things counter\n"));
        assert!(text.contains("# HELP ns_om_things Things,\\nwith a \\\\ \\\"help\\\".\n"));
        assert!(text.contains("ns_om_things_total{shard=\"7\"} 7\n"));
        assert!(
            text.contains(
                "# TYPE ns_om_wait_seconds histogram\n# UNIT ns_om_wait_seconds seconds\n"
            )
        );
        assert!(text.contains("ns_om_wait_seconds_bucket{kind=\"a\",le=\"1.0\"} 3\n"));
        assert!(text.contains("ns_om_wait_seconds_bucket{kind=\"a\",le=\"+Inf\"} 6\n"));
        assert!(text.contains("ns_om_wait_seconds_count{kind=\"a\"} 6\n"));
        assert!(text.contains("# TYPE ns_om_level_bytes gauge\n# UNIT ns_om_level_bytes bytes\n"));
        assert!(text.contains("# TYPE target info\n") && text.contains("\ntarget_info{"));
        // A gauge `om_twice` and a counter `om_twice_total` would clash: the gauge stays.
        assert!(text.contains("\nns_om_twice{v=\"g\"} 3\n"));
        assert!(!text.contains("ns_om_twice_total"));
        // Every family's TYPE comes once.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let distinct: std::collections::BTreeSet<&str> =
            types.iter().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(types.len(), distinct.len());
    }

    #[test]
    fn the_accept_header_chooses_the_format_by_preference() {
        for (accept, format) in [
            (None, Format::Text),
            (Some("*/*"), Format::Text),
            (Some("text/plain"), Format::Text),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            // Prometheus 2.x and 3.x defaults.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                ),
                Format::OpenMetrics,
            ),
            (
                Some(
                    "text/plain;version=0.0.4;q=0.9, application/openmetrics-text; version=1.0.0; q=0.5",
                ),
                Format::Text,
            ),
            (
                Some("application/openmetrics-text;q=0.5, */*"),
                Format::Text,
            ),
            (
                Some("application/openmetrics-text;version=2.0.0"),
                Format::Text,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text),
            (
                Some("application/openmetrics-text;q=nonsense"),
                Format::Text,
            ),
            (
                Some("APPLICATION/OpenMetrics-Text; Version=\"1.0.0\""),
                Format::OpenMetrics,
            ),
            (Some(",;;=,"), Format::Text),
        ] {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
    }
}
