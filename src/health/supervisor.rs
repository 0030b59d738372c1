//! The lifecycle task of an in-process dispatcher, and its supervisor.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::HealthRegistry;
use crate::engine::Dispatcher;

/// Exponential backoff with full jitter between restarts of a panicking lifecycle task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartBackoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RestartBackoff {
    fn default() -> RestartBackoff {
        RestartBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl RestartBackoff {
    /// The delay before restart number `attempt` (1-based): uniformly random in
    /// `[0, min(max, initial × 2^(attempt-1))]`, so restarts of many dispatchers do not align.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(31)))
            .min(self.max);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Runs the lifecycle of one in-process dispatcher until `shutdown`: emits `start`, then every
/// `interval` asks the dispatcher whether it is alive and records a heartbeat when it is. If the
/// task panics it counts as a failure, `restart` is emitted and the task starts again after a
/// backoff; dispatching to it goes on meanwhile. On shutdown it emits `stop` and unregisters.
///
/// The dispatcher must be registered already.
pub async fn supervise(
    registry: HealthRegistry,
    dispatcher: Dispatcher,
    interval: Duration,
    backoff: RestartBackoff,
    shutdown: CancellationToken,
) {
    let id = dispatcher.id().to_owned();
    let mut restarts = 0u32;
    loop {
        let task = tokio::spawn(lifecycle(
            registry.clone(),
            dispatcher.clone(),
            interval,
            shutdown.clone(),
        ));
        match task.await {
            Ok(()) => break,
            Err(error) if error.is_panic() => {
                restarts += 1;
                let delay = backoff.delay(restarts);
                tracing::warn!(
                    dispatcher_id = %id,
                    restarts,
                    delay_ms = delay.as_millis() as u64,
                    "A dispatcher's lifecycle task panicked; restarting it."
                );
                let _ = registry.restart(&id);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => break,
                }
            }
            // Cancelled with the runtime: nothing left to supervise.
            Err(_) => break,
        }
    }
    let _ = registry.stop(&id);
    let _ = registry.unregister(&id);
}

async fn lifecycle(
    registry: HealthRegistry,
    dispatcher: Dispatcher,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let id = dispatcher.id();
    let _ = registry.start(id);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the start already renewed the heartbeat.
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A probe that hangs must not stop the loop from noticing shutdown.
        let probe = tokio::select! {
            () = shutdown.cancelled() => return,
            probe = tokio::time::timeout(interval, AssertUnwindSafe(dispatcher.heartbeat()).catch_unwind()) => probe,
        };
        match probe {
            Ok(Ok(Ok(()))) => {
                let _ = registry.heartbeat(id);
            }
            Ok(Ok(Err(error))) => {
                tracing::warn!(dispatcher_id = id, %error, "A dispatcher's heartbeat check failed.");
            }
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => {
                tracing::warn!(
                    dispatcher_id = id,
                    "A dispatcher's heartbeat check timed out."
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delays_grow_exponentially_within_the_cap() {
        let backoff = RestartBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for _ in 0..200 {
            assert!(backoff.delay(1) <= Duration::from_millis(100));
            assert!(backoff.delay(3) <= Duration::from_millis(400));
            assert!(backoff.delay(30) <= Duration::from_secs(2));
        }
        let spread: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| backoff.delay(5)).collect();
        assert!(spread.len() > 10, "full jitter spreads the delays");
    }
}
