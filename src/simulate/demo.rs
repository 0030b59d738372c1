//! The demonstration dispatchers: each shows one part of dispatchd at work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use crate::engine::{CommandAdapter, Handler, HandlerError, Message, OutputMessage};

/// Answers at once, with an output event.
pub(super) struct Fast;

#[async_trait]
impl Handler for Fast {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let confirmed = message.envelope.derive("order.confirmed", json!({}));
        Ok(vec![OutputMessage::new(
            "shop.orders.confirmed.events",
            confirmed,
        )])
    }
}

/// Takes 20 to 260 ms; with a 250 ms timeout, about one call in 25 times out: a dispatcher that
/// is sometimes too slow, not one that is failing (the demonstration's real failures stay under
/// the 5% that `DispatchdHighErrorRatio` pages on).
pub(super) struct Slow;

#[async_trait]
impl Handler for Slow {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..260))).await;
        Ok(Vec::new())
    }
}

/// Fails in runs: 25 calls succeed, then 15 fail, and again, so its circuit breaker trips,
/// refuses, probes and closes, over and over. Its failures are few (the breaker stops the calls
/// after three) and its refusals many: what a breaker is for.
#[derive(Default)]
pub(super) struct Flaky {
    calls: AtomicU64,
}

#[async_trait]
impl Handler for Flaky {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        if call % 40 >= 25 {
            Err(HandlerError::transient("payment provider answered 503"))
        } else {
            Ok(Vec::new())
        }
    }
}

/// Records audit events; behind a tight rate limit.
pub(super) struct Audit;

#[async_trait]
impl Handler for Audit {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

/// Issues refunds; a policy denies `refund_all`.
pub(super) struct Billing;

#[async_trait]
impl CommandAdapter for Billing {
    fn name(&self) -> &'static str {
        "billing"
    }

    async fn execute(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let issued = message
            .envelope
            .derive("refund.issued", message.envelope.payload.clone());
        Ok(vec![OutputMessage::new("shop.billing.events", issued)])
    }
}
