//! `dispatchd simulate`: realistic traffic, so the dashboards and alerts can be seen working.
//!
//! With no target it runs dispatchd in-process with a demonstration set of dispatchers beside the
//! configured ones (a fast one with de-duplication, a slow one that sometimes times out, a flaky
//! one whose circuit breaker trips and recovers, a rate-limited one, and a command adapter behind
//! a policy that denies some commands) and drives traffic at it over its own HTTP interface,
//! which it serves meanwhile. With a target it sends the same mix to a running dispatchd.
//!
//! The traffic is bounded: at most `--rate` messages a second for `--duration`, at most
//! [`MAX_IN_FLIGHT`] requests at once; it stops early on Ctrl-C, and prints a summary.

mod demo;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppBuilder};
use crate::config::Config;
use crate::engine::{Category, DispatchStatus, Dispatcher, Effect, Route, RulePolicy};
use crate::resilience::{
    BreakerConfig, DedupConfig, RateLimitConfig, RateLimitMode, ResilienceConfig, RetryPolicy, Trip,
};

/// Requests in flight at once, at most.
pub const MAX_IN_FLIGHT: usize = 256;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// A running dispatchd's base URL; `None` runs one in-process.
    pub target: Option<String>,
    /// Messages per second.
    pub rate: f64,
    pub duration: Duration,
    /// Print a progress line every this often.
    pub progress_every: Duration,
}

/// What was sent and how dispatchd answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub sent: u64,
    /// By HTTP status code; 0 for a transport error.
    pub by_status: BTreeMap<u16, u64>,
    /// By the `status` of the dispatch results answered (`success`, `rejected`, ...); answers
    /// that are not a dispatch result (a request error, load shedding) are not counted here.
    pub by_dispatch_status: BTreeMap<DispatchStatus, u64>,
    pub elapsed: Duration,
}

impl Summary {
    /// Dispatches that failed for real (`dispatcher_error`, `timeout`, `publish_failed`) out of
    /// those that ran dispatchers (those and `success`; refusals, skips and client mistakes are
    /// on neither side): what alert `DispatchdHighErrorRatio` pages on above 5%. `None` when
    /// nothing ran.
    pub fn failure_ratio(&self) -> Option<f64> {
        failure_ratio(&self.by_dispatch_status)
    }
}

/// See [`Summary::failure_ratio`].
fn failure_ratio(statuses: &BTreeMap<DispatchStatus, u64>) -> Option<f64> {
    let count = |wanted: fn(&DispatchStatus) -> bool| -> u64 {
        statuses
            .iter()
            .filter(|(status, _)| wanted(status))
            .map(|(_, n)| n)
            .sum()
    };
    let failed = count(|s| {
        matches!(
            s,
            DispatchStatus::DispatcherError
                | DispatchStatus::Timeout
                | DispatchStatus::PublishFailed
        )
    });
    let ran = failed + count(|s| *s == DispatchStatus::Success);
    (ran > 0).then(|| failed as f64 / ran as f64)
}

/// Adds the demonstration dispatchers and their routes.
pub fn with_demo_dispatchers(builder: AppBuilder) -> AppBuilder {
    let base = builder.default_settings();
    let fast = crate::app::DispatcherSettings {
        resilience: ResilienceConfig {
            dedup: Some(DedupConfig {
                scope: Default::default(),
                ttl: Duration::from_secs(300),
                capacity: 100_000,
            }),
            ..ResilienceConfig::default()
        },
        ..base.clone()
    };
    let flaky = crate::app::DispatcherSettings {
        resilience: ResilienceConfig {
            retry: Some(RetryPolicy {
                attempts: 1,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            }),
            breaker: Some(BreakerConfig {
                trip: Trip::ConsecutiveFailures(3),
                cool_down: Duration::from_secs(2),
                half_open_successes: 2,
            }),
            ..ResilienceConfig::default()
        },
        ..base.clone()
    };
    let limited = crate::app::DispatcherSettings {
        resilience: ResilienceConfig {
            rate_limit: Some(RateLimitConfig {
                scope: Default::default(),
                per_second: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
                burst: NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN),
                mode: RateLimitMode::Wait {
                    max_wait: Duration::from_millis(300),
                },
            }),
            ..ResilienceConfig::default()
        },
        ..base.clone()
    };
    builder
        .dispatcher_with(
            Dispatcher::new("demo-fast", Category::Event, demo::Fast),
            fast,
        )
        .dispatcher_with(
            Dispatcher::new("demo-slow", Category::Event, demo::Slow)
                .with_timeout(Duration::from_millis(250)),
            base.clone(),
        )
        .dispatcher_with(
            Dispatcher::new("demo-flaky", Category::Intent, demo::Flaky::default()),
            flaky,
        )
        .dispatcher_with(
            Dispatcher::new("demo-audit", Category::Event, demo::Audit),
            limited,
        )
        .dispatcher_with(
            Dispatcher::command("demo-billing", demo::Billing)
                .with_policy(RulePolicy::new("refund-guard", Effect::Allow).deny("refund_all")),
            base,
        )
        .route(Route::new(
            "demo-orders",
            "shop.orders.events",
            Category::Event,
            "demo-fast",
        ))
        .route(Route::new(
            "demo-shipping",
            "shop.shipping.events",
            Category::Event,
            "demo-slow",
        ))
        .route(Route::new(
            "demo-payments",
            "shop.payments.intents",
            Category::Intent,
            "demo-flaky",
        ))
        .route(Route::new(
            "demo-audit",
            "shop.audit.events",
            Category::Event,
            "demo-audit",
        ))
        .route(Route::new(
            "demo-billing",
            "shop.billing.commands",
            Category::Command,
            "demo-billing",
        ))
}

/// Runs the simulation to its end (or to `stop`), starting dispatchd in-process when there is no
/// target. `serving` learns the in-process address once it listens.
pub async fn run(
    config: Config,
    options: Options,
    stop: CancellationToken,
    serving: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> anyhow::Result<Summary> {
    let (base, service) = match &options.target {
        Some(target) => (target.trim_end_matches('/').to_owned(), None),
        None => {
            // Nothing but this simulation sends to it: no load balancer to drain.
            let mut config = config;
            config.server.drain_delay = Duration::ZERO;
            let app = with_demo_dispatchers(App::builder(config)).build().await?;
            let addr = app.local_addr();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(app.run(shutdown.clone()));
            if let Some(serving) = serving {
                let _ = serving.send(addr);
            }
            (format!("http://{addr}"), Some((shutdown, task)))
        }
    };
    let summary = drive(&base, &options, &stop).await;
    if let Some((shutdown, task)) = service {
        shutdown.cancel();
        task.await.context("the in-process dispatchd panicked")??;
    }
    Ok(summary)
}

/// One message of the mix: topic and body.
fn next_message(recent: &mut Vec<String>, n: u64) -> (&'static str, Value) {
    let pick = fastrand::u32(0..100);
    match pick {
        // A duplicate of a recent order: the fast dispatcher skips it.
        0..10 if !recent.is_empty() => {
            let id = recent[fastrand::usize(0..recent.len())].clone();
            (
                "shop.orders.events",
                json!({"message_type": "order.placed", "message_id": id, "payload": {"duplicate": true}}),
            )
        }
        0..40 => {
            let id = format!("order-{n}");
            if recent.len() >= 1000 {
                recent.swap_remove(fastrand::usize(0..recent.len()));
            }
            recent.push(id.clone());
            (
                "shop.orders.events",
                json!({"message_type": "order.placed", "message_id": id, "payload": {"order": n}}),
            )
        }
        40..55 => (
            "shop.shipping.events",
            json!({"message_type": "parcel.sent", "payload": {"order": n}}),
        ),
        55..72 => (
            "shop.payments.intents",
            json!({"message_type": "payment.capture", "payload": {"order": n}}),
        ),
        72..87 => (
            "shop.audit.events",
            json!({"message_type": "audit.recorded", "payload": {"order": n}}),
        ),
        87..97 => (
            "shop.billing.commands",
            json!({"message_type": "refund", "payload": {"order": n}}),
        ),
        _ => (
            "shop.billing.commands",
            json!({"message_type": "refund_all", "payload": {}}),
        ),
    }
}

/// How the traffic was answered so far.
#[derive(Default)]
struct Answers {
    by_status: BTreeMap<u16, u64>,
    by_dispatch_status: BTreeMap<DispatchStatus, u64>,
}

/// The `status` field of a dispatch result; nothing else of the body is needed.
#[derive(serde::Deserialize)]
struct Answered {
    status: DispatchStatus,
}

async fn drive(base: &str, options: &Options, stop: &CancellationToken) -> Summary {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let answers: Arc<Mutex<Answers>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let started = Instant::now();
    let rate = options.rate.clamp(0.1, 100_000.0);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut progress = tokio::time::interval(options.progress_every);
    progress.tick().await;
    let deadline = tokio::time::sleep(options.duration);
    tokio::pin!(deadline);
    let mut recent = Vec::new();
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = &mut deadline => break,
            () = stop.cancelled() => break,
            _ = progress.tick() => {
                let answers = answers.lock().await;
                println!("{}", line(sent.load(Ordering::Relaxed), &answers, started.elapsed()));
            }
            _ = ticks.tick() => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
                n += 1;
                let (topic, body) = next_message(&mut recent, n);
                let request = client.post(format!("{base}/api/v1/messages/{topic}")).json(&body);
                let answers = answers.clone();
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (status, dispatch_status) = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let answered = response.json::<Answered>().await.ok();
                            (status, answered.map(|a| a.status))
                        }
                        Err(_) => (0, None),
                    };
                    let mut answers = answers.lock().await;
                    *answers.by_status.entry(status).or_default() += 1;
                    if let Some(dispatch_status) = dispatch_status {
                        *answers.by_dispatch_status.entry(dispatch_status).or_default() += 1;
                    }
                    drop(permit);
                });
            }
        }
    }
    // Let what is in flight finish, within the bound of the client's timeout.
    let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
    let answers = answers.lock().await;
    let summary = Summary {
        sent: sent.load(Ordering::Relaxed),
        by_status: answers.by_status.clone(),
        by_dispatch_status: answers.by_dispatch_status.clone(),
        elapsed: started.elapsed(),
    };
    println!("done: {}", line(summary.sent, &answers, summary.elapsed));
    summary
}

fn line(sent: u64, answers: &Answers, elapsed: Duration) -> String {
    let mut parts: Vec<String> = answers
        .by_dispatch_status
        .iter()
        .map(|(status, count)| format!("{status} {count}"))
        .collect();
    // Answers that were not a dispatch result (a request error, load shedding), and requests
    // that got no answer at all.
    let unanswered = answers.by_status.get(&0).copied().unwrap_or(0);
    let other = answers
        .by_status
        .values()
        .sum::<u64>()
        .saturating_sub(unanswered)
        .saturating_sub(answers.by_dispatch_status.values().sum());
    if other > 0 {
        parts.push(format!("other answers {other}"));
    }
    if unanswered > 0 {
        parts.push(format!("failed to send {unanswered}"));
    }
    if let Some(ratio) = failure_ratio(&answers.by_dispatch_status) {
        parts.push(format!("(failures {:.1}% of runs)", ratio * 100.0));
    }
    format!(
        "{:>6.1}s  sent {sent:>7}  {}",
        elapsed.as_secs_f64(),
        if parts.is_empty() {
            "no answers yet".to_owned()
        } else {
            parts.join("  ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_ratio_counts_what_the_error_alert_counts() {
        let statuses: BTreeMap<DispatchStatus, u64> = [
            (DispatchStatus::Success, 90),
            (DispatchStatus::Timeout, 6),
            (DispatchStatus::DispatcherError, 3),
            (DispatchStatus::PublishFailed, 1),
            (DispatchStatus::Rejected, 500),
            (DispatchStatus::Denied, 50),
            (DispatchStatus::Skipped, 40),
            (DispatchStatus::InvalidMessage, 10),
            (DispatchStatus::NoDispatcher, 10),
        ]
        .into_iter()
        .collect();
        assert_eq!(failure_ratio(&statuses), Some(0.1));
        assert_eq!(failure_ratio(&BTreeMap::new()), None);
        let answers = Answers {
            by_status: [(200, 130), (503, 500), (0, 2)].into_iter().collect(),
            by_dispatch_status: statuses,
        };
        let line = line(712, &answers, Duration::from_secs(3));
        assert!(line.contains("rejected 500"), "{line}");
        assert!(line.contains("failed to send 2"), "{line}");
        assert!(line.contains("(failures 10.0% of runs)"), "{line}");
    }
}
