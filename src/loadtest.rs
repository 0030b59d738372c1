//! `dispatchd loadtest`: sustained ingest over HTTP at fixed rates, reporting throughput,
//! latency percentiles, errors and the target's resident memory.
//!
//! Open loop: request `i` of a step is due at `start + i / rate`, whatever happened to the ones
//! before it, and its latency is measured from when it was due, not from when a busy client got
//! round to sending it. A closed-loop generator (send, wait, send) slows down with the server and
//! hides exactly the queueing a load test is for ("coordinated omission").
//!
//! One exception, the client's own clock: a connection that is idle when its next request is due
//! sleeps until then, and tokio's timer wakes it up to two milliseconds late (its wheel ticks
//! every millisecond and rounds up). That delay is the load generator's, so such a request's
//! latency starts when the connection woke. A request whose connection was still waiting for the
//! previous answer when it fell due (a slow server) is timed from when it was due, as before.
//! Measured against the floor server at 5,000/s, timing every request from its due time gave a
//! p50 of 1.43 ms for a server that answers in tens of microseconds.
//!
//! Bounded: every step lasts `step`; at most `connections` requests are in flight.

use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// dispatchd's base URL, such as http://127.0.0.1:9000.
    pub target: String,
    /// Messages per second, one step each, in order.
    pub rates: Vec<u32>,
    /// How long each step lasts.
    pub step: Duration,
    /// Concurrent connections (and requests in flight) at most.
    pub connections: usize,
    /// Where messages are posted.
    pub topic: String,
    /// A bearer token with the ingest scope, when dispatchd requires one.
    pub token: Option<String>,
    /// The dispatchd process to read resident memory from (/proc/<pid>/status).
    pub pid: Option<u32>,
}

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    pub rate: u32,
    pub sent: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Other answers and transport failures.
    pub errors: u64,
    /// The errors by HTTP status; 0 for a request that got no answer (refused, timed out).
    pub errors_by_status: std::collections::BTreeMap<u16, u64>,
    /// The first error's answer (its JSON `error` and `message`, or the transport error), to
    /// say what went wrong.
    pub first_error: Option<String>,
    /// Answers per second over the step.
    pub throughput: f64,
    /// Latency percentiles in microseconds, from when each request was due (or, when its
    /// connection was idle and slept until then, from when the timer woke it).
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The target's resident memory (KiB) at the start and end of the step, and its highest.
    pub rss_kib: Option<(u64, u64, u64)>,
    /// The target's resident memory (KiB) at each tenth of the step: flat, or growing?
    pub rss_trend_kib: Vec<u64>,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>7}/s  sent {:>8}  ok {:>8}  errors {:>6}  achieved {:>9.0}/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms",
            self.rate,
            self.sent,
            self.ok,
            self.errors,
            self.throughput,
            self.p50_us as f64 / 1000.0,
            self.p90_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.max_us as f64 / 1000.0,
        )?;
        if !self.errors_by_status.is_empty() {
            let parts: Vec<String> = self
                .errors_by_status
                .iter()
                .map(|(status, n)| match status {
                    0 => format!("no answer {n}"),
                    _ => format!("{status} {n}"),
                })
                .collect();
            write!(f, "\n         errors by status: {}", parts.join(", "))?;
            if let Some(first) = &self.first_error {
                write!(f, " (first: {first})")?;
            }
        }
        if let Some((start, end, max)) = self.rss_kib {
            write!(
                f,
                "  rss {:.1} → {:.1} MiB (max {:.1})",
                start as f64 / 1024.0,
                end as f64 / 1024.0,
                max as f64 / 1024.0
            )?;
        }
        if !self.rss_trend_kib.is_empty() {
            let trend: Vec<String> = self
                .rss_trend_kib
                .iter()
                .map(|kib| format!("{:.1}", *kib as f64 / 1024.0))
                .collect();
            write!(
                f,
                "\n         rss by tenth of the step (MiB): {}",
                trend.join(" ")
            )?;
        }
        Ok(())
    }
}

/// Runs every step in turn, calling `report` after each.
pub async fn run(options: &Options, mut report: impl FnMut(&Step)) -> anyhow::Result<Vec<Step>> {
    anyhow::ensure!(options.connections > 0, "--connections must be at least 1");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections)
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let url = format!(
        "{}/api/v1/messages/{}",
        options.target.trim_end_matches('/'),
        options.topic
    );
    let mut steps = Vec::new();
    for &rate in &options.rates {
        anyhow::ensure!(rate > 0, "a rate must be at least 1 message per second");
        let step = one_step(&client, &url, options, rate).await?;
        report(&step);
        steps.push(step);
    }
    Ok(steps)
}

async fn one_step(
    client: &reqwest::Client,
    url: &str,
    options: &Options,
    rate: u32,
) -> anyhow::Result<Step> {
    let total = (options.step.as_secs_f64() * f64::from(rate)).ceil() as u64;
    let interval = 1.0 / f64::from(rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let rss_start = options.pid.and_then(resident_kib);
    let rss_max = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rss_trend = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = options.pid.map(|pid| {
        let rss_max = rss_max.clone();
        let rss_trend = rss_trend.clone();
        let tenth = options.step / 10;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(500));
            let mut next_tenth = tokio::time::Instant::now() + tenth;
            loop {
                ticks.tick().await;
                let Some(rss) = resident_kib(pid) else { return };
                rss_max.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                if tokio::time::Instant::now() >= next_tenth {
                    next_tenth += tenth;
                    if let Ok(mut trend) = rss_trend.lock() {
                        trend.push(rss);
                    }
                }
            }
        })
    });
    let connections = options.connections as u64;
    let mut workers = Vec::new();
    for worker in 0..connections {
        let client = client.clone();
        let url = url.to_owned();
        let token = options.token.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("static histogram bounds");
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut by_status = std::collections::BTreeMap::<u16, u64>::new();
            let mut first_error: Option<String> = None;
            let mut i = worker;
            while i < total {
                let due = start + Duration::from_secs_f64(i as f64 * interval);
                let sent = if tokio::time::Instant::now() >= due {
                    // Late already: the previous answer came after this request was due.
                    due
                } else {
                    tokio::time::sleep_until(due).await;
                    // The timer's lateness is the client's, not the server's.
                    tokio::time::Instant::now()
                };
                let body = format!(
                    "{{\"message_type\":\"load.test\",\"payload\":{{\"worker\":{worker},\"n\":{i}}}}}"
                );
                let mut request = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        // Read the answer: a request is done when its result arrived.
                        if response.bytes().await.is_ok() {
                            ok += 1;
                        } else {
                            errors += 1;
                            *by_status.entry(0).or_default() += 1;
                        }
                    }
                    Ok(response) => {
                        errors += 1;
                        let status = response.status().as_u16();
                        *by_status.entry(status).or_default() += 1;
                        let body = response.bytes().await.unwrap_or_default();
                        if first_error.is_none() {
                            first_error = Some(describe_error(status, &body));
                        }
                    }
                    Err(error) => {
                        errors += 1;
                        *by_status.entry(0).or_default() += 1;
                        if first_error.is_none() {
                            first_error = Some(format!("no answer: {error}"));
                        }
                    }
                }
                let latency = sent.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                let _ = latencies.record(latency);
                i += connections;
            }
            (latencies, ok, errors, by_status, first_error)
        }));
    }
    let mut latencies =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds");
    let (mut ok, mut errors) = (0, 0);
    let mut errors_by_status = std::collections::BTreeMap::<u16, u64>::new();
    let mut first_error = None;
    for worker in workers {
        let (histogram, worker_ok, worker_errors, by_status, worker_first) =
            worker.await.context("a load worker failed")?;
        latencies.add(histogram).context("merging latencies")?;
        ok += worker_ok;
        errors += worker_errors;
        for (status, n) in by_status {
            *errors_by_status.entry(status).or_default() += n;
        }
        first_error = first_error.or(worker_first);
    }
    let elapsed = start.elapsed().as_secs_f64().max(f64::EPSILON);
    let rss_end = options.pid.and_then(resident_kib);
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let rss_max = rss_max.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Step {
        rate,
        sent: total,
        ok,
        errors,
        errors_by_status,
        first_error,
        throughput: ok as f64 / elapsed,
        p50_us: latencies.value_at_quantile(0.50),
        p90_us: latencies.value_at_quantile(0.90),
        p99_us: latencies.value_at_quantile(0.99),
        max_us: latencies.max(),
        rss_kib: match (rss_start, rss_end) {
            (Some(a), Some(b)) => Some((a, b, rss_max.max(a).max(b))),
            _ => None,
        },
        rss_trend_kib: rss_trend.lock().map(|t| t.clone()).unwrap_or_default(),
    })
}

/// `400 invalid_message: …` from an error answer: the API's `{"error": {"code", "message"}}`,
/// or a dispatch result's `error_code` and `error_message`; else its status and the start of
/// its body.
fn describe_error(status: u16, body: &[u8]) -> String {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_owned();
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(answer) if answer["error"].is_object() => format!(
            "{status} {}: {}",
            text(&answer["error"]["code"]),
            text(&answer["error"]["message"])
        ),
        Ok(answer) if answer["error_code"].is_string() => format!(
            "{status} {}: {}",
            text(&answer["error_code"]),
            text(&answer["error_message"])
        ),
        _ => {
            let body = String::from_utf8_lossy(body);
            format!("{status} {}", body.chars().take(120).collect::<String>())
        }
    }
}

/// What went wrong when no step had a successful answer, in words a user can act on: the one
/// status every answer had and what it usually means, or the statuses seen.
pub fn diagnose(steps: &[Step], options: &Options) -> String {
    let mut by_status = std::collections::BTreeMap::<u16, u64>::new();
    for step in steps {
        for (status, n) in &step.errors_by_status {
            *by_status.entry(*status).or_default() += n;
        }
    }
    let first = steps.iter().find_map(|s| s.first_error.clone());
    let first = first.map_or_else(String::new, |f| format!(" (first answer: {f})"));
    let mut statuses = by_status.keys().copied();
    match (statuses.next(), statuses.next()) {
        (Some(0), None) => format!(
            "no request was answered: is dispatchd running at {}?{first}",
            options.target
        ),
        (Some(status @ (400 | 404 | 422)), None) => format!(
            "every answer was {status}: check the topic (--topic {}); dispatchd refused the messages{first}",
            options.topic
        ),
        (Some(status @ (401 | 403)), None) => format!(
            "every answer was {status}: check the token (--token or DISPATCHD_API_TOKEN, with the ingest scope){first}"
        ),
        (Some(status @ (429 | 503)), None) => format!(
            "every answer was {status}: dispatchd refused the load (shed, or its dispatchers' protections refused); lower the rate or see its /ready and /metrics{first}"
        ),
        (Some(status), None) => format!("every answer was {status}{first}"),
        _ => {
            let parts: Vec<String> = by_status
                .iter()
                .map(|(status, n)| match status {
                    0 => format!("no answer {n}"),
                    _ => format!("{status} {n}"),
                })
                .collect();
            format!(
                "a step had no successful answer; errors by status: {}{first}",
                parts.join(", ")
            )
        }
    }
}

/// A process's resident set (VmRSS) in KiB, from /proc.
pub fn resident_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
