//! `dispatchd loadtest`: sustained ingest over HTTP at fixed rates, reporting throughput,
//! latency percentiles, errors and the target's resident memory.
//!
//! Open loop: request `i` of a step is due at `start + i / rate`, whatever happened to the ones
//! before it, and its latency is measured from when it was due, not from when a busy client got
//! round to sending it. A closed-loop generator (send, wait, send) slows down with the server and
//! hides exactly the queueing a load test is for ("coordinated omission").
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
    /// Answers per second over the step.
    pub throughput: f64,
    /// Latency percentiles in microseconds, from when each request was due.
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
            let mut i = worker;
            while i < total {
                let due = start + Duration::from_secs_f64(i as f64 * interval);
                tokio::time::sleep_until(due).await;
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
                        }
                    }
                    _ => errors += 1,
                }
                let latency = due.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                let _ = latencies.record(latency);
                i += connections;
            }
            (latencies, ok, errors)
        }));
    }
    let mut latencies =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds");
    let (mut ok, mut errors) = (0, 0);
    for worker in workers {
        let (histogram, worker_ok, worker_errors) = worker.await.context("a load worker failed")?;
        latencies.add(histogram).context("merging latencies")?;
        ok += worker_ok;
        errors += worker_errors;
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
