//! Embedding the engine: a custom dispatcher, a command adapter behind a policy, and a
//! recording strategy. Run with `cargo run --example custom_dispatcher`.

use std::sync::Arc;

use async_trait::async_trait;
use dispatchd::engine::{
    Category, CommandAdapter, Dispatcher, Effect, Engine, Envelope, Handler, HandlerError, Message,
    OutputMessage, Route, RulePolicy,
};
use dispatchd::instrumentation::RecordingStrategy;
use serde_json::json;

/// Turns every placed order into an `invoice.requested` event.
struct Invoicing;

#[async_trait]
impl Handler for Invoicing {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let order = &message.envelope.payload;
        let Some(amount) = order["amount"].as_f64() else {
            // Retrying cannot add a missing field.
            return Err(HandlerError::permanent("order has no amount"));
        };
        let invoice = message
            .envelope
            .derive("invoice.requested", json!({ "amount": amount }));
        Ok(vec![OutputMessage::new("billing.invoices.events", invoice)])
    }
}

/// Issues refunds (here: pretends to).
struct Refunds;

#[async_trait]
impl CommandAdapter for Refunds {
    fn name(&self) -> &'static str {
        "refunds"
    }

    async fn execute(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let done = message
            .envelope
            .derive("refund.issued", message.envelope.payload.clone());
        Ok(vec![OutputMessage::new("billing.refunds.events", done)])
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let recorder = Arc::new(RecordingStrategy::new());
    let engine = Engine::builder()
        .dispatcher(
            Dispatcher::new("invoicing", Category::Event, Invoicing)
                .with_message_types(["order.placed"])
                .with_timeout(std::time::Duration::from_secs(2)),
        )
        .dispatcher(
            Dispatcher::command("refunds", Refunds)
                .with_policy(RulePolicy::new("refund-rules", Effect::Deny).allow("refund")),
        )
        .route(Route::new(
            "orders",
            "shop.**.events",
            Category::Event,
            "invoicing",
        ))
        .route(Route::new(
            "refunds",
            "billing.commands",
            Category::Command,
            "refunds",
        ))
        .instrumentation(recorder.clone())
        .build()?;

    let order = Envelope::new("order.placed", json!({ "order_id": 7, "amount": 19.5 }));
    let result = engine.dispatch("shop.eu.orders.events", &order).await;
    println!(
        "order:  {} with {} output(s)",
        result.status, result.output_count
    );

    let refund = Envelope::new("refund", json!({ "order_id": 7 }));
    let result = engine.dispatch("billing.commands", &refund).await;
    println!("refund: {}", result.status);

    let wipe = Envelope::new("wipe_ledger", json!({}));
    let result = engine.dispatch("billing.commands", &wipe).await;
    println!(
        "wipe:   {} ({})",
        result.status,
        result.error_message.unwrap_or_default()
    );

    println!("hooks fired: {}", recorder.calls().len());
    Ok(())
}
