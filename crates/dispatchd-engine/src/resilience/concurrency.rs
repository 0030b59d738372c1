use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Refusal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyConfig {
    /// Calls running at once.
    pub max_in_flight: usize,
    /// Calls waiting for a place; one more is refused. Bounds the queue.
    pub max_waiting: usize,
}

/// At most `max_in_flight` calls at once; at most `max_waiting` more wait.
pub struct ConcurrencyLimit {
    semaphore: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Decrements the waiting count however the wait ends (even when the call is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConcurrencyLimit {
    pub fn new(config: ConcurrencyConfig) -> ConcurrencyLimit {
        ConcurrencyLimit {
            semaphore: Arc::new(Semaphore::new(config.max_in_flight)),
            waiting: AtomicUsize::new(0),
            max_waiting: config.max_waiting,
        }
    }

    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Ok(permit) = self.semaphore.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ConcurrencyLimit);
        }
        let _waiting = Waiting(&self.waiting);
        self.semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::ConcurrencyLimit)
    }

    pub fn in_flight(&self) -> usize {
        self.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_the_limit_and_bounds_the_queue() {
        let limit = Arc::new(ConcurrencyLimit::new(ConcurrencyConfig {
            max_in_flight: 2,
            max_waiting: 1,
        }));
        let a = limit.acquire().await.unwrap();
        let _b = limit.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await.map(|_| ()) }
        });
        crate::resilience::concurrency::tests::until(|| limit.waiting.load(Ordering::Acquire) == 1)
            .await;
        assert_eq!(
            limit.acquire().await.err(),
            Some(Refusal::ConcurrencyLimit),
            "the queue is full"
        );
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(limit.waiting.load(Ordering::Acquire), 0);
    }

    pub(super) async fn until(mut condition: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }
}
