//! A sink fed from a Redis Streams consumer group: read, hand to the driver, acknowledge once
//! settled, reclaim what dead consumers left, and ride out Redis going away.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DispatchEvent, DriverConfig, Sink, SinkDriver, SinkObserver};
use crate::bus::redis::{ConsumerConfig, StreamConsumer};
use crate::resilience::RetryPolicy;

/// Told about the consumer's backlog and reconnections (the metrics implement it).
pub trait BusObserver: Send + Sync + 'static {
    fn backlog(&self, stream: &str, group: &str, pending: u64, lag: Option<u64>);
    fn reconnected(&self, stream: &str);
    /// One dispatch event offered to the stream: `published`, `dead_lettered` or `dropped`.
    fn published(&self, stream: &str, outcome: &'static str);
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
    let mut reader = StreamConsumer::connect(&url, consumer.clone()).await?;
    let mut acker = StreamConsumer::connect(&url, consumer.clone()).await?;
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
            if let (Some(observer), Ok((pending, lag))) = (&bus_observer, reader.backlog().await) {
                observer.backlog(&consumer.stream, &consumer.group, pending, lag);
            }
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
    Ok(())
}
