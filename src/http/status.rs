//! The status page (`GET /`) and its data (`GET /api/v1/status`): one instance at a glance for a
//! person with a browser, and what `dispatchd top` polls.
//!
//! Owns: the [`StatusReport`] (version, instance, uptime, readiness and why, every dispatcher's
//! health, recent rate, error ratio, latency and breaker, the sinks and the bus), its HTML
//! rendering, and the few samples the recent rate is computed from.
//!
//! Invariants: every value that reaches the HTML goes through [`escape`] (dispatcher ids and
//! reasons come from users); the page needs nothing but itself (inline CSS, no script, no
//! external asset) and refreshes itself with `<meta http-equiv="refresh">`, so it works offline
//! and with JavaScript off. The readiness shown is `/ready`'s own verdict ([`super::dispatchers`]).
//!
//! Rendered by hand with `write!` rather than with a template crate: one small page, no loops
//! beyond two tables, and no proc-macro crate to compile for it; [`escape`] is the one rule a
//! template engine would have enforced, and a test feeds it a `<script>`.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use parking_lot::Mutex;
use prometheus::proto::{Metric, MetricFamily};
use serde::{Deserialize, Serialize};

use super::openapi::ErrorBody;
use super::{ApiError, ApiState};
use crate::health::{DispatcherHealth, State as Lifecycle};
use crate::telemetry::catalog::{self, label};
use crate::telemetry::stats::label_value;

/// How often the page reloads itself, in seconds.
pub(super) const REFRESH_SECONDS: u32 = 5;

/// The window the recent rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Samples closer together than this are not kept: at most `RATE_WINDOW / SAMPLE_EVERY` of them.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The dashboards the repository ships (`dashboards/`), named on the page for Grafana users.
const DASHBOARDS: [&str; 3] = [
    "overview.json",
    "dispatcher-health.json",
    "resilience-pipeline.json",
];

/// Everything the status page shows, as `GET /api/v1/status` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// `[server] instance_id`, or host name and port; absent for an embedded router.
    pub instance: Option<String>,
    pub uptime_seconds: f64,
    pub readiness: Readiness,
    /// Ordered by id: this process's dispatchers and the workers it knows.
    pub dispatchers: Vec<DispatcherRow>,
    /// Ordered by name; empty when metrics are disabled.
    pub sinks: Vec<SinkRow>,
    /// Absent when no bus publishes this instance's events.
    pub bus: Option<BusRow>,
}

/// `/ready`'s verdict and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    /// `ready`, `not_ready` or `shutting_down`, as `/ready` says.
    pub status: String,
    /// One line per unhealthy dispatcher (`id: reason`); the ones that make the instance
    /// unready come first.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatcherRow {
    pub dispatcher_id: String,
    /// `healthy`, `degraded` (breaker open), `stale` (no heartbeat within its threshold),
    /// `stopped`, `starting` or `unhealthy` (failing): what the colour says.
    pub health: String,
    /// The lifecycle state (`starting`, `running`, `degraded`, `stopped`).
    pub state: String,
    /// `in_process` or `remote`.
    pub origin: String,
    pub critical: bool,
    pub heartbeat_age_seconds: f64,
    pub stale_threshold_seconds: f64,
    /// Why it is unhealthy; absent when healthy.
    pub reason: Option<String>,
    /// Every call since start: runs, refusals and skips (in-process statistics; 0 for a worker
    /// this engine has no dispatcher for).
    pub calls: u64,
    /// Runs that failed: errors and timeouts.
    pub errors: u64,
    /// Calls a protection or a policy refused (`rejected`, `denied`).
    pub refusals: u64,
    /// `errors / runs`; absent before the first run.
    pub error_ratio: Option<f64>,
    /// Calls per second over the last minute of page loads; absent until two loads a second
    /// apart.
    pub rate_per_second: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// `closed`, `half_open` or `open`; absent without a breaker or with metrics disabled.
    pub breaker: Option<String>,
}

/// One sink of the event pipeline, from `sink_events_total` and `sink_queue_depth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkRow {
    pub sink: String,
    pub queue_depth: u64,
    pub received: u64,
    pub sent: u64,
    pub retried: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusRow {
    /// `memory`, `redis` or `custom`.
    pub kind: String,
    /// `ok` or `failing`.
    pub publishing: String,
}

/// Earlier call counts, to tell a recent rate from a lifetime total. Bounded: one sample a
/// second at most, none older than the window.
#[derive(Debug, Default)]
pub struct RecentCalls {
    samples: Mutex<VecDeque<(Instant, HashMap<String, u64>)>>,
}

impl RecentCalls {
    /// Records `calls` (by dispatcher id) taken at `now`, and answers each id's calls per second
    /// since the oldest sample of the window.
    fn rates(&self, now: Instant, calls: &HashMap<String, u64>) -> HashMap<String, f64> {
        let mut samples = self.samples.lock();
        while samples
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > RATE_WINDOW)
        {
            samples.pop_front();
        }
        let mut rates = HashMap::new();
        if let Some((at, before)) = samples.front() {
            let elapsed = now.saturating_duration_since(*at).as_secs_f64();
            if elapsed >= SAMPLE_EVERY.as_secs_f64() {
                for (id, count) in calls {
                    let earlier = before.get(id).copied().unwrap_or(0);
                    rates.insert(id.clone(), count.saturating_sub(earlier) as f64 / elapsed);
                }
            }
        }
        if samples
            .back()
            .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= SAMPLE_EVERY)
        {
            samples.push_back((now, calls.clone()));
        }
        rates
    }
}

/// `GET /api/v1/status`.
#[utoipa::path(
    get,
    path = "/api/v1/status",
    operation_id = "status",
    tag = "observe",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "What the status page shows, as JSON", content_type = "application/json", body = Object),
        (status = 401, description = "`unauthorized`: a token with the `metrics` scope exists and none was sent", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `metrics` scope", body = ErrorBody),
        (status = 503, description = "`overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn json(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<StatusReport>, ApiError> {
    report(state).await.map(Json)
}

/// `GET /`: the report as a page that reloads itself.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "status_page",
    tag = "observe",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The status page (HTML, reloads itself)", content_type = "text/html; charset=utf-8", body = String),
        (status = 401, description = "`unauthorized`: a token with the `metrics` scope exists and none was sent", body = ErrorBody),
        (status = 403, description = "`forbidden`: the token lacks the `metrics` scope", body = ErrorBody),
        (status = 503, description = "`overloaded` or `request_timeout`", body = ErrorBody),
    )
)]
pub(super) async fn page(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let report = report(state).await?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Html(render(&report, REFRESH_SECONDS)),
    )
        .into_response())
}

/// Builds the report now. Reading the metric families is CPU work proportional to the series,
/// so it runs on the blocking pool, as `/api/v1/stats` does.
async fn report(state: Arc<ApiState>) -> Result<StatusReport, ApiError> {
    let telemetry = state.telemetry.clone();
    let families = tokio::task::spawn_blocking(move || telemetry.gather().ok())
        .await
        .map_err(|_| ApiError::MetricsUnavailable("reading the metrics failed"))?
        .unwrap_or_default();
    let namespace = state.telemetry.namespace().to_owned();
    let all = state.health.all();
    let status = super::dispatchers::verdict(&state, &all).as_str();
    let mut reasons: Vec<(bool, String)> = all
        .iter()
        .filter(|h| !h.healthy)
        .map(|h| {
            let blocks = h.critical && h.origin == crate::health::Origin::InProcess;
            let why = h.reason.as_deref().unwrap_or("unhealthy");
            let note = if blocks {
                ""
            } else {
                " (not counted toward readiness)"
            };
            (!blocks, format!("{}: {why}{note}", h.dispatcher_id))
        })
        .collect();
    reasons.sort();
    if state.draining.is_cancelled() {
        reasons.insert(0, (false, "shutting down: draining".to_owned()));
    }

    let breakers = breaker_states(&families, &namespace);
    let mut dispatchers: Vec<DispatcherRow> =
        all.iter().map(|h| row(h, &state, &breakers)).collect();
    let calls: HashMap<String, u64> = dispatchers
        .iter()
        .map(|d| (d.dispatcher_id.clone(), d.calls))
        .collect();
    let rates = state.recent.rates(Instant::now(), &calls);
    for row in &mut dispatchers {
        row.rate_per_second = rates.get(&row.dispatcher_id).copied();
    }

    Ok(StatusReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        instance: state.instance_id.clone(),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        readiness: Readiness {
            status: status.to_owned(),
            reasons: reasons.into_iter().map(|(_, reason)| reason).collect(),
        },
        dispatchers,
        sinks: sinks(&families, &namespace),
        bus: state.events.as_ref().map(|bus| {
            let status = bus.status();
            BusRow {
                kind: status.kind.to_owned(),
                publishing: match status.publishing {
                    crate::bus::Publishing::Ok => "ok",
                    crate::bus::Publishing::Failing => "failing",
                }
                .to_owned(),
            }
        }),
    })
}

/// What the colour of a dispatcher's row says.
fn health_word(h: &DispatcherHealth) -> &'static str {
    if h.is_stale {
        "stale"
    } else if h.healthy {
        "healthy"
    } else {
        match h.state {
            Lifecycle::Degraded => "degraded",
            Lifecycle::Stopped => "stopped",
            Lifecycle::Starting => "starting",
            Lifecycle::Running => "unhealthy",
        }
    }
}

fn row(h: &DispatcherHealth, state: &ApiState, breakers: &HashMap<String, f64>) -> DispatcherRow {
    let stats = state.stats.as_ref().and_then(|s| s.get(&h.dispatcher_id));
    let count = |name: &str| {
        stats
            .as_ref()
            .and_then(|s| s.counts.get(name).copied())
            .unwrap_or(0)
    };
    let errors = count("error") + count("timeout");
    let runs = count("success") + errors;
    let refusals = count("rejected") + count("denied");
    let latency = stats.as_ref().and_then(|s| s.latency_ms);
    DispatcherRow {
        dispatcher_id: h.dispatcher_id.clone(),
        health: health_word(h).to_owned(),
        state: h.state.as_str().to_owned(),
        origin: match h.origin {
            crate::health::Origin::InProcess => "in_process",
            crate::health::Origin::Remote => "remote",
        }
        .to_owned(),
        critical: h.critical,
        heartbeat_age_seconds: h.heartbeat_age_seconds,
        stale_threshold_seconds: h.stale_threshold_seconds,
        reason: h.reason.clone(),
        calls: runs + refusals + count("skipped"),
        errors,
        refusals,
        error_ratio: (runs > 0).then(|| errors as f64 / runs as f64),
        rate_per_second: None,
        latency_p50_ms: latency.map(|l| l.p50),
        latency_p99_ms: latency.map(|l| l.p99),
        breaker: breakers.get(&h.dispatcher_id).map(|&value| {
            // The gauge's contract: 0 closed, 0.5 half-open, 1 open.
            if value >= 1.0 {
                "open"
            } else if value > 0.0 {
                "half_open"
            } else {
                "closed"
            }
            .to_owned()
        }),
    }
}

fn family<'f>(
    families: &'f [MetricFamily],
    namespace: &str,
    spec: catalog::InstrumentSpec,
) -> &'f [Metric] {
    let name = spec.exported_name(namespace);
    families
        .iter()
        .find(|f| f.name() == name)
        .map(|f| f.get_metric())
        .unwrap_or_default()
}

fn breaker_states(families: &[MetricFamily], namespace: &str) -> HashMap<String, f64> {
    family(
        families,
        namespace,
        catalog::DISPATCHER_CIRCUIT_BREAKER_STATE,
    )
    .iter()
    .filter_map(|m| {
        Some((
            label_value(m, label::DISPATCHER_ID)?.to_owned(),
            m.get_gauge().value(),
        ))
    })
    .collect()
}

fn sinks(families: &[MetricFamily], namespace: &str) -> Vec<SinkRow> {
    let mut rows: std::collections::BTreeMap<String, SinkRow> = Default::default();
    for metric in family(families, namespace, catalog::SINK_EVENTS) {
        let Some(sink) = label_value(metric, label::SINK) else {
            continue;
        };
        let row = rows
            .entry(sink.to_owned())
            .or_insert_with(|| empty_sink(sink));
        let value = metric.get_counter().value() as u64;
        match label_value(metric, label::OUTCOME) {
            Some("received") => row.received += value,
            Some("sent") => row.sent += value,
            Some("retried") => row.retried += value,
            Some("dropped") => row.dropped += value,
            Some("dead_lettered") => row.dead_lettered += value,
            _ => {}
        }
    }
    for metric in family(families, namespace, catalog::SINK_QUEUE_DEPTH) {
        if let Some(sink) = label_value(metric, label::SINK) {
            rows.entry(sink.to_owned())
                .or_insert_with(|| empty_sink(sink))
                .queue_depth = metric.get_gauge().value().max(0.0) as u64;
        }
    }
    rows.into_values().collect()
}

fn empty_sink(sink: &str) -> SinkRow {
    SinkRow {
        sink: sink.to_owned(),
        queue_depth: 0,
        received: 0,
        sent: 0,
        retried: 0,
        dropped: 0,
        dead_lettered: 0,
    }
}

/// `text` made safe for HTML text and for a double- or single-quoted attribute, written
/// straight into the page (no copy of the value).
struct Escaped<'a>(&'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0;
        let mut written = 0;
        // The characters replaced are ASCII, so every slice boundary is a char boundary.
        for (i, byte) in text.bytes().enumerate() {
            let entity = match byte {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                b'\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&text[written..i])?;
            f.write_str(entity)?;
            written = i + 1;
        }
        f.write_str(&text[written..])
    }
}

fn escape(text: &str) -> Escaped<'_> {
    Escaped(text)
}

/// Seconds as a person reads an uptime: `3d 4h`, `5m 2s`.
fn duration(seconds: f64) -> String {
    let total = seconds.max(0.0) as u64;
    let (d, h, m, s) = (
        total / 86_400,
        total / 3_600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn number(value: Option<f64>, precision: usize) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.precision$}"))
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{:.1} %", v * 100.0))
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1f2328;background:#fff}\
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}\
.meta{color:#59636e}.version{font-weight:normal;color:#59636e}\
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.7rem;color:#fff;font-weight:600}\
.badge.ready{background:#1a7f37}.badge.not_ready,.badge.shutting_down{background:#cf222e}\
ul.reasons{margin:.4rem 0;color:#cf222e}\
table{border-collapse:collapse;min-width:40rem}\
th,td{padding:.3rem .6rem;border-bottom:1px solid #d1d9e0;text-align:left}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;margin-right:.4rem;vertical-align:middle}\
tr.health-healthy .dot{background:#1a7f37}\
tr.health-degraded{background:#fff8c5}tr.health-degraded .dot{background:#bf8700}\
tr.health-starting .dot{background:#818b98}\
tr.health-stale,tr.health-unhealthy,tr.health-stopped{background:#ffebe9;color:#a40e26}\
tr.health-stale .dot,tr.health-unhealthy .dot,tr.health-stopped .dot{background:#cf222e}\
.empty{color:#59636e;font-style:italic}\
footer{margin-top:1.6rem;color:#59636e}a{color:#0969da}code{font-size:.9em}";

/// The page of `report`, reloading itself every `refresh` seconds.
pub fn render(report: &StatusReport, refresh: u32) -> String {
    let mut page = String::with_capacity(4096 + 512 * report.dispatchers.len());
    let instance = report.instance.as_deref().unwrap_or("dispatchd");
    // `write!` into a String cannot fail.
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>dispatchd · {instance}</title><style>{STYLE}</style></head><body>\
         <header><h1>dispatchd <span class=\"version\">{version}</span></h1>\
         <p class=\"meta\">instance <b id=\"instance\">{instance}</b> · up <span id=\"uptime\">{uptime}</span> · \
         <span id=\"readiness\" class=\"badge {ready}\">{ready_text}</span> · refreshes every {refresh} s</p>",
        instance = escape(instance),
        version = escape(&report.version),
        uptime = duration(report.uptime_seconds),
        ready = escape(&report.readiness.status),
        ready_text = escape(&report.readiness.status.replace('_', " ")),
    );
    if !report.readiness.reasons.is_empty() {
        page.push_str("<ul class=\"reasons\" id=\"reasons\">");
        for reason in &report.readiness.reasons {
            let _ = write!(page, "<li>{}</li>", escape(reason));
        }
        page.push_str("</ul>");
    }
    page.push_str("</header>");

    page.push_str(
        "<h2>Dispatchers</h2><table id=\"dispatchers\"><thead><tr><th>dispatcher</th>\
         <th>health</th><th>origin</th><th class=\"n\">rate /s</th><th class=\"n\">calls</th>\
         <th class=\"n\">error ratio</th><th class=\"n\">p50 ms</th><th class=\"n\">p99 ms</th>\
         <th>breaker</th><th class=\"n\">heartbeat</th><th>reason</th></tr></thead><tbody>",
    );
    if report.dispatchers.is_empty() {
        page.push_str("<tr><td colspan=\"11\" class=\"empty\">no dispatcher</td></tr>");
    }
    for d in &report.dispatchers {
        let id = escape(&d.dispatcher_id);
        let health = escape(&d.health);
        let _ = write!(
            page,
            "<tr class=\"dispatcher health-{health}\" data-id=\"{id}\" data-health=\"{health}\">\
             <td><span class=\"dot\"></span>{id}{critical}</td><td>{health}</td><td>{origin}</td>\
             <td class=\"n\">{rate}</td><td class=\"n\">{calls}</td><td class=\"n\">{ratio}</td>\
             <td class=\"n\">{p50}</td><td class=\"n\">{p99}</td><td>{breaker}</td>\
             <td class=\"n\">{age} s ago</td><td>{reason}</td></tr>",
            critical = if d.critical {
                " <small>critical</small>"
            } else {
                ""
            },
            origin = escape(&d.origin.replace('_', "-")),
            rate = number(d.rate_per_second, 1),
            calls = d.calls,
            ratio = percent(d.error_ratio),
            p50 = number(d.latency_p50_ms, 2),
            p99 = number(d.latency_p99_ms, 2),
            breaker = escape(d.breaker.as_deref().unwrap_or("–")),
            age = number(Some(d.heartbeat_age_seconds), 1),
            reason = escape(d.reason.as_deref().unwrap_or("")),
        );
    }
    page.push_str("</tbody></table>");

    page.push_str(
        "<h2>Sinks</h2><table id=\"sinks\"><thead><tr><th>sink</th><th class=\"n\">queued</th>\
         <th class=\"n\">received</th><th class=\"n\">sent</th><th class=\"n\">retried</th>\
         <th class=\"n\">dropped</th><th class=\"n\">dead-lettered</th></tr></thead><tbody>",
    );
    if report.sinks.is_empty() {
        page.push_str(
            "<tr><td colspan=\"7\" class=\"empty\">no sink (or metrics disabled)</td></tr>",
        );
    }
    for s in &report.sinks {
        let _ = write!(
            page,
            "<tr class=\"sink\" data-sink=\"{name}\"><td>{name}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            s.queue_depth,
            s.received,
            s.sent,
            s.retried,
            s.dropped,
            s.dead_lettered,
            name = escape(&s.sink),
        );
    }
    page.push_str("</tbody></table>");

    page.push_str("<h2>Bus</h2><p id=\"bus\">");
    match &report.bus {
        Some(bus) => {
            let _ = write!(
                page,
                "{} · publishing <b>{}</b>",
                escape(&bus.kind),
                escape(&bus.publishing)
            );
        }
        None => page.push_str("<span class=\"empty\">no bus</span>"),
    }
    page.push_str("</p>");

    page.push_str(
        "<footer><p><a href=\"/metrics\">/metrics</a> · <a href=\"/ready\">/ready</a> · \
         <a href=\"/api/v1/status\">/api/v1/status</a> · \
         <a href=\"/api/v1/openapi.json\">API description</a></p><p>Grafana dashboards \
         (import them from the repository's <code>dashboards/</code>, see docs/monitoring.md): ",
    );
    for (i, name) in DASHBOARDS.iter().enumerate() {
        let _ = write!(page, "{}<code>{name}</code>", if i > 0 { ", " } else { "" });
    }
    page.push_str("</p></footer></body></html>");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        StatusReport {
            version: "0.1.0".into(),
            instance: Some("eu-1a".into()),
            uptime_seconds: 3725.0,
            readiness: Readiness {
                status: "not_ready".into(),
                reasons: vec!["<b>x</b>: heartbeat older than 1s".into()],
            },
            dispatchers: vec![DispatcherRow {
                dispatcher_id: "<script>alert(1)</script>".into(),
                health: "stale".into(),
                state: "running".into(),
                origin: "remote".into(),
                critical: false,
                heartbeat_age_seconds: 4.0,
                stale_threshold_seconds: 1.0,
                reason: Some("said \"hi\" & <img src=x onerror=alert(2)>".into()),
                calls: 10,
                errors: 1,
                refusals: 0,
                error_ratio: Some(0.1),
                rate_per_second: Some(2.5),
                latency_p50_ms: Some(1.25),
                latency_p99_ms: Some(9.0),
                breaker: Some("open".into()),
            }],
            sinks: vec![SinkRow {
                sink: "jsonl'><i>".into(),
                queue_depth: 3,
                received: 10,
                sent: 7,
                retried: 0,
                dropped: 0,
                dead_lettered: 0,
            }],
            bus: Some(BusRow {
                kind: "memory".into(),
                publishing: "ok".into(),
            }),
        }
    }

    #[test]
    fn every_user_value_is_escaped() {
        let page = render(&report(), 5);
        for raw in ["<script>", "<img", "<b>x</b>", "<i>", "'><"] {
            assert!(!page.contains(raw), "{raw} reached the page unescaped");
        }
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("said &quot;hi&quot; &amp; &lt;img"));
        assert!(page.contains("data-sink=\"jsonl&#39;&gt;&lt;i&gt;\""));
        // The page carries no script of its own either.
        assert!(!page.contains("<script"));
    }

    #[test]
    fn the_page_shows_each_part_and_refreshes_itself() {
        let page = render(&report(), 7);
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"7\">"));
        assert!(page.contains("class=\"dispatcher health-stale\""));
        assert!(page.contains("class=\"badge not_ready\">not ready<"));
        assert!(page.contains("up <span id=\"uptime\">1h 2m</span>"));
        for cell in [
            "2.5",
            "10.0 %",
            "1.25",
            "9.00",
            "open",
            "memory · publishing <b>ok</b>",
        ] {
            assert!(page.contains(cell), "{cell} missing");
        }
        for link in [
            "/metrics",
            "/ready",
            "/api/v1/openapi.json",
            "overview.json",
        ] {
            assert!(page.contains(link), "{link} missing");
        }
        // No external asset: every link and source is this instance's own.
        assert!(!page.contains("http://") && !page.contains("https://"));
        // The colour a stale row gets is red.
        assert!(STYLE.contains("tr.health-stale,tr.health-unhealthy,tr.health-stopped{background:#ffebe9;color:#a40e26}"));
    }

    #[test]
    fn the_recent_rate_is_over_the_window_and_bounded() {
        let recent = RecentCalls::default();
        let start = Instant::now();
        let calls = |n: u64| HashMap::from([("a".to_owned(), n)]);
        assert!(recent.rates(start, &calls(0)).is_empty());
        // Too close to the first sample to say anything.
        assert!(
            recent
                .rates(start + Duration::from_millis(200), &calls(5))
                .is_empty()
        );
        let rates = recent.rates(start + Duration::from_secs(2), &calls(10));
        assert_eq!(rates["a"], 5.0);
        for second in 3..200 {
            recent.rates(start + Duration::from_secs(second), &calls(second * 10));
        }
        let samples = recent.samples.lock().len();
        assert!(samples <= 61, "{samples} samples kept");
        // Over the last minute: 10 calls a second.
        let rates = recent.rates(start + Duration::from_secs(200), &calls(2000));
        assert!((rates["a"] - 10.0).abs() < 1e-9, "{}", rates["a"]);
    }

    #[test]
    fn durations_read_like_uptimes() {
        assert_eq!(duration(5.2), "5s");
        assert_eq!(duration(125.0), "2m 5s");
        assert_eq!(duration(3725.0), "1h 2m");
        assert_eq!(duration(90_000.0), "1d 1h");
    }
}
