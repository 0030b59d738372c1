use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};
use tokio::time::Instant;

use super::ResilienceObserver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// How long a handled message id is remembered.
    pub ttl: Duration,
    /// Ids remembered at most; past it the least useful are evicted (S3-FIFO).
    pub capacity: u64,
    /// Cluster: also shared with every instance (see [`super::DedupStore`]).
    pub scope: super::Scope,
}

/// `operation` of `dispatcher_cache_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOperation {
    Get,
    Set,
    /// Removed before its time: by capacity eviction.
    Invalidate,
    /// Removed because its TTL passed.
    Expire,
}

impl CacheOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOperation::Get => "get",
            CacheOperation::Set => "set",
            CacheOperation::Invalidate => "invalidate",
            CacheOperation::Expire => "expire",
        }
    }
}

/// `result` of `dispatcher_cache_operations_total`: hit or miss for gets, none otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    None,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::None => "none",
        }
    }
}

/// The message ids a dispatcher handled successfully, for a TTL, bounded in number.
///
/// Storage and eviction are `quick_cache`'s (sharded, S3-FIFO, bounded by `capacity`); the TTL is
/// checked against tokio's clock on every read, so an id is never reported as seen past its TTL,
/// and paused-time tests drive expiry. An id past its TTL is dropped when it is next read or
/// when capacity evicts it, and either way counted as `expire`; an id evicted for capacity
/// before its TTL is counted as `invalidate`.
pub struct DedupCache {
    name: Arc<str>,
    ttl: Duration,
    /// Keyed by a 128-bit keyed hash of the id, not the id: no allocation per message, and the
    /// two SipHash keys are random per process, so no sender can craft a colliding id.
    cache: quick_cache::sync::Cache<u128, Instant, UnitWeighter, DefaultHashBuilder, Evictions>,
    keys: (RandomState, RandomState),
    gets: AtomicU64,
    hits: AtomicU64,
    observer: Option<Arc<dyn ResilienceObserver>>,
}

/// Counts what capacity evicts, as `expire` or `invalidate`.
#[derive(Clone)]
struct Evictions {
    name: Arc<str>,
    ttl: Duration,
    observer: Option<Arc<dyn ResilienceObserver>>,
}

impl Lifecycle<u128, Instant> for Evictions {
    type RequestState = ();

    fn begin_request(&self) {}

    fn on_evict(&self, _: &mut (), _: u128, remembered: Instant) {
        if let Some(observer) = &self.observer {
            let operation = if remembered.elapsed() > self.ttl {
                CacheOperation::Expire
            } else {
                CacheOperation::Invalidate
            };
            observer.cache_operation(&self.name, operation, CacheResult::None);
        }
    }
}

impl DedupCache {
    /// `name` is the `cache` label (`dedup.<dispatcher_id>`).
    pub fn new(
        name: String,
        config: DedupConfig,
        observer: Option<Arc<dyn ResilienceObserver>>,
    ) -> DedupCache {
        let name: Arc<str> = name.into();
        let capacity = usize::try_from(config.capacity).unwrap_or(usize::MAX);
        let evictions = Evictions {
            name: name.clone(),
            ttl: config.ttl,
            observer: observer.clone(),
        };
        let cache = quick_cache::sync::Cache::with(
            capacity,
            config.capacity,
            UnitWeighter,
            DefaultHashBuilder::default(),
            evictions,
        );
        DedupCache {
            name,
            ttl: config.ttl,
            cache,
            keys: (RandomState::new(), RandomState::new()),
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            observer,
        }
    }

    /// Whether `message_id` was remembered within the TTL. Counts a get (hit or miss), and an
    /// expiry when the id was there but too old.
    pub fn contains(&self, message_id: &str) -> bool {
        let key = self.key(message_id);
        let hit = match self.cache.get(&key) {
            Some(remembered) if remembered.elapsed() <= self.ttl => true,
            Some(_) => {
                self.cache.remove(&key);
                self.observe(CacheOperation::Expire, CacheResult::None);
                false
            }
            None => false,
        };
        let gets = self.gets.fetch_add(1, Ordering::Relaxed) + 1;
        let hits = if hit {
            self.hits.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.hits.load(Ordering::Relaxed)
        };
        self.observe(
            CacheOperation::Get,
            if hit {
                CacheResult::Hit
            } else {
                CacheResult::Miss
            },
        );
        if let Some(observer) = &self.observer {
            observer.cache_hit_ratio(&self.name, hits as f64 / gets as f64);
        }
        if hit {
            tracing::debug!(cache = %self.name, message_id, "Skipped a duplicate message.");
        }
        hit
    }

    /// Remembers `message_id` from now.
    pub fn remember(&self, message_id: &str) {
        self.cache.insert(self.key(message_id), Instant::now());
        self.observe(CacheOperation::Set, CacheResult::None);
    }

    fn key(&self, message_id: &str) -> u128 {
        let high = self.keys.0.hash_one(message_id);
        let low = self.keys.1.hash_one(message_id);
        (u128::from(high) << 64) | u128::from(low)
    }

    fn observe(&self, operation: CacheOperation, result: CacheResult) {
        if let Some(observer) = &self.observer {
            observer.cache_operation(&self.name, operation, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Counts(Mutex<Vec<(&'static str, &'static str)>>);

    impl ResilienceObserver for Counts {
        fn cache_operation(&self, _: &str, operation: CacheOperation, result: CacheResult) {
            self.0
                .lock()
                .unwrap()
                .push((operation.as_str(), result.as_str()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_evictions_count_as_invalidate_or_expire() {
        let counts = Arc::new(Counts::default());
        let cache = DedupCache::new(
            "dedup.d".into(),
            DedupConfig {
                scope: Default::default(),
                ttl: Duration::from_secs(60),
                capacity: 10,
            },
            Some(counts.clone()),
        );
        for n in 0..100 {
            cache.remember(&format!("m{n}"));
        }
        let invalidated = counts
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == ("invalidate", "none"))
            .count();
        assert!(
            invalidated >= 80,
            "bounded by capacity: {invalidated} evicted"
        );
        counts.0.lock().unwrap().clear();
        tokio::time::advance(Duration::from_secs(61)).await;
        for n in 100..200 {
            cache.remember(&format!("m{n}"));
        }
        let expired = counts
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == ("expire", "none"))
            .count();
        assert!(
            expired >= 1,
            "old ids evicted after their TTL count as expired"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn remembers_for_the_ttl_then_expires_and_counts_it() {
        let counts = Arc::new(Counts::default());
        let cache = DedupCache::new(
            "dedup.d".into(),
            DedupConfig {
                scope: Default::default(),
                ttl: Duration::from_secs(60),
                capacity: 100,
            },
            Some(counts.clone()),
        );
        assert!(!cache.contains("m1"));
        cache.remember("m1");
        assert!(cache.contains("m1"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!cache.contains("m1"), "expired");
        assert_eq!(
            *counts.0.lock().unwrap(),
            [
                ("get", "miss"),
                ("set", "none"),
                ("get", "hit"),
                ("expire", "none"),
                ("get", "miss")
            ]
        );
    }
}
