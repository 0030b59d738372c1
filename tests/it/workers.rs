//! Remote workers that receive work: a loopback HTTP server plays the worker, registers with an
//! `endpoint`, and is pushed the messages routed to its `worker` dispatcher while it is fresh; a
//! stale or unregistered worker is not called and the dispatch says so at once. Also the
//! per-dispatcher statistics of `GET /api/v1/dispatchers/{id}` and `GET /api/v1/routes`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::network::{Receiver, Reply, app, post};
use crate::support::{TestApp, sample, wait_for_async};

/// A `worker` dispatcher `w` with a 10 s timeout (which an unavailable worker must not wait
/// out), an `http` dispatcher `d` to the same receiver, and their routes.
fn config(receiver_url: &str) -> String {
    format!(
        r#"[[dispatchers]]
dispatcher_id = "w"
kind = "worker"
category = "event"
timeout = "10s"

[[dispatchers]]
dispatcher_id = "d"
kind = "http"
category = "event"
url = "{receiver_url}/direct"

[[routes]]
route_id = "orders-to-worker"
topic_pattern = "shop.orders.events"
message_category = "event"
dispatcher_id = "w"

[[routes]]
route_id = "shop-to-worker"
topic_pattern = "shop.*.events"
message_category = "event"
message_type = "order.placed"
dispatcher_id = "w"

[[routes]]
route_id = "mail-to-d"
topic_pattern = "mail.*.events"
message_category = "event"
dispatcher_id = "d"

[[routes]]
route_id = "off"
topic_pattern = "old.**"
message_category = "event"
dispatcher_id = "d"
enabled = false
"#
    )
}

async fn register(app: &TestApp, body: Value) -> (u16, Value) {
    let response = app
        .client
        .post(app.url("/api/v1/dispatchers/w/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn order(n: u64) -> Value {
    json!({"message_type": "order.placed", "message_id": format!("m-{n}"), "payload": {"n": n}})
}

/// Dispatches one order that the worker must not be called for: answered at once (far below
/// the dispatcher's 10 s timeout) with `rejected`/`worker_unavailable`, naming `why`.
async fn refused(app: &TestApp, receiver: &Receiver, n: u64, why: &str) {
    let calls = receiver.seen().len();
    let started = Instant::now();
    let (status, result) = post(app, "shop.orders.events", order(n)).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{result}");
    assert_eq!(result["status"], "rejected");
    assert_eq!(result["error_code"], "worker_unavailable");
    let outcome = &result["dispatchers"][0];
    assert_eq!(outcome["dispatcher_id"], "w");
    assert_eq!(outcome["result"], "rejected");
    let message = outcome["error_message"].as_str().unwrap();
    assert!(message.contains(why), "{message}");
    // A generous bound that shows no timeout was waited out (the timeout is 10 s).
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(receiver.seen().len(), calls, "the worker was not called");
}

#[tokio::test]
async fn a_registered_worker_is_pushed_its_messages_only_while_it_is_fresh() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let app = app(&config(&url), &[]).await;

    // Configured but not registered: not called.
    refused(&app, &receiver, 0, "worker `w` is not registered").await;

    // Bad endpoints are refused with a JSON error, and register nothing.
    for bad in [
        json!("not a url"),
        json!("ftp://127.0.0.1/x"),
        json!("http://"),
        json!(7),
    ] {
        let (status, body) = register(&app, json!({"endpoint": bad})).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_registration", "{body}");
    }
    refused(&app, &receiver, 1, "not registered").await;

    // Registered with an endpoint: pushed there with the wire body, and the dispatch succeeds.
    let (status, health) = register(
        &app,
        json!({"endpoint": format!("{url}/work"), "stale_threshold_seconds": 60}),
    )
    .await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["endpoint"], format!("{url}/work"));
    receiver.reply(Reply::Answer(
        200,
        vec![],
        json!({"outputs": [{"topic": "shop.invoices.events",
                            "envelope": {"message_type": "invoice.created", "payload": {}}}]}),
    ));
    let (status, result) = post(
        &app,
        "shop.orders.events",
        json!({"message_type": "order.placed", "message_id": "m-2",
               "correlation_id": "order-2", "payload": {"total": 42}}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["status"], "success");
    assert_eq!(result["output_count"], 1);
    assert_eq!(
        result["dispatchers"][0]["route_ids"],
        json!(["orders-to-worker", "shop-to-worker"])
    );
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    let call = &seen[0];
    assert_eq!(call.method, axum::http::Method::POST);
    assert_eq!(call.path, "/work");
    assert_eq!(call.headers["idempotency-key"], "m-2");
    assert_eq!(call.body["topic"], "shop.orders.events");
    assert_eq!(call.body["category"], "event");
    assert_eq!(call.body["dispatch_id"], result["dispatch_id"]);
    assert_eq!(call.body["correlation_id"], "order-2");
    assert_eq!(call.body["envelope"]["message_type"], "order.placed");
    assert_eq!(call.body["envelope"]["payload"], json!({"total": 42}));

    // The worker stops heartbeating: once it is stale, it is not called.
    let (status, _) = register(
        &app,
        json!({"endpoint": format!("{url}/work"), "stale_threshold_seconds": 0.2}),
    )
    .await;
    assert_eq!(status, 200);
    wait_for_async("the worker to go stale", || async {
        app.get_json("/api/v1/dispatchers/w").await["is_stale"] == true
    })
    .await;
    refused(&app, &receiver, 3, "worker `w` is stale: no heartbeat for").await;

    // Registered again (a restart): called again.
    let (status, _) = register(
        &app,
        json!({"endpoint": format!("{url}/work-2"), "stale_threshold_seconds": 60}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, result) = post(&app, "shop.orders.events", order(4)).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(receiver.seen().last().unwrap().path, "/work-2");

    // Unregistered: not called.
    let response = app
        .client
        .post(app.url("/api/v1/dispatchers/w/unregister"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    refused(&app, &receiver, 5, "worker `w` is not registered").await;

    // Counted: the refusals as the worker dispatcher's `rejected` runs, the dispatches as
    // `rejected`.
    if app.telemetry_enabled() {
        let metrics = app.scrape().await;
        let count = |series: &str| sample(&metrics, series).unwrap_or(0.0);
        assert_eq!(
            count(r#"dispatcher_executions_total{dispatcher_id="w",result="rejected"}"#),
            4.0,
            "{metrics}"
        );
        assert_eq!(
            count(r#"dispatcher_executions_total{dispatcher_id="w",result="success"}"#),
            2.0
        );
    }
    server.abort();
}

#[tokio::test]
async fn the_dispatcher_api_serves_counts_latency_last_error_and_topic_and_lists_the_routes() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let app = app(&config(&url), &[]).await;

    // Five successes and two permanent failures (400) on `d`.
    for n in 0..5 {
        let (status, result) = post(&app, "mail.outbox.events", order(n)).await;
        assert_eq!(status, 200, "{result}");
        let started = result["started_at"].as_str().unwrap();
        let completed = result["completed_at"].as_str().unwrap();
        let started_at = humantime::parse_rfc3339(started).unwrap();
        let completed_at = humantime::parse_rfc3339(completed).unwrap();
        assert!(started_at <= completed_at, "{started} {completed}");
        assert_eq!(result["dispatchers"][0]["route_ids"], json!(["mail-to-d"]));
    }
    for n in 5..7 {
        receiver.reply(Reply::Answer(
            400,
            vec![],
            json!({"why": "no such mailbox"}),
        ));
        let (status, _) = post(&app, "mail.inbox.events", order(n)).await;
        assert_eq!(status, 502);
    }
    let detail = app.get_json("/api/v1/dispatchers/d").await;
    assert_eq!(
        detail["dispatcher_id"], "d",
        "health is still there: {detail}"
    );
    assert_eq!(detail["healthy"], true);
    let stats = &detail["stats"];
    assert_eq!(
        stats["counts"],
        json!({"success": 5, "error": 2, "timeout": 0, "rejected": 0, "denied": 0, "skipped": 0}),
        "{detail}"
    );
    let latency = &stats["latency_ms"];
    assert_eq!(latency["count"], 7);
    let ms = |key: &str| latency[key].as_f64().unwrap();
    assert!(ms("min") > 0.0, "{latency}");
    assert!(
        ms("min") <= ms("p50") && ms("p50") <= ms("p90"),
        "{latency}"
    );
    assert!(
        ms("p90") <= ms("p99") && ms("p99") <= ms("max"),
        "{latency}"
    );
    assert_eq!(stats["last_topic"], "mail.inbox.events");
    let error = stats["last_error"].as_str().unwrap();
    assert!(
        error.contains("400") && error.contains("/direct"),
        "{error}"
    );

    // A dispatcher that never ran has zero counts and no latency yet.
    let (_, _) = register(&app, json!({"endpoint": format!("{url}/w")})).await;
    let worker = app.get_json("/api/v1/dispatchers/w").await;
    assert_eq!(worker["stats"]["counts"]["success"], 0, "{worker}");
    assert_eq!(worker["stats"]["latency_ms"], Value::Null);
    assert_eq!(worker["origin"], "remote");

    // The routes, as configured, in order, disabled ones included.
    let routes = app.get_json("/api/v1/routes").await;
    assert_eq!(routes["total"], 4);
    assert_eq!(
        routes["routes"][1],
        json!({"route_id": "shop-to-worker", "topic_pattern": "shop.*.events",
               "message_category": "event", "message_type": "order.placed",
               "dispatcher_id": "w", "enabled": true})
    );
    let ids: Vec<(&str, bool)> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["route_id"].as_str().unwrap(),
                r["enabled"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("orders-to-worker", true),
            ("shop-to-worker", true),
            ("mail-to-d", true),
            ("off", false)
        ]
    );
    assert_eq!(routes["routes"][0]["message_type"], Value::Null);
    server.abort();
}
