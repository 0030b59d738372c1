use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::engine::{Category, Dispatcher, Handler, HandlerError, Message, OutputMessage};

#[derive(Default)]
struct Journal {
    events: Mutex<Vec<(String, LifecycleEvent)>>,
    heartbeats: AtomicUsize,
    active: Mutex<HashMap<String, i64>>,
}

impl LifecycleObserver for Journal {
    fn on_event(&self, id: &str, event: LifecycleEvent) {
        self.events.lock().unwrap().push((id.to_owned(), event));
    }

    fn on_heartbeat(&self, _: &str) {
        self.heartbeats.fetch_add(1, Ordering::SeqCst);
    }

    fn on_active(&self, id: &str, delta: i64) {
        *self
            .active
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += delta;
    }
}

impl Journal {
    fn events_of(&self, id: &str) -> Vec<LifecycleEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, e)| *e)
            .collect()
    }

    fn active_of(&self, id: &str) -> i64 {
        self.active.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

fn registry() -> (HealthRegistry, Arc<Journal>) {
    let journal = Arc::new(Journal::default());
    (
        HealthRegistry::new(HealthConfig::default(), Some(journal.clone())),
        journal,
    )
}

fn worker(threshold_secs: u64) -> Registration {
    Registration {
        origin: Origin::Remote,
        stale_threshold: Some(Duration::from_secs(threshold_secs)),
        critical: true,
        endpoint: None,
    }
}

#[tokio::test(start_paused = true)]
async fn healthy_then_stale_after_the_threshold_then_healthy_after_a_heartbeat() {
    let (registry, _) = registry();
    registry.register("w1", worker(60)).unwrap();
    assert!(registry.health("w1").unwrap().healthy);

    tokio::time::advance(Duration::from_secs(60)).await;
    let at_threshold = registry.health("w1").unwrap();
    assert!(
        !at_threshold.is_stale,
        "stale only once the age passes the threshold"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    let stale = registry.health("w1").unwrap();
    assert!(stale.is_stale && !stale.healthy);
    assert_eq!(stale.heartbeat_age_seconds, 61.0);
    assert_eq!(
        stale.reason.as_deref(),
        Some("stale: no heartbeat for 61 s (threshold 60 s)")
    );
    assert_eq!(registry.stale_count(), 1);
    assert_eq!(registry.healthy_count(), 0);

    registry.heartbeat("w1").unwrap();
    let fresh = registry.health("w1").unwrap();
    assert!(fresh.healthy && !fresh.is_stale);
    assert_eq!(fresh.heartbeat_age_seconds, 0.0);
    assert_eq!(fresh.uptime_seconds, 61.0);
}

#[tokio::test(start_paused = true)]
async fn reading_health_changes_nothing() {
    let (registry, journal) = registry();
    registry.register("w1", worker(10)).unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    let first = registry.health("w1").unwrap();
    let second = registry.health("w1").unwrap();
    assert_eq!(first, second);
    assert_eq!(registry.all(), vec![first.clone()]);
    assert_eq!(registry.all(), registry.all());
    assert!(first.is_stale, "still stale: reading is not a heartbeat");
    assert_eq!(journal.heartbeats.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_make_it_unhealthy_and_a_success_resets_them() {
    let (registry, _) = registry();
    registry.register("w1", worker(60)).unwrap();
    for _ in 0..4 {
        registry.record_failure("w1").unwrap();
    }
    let four = registry.health("w1").unwrap();
    assert_eq!(four.consecutive_failures, 4);
    assert!(four.healthy, "below the limit of 5");
    registry.record_failure("w1").unwrap();
    let five = registry.health("w1").unwrap();
    assert!(!five.healthy);
    assert_eq!(
        five.reason.as_deref(),
        Some("5 consecutive failures (limit 5)")
    );
    registry.record_success("w1").unwrap();
    let reset = registry.health("w1").unwrap();
    assert_eq!(reset.consecutive_failures, 0);
    assert!(reset.healthy);
}

#[test]
fn the_model_is_a_pure_function_of_its_inputs() {
    let base = Observation {
        heartbeat_age: Duration::from_secs(10),
        stale_threshold: Duration::from_secs(120),
        consecutive_failures: 0,
        failure_limit: 5,
        state: State::Running,
    };
    assert_eq!(
        evaluate(base),
        Verdict {
            healthy: true,
            is_stale: false,
            reason: None
        }
    );
    assert_eq!(evaluate(base), evaluate(base));
    let stopped = evaluate(Observation {
        state: State::Stopped,
        ..base
    });
    assert_eq!(stopped.reason.as_deref(), Some("stopped"));
    let starting = evaluate(Observation {
        state: State::Starting,
        ..base
    });
    assert!(starting.healthy);
    let stale = evaluate(Observation {
        heartbeat_age: Duration::from_secs(121),
        ..base
    });
    assert!(stale.is_stale && !stale.healthy);
}

#[tokio::test(start_paused = true)]
async fn workers_emit_register_restart_and_unregister_and_are_active_meanwhile() {
    let (registry, journal) = registry();
    registry.register("w1", worker(60)).unwrap();
    assert_eq!(journal.active_of("w1"), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    registry.register("w1", worker(60)).unwrap();
    assert_eq!(
        registry.health("w1").unwrap().uptime_seconds,
        10.0,
        "a live worker registering again did not restart: its uptime goes on"
    );
    tokio::time::advance(Duration::from_secs(61)).await;
    registry.register("w1", worker(60)).unwrap();
    assert_eq!(
        registry.health("w1").unwrap().uptime_seconds,
        0.0,
        "one that had gone stale came back: its uptime starts again"
    );
    assert_eq!(
        journal.active_of("w1"),
        1,
        "a re-registration is the same worker, not a second one"
    );
    registry.unregister("w1").unwrap();
    assert_eq!(journal.active_of("w1"), 0);
    assert_eq!(
        journal.events_of("w1"),
        [
            LifecycleEvent::Register,
            LifecycleEvent::Register,
            LifecycleEvent::Restart,
            LifecycleEvent::Unregister
        ],
        "only the return of a stale worker is a restart"
    );
    assert!(registry.health("w1").is_none());
    assert_eq!(
        registry.heartbeat("w1"),
        Err(UnknownDispatcher("w1".into()))
    );
    assert_eq!(
        registry.unregister("w1"),
        Err(UnknownDispatcher("w1".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn bad_ids_thresholds_and_too_many_workers_are_refused() {
    let config = HealthConfig {
        max_workers: 2,
        ..HealthConfig::default()
    };
    let registry = HealthRegistry::new(config, None);
    for id in ["", "has space", "slash/y", &"x".repeat(129)] {
        assert_eq!(
            registry.register(id, worker(60)).map(|_| ()),
            Err(RegisterError::InvalidId(id.to_owned()))
        );
    }
    assert!(matches!(
        registry.register("w", worker(0)),
        Err(RegisterError::InvalidThreshold(_))
    ));
    assert!(matches!(
        registry.register("w", worker(100_000)),
        Err(RegisterError::InvalidThreshold(_))
    ));
    registry.register("a", worker(60)).unwrap();
    registry.register("b", worker(60)).unwrap();
    assert_eq!(
        registry.register("c", worker(60)).map(|_| ()),
        Err(RegisterError::LimitReached(2))
    );
    registry.register("a", worker(60)).unwrap();
    registry.unregister("b").unwrap();
    registry.register("c", worker(60)).unwrap();

    let in_process = Registration {
        origin: Origin::InProcess,
        stale_threshold: None,
        critical: false,
        endpoint: None,
    };
    registry.register("local", in_process).unwrap();
    assert_eq!(
        registry.register("local", worker(60)).map(|_| ()),
        Err(RegisterError::InProcess("local".into()))
    );
}

struct Works;

#[async_trait]
impl Handler for Works {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

/// Its heartbeat panics the first `panics` times it is asked.
struct Flaky {
    panics: AtomicUsize,
}

#[async_trait]
impl Handler for Flaky {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }

    async fn heartbeat(&self) -> Result<(), HandlerError> {
        if self.panics.load(Ordering::SeqCst) > 0 {
            self.panics.fetch_sub(1, Ordering::SeqCst);
            panic!("lifecycle bug");
        }
        Ok(())
    }
}

fn in_process() -> Registration {
    Registration {
        origin: Origin::InProcess,
        stale_threshold: Some(Duration::from_secs(40)),
        critical: true,
        endpoint: None,
    }
}

#[tokio::test(start_paused = true)]
async fn in_process_dispatchers_heartbeat_from_their_task_and_stop_on_shutdown() {
    let (registry, journal) = registry();
    let dispatcher = Dispatcher::new("steady", Category::Event, Works);
    registry.register("steady", in_process()).unwrap();
    assert_eq!(registry.health("steady").unwrap().state, State::Starting);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(supervise(
        registry.clone(),
        dispatcher,
        Duration::from_secs(10),
        RestartBackoff::default(),
        shutdown.clone(),
    ));

    // Far past the threshold: the task's heartbeats keep it fresh.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let health = registry.health("steady").unwrap();
    assert_eq!(health.state, State::Running);
    assert!(
        health.healthy && health.heartbeat_age_seconds <= 10.0,
        "{health:?}"
    );
    assert!(journal.heartbeats.load(Ordering::SeqCst) >= 29);
    assert_eq!(journal.active_of("steady"), 1);

    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(
        journal.events_of("steady"),
        [
            LifecycleEvent::Register,
            LifecycleEvent::Start,
            LifecycleEvent::Stop,
            LifecycleEvent::Unregister
        ]
    );
    assert_eq!(journal.active_of("steady"), 0);
    assert!(registry.health("steady").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_task_is_restarted_counts_a_failure_and_the_others_keep_going() {
    let (registry, journal) = registry();
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    for dispatcher in [
        Dispatcher::new(
            "flaky",
            Category::Event,
            Flaky {
                panics: AtomicUsize::new(2),
            },
        ),
        Dispatcher::new("steady", Category::Event, Works),
    ] {
        registry.register(dispatcher.id(), in_process()).unwrap();
        tasks.push(tokio::spawn(supervise(
            registry.clone(),
            dispatcher,
            Duration::from_secs(10),
            RestartBackoff::default(),
            shutdown.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(120)).await;

    let flaky = journal.events_of("flaky");
    assert_eq!(
        flaky
            .iter()
            .filter(|e| **e == LifecycleEvent::Restart)
            .count(),
        2,
        "{flaky:?}"
    );
    assert_eq!(
        flaky
            .iter()
            .filter(|e| **e == LifecycleEvent::Start)
            .count(),
        3,
        "{flaky:?}"
    );
    let health = registry.health("flaky").unwrap();
    assert_eq!(
        health.consecutive_failures, 2,
        "each restart counts as a failure"
    );
    assert!(
        health.healthy && !health.is_stale,
        "it heartbeats again after the restarts"
    );
    assert_eq!(
        journal.active_of("flaky"),
        1,
        "running once, however often it restarted"
    );
    assert_eq!(
        journal.events_of("steady"),
        [LifecycleEvent::Register, LifecycleEvent::Start]
    );
    assert!(registry.health("steady").unwrap().healthy);

    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(journal.active_of("flaky"), 0);
}

#[tokio::test(start_paused = true)]
async fn refusals_and_skips_are_not_failures_and_do_not_reset_them() {
    use crate::engine::{DispatchInfo, DispatcherRef, ExecutionResult, InstrumentationStrategy};
    let (registry, _) = registry();
    registry.register("w1", worker(60)).unwrap();
    let strategy = HealthStrategy::new(&registry, ["w1"]);
    let info = DispatchInfo {
        dispatch_id: uuid::Uuid::nil(),
        topic: "a.events",
        category: Some(Category::Event),
        message_type: "t",
        message_id: "m",
        correlation_id: None,
        traced: false,
        span: None,
    };
    let complete = |result| {
        strategy.on_dispatcher_complete(
            &info,
            DispatcherRef { index: 0, id: "w1" },
            result,
            Duration::ZERO,
        );
        registry.health("w1").unwrap().consecutive_failures
    };
    assert_eq!(complete(ExecutionResult::Error), 1);
    assert_eq!(complete(ExecutionResult::Timeout), 2);
    for refusal in [
        ExecutionResult::Rejected,
        ExecutionResult::Denied,
        ExecutionResult::Skipped,
    ] {
        assert_eq!(complete(refusal), 2, "{refusal} changes nothing");
    }
    assert_eq!(complete(ExecutionResult::Success), 0);
}

#[tokio::test(start_paused = true)]
async fn a_worker_endpoint_is_given_only_while_the_worker_is_fresh() {
    let (registry, _) = registry();
    let url: reqwest::Url = "http://127.0.0.1:9/work".parse().unwrap();
    assert_eq!(
        registry.worker_endpoint("w"),
        Err(WorkerUnavailable::NotRegistered("w".into()))
    );
    registry.register("w", worker(30)).unwrap();
    assert_eq!(
        registry.worker_endpoint("w"),
        Err(WorkerUnavailable::NoEndpoint("w".into()))
    );
    let with_endpoint = Registration {
        endpoint: Some(url.clone()),
        ..worker(30)
    };
    registry.register("w", with_endpoint.clone()).unwrap();
    assert_eq!(registry.worker_endpoint("w"), Ok(url.clone()));
    assert_eq!(
        registry.health("w").unwrap().endpoint.as_deref(),
        Some("http://127.0.0.1:9/work")
    );
    // Failures do not close the door (a breaker does); staleness does.
    for _ in 0..10 {
        registry.record_failure("w").unwrap();
    }
    assert_eq!(registry.worker_endpoint("w"), Ok(url.clone()));
    tokio::time::advance(Duration::from_secs(31)).await;
    let stale = registry.worker_endpoint("w").unwrap_err();
    assert_eq!(
        stale.to_string(),
        "worker `w` is stale: no heartbeat for 31.0 s (threshold 30.0 s)"
    );
    registry.heartbeat("w").unwrap();
    assert_eq!(registry.worker_endpoint("w"), Ok(url));
    registry.unregister("w").unwrap();
    assert!(matches!(
        registry.worker_endpoint("w"),
        Err(WorkerUnavailable::NotRegistered(_))
    ));
    // An in-process dispatcher has no endpoint to push to.
    registry.register("local", in_process()).unwrap();
    registry.start("local").unwrap();
    assert!(matches!(
        registry.worker_endpoint("local"),
        Err(WorkerUnavailable::NoEndpoint(_))
    ));
}

mod stats {
    use crate::engine::{
        Category, Dispatcher, Engine, Handler, HandlerError, Message, OutputMessage, Route,
    };
    use crate::health::DispatcherStats;

    struct Answer;

    #[async_trait::async_trait]
    impl Handler for Answer {
        async fn handle(&self, m: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
            match m.envelope.message_type.as_str() {
                "bad" => Err(HandlerError::permanent("password=hunter2 refused")),
                _ => Ok(Vec::new()),
            }
        }
    }

    #[tokio::test]
    async fn counts_latency_last_error_and_topic_per_dispatcher() {
        let stats = std::sync::Arc::new(DispatcherStats::new(["a", "idle"]));
        let engine = Engine::builder()
            .dispatcher(Dispatcher::new("a", Category::Event, Answer))
            .dispatcher(Dispatcher::new("idle", Category::Event, Answer))
            .route(Route::new("r", "shop.*.events", Category::Event, "a"))
            .instrumentation(stats.clone())
            .build()
            .unwrap();
        let envelope = |t: &str| crate::engine::Envelope::new(t, serde_json::json!({}));
        for _ in 0..3 {
            engine.dispatch("shop.fast.events", &envelope("ok")).await;
        }
        engine.dispatch("shop.slow.events", &envelope("ok")).await;
        engine.dispatch("shop.bad.events", &envelope("bad")).await;
        engine.dispatch("shop.last.events", &envelope("ok")).await;
        let a = stats.get("a").unwrap();
        assert_eq!(a.counts["success"], 5);
        assert_eq!(a.counts["error"], 1);
        assert_eq!(a.counts["rejected"], 0);
        assert_eq!(a.last_topic.as_deref(), Some("shop.last.events"));
        let error = a.last_error.unwrap();
        assert!(
            error.contains("refused") && !error.contains("hunter2"),
            "{error}"
        );
        let latency = a.latency_ms.unwrap();
        assert_eq!(latency.count, 6);
        assert!(latency.min > 0.0, "{latency:?}");
        assert!(latency.min <= latency.p50 && latency.p50 <= latency.p90);
        assert!(latency.p90 <= latency.p99 && latency.p99 <= latency.max);
        let idle = stats.get("idle").unwrap();
        assert!(idle.counts.values().all(|n| *n == 0));
        assert_eq!(
            (idle.latency_ms, idle.last_error, idle.last_topic),
            (None, None, None)
        );
        assert!(stats.get("nobody").is_none());
    }
}

/// A shared store in memory that can be made unreachable.
#[derive(Default)]
struct FakeStore {
    down: std::sync::atomic::AtomicBool,
    snapshot: Mutex<Option<Snapshot>>,
}

#[async_trait]
impl WorkerStore for FakeStore {
    async fn register(
        &self,
        _: &str,
        _: &WorkerRecord,
        _: usize,
    ) -> Result<(Registered, StoredWorker, u64), StoreError> {
        Err(StoreError::Unavailable("not used".into()))
    }

    async fn heartbeat(&self, _: &str) -> Result<Option<(StoredWorker, u64)>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        Ok(None)
    }

    async fn unregister(&self, _: &str) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        Ok(self.snapshot.lock().unwrap().clone().unwrap())
    }
}

#[tokio::test(start_paused = true)]
async fn a_shared_registry_ages_its_snapshot_and_shows_no_worker_rather_than_a_false_stale() {
    let store = Arc::new(FakeStore::default());
    *store.snapshot.lock().unwrap() = Some(Snapshot {
        now_ms: 5_000,
        workers: vec![StoredWorker {
            id: "w1".into(),
            record: WorkerRecord {
                stale_threshold_seconds: 30.0,
                critical: true,
                extra: serde_json::Map::new(),
            },
            registered_ms: 1_000,
            heartbeat_ms: 5_000,
        }],
    });
    let registry = HealthRegistry::shared(HealthConfig::default(), None, store.clone());
    assert_eq!(registry.store_available(), None, "not known before a read");
    assert!(registry.all().is_empty(), "nothing read yet");
    registry.refresh().await.unwrap();
    assert_eq!(registry.store_available(), Some(true));
    let w1 = &registry.all()[0];
    assert!(w1.healthy && w1.origin == Origin::Remote);

    // Between reads the snapshot ages with the time since it was read.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(registry.all()[0].is_stale);

    store.down.store(true, Ordering::SeqCst);
    let error = registry.refresh().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "the shared dispatcher registry is unavailable: connection refused",
        "said once, with the store's reason"
    );
    assert_eq!(registry.store_available(), Some(false));
    assert!(
        registry.all().is_empty(),
        "an unreachable store shows no worker, never an old or stale one"
    );
    let error = registry.heartbeat_worker("w1").await.unwrap_err();
    assert!(matches!(error, WorkerError::Unavailable(_)));
    assert_eq!(
        error.to_string(),
        "the shared dispatcher registry is unavailable: connection refused"
    );
    assert!(registry.list().await.is_err());
}
