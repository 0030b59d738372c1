use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};

use super::Refusal;

/// What the limiter does with a call over the rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateLimitMode {
    /// Delay the call until a token is free, but refuse it if that would take longer than
    /// `max_wait`: a queue of waiting calls is bounded in time.
    Wait { max_wait: Duration },
    /// Refuse it at once.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitConfig {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub mode: RateLimitMode,
    /// Cluster: one bucket shared by every instance (see [`super::RateLimitStore`]); this
    /// instance's own bucket is then the fallback.
    pub scope: super::Scope,
}

/// governor's clock, on tokio's time so that paused-time tests drive the limiter.
#[derive(Debug, Clone)]
struct TokioClock {
    epoch: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.epoch)
    }
}

/// A token bucket (GCRA, from `governor`): `per_second` tokens a second, at most `burst` at once.
pub struct RateLimiter {
    limiter: governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>,
    clock: TokioClock,
    mode: RateLimitMode,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        let clock = TokioClock {
            epoch: tokio::time::Instant::now(),
        };
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        RateLimiter {
            limiter: governor::RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            mode: config.mode,
        }
    }

    pub fn mode(&self) -> RateLimitMode {
        self.mode
    }

    /// Takes a token, waiting for one in `wait` mode; answers how long it waited.
    pub async fn acquire(&self) -> Result<Duration, Refusal> {
        let mut waited = Duration::ZERO;
        loop {
            let not_until = match self.limiter.check() {
                Ok(()) => return Ok(waited),
                Err(not_until) => not_until,
            };
            let RateLimitMode::Wait { max_wait } = self.mode else {
                return Err(Refusal::RateLimited);
            };
            let wait = not_until.wait_time_from(self.clock.now());
            if waited + wait > max_wait {
                return Err(Refusal::RateLimited);
            }
            tokio::time::sleep(wait).await;
            waited += wait;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(mode: RateLimitMode) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            scope: Default::default(),
            per_second: NonZeroU32::new(10).unwrap(),
            burst: NonZeroU32::new(2).unwrap(),
            mode,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_refuses_past_the_burst_and_recovers_with_time() {
        let limiter = limiter(RateLimitMode::Reject);
        assert_eq!(limiter.acquire().await, Ok(Duration::ZERO));
        assert_eq!(limiter.acquire().await, Ok(Duration::ZERO));
        assert_eq!(limiter.acquire().await, Err(Refusal::RateLimited));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(limiter.acquire().await, Ok(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn wait_mode_delays_by_the_refill_time_and_bounds_the_wait() {
        let limiter = limiter(RateLimitMode::Wait {
            max_wait: Duration::from_millis(150),
        });
        limiter.acquire().await.unwrap();
        limiter.acquire().await.unwrap();
        let started = tokio::time::Instant::now();
        let waited = limiter.acquire().await.unwrap();
        assert_eq!(waited, Duration::from_millis(100));
        assert_eq!(started.elapsed(), Duration::from_millis(100));

        let impatient = super::RateLimiter::new(RateLimitConfig {
            scope: Default::default(),
            per_second: NonZeroU32::new(10).unwrap(),
            burst: NonZeroU32::new(2).unwrap(),
            mode: RateLimitMode::Wait {
                max_wait: Duration::from_millis(50),
            },
        });
        impatient.acquire().await.unwrap();
        impatient.acquire().await.unwrap();
        // The next token is 100 ms away: longer than max_wait.
        assert_eq!(impatient.acquire().await, Err(Refusal::RateLimited));
    }
}
