use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dead_letter;
use super::*;
use crate::resilience::RetryPolicy;

/// A sink that answers from a script, one answer per call (then success), and records what
/// it accepted.
#[derive(Clone, Default)]
struct Scripted {
    answers: Arc<Mutex<VecDeque<Result<Delivery, SendError>>>>,
    accepted: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<Vec<(tokio::time::Instant, usize)>>>,
}

#[async_trait]
impl Sink for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        self.calls
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), batch.len()));
        let answer = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(Delivery::default()));
        let accepted = match &answer {
            Ok(delivery) => (0..batch.len())
                .filter(|i| {
                    !(delivery.refused.iter())
                        .chain(&delivery.unsendable)
                        .any(|(r, _)| r == i)
                })
                .collect(),
            Err(error) => (0..error.accepted).collect::<Vec<_>>(),
        };
        let mut log = self.accepted.lock().unwrap();
        for i in accepted {
            log.push(batch[i].run_id.clone());
        }
        answer
    }
}

#[derive(Default)]
struct Counts(Mutex<BTreeMap<&'static str, u64>>);

impl SinkObserver for Counts {
    fn events(&self, _: &str, outcome: Outcome, count: u64) {
        *self.0.lock().unwrap().entry(outcome.as_str()).or_default() += count;
    }
    fn batch(&self, _: &str, _: usize) {}
    fn request(&self, _: &str, _: &str, _: Duration) {}
    fn queue_depth(&self, _: &str, _: usize) {}
}

impl Counts {
    fn get(&self, outcome: &str) -> u64 {
        self.0.lock().unwrap().get(outcome).copied().unwrap_or(0)
    }
}

pub(crate) fn event(n: usize) -> DispatchEvent {
    DispatchEvent {
        kind: "chain".into(),
        event: "end".into(),
        run_id: format!("run-{n}"),
        parent_run_id: None,
        name: "shop.orders.events".into(),
        timestamp: SystemTime::now(),
        input: EventInput::default(),
        output: EventOutput::default(),
        user_id: None,
        tokens_usage: None,
        metadata: EventMetadata {
            duration_ms: 1.0,
            ..EventMetadata::default()
        },
        tags: vec![],
        log_id: format!("run-{n}"),
    }
}

struct Running {
    handle: SinkHandle,
    counts: Arc<Counts>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    dead_letters: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start(sink: Scripted, batch_size: usize, full: FullPolicy, buffer: usize) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let dead_letters = dir.path().join("dead.jsonl");
    let config = DriverConfig {
        batch_size,
        flush_interval: Duration::from_secs(5),
        buffer,
        full,
        retry: RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        },
        shutdown_deadline: Duration::from_secs(10),
        send_timeout: Duration::from_secs(30),
        dead_letter: dead_letters.clone(),
    };
    let counts = Arc::new(Counts::default());
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let handle = SinkDriver::spawn(
        Box::new(sink),
        config,
        Some(counts.clone()),
        &tracker,
        shutdown.clone(),
    );
    Running {
        handle,
        counts,
        tracker,
        shutdown,
        dead_letters,
        _dir: dir,
    }
}

impl Running {
    async fn stop(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// received = sent + dead-lettered + dropped (+ queued, zero once stopped).
    fn assert_accounted(&self) {
        let c = &self.counts;
        assert_eq!(
            c.get("received"),
            c.get("sent") + c.get("dead_lettered") + c.get("dropped"),
            "{:?}",
            c.0.lock().unwrap()
        );
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn full_batches_go_at_once_and_a_partial_one_after_the_flush_interval() {
    let sink = Scripted::default();
    let running = start(sink.clone(), 3, FullPolicy::Block, 100);
    for n in 0..7 {
        running.handle.offer(event(n)).await;
    }
    settle().await;
    let sizes: Vec<usize> = sink.calls.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(sizes, [3, 3], "the seventh waits for company");
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    let sizes: Vec<usize> = sink.calls.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(sizes, [3, 3, 1]);
    running.stop().await;
    assert_eq!(running.counts.get("sent"), 7);
    running.assert_accounted();
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_and_retry_after_is_honoured() {
    let sink = Scripted::default();
    let mut busy = SinkError::from_status(429, Some(Duration::from_secs(7)), "slow down");
    busy.retry_after = Some(Duration::from_secs(7));
    sink.answers.lock().unwrap().push_back(Err(busy.into()));
    let running = start(sink.clone(), 2, FullPolicy::Block, 100);
    running.handle.offer(event(1)).await;
    running.handle.offer(event(2)).await;
    running.stop().await;
    let calls = sink.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[1].0 - calls[0].0 >= Duration::from_secs(7),
        "waited as the service asked"
    );
    assert_eq!(running.counts.get("retried"), 2);
    assert_eq!(running.counts.get("sent"), 2);
    running.assert_accounted();
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_are_dead_lettered_at_once() {
    let sink = Scripted::default();
    sink.answers
        .lock()
        .unwrap()
        .push_back(Err(SinkError::from_status(400, None, "bad event").into()));
    let running = start(sink.clone(), 2, FullPolicy::Block, 100);
    running.handle.offer(event(1)).await;
    running.handle.offer(event(2)).await;
    running.stop().await;
    assert_eq!(sink.calls.lock().unwrap().len(), 1, "never retried");
    assert_eq!(running.counts.get("dead_lettered"), 2);
    let text = std::fs::read_to_string(&running.dead_letters).unwrap();
    let letter: dead_letter::DeadLetter =
        serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!((letter.reason.as_str(), letter.attempts), ("permanent", 1));
    assert!(letter.last_error.contains("HTTP 400"));
    running.assert_accounted();
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_dead_letter_and_the_file_can_be_replayed() {
    let sink = Scripted::default();
    for _ in 0..3 {
        sink.answers
            .lock()
            .unwrap()
            .push_back(Err(SinkError::transient("connection refused").into()));
    }
    let running = start(sink.clone(), 5, FullPolicy::Block, 100);
    for n in 0..3 {
        running.handle.offer(event(n)).await;
    }
    running.stop().await;
    assert_eq!(
        sink.calls.lock().unwrap().len(),
        3,
        "the first try and two retries"
    );
    assert_eq!(running.counts.get("dead_lettered"), 3);
    running.assert_accounted();

    let replay = dead_letter::read(&running.dead_letters).unwrap();
    let ids: Vec<&str> = replay.iter().map(|e| e.run_id.as_str()).collect();
    assert_eq!(ids, ["run-0", "run-1", "run-2"]);
}

#[tokio::test(start_paused = true)]
async fn events_a_service_accepted_are_not_sent_again() {
    let sink = Scripted::default();
    sink.answers.lock().unwrap().push_back(Err(SendError {
        accepted: 2,
        error: SinkError::transient("reset"),
    }));
    let running = start(sink.clone(), 4, FullPolicy::Block, 100);
    for n in 0..4 {
        running.handle.offer(event(n)).await;
    }
    running.stop().await;
    let accepted = sink.accepted.lock().unwrap().clone();
    assert_eq!(
        accepted,
        ["run-0", "run-1", "run-2", "run-3"],
        "each exactly once"
    );
    let sizes: Vec<usize> = sink.calls.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(sizes, [4, 2]);
    running.assert_accounted();
}

#[tokio::test(start_paused = true)]
async fn refused_events_are_dead_lettered_alone() {
    let sink = Scripted::default();
    sink.answers.lock().unwrap().push_back(Ok(Delivery {
        refused: vec![(1, "duplicate".into())],
        ..Delivery::default()
    }));
    let running = start(sink.clone(), 3, FullPolicy::Block, 100);
    for n in 0..3 {
        running.handle.offer(event(n)).await;
    }
    running.stop().await;
    assert_eq!(
        (
            running.counts.get("sent"),
            running.counts.get("dead_lettered")
        ),
        (2, 1)
    );
    let letters = dead_letter::read(&running.dead_letters).unwrap();
    assert_eq!(letters[0].run_id, "run-1");
    running.assert_accounted();
}

/// Each dead letter keeps its own reason: an event the plugin could not send at all is
/// `permanent`, refusals are `refused_by_service`, and two refusals keep their two reasons.
#[tokio::test(start_paused = true)]
async fn refused_and_unsendable_events_are_dead_lettered_each_with_its_reason() {
    let sink = Scripted::default();
    sink.answers.lock().unwrap().push_back(Ok(Delivery {
        refused: vec![(0, "invalid input".into()), (3, "bad name".into())],
        unsendable: vec![(2, "over the body limit".into())],
    }));
    let running = start(sink.clone(), 4, FullPolicy::Block, 100);
    for n in 0..4 {
        running.handle.offer(event(n)).await;
    }
    running.stop().await;
    assert_eq!(
        (
            running.counts.get("sent"),
            running.counts.get("dead_lettered")
        ),
        (1, 3)
    );
    assert_eq!(*sink.accepted.lock().unwrap(), ["run-1"]);
    let mut letters: Vec<(String, String, String)> = std::fs::read_to_string(&running.dead_letters)
        .unwrap()
        .lines()
        .map(|line| {
            let letter: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                letter["event"]["runId"].as_str().unwrap().to_owned(),
                letter["reason"].as_str().unwrap().to_owned(),
                letter["last_error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    letters.sort();
    assert_eq!(
        letters,
        [
            (
                "run-0".into(),
                "refused_by_service".into(),
                "invalid input".into()
            ),
            (
                "run-2".into(),
                "permanent".into(),
                "over the body limit".into()
            ),
            (
                "run-3".into(),
                "refused_by_service".into(),
                "bad name".into()
            ),
        ]
    );
    running.assert_accounted();
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_the_partial_batch_and_loses_nothing() {
    let sink = Scripted::default();
    let running = start(sink.clone(), 100, FullPolicy::Block, 1000);
    for n in 0..250 {
        running.handle.offer(event(n)).await;
    }
    running.stop().await;
    assert_eq!(sink.accepted.lock().unwrap().len(), 250);
    assert_eq!(running.counts.get("sent"), 250);
    running.assert_accounted();
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_drops_the_newest_under_drop_newest_and_counts_it() {
    // A sink that never answers holds the driver, so the queue fills.
    struct Stuck;
    #[async_trait]
    impl Sink for Stuck {
        fn name(&self) -> &str {
            "stuck"
        }
        async fn send_events(&self, _: &[DispatchEvent]) -> Result<Delivery, SendError> {
            std::future::pending().await
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let counts = Arc::new(Counts::default());
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let config = DriverConfig {
        batch_size: 1,
        flush_interval: Duration::from_secs(5),
        buffer: 2,
        full: FullPolicy::DropNewest,
        retry: RetryPolicy {
            attempts: 0,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        },
        shutdown_deadline: Duration::from_secs(1),
        send_timeout: Duration::from_secs(3600),
        dead_letter: dir.path().join("dead.jsonl"),
    };
    let handle = SinkDriver::spawn(
        Box::new(Stuck),
        config,
        Some(counts.clone()),
        &tracker,
        shutdown.clone(),
    );
    let mut queued = 0;
    for n in 0..10 {
        if handle.offer(event(n)).await {
            queued += 1;
        }
        settle().await;
    }
    assert!(queued < 10);
    assert_eq!(counts.get("dropped"), 10 - queued);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    // What was queued or stuck in the hung batch at the deadline is dead-lettered, not lost.
    assert_eq!(
        counts.get("received"),
        counts.get("sent") + counts.get("dead_lettered") + counts.get("dropped")
    );
}

/// An unreadable bus entry is counted once it is in the dead letters, and not at all while
/// they cannot be written: the bus delivers it again then, and counting each try would count
/// one entry as received again and again.
#[tokio::test]
async fn an_unreadable_entry_counts_once_it_is_a_dead_letter() {
    let running = start(Scripted::default(), 10, FullPolicy::Block, 10);
    // A directory where the file should be: the dead letter cannot be written.
    std::fs::create_dir(&running.dead_letters).unwrap();
    assert!(
        !running
            .handle
            .dead_letter_unreadable(Some("not json"), "expected value")
            .await
    );
    assert!(!running.handle.dead_letter_unreadable(None, "no data").await);
    assert_eq!(running.counts.get("received"), 0);
    assert_eq!(running.counts.get("dead_lettered"), 0);

    std::fs::remove_dir(&running.dead_letters).unwrap();
    assert!(
        running
            .handle
            .dead_letter_unreadable(Some("not json"), "expected value")
            .await
    );
    assert_eq!(running.counts.get("received"), 1);
    assert_eq!(running.counts.get("dead_lettered"), 1);
    let text = std::fs::read_to_string(&running.dead_letters).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    running.shutdown.cancel();
    running.tracker.close();
    running.tracker.wait().await;
}
