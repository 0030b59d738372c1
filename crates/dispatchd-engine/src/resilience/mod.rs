//! Resilience: the protections a dispatcher can have, each measured.
//!
//! Owns: retry with exponential backoff and full jitter ([`RetryPolicy`]), the circuit breaker
//! ([`CircuitBreaker`]), the token-bucket rate limiter ([`RateLimiter`], on `governor`), the
//! concurrency limit ([`ConcurrencyLimit`]) and the de-duplication cache ([`DedupCache`], on
//! `quick_cache`), bundled per dispatcher as [`Protections`].
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
//! Must not: know the engine's types. It deals in ids, durations and outcomes.

mod breaker;
mod concurrency;
mod dedup;
mod rate_limit;
mod retry;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use breaker::{BreakerConfig, BreakerState, BreakerTicket, CircuitBreaker, Trip};
pub use concurrency::{ConcurrencyConfig, ConcurrencyLimit};
pub use dedup::{CacheOperation, CacheResult, DedupCache, DedupConfig};
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
}

/// Why a protection refused a call before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimited,
    CircuitOpen,
    ConcurrencyLimit,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::RateLimited => "refused by the rate limiter",
            Refusal::CircuitOpen => "refused: the circuit breaker is open",
            Refusal::ConcurrencyLimit => {
                "refused: too many calls are waiting for the concurrency limit"
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
}

/// One dispatcher's protections, built from its [`ResilienceConfig`].
pub struct Protections {
    dispatcher_id: Arc<str>,
    retry: Option<RetryPolicy>,
    breaker: Option<CircuitBreaker>,
    rate_limit: Option<RateLimiter>,
    concurrency: Option<ConcurrencyLimit>,
    dedup: Option<DedupCache>,
    observer: Option<Arc<dyn ResilienceObserver>>,
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
            observer,
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
            let waited = limiter.acquire().await;
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
    pub fn finish(&self, admitted: Admitted, succeeded: bool, message_id: &str) {
        if let (Some(breaker), Some(ticket)) = (&self.breaker, admitted.ticket) {
            breaker.record(ticket, succeeded);
        }
        if succeeded {
            if let Some(dedup) = &self.dedup {
                dedup.remember(message_id);
            }
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
            .finish()
    }
}
