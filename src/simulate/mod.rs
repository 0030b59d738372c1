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
//!
//! Each progress line says what happened, three ways: the HTTP statuses, the dispatch statuses,
//! and the protections at work (a breaker open, a rate limit, a duplicate skipped, a policy
//! denial, a timeout, a retry), read from each answer's dispatcher outcomes; and how many
//! warnings dispatchd logged meanwhile ([`WarningCount`]), instead of the warnings themselves.
//!
//! With `--target`, the target's routes are read first (`GET /api/v1/routes`): a plain `serve`
//! routes none of the demonstration's intent and command topics (its answer would be 404
//! `no_dispatcher`) and runs no demonstration dispatcher, so only the topics it routes are sent
//! and the user is told why. Sending traffic that can only be refused would teach nothing.

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
    /// A bearer token for the target (ingest, and admin to read its routes).
    pub token: Option<String>,
    /// Counts the warnings logged meanwhile, for the progress lines.
    pub warnings: WarningCount,
}

impl Options {
    /// The in-process simulation at `rate` for `duration`, progress every 5 s.
    pub fn new(rate: f64, duration: Duration) -> Options {
        Options {
            target: None,
            rate,
            duration,
            progress_every: Duration::from_secs(5),
            token: None,
            warnings: WarningCount::default(),
        }
    }
}

/// Counts the events logged at WARN or ERROR: a tracing layer, so the simulation's progress lines
/// say "warnings 12" rather than interleaving hundreds of WARN lines a minute (every failure the
/// demonstration provokes on purpose is logged as one).
#[derive(Debug, Clone, Default)]
pub struct WarningCount(Arc<AtomicU64>);

impl WarningCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarningCount {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
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
    /// The protections at work, by [`Protection`], counted per dispatcher outcome.
    pub by_protection: BTreeMap<Protection, u64>,
    /// Warnings (and errors) dispatchd logged meanwhile.
    pub warnings: u64,
    /// The demonstration topics not sent because the target routes none of them.
    pub topics_left_out: Vec<&'static str>,
    pub elapsed: Duration,
}

/// A protection at work on one dispatcher of one dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protection {
    /// Refused: the circuit breaker is open.
    BreakerOpen,
    /// Refused (or held past its wait) by the rate limiter.
    RateLimited,
    /// Refused by the concurrency limit.
    ConcurrencyLimit,
    /// Refused by another protection (a remote worker unavailable, a cluster claim).
    OtherRefusal,
    /// A command policy denied it.
    PolicyDenied,
    /// De-duplication: already handled, not run again.
    DuplicateSkipped,
    /// It ran out of its timeout.
    TimedOut,
    /// It took more than one try.
    Retried,
}

impl Protection {
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::BreakerOpen => "breaker open",
            Protection::RateLimited => "rate limited",
            Protection::ConcurrencyLimit => "concurrency limit",
            Protection::OtherRefusal => "refused otherwise",
            Protection::PolicyDenied => "policy denied",
            Protection::DuplicateSkipped => "duplicate skipped",
            Protection::TimedOut => "timed out",
            Protection::Retried => "retried",
        }
    }

    /// The protections one dispatcher outcome shows (a retried call that then timed out shows
    /// both).
    fn of(outcome: &AnsweredOutcome) -> impl Iterator<Item = Protection> {
        use crate::engine::ExecutionResult as R;
        let message = outcome.error_message.as_deref().unwrap_or("");
        let main = match outcome.result {
            R::Rejected if message.contains("circuit breaker") => Some(Protection::BreakerOpen),
            R::Rejected if message.contains("rate limit") => Some(Protection::RateLimited),
            R::Rejected if message.contains("concurrency") => Some(Protection::ConcurrencyLimit),
            R::Rejected => Some(Protection::OtherRefusal),
            R::Denied => Some(Protection::PolicyDenied),
            R::Skipped => Some(Protection::DuplicateSkipped),
            R::Timeout => Some(Protection::TimedOut),
            _ => None,
        };
        main.into_iter()
            .chain((outcome.attempts > 1).then_some(Protection::Retried))
    }
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
    let mut topics: Vec<&'static str> = DEMO_TOPICS.iter().map(|(topic, _)| *topic).collect();
    let mut left_out = Vec::new();
    let (base, service) = match &options.target {
        Some(target) => {
            let base = target.trim_end_matches('/').to_owned();
            match routed_demo_topics(&base, options.token.as_deref()).await {
                Ok(routed) => {
                    let (sent, not): (Vec<_>, Vec<_>) = topics
                        .iter()
                        .partition(|topic| routed.topics.contains(topic));
                    anyhow::ensure!(
                        !sent.is_empty(),
                        "{base} routes none of the demonstration topics ({}): every message would be answered 404 no_dispatcher. Run `dispatchd simulate` without --target, which serves a dispatchd with the demonstration dispatchers, or point --target at one.",
                        topics.join(", ")
                    );
                    if !not.is_empty() {
                        println!(
                            "note: {base} routes {} of the {} demonstration topics; the others ({}) would be answered 404 no_dispatcher, so they are not sent.",
                            sent.len(),
                            topics.len(),
                            not.join(", ")
                        );
                    }
                    if !routed.demo_dispatchers {
                        println!(
                            "note: {base} runs none of the demonstration dispatchers (demo-*), as a plain `dispatchd serve` does: its own dispatchers answer, so the breaker, rate limiter, de-duplication and policy of the demonstration will not show. `dispatchd simulate` without --target runs them."
                        );
                    }
                    topics = sent;
                    left_out = not;
                }
                Err(why) => println!(
                    "note: cannot read the routes of {base} ({why}): every demonstration topic is sent; those it does not route are answered 404 no_dispatcher (counted as \"no route\")."
                ),
            }
            (base, None)
        }
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
    let mut summary = drive(&base, &options, &topics, &stop).await;
    summary.topics_left_out = left_out;
    if let Some((shutdown, task)) = service {
        shutdown.cancel();
        task.await.context("the in-process dispatchd panicked")??;
    }
    Ok(summary)
}

/// The demonstration's topics and their categories.
const DEMO_TOPICS: [(&str, Category); 5] = [
    ("shop.orders.events", Category::Event),
    ("shop.shipping.events", Category::Event),
    ("shop.payments.intents", Category::Intent),
    ("shop.audit.events", Category::Event),
    ("shop.billing.commands", Category::Command),
];

/// What a target routes of the demonstration.
struct Routed {
    topics: Vec<&'static str>,
    /// Whether any route leads to a demonstration dispatcher (`demo-*`).
    demo_dispatchers: bool,
}

/// Reads the target's routes and matches the demonstration topics against them the way the
/// engine does (enabled, same category, the pattern matching the topic; a route restricted to
/// message types counts, as some of the mix may match it).
async fn routed_demo_topics(base: &str, token: Option<&str>) -> Result<Routed, String> {
    #[derive(serde::Deserialize)]
    struct Routes {
        routes: Vec<RouteView>,
    }
    #[derive(serde::Deserialize)]
    struct RouteView {
        topic_pattern: String,
        message_category: Category,
        dispatcher_id: String,
        enabled: bool,
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.get(format!("{base}/api/v1/routes"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("it answered {}", response.status()));
    }
    let routes: Routes = response.json().await.map_err(|e| e.to_string())?;
    let mut routed = Routed {
        topics: Vec::new(),
        demo_dispatchers: false,
    };
    for (topic, category) in DEMO_TOPICS {
        let segments: Vec<&str> = topic.split('.').collect();
        for route in routes.routes.iter().filter(|r| r.enabled) {
            let Ok(pattern) = route.topic_pattern.parse::<crate::engine::TopicPattern>() else {
                continue;
            };
            if route.message_category == category && pattern.matches(&segments) {
                if !routed.topics.contains(&topic) {
                    routed.topics.push(topic);
                }
                routed.demo_dispatchers |= route.dispatcher_id.starts_with("demo-");
            }
        }
    }
    Ok(routed)
}

/// One message of the mix, among `topics` only: topic and body.
fn next_message_of(topics: &[&str], recent: &mut Vec<String>, n: u64) -> (&'static str, Value) {
    // Bounded: the mix gives every demonstration topic at least 10%, so a topic of `topics`
    // comes within a few draws; after 1000 the last draw is sent whatever it is.
    let mut message = next_message(recent, n);
    for _ in 0..1000 {
        if topics.contains(&message.0) {
            break;
        }
        message = next_message(recent, n);
    }
    message
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
    by_protection: BTreeMap<Protection, u64>,
}

/// What the summary needs of a dispatch result: its status and each dispatcher's outcome.
#[derive(serde::Deserialize)]
struct Answered {
    status: DispatchStatus,
    #[serde(default)]
    dispatchers: Vec<AnsweredOutcome>,
}

#[derive(serde::Deserialize)]
struct AnsweredOutcome {
    result: crate::engine::ExecutionResult,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    error_message: Option<String>,
}

async fn drive(
    base: &str,
    options: &Options,
    topics: &[&'static str],
    stop: &CancellationToken,
) -> Summary {
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
                println!("{}", line(sent.load(Ordering::Relaxed), &answers, options.warnings.get(), started.elapsed()));
            }
            _ = ticks.tick() => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else { continue };
                n += 1;
                let (topic, body) = next_message_of(topics, &mut recent, n);
                let mut request = client.post(format!("{base}/api/v1/messages/{topic}")).json(&body);
                if let Some(token) = &options.token {
                    request = request.bearer_auth(token);
                }
                let answers = answers.clone();
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (status, answered) = match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            (status, response.json::<Answered>().await.ok())
                        }
                        Err(_) => (0, None),
                    };
                    let mut answers = answers.lock().await;
                    *answers.by_status.entry(status).or_default() += 1;
                    if let Some(answered) = answered {
                        *answers.by_dispatch_status.entry(answered.status).or_default() += 1;
                        for protection in answered.dispatchers.iter().flat_map(Protection::of) {
                            *answers.by_protection.entry(protection).or_default() += 1;
                        }
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
        by_protection: answers.by_protection.clone(),
        warnings: options.warnings.get(),
        topics_left_out: Vec::new(),
        elapsed: started.elapsed(),
    };
    println!(
        "done: {}",
        line(summary.sent, &answers, summary.warnings, summary.elapsed)
    );
    if answers.by_status.get(&404).copied().unwrap_or(0) > 0 {
        println!(
            "note: {} answers were 404: the target has no route for those topics (a plain `dispatchd serve` routes only events); `dispatchd simulate` without --target runs the demonstration dispatchers.",
            answers.by_status[&404]
        );
    }
    if summary.warnings > 0 && std::env::var_os("DISPATCHD_LOG").is_none() {
        println!(
            "note: dispatchd logged {} warnings, most of them the failures the demonstration provokes on purpose; DISPATCHD_LOG=warn prints them (to stderr).",
            summary.warnings
        );
    }
    summary
}

/// One progress line: the HTTP statuses, the dispatch statuses, the protections at work, the
/// failure ratio the error alert watches, and the warnings logged.
fn line(sent: u64, answers: &Answers, warnings: u64, elapsed: Duration) -> String {
    let join = |parts: Vec<String>| parts.join(" · ");
    let mut sections = Vec::new();
    if !answers.by_status.is_empty() {
        sections.push(format!(
            "HTTP {}",
            join(
                answers
                    .by_status
                    .iter()
                    .map(|(status, count)| match status {
                        0 => format!("unsent {count}"),
                        404 => format!("404 (no route) {count}"),
                        _ => format!("{status} {count}"),
                    })
                    .collect()
            )
        ));
    }
    if !answers.by_dispatch_status.is_empty() {
        sections.push(format!(
            "dispatches {}",
            join(
                answers
                    .by_dispatch_status
                    .iter()
                    .map(|(status, count)| format!("{status} {count}"))
                    .collect()
            )
        ));
    }
    if !answers.by_protection.is_empty() {
        sections.push(format!(
            "protections {}",
            join(
                answers
                    .by_protection
                    .iter()
                    .map(|(protection, count)| format!("{} {count}", protection.as_str()))
                    .collect()
            )
        ));
    }
    if let Some(ratio) = failure_ratio(&answers.by_dispatch_status) {
        sections.push(format!("failures {:.1}% of runs", ratio * 100.0));
    }
    sections.push(format!("warnings {warnings}"));
    format!(
        "{:>6.1}s  sent {sent:>7}  {}",
        elapsed.as_secs_f64(),
        if answers.by_status.is_empty() {
            format!("no answers yet | warnings {warnings}")
        } else {
            sections.join(" | ")
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
            by_status: [(200, 130), (503, 500), (0, 2), (404, 3)]
                .into_iter()
                .collect(),
            by_dispatch_status: statuses,
            by_protection: [
                (Protection::BreakerOpen, 480),
                (Protection::RateLimited, 20),
            ]
            .into_iter()
            .collect(),
        };
        let line = line(712, &answers, 17, Duration::from_secs(3));
        assert!(
            line.contains("HTTP unsent 2 · 200 130 · 404 (no route) 3 · 503 500"),
            "{line}"
        );
        assert!(line.contains("rejected 500"), "{line}");
        assert!(
            line.contains("protections breaker open 480 · rate limited 20"),
            "{line}"
        );
        assert!(line.contains("failures 10.0% of runs"), "{line}");
        assert!(line.ends_with("| warnings 17"), "{line}");
    }

    /// Each refusal is told apart by its protection, from the outcome's sanitized message.
    #[test]
    fn outcomes_are_counted_by_the_protection_that_acted() {
        use crate::engine::ExecutionResult as R;
        let outcome = |result, attempts, message: &str| AnsweredOutcome {
            result,
            attempts,
            error_message: (!message.is_empty()).then(|| message.to_owned()),
        };
        let of = |o: AnsweredOutcome| Protection::of(&o).collect::<Vec<_>>();
        assert_eq!(
            of(outcome(
                R::Rejected,
                0,
                "refused: the circuit breaker is open"
            )),
            [Protection::BreakerOpen]
        );
        assert_eq!(
            of(outcome(R::Rejected, 0, "refused by the rate limiter")),
            [Protection::RateLimited]
        );
        assert_eq!(
            of(outcome(
                R::Rejected,
                0,
                "refused: too many calls are waiting for the concurrency limit"
            )),
            [Protection::ConcurrencyLimit]
        );
        assert_eq!(of(outcome(R::Denied, 0, "")), [Protection::PolicyDenied]);
        assert_eq!(
            of(outcome(R::Skipped, 0, "")),
            [Protection::DuplicateSkipped]
        );
        assert_eq!(
            of(outcome(R::Timeout, 2, "")),
            [Protection::TimedOut, Protection::Retried]
        );
        assert!(of(outcome(R::Success, 1, "")).is_empty());
    }
}
