//! `dedup.scope` and `rate_limit.scope = "cluster"`: several App instances on one Redis behave
//! as one service; with Redis gone each instance falls back and says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispatchd::app::AppBuilder;
use dispatchd::engine::{
    Category, Dispatcher, Handler, HandlerError, Message, OutputMessage, Route,
};
use dispatchd::resilience::{DedupConfig, RateLimitConfig, RateLimitMode, ResilienceConfig, Scope};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::redis::{own_redis, redis_url, unique, use_redis};
use crate::support::{TestApp, sample, wait_for};

/// Counts its runs; fails when the payload says `fail`, waits for a permit when it says `hold`.
struct Probe {
    runs: AtomicUsize,
    holding: AtomicUsize,
    release: tokio::sync::Semaphore,
}

impl Default for Probe {
    fn default() -> Probe {
        Probe {
            runs: AtomicUsize::new(0),
            holding: AtomicUsize::new(0),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

struct ProbeHandler(Arc<Probe>);

#[async_trait::async_trait]
impl Handler for ProbeHandler {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        self.0.runs.fetch_add(1, Ordering::SeqCst);
        let payload = &message.envelope.payload;
        if payload["hold"] == json!(true) {
            self.0.holding.fetch_add(1, Ordering::SeqCst);
            let permit = self.0.release.acquire().await;
            drop(permit);
        }
        if payload["fail"] == json!(true) {
            return Err(HandlerError::permanent("told to fail"));
        }
        Ok(Vec::new())
    }
}

const TOPIC: &str = "shop.scope.events";

/// One instance on the Redis at `url` with the probe dispatcher `id` under `resilience`.
async fn instance(
    url: &str,
    prefix: &str,
    n: usize,
    id: &str,
    probe: &Arc<Probe>,
    resilience: ResilienceConfig,
) -> TestApp {
    let handler = ProbeHandler(probe.clone());
    TestApp::start_with(
        |config| {
            use_redis(config, url, prefix, &format!("instance-{n}"));
            // Only the probe answers, so each answer's status is its own.
            config.dispatchers.clear();
            config.routes.clear();
        },
        |builder: AppBuilder| {
            let mut settings = builder.default_settings();
            settings.resilience = resilience;
            builder
                .dispatcher_with(Dispatcher::new(id, Category::Event, handler), settings)
                .route(Route::new(id, TOPIC, Category::Event, id))
        },
    )
    .await
}

async fn send(app: &TestApp, message_id: &str, payload: Value) -> (StatusCode, Value) {
    let response = app
        .post_message(
            TOPIC,
            json!({"message_type": "probe", "message_id": message_id, "payload": payload}),
        )
        .await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn dedup(scope: Scope) -> ResilienceConfig {
    ResilienceConfig {
        dedup: Some(DedupConfig {
            ttl: Duration::from_secs(60),
            capacity: 1000,
            scope,
        }),
        ..ResilienceConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dedup_skips_a_retry_through_another_instance_and_lets_a_failure_run_again() {
    let Some(url) = redis_url().await else { return };
    let prefix = unique("scope-dedup");
    let id = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let probe = Arc::new(Probe::default());
    let a = instance(&url, &prefix, 1, &id, &probe, dedup(Scope::Cluster)).await;
    let b = instance(&url, &prefix, 2, &id, &probe, dedup(Scope::Cluster)).await;

    // Succeeded on A: B skips it.
    let (status, first) = send(&a, "m-ok", json!({})).await;
    assert_eq!(
        (status, first["status"].as_str()),
        (StatusCode::OK, Some("success"))
    );
    let (status, retry) = send(&b, "m-ok", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{retry}");
    assert_eq!(retry["status"], "skipped", "{retry}");
    assert_eq!(
        probe.runs.load(Ordering::SeqCst),
        1,
        "ran once in the fleet"
    );

    // Failed on A: the claim is dropped, so B runs the retry.
    let (status, _) = send(&a, "m-fail", json!({"fail": true})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, retry) = send(&b, "m-fail", json!({})).await;
    assert_eq!(
        (status, retry["status"].as_str()),
        (StatusCode::OK, Some("success"))
    );
    assert_eq!(probe.runs.load(Ordering::SeqCst), 3);

    // Running on A right now: B refuses (503, retry later), then skips once A succeeded.
    let running = {
        let a_url = a.url(&format!("/api/v1/messages/{TOPIC}"));
        let client = a.client.clone();
        tokio::spawn(async move {
            let body =
                json!({"message_type": "probe", "message_id": "m-slow", "payload": {"hold": true}});
            client
                .post(a_url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    wait_for("A to be running m-slow", || {
        probe.holding.load(Ordering::SeqCst) == 1
    })
    .await;
    let (status, refused) = send(&b, "m-slow", json!({})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["status"], "rejected", "{refused}");
    assert!(
        refused.to_string().contains("another instance is running"),
        "{refused}"
    );
    probe.release.add_permits(1);
    assert_eq!(running.await.unwrap(), StatusCode::OK);
    let (_, after) = send(&b, "m-slow", json!({})).await;
    assert_eq!(after["status"], "skipped", "{after}");
    assert_eq!(probe.runs.load(Ordering::SeqCst), 4);

    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_dedup_stays_per_process() {
    let Some(url) = redis_url().await else { return };
    let prefix = unique("scope-instance");
    let id = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let probe = Arc::new(Probe::default());
    let a = instance(&url, &prefix, 1, &id, &probe, dedup(Scope::Instance)).await;
    let b = instance(&url, &prefix, 2, &id, &probe, dedup(Scope::Instance)).await;
    assert_eq!(send(&a, "m", json!({})).await.1["status"], "success");
    assert_eq!(send(&a, "m", json!({})).await.1["status"], "skipped");
    assert_eq!(
        send(&b, "m", json!({})).await.1["status"],
        "success",
        "the default scope is the instance"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

fn limit(per_second: u32, burst: u32, mode: RateLimitMode) -> ResilienceConfig {
    ResilienceConfig {
        rate_limit: Some(RateLimitConfig {
            per_second: per_second.try_into().unwrap(),
            burst: burst.try_into().unwrap(),
            mode,
            scope: Scope::Cluster,
        }),
        ..ResilienceConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_rate_limit_admits_one_burst_across_three_instances() {
    let Some(url) = redis_url().await else { return };
    let prefix = unique("scope-limit");
    let id = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let probe = Arc::new(Probe::default());
    // One token a second, a burst of 5: 12 quick calls through three instances admit 5 (and
    // one more per second the calls took); per instance they would admit 12.
    let config = limit(1, 5, RateLimitMode::Reject);
    let mut apps = Vec::new();
    for n in 0..3 {
        apps.push(instance(&url, &prefix, n, &id, &probe, config.clone()).await);
    }
    let started = Instant::now();
    let mut admitted = 0;
    for round in 0..4 {
        for app in &apps {
            let (status, result) = send(app, &format!("m-{round}-{}", app.addr), json!({})).await;
            match status {
                StatusCode::OK => admitted += 1,
                StatusCode::SERVICE_UNAVAILABLE => assert_eq!(result["status"], "rejected"),
                other => panic!("unexpected {other}: {result}"),
            }
        }
    }
    let refills = started.elapsed().as_secs() as usize;
    assert!(
        (5..=5 + refills).contains(&admitted),
        "{admitted} admitted in {:?}",
        started.elapsed()
    );
    assert_eq!(probe.runs.load(Ordering::SeqCst), admitted);

    // Wait mode: the script reserves tokens ahead and each instance waits its share, so six
    // concurrent calls at 20/s with a burst of 1 wait about 0+50+…+250 ms in all (per instance
    // limiters would wait 3 × 50 ms).
    let id = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let waiting = limit(
        20,
        1,
        RateLimitMode::Wait {
            max_wait: Duration::from_secs(5),
        },
    );
    let mut apps_wait = Vec::new();
    for n in 0..3 {
        apps_wait.push(instance(&url, &prefix, 10 + n, &id, &probe, waiting.clone()).await);
    }
    let calls = apps_wait
        .iter()
        .cycle()
        .take(6)
        .enumerate()
        .map(|(i, app)| async move { send(app, &format!("w-{i}"), json!({})).await.0 });
    let statuses = futures::future::join_all(calls).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let mut waited = 0.0;
    for app in &apps_wait {
        let text = app.scrape().await;
        waited += sample(
            &text,
            &format!("dispatcher_rate_limiter_delay_seconds_sum{{dispatcher_id=\"{id}\"}}"),
        )
        .unwrap_or(0.0);
    }
    assert!(waited >= 0.4, "the fleet waited {waited} s in all");

    for app in apps.into_iter().chain(apps_wait) {
        app.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_dedup_runs_and_the_limiter_decides_locally_without_hanging() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let id = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let probe = Arc::new(Probe::default());
    let mut resilience = limit(1000, 1000, RateLimitMode::Reject);
    resilience.dedup = dedup(Scope::Cluster).dedup;
    let app = instance(&url, &unique("scope-down"), 1, &id, &probe, resilience).await;
    assert_eq!(send(&app, "before", json!({})).await.1["status"], "success");
    // From the start at zero, so that the first fallback is an increase to Prometheus.
    let text = app.scrape().await;
    for protection in ["dedup", "rate_limit"] {
        let series = format!(
            "dispatcher_cluster_fallbacks_total{{dispatcher_id=\"{id}\",protection=\"{protection}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(0.0), "{series} in\n{text}");
    }
    drop(own);

    let started = Instant::now();
    for n in 0..3 {
        let (status, result) = send(&app, &format!("during-{n}"), json!({})).await;
        assert_eq!(
            (status, result["status"].as_str()),
            (StatusCode::OK, Some("success")),
            "{result}"
        );
    }
    // At-least-once: with no shared record, a repeat runs again here only if the local cache
    // does not know it; this instance ran it, so its own cache still skips it.
    assert_eq!(
        send(&app, "during-0", json!({})).await.1["status"],
        "skipped"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an outage must not hang dispatch: {:?}",
        started.elapsed()
    );
    let text = app.scrape().await;
    for protection in ["dedup", "rate_limit"] {
        let series = format!(
            "dispatcher_cluster_fallbacks_total{{dispatcher_id=\"{id}\",protection=\"{protection}\"}}"
        );
        assert!(
            sample(&text, &series).unwrap_or(0.0) >= 1.0,
            "{series} in\n{text}"
        );
    }
    // With its Redis gone too, the app still stops within `stop`'s bound: the consumers give
    // up their last acknowledgements after a few seconds (they stay pending, for the next one).
    app.stop().await.unwrap();
}
