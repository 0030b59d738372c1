//! A sink fed from a Redis Streams consumer group, through the bus's one consume loop
//! ([`crate::bus::consume`]): each entry is handed to the sink's driver, and acknowledged once the
//! driver settled it (sent, or dead-lettered). Reading, reclaiming, keeping what is in flight,
//! riding out Redis going away or losing the group, and the backlog gauges are the loop's.

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DispatchEvent, DriverConfig, Sink, SinkDriver, SinkHandle, SinkObserver};
use crate::bus::BusObserver;
use crate::bus::consume::{Acks, Consumer, Deliver};
use crate::bus::redis::{BusError, ConsumerConfig, Entry};

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
) -> Result<(), BusError> {
    let stream = consumer.stream.clone();
    let group = consumer.group.clone();
    let consumer = Consumer::connect(&url, consumer, bus_observer.clone()).await?;
    consumer
        .run(
            |acks| {
                let drivers = TaskTracker::new();
                let stop = CancellationToken::new();
                let handle = SinkDriver::spawn_with_acks(
                    sink,
                    driver,
                    observer,
                    Some(acks.sender()),
                    &drivers,
                    stop.clone(),
                );
                drivers.close();
                ToDriver {
                    handle,
                    drivers,
                    stop,
                    stream,
                    group,
                    bus_observer,
                }
            },
            shutdown,
        )
        .await;
    Ok(())
}

/// The sink's side of the loop: entries become events in the driver's queue.
struct ToDriver {
    handle: SinkHandle,
    drivers: TaskTracker,
    stop: CancellationToken,
    stream: String,
    group: String,
    bus_observer: Option<Arc<dyn BusObserver>>,
}

#[async_trait]
impl Deliver for ToDriver {
    async fn deliver(&mut self, entry: Entry, acks: &Acks) {
        let event = match entry.data.as_deref() {
            Some(data) => serde_json::from_str::<DispatchEvent>(data).map_err(|e| e.to_string()),
            None => Err("the entry has no `data` field".to_owned()),
        };
        match event {
            Ok(event) => {
                if !self.handle.offer_acked(event, entry.id.clone()).await {
                    // Dropped by the queue's policy: left pending, it is delivered again after
                    // `claim_idle`.
                    acks.release(&entry.id);
                }
            }
            Err(error) => {
                // This version cannot send it (an event from a newer version, or something else
                // written to the stream): kept in the dead letters, then acknowledged, so it
                // neither blocks the group nor is lost. If even that fails it stays pending.
                tracing::error!(stream = %self.stream, id = %entry.id, %error, "An entry is not a dispatch event this version can read; keeping it as a dead letter.");
                if let Some(observer) = &self.bus_observer {
                    observer.unreadable(&self.stream, &self.group);
                }
                if self
                    .handle
                    .dead_letter_unreadable(entry.data.as_deref(), &error)
                    .await
                {
                    acks.ack(vec![entry.id]).await;
                } else {
                    acks.release(&entry.id);
                }
            }
        }
    }

    async fn finish(self) {
        drop(self.handle);
        self.stop.cancel();
        self.drivers.wait().await;
    }
}
