use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::notification::RemovalCause;
use tokio::time::Instant;

use super::ResilienceObserver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// How long a handled message id is remembered.
    pub ttl: Duration,
    /// Ids remembered at most; past it the least useful are evicted (TinyLFU).
    pub capacity: u64,
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
/// Storage, capacity and eviction are `moka`'s; the TTL is also checked against tokio's clock on
/// every read, so an id is never reported as seen past its TTL whatever moka's own timer does,
/// and paused-time tests drive expiry.
pub struct DedupCache {
    name: Arc<str>,
    ttl: Duration,
    cache: moka::sync::Cache<String, Instant>,
    gets: AtomicU64,
    hits: AtomicU64,
    observer: Option<Arc<dyn ResilienceObserver>>,
}

impl DedupCache {
    /// `name` is the `cache` label (`dedup.<dispatcher_id>`).
    pub fn new(
        name: String,
        config: DedupConfig,
        observer: Option<Arc<dyn ResilienceObserver>>,
    ) -> DedupCache {
        let name: Arc<str> = name.into();
        let listener = {
            let name = name.clone();
            let observer = observer.clone();
            move |_: Arc<String>, _: Instant, cause: RemovalCause| {
                let operation = match cause {
                    RemovalCause::Expired => CacheOperation::Expire,
                    RemovalCause::Size => CacheOperation::Invalidate,
                    // Explicit removals are counted where they are made; replacements are sets.
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                if let Some(observer) = &observer {
                    observer.cache_operation(&name, operation, CacheResult::None);
                }
            }
        };
        let cache = moka::sync::Cache::builder()
            .max_capacity(config.capacity)
            .time_to_live(config.ttl)
            .eviction_listener(listener)
            .build();
        DedupCache {
            name,
            ttl: config.ttl,
            cache,
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            observer,
        }
    }

    /// Whether `message_id` was remembered within the TTL. Counts a get (hit or miss), and an
    /// expiry when the id was there but too old.
    pub fn contains(&self, message_id: &str) -> bool {
        let hit = match self.cache.get(message_id) {
            Some(remembered) if remembered.elapsed() <= self.ttl => true,
            Some(_) => {
                self.cache.invalidate(message_id);
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
        self.cache.insert(message_id.to_owned(), Instant::now());
        self.observe(CacheOperation::Set, CacheResult::None);
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
    async fn remembers_for_the_ttl_then_expires_and_counts_it() {
        let counts = Arc::new(Counts::default());
        let cache = DedupCache::new(
            "dedup.d".into(),
            DedupConfig {
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
