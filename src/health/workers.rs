//! Out-of-process workers kept in a store every instance shares ([`WorkerStore`]), so a worker
//! may register, heartbeat and unregister through any instance and all of them answer the same.
//!
//! Invariants:
//! - The store keeps whole records ([`WorkerRecord`]): fields it does not know (added by a later
//!   version) travel unchanged.
//! - Times come from the store's clock (`registered_ms`, `heartbeat_ms` and the `now_ms` of a
//!   [`Snapshot`]), never from this host's, so host clocks cannot skew staleness.
//! - Health is still the pure [`evaluate`](super::evaluate), applied to a stored worker and the
//!   store's now ([`StoredWorker::health`]).
//! - A store that cannot be reached says so ([`StoreError::Unavailable`]); it never answers with
//!   old data as if it were current.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{DispatcherHealth, Observation, Origin, State, evaluate};

/// What a worker registered with, stored whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub stale_threshold_seconds: f64,
    #[serde(default)]
    pub critical: bool,
    /// Fields this version does not know, kept as they were written.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl WorkerRecord {
    pub fn stale_threshold(&self) -> Duration {
        Duration::try_from_secs_f64(self.stale_threshold_seconds).unwrap_or(Duration::MAX)
    }
}

/// One worker as the store holds it; times in milliseconds of the store's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWorker {
    pub id: String,
    pub record: WorkerRecord,
    /// When it (last) started: its first registration, or one after it had gone stale.
    pub registered_ms: u64,
    pub heartbeat_ms: u64,
}

impl StoredWorker {
    /// Its health at `now_ms` of the store's clock. A remote worker is running while
    /// registered, and reports no failures; only staleness can make it unhealthy.
    pub fn health(&self, now_ms: u64, failure_limit: u32) -> DispatcherHealth {
        let heartbeat_age = Duration::from_millis(now_ms.saturating_sub(self.heartbeat_ms));
        let stale_threshold = self.record.stale_threshold();
        let verdict = evaluate(Observation {
            heartbeat_age,
            stale_threshold,
            consecutive_failures: 0,
            failure_limit,
            state: State::Running,
        });
        DispatcherHealth {
            dispatcher_id: self.id.clone(),
            healthy: verdict.healthy,
            is_stale: verdict.is_stale,
            heartbeat_age_seconds: heartbeat_age.as_secs_f64(),
            consecutive_failures: 0,
            uptime_seconds: Duration::from_millis(now_ms.saturating_sub(self.registered_ms))
                .as_secs_f64(),
            state: State::Running,
            critical: self.record.critical,
            origin: Origin::Remote,
            stale_threshold_seconds: self.record.stale_threshold_seconds,
            reason: verdict.reason,
            // Shown without credentials or query, as for a worker of this instance.
            endpoint: self
                .record
                .extra
                .get("endpoint")
                .and_then(serde_json::Value::as_str)
                .and_then(|text| text.parse::<reqwest::Url>().ok())
                .map(|url| crate::dispatchers::display_url(url.as_str())),
        }
    }
}

/// Every worker at one instant of the store's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub now_ms: u64,
    pub workers: Vec<StoredWorker>,
}

impl Snapshot {
    /// Every worker's health, ordered by id.
    pub fn health(&self, failure_limit: u32) -> Vec<DispatcherHealth> {
        let mut all: Vec<DispatcherHealth> = self
            .workers
            .iter()
            .map(|w| w.health(self.now_ms, failure_limit))
            .collect();
        all.sort_by(|a, b| a.dispatcher_id.cmp(&b.dispatcher_id));
        all
    }
}

/// What a registration did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// No record of it: a new worker (`register`).
    New,
    /// It was registered and not stale: its record renewed, its uptime kept (`register` again,
    /// never `restart`: a live worker that registers once more did not restart).
    Renewed,
    /// Its record was there but stale: it came back (`restart`); its uptime starts again.
    Restarted,
}

/// Why a store operation failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the shared dispatcher registry is unavailable: {0}")]
    Unavailable(String),
    #[error("{0} workers are registered already, the most health.max_workers allows")]
    LimitReached(usize),
}

impl StoreError {
    /// Why, without the "unavailable" prefix the errors that wrap it say themselves.
    pub fn reason(self) -> String {
        match self {
            StoreError::Unavailable(why) => why,
            other => other.to_string(),
        }
    }
}

/// Where the workers of every instance are kept. Each call is one atomic step of the store and
/// is bounded in time by the implementation.
#[async_trait]
pub trait WorkerStore: Send + Sync + 'static {
    /// Registers `id` (or renews it) with its heartbeat now, refusing a new worker when
    /// `max_workers` live ones are registered. Records of workers gone for longer than the
    /// store's retention are gone and do not count.
    async fn register(
        &self,
        id: &str,
        record: &WorkerRecord,
        max_workers: usize,
    ) -> Result<(Registered, StoredWorker, u64), StoreError>;

    /// Renews the heartbeat of `id`; `Ok(None)` when no such worker is registered.
    async fn heartbeat(&self, id: &str) -> Result<Option<(StoredWorker, u64)>, StoreError>;

    /// Removes `id`; `Ok(false)` when it was not registered.
    async fn unregister(&self, id: &str) -> Result<bool, StoreError>;

    /// Every registered worker, with the store's now.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(heartbeat_ms: u64) -> StoredWorker {
        StoredWorker {
            id: "w1".into(),
            record: WorkerRecord {
                stale_threshold_seconds: 10.0,
                critical: true,
                extra: serde_json::Map::new(),
            },
            registered_ms: 1_000,
            heartbeat_ms,
        }
    }

    #[test]
    fn age_and_uptime_come_from_the_store_clock() {
        let health = stored(5_000).health(12_000, 5);
        assert_eq!(health.heartbeat_age_seconds, 7.0);
        assert_eq!(health.uptime_seconds, 11.0);
        assert!(health.healthy && !health.is_stale);
        assert_eq!(health.origin, Origin::Remote);
        assert!(health.critical);
    }

    #[test]
    fn stale_past_the_threshold_of_the_record() {
        let health = stored(1_000).health(11_001, 5);
        assert!(health.is_stale && !health.healthy);
        assert!(health.reason.unwrap().starts_with("stale"));
    }

    #[test]
    fn a_heartbeat_ahead_of_now_is_age_zero_not_a_panic() {
        let health = stored(20_000).health(12_000, 5);
        assert_eq!(health.heartbeat_age_seconds, 0.0);
        assert!(health.healthy);
    }

    #[test]
    fn unknown_record_fields_travel_unchanged() {
        let text = r#"{"stale_threshold_seconds":30.0,"critical":false,"endpoint":"http://w:1"}"#;
        let record: WorkerRecord = serde_json::from_str(text).unwrap();
        assert_eq!(record.extra["endpoint"], "http://w:1");
        let again: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(again["endpoint"], "http://w:1");
        assert_eq!(again["stale_threshold_seconds"], 30.0);
    }

    #[test]
    fn a_snapshot_is_ordered_by_id() {
        let mut b = stored(1_000);
        b.id = "b".into();
        let mut a = stored(1_000);
        a.id = "a".into();
        let snapshot = Snapshot {
            now_ms: 2_000,
            workers: vec![b, a],
        };
        let ids: Vec<String> = snapshot
            .health(5)
            .into_iter()
            .map(|h| h.dispatcher_id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
