use std::sync::Arc;
use std::time::Duration;

use dispatchd::engine::{Category, Dispatcher, Route};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::support::TestApp;

/// Holds each call until the test releases it, and tells the test when a call has arrived.
async fn gated_app(
    edit: impl FnOnce(&mut dispatchd::config::Config),
) -> (TestApp, Arc<Notify>, Arc<Semaphore>) {
    let gate = crate::support::Gate::new();
    let (entered, release) = (gate.entered.clone(), gate.release.clone());
    let app = TestApp::start_with(edit, |builder| {
        builder
            .dispatcher(Dispatcher::new("gate", Category::Intent, gate))
            .route(Route::new(
                "gated",
                "gate.intents",
                Category::Intent,
                "gate",
            ))
    })
    .await;
    (app, entered, release)
}

#[tokio::test]
async fn in_flight_requests_finish_after_shutdown_begins() {
    let (app, entered, release) = gated_app(|_| {}).await;
    // One event first, so the JSONL writer has something to flush at the end.
    assert_eq!(
        app.post_message("a.events", json!({"message_type": "t"}))
            .await
            .status(),
        StatusCode::OK
    );

    let client = app.client.clone();
    let url = app.url("/api/v1/messages/gate.intents");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"message_type": "t"}))
            .send()
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("request arrived");

    app.begin_shutdown();
    // New connections are refused once the listener is closed.
    let addr = app.addr;
    crate::support::wait_for("the listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;

    release.add_permits(1);
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(response.status(), StatusCode::OK);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success");

    let lines = app.jsonl_lines();
    app.stop().await.expect("a clean shutdown");
    assert_eq!(lines.len(), 1);
}

#[tokio::test]
async fn requests_still_running_at_the_grace_deadline_are_abandoned() {
    let (app, entered, _release) =
        gated_app(|config| config.server.shutdown_grace = Duration::from_millis(100)).await;
    let client = app.client.clone();
    let url = app.url("/api/v1/messages/gate.intents");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"message_type": "t"}))
            .send()
            .await
    });
    tokio::time::timeout(Duration::from_secs(10), entered.notified())
        .await
        .expect("request arrived");

    // stop() bounds the wait at 30 s; the grace period ends it after 100 ms.
    app.stop()
        .await
        .expect("shutdown after the deadline is still clean");
    let response = in_flight
        .await
        .unwrap()
        .expect("the abandoned request is answered");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "shutting_down");
}

/// SIGTERM with a drain delay, as a load balancer needs it: `/ready` turns 503 `shutting_down`
/// at once (asked on a new connection) while ingest is still served; after the delay the
/// listener closes.
#[tokio::test]
async fn during_the_drain_delay_ready_is_503_while_requests_are_still_served() {
    let app = TestApp::start_with(
        |config| config.server.drain_delay = Duration::from_secs(2),
        |builder| builder,
    )
    .await;
    // A new connection for every request, as a load balancer's health check makes.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let ready = client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    app.begin_shutdown();
    let ready = client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "shutting_down");
    let posted = client
        .post(app.url("/api/v1/messages/shop.orders.events"))
        .json(&json!({"message_type": "order.placed", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        posted.status(),
        StatusCode::OK,
        "still served while draining"
    );

    let addr = app.addr;
    crate::support::wait_for("the listener to close after the drain delay", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    let lines = app.jsonl_lines();
    app.stop().await.expect("a clean shutdown");
    assert_eq!(
        lines.len(),
        1,
        "the message posted while draining was dispatched"
    );
}
