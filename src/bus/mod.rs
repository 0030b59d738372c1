//! The bus: where dispatch events go after each dispatch.
//!
//! Owns: the [`EventBus`] trait and the in-memory bus, the embedded default. The in-memory bus
//! hands every event to each sink's bounded queue; what happens when a queue is full is the
//! sink's named policy (`block`, the default, or `drop_newest`, counted), so the bus itself holds
//! nothing and loses nothing silently.
//!
//! [`redis`] has the Redis Streams side: the publisher (events, with its dead-letter file when
//! Redis cannot take them), handler outputs, and the consumer groups that sinks and `[[sources]]`
//! read through.

pub mod redis;
pub mod registry;

use async_trait::async_trait;

use crate::sinks::{DispatchEvent, SinkHandle};

/// Where dispatch events are published.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes one event; answers how many subscribers took it.
    async fn publish(&self, event: DispatchEvent) -> usize;

    /// What `/ready` reports of the bus. Implement it for a bus that can fail to publish; the
    /// default reports a bus of kind `custom` that always publishes.
    fn status(&self) -> BusStatus {
        BusStatus {
            kind: "custom",
            publishing: Publishing::Ok,
        }
    }
}

/// The bus as `/ready` shows it: `{"kind": "redis", "publishing": "failing"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BusStatus {
    pub kind: &'static str,
    pub publishing: Publishing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Publishing {
    Ok,
    /// The last event offered could not be published (it went to the dead-letter file); the
    /// next one tries again.
    Failing,
}

/// The in-memory bus: a fan-out to the sinks of this process.
#[derive(Clone, Default)]
pub struct MemoryBus {
    sinks: Vec<SinkHandle>,
}

impl MemoryBus {
    pub fn new(sinks: Vec<SinkHandle>) -> MemoryBus {
        MemoryBus { sinks }
    }

    pub fn sinks(&self) -> &[SinkHandle] {
        &self.sinks
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, event: DispatchEvent) -> usize {
        let mut taken = 0;
        if let Some((last, rest)) = self.sinks.split_last() {
            for sink in rest {
                taken += usize::from(sink.offer(event.clone()).await);
            }
            taken += usize::from(last.offer(event).await);
        }
        taken
    }

    /// Publishing into the sinks' queues cannot fail (a full queue follows the sink's policy).
    fn status(&self) -> BusStatus {
        BusStatus {
            kind: "memory",
            publishing: Publishing::Ok,
        }
    }
}
