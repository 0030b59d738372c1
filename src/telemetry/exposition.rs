//! The two text formats of `/metrics`, written from the gathered metric families: the
//! Prometheus text format 0.0.4 (byte for byte what `prometheus::TextEncoder` writes, which a
//! test holds it to) and OpenMetrics 1.0 with exemplars.
//!
//! Why hand-written: `prometheus::TextEncoder` knows no OpenMetrics, and `prometheus-client`'s
//! encoder works on its own registry types, not on the families the OpenTelemetry exporter
//! gathers, nor on exemplars kept outside it. Writing both formats here, straight into one
//! `String` with no per-sample allocation, is also faster than `TextEncoder`.
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

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};

use super::RenderError;
use super::exemplars::{Exemplar, ExemplarStore};

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

/// Writes `families` in the Prometheus text format 0.0.4, as `prometheus::TextEncoder` does.
pub fn encode_text(families: &[MetricFamily], out: &mut String) -> Result<(), RenderError> {
    for family in families {
        check(family)?;
        let name = family.name();
        if !family.help().is_empty() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape(family.help(), false, out);
            out.push('\n');
        }
        let kind = family.get_field_type();
        out.push_str("# TYPE ");
        out.push_str(name);
        out.push(' ');
        out.push_str(type_name(kind)?);
        out.push('\n');
        for metric in family.get_metric() {
            match kind {
                MetricType::COUNTER => {
                    text_sample(out, name, "", metric, None, metric.get_counter().value())
                }
                MetricType::GAUGE => {
                    text_sample(out, name, "", metric, None, metric.get_gauge().value())
                }
                MetricType::HISTOGRAM => {
                    let histogram = metric.get_histogram();
                    let mut inf_seen = false;
                    let mut bound = String::new();
                    for bucket in histogram.get_bucket() {
                        let upper = bucket.upper_bound();
                        bound.clear();
                        let _ = write!(bound, "{upper}");
                        text_sample(
                            out,
                            name,
                            "_bucket",
                            metric,
                            Some(("le", &bound)),
                            bucket.cumulative_count() as f64,
                        );
                        inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    let count = histogram.get_sample_count() as f64;
                    if !inf_seen {
                        text_sample(out, name, "_bucket", metric, Some(("le", "+Inf")), count);
                    }
                    text_sample(out, name, "_sum", metric, None, histogram.get_sample_sum());
                    text_sample(out, name, "_count", metric, None, count);
                }
                MetricType::SUMMARY => {
                    let summary = metric.get_summary();
                    for quantile in summary.get_quantile() {
                        let q = quantile.quantile().to_string();
                        text_sample(
                            out,
                            name,
                            "",
                            metric,
                            Some(("quantile", &q)),
                            quantile.value(),
                        );
                    }
                    text_sample(out, name, "_sum", metric, None, summary.sample_sum());
                    text_sample(
                        out,
                        name,
                        "_count",
                        metric,
                        None,
                        summary.sample_count() as f64,
                    );
                }
                MetricType::UNTYPED => unreachable!("type_name refused it"),
            }
        }
    }
    Ok(())
}

fn check(family: &MetricFamily) -> Result<(), RenderError> {
    if family.get_metric().is_empty() {
        return Err(RenderError::Encode(format!(
            "metric family `{}` has no metrics",
            family.name()
        )));
    }
    if family.name().is_empty() {
        return Err(RenderError::Encode("a metric family has no name".into()));
    }
    Ok(())
}

fn type_name(kind: MetricType) -> Result<&'static str, RenderError> {
    Ok(match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::HISTOGRAM => "histogram",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => {
            return Err(RenderError::Encode(
                "untyped metrics are not exported".into(),
            ));
        }
    })
}

fn text_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    metric: &Metric,
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    out.push_str(suffix);
    labels(out, metric.get_label(), extra);
    out.push(' ');
    text_number(out, value);
    let timestamp = metric.timestamp_ms();
    if timestamp != 0 {
        let _ = write!(out, " {timestamp}");
    }
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

fn labels(out: &mut String, pairs: &[LabelPair], extra: Option<(&str, &str)>) {
    if pairs.is_empty() && extra.is_none() {
        return;
    }
    let mut separator = '{';
    for pair in pairs {
        out.push(separator);
        out.push_str(pair.name());
        out.push_str("=\"");
        escape(pair.value(), true, out);
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

/// Writes `families` as OpenMetrics 1.0, with the exemplars `store` keeps on the buckets of the
/// histograms it knows, and the closing `# EOF`.
pub fn encode_openmetrics(
    families: &[MetricFamily],
    store: Option<&ExemplarStore>,
    out: &mut String,
) -> Result<(), RenderError> {
    for family in families {
        check(family)?;
        let name = family.name();
        let kind = family.get_field_type();
        let (base, om_type) = match kind {
            MetricType::COUNTER => (name.strip_suffix("_total").unwrap_or(name), "counter"),
            MetricType::GAUGE if name == "target_info" => ("target", "info"),
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, type_name(kind)?),
        };
        out.push_str("# TYPE ");
        out.push_str(base);
        out.push(' ');
        out.push_str(om_type);
        out.push('\n');
        if om_type != "info" {
            if let Some(unit) = ["seconds", "bytes", "ratio"].into_iter().find(|unit| {
                base.len() > unit.len() + 1
                    && base.ends_with(unit)
                    && base[..base.len() - unit.len()].ends_with('_')
            }) {
                out.push_str("# UNIT ");
                out.push_str(base);
                out.push(' ');
                out.push_str(unit);
                out.push('\n');
            }
        }
        if !family.help().is_empty() {
            out.push_str("# HELP ");
            out.push_str(base);
            out.push(' ');
            escape(family.help(), true, out);
            out.push('\n');
        }
        for metric in family.get_metric() {
            match kind {
                MetricType::COUNTER => {
                    om_sample(out, base, "_total", metric, None);
                    om_number(out, metric.get_counter().value());
                    om_end(out, metric);
                }
                MetricType::GAUGE if om_type == "info" => {
                    om_sample(out, base, "_info", metric, None);
                    out.push('1');
                    om_end(out, metric);
                }
                MetricType::GAUGE => {
                    om_sample(out, base, "", metric, None);
                    om_number(out, metric.get_gauge().value());
                    om_end(out, metric);
                }
                MetricType::HISTOGRAM => {
                    let histogram = metric.get_histogram();
                    let exemplars = store.and_then(|s| s.series(name, metric.get_label()));
                    let mut inf_seen = false;
                    let mut bound = String::new();
                    let count = histogram.get_sample_count();
                    for bucket in histogram.get_bucket() {
                        let upper = bucket.upper_bound();
                        bound.clear();
                        om_bound(&mut bound, upper);
                        om_sample(out, base, "_bucket", metric, Some(("le", &bound)));
                        out.push_str(itoa::Buffer::new().format(bucket.cumulative_count()));
                        if let Some(exemplar) = exemplars.as_ref().and_then(|e| e.for_bound(upper))
                        {
                            om_exemplar(out, &exemplar);
                        }
                        om_end(out, metric);
                        inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    if !inf_seen {
                        om_sample(out, base, "_bucket", metric, Some(("le", "+Inf")));
                        out.push_str(itoa::Buffer::new().format(count));
                        if let Some(exemplar) =
                            exemplars.as_ref().and_then(|e| e.for_bound(f64::INFINITY))
                        {
                            om_exemplar(out, &exemplar);
                        }
                        om_end(out, metric);
                    }
                    om_sample(out, base, "_sum", metric, None);
                    om_number(out, histogram.get_sample_sum());
                    om_end(out, metric);
                    om_sample(out, base, "_count", metric, None);
                    out.push_str(itoa::Buffer::new().format(count));
                    om_end(out, metric);
                }
                MetricType::SUMMARY => {
                    let summary = metric.get_summary();
                    let mut q = String::new();
                    for quantile in summary.get_quantile() {
                        q.clear();
                        om_bound(&mut q, quantile.quantile());
                        om_sample(out, base, "", metric, Some(("quantile", &q)));
                        om_number(out, quantile.value());
                        om_end(out, metric);
                    }
                    om_sample(out, base, "_sum", metric, None);
                    om_number(out, summary.sample_sum());
                    om_end(out, metric);
                    om_sample(out, base, "_count", metric, None);
                    out.push_str(itoa::Buffer::new().format(summary.sample_count()));
                    om_end(out, metric);
                }
                MetricType::UNTYPED => unreachable!("type_name refused it"),
            }
        }
    }
    out.push_str("# EOF\n");
    Ok(())
}

/// A sample's name and labels and the space before its value.
fn om_sample(
    out: &mut String,
    base: &str,
    suffix: &str,
    metric: &Metric,
    extra: Option<(&str, &str)>,
) {
    out.push_str(base);
    out.push_str(suffix);
    labels(out, metric.get_label(), extra);
    out.push(' ');
}

/// The sample's timestamp, if any (OpenMetrics wants seconds), and the end of the line.
fn om_end(out: &mut String, metric: &Metric) {
    let timestamp = metric.timestamp_ms();
    if timestamp != 0 {
        om_timestamp(out, timestamp);
    }
    out.push('\n');
}

fn om_timestamp(out: &mut String, millis: i64) {
    let _ = write!(
        out,
        " {}.{:03}",
        millis.div_euclid(1000),
        millis.rem_euclid(1000)
    );
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

/// A bucket bound or quantile in the canonical form OpenMetrics asks for: `1.0`, `0.25`,
/// `+Inf`.
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
    om_timestamp(out, exemplar.timestamp_ms as i64);
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, TextEncoder};

    use super::*;
    use crate::config::MetricsConfig;
    use crate::telemetry::Telemetry;
    use opentelemetry::KeyValue;

    fn reference(families: &[MetricFamily]) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(families, &mut buffer).unwrap();
        String::from_utf8(buffer).unwrap()
    }

    fn ours(families: &[MetricFamily]) -> String {
        let mut out = String::new();
        encode_text(families, &mut out).unwrap();
        out
    }

    /// Many series through the SDK and opentelemetry-prometheus, with values and labels that
    /// need care: escaping, non-ASCII, NaN and infinities, fractions, large and negative numbers.
    fn tricky_telemetry() -> Telemetry {
        let telemetry = Telemetry::new(&MetricsConfig {
            enabled: true,
            namespace: "ns".into(),
            cardinality_limit: 5000,
        });
        let meter = telemetry.meter().unwrap();
        let counter = meter
            .u64_counter("om_things")
            .with_description("Things,\nwith a \\ \"help\".")
            .build();
        for n in 0..2000 {
            counter.add(n, &[KeyValue::new("shard", n.to_string())]);
        }
        let gauge = meter.f64_gauge("om_level").with_unit("By").build();
        for (n, value) in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.1,
            1e21,
            -3.5,
            1e-9,
            123456789.0,
        ]
        .into_iter()
        .enumerate()
        {
            gauge.record(
                value,
                &[KeyValue::new(
                    "case",
                    format!("{n} \"quoted\" \\ back\nslash é"),
                )],
            );
        }
        let histogram = meter
            .f64_histogram("om_wait")
            .with_unit("s")
            .with_boundaries(vec![0.001, 0.5, 1.0, 100.0])
            .build();
        for value in [0.0005, 0.5, 0.75, 99.0, 1000.0, f64::MAX / 2.0] {
            histogram.record(value, &[KeyValue::new("kind", "a")]);
        }
        histogram.record(1.0, &[KeyValue::new("kind", "b")]);
        telemetry
    }

    #[test]
    fn the_text_format_is_byte_for_byte_the_reference_encoders() {
        let telemetry = tricky_telemetry();
        let families = telemetry.gather().unwrap();
        let expected = reference(&families);
        // The SDK drops non-finite measurements; the raw registry below covers NaN and infinities.
        assert!(expected.contains("\\\"quoted\\\" \\\\ back\\nslash é"));
        assert!(
            expected
                .lines()
                .filter(|l| l.starts_with("ns_om_things_total{"))
                .count()
                == 2000
        );
        assert_eq!(ours(&families), expected);
        // And through the public renderer.
        assert_eq!(
            telemetry.render().unwrap(),
            reference(&telemetry.gather().unwrap())
        );
    }

    #[test]
    fn summaries_timestamps_and_a_given_inf_bucket_match_the_reference_too() {
        let registry = prometheus::Registry::new();
        let histogram = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("h", "help").buckets(vec![0.5, f64::INFINITY]),
            &["l"],
        )
        .unwrap();
        registry.register(Box::new(histogram.clone())).unwrap();
        histogram.with_label_values(&["x"]).observe(0.25);
        let gauge =
            prometheus::GaugeVec::new(prometheus::Opts::new("g", "a \\ gauge"), &["v"]).unwrap();
        registry.register(Box::new(gauge.clone())).unwrap();
        for value in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            1e21,
            2.5e-7,
        ] {
            gauge.with_label_values(&[&value.to_string()]).set(value);
        }
        let mut families = registry.gather();
        families
            .iter_mut()
            .find(|f| f.name() == "h")
            .unwrap()
            .mut_metric()[0]
            .set_timestamp_ms(1_700_000_000_123);
        let mut summary = MetricFamily::default();
        summary.set_name("s".into());
        summary.set_field_type(MetricType::SUMMARY);
        let mut metric = Metric::default();
        let mut value = prometheus::proto::Summary::default();
        let mut quantile = prometheus::proto::Quantile::default();
        quantile.set_quantile(0.99);
        quantile.set_value(2.5);
        value.set_quantile(vec![quantile]);
        value.set_sample_count(3);
        value.set_sample_sum(4.5);
        metric.set_summary(value);
        summary.mut_metric().push(metric);
        families.push(summary);
        let expected = reference(&families);
        assert!(expected.contains("g{v=\"NaN\"} NaN\n") && expected.contains("g{v=\"inf\"} inf\n"));
        assert_eq!(ours(&families), expected);

        let mut text = String::new();
        encode_openmetrics(&families, None, &mut text).unwrap();
        for line in [
            "g{v=\"NaN\"} NaN\n",
            "g{v=\"inf\"} +Inf\n",
            "g{v=\"-inf\"} -Inf\n",
            "h_bucket{l=\"x\",le=\"0.5\"} 1 1700000000.123\n",
            "h_bucket{l=\"x\",le=\"+Inf\"} 1 1700000000.123\n",
            "s{quantile=\"0.99\"} 2.5\n",
            "s_count 3\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn an_empty_family_is_an_error_not_a_panic() {
        let mut family = MetricFamily::default();
        family.set_name("empty".into());
        let mut out = String::new();
        assert!(matches!(
            encode_text(&[family.clone()], &mut out),
            Err(RenderError::Encode(_))
        ));
        assert!(matches!(
            encode_openmetrics(&[family], None, &mut out),
            Err(RenderError::Encode(_))
        ));
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_writes_units_and_eof() {
        let telemetry = tricky_telemetry();
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
        // Every family's TYPE comes before its samples, once.
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
