//! A sink fed from a Redis Streams consumer group: read, hand to the driver, acknowledge once
//! settled, reclaim what dead consumers left, and ride out Redis going away or losing the group
//! (it is created again, counted; see [`StreamConsumer`]). Failed reads are counted, and the
//! group's backlog is read every second by a task of its own, so a stalled consumer shows on
//! `/metrics` whatever its reading loop is doing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DispatchEvent, DriverConfig, Sink, SinkDriver, SinkObserver};
use crate::bus::redis::{Backlog, ConsumerConfig, StreamConsumer};
use crate::resilience::RetryPolicy;

/// Told about the Redis bus: consumers' backlogs, failures and recoveries, and the publisher's
/// outcomes (the metrics implement it).
pub trait BusObserver: Send + Sync + 'static {
    /// A group's backlog as last read (about every second); `None` when it could not be read
    /// (Redis away, the group gone) or its consumer stopped: unknown, not the last value.
    fn backlog(&self, stream: &str, group: &str, backlog: Option<Backlog>);
    fn reconnected(&self, stream: &str);
    /// One dispatch event offered to the stream: `published`, `dead_lettered` or `dropped`.
    fn published(&self, stream: &str, outcome: &'static str);
    /// A consumer of `group` started: its counters exist from now on, at 0.
    fn consumer_started(&self, stream: &str, group: &str);
    /// One read (or claim) of the stream failed; the consumer backs off and tries again.
    fn read_failed(&self, stream: &str, group: &str);
    /// Redis answered `NOGROUP` and the consumer created the group again: Redis lost state, and
    /// possibly events.
    fn group_recreated(&self, stream: &str, group: &str);
}

/// Backoff between attempts while Redis is unreachable.
const RECONNECT: RetryPolicy = RetryPolicy {
    attempts: u32::MAX,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
};

/// Runs one sink as a member of a consumer group until `shutdown`; then stops reading, flushes
/// within the driver's deadline, acknowledges what was settled, and leaves the rest pending for
/// the next consumer.
pub async fn run_from_redis(
    url: String,
    consumer: ConsumerConfig,
    sink: Box<dyn Sink>,
    driver: DriverConfig,
    observer: Option<Arc<dyn SinkObserver>>,
    bus_observer: Option<Arc<dyn BusObserver>>,
    shutdown: CancellationToken,
) -> Result<(), crate::bus::redis::BusError> {
    let mut reader = StreamConsumer::connect(&url, consumer.clone())
        .await?
        .with_observer(bus_observer.clone());
    let mut acker = StreamConsumer::connect(&url, consumer.clone()).await?;
    let stop_watching = CancellationToken::new();
    let watching = bus_observer
        .clone()
        .map(|observer| reader.watch_backlog(observer, stop_watching.clone()));
    let (acks, mut settled) = mpsc::channel::<Vec<String>>(1);
    let drivers = TaskTracker::new();
    let stop_driver = CancellationToken::new();
    let handle = SinkDriver::spawn_with_acks(
        sink,
        driver,
        observer,
        Some(acks),
        &drivers,
        stop_driver.clone(),
    );
    drivers.close();

    // Acknowledgements: retried while Redis is away, so nothing settled is acknowledged twice or
    // forgotten; the channel closes when the driver is done.
    let stream = consumer.stream.clone();
    let acking = tokio::spawn(async move {
        while let Some(ids) = settled.recv().await {
            let mut attempt = 0;
            loop {
                match acker.ack(&ids).await {
                    Ok(_) => break,
                    Err(error) => {
                        attempt += 1;
                        tracing::warn!(%error, stream = %stream, "Acknowledging entries failed; retrying.");
                        if attempt > 50 {
                            // They stay pending and will be delivered again: duplicates, not loss.
                            break;
                        }
                        tokio::time::sleep(RECONNECT.ceiling(attempt)).await;
                    }
                }
            }
        }
    });

    let claim_every = (consumer.claim_idle / 2).max(Duration::from_millis(100));
    let mut next_claim = tokio::time::Instant::now();
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        let now = tokio::time::Instant::now();
        let read = if now >= next_claim {
            next_claim = now + claim_every;
            reader.reclaim().await
        } else {
            tokio::select! {
                () = shutdown.cancelled() => break,
                read = reader.read() => read,
            }
        };
        let entries = match read {
            Ok(entries) => {
                if failures > 0 {
                    tracing::info!(stream = %consumer.stream, "Redis answers again.");
                    if let Some(observer) = &bus_observer {
                        observer.reconnected(&consumer.stream);
                    }
                }
                failures = 0;
                entries
            }
            Err(error) => {
                failures += 1;
                let delay = RECONNECT.ceiling(failures);
                tracing::warn!(%error, stream = %consumer.stream, delay_ms = delay.as_millis() as u64, "Reading the stream failed; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        for entry in entries {
            let event = entry
                .data
                .as_deref()
                .and_then(|data| serde_json::from_str::<DispatchEvent>(data).ok());
            match event {
                Some(event) => {
                    handle.offer_acked(event, entry.id).await;
                }
                None => {
                    // It can never be processed: acknowledge it so it cannot block the group, and
                    // say so.
                    tracing::error!(stream = %consumer.stream, id = %entry.id, "An entry is not a dispatch event; acknowledging it without sending.");
                    let _ = reader.ack(std::slice::from_ref(&entry.id)).await;
                }
            }
        }
    }

    drop(handle);
    stop_driver.cancel();
    drivers.wait().await;
    let _ = acking.await;
    stop_watching.cancel();
    if let Some(watching) = watching {
        let _ = watching.await;
    }
    Ok(())
}
