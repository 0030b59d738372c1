use std::time::Duration;

/// Retries after the first try, with exponential backoff and full jitter, capped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: try once).
    pub attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1-based): uniformly random in
    /// `[0, min(max_backoff, initial_backoff × 2^(retry-1))]`. Full jitter spreads the retries
    /// of many callers instead of bunching them into waves.
    pub fn delay(&self, retry: u32) -> Duration {
        self.ceiling(retry).mul_f64(fastrand::f64())
    }

    /// The upper bound of [`RetryPolicy::delay`].
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_an_exponential_ceiling_with_a_cap() {
        let policy = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let ceilings: Vec<u128> = (1..=6).map(|n| policy.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        for retry in 1..=6 {
            for _ in 0..200 {
                assert!(policy.delay(retry) <= policy.ceiling(retry));
            }
        }
        let distinct: std::collections::BTreeSet<Duration> =
            (0..100).map(|_| policy.delay(4)).collect();
        assert!(distinct.len() > 50, "jittered");
    }
}
