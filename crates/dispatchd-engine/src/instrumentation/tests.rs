use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::json;

use super::*;
use crate::{
    Category, CommandAdapter, DispatchStatus, Dispatcher, Engine, EngineBuilder, Envelope, Handler,
    HandlerError, Message, OutputMessage, Route,
};

struct Ok1;

#[async_trait]
impl Handler for Ok1 {
    async fn handle(&self, m: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(vec![OutputMessage::new(
            "out.events",
            m.envelope.derive("done", json!({})),
        )])
    }
}

struct Broken;

#[async_trait]
impl Handler for Broken {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Err(HandlerError::transient("upstream said 503"))
    }
}

fn builder(handler: impl Handler) -> EngineBuilder {
    Engine::builder()
        .dispatcher(Dispatcher::new("d", Category::Event, handler))
        .route(Route::new("r", "**", Category::Event, "d"))
}

fn envelope() -> Envelope {
    Envelope::new("t", json!({})).with_message_id("m-1")
}

#[tokio::test]
async fn without_a_strategy_nothing_fires_and_results_are_unchanged() {
    let plain = builder(Ok1).build().unwrap();
    let recorder = Arc::new(RecordingStrategy::new());
    let observed = builder(Ok1)
        .instrumentation(recorder.clone())
        .build()
        .unwrap();
    assert!(!plain.is_instrumented());

    let a = plain.dispatch("a.events", &envelope()).await;
    let b = observed.dispatch("a.events", &envelope()).await;
    assert_eq!(a.status, b.status);
    assert_eq!(a.output_count, b.output_count);
    assert_eq!(a.dispatchers.len(), b.dispatchers.len());
    assert_eq!(plain.instrumentation_panics(), 0);
    assert_eq!(
        recorder.calls().len(),
        3,
        "the same dispatch observed fires three hooks"
    );
}

#[tokio::test]
async fn a_success_is_recorded_in_order_with_its_elapsed_time() {
    let recorder = Arc::new(RecordingStrategy::new());
    let engine = builder(Ok1)
        .instrumentation(recorder.clone())
        .build()
        .unwrap();
    let result = engine.dispatch("a.events", &envelope()).await;
    let calls = recorder.calls();
    assert_eq!(
        calls[0],
        Recorded::Start {
            topic: "a.events".into()
        }
    );
    assert_eq!(
        calls[1],
        Recorded::DispatcherComplete {
            dispatcher_id: "d".into(),
            index: 0,
            result: ExecutionResult::Success
        }
    );
    let Recorded::Success { status, elapsed } = &calls[2] else {
        panic!("{calls:?}")
    };
    assert_eq!(*status, DispatchStatus::Success);
    assert!(elapsed.as_secs_f64() * 1e3 <= result.duration_ms + 1e-9);
    assert_eq!(calls.len(), 3);
}

#[tokio::test]
async fn an_error_is_recorded_and_still_reaches_the_result() {
    let recorder = Arc::new(RecordingStrategy::new());
    let engine = builder(Broken)
        .instrumentation(recorder.clone())
        .build()
        .unwrap();
    let result = engine.dispatch("a.events", &envelope()).await;
    assert_eq!(result.status, DispatchStatus::DispatcherError);
    assert_eq!(
        result.dispatchers[0].error_message.as_deref(),
        Some("upstream said 503")
    );
    let calls = recorder.calls();
    assert!(matches!(
        calls.last(),
        Some(Recorded::Error { status: DispatchStatus::DispatcherError, error_code: Some(code), .. })
            if *code == crate::ErrorCode::DispatcherFailed
    ));
    assert!(!calls.iter().any(|c| matches!(c, Recorded::Success { .. })));
}

/// Writes "adapter ran" into the same journal the strategy writes into.
struct Journaling(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl CommandAdapter for Journaling {
    fn name(&self) -> &'static str {
        "journal"
    }

    async fn execute(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        self.0.lock().unwrap().push("adapter ran".into());
        Ok(Vec::new())
    }
}

struct JournalStrategy(Arc<Mutex<Vec<String>>>);

impl InstrumentationStrategy for JournalStrategy {
    fn on_adapter_invoke(
        &self,
        _: &DispatchInfo<'_>,
        adapter: &str,
        command_type: &str,
        _: &serde_json::Value,
    ) {
        self.0
            .lock()
            .unwrap()
            .push(format!("invoke {adapter} {command_type}"));
    }
}

#[tokio::test]
async fn adapter_invocation_is_recorded_before_the_adapter_runs() {
    let journal = Arc::new(Mutex::new(Vec::new()));
    let engine = Engine::builder()
        .dispatcher(Dispatcher::command("c", Journaling(journal.clone())))
        .route(Route::new("r", "**", Category::Command, "c"))
        .instrumentation(Arc::new(JournalStrategy(journal.clone())))
        .build()
        .unwrap();
    let result = engine
        .dispatch("ops.commands", &Envelope::new("restart", json!({})))
        .await;
    assert_eq!(result.status, DispatchStatus::Success);
    assert_eq!(
        *journal.lock().unwrap(),
        ["invoke journal restart", "adapter ran"]
    );
}

struct PanicsOnSuccess;

impl InstrumentationStrategy for PanicsOnSuccess {
    fn on_dispatch_success(&self, _: &DispatchInfo<'_>, _: &DispatchResult, _: Duration) {
        panic!("strategy bug");
    }
}

#[tokio::test]
async fn a_panicking_strategy_leaves_the_result_intact_and_is_counted() {
    let recorder = Arc::new(RecordingStrategy::new());
    let composite = Composite::new()
        .with(Arc::new(PanicsOnSuccess))
        .with(recorder.clone());
    let engine = builder(Ok1)
        .instrumentation(Arc::new(composite))
        .build()
        .unwrap();
    let result = engine.dispatch("a.events", &envelope()).await;
    assert_eq!(result.status, DispatchStatus::Success);
    assert_eq!(result.output_count, 1);
    assert_eq!(engine.instrumentation_panics(), 1);
    assert!(
        recorder
            .calls()
            .iter()
            .any(|c| matches!(c, Recorded::Success { .. })),
        "the strategy after the panicking one still ran"
    );
}

#[tokio::test]
async fn a_composite_calls_every_strategy() {
    let a = Arc::new(RecordingStrategy::new());
    let b = Arc::new(RecordingStrategy::new());
    let composite = Composite::new()
        .with(a.clone())
        .with(b.clone())
        .with(Arc::new(TracingStrategy));
    assert_eq!(composite.len(), 3);
    let engine = builder(Broken)
        .instrumentation(Arc::new(composite))
        .build()
        .unwrap();
    engine.dispatch("a.events", &envelope()).await;
    assert_eq!(a.calls(), b.calls());
    assert_eq!(a.calls().len(), 3);
}

/// A `MakeWriter` that keeps what a test subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// What `TracingStrategy` logs at warn and above for one dispatch.
async fn warnings_of(engine: &Engine, topic: &str, envelope: &Envelope) -> String {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    engine.dispatch(topic, envelope).await;
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

#[tokio::test]
async fn refusals_do_not_warn_and_failures_do() {
    use crate::{Effect, RulePolicy};
    let engine = Engine::builder()
        .dispatcher(Dispatcher::new("d", Category::Event, Broken))
        .dispatcher(
            Dispatcher::command("c", Journaling(Arc::default()))
                .with_policy(RulePolicy::new("freeze", Effect::Allow).deny("deploy")),
        )
        .route(Route::new("r", "**", Category::Event, "d"))
        .route(Route::new("rc", "**", Category::Command, "c"))
        .instrumentation(Arc::new(TracingStrategy))
        .build()
        .unwrap();
    let denied = warnings_of(&engine, "ops.commands", &Envelope::new("deploy", json!({}))).await;
    assert!(
        denied.is_empty(),
        "a policy's refusal is no warning: {denied}"
    );
    let failed = warnings_of(&engine, "a.events", &envelope()).await;
    assert!(
        failed.contains("WARN") && failed.contains("dispatcher_error"),
        "{failed}"
    );
}
