use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use super::*;

/// Answers with one output per message, on `<topic>.out`-like topic `echo.events`.
struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let reply = message
            .envelope
            .derive("echoed", message.envelope.payload.clone());
        Ok(vec![OutputMessage::new("echo.events", reply)])
    }
}

struct Fail(&'static str);

#[async_trait]
impl Handler for Fail {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Err(HandlerError::permanent(self.0))
    }
}

/// Never finishes on its own; counts how many of its futures were dropped (cancelled).
struct Hang(Arc<AtomicUsize>);

struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Handler for Hang {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let _guard = DropCounter(self.0.clone());
        std::future::pending::<()>().await;
        Ok(Vec::new())
    }
}

struct Panic;

#[async_trait]
impl Handler for Panic {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        panic!("handler exploded")
    }
}

fn event(message_type: &str) -> Envelope {
    Envelope::new(message_type, json!({"n": 1}))
}

fn engine_with(dispatchers: Vec<Dispatcher>, routes: Vec<Route>) -> Engine {
    let mut builder = Engine::builder();
    for d in dispatchers {
        builder = builder.dispatcher(d);
    }
    for r in routes {
        builder = builder.route(r);
    }
    builder.build().expect("valid engine")
}

#[tokio::test]
async fn routes_a_message_to_its_dispatcher_and_returns_outputs() {
    let engine = engine_with(
        vec![Dispatcher::new("echo", Category::Event, Echo)],
        vec![Route::new("r1", "dev.*.events", Category::Event, "echo")],
    );
    let envelope = event("user.created").with_correlation_id("corr-1");
    let result = engine.dispatch("dev.user.events", &envelope).await;

    assert_eq!(result.status, DispatchStatus::Success);
    assert_eq!(result.message_category, Some(Category::Event));
    assert_eq!(result.topic, "dev.user.events");
    assert_eq!(result.message_type, "user.created");
    assert_eq!(result.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(result.output_count, 1);
    assert_eq!(
        result.outputs[0].envelope.correlation_id.as_deref(),
        Some("corr-1")
    );
    assert_eq!(result.dispatchers.len(), 1);
    assert_eq!(&*result.dispatchers[0].dispatcher_id, "echo");
    assert_eq!(result.dispatchers[0].result, ExecutionResult::Success);
    assert!(result.error_message.is_none() && result.error_code.is_none());
    assert!(result.duration_ms >= 0.0);
}

#[tokio::test]
async fn a_topic_that_no_route_matches_is_no_dispatcher() {
    let engine = engine_with(
        vec![Dispatcher::new("echo", Category::Event, Echo)],
        vec![Route::new("r1", "billing.**", Category::Event, "echo")],
    );
    let result = engine.dispatch("shipping.events", &event("t")).await;
    assert_eq!(result.status, DispatchStatus::NoDispatcher);
    assert_eq!(result.error_code, Some(ErrorCode::NoDispatcher));
    assert!(result.dispatchers.is_empty());
}

#[tokio::test]
async fn a_malformed_topic_or_envelope_is_invalid_message_and_runs_nothing() {
    let engine = engine_with(
        vec![Dispatcher::new("echo", Category::Event, Echo)],
        vec![Route::new("r1", "**", Category::Event, "echo")],
    );
    for topic in ["", "a..events", "dev.user", "a b.events", "user_events"] {
        let result = engine.dispatch(topic, &event("t")).await;
        assert_eq!(result.status, DispatchStatus::InvalidMessage, "{topic:?}");
        assert_eq!(result.message_category, None);
        assert!(result.dispatchers.is_empty());
    }
    let result = engine.dispatch("a.events", &event("")).await;
    assert_eq!(result.status, DispatchStatus::InvalidMessage);
    assert_eq!(
        result.error_message.as_deref(),
        Some("message_type is empty")
    );
    // Counted in characters: 255 two-byte characters are a valid type, 256 are not.
    let result = engine.dispatch("a.events", &event(&"é".repeat(255))).await;
    assert_eq!(result.status, DispatchStatus::Success);
    let result = engine.dispatch("a.events", &event(&"é".repeat(256))).await;
    assert_eq!(result.status, DispatchStatus::InvalidMessage);
    assert_eq!(
        result.error_message.as_deref(),
        Some("message_type is longer than 255 characters")
    );
}

#[tokio::test]
async fn the_category_of_route_and_topic_must_agree() {
    let engine = engine_with(
        vec![Dispatcher::new("echo", Category::Intent, Echo)],
        vec![Route::new("r1", "**", Category::Intent, "echo")],
    );
    assert_eq!(
        engine.dispatch("a.events", &event("t")).await.status,
        DispatchStatus::NoDispatcher
    );
    assert_eq!(
        engine.dispatch("a.intents", &event("t")).await.status,
        DispatchStatus::Success
    );
}

#[tokio::test]
async fn message_type_filters_apply_on_routes_and_dispatchers() {
    let engine = engine_with(
        vec![
            Dispatcher::new("orders", Category::Event, Echo).with_message_types(["order.placed"]),
            Dispatcher::new("any", Category::Event, Echo),
        ],
        vec![
            Route::new("r-orders", "**", Category::Event, "orders"),
            Route::new("r-any", "**", Category::Event, "any").with_message_type("user.created"),
        ],
    );
    let ran = |result: &DispatchResult| -> Vec<String> {
        result
            .dispatchers
            .iter()
            .map(|d| d.dispatcher_id.to_string())
            .collect()
    };
    assert_eq!(
        ran(&engine.dispatch("x.events", &event("order.placed")).await),
        ["orders"]
    );
    assert_eq!(
        ran(&engine.dispatch("x.events", &event("user.created")).await),
        ["any"]
    );
    let result = engine.dispatch("x.events", &event("other")).await;
    assert_eq!(result.status, DispatchStatus::NoDispatcher);
}

#[tokio::test]
async fn each_dispatcher_runs_once_in_registration_order_however_many_routes_match() {
    let recorder = Arc::new(crate::instrumentation::RecordingStrategy::new());
    let engine = Engine::builder()
        .dispatcher(Dispatcher::new("first", Category::Event, Echo))
        .dispatcher(Dispatcher::new("second", Category::Event, Echo))
        .route(Route::new("r-second", "a.**", Category::Event, "second"))
        .route(Route::new("r-first-1", "a.*", Category::Event, "first"))
        .route(Route::new("r-first-2", "**", Category::Event, "first"))
        .route(Route::new("r-disabled", "**", Category::Event, "second").disabled())
        .instrumentation(recorder.clone())
        .build()
        .unwrap();
    let result = engine.dispatch("a.events", &event("t")).await;
    let ids: Vec<&str> = result
        .dispatchers
        .iter()
        .map(|d| &*d.dispatcher_id)
        .collect();
    assert_eq!(ids, ["first", "second"]);
    assert_eq!(result.output_count, 2);
    assert_eq!(engine.routes().len(), 4);
}

#[tokio::test]
async fn disabled_routes_never_match() {
    let engine = engine_with(
        vec![Dispatcher::new("echo", Category::Event, Echo)],
        vec![Route::new("r1", "**", Category::Event, "echo").disabled()],
    );
    assert_eq!(
        engine.dispatch("a.events", &event("t")).await.status,
        DispatchStatus::NoDispatcher
    );
}

#[tokio::test]
async fn one_failure_never_hides_another_success() {
    let engine = engine_with(
        vec![
            Dispatcher::new("ok", Category::Event, Echo),
            Dispatcher::new("broken", Category::Event, Fail("database is down")),
        ],
        vec![
            Route::new("r-ok", "**", Category::Event, "ok"),
            Route::new("r-broken", "**", Category::Event, "broken"),
        ],
    );
    let result = engine.dispatch("a.events", &event("t")).await;
    assert_eq!(result.status, DispatchStatus::DispatcherError);
    assert_eq!(result.error_code, Some(ErrorCode::DispatcherFailed));
    assert_eq!(
        result.output_count, 1,
        "the successful dispatcher's output is kept"
    );
    assert_eq!(result.dispatchers[0].result, ExecutionResult::Success);
    assert_eq!(result.dispatchers[1].result, ExecutionResult::Error);
    assert_eq!(
        result.dispatchers[1].error_message.as_deref(),
        Some("database is down")
    );
    assert_eq!(
        result.error_message.as_deref(),
        Some("dispatcher `broken` error: database is down")
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_dispatcher_times_out_and_is_cancelled_while_others_finish() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let engine = engine_with(
        vec![
            Dispatcher::new("slow", Category::Event, Hang(dropped.clone()))
                .with_timeout(Duration::from_millis(250)),
            Dispatcher::new("fast", Category::Event, Echo),
        ],
        vec![
            Route::new("r-slow", "**", Category::Event, "slow"),
            Route::new("r-fast", "**", Category::Event, "fast"),
        ],
    );
    let started = tokio::time::Instant::now();
    let result = engine.dispatch("a.events", &event("t")).await;
    assert_eq!(result.status, DispatchStatus::Timeout);
    assert_eq!(result.error_code, Some(ErrorCode::Timeout));
    assert!(result.status.requires_retry());
    assert_eq!(result.dispatchers[0].result, ExecutionResult::Timeout);
    assert_eq!(result.dispatchers[1].result, ExecutionResult::Success);
    assert_eq!(result.output_count, 1);
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the timed-out future was dropped"
    );
}

#[tokio::test]
async fn a_panicking_dispatcher_fails_alone() {
    let engine = engine_with(
        vec![
            Dispatcher::new("boom", Category::Event, Panic),
            Dispatcher::new("ok", Category::Event, Echo),
        ],
        vec![
            Route::new("r-boom", "**", Category::Event, "boom"),
            Route::new("r-ok", "**", Category::Event, "ok"),
        ],
    );
    let result = engine.dispatch("a.events", &event("t")).await;
    assert_eq!(result.status, DispatchStatus::DispatcherError);
    assert_eq!(
        result.dispatchers[0].error_message.as_deref(),
        Some("panicked: handler exploded")
    );
    assert_eq!(result.dispatchers[1].result, ExecutionResult::Success);
    assert_eq!(result.output_count, 1);
}

#[tokio::test]
async fn error_text_is_sanitized_in_the_result() {
    let engine = engine_with(
        vec![Dispatcher::new(
            "db",
            Category::Event,
            Fail("connect postgres://app:hunter2@db/x failed, password=hunter2"),
        )],
        vec![Route::new("r", "**", Category::Event, "db")],
    );
    let result = engine.dispatch("a.events", &event("t")).await;
    let text = serde_json::to_string(&result).unwrap();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("postgres://***@db/x"));
}

struct Refunds;

#[async_trait]
impl CommandAdapter for Refunds {
    fn name(&self) -> &'static str {
        "refunds"
    }

    async fn execute(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let done = message.envelope.derive("refund.issued", json!({}));
        Ok(vec![OutputMessage::new("billing.events", done)])
    }
}

fn command_engine(recorder: Arc<crate::instrumentation::RecordingStrategy>) -> Engine {
    Engine::builder()
        .dispatcher(
            Dispatcher::command("billing", Refunds)
                .with_policy(RulePolicy::new("billing-rules", Effect::Deny).allow("refund")),
        )
        .route(Route::new(
            "r",
            "billing.commands",
            Category::Command,
            "billing",
        ))
        .instrumentation(recorder)
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_allowed_command_runs_its_adapter() {
    use crate::instrumentation::Recorded;
    let recorder = Arc::new(crate::instrumentation::RecordingStrategy::new());
    let engine = command_engine(recorder.clone());
    let result = engine
        .dispatch(
            "billing.commands",
            &Envelope::new("refund", json!({"amount": 5})),
        )
        .await;
    assert_eq!(result.status, DispatchStatus::Success);
    assert_eq!(result.outputs[0].envelope.message_type, "refund.issued");
    let calls = recorder.calls();
    assert!(calls.contains(&Recorded::AdapterInvoke {
        adapter: "refunds".into(),
        command_type: "refund".into(),
        params: json!({"amount": 5}),
    }));
}

#[tokio::test]
async fn a_denied_command_does_not_run_and_names_the_policy() {
    use crate::instrumentation::Recorded;
    let recorder = Arc::new(crate::instrumentation::RecordingStrategy::new());
    let engine = command_engine(recorder.clone());
    let result = engine
        .dispatch("billing.commands", &Envelope::new("delete", json!({})))
        .await;
    assert_eq!(result.status, DispatchStatus::Denied);
    assert!(!result.status.is_error() && !result.status.requires_retry());
    assert_eq!(result.error_code, Some(ErrorCode::PolicyDenied));
    assert_eq!(result.dispatchers[0].result, ExecutionResult::Denied);
    assert_eq!(
        result.dispatchers[0].policy.as_deref(),
        Some("billing-rules")
    );
    assert_eq!(result.output_count, 0);
    let calls = recorder.calls();
    assert!(calls.contains(&Recorded::PolicyDenied {
        policy: "billing-rules".into(),
        command_type: "delete".into(),
    }));
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Recorded::AdapterInvoke { .. }))
    );
    // A refusal is an outcome, not an error: strategies see it through `on_dispatch_success`.
    assert!(matches!(
        calls.last(),
        Some(Recorded::Success {
            status: DispatchStatus::Denied,
            ..
        })
    ));
    assert!(!calls.iter().any(|c| matches!(c, Recorded::Error { .. })));
}

struct FailingPublisher;

#[async_trait]
impl OutputPublisher for FailingPublisher {
    async fn publish(&self, _: &[OutputMessage]) -> Result<(), PublishError> {
        Err(PublishError("bus unreachable".into()))
    }
}

#[tokio::test]
async fn outputs_that_cannot_be_published_make_publish_failed() {
    let engine = Engine::builder()
        .dispatcher(Dispatcher::new("echo", Category::Event, Echo))
        .route(Route::new("r", "**", Category::Event, "echo"))
        .publisher(Arc::new(FailingPublisher))
        .build()
        .unwrap();
    let result = engine.dispatch("a.events", &event("t")).await;
    assert_eq!(result.status, DispatchStatus::PublishFailed);
    assert!(result.status.requires_retry());
    assert_eq!(
        result.error_message.as_deref(),
        Some("publishing 1 outputs failed: bus unreachable")
    );
    assert_eq!(result.output_count, 1, "the outputs are still returned");
}

#[test]
fn build_reports_every_problem_at_once() {
    let error = Engine::builder()
        .dispatcher(Dispatcher::new("dup", Category::Event, Echo))
        .dispatcher(Dispatcher::new("dup", Category::Event, Echo))
        .dispatcher(Dispatcher::new("bad id!", Category::Event, Echo))
        .dispatcher(Dispatcher::new("intents", Category::Intent, Echo))
        .dispatcher(Dispatcher::new("cmd", Category::Command, Echo))
        .dispatcher(Dispatcher::new("zero", Category::Event, Echo).with_timeout(Duration::ZERO))
        .dispatcher(Dispatcher::new("typed", Category::Event, Echo).with_message_types(["a"]))
        .route(Route::new("r1", "**", Category::Event, "ghost"))
        .route(Route::new("r2", "**", Category::Event, "intents"))
        .route(Route::new("r3", "a.b*", Category::Event, "dup"))
        .route(Route::new("r3", "**", Category::Event, "dup"))
        .route(Route::new("r4", "**", Category::Event, "typed").with_message_type("b"))
        .build()
        .err()
        .expect("invalid registration");
    let problems = &error.problems;
    assert!(problems.contains(&BuildProblem::DuplicateDispatcher("dup".into())));
    assert!(problems.contains(&BuildProblem::InvalidDispatcherId("bad id!".into())));
    assert!(problems.contains(&BuildProblem::CommandWithoutAdapter("cmd".into())));
    assert!(problems.contains(&BuildProblem::ZeroTimeout("zero".into())));
    assert!(problems.contains(&BuildProblem::UnknownDispatcher {
        route: "r1".into(),
        dispatcher: "ghost".into()
    }));
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, BuildProblem::CategoryMismatch { route, .. } if route == "r2"))
    );
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, BuildProblem::InvalidPattern { route, .. } if route == "r3"))
    );
    assert!(problems.contains(&BuildProblem::DuplicateRoute("r3".into())));
    assert!(
        problems.iter().any(
            |p| matches!(p, BuildProblem::UnreachableMessageType { route, .. } if route == "r4")
        )
    );
    assert_eq!(problems.len(), 9, "{problems:#?}");
    let text = error.to_string();
    assert!(
        text.contains("route `r1` names dispatcher `ghost`, which is not registered"),
        "{text}"
    );
}

#[test]
fn policies_on_non_command_dispatchers_are_refused() {
    let error = Engine::builder()
        .dispatcher(
            Dispatcher::new("e", Category::Event, Echo)
                .with_policy(RulePolicy::new("p", Effect::Allow)),
        )
        .build()
        .err()
        .unwrap();
    assert_eq!(
        error.problems,
        [BuildProblem::PolicyOutsideCommand("e".into())]
    );
}

#[test]
fn the_engine_is_send_sync_and_cheap_to_clone() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Engine>();
    assert_eq!(std::mem::size_of::<Engine>(), std::mem::size_of::<usize>());
}

#[tokio::test]
async fn each_outcome_names_the_routes_that_selected_it_and_the_result_its_times() {
    let engine = engine_with(
        vec![
            Dispatcher::new("a", Category::Event, Echo),
            Dispatcher::new("b", Category::Event, Echo),
        ],
        vec![
            Route::new("r-b", "shop.**", Category::Event, "b"),
            Route::new("r-a1", "shop.orders.events", Category::Event, "a"),
            Route::new("r-off", "shop.**", Category::Event, "a").disabled(),
            Route::new("r-a2", "shop.*.events", Category::Event, "a"),
            Route::new("r-other", "mail.**", Category::Event, "a"),
        ],
    );
    let before = std::time::SystemTime::now();
    let result = engine.dispatch("shop.orders.events", &event("t")).await;
    let after = std::time::SystemTime::now();
    let routes: Vec<(&str, Vec<&str>)> = result
        .dispatchers
        .iter()
        .map(|d| {
            (
                &*d.dispatcher_id,
                d.route_ids.iter().map(|r| &**r).collect(),
            )
        })
        .collect();
    assert_eq!(routes, [("a", vec!["r-a1", "r-a2"]), ("b", vec!["r-b"])]);
    let topic = Topic::parse("shop.orders.events").unwrap();
    assert_eq!(engine.select(&topic, "t"), [0, 1], "the same selection");
    assert!(before <= result.started_at.0 && result.started_at <= result.completed_at);
    assert!(result.completed_at.0 <= after);
    let json = serde_json::to_value(&result).unwrap();
    assert_eq!(json["dispatchers"][0]["route_ids"], json!(["r-a1", "r-a2"]));
    let started = json["started_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(started).is_ok(), "{started}");
    assert!(started.ends_with('Z') && started.len() == "2026-12-02T21:00:28.123Z".len());
    // Completed when the work ended: a dispatcher that works 20 ms moves completed_at by as much.
    struct Work;
    #[async_trait]
    impl Handler for Work {
        async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Vec::new())
        }
    }
    let working = engine_with(
        vec![Dispatcher::new("w", Category::Event, Work)],
        vec![Route::new("r", "**", Category::Event, "w")],
    );
    let worked = working.dispatch("a.events", &event("t")).await;
    let took = worked
        .completed_at
        .0
        .duration_since(worked.started_at.0)
        .unwrap();
    assert!(took >= Duration::from_millis(20), "{took:?}");
    let back: DispatchResult = serde_json::from_value(json).unwrap();
    assert_eq!(
        back.started_at,
        result
            .started_at
            .0
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| Timestamp(std::time::UNIX_EPOCH + Duration::from_millis(d.as_millis() as u64)))
            .unwrap()
    );
}

mod protections {
    use std::num::NonZeroU32;
    use std::sync::Mutex;

    use super::*;
    use crate::resilience::{
        BreakerConfig, ConcurrencyConfig, DedupConfig, Protections, RateLimitConfig, RateLimitMode,
        ResilienceConfig, ResilienceObserver, RetryPolicy, Trip,
    };

    /// Fails with the given kind the first `failures` calls, then succeeds; counts calls.
    struct Scripted {
        failures: AtomicUsize,
        kind: ErrorKind,
        calls: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Handler for Scripted {
        async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(match self.kind {
                    ErrorKind::Transient => HandlerError::transient("flaky"),
                    ErrorKind::Permanent => HandlerError::permanent("bad message"),
                    ErrorKind::Unavailable => HandlerError::unavailable("worker `p` is stale"),
                });
            }
            Ok(Vec::new())
        }
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl ResilienceObserver for Seen {
        fn retried(&self, _: &str) {
            self.0.lock().unwrap().push("retry".into());
        }
        fn breaker_tripped(&self, _: &str) {
            self.0.lock().unwrap().push("trip".into());
        }
        fn rate_limit_delay(&self, _: &str, delay: Duration) {
            self.0
                .lock()
                .unwrap()
                .push(format!("delay {}ms", delay.as_millis()));
        }
    }

    fn scripted(failures: usize, kind: ErrorKind) -> (Scripted, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        (
            Scripted {
                failures: AtomicUsize::new(failures),
                kind,
                calls: calls.clone(),
            },
            calls,
        )
    }

    fn protected(handler: impl Handler, config: ResilienceConfig, seen: &Arc<Seen>) -> Engine {
        let protections = Protections::new(
            "p",
            &config,
            Some(seen.clone() as Arc<dyn ResilienceObserver>),
        );
        Engine::builder()
            .dispatcher(
                Dispatcher::new("p", Category::Event, handler).with_protections(protections),
            )
            .route(Route::new("r", "**", Category::Event, "p"))
            .build()
            .unwrap()
    }

    fn retry(attempts: u32) -> Option<RetryPolicy> {
        Some(RetryPolicy {
            attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_within_the_backoff_bounds() {
        let seen = Arc::new(Seen::default());
        let (handler, calls) = scripted(2, ErrorKind::Transient);
        let engine = protected(
            handler,
            ResilienceConfig {
                retry: retry(3),
                ..Default::default()
            },
            &seen,
        );
        let started = tokio::time::Instant::now();
        let result = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(result.status, DispatchStatus::Success);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(result.dispatchers[0].attempts, 3);
        assert!(
            started.elapsed() <= Duration::from_millis(300),
            "backoffs at most 100 + 200 ms"
        );
        assert_eq!(*seen.0.lock().unwrap(), ["retry", "retry"]);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_after_the_configured_attempts() {
        let seen = Arc::new(Seen::default());
        let (handler, calls) = scripted(10, ErrorKind::Transient);
        let engine = protected(
            handler,
            ResilienceConfig {
                retry: retry(2),
                ..Default::default()
            },
            &seen,
        );
        let result = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(result.status, DispatchStatus::DispatcherError);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the first try and two retries"
        );
        assert_eq!(result.dispatchers[0].attempts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_never_retried() {
        let seen = Arc::new(Seen::default());
        let (handler, calls) = scripted(1, ErrorKind::Permanent);
        let engine = protected(
            handler,
            ResilienceConfig {
                retry: retry(5),
                ..Default::default()
            },
            &seen,
        );
        let result = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(result.status, DispatchStatus::DispatcherError);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(seen.0.lock().unwrap().is_empty());
    }

    /// Fails transiently once, asking for `retry_after`, then succeeds; records when it ran.
    struct AsksForAPause {
        retry_after: Duration,
        calls: Mutex<Vec<tokio::time::Instant>>,
    }

    #[async_trait]
    impl Handler for Arc<AsksForAPause> {
        async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(tokio::time::Instant::now());
            if calls.len() == 1 {
                return Err(HandlerError::transient("429").with_retry_after(self.retry_after));
            }
            Ok(Vec::new())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_at_least_the_retry_after_asked_for_capped_by_max_backoff() {
        for (asked, least) in [
            // Longer than any jittered backoff of the first retry (at most 100 ms): honoured.
            (Duration::from_millis(700), Duration::from_millis(700)),
            // Longer than max_backoff (1 s): capped there.
            (Duration::from_secs(60), Duration::from_secs(1)),
        ] {
            let handler = Arc::new(AsksForAPause {
                retry_after: asked,
                calls: Mutex::new(Vec::new()),
            });
            let engine = protected(
                handler.clone(),
                ResilienceConfig {
                    retry: retry(3),
                    ..Default::default()
                },
                &Arc::new(Seen::default()),
            );
            let result = engine.dispatch("a.events", &event("t")).await;
            assert_eq!(result.status, DispatchStatus::Success);
            let calls = handler.calls.lock().unwrap();
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[1] - calls[0], least, "asked for {asked:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_are_retried_as_transient() {
        let seen = Arc::new(Seen::default());
        let dropped = Arc::new(AtomicUsize::new(0));
        let protections = Protections::new(
            "slow",
            &ResilienceConfig {
                retry: retry(2),
                ..Default::default()
            },
            Some(seen.clone() as Arc<dyn ResilienceObserver>),
        );
        let engine = Engine::builder()
            .dispatcher(
                Dispatcher::new("slow", Category::Event, Hang(dropped.clone()))
                    .with_timeout(Duration::from_millis(50))
                    .with_protections(protections),
            )
            .route(Route::new("r", "**", Category::Event, "slow"))
            .build()
            .unwrap();
        let result = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(result.status, DispatchStatus::Timeout);
        assert_eq!(result.dispatchers[0].attempts, 3);
        assert_eq!(dropped.load(Ordering::SeqCst), 3);
    }

    /// An engine of one scripted dispatcher with only dedup, and the dispatcher's call count.
    fn deduplicating(failures: usize, ttl: Duration, capacity: u64) -> (Engine, Arc<AtomicUsize>) {
        let seen = Arc::new(Seen::default());
        let (handler, calls) = scripted(failures, ErrorKind::Permanent);
        let dedup = Some(DedupConfig {
            scope: Default::default(),
            ttl,
            capacity,
        });
        let config = ResilienceConfig {
            dedup,
            ..Default::default()
        };
        (protected(handler, config, &seen), calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_duplicate_is_skipped_only_after_a_success() {
        let (engine, calls) = deduplicating(1, Duration::from_secs(60), 100);
        let message = event("t").with_message_id("order-7");

        let first = engine.dispatch("a.events", &message).await;
        assert_eq!(first.status, DispatchStatus::DispatcherError);
        let retried = engine.dispatch("a.events", &message).await;
        assert_eq!(
            retried.status,
            DispatchStatus::Success,
            "a failed message is not remembered"
        );
        let duplicate = engine.dispatch("a.events", &message).await;
        assert_eq!(duplicate.status, DispatchStatus::Skipped);
        assert_eq!(duplicate.dispatchers[0].result, ExecutionResult::Skipped);
        assert_eq!(duplicate.dispatchers[0].attempts, 0);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the duplicate ran nothing");

        tokio::time::advance(Duration::from_secs(61)).await;
        let later = engine.dispatch("a.events", &message).await;
        assert_eq!(
            later.status,
            DispatchStatus::Success,
            "remembered for the TTL only"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// What `capacity` promises through the engine: a duplicate that comes after thousands of
    /// other messages is still skipped. (The cache crate dedup used before forgot an id after
    /// 3 % of its capacity: here, after 30 other messages.)
    #[tokio::test]
    async fn a_duplicate_after_many_other_messages_is_still_skipped() {
        let (engine, calls) = deduplicating(0, Duration::from_secs(600), 1_000);
        let first = event("t").with_message_id("order-0");
        assert_eq!(
            engine.dispatch("a.events", &first).await.status,
            DispatchStatus::Success
        );
        for n in 1..=500 {
            let other = event("t").with_message_id(format!("order-{n}"));
            engine.dispatch("a.events", &other).await;
        }
        let duplicate = engine.dispatch("a.events", &first).await;
        assert_eq!(duplicate.status, DispatchStatus::Skipped);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            501,
            "the duplicate ran nothing"
        );
    }

    fn breaker() -> Option<BreakerConfig> {
        Some(BreakerConfig {
            trip: Trip::ConsecutiveFailures(2),
            cool_down: Duration::from_secs(10),
            half_open_successes: 1,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_worker_is_rejected_at_once_never_retried_nor_counted_by_the_breaker() {
        let seen = Arc::new(Seen::default());
        let (handler, calls) = scripted(5, ErrorKind::Unavailable);
        let engine = protected(
            handler,
            ResilienceConfig {
                retry: retry(3),
                breaker: breaker(),
                ..Default::default()
            },
            &seen,
        );
        for n in 1..=3 {
            let result = engine.dispatch("a.b.events", &event("t")).await;
            assert_eq!(result.status, DispatchStatus::Rejected);
            assert_eq!(result.error_code, Some(ErrorCode::WorkerUnavailable));
            let outcome = &result.dispatchers[0];
            assert_eq!(outcome.result, ExecutionResult::Rejected);
            assert_eq!(outcome.attempts, 1);
            assert!(
                outcome.error_message.as_deref().unwrap().contains("stale"),
                "{outcome:?}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), n, "no retry");
        }
        // Three refusals, a breaker that trips at two failures: still closed, nothing retried.
        assert!(
            seen.0.lock().unwrap().is_empty(),
            "{:?}",
            seen.0.lock().unwrap()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_refuses_without_running_and_probes_after_the_cool_down() {
        let seen = Arc::new(Seen::default());
        let (handler, calls) = scripted(2, ErrorKind::Permanent);
        let engine = protected(
            handler,
            ResilienceConfig {
                breaker: breaker(),
                ..Default::default()
            },
            &seen,
        );
        engine.dispatch("a.events", &event("t")).await;
        engine.dispatch("a.events", &event("t")).await;
        let refused = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(refused.status, DispatchStatus::Rejected);
        assert_eq!(refused.error_code, Some(ErrorCode::Rejected));
        assert!(!refused.status.is_error() && refused.status.requires_retry());
        assert_eq!(refused.dispatchers[0].result, ExecutionResult::Rejected);
        assert_eq!(
            refused.dispatchers[0].error_message.as_deref(),
            Some("refused: the circuit breaker is open")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(*seen.0.lock().unwrap(), ["trip"]);

        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(probe.status, DispatchStatus::Success);
        assert_eq!(
            engine.dispatchers()[0]
                .protections()
                .unwrap()
                .breaker()
                .unwrap()
                .state(),
            crate::resilience::BreakerState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_protections_compose_in_the_documented_order() {
        // dedup before the breaker: a duplicate is skipped even while the breaker is open.
        let seen = Arc::new(Seen::default());
        let (handler, _) = scripted(0, ErrorKind::Permanent);
        let config = ResilienceConfig {
            breaker: breaker(),
            dedup: Some(DedupConfig {
                scope: Default::default(),
                ttl: Duration::from_secs(600),
                capacity: 10,
            }),
            rate_limit: Some(RateLimitConfig {
                scope: Default::default(),
                per_second: NonZeroU32::new(1).unwrap(),
                burst: NonZeroU32::new(1).unwrap(),
                mode: RateLimitMode::Reject,
            }),
            ..Default::default()
        };
        let engine = protected(handler, config, &seen);
        let message = event("t").with_message_id("m");
        assert_eq!(
            engine.dispatch("a.events", &message).await.status,
            DispatchStatus::Success
        );
        // The rate limiter's only token is spent: a duplicate still skips (dedup comes first) ...
        assert_eq!(
            engine.dispatch("a.events", &message).await.status,
            DispatchStatus::Skipped
        );
        // ... and a new message is refused by the rate limiter, not run.
        let limited = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(limited.status, DispatchStatus::Rejected);
        assert_eq!(limited.dispatchers[0].result, ExecutionResult::Rejected);
        assert_eq!(
            limited.dispatchers[0].error_message.as_deref(),
            Some("refused by the rate limiter")
        );
        // A refusal by the rate limiter is no breaker outcome: the breaker is still closed.
        let breaker = engine.dispatchers()[0]
            .protections()
            .unwrap()
            .breaker()
            .unwrap();
        assert_eq!(breaker.state(), crate::resilience::BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_mode_delays_the_call_and_reports_the_delay() {
        let seen = Arc::new(Seen::default());
        let (handler, _) = scripted(0, ErrorKind::Permanent);
        let config = ResilienceConfig {
            rate_limit: Some(RateLimitConfig {
                scope: Default::default(),
                per_second: NonZeroU32::new(5).unwrap(),
                burst: NonZeroU32::new(1).unwrap(),
                mode: RateLimitMode::Wait {
                    max_wait: Duration::from_secs(1),
                },
            }),
            ..Default::default()
        };
        let engine = protected(handler, config, &seen);
        engine.dispatch("a.events", &event("t")).await;
        let started = tokio::time::Instant::now();
        let second = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(second.status, DispatchStatus::Success);
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(*seen.0.lock().unwrap(), ["delay 0ms", "delay 200ms"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_concurrency_limit_refuses_past_its_queue() {
        let seen = Arc::new(Seen::default());
        let dropped = Arc::new(AtomicUsize::new(0));
        let config = ResilienceConfig {
            concurrency: Some(ConcurrencyConfig {
                max_in_flight: 1,
                max_waiting: 0,
            }),
            ..Default::default()
        };
        let protections = Protections::new(
            "one",
            &config,
            Some(seen.clone() as Arc<dyn ResilienceObserver>),
        );
        let engine = Engine::builder()
            .dispatcher(
                Dispatcher::new("one", Category::Event, Hang(dropped))
                    .with_timeout(Duration::from_secs(5))
                    .with_protections(protections),
            )
            .route(Route::new("r", "**", Category::Event, "one"))
            .build()
            .unwrap();
        let busy = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.dispatch("a.events", &event("t")).await })
        };
        tokio::task::yield_now().await;
        let refused = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(refused.status, DispatchStatus::Rejected);
        assert_eq!(refused.dispatchers[0].result, ExecutionResult::Rejected);
        assert_eq!(
            refused.dispatchers[0].error_message.as_deref(),
            Some("refused: too many calls are waiting for the concurrency limit")
        );
        assert_eq!(busy.await.unwrap().status, DispatchStatus::Timeout);
    }

    /// A dispatcher whose rate limiter has one token (on paused time, never refilled): its first
    /// call runs, every later one is rejected.
    fn one_call(id: &str, seen: &Arc<Seen>) -> Dispatcher {
        let config = ResilienceConfig {
            rate_limit: Some(RateLimitConfig {
                scope: Default::default(),
                per_second: NonZeroU32::new(1).unwrap(),
                burst: NonZeroU32::new(1).unwrap(),
                mode: RateLimitMode::Reject,
            }),
            ..Default::default()
        };
        let protections = Protections::new(
            id,
            &config,
            Some(seen.clone() as Arc<dyn ResilienceObserver>),
        );
        Dispatcher::new(id, Category::Event, Echo).with_protections(protections)
    }

    #[tokio::test(start_paused = true)]
    async fn in_a_fan_out_a_refusal_outranks_successes_and_a_failure_outranks_a_refusal() {
        let seen = Arc::new(Seen::default());
        let engine = Engine::builder()
            .dispatcher(Dispatcher::new("ok", Category::Event, Echo))
            .dispatcher(one_call("limited", &seen))
            .dispatcher(Dispatcher::new("broken", Category::Event, Fail("down")))
            .route(Route::new("r-ok", "ok.*.events", Category::Event, "ok"))
            .route(Route::new("r-ok-all", "all.events", Category::Event, "ok"))
            .route(Route::new(
                "r-limited",
                "ok.*.events",
                Category::Event,
                "limited",
            ))
            .route(Route::new(
                "r-limited-all",
                "all.events",
                Category::Event,
                "limited",
            ))
            .route(Route::new(
                "r-broken",
                "all.events",
                Category::Event,
                "broken",
            ))
            .build()
            .unwrap();
        let first = engine.dispatch("ok.a.events", &event("t")).await;
        assert_eq!(first.status, DispatchStatus::Success, "the only token");

        let refused = engine.dispatch("ok.a.events", &event("t")).await;
        assert_eq!(refused.status, DispatchStatus::Rejected);
        assert_eq!(refused.error_code, Some(ErrorCode::Rejected));
        assert_eq!(
            refused.output_count, 1,
            "the dispatcher that ran keeps its output"
        );
        assert_eq!(
            refused.error_message.as_deref(),
            Some("dispatcher `limited` rejected: refused by the rate limiter")
        );

        let failed = engine.dispatch("all.events", &event("t")).await;
        assert_eq!(failed.status, DispatchStatus::DispatcherError);
        assert_eq!(failed.error_code, Some(ErrorCode::DispatcherFailed));
        let message = failed.error_message.unwrap();
        assert!(
            message.contains("`limited` rejected") && message.contains("`broken` error: down"),
            "every reason is listed: {message}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outputs_lost_beside_a_refusal_make_publish_failed() {
        let seen = Arc::new(Seen::default());
        let engine = Engine::builder()
            .dispatcher(Dispatcher::new("ok", Category::Event, Echo))
            .dispatcher(one_call("limited", &seen))
            .route(Route::new("r-ok", "**", Category::Event, "ok"))
            .route(Route::new("r-limited", "**", Category::Event, "limited"))
            .publisher(Arc::new(FailingPublisher))
            .build()
            .unwrap();
        let first = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(
            first.status,
            DispatchStatus::PublishFailed,
            "the only token"
        );
        let result = engine.dispatch("a.events", &event("t")).await;
        assert_eq!(result.status, DispatchStatus::PublishFailed);
        assert_eq!(result.error_code, Some(ErrorCode::PublishFailed));
        assert_eq!(
            result.error_message.as_deref(),
            Some(
                "dispatcher `limited` rejected: refused by the rate limiter; \
                 publishing 1 outputs failed: bus unreachable"
            )
        );
    }
}

/// `scope = Cluster`: the engine asks the shared stores, gives claims back, and falls back when
/// they cannot answer.
mod cluster_protections {
    use std::num::NonZeroU32;
    use std::sync::Mutex;

    use super::*;
    use crate::resilience::{
        ClusterProtection, DedupClaim, DedupConfig, DedupStore, Protections, RateLimitConfig,
        RateLimitMode, RateLimitStore, ResilienceConfig, ResilienceObserver, Scope, StoreError,
    };

    /// Answers claims from a script (then `Claimed`), an error when `down`; records every call.
    #[derive(Default)]
    struct Store {
        claims: Mutex<Vec<DedupClaim>>,
        waits: Mutex<Vec<Option<Duration>>>,
        down: std::sync::atomic::AtomicBool,
        calls: Mutex<Vec<String>>,
    }

    impl Store {
        fn answer(&self, call: String) -> Result<(), StoreError> {
            self.calls.lock().unwrap().push(call);
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError("unreachable".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl DedupStore for Store {
        async fn claim(&self, id: &str) -> Result<DedupClaim, StoreError> {
            self.answer(format!("claim {id}"))?;
            Ok(self
                .claims
                .lock()
                .unwrap()
                .pop()
                .unwrap_or(DedupClaim::Claimed))
        }
        async fn succeeded(&self, id: &str) -> Result<(), StoreError> {
            self.answer(format!("succeeded {id}"))
        }
        async fn failed(&self, id: &str) -> Result<(), StoreError> {
            self.answer(format!("failed {id}"))
        }
    }

    #[async_trait]
    impl RateLimitStore for Store {
        async fn acquire(&self, max_wait: Duration) -> Result<Option<Duration>, StoreError> {
            self.answer(format!("acquire {}ms", max_wait.as_millis()))?;
            Ok(self
                .waits
                .lock()
                .unwrap()
                .pop()
                .unwrap_or(Some(Duration::ZERO)))
        }
    }

    #[derive(Default)]
    struct Fallbacks(Mutex<Vec<&'static str>>);

    impl ResilienceObserver for Fallbacks {
        fn cluster_fallback(&self, _: &str, protection: ClusterProtection) {
            self.0.lock().unwrap().push(protection.as_str());
        }
    }

    fn engine(
        config: &ResilienceConfig,
        store: &Arc<Store>,
        fallbacks: &Arc<Fallbacks>,
        handler: impl Handler,
    ) -> Engine {
        let mut protections = Protections::new(
            "c",
            config,
            Some(fallbacks.clone() as Arc<dyn ResilienceObserver>),
        );
        if config.dedup.is_some() {
            protections = protections.with_cluster_dedup(store.clone());
        }
        if config.rate_limit.is_some() {
            protections = protections.with_cluster_rate_limit(store.clone());
        }
        Engine::builder()
            .dispatcher(
                Dispatcher::new("c", Category::Event, handler).with_protections(protections),
            )
            .route(Route::new("r", "**", Category::Event, "c"))
            .build()
            .unwrap()
    }

    fn with_id(id: &str) -> Envelope {
        let mut envelope = event("t");
        envelope.message_id = id.into();
        envelope
    }

    fn dedup() -> ResilienceConfig {
        ResilienceConfig {
            dedup: Some(DedupConfig {
                ttl: Duration::from_secs(60),
                capacity: 10,
                scope: Scope::Cluster,
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dedup_claims_then_settles_and_honours_the_other_instances() {
        let store = Arc::new(Store::default());
        let fallbacks = Arc::new(Fallbacks::default());
        let engine = engine(&dedup(), &store, &fallbacks, Echo);
        assert_eq!(
            engine.dispatch("a.events", &with_id("m1")).await.status,
            DispatchStatus::Success
        );
        // The local cache answers its own repeat without a round trip.
        assert_eq!(
            engine.dispatch("a.events", &with_id("m1")).await.status,
            DispatchStatus::Skipped
        );
        store.claims.lock().unwrap().push(DedupClaim::Done);
        assert_eq!(
            engine.dispatch("a.events", &with_id("m2")).await.status,
            DispatchStatus::Skipped
        );
        store.claims.lock().unwrap().push(DedupClaim::Running);
        let busy = engine.dispatch("a.events", &with_id("m3")).await;
        assert_eq!(busy.status, DispatchStatus::Rejected);
        assert_eq!(
            busy.dispatchers[0].error_message.as_deref(),
            Some("refused: another instance is running this message id; retry later")
        );
        assert_eq!(
            *store.calls.lock().unwrap(),
            ["claim m1", "succeeded m1", "claim m2", "claim m3"]
        );

        let failing = engine_failing(&store, &fallbacks);
        store.calls.lock().unwrap().clear();
        assert_eq!(
            failing.dispatch("a.events", &with_id("m4")).await.status,
            DispatchStatus::DispatcherError
        );
        assert_eq!(*store.calls.lock().unwrap(), ["claim m4", "failed m4"]);
        assert!(fallbacks.0.lock().unwrap().is_empty());
    }

    fn engine_failing(store: &Arc<Store>, fallbacks: &Arc<Fallbacks>) -> Engine {
        engine(&dedup(), store, fallbacks, Fail("down"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_refused_by_the_rate_limiter_is_given_back() {
        let store = Arc::new(Store::default());
        let fallbacks = Arc::new(Fallbacks::default());
        let mut config = dedup();
        config.rate_limit = Some(RateLimitConfig {
            per_second: NonZeroU32::MIN,
            burst: NonZeroU32::MIN,
            mode: RateLimitMode::Reject,
            scope: Scope::Cluster,
        });
        let engine = engine(&config, &store, &fallbacks, Echo);
        store.waits.lock().unwrap().push(None);
        let refused = engine.dispatch("a.events", &with_id("m1")).await;
        assert_eq!(refused.status, DispatchStatus::Rejected);
        assert_eq!(
            *store.calls.lock().unwrap(),
            ["claim m1", "acquire 0ms", "failed m1"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_cluster_limiter_waits_what_it_answers_and_falls_back_to_the_local_one() {
        let store = Arc::new(Store::default());
        let fallbacks = Arc::new(Fallbacks::default());
        let config = ResilienceConfig {
            rate_limit: Some(RateLimitConfig {
                per_second: NonZeroU32::MIN,
                burst: NonZeroU32::MIN,
                mode: RateLimitMode::Wait {
                    max_wait: Duration::from_millis(500),
                },
                scope: Scope::Cluster,
            }),
            ..Default::default()
        };
        let engine = engine(&config, &store, &fallbacks, Echo);
        store
            .waits
            .lock()
            .unwrap()
            .push(Some(Duration::from_millis(300)));
        let started = tokio::time::Instant::now();
        assert_eq!(
            engine.dispatch("a.events", &event("t")).await.status,
            DispatchStatus::Success
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(*store.calls.lock().unwrap(), ["acquire 500ms"]);

        // Store down: the local bucket (one token, a second to refill, 500 ms max wait) decides.
        store.down.store(true, Ordering::SeqCst);
        assert_eq!(
            engine.dispatch("a.events", &event("t")).await.status,
            DispatchStatus::Success
        );
        assert_eq!(
            engine.dispatch("a.events", &event("t")).await.status,
            DispatchStatus::Rejected
        );
        assert_eq!(*fallbacks.0.lock().unwrap(), ["rate_limit", "rate_limit"]);
    }

    #[tokio::test(start_paused = true)]
    async fn dedup_runs_the_call_when_the_store_cannot_answer() {
        let store = Arc::new(Store::default());
        let fallbacks = Arc::new(Fallbacks::default());
        let engine = engine(&dedup(), &store, &fallbacks, Echo);
        store.down.store(true, Ordering::SeqCst);
        assert_eq!(
            engine.dispatch("a.events", &with_id("m1")).await.status,
            DispatchStatus::Success
        );
        assert_eq!(
            *store.calls.lock().unwrap(),
            ["claim m1"],
            "no claim held: nothing to settle"
        );
        assert_eq!(*fallbacks.0.lock().unwrap(), ["dedup"]);
    }

    #[test]
    fn a_claim_lasts_as_long_as_the_longest_call() {
        let mut config = dedup();
        assert_eq!(
            config.longest_call(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        config.retry = Some(crate::resilience::RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        });
        // Three attempts of 2 s and two backoffs of at most 1 s.
        assert_eq!(
            config.longest_call(Duration::from_secs(2)),
            Duration::from_secs(8)
        );
    }
}
