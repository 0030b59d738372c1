//! The one sink driver: batching, retries, dead letters, shutdown and accounting for every
//! plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::dead_letter::DeadLetterFile;
use super::{DispatchEvent, Retry, SendError, Sink, SinkError};
use crate::resilience::RetryPolicy;

/// The longest `Retry-After` honoured; a service asking for more gets its events dead-lettered
/// after the retries rather than holding the pipeline for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// What happens to an event offered while the sink's buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Wait for room: backpressure to whoever offers (the default).
    Block,
    /// Drop the offered event and count it as `dropped`.
    DropNewest,
}

/// How much longer than its plugin's own `timeout` a call may take before the driver abandons it:
/// the plugin's timeout fires first, this catches a plugin that does not keep to it.
pub const SEND_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

/// How the driver batches, queues, retries and dead-letters for one sink; a configured sink's
/// values come from its `[[sinks]]` element and the embedded `[defaults.sinks]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverConfig {
    /// Events per batch at most.
    pub batch_size: usize,
    /// A partial batch is sent once its oldest event waited this long.
    pub flush_interval: Duration,
    /// Events queued for the sink at most.
    pub buffer: usize,
    pub full: FullPolicy,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// How long the final flush may take at shutdown; what is left then is dead-lettered.
    pub shutdown_deadline: Duration,
    /// One call to the backend at most; past it the call counts as a transient failure. A
    /// configured sink's is its plugin's `timeout` plus [`SEND_TIMEOUT_MARGIN`].
    pub send_timeout: Duration,
    pub dead_letter: std::path::PathBuf,
}

/// `outcome` of `sink_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Received,
    Sent,
    /// Events of a batch sent again after a transient failure (counted per retry).
    Retried,
    Dropped,
    DeadLettered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Sent => "sent",
            Outcome::Retried => "retried",
            Outcome::Dropped => "dropped",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Told what the driver does (the metrics implement it).
pub trait SinkObserver: Send + Sync + 'static {
    fn events(&self, sink: &str, outcome: Outcome, count: u64);
    fn batch(&self, sink: &str, size: usize);
    /// One call to the backend: `status_family` is `2xx`, `4xx`, `5xx` or `error` (no answer).
    fn request(&self, sink: &str, status_family: &str, elapsed: Duration);
    fn queue_depth(&self, sink: &str, depth: usize);
    /// Who is told about repairs of the files the driver writes (a torn dead-letter file).
    fn file_observer(&self) -> Option<Arc<dyn crate::appender::FileObserver>> {
        None
    }
}

/// An event in a driver's queue, with the bus entry to acknowledge once it is settled.
#[derive(Debug, Clone)]
struct Queued {
    event: DispatchEvent,
    ack: Option<String>,
}

/// The batch being gathered: the events, and beside each its bus entry to acknowledge.
struct Batch {
    events: Vec<DispatchEvent>,
    acks: Vec<Option<String>>,
}

impl Batch {
    fn with_capacity(capacity: usize) -> Batch {
        Batch {
            events: Vec::with_capacity(capacity),
            acks: Vec::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.events.len()
    }

    fn extend(&mut self, items: impl Iterator<Item = Queued>) {
        for Queued { event, ack } in items {
            self.events.push(event);
            self.acks.push(ack);
        }
    }

    fn clear(&mut self) {
        self.events.clear();
        self.acks.clear();
    }
}

/// Where events are offered to a running driver. Cheap to clone.
#[derive(Clone)]
pub struct SinkHandle {
    name: Arc<str>,
    queue: mpsc::Sender<Queued>,
    full: FullPolicy,
    observer: Option<Arc<dyn SinkObserver>>,
    dead_letters: DeadLetterFile,
}

impl SinkHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Offers one event: counted as received, then queued (waiting for room under `block`) or
    /// dropped and counted (under `drop_newest`, or once the driver has stopped). Answers whether
    /// it was queued.
    pub async fn offer(&self, event: DispatchEvent) -> bool {
        self.enqueue(Queued { event, ack: None }).await
    }

    /// Offers an event read from a bus: once it is settled (sent or dead-lettered) the driver
    /// reports `ack` on its acknowledgement channel.
    pub async fn offer_acked(&self, event: DispatchEvent, ack: String) -> bool {
        self.enqueue(Queued {
            event,
            ack: Some(ack),
        })
        .await
    }

    async fn enqueue(&self, item: Queued) -> bool {
        self.count(Outcome::Received, 1);
        let queued = match self.full {
            FullPolicy::Block => self.queue.send(item).await.is_ok(),
            FullPolicy::DropNewest => self.queue.try_send(item).is_ok(),
        };
        if !queued {
            self.count(Outcome::Dropped, 1);
            tracing::debug!(sink = %self.name, "A sink's queue refused an event; it was dropped.");
        }
        queued
    }

    fn count(&self, outcome: Outcome, count: u64) {
        if let Some(observer) = &self.observer {
            observer.events(&self.name, outcome, count);
        }
    }

    /// Keeps a bus entry that is not a dispatch event this version can read in the sink's
    /// dead-letter file ([`DeadLetterFile::append_unreadable`]): counted as received and
    /// dead-lettered once written. Answers whether it was; when not (the file cannot be
    /// written), nothing is counted here and the caller leaves the entry to the bus, which
    /// delivers it again (counting it then would count one entry as received again and again).
    pub async fn dead_letter_unreadable(&self, data: Option<&str>, error: &str) -> bool {
        match self
            .dead_letters
            .append_unreadable(&self.name, data, error)
            .await
        {
            Ok(()) => {
                self.count(Outcome::Received, 1);
                self.count(Outcome::DeadLettered, 1);
                true
            }
            Err(io) => {
                tracing::error!(
                    sink = %self.name,
                    path = %self.dead_letters.path().display(),
                    error = %io,
                    "Could not write the dead letter of an unreadable entry."
                );
                false
            }
        }
    }

    /// Events waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

#[async_trait::async_trait]
impl crate::bus::Subscriber for SinkHandle {
    async fn offer(&self, event: DispatchEvent) -> bool {
        SinkHandle::offer(self, event).await
    }
}

/// Runs a [`Sink`] behind a bounded queue.
pub struct SinkDriver {
    sink: Box<dyn Sink>,
    name: Arc<str>,
    config: DriverConfig,
    dead_letters: DeadLetterFile,
    observer: Option<Arc<dyn SinkObserver>>,
    /// Bus mode: settled entries are reported here, and events still queued at the shutdown
    /// deadline stay unacknowledged (the bus delivers them again) instead of dead-lettered.
    acks: Option<mpsc::Sender<Vec<String>>>,
}

impl SinkDriver {
    /// Starts the driver on `tracker`; it runs until `shutdown`, then flushes within the
    /// deadline, dead-letters what is left, and closes the sink.
    pub fn spawn(
        sink: Box<dyn Sink>,
        config: DriverConfig,
        observer: Option<Arc<dyn SinkObserver>>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> SinkHandle {
        SinkDriver::spawn_with_acks(sink, config, observer, None, tracker, shutdown)
    }

    /// Like [`SinkDriver::spawn`], for events read from a bus that must be acknowledged only
    /// once settled: their entry ids are sent on `acks` after their batch was sent or
    /// dead-lettered, and what is still queued at the shutdown deadline is left to the bus.
    pub fn spawn_with_acks(
        sink: Box<dyn Sink>,
        config: DriverConfig,
        observer: Option<Arc<dyn SinkObserver>>,
        acks: Option<mpsc::Sender<Vec<String>>>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> SinkHandle {
        let name: Arc<str> = sink.name().into();
        let (queue, events) = mpsc::channel(config.buffer.max(1));
        let dead_letters = DeadLetterFile::new(config.dead_letter.clone())
            .with_observer(observer.as_ref().and_then(|o| o.file_observer()));
        let handle = SinkHandle {
            name: name.clone(),
            queue,
            full: config.full,
            observer: observer.clone(),
            dead_letters: dead_letters.clone(),
        };
        let driver = SinkDriver {
            dead_letters,
            sink,
            name,
            config,
            observer,
            acks,
        };
        tracker.spawn(driver.run(events, shutdown));
        handle
    }

    fn count(&self, outcome: Outcome, count: usize) {
        if let (Some(observer), true) = (&self.observer, count > 0) {
            observer.events(&self.name, outcome, count as u64);
        }
    }

    async fn run(mut self, mut events: mpsc::Receiver<Queued>, shutdown: CancellationToken) {
        if let Err(error) = self.sink.init().await {
            tracing::error!(sink = %self.name, %error, "A sink failed to initialize; its batches will fail and be dead-lettered.");
        }
        let batch_size = self.config.batch_size.max(1);
        // Received into `received`, then moved into `batch`, which deliveries borrow: a batch
        // is never copied, also when a delivery is retried or cut short by shutdown.
        let mut received: Vec<Queued> = Vec::with_capacity(batch_size);
        let mut batch = Batch::with_capacity(batch_size);
        let mut oldest: Option<Instant> = None;
        loop {
            let flush_at = oldest.map(|at| at + self.config.flush_interval);
            let room = batch_size - batch.len();
            let due = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = sleep_until(flush_at) => true,
                count = events.recv_many(&mut received, room) => {
                    if count == 0 {
                        break;
                    }
                    batch.extend(received.drain(..));
                    oldest.get_or_insert_with(Instant::now);
                    batch.len() >= batch_size
                }
            };
            if due && !batch.events.is_empty() {
                // A send (with its retries) yields to shutdown; its batch then joins the final
                // flush, and what the service already took may be sent again, as at-least-once
                // allows.
                let settled = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    settled = self.send(&batch.events) => settled,
                };
                // Sent: whatever happens next, it is not sent again. Handing its acknowledgements
                // over waits for the acknowledger, and yields to shutdown too: then they stay
                // pending (the consumer counts them as abandoned).
                let handed = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => false,
                    () = self.hand_over(settled, &batch.acks) => true,
                };
                batch.clear();
                oldest = None;
                if !handed {
                    break;
                }
            }
            self.depth(&events, batch.len());
        }

        // Stop taking events, then flush everything queued within the deadline.
        events.close();
        let deadline = Instant::now() + self.config.shutdown_deadline;
        while let Ok(item) = events.try_recv() {
            batch.extend(std::iter::once(item));
        }
        let total = batch.len();
        let mut pending = batch;
        let flushed = tokio::time::timeout_at(deadline, async {
            while !pending.events.is_empty() {
                // The chunk leaves `pending` only once delivered, so a deadline that cuts a
                // delivery short still finds it there.
                let chunk = batch_size.min(pending.len());
                self.deliver(&pending.events[..chunk], &pending.acks[..chunk])
                    .await;
                pending.events.drain(..chunk);
                pending.acks.drain(..chunk);
            }
        })
        .await;
        if flushed.is_err() {
            // What was not settled in time; a batch cut off mid-send may reach the service too,
            // which at-least-once allows.
            let count = pending.len();
            if self.acks.is_some() {
                tracing::warn!(sink = %self.name, count, "Left events unacknowledged at the shutdown deadline; the bus will deliver them again.");
            } else {
                self.dead_letter(
                    &pending.events,
                    "shutdown",
                    0,
                    "the shutdown deadline passed before it was sent",
                )
                .await;
                tracing::warn!(sink = %self.name, count, "Dead-lettered events still queued at the shutdown deadline.");
            }
        }
        if let Err(error) = self.sink.close().await {
            tracing::warn!(sink = %self.name, %error, "A sink did not close cleanly.");
        }
        self.depth(&events, 0);
        tracing::info!(sink = %self.name, flushed = total, "A sink stopped.");
    }

    fn depth(&self, events: &mpsc::Receiver<Queued>, in_batch: usize) {
        if let Some(observer) = &self.observer {
            observer.queue_depth(&self.name, events.len() + in_batch);
        }
    }

    /// Sends one batch until every event is sent or dead-lettered, then acknowledges its bus
    /// entries (unless a dead letter could not be written: those stay with the bus).
    async fn deliver(&self, batch: &[DispatchEvent], ids: &[Option<String>]) {
        if batch.is_empty() {
            return;
        }
        let settled = self.send(batch).await;
        self.hand_over(settled, ids).await;
    }

    /// Hands a sent batch's bus entry ids to the acknowledger, when it settled (every event sent
    /// or dead-lettered).
    async fn hand_over(&self, settled: bool, ids: &[Option<String>]) {
        if let (true, Some(acks)) = (settled, &self.acks) {
            let ids: Vec<String> = ids.iter().flatten().cloned().collect();
            if !ids.is_empty() {
                // A bounded channel: the driver waits for the acknowledger, so at most a
                // batch or two are settled but unacknowledged at any moment, which bounds the
                // duplicates a crash can cause.
                let _ = acks.send(ids).await;
            }
        }
    }

    /// Sends one batch with its retries, in a span linked to each event's dispatch trace.
    async fn send(&self, batch: &[DispatchEvent]) -> bool {
        let span = tracing::info_span!(
            target: "dispatchd::trace",
            "sink send",
            otel.name = %format_args!("{} send", self.name),
            otel.kind = "producer",
            dispatchd.sink = %self.name,
            // An i64, so it is exported as an integer (a `usize` is recorded as text).
            dispatchd.batch_size = i64::try_from(batch.len()).unwrap_or(i64::MAX),
        );
        for event in batch {
            if let Some(context) = event
                .metadata
                .traceparent
                .as_deref()
                .and_then(crate::propagation::parse_traceparent)
            {
                span.add_link(context);
            }
        }
        self.send_batch(batch).instrument(span).await
    }

    /// Sends one batch with its retries; false when some event could not be settled.
    async fn send_batch(&self, batch: &[DispatchEvent]) -> bool {
        if let Some(observer) = &self.observer {
            observer.batch(&self.name, batch.len());
        }
        let mut pending: &[DispatchEvent] = batch;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let started = Instant::now();
            let sent =
                tokio::time::timeout(self.config.send_timeout, self.sink.send_events(pending));
            let result = match sent.await {
                Ok(result) => result,
                Err(_) => Err(SinkError::transient(format!(
                    "no answer within {:?}",
                    self.config.send_timeout
                ))
                .into()),
            };
            let family = match &result {
                Ok(_) => "2xx".to_owned(),
                Err(SendError { error, .. }) => error.status.map_or_else(
                    || "error".to_owned(),
                    |status| format!("{}xx", status / 100),
                ),
            };
            if let Some(observer) = &self.observer {
                observer.request(&self.name, &family, started.elapsed());
            }
            let (accepted, error) = match result {
                Ok(delivery) => {
                    let not_sent: BTreeSet<usize> = (delivery.refused.iter())
                        .chain(&delivery.unsendable)
                        .map(|(index, _)| *index)
                        .filter(|index| *index < pending.len())
                        .collect();
                    self.count(Outcome::Sent, pending.len() - not_sent.len());
                    // Each event once, whatever a plugin listed twice.
                    let mut settled = BTreeSet::new();
                    let refused = self
                        .dead_letter_each(
                            pending,
                            &delivery.refused,
                            "refused_by_service",
                            attempts,
                            &mut settled,
                        )
                        .await;
                    let unsendable = self
                        .dead_letter_each(
                            pending,
                            &delivery.unsendable,
                            "permanent",
                            attempts,
                            &mut settled,
                        )
                        .await;
                    return refused && unsendable;
                }
                Err(SendError { accepted, error }) => (accepted.min(pending.len()), error),
            };
            self.count(Outcome::Sent, accepted);
            pending = &pending[accepted..];
            if pending.is_empty() {
                return true;
            }
            if error.retry == Retry::Permanent {
                return self
                    .dead_letter(pending, "permanent", attempts, &error.message)
                    .await;
            }
            if attempts > self.config.retry.attempts {
                return self
                    .dead_letter(pending, "retries_exhausted", attempts, &error.message)
                    .await;
            }
            let backoff = self.config.retry.delay(attempts);
            let delay = error
                .retry_after
                .map_or(backoff, |asked| asked.min(MAX_RETRY_AFTER).max(backoff));
            tracing::debug!(sink = %self.name, attempts, delay_ms = delay.as_millis() as u64, error = %error, "Retrying a batch.");
            self.count(Outcome::Retried, pending.len());
            tokio::time::sleep(delay).await;
        }
    }

    /// Dead-letters the events of `batch` at the given indices (but those in `settled`, which it
    /// adds them to), each with its own reason as the last error; false when some could not be
    /// written.
    async fn dead_letter_each(
        &self,
        batch: &[DispatchEvent],
        which: &[(usize, String)],
        reason: &str,
        attempts: u32,
        settled: &mut BTreeSet<usize>,
    ) -> bool {
        let mut by_error: BTreeMap<&str, Vec<DispatchEvent>> = BTreeMap::new();
        for (index, error) in which {
            if let Some(event) = batch.get(*index).filter(|_| settled.insert(*index)) {
                by_error.entry(error).or_default().push(event.clone());
            }
        }
        let mut written = true;
        for (error, events) in by_error {
            written &= self.dead_letter(&events, reason, attempts, error).await;
        }
        written
    }

    /// Writes dead letters; false (and counted as dropped) when even that failed.
    async fn dead_letter(
        &self,
        events: &[DispatchEvent],
        reason: &str,
        attempts: u32,
        error: &str,
    ) -> bool {
        if events.is_empty() {
            return true;
        }
        match self
            .dead_letters
            .append(&self.name, reason, attempts, error, events)
            .await
        {
            Ok(()) => {
                self.count(Outcome::DeadLettered, events.len());
                true
            }
            Err(io) => {
                // Nowhere left to put them: say so loudly and count them as dropped.
                tracing::error!(
                    sink = %self.name,
                    path = %self.dead_letters.path().display(),
                    error = %io,
                    count = events.len(),
                    "Could not write dead letters; the events are lost."
                );
                self.count(Outcome::Dropped, events.len());
                false
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
