//! Resilience: the protections a dispatcher can have, each measured.
//!
//! Owns: retry with exponential backoff and full jitter ([`RetryPolicy`]), the circuit breaker
//! ([`CircuitBreaker`]), the token-bucket rate limiter ([`RateLimiter`], on `governor`), the
//! concurrency limit ([`ConcurrencyLimit`]) and the de-duplication cache ([`DedupCache`], a
//! lock-free table of keyed hashes written for it), bundled per dispatcher as [`Protections`].
//!
//! Composition, in the order a call meets them (the engine applies them in this order, and a
//! test holds it there):
//!
//! 1. **policy** (commands only; engine): a denied command consumes nothing below.
//! 2. **dedup**: a message id this dispatcher already handled successfully within the TTL is
//!    skipped: it runs nothing and consumes no rate token and no breaker probe.
//! 3. **rate limit**: `wait` delays the call (bounded by `max_wait`), `reject` refuses it.
//!    Before the breaker, so refused calls are never breaker probes.
//! 4. **circuit breaker**: while open, refuses at once without queueing.
//! 5. **concurrency**: waits for one of `max_in_flight` permits; refuses when `max_waiting`
//!    calls wait already. The permit is held across the retries of the call.
//! 6. **timeout and retry**: each attempt has the dispatcher's timeout; transient errors and
//!    timeouts are retried after a jittered backoff, permanent errors and panics never.
//!
//! The breaker sees one outcome per call (after its retries), and the dedup cache remembers a
//! message only once its call succeeded, so a sender may retry what failed.
//!
//! Invariants: every mechanism runs on tokio's clock (paused time works in tests); no lock is held
//! across an await; every state change is a debug log line with the dispatcher id and an
//! observer call, which the metrics (and health, for the breaker) implement.
//!
//! Scope: dedup and the rate limiter are per instance by default. With `scope = Cluster` they
//! also consult a shared store ([`DedupStore`], [`RateLimitStore`], implemented by the service
//! on Redis): the local cache still answers its own hits first, and a store that cannot answer
//! never fails a call: dedup runs it (at-least-once), the limiter falls back to the local
//! limiter; both are reported as [`ResilienceObserver::cluster_fallback`]. A message id another
//! instance is running right now is refused ([`Refusal::InProgressElsewhere`], `rejected`): the
//! sender retries, and then gets `skipped` or a run, depending on how that run ended.
//!
//! Must not: know the engine's types. It deals in ids, durations and outcomes.

mod breaker;
mod cluster;
mod concurrency;
mod dedup;
mod rate_limit;
mod retry;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use breaker::{BreakerConfig, BreakerState, BreakerTicket, CircuitBreaker, Trip};
pub use cluster::{ClusterProtection, DedupClaim, DedupStore, RateLimitStore, Scope, StoreError};
pub use concurrency::{ConcurrencyConfig, ConcurrencyLimit};
pub use dedup::{CacheOperation, CacheResult, DedupCache, DedupConfig, DedupKey, MAX_CAPACITY};
pub use rate_limit::{RateLimitConfig, RateLimitMode, RateLimiter};
pub use retry::RetryPolicy;

/// Told about every protection's state changes (the metrics and the health registry implement
/// it). Every method has a no-op default.
pub trait ResilienceObserver: Send + Sync + 'static {
    fn breaker_state(&self, _dispatcher_id: &str, _state: BreakerState) {}
    fn breaker_tripped(&self, _dispatcher_id: &str) {}
    fn rate_limit_delay(&self, _dispatcher_id: &str, _delay: Duration) {}
    fn retried(&self, _dispatcher_id: &str) {}
    fn cache_operation(&self, _cache: &str, _operation: CacheOperation, _result: CacheResult) {}
    fn cache_hit_ratio(&self, _cache: &str, _ratio: f64) {}
    /// The observer of the cache named `cache`, asked once when the cache is built, so that its
    /// calls on the dispatch path look nothing up by name. `None` (the default) has the cache
    /// call [`cache_operation`](Self::cache_operation) and
    /// [`cache_hit_ratio`](Self::cache_hit_ratio) with its name instead.
    fn cache(&self, _cache: &str) -> Option<Arc<dyn CacheObserver>> {
        None
    }
    /// A cluster-scoped protection's store did not answer and the instance decided alone.
    fn cluster_fallback(&self, _dispatcher_id: &str, _protection: ClusterProtection) {}
    /// This dispatcher's protection is cluster-scoped: its fallbacks can be counted from zero, so
    /// that the first one is an increase (Prometheus's `increase` does not see a series that
    /// appears at 1).
    fn cluster_scoped(&self, _dispatcher_id: &str, _protection: ClusterProtection) {}
}

/// One cache's observer: see [`ResilienceObserver::cache`].
pub trait CacheObserver: Send + Sync + 'static {
    fn operation(&self, operation: CacheOperation, result: CacheResult);
    fn hit_ratio(&self, ratio: f64);
}

/// The observer of the cache `name` from `observer`: its own, or the by-name calls.
pub(crate) fn cache_observer(
    observer: &Arc<dyn ResilienceObserver>,
    name: &Arc<str>,
) -> Arc<dyn CacheObserver> {
    observer.cache(name).unwrap_or_else(|| {
        Arc::new(ByName {
            observer: observer.clone(),
            name: name.clone(),
        })
    })
}

/// A [`ResilienceObserver`] without a cache observer of its own, called with the cache's name.
struct ByName {
    observer: Arc<dyn ResilienceObserver>,
    name: Arc<str>,
}

impl CacheObserver for ByName {
    fn operation(&self, operation: CacheOperation, result: CacheResult) {
        self.observer.cache_operation(&self.name, operation, result);
    }
    fn hit_ratio(&self, ratio: f64) {
        self.observer.cache_hit_ratio(&self.name, ratio);
    }
}

/// Several cache observers as one.
struct CacheObservers(Vec<Arc<dyn CacheObserver>>);

impl CacheObserver for CacheObservers {
    fn operation(&self, operation: CacheOperation, result: CacheResult) {
        self.0.iter().for_each(|o| o.operation(operation, result));
    }
    fn hit_ratio(&self, ratio: f64) {
        self.0.iter().for_each(|o| o.hit_ratio(ratio));
    }
}

/// Several observers as one.
#[derive(Default, Clone)]
pub struct Observers(pub Vec<Arc<dyn ResilienceObserver>>);

impl ResilienceObserver for Observers {
    fn breaker_state(&self, id: &str, state: BreakerState) {
        self.0.iter().for_each(|o| o.breaker_state(id, state));
    }
    fn breaker_tripped(&self, id: &str) {
        self.0.iter().for_each(|o| o.breaker_tripped(id));
    }
    fn rate_limit_delay(&self, id: &str, delay: Duration) {
        self.0.iter().for_each(|o| o.rate_limit_delay(id, delay));
    }
    fn retried(&self, id: &str) {
        self.0.iter().for_each(|o| o.retried(id));
    }
    fn cache_operation(&self, cache: &str, operation: CacheOperation, result: CacheResult) {
        self.0
            .iter()
            .for_each(|o| o.cache_operation(cache, operation, result));
    }
    fn cache_hit_ratio(&self, cache: &str, ratio: f64) {
        self.0.iter().for_each(|o| o.cache_hit_ratio(cache, ratio));
    }
    fn cache(&self, cache: &str) -> Option<Arc<dyn CacheObserver>> {
        let name: Arc<str> = cache.into();
        Some(Arc::new(CacheObservers(
            self.0.iter().map(|o| cache_observer(o, &name)).collect(),
        )))
    }
    fn cluster_scoped(&self, id: &str, protection: ClusterProtection) {
        self.0.iter().for_each(|o| o.cluster_scoped(id, protection));
    }
    fn cluster_fallback(&self, id: &str, protection: ClusterProtection) {
        self.0
            .iter()
            .for_each(|o| o.cluster_fallback(id, protection));
    }
}

/// Why a protection refused a call before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimited,
    CircuitOpen,
    ConcurrencyLimit,
    /// Cluster dedup: another instance is running this message id now.
    InProgressElsewhere,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::RateLimited => "refused by the rate limiter",
            Refusal::CircuitOpen => "refused: the circuit breaker is open",
            Refusal::ConcurrencyLimit => {
                "refused: too many calls are waiting for the concurrency limit"
            }
            Refusal::InProgressElsewhere => {
                "refused: another instance is running this message id; retry later"
            }
        })
    }
}

/// The validated protections of one dispatcher, as configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResilienceConfig {
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<BreakerConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    pub concurrency: Option<ConcurrencyConfig>,
    pub dedup: Option<DedupConfig>,
}

impl ResilienceConfig {
    pub fn is_empty(&self) -> bool {
        *self == ResilienceConfig::default()
    }

    /// The longest one call can take through these protections with `timeout` per attempt:
    /// the rate limiter's wait, every attempt and every backoff. A cluster dedup claim is held
    /// that long at most, so the claim of an instance that died mid-call lapses.
    pub fn longest_call(&self, timeout: Duration) -> Duration {
        let wait = match self.rate_limit.map(|r| r.mode) {
            Some(RateLimitMode::Wait { max_wait }) => max_wait,
            _ => Duration::ZERO,
        };
        let (attempts, backoff) = self
            .retry
            .map_or((1, Duration::ZERO), |r| (r.attempts + 1, r.max_backoff));
        wait.saturating_add(timeout.saturating_mul(attempts))
            .saturating_add(backoff.saturating_mul(attempts - 1))
    }
}

/// One dispatcher's protections, built from its [`ResilienceConfig`].
pub struct Protections {
    dispatcher_id: Arc<str>,
    retry: Option<RetryPolicy>,
    breaker: Option<CircuitBreaker>,
    rate_limit: Option<RateLimiter>,
    concurrency: Option<ConcurrencyLimit>,
    dedup: Option<DedupCache>,
    cluster_dedup: Option<Arc<dyn DedupStore>>,
    cluster_rate_limit: Option<Arc<dyn RateLimitStore>>,
    observer: Option<Arc<dyn ResilienceObserver>>,
}

/// What [`Protections::claim`] decided about a message id.
#[must_use]
pub enum Claim {
    /// Run it; hand the [`Claimed`] to [`Protections::finish`] and [`Protections::settle`].
    Run(Claimed),
    /// Already handled successfully within the TTL (here, or on another instance).
    Duplicate,
    /// Another instance is running it now.
    InProgress,
}

/// A message id's dedup key made ahead of its claim ([`Protections::prepare`]); empty for
/// protections without a local dedup cache.
#[derive(Clone, Copy, Default)]
pub(crate) struct Prepared(Option<DedupKey>);

/// A message id [`Protections::claim`] let run: its dedup key, made once, and whether this
/// instance holds its claim on the cluster store.
#[must_use]
pub struct Claimed {
    key: Option<DedupKey>,
    held: bool,
}

impl Claimed {
    /// Whether this instance holds the id's claim on the cluster dedup store, to give back with
    /// [`Protections::settle`].
    pub fn holds_cluster_claim(&self) -> bool {
        self.held
    }
}

/// A call that passed every protection: hold it while the call runs, then hand it back to
/// [`Protections::finish`].
#[must_use]
pub struct Admitted {
    ticket: Option<BreakerTicket>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Protections {
    pub fn new(
        dispatcher_id: &str,
        config: &ResilienceConfig,
        observer: Option<Arc<dyn ResilienceObserver>>,
    ) -> Protections {
        let id: Arc<str> = dispatcher_id.into();
        Protections {
            retry: config.retry,
            breaker: config
                .breaker
                .map(|c| CircuitBreaker::new(id.clone(), c, observer.clone())),
            rate_limit: config.rate_limit.map(RateLimiter::new),
            concurrency: config.concurrency.map(ConcurrencyLimit::new),
            dedup: config
                .dedup
                .map(|c| DedupCache::new(format!("dedup.{dispatcher_id}"), c, observer.clone())),
            dispatcher_id: id,
            cluster_dedup: None,
            cluster_rate_limit: None,
            observer,
        }
    }

    /// Shares dedup with every instance on `store` (`dedup.scope = "cluster"`); the local cache
    /// stays in front of it.
    pub fn with_cluster_dedup(mut self, store: Arc<dyn DedupStore>) -> Protections {
        if let Some(observer) = &self.observer {
            observer.cluster_scoped(&self.dispatcher_id, ClusterProtection::Dedup);
        }
        self.cluster_dedup = Some(store);
        self
    }

    /// Shares the rate limit with every instance on `store` (`rate_limit.scope = "cluster"`);
    /// the local limiter is the fallback while the store cannot answer.
    pub fn with_cluster_rate_limit(mut self, store: Arc<dyn RateLimitStore>) -> Protections {
        if let Some(observer) = &self.observer {
            observer.cluster_scoped(&self.dispatcher_id, ClusterProtection::RateLimit);
        }
        self.cluster_rate_limit = Some(store);
        self
    }

    /// Dedup, with the cluster store when there is one: the local cache answers first; then the
    /// store claims the id for this run. A store that cannot answer lets the call run.
    pub async fn claim(&self, message_id: &str) -> Claim {
        self.claim_prepared(message_id, self.prepare(message_id))
            .await
    }

    /// `message_id`'s dedup key, made once for the whole call, with its place in the local
    /// cache's table already being fetched from memory (see [`DedupCache::prefetch`]). The
    /// engine prepares as soon as routing picked this dispatcher, and claims later.
    pub(crate) fn prepare(&self, message_id: &str) -> Prepared {
        Prepared(self.dedup.as_ref().map(|dedup| {
            let key = dedup.key(message_id);
            dedup.prefetch(key);
            key
        }))
    }

    /// [`Protections::claim`] with the key [`Protections::prepare`] made for `message_id`, on
    /// these protections.
    pub(crate) async fn claim_prepared(&self, message_id: &str, prepared: Prepared) -> Claim {
        // A key is always prepared where there is a local cache; made here should one not be.
        let key = prepared
            .0
            .or_else(|| self.dedup.as_ref().map(|dedup| dedup.key(message_id)));
        if let (Some(dedup), Some(key)) = (&self.dedup, key) {
            if dedup.contains_key(key) {
                tracing::debug!(dispatcher_id = %self.dispatcher_id, message_id, "Skipped a duplicate message.");
                return Claim::Duplicate;
            }
        }
        let Some(store) = &self.cluster_dedup else {
            return Claim::Run(Claimed { key, held: false });
        };
        match store.claim(message_id).await {
            Ok(DedupClaim::Claimed) => Claim::Run(Claimed { key, held: true }),
            Ok(DedupClaim::Done) => {
                tracing::debug!(dispatcher_id = %self.dispatcher_id, message_id, "Skipped a message another instance handled.");
                Claim::Duplicate
            }
            Ok(DedupClaim::Running) => Claim::InProgress,
            Err(error) => {
                tracing::warn!(dispatcher_id = %self.dispatcher_id, %error, "The cluster dedup store did not answer; running the call (at-least-once).");
                self.fallback(ClusterProtection::Dedup);
                Claim::Run(Claimed { key, held: false })
            }
        }
    }

    /// Gives a cluster claim back: kept for the dedup TTL when the call succeeded, forgotten
    /// otherwise (refused or failed), so that a retry may run anywhere. Nothing to do when this
    /// instance holds no claim.
    pub async fn settle(&self, claimed: Claimed, message_id: &str, succeeded: bool) {
        if !claimed.held {
            return;
        }
        let Some(store) = &self.cluster_dedup else {
            return;
        };
        let settled = if succeeded {
            store.succeeded(message_id).await
        } else {
            store.failed(message_id).await
        };
        if let Err(error) = settled {
            tracing::warn!(dispatcher_id = %self.dispatcher_id, %error, succeeded, "The cluster dedup store did not take a call's outcome; its claim lapses by itself.");
            self.fallback(ClusterProtection::Dedup);
        }
    }

    fn fallback(&self, protection: ClusterProtection) {
        if let Some(observer) = &self.observer {
            observer.cluster_fallback(&self.dispatcher_id, protection);
        }
    }

    /// The cluster limiter's answer: `Some` when it decided, `None` when it could not answer.
    async fn cluster_limit(
        &self,
        store: &dyn RateLimitStore,
        mode: RateLimitMode,
    ) -> Option<Result<Duration, Refusal>> {
        let max_wait = match mode {
            RateLimitMode::Wait { max_wait } => max_wait,
            RateLimitMode::Reject => Duration::ZERO,
        };
        match store.acquire(max_wait).await {
            Ok(Some(wait)) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Some(Ok(wait))
            }
            Ok(None) => Some(Err(Refusal::RateLimited)),
            Err(error) => {
                tracing::warn!(dispatcher_id = %self.dispatcher_id, %error, "The cluster rate limiter did not answer; this instance's limiter decides.");
                self.fallback(ClusterProtection::RateLimit);
                None
            }
        }
    }

    pub fn dispatcher_id(&self) -> &str {
        &self.dispatcher_id
    }

    /// Whether this dispatcher already succeeded with `message_id` within the TTL.
    pub fn is_duplicate(&self, message_id: &str) -> bool {
        self.dedup
            .as_ref()
            .is_some_and(|dedup| dedup.contains(message_id))
    }

    /// Rate limit → breaker → concurrency. Refused calls consume nothing further down.
    pub async fn admit(&self) -> Result<Admitted, Refusal> {
        if let Some(limiter) = &self.rate_limit {
            let cluster = match &self.cluster_rate_limit {
                Some(store) => self.cluster_limit(store.as_ref(), limiter.mode()).await,
                None => None,
            };
            let waited = match cluster {
                Some(decided) => decided,
                None => limiter.acquire().await,
            };
            match waited {
                Ok(delay) => {
                    if let Some(observer) = &self.observer {
                        observer.rate_limit_delay(&self.dispatcher_id, delay);
                    }
                }
                Err(refusal) => {
                    tracing::debug!(dispatcher_id = %self.dispatcher_id, "The rate limiter refused a call.");
                    return Err(refusal);
                }
            }
        }
        let ticket = match &self.breaker {
            Some(breaker) => Some(breaker.try_acquire()?),
            None => None,
        };
        let permit = match &self.concurrency {
            Some(limit) => match limit.acquire().await {
                Ok(permit) => Some(permit),
                Err(refusal) => {
                    tracing::debug!(dispatcher_id = %self.dispatcher_id, "The concurrency limit refused a call.");
                    if let (Some(breaker), Some(ticket)) = (&self.breaker, ticket) {
                        breaker.release(ticket);
                    }
                    return Err(refusal);
                }
            },
            None => None,
        };
        Ok(Admitted {
            ticket,
            _permit: permit,
        })
    }

    /// The delay before retry number `retry` (1-based), or `None` when no retry is left or
    /// configured.
    pub fn retry_delay(&self, retry: u32) -> Option<Duration> {
        let policy = self.retry?;
        if retry > policy.attempts {
            return None;
        }
        if let Some(observer) = &self.observer {
            observer.retried(&self.dispatcher_id);
        }
        let delay = policy.delay(retry);
        tracing::debug!(dispatcher_id = %self.dispatcher_id, retry, delay_ms = delay.as_millis() as u64, "Retrying a call.");
        Some(delay)
    }

    /// The longest wait between two tries (the retry policy's `max_backoff`; zero without a
    /// policy): the cap on a wait the called side asks for with `Retry-After`.
    pub fn max_backoff(&self) -> Duration {
        self.retry
            .map_or(Duration::ZERO, |policy| policy.max_backoff)
    }

    /// Records the call's outcome with the breaker, and remembers the message for dedup when it
    /// succeeded.
    pub fn finish(&self, admitted: Admitted, succeeded: bool, claimed: &Claimed) {
        if let (Some(breaker), Some(ticket)) = (&self.breaker, admitted.ticket) {
            breaker.record(ticket, succeeded);
        }
        if let (true, Some(dedup), Some(key)) = (succeeded, &self.dedup, claimed.key) {
            dedup.remember_key(key);
        }
    }

    /// Hands back a call that never reached the other side (no worker to call): the breaker
    /// records nothing, the message is not remembered.
    pub fn release(&self, admitted: Admitted) {
        if let (Some(breaker), Some(ticket)) = (&self.breaker, admitted.ticket) {
            breaker.release(ticket);
        }
    }

    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }
}

impl fmt::Debug for Protections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Protections")
            .field("dispatcher_id", &self.dispatcher_id)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker.is_some())
            .field("rate_limit", &self.rate_limit.is_some())
            .field("concurrency", &self.concurrency.is_some())
            .field("dedup", &self.dedup.is_some())
            .field("cluster_dedup", &self.cluster_dedup.is_some())
            .field("cluster_rate_limit", &self.cluster_rate_limit.is_some())
            .finish()
    }
}
