use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use siphasher::sip128::{Hasher128, SipHasher13};
use tokio::time::Instant;

use super::{CacheObserver, ResilienceObserver};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// How long a handled message id is remembered.
    pub ttl: Duration,
    /// Ids the table is sized for (at most [`MAX_CAPACITY`]): each is remembered for the TTL
    /// until about this many newer ids have arrived (see [`DedupCache`]).
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

/// The most ids one dedup cache can be sized for (`dedup.capacity`): its table is then 1 GiB.
pub const MAX_CAPACITY: u64 = 1 << 24;

/// Slots in one bucket: a bucket is 128 bytes, the pair of cache lines that x86 cores fetch
/// together, so a lookup or an insert touches one place in memory.
const WAYS: usize = 8;
/// Slots per id the table is sized for: with four, an id is rarely pushed out early by ids
/// landing in its bucket (see [`DedupCache`]).
const SLOTS_PER_ID: u64 = 4;
/// A slot's `meta`: the time it was remembered (milliseconds since the cache was made, plus
/// one, so that zero is an empty slot) in the high 40 bits (34 years), and 24 more bits of the
/// id's hash in the low ones.
const CHECK_BITS: u32 = 24;
const CHECK_MASK: u64 = (1 << CHECK_BITS) - 1;
const MAX_STAMP: u64 = (1 << (64 - CHECK_BITS)) - 1;
/// Tries of an insert whose slot another insert took first; past them the id is not
/// remembered (a duplicate of it would run: at-least-once, never a message skipped).
const INSERT_TRIES: usize = 4;

/// One remembered id. The two words are written without a lock, `meta` first (by a
/// compare-and-swap, which claims the slot) and `tag` second; a reader that sees one word of
/// an insert and not the other finds no match, since a match needs both the tag (64 bits) and
/// the check bits of `meta` (24 more) of the same id.
#[derive(Default)]
struct Slot {
    tag: AtomicU64,
    meta: AtomicU64,
}

fn remembered_at(meta: u64) -> u64 {
    (meta >> CHECK_BITS).saturating_sub(1)
}

#[derive(Default)]
#[repr(C, align(128))]
struct Bucket([Slot; WAYS]);

impl Bucket {
    /// The slot holding `key`, with its `meta`.
    fn find(&self, key: DedupKey) -> Option<(&Slot, u64)> {
        let check = key.check();
        self.0.iter().find_map(|slot| {
            let meta = slot.meta.load(Ordering::Relaxed);
            (meta != 0 && meta & CHECK_MASK == check && slot.tag.load(Ordering::Relaxed) == key.tag)
                .then_some((slot, meta))
        })
    }
}

/// A message id as the cache knows it: 128 bits of a keyed SipHash-1-3 of the id. Made once per
/// message with [`DedupCache::key`], for both the lookup and the insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupKey {
    tag: u64,
    /// Picks the bucket (low bits) and is checked (high 24 bits).
    spread: u64,
}

impl DedupKey {
    fn check(self) -> u64 {
        self.spread >> (64 - CHECK_BITS)
    }
}

/// What an insert pushed out of its slot.
enum Displaced {
    Nothing,
    /// An id past its TTL.
    Expired,
    /// An id still within its TTL: its bucket was full.
    Live,
}

/// The message ids a dispatcher handled successfully, for a TTL, in a table of bounded size.
///
/// The table is a set-associative hash table, written here rather than taken from a cache crate
/// because a dedup set needs so little of one: a message id is looked up once, when it arrives,
/// and remembered once, when it succeeded; it is never read again unless a duplicate comes. Each
/// id is a 128-bit keyed hash (SipHash-1-3 with keys random per process, so no sender can craft
/// ids that collide), and lives in one of the eight slots of the 128-byte bucket its hash picks:
/// a lookup and an insert each touch one bucket, one place in memory, with no lock (atomic
/// loads, and one compare-and-swap to insert). A general cache spends three or four scattered
/// memory accesses per fresh id (its hash table, its eviction queues), each a cache miss in a
/// table of 100,000 random keys, and takes a shard lock for each.
///
/// The table has four slots for each id of `capacity` (rounded up to a power of two), 16 bytes
/// each. An insert takes a free slot, or else the bucket's oldest id: so an id is remembered for
/// its TTL unless eight newer ids land in its bucket first: a Poisson tail, at most two newer
/// ids per bucket on average by the time `capacity` newer ids have arrived. Measured with 4 ×
/// `capacity` ids sent: at `capacity = 100000`, 1 of the last 100,000 was forgotten; at 131,072
/// (4 × capacity a power of two, so no rounding up: the tightest case), 16 of the last 131,072,
/// 12 of them among the oldest tenth. Past `capacity` newer ids forgetting becomes likelier, and
/// ids older than the TTL are gone
/// whatever the room. A cache crate was used before this one: its S3-FIFO policy put a fresh id
/// in a small queue of 3 % of the capacity that no id ever leaves by being read again, so a
/// cache of 100,000 remembered only the last 3,000 ids (`remembers_the_last_capacity_ids`).
///
/// The TTL is checked against tokio's clock, so paused-time tests drive expiry. An id found past
/// its TTL is dropped and counted as `expire`; an insert that takes the slot of an id past its
/// TTL counts `expire`, and of an id within it `invalidate`.
pub struct DedupCache {
    name: Arc<str>,
    ttl_ms: u64,
    epoch: Instant,
    buckets: Box<[Bucket]>,
    hasher: SipHasher13,
    /// Gets and hits, for `dispatcher_cache_hit_ratio`; kept only with an observer.
    gets: AtomicU64,
    hits: AtomicU64,
    observer: Option<Arc<dyn CacheObserver>>,
}

impl DedupCache {
    /// `name` is the `cache` label (`dedup.<dispatcher_id>`). `config.capacity` is taken as at
    /// most [`MAX_CAPACITY`].
    pub fn new(
        name: String,
        config: DedupConfig,
        observer: Option<Arc<dyn ResilienceObserver>>,
    ) -> DedupCache {
        let capacity = config.capacity.clamp(1, MAX_CAPACITY);
        let buckets = (capacity * SLOTS_PER_ID)
            .next_power_of_two()
            .max(WAYS as u64)
            / WAYS as u64;
        // Two draws of std's per-process random SipHash keys, as the keys of ours.
        let random = || RandomState::new().hash_one(0u64);
        let name: Arc<str> = name.into();
        let observer = observer.map(|observer| super::cache_observer(&observer, &name));
        DedupCache {
            name,
            ttl_ms: u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX),
            epoch: Instant::now(),
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            hasher: SipHasher13::new_with_keys(random(), random()),
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            observer,
        }
    }

    /// How many ids the table has slots for (four per id of `capacity`, rounded up).
    pub fn slots(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// The key of `message_id`, for [`DedupCache::contains_key`] and
    /// [`DedupCache::remember_key`]: hash an id once, use it twice.
    pub fn key(&self, message_id: &str) -> DedupKey {
        let mut hasher = self.hasher;
        hasher.write(message_id.as_bytes());
        let hash = hasher.finish128();
        DedupKey {
            tag: hash.h1,
            spread: hash.h2,
        }
    }

    /// Starts fetching `key`'s bucket into the core's cache, without waiting for it, so that a
    /// lookup made a little later finds it there. In a table larger than the core's caches (8
    /// MiB at the default capacity) a fresh id's bucket is otherwise a trip to memory that the
    /// lookup waits for (this VM: 130–190 ns); the engine asks for it as soon as routing has
    /// picked the dispatcher, and sets the rest of the dispatch up meanwhile. A no-op on other
    /// architectures than x86_64.
    pub fn prefetch(&self, key: DedupKey) {
        #[cfg(target_arch = "x86_64")]
        {
            // A bucket is two cache lines (`Bucket`'s alignment is 128); AMD cores do not fetch
            // the pair together.
            let slots = &self.bucket(key).0;
            safe_arch::prefetch_t0(&slots[0]);
            safe_arch::prefetch_t0(&slots[WAYS / 2]);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// Whether `message_id` was remembered within the TTL. Counts a get (hit or miss), and an
    /// expiry when the id was there but too old.
    pub fn contains(&self, message_id: &str) -> bool {
        self.contains_key(self.key(message_id))
    }

    /// [`DedupCache::contains`] for a key made with [`DedupCache::key`].
    pub fn contains_key(&self, key: DedupKey) -> bool {
        let (hit, expired) = match self.bucket(key).find(key) {
            None => (false, false),
            Some((_, meta)) if self.now_ms().saturating_sub(remembered_at(meta)) <= self.ttl_ms => {
                (true, false)
            }
            Some((slot, meta)) => {
                // Unless an insert took the slot meanwhile.
                let _ = slot
                    .meta
                    .compare_exchange(meta, 0, Ordering::Relaxed, Ordering::Relaxed);
                (false, true)
            }
        };
        if let Some(observer) = &self.observer {
            if expired {
                observer.operation(CacheOperation::Expire, CacheResult::None);
            }
            let gets = self.gets.fetch_add(1, Ordering::Relaxed) + 1;
            let hits = if hit {
                self.hits.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                self.hits.load(Ordering::Relaxed)
            };
            let result = if hit {
                CacheResult::Hit
            } else {
                CacheResult::Miss
            };
            observer.operation(CacheOperation::Get, result);
            observer.hit_ratio(hits as f64 / gets as f64);
        }
        hit
    }

    /// Remembers `message_id` from now.
    pub fn remember(&self, message_id: &str) {
        self.remember_key(self.key(message_id));
    }

    /// [`DedupCache::remember`] for a key made with [`DedupCache::key`].
    pub fn remember_key(&self, key: DedupKey) {
        let now = self.now_ms();
        let fresh = ((now + 1).min(MAX_STAMP) << CHECK_BITS) | key.check();
        let bucket = self.bucket(key);
        let mut displaced = None;
        for _ in 0..INSERT_TRIES {
            // One pass: the slot already holding this id, or else the first empty one, or else
            // the oldest (`meta` orders by time, and an empty slot's is zero).
            let mut at = 0;
            let mut old = u64::MAX;
            let mut same = false;
            for (n, slot) in bucket.0.iter().enumerate() {
                let meta = slot.meta.load(Ordering::Relaxed);
                if meta != 0
                    && meta & CHECK_MASK == key.check()
                    && slot.tag.load(Ordering::Relaxed) == key.tag
                {
                    (at, old, same) = (n, meta, true);
                    break;
                }
                if meta < old {
                    (at, old) = (n, meta);
                }
            }
            let slot = &bucket.0[at];
            if slot
                .meta
                .compare_exchange(old, fresh, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if !same {
                slot.tag.store(key.tag, Ordering::Relaxed);
            }
            displaced = Some(if old == 0 || same {
                Displaced::Nothing
            } else if now.saturating_sub(remembered_at(old)) > self.ttl_ms {
                Displaced::Expired
            } else {
                Displaced::Live
            });
            break;
        }
        if displaced.is_none() {
            // Whether or not metrics observe this cache: a duplicate of this id would run.
            tracing::debug!(cache = %self.name, "An id was not remembered: its bucket was busy.");
        }
        let Some(observer) = &self.observer else {
            return;
        };
        match displaced {
            None | Some(Displaced::Nothing) => {}
            Some(Displaced::Expired) => {
                observer.operation(CacheOperation::Expire, CacheResult::None)
            }
            Some(Displaced::Live) => {
                observer.operation(CacheOperation::Invalidate, CacheResult::None);
            }
        }
        observer.operation(CacheOperation::Set, CacheResult::None);
    }

    fn bucket(&self, key: DedupKey) -> &Bucket {
        // `buckets.len()` is a power of two.
        &self.buckets[(key.spread as usize) & (self.buckets.len() - 1)]
    }

    /// Milliseconds since the cache was made, on tokio's clock.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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
        assert_eq!(
            cache.slots(),
            64,
            "four slots per id, rounded up to a power of two"
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
            invalidated >= 100 - cache.slots(),
            "bounded by its slots: {invalidated} evicted"
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

    fn cache(capacity: u64, ttl: Duration) -> DedupCache {
        let config = DedupConfig {
            scope: Default::default(),
            ttl,
            capacity,
        };
        DedupCache::new("dedup.d".into(), config, None)
    }

    /// The promise of `capacity`: an id is still known after `capacity` newer ids. The cache
    /// crate this replaced remembered 3,000 of them.
    #[test]
    fn remembers_the_last_capacity_ids() {
        let capacity = 100_000;
        let cache = cache(capacity, Duration::from_secs(600));
        let total = 3 * capacity as usize;
        for n in 0..total {
            cache.remember(&format!("m{n}"));
        }
        let known = |from: usize| {
            (from..total)
                .filter(|n| cache.contains(&format!("m{n}")))
                .count()
        };
        assert_eq!(
            known(total - 10_000),
            10_000,
            "every one of the last 10,000"
        );
        let last = known(total - capacity as usize);
        assert!(
            last >= 99_900,
            "all but 1 in 1,000 of the last {capacity}: {last}"
        );
        let never = (0..100_000)
            .filter(|n| cache.contains(&format!("x{n}")))
            .count();
        assert_eq!(never, 0, "no id that was never remembered is reported");
    }

    /// Threads remembering their own ids at once: none is lost to another's insert.
    #[test]
    fn remembers_from_many_threads() {
        let cache = Arc::new(cache(100_000, Duration::from_secs(600)));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    for n in 0..5_000 {
                        let id = format!("t{t}-m{n}");
                        assert!(!cache.contains(&id));
                        cache.remember(&id);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        for t in 0..4 {
            for n in 0..5_000 {
                assert!(cache.contains(&format!("t{t}-m{n}")), "t{t}-m{n}");
            }
        }
    }

    #[test]
    fn a_key_made_once_serves_both_calls() {
        let cache = cache(1_000, Duration::from_secs(60));
        let key = cache.key("m1");
        assert_eq!(key, cache.key("m1"));
        assert_ne!(key, cache.key("m2"));
        assert!(!cache.contains_key(key));
        cache.remember_key(key);
        assert!(cache.contains("m1"));
        assert!(!cache.contains("m2"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Remember(u8),
        Contains(u8),
        Advance(u16),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..32).prop_map(Op::Remember),
            (0u8..32).prop_map(Op::Contains),
            (0u16..2_000).prop_map(Op::Advance),
        ]
    }

    proptest::proptest! {
        /// Below its capacity the cache is exactly a set with a TTL: a model of a map from id to
        /// the time it was remembered agrees with every answer.
        #[test]
        fn below_capacity_it_is_a_set_with_a_ttl(ops in proptest::collection::vec(op(), 1..200)) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async {
                let ttl = Duration::from_millis(5_000);
                let cache = cache(1_000, ttl);
                let mut model = std::collections::HashMap::new();
                let mut now = Duration::ZERO;
                for op in ops {
                    match op {
                        Op::Remember(id) => {
                            cache.remember(&format!("m{id}"));
                            model.insert(id, now);
                        }
                        Op::Contains(id) => {
                            let expected = model.get(&id).is_some_and(|at| now - *at <= ttl);
                            proptest::prop_assert_eq!(cache.contains(&format!("m{id}")), expected, "m{} at {:?}", id, now);
                            if !expected {
                                model.remove(&id);
                            }
                        }
                        Op::Advance(ms) => {
                            tokio::time::advance(Duration::from_millis(u64::from(ms))).await;
                            now += Duration::from_millis(u64::from(ms));
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}
