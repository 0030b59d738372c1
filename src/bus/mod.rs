//! The bus: where dispatch events go after each dispatch.
//!
//! Owns: the [`EventBus`] trait and the in-memory bus, the embedded default. The in-memory bus
//! hands every event to each sink's bounded queue; what happens when a queue is full is the
//! sink's named policy (`block`, the default, or `drop_newest`, counted), so the bus itself holds
//! nothing and loses nothing silently.
//!
//! Not yet here (see the changelog): Redis Streams, which lets several dispatchd instances share
//! one stream through a consumer group, inbound `[[sources]]`, and publishing handler outputs.

pub mod redis;

use async_trait::async_trait;

use crate::sinks::{DispatchEvent, SinkHandle};

/// Where dispatch events are published.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes one event; answers how many subscribers took it.
    async fn publish(&self, event: DispatchEvent) -> usize;
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
}
