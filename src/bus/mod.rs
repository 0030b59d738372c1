//! The bus: where dispatch events go after each dispatch.
//!
//! Owns: the [`EventBus`] trait and the in-memory bus, the embedded default. The in-memory bus
//! hands every event to each sink's bounded queue; what happens when a queue is full is the
//! sink's named policy (`block`, the default, or `drop_newest`, counted), so the bus itself holds
//! nothing and loses nothing silently.
//!
//! [`redis`] has the Redis Streams side: the publisher (events, with its dead-letter file when
//! Redis cannot take them), handler outputs, and the consumer groups that sinks and `[[sources]]`
//! read through; [`consume`] the one at-least-once consume loop both use, and the upkeep that
//! keeps a group and its stream small (stale consumers removed, acknowledged entries trimmed).
//!
//! Also the bus's own: the [`DispatchEvent`] it carries and the [`dead_letter`] file format (the
//! bus's dead letters and the sinks' share it).
//!
//! Must not: import anything from the sinks. The sinks depend on the bus (they read through
//! [`consume`], subscribe to the in-memory bus as a [`Subscriber`], and write [`dead_letter`]
//! files), never the reverse; a test in `tests/it/architecture.rs` holds it.

pub mod consume;
pub mod dead_letter;
mod event;
pub mod redis;
pub mod registry;

pub use event::{DispatchEvent, EventInput, EventMetadata, EventOutput};

use async_trait::async_trait;

/// Told about the Redis bus: consumers' backlogs, failures and recoveries, and the publisher's
/// outcomes (the metrics implement it).
pub trait BusObserver: Send + Sync + 'static {
    /// A group's backlog as last read (about every second); `None` when it could not be read
    /// (Redis away, the group gone) or its consumer stopped: unknown, not the last value.
    fn backlog(&self, stream: &str, group: &str, backlog: Option<redis::Backlog>);
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
    /// A consumer of `group` read an entry that is not what it consumes (a sink: a dispatch
    /// event; a source: a message) and kept it aside instead of processing it.
    fn unreadable(&self, stream: &str, group: &str);
    /// One acknowledgement (`XACK`) failed; it is tried again. The default does nothing.
    fn ack_failed(&self, _stream: &str, _group: &str) {}
    /// A consumer left `entries` entries it had taken unacknowledged: Redis refused their
    /// acknowledgement 50 times, or the consumer stopped before it could acknowledge them (Redis
    /// away, or its deliverer still working at its deadline). They stay pending and are delivered
    /// again; the work of those that were settled is done twice. The default does nothing.
    fn entries_abandoned(&self, _stream: &str, _group: &str, _entries: u64) {}
}

/// Where dispatch events are published.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes one event; answers how many subscribers took it.
    async fn publish(&self, event: DispatchEvent) -> usize;

    /// Whether a published event could reach anyone. `false` lets a dispatch skip building its
    /// event (redacting the payload again, serializing its outcome) when nothing would take it;
    /// the default, `true`, always builds it.
    fn has_subscribers(&self) -> bool {
        true
    }

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Publishing {
    Ok,
    /// The last event offered could not be published (it went to the dead-letter file); the
    /// next one tries again.
    Failing,
}

/// What the in-memory bus hands events to: each sink's queue, in this process (the sinks
/// implement it; the bus does not know them).
#[async_trait]
pub trait Subscriber: Send + Sync + 'static {
    /// Takes one event; answers whether it was queued (else it was dropped, and counted, by the
    /// subscriber's own full-queue policy).
    async fn offer(&self, event: DispatchEvent) -> bool;
}

/// The in-memory bus: a fan-out to the sinks of this process.
#[derive(Clone, Default)]
pub struct MemoryBus {
    sinks: Vec<std::sync::Arc<dyn Subscriber>>,
}

impl MemoryBus {
    pub fn new(sinks: Vec<impl Subscriber>) -> MemoryBus {
        MemoryBus {
            sinks: sinks
                .into_iter()
                .map(|sink| std::sync::Arc::new(sink) as std::sync::Arc<dyn Subscriber>)
                .collect(),
        }
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

    /// A memory bus without sinks takes nothing.
    fn has_subscribers(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Publishing into the sinks' queues cannot fail (a full queue follows the sink's policy).
    fn status(&self) -> BusStatus {
        BusStatus {
            kind: "memory",
            publishing: Publishing::Ok,
        }
    }
}
