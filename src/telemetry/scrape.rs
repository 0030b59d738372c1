//! One scrape, read straight from the SDK: the metric families `/metrics` encodes, named and
//! ordered exactly as opentelemetry-prometheus and `prometheus::Registry::gather` name and order
//! them (a test holds the two to the same bytes), without their per-sample allocations.
//!
//! Why not the exporter: it turns every data point into a `MetricFamily` of its own (two
//! `String`s per label, one per name and help), which the registry then merges, and that is two
//! thirds of a scrape's time at 10,000 series. Here, label names and values are borrowed from
//! the collected data, and a series allocates one small vector.
//!
//! What it reproduces from the exporter (0.33, with scope labels off): names sanitized, unit
//! suffixes (`s` → `_seconds` …), `_total` on monotonic sums, the namespace prefix;
//! `target_info` from the resource; attribute keys sanitized, keys that collide joined with `;`;
//! an instrument whose name was first seen with another type is dropped, one whose description
//! differs keeps the first; families in name order, series by label count then label values.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use opentelemetry::{Key, KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{self, AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};
use parking_lot::Mutex;

use super::catalog::InstrumentSpec;

/// A family's type, as both text formats name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family of a scrape.
#[derive(Debug)]
pub struct Family<'a> {
    pub name: Cow<'a, str>,
    pub help: Cow<'a, str>,
    pub kind: Kind,
    pub series: Vec<Series<'a>>,
}

/// One series: its labels (sanitized names, in order) and its value.
#[derive(Debug)]
pub struct Series<'a> {
    pub labels: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub value: Point,
}

impl Series<'_> {
    /// The value of label `name`, if it has one.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_ref())
    }
}

#[derive(Debug)]
pub enum Point {
    /// A counter's or a gauge's value.
    Number(f64),
    Histogram(Box<HistogramPoint>),
}

#[derive(Debug)]
pub struct HistogramPoint {
    /// Upper bound and cumulative count, in bound order (no `+Inf`: the encoders add it).
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// The SDK's manual reader, shared between the meter provider (which owns a reader) and the
/// [`Scraper`].
#[derive(Debug, Clone)]
pub(crate) struct Reader(Arc<ManualReader>);

impl Reader {
    pub(crate) fn new() -> Reader {
        Reader(Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        ))
    }
}

impl MetricReader for Reader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, _: InstrumentKind) -> Temporality {
        Temporality::Cumulative
    }
}

/// Collects and names one scrape's families.
pub(crate) struct Scraper {
    reader: Reader,
    /// With its trailing `_`, as the exporter keeps it.
    namespace: Option<String>,
    /// Every name seen so far, with the type and help it was first seen with (the exporter's
    /// rule for conflicts, kept across scrapes as it keeps it).
    known: Mutex<HashMap<String, (Kind, String)>>,
    target_info: OnceLock<Vec<(String, String)>>,
    /// The last scrape's collected data, handed back to the SDK, which refills it in place: its
    /// data-point vectors keep their capacity, so a scrape does not reallocate them (and fault
    /// their pages in) each time. Held for the whole scrape, since the families borrow from it;
    /// the SDK's collect serialises scrapes on its pipeline lock anyway.
    collected: Mutex<ResourceMetrics>,
}

impl Scraper {
    pub(crate) fn new(reader: Reader, namespace: &str) -> Scraper {
        let namespace = (!namespace.is_empty()).then(|| {
            let mut namespace = namespace.to_owned();
            if !namespace.ends_with('_') {
                namespace.push('_');
            }
            namespace
        });
        Scraper {
            reader,
            namespace,
            known: Mutex::new(HashMap::new()),
            target_info: OnceLock::new(),
            collected: Mutex::new(ResourceMetrics::default()),
        }
    }

    /// Collects now and hands `f` the families, in the order `/metrics` writes them: the SDK's,
    /// and `own`, which take the place of any SDK instrument of the same name (the SDK's copy of
    /// them is there only for OTLP; see [`super::striped`]).
    pub(crate) fn scrape<R>(
        &self,
        own: Vec<OwnFamily>,
        f: impl FnOnce(Vec<Family<'_>>) -> R,
    ) -> Result<R, String> {
        let mut collected = self.collected.lock();
        self.reader
            .collect(&mut collected)
            .map_err(|error| error.to_string())?;
        let collected = &*collected;
        let mut families: BTreeMap<Cow<'_, str>, Family<'_>> = BTreeMap::new();

        let target_info = self
            .target_info
            .get_or_init(|| attributes_general(&mut collected.resource().iter()));
        if !collected.resource().is_empty() {
            families.insert(
                Cow::Borrowed("target_info"),
                Family {
                    name: Cow::Borrowed("target_info"),
                    help: Cow::Borrowed("Target metadata"),
                    kind: Kind::Gauge,
                    series: vec![Series {
                        labels: target_info
                            .iter()
                            .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                            .collect(),
                        value: Point::Number(1.0),
                    }],
                },
            );
        }

        let mut known = self.known.lock();
        for scope in collected.scope_metrics() {
            for metric in scope.metrics() {
                if own.iter().any(|family| family.spec.name == metric.name()) {
                    continue;
                }
                let Some((kind, name)) = self.kind_and_name(metric) else {
                    continue;
                };
                let mut series = Vec::new();
                push_series(metric.data(), &mut series);
                add(
                    &mut families,
                    &mut known,
                    (kind, name),
                    metric.description(),
                    series,
                );
            }
        }
        for family in own {
            let name = self.exported_name(family.spec.name, family.spec.unit, false);
            add(
                &mut families,
                &mut known,
                (Kind::Histogram, name),
                family.spec.description,
                family.series,
            );
        }
        drop(known);

        let mut families: Vec<Family<'_>> = families.into_values().collect();
        for family in &mut families {
            order(&mut family.series);
        }
        Ok(f(families))
    }

    fn kind_and_name(&self, metric: &data::Metric) -> Option<(Kind, Cow<'static, str>)> {
        let (kind, monotonic) = match metric.data() {
            AggregatedMetrics::F64(data) => shape(data),
            AggregatedMetrics::U64(data) => shape(data),
            AggregatedMetrics::I64(data) => shape(data),
        }?;
        Some((
            kind,
            self.exported_name(metric.name(), metric.unit(), monotonic),
        ))
    }

    /// An instrument's name on `/metrics`, as the exporter makes it.
    fn exported_name(&self, name: &str, unit: &str, monotonic: bool) -> Cow<'static, str> {
        let name = sanitize_name(name);
        let suffix = unit_suffix(unit);
        let mut name: Cow<'static, str> = match (&self.namespace, suffix) {
            (Some(namespace), Some(suffix)) => Cow::Owned(format!("{namespace}{name}_{suffix}")),
            (Some(namespace), None) => Cow::Owned(format!("{namespace}{name}")),
            (None, Some(suffix)) => Cow::Owned(format!("{name}_{suffix}")),
            (None, None) => Cow::Owned(name.into_owned()),
        };
        if monotonic {
            name.to_mut().push_str("_total");
        }
        name
    }
}

/// A histogram family dispatchd keeps itself ([`super::striped`]), for [`Scraper::scrape`].
pub(crate) struct OwnFamily {
    pub(crate) spec: InstrumentSpec,
    pub(crate) series: Vec<Series<'static>>,
}

/// Adds an instrument's series to its family, by the exporter's rules: a name first seen with
/// another type is dropped, the first description seen is kept, no series writes nothing.
fn add<'a>(
    families: &mut BTreeMap<Cow<'a, str>, Family<'a>>,
    known: &mut HashMap<String, (Kind, String)>,
    (kind, name): (Kind, Cow<'static, str>),
    description: &'a str,
    mut series: Vec<Series<'a>>,
) {
    let help: Cow<'a, str> = match known.get(name.as_ref()) {
        Some((first, _)) if *first != kind => return,
        Some((_, help)) if help != description => Cow::Owned(help.clone()),
        Some(_) => Cow::Borrowed(description),
        None => {
            known.insert(name.clone().into_owned(), (kind, description.to_owned()));
            Cow::Borrowed(description)
        }
    };
    if series.is_empty() {
        return;
    }
    families
        .entry(name.clone())
        .or_insert_with(|| Family {
            name,
            help,
            kind,
            series: Vec::new(),
        })
        .series
        .append(&mut series);
}

/// Orders series as `Registry::gather` does: stable, by label count, then label values in
/// order. Sorted as plain integers (label count, the first value's first eight bytes, the
/// index), then the runs that tie on the first two are put right with the full comparison,
/// then the series are moved into place. A comparison sort over the series themselves was a
/// quarter to a third of a 10,000-series scrape (profiled): `memcmp` calls, or moving the
/// series around.
fn order(series: &mut [Series<'_>]) {
    let n = series.len();
    if n < 2 || u32::try_from(n).is_err() {
        return order_slow(series);
    }
    let mut keys: Vec<u128> = series
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let first = s.labels.first().map_or(0, |(_, value)| prefix(value));
            let len = s.labels.len().min(u32::MAX as usize) as u128;
            (len << 96) | (u128::from(first) << 32) | index as u128
        })
        .collect();
    keys.sort_unstable();
    let index = |key: u128| (key & u128::from(u32::MAX)) as usize;
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && keys[end] >> 32 == keys[start] >> 32 {
            end += 1;
        }
        if end - start > 1 {
            // Indices ascend within the run, so this stable sort keeps insertion order on ties.
            keys[start..end].sort_by(|a, b| full(&series[index(*a)], &series[index(*b)]));
        }
        start = end;
    }
    // In place, cycle by cycle: position `j` takes the series at `index(keys[j])`.
    let mut placed = vec![false; n];
    for start in 0..n {
        let mut j = start;
        while !placed[j] {
            placed[j] = true;
            let from = index(keys[j]);
            if from == start {
                break;
            }
            series.swap(j, from);
            j = from;
        }
    }
}

/// The general order, for more series than a `u32` counts.
fn order_slow(series: &mut [Series<'_>]) {
    series.sort_by(|a, b| a.labels.len().cmp(&b.labels.len()).then_with(|| full(a, b)));
}

/// Compares the label values in order (the label count is compared before).
fn full(a: &Series<'_>, b: &Series<'_>) -> std::cmp::Ordering {
    a.labels
        .iter()
        .zip(&b.labels)
        .map(|((_, x), (_, y))| x.cmp(y))
        .find(|order| order.is_ne())
        .unwrap_or(std::cmp::Ordering::Equal)
}

/// The first eight bytes of `value`, zero-padded, as a big-endian integer: ordered as the bytes
/// are, so a difference here is the strings' order and only a tie needs the full comparison.
fn prefix(value: &str) -> u64 {
    let bytes = value.as_bytes();
    let mut first = [0u8; 8];
    let n = bytes.len().min(8);
    first[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(first)
}

fn shape<T>(data: &MetricData<T>) -> Option<(Kind, bool)> {
    match data {
        MetricData::Histogram(_) => Some((Kind::Histogram, false)),
        MetricData::Gauge(_) => Some((Kind::Gauge, false)),
        MetricData::Sum(sum) if sum.is_monotonic() => Some((Kind::Counter, true)),
        MetricData::Sum(_) => Some((Kind::Gauge, false)),
        MetricData::ExponentialHistogram(_) => None,
    }
}

trait AsF64: Copy {
    fn as_f64(self) -> f64;
}

impl AsF64 for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

impl AsF64 for u64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl AsF64 for i64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

fn push_series<'a>(data: &'a AggregatedMetrics, out: &mut Vec<Series<'a>>) {
    match data {
        AggregatedMetrics::F64(data) => push_typed(data, out),
        AggregatedMetrics::U64(data) => push_typed(data, out),
        AggregatedMetrics::I64(data) => push_typed(data, out),
    }
}

fn push_typed<'a, T: AsF64>(data: &'a MetricData<T>, out: &mut Vec<Series<'a>>) {
    match data {
        MetricData::Sum(sum) => out.extend(sum.data_points().map(|point| Series {
            labels: labels(|| point.attributes()),
            value: Point::Number(point.value().as_f64()),
        })),
        MetricData::Gauge(gauge) => out.extend(gauge.data_points().map(|point| Series {
            labels: labels(|| point.attributes()),
            value: Point::Number(point.value().as_f64()),
        })),
        MetricData::Histogram(histogram) => out.extend(histogram.data_points().map(|point| {
            let mut cumulative = 0;
            let buckets = point
                .bounds()
                .zip(point.bucket_counts())
                .map(|(bound, count)| {
                    cumulative += count;
                    (bound, cumulative)
                })
                .collect();
            Series {
                labels: labels(|| point.attributes()),
                value: Point::Histogram(Box::new(HistogramPoint {
                    buckets,
                    sum: point.sum().as_f64(),
                    count: point.count(),
                })),
            }
        })),
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// A data point's labels: borrowed when every key is already a valid label name and no two
/// are alike (dispatchd's own attributes all are), else the exporter's general rule.
fn labels<'a, I: Iterator<Item = &'a KeyValue>>(
    attributes: impl Fn() -> I,
) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
    let valid = |key: &str| {
        key.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_')
    };
    if attributes().all(|kv| valid(kv.key.as_str())) {
        let mut labels: Vec<(Cow<'a, str>, Cow<'a, str>)> = attributes()
            .map(|kv| (Cow::Borrowed(kv.key.as_str()), value(&kv.value)))
            .collect();
        // The SDK usually hands attributes over in the order they were recorded with, which
        // for dispatchd's own instruments is already the sorted one.
        if !labels.is_sorted_by(|(a, _), (b, _)| a <= b) {
            labels.sort_by(|(a, _), (b, _)| a.cmp(b));
        }
        if labels.windows(2).all(|pair| pair[0].0 != pair[1].0) {
            return labels;
        }
    }
    attributes_general(&mut attributes().map(|kv| (&kv.key, &kv.value)))
        .into_iter()
        .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
        .collect()
}

fn value(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(other.to_string()),
    }
}

/// The exporter's `get_attrs` without extra labels: keys sanitized and sorted, the values of
/// keys that sanitize alike joined with `;` in the order of their original keys.
fn attributes_general<'a>(
    kvs: &mut dyn Iterator<Item = (&'a Key, &'a Value)>,
) -> Vec<(String, String)> {
    let mut by_key = BTreeMap::<String, Vec<(String, String)>>::new();
    for (key, value) in kvs {
        by_key
            .entry(sanitize_label(key.as_str()))
            .or_default()
            .push((key.as_str().to_owned(), value.to_string()));
    }
    by_key
        .into_iter()
        .map(|(key, mut values)| {
            values.sort_by(|(a, _), (b, _)| a.cmp(b));
            let joined: Vec<String> = values.into_iter().map(|(_, value)| value).collect();
            (key, joined.join(";"))
        })
        .collect()
}

fn sanitize_label(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The exporter's metric-name rule: a leading digit gets a `_` before it; from the first
/// character that is not alphanumeric, `_` or `:`, every non-ASCII-alphanumeric one but those
/// becomes `_`.
fn sanitize_name(name: &str) -> Cow<'_, str> {
    let mut prefix = "";
    let found = name.char_indices().find(|(i, c)| {
        if *i == 0 && c.is_ascii_digit() {
            prefix = "_";
            true
        } else {
            !c.is_alphanumeric() && *c != '_' && *c != ':'
        }
    });
    let Some((at, _)) = found else {
        return Cow::Borrowed(name);
    };
    let (valid, rest) = name.split_at(at);
    Cow::Owned(
        prefix
            .chars()
            .chain(valid.chars())
            .chain(rest.chars().map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                    c
                } else {
                    '_'
                }
            }))
            .collect(),
    )
}

/// The exporter's unit suffixes (UCUM to Prometheus words).
fn unit_suffix(unit: &str) -> Option<Cow<'static, str>> {
    const NOT_PER: [&str; 8] = ["1", "d", "h", "min", "s", "ms", "us", "ns"];
    if unit.is_empty() {
        return None;
    }
    if let Some(word) = unit_word(unit) {
        return Some(Cow::Borrowed(word));
    }
    let (first, second) = unit.split_once('/')?;
    match (NOT_PER.contains(&first), unit_word(first), per_word(second)) {
        (true, _, Some(second)) | (false, None, Some(second)) => {
            Some(Cow::Owned(format!("per_{second}")))
        }
        (false, Some(first), Some(second)) => Some(Cow::Owned(format!("{first}_per_{second}"))),
        _ => None,
    }
}

fn unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" | "B" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" | "KB" => "kilobytes",
        "MBy" | "MB" => "megabytes",
        "GBy" | "GB" => "gigabytes",
        "TBy" | "TB" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "1" => "ratio",
        "%" => "percent",
        _ => return None,
    })
}

fn per_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_prefix_orders_as_the_strings_do_or_ties() {
        let values = [
            "",
            "\0",
            "1",
            "10",
            "1\0",
            "1\0x",
            "2",
            "abcdefgh",
            "abcdefgh\0",
            "abcdefghi",
            "é",
            "z",
        ];
        for a in values {
            for b in values {
                let (pa, pb) = (super::prefix(a), super::prefix(b));
                if pa != pb {
                    assert_eq!(pa.cmp(&pb), a.cmp(b), "{a:?} {b:?}");
                }
            }
        }
    }
}
