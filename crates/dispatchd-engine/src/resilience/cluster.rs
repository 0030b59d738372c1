//! The seams for protections shared by every instance of a fleet (`scope = "cluster"`).
//!
//! The engine does no I/O: the service implements these traits on Redis. Each call is one round
//! trip that the implementation bounds in time; an `Err` is a store that could not answer, and
//! the protections then fall back (see [`super::Protections`]): dedup runs the call
//! (at-least-once), the rate limiter uses the instance's own limiter. Each fallback is reported
//! through [`super::ResilienceObserver::cluster_fallback`].

use std::time::Duration;

use async_trait::async_trait;

/// Where a protection keeps its state: in this process (the default) or shared by every instance
/// on one store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    Instance,
    Cluster,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Instance => "instance",
            Scope::Cluster => "cluster",
        }
    }
}

/// `protection` of `dispatcher_cluster_fallbacks_total`: which shared protection fell back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterProtection {
    Dedup,
    RateLimit,
}

impl ClusterProtection {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterProtection::Dedup => "dedup",
            ClusterProtection::RateLimit => "rate_limit",
        }
    }
}

/// A shared store that could not answer (unreachable, too slow, or an error reply).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// What the shared dedup store says about a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupClaim {
    /// Nobody ran it or runs it: this instance now holds it while it runs.
    Claimed,
    /// Some instance ran it successfully within the TTL: skip it.
    Done,
    /// Some instance is running it now: refuse, so that the sender retries later.
    Running,
}

/// The message ids every instance handled, shared: one dispatcher's keys.
///
/// The protocol: [`claim`](DedupStore::claim) marks the id as running (for a bound the
/// implementation knows, so a crashed instance's claim lapses); then exactly one of
/// [`succeeded`](DedupStore::succeeded) (remember it for the dedup TTL) or
/// [`failed`](DedupStore::failed) (forget it, so a retry may run) follows.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    async fn claim(&self, message_id: &str) -> Result<DedupClaim, StoreError>;
    async fn succeeded(&self, message_id: &str) -> Result<(), StoreError>;
    async fn failed(&self, message_id: &str) -> Result<(), StoreError>;
}

/// One dispatcher's token bucket, shared.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Takes one token if it is free now or within `max_wait` (then reserved: the caller waits
    /// the answered delay and runs); `Ok(None)` when it is further away (refused, nothing taken).
    async fn acquire(&self, max_wait: Duration) -> Result<Option<Duration>, StoreError>;
}
