//! Instances on one Redis as one service: instance identity, and the dispatcher registry they
//! share (`[registry] kind = "redis"`), against a Redis of our own so it can be killed.

use std::time::Duration;

use dispatchd::config::{Config, RedisBusConfig, RegistryKind};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::redis::{own_redis, unique};
use crate::support::{TestApp, wait_for_async};

/// Short enough for a test, long enough that a worker with a 1 s threshold stays listed (stale)
/// for a while before it expires.
const RETENTION: Duration = Duration::from_secs(2);

/// The Redis bus and the shared registry under `prefix`, each instance with its default
/// identity (no consumer name configured).
fn on_redis(config: &mut Config, url: &str, prefix: &str) {
    config.bus.redis = Some(RedisBusConfig {
        url: url.to_owned(),
        max_len: None,
        consumer: None,
        claim_idle: Duration::from_secs(30),
        consumer_retention: Duration::from_secs(3600),
        trim_every: Duration::from_secs(3600),
        dead_letter: config.sinks[0]
            .driver
            .dead_letter
            .with_file_name("bus.dead-letters.jsonl"),
    });
    config.bus.events_stream = format!("{prefix}:events");
    config.bus.outputs_prefix = format!("{prefix}:topic:");
    config.registry.kind = RegistryKind::Redis;
    config.registry.key_prefix = format!("{prefix}:registry");
    config.registry.retention = RETENTION;
    config.health.max_workers = 2;
}

async fn instance(url: &str, prefix: &str) -> TestApp {
    TestApp::start_with(|config| on_redis(config, url, prefix), |builder| builder).await
}

async fn post(app: &TestApp, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut request = app.client.post(app.url(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

async fn get(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let response = app.client.get(app.url(path)).send().await.expect("sent");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

async fn worker(app: &TestApp, id: &str) -> Value {
    let (status, body) = get(app, &format!("/api/v1/dispatchers/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{id} on {}: {body}", app.addr);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_one_redis_share_their_workers_and_survive_restarts() {
    let Some((redis, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("registry");
    let a = instance(&url, &prefix).await;
    let b = instance(&url, &prefix).await;
    let c = instance(&url, &prefix).await;

    // Register through A, heartbeat through B, listed healthy by C.
    let (status, body) = post(
        &a,
        "/api/v1/dispatchers/w1/register",
        Some(json!({"stale_threshold_seconds": 30})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&b, "/api/v1/dispatchers/w1/heartbeat", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "B knows the worker A registered: {body}"
    );
    let (status, list) = get(&c, "/api/v1/dispatchers").await;
    assert_eq!(status, StatusCode::OK);
    let listed = list["dispatchers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["dispatcher_id"] == "w1")
        .expect("C lists the worker");
    assert_eq!(listed["healthy"], true);
    assert_eq!(listed["origin"], "remote");

    // Registering a live worker again, through another instance, is no restart.
    let (status, _) = post(
        &c,
        "/api/v1/dispatchers/w1/register",
        Some(json!({"stale_threshold_seconds": 30})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for app in [&a, &b, &c] {
        let metrics = app.scrape().await;
        assert!(
            !metrics.contains(r#"dispatcher_id="w1",event="restart""#),
            "no restart event on {}: {metrics}",
            app.addr
        );
    }

    // A critical worker that stops heartbeating is stale on every instance, and makes none of
    // them unready.
    let (status, _) = post(
        &b,
        "/api/v1/dispatchers/w2/register",
        Some(json!({"stale_threshold_seconds": 1, "critical": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    wait_for_async("w2 to go stale", || async {
        worker(&a, "w2").await["is_stale"] == true
    })
    .await;
    for app in [&b, &c] {
        let w2 = worker(app, "w2").await;
        assert_eq!(
            (&w2["is_stale"], &w2["healthy"]),
            (&json!(true), &json!(false))
        );
    }
    for app in [&a, &b, &c] {
        let (status, body) = get(app, "/ready").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // Two workers registered: a third is refused until the stale one's record expires.
    let w3 = Some(json!({"stale_threshold_seconds": 30}));
    let (status, body) = post(&c, "/api/v1/dispatchers/w3/register", w3.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    wait_for_async("w2's record to expire", || async {
        get(&a, "/api/v1/dispatchers/w2").await.0 == StatusCode::NOT_FOUND
    })
    .await;
    let (status, body) = post(&c, "/api/v1/dispatchers/w3/register", w3).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the expired record freed its slot: {body}"
    );

    // The health gauges show the shared workers on every instance.
    wait_for_async("C's gauges to show w1", || async {
        let metrics = c.scrape().await;
        metrics.contains(
            r#"dispatcher_health_status{dispatcher_id="w1",is_stale="false",origin="remote"} 1"#,
        ) && metrics.contains("dispatcher_registry_up 1")
    })
    .await;

    // An instance restarted loses nothing.
    a.stop().await.unwrap();
    let a = instance(&url, &prefix).await;
    assert_eq!(worker(&a, "w1").await["healthy"], true);
    assert_eq!(worker(&a, "w3").await["healthy"], true);

    // Redis gone: the registry says so, never "stale".
    drop(redis);
    let (status, body) = get(&b, "/api/v1/dispatchers").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "registry_unavailable");
    let (status, body) = post(&b, "/api/v1/dispatchers/w1/heartbeat", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "registry_unavailable");
    wait_for_async("the registry metric to say Redis is gone", || async {
        c.scrape().await.contains("dispatcher_registry_up 0")
    })
    .await;
    let metrics = c.scrape().await;
    assert!(
        !metrics.contains(r#"dispatcher_id="w1",is_stale="true""#),
        "an unreachable registry is no stale worker: {metrics}"
    );
    let (status, body) = get(&c, "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Their consumers wait out Redis' absence while stopping: stop the three at once.
    for stopped in futures::future::join_all([a.stop(), b.stop(), c.stop()]).await {
        stopped.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_one_host_have_their_own_identity_and_consumer() {
    let Some((_redis, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("identity");
    let a = instance(&url, &prefix).await;
    let b = instance(&url, &prefix).await;
    let ids = [
        format!("{}:{}", dispatchd::config::host_name(), a.addr.port()),
        format!("{}:{}", dispatchd::config::host_name(), b.addr.port()),
    ];
    for (app, id) in [&a, &b].into_iter().zip(&ids) {
        let metrics = app.scrape().await;
        assert!(
            metrics.contains(&format!(r#"service_instance_id="{id}""#)),
            "target_info names the instance: {metrics}"
        );
    }
    // Each instance reads the events stream as a consumer of its own.
    let client = redis::Client::open(url.as_str()).unwrap();
    let connection = client.get_multiplexed_async_connection().await.unwrap();
    let stream = format!("{prefix}:events");
    wait_for_async("both consumers to join the sink's group", || {
        let mut connection = connection.clone();
        let stream = stream.clone();
        let ids = ids.clone();
        async move {
            let consumers: Vec<std::collections::HashMap<String, redis::Value>> =
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&stream)
                    .arg("dispatchd-sink-events")
                    .query_async(&mut connection)
                    .await
                    .unwrap_or_default();
            let names: Vec<String> = consumers
                .iter()
                .filter_map(|c| redis::from_redis_value_ref(c.get("name")?).ok())
                .collect();
            ids.iter().all(|id| names.contains(id))
        }
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Any instance delivers to a worker registered through another: the endpoint travels in the
/// shared record, and a `worker` dispatcher on B pushes to a worker that registered on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_registered_through_one_instance_receives_messages_posted_to_another() {
    let Some((redis, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("registry-push");
    let receiver = crate::network::Receiver::default();
    let (receiver_url, server) = receiver.start().await;
    let loaded = Config::from_text(
        std::path::Path::new("test.toml"),
        r#"[[dispatchers]]
dispatcher_id = "w"
kind = "worker"
category = "event"

[[routes]]
route_id = "to-w"
topic_pattern = "shop.*.events"
message_category = "event"
dispatcher_id = "w"
"#,
        |_| None,
    )
    .unwrap();
    let start = || {
        let (dispatchers, routes) = (loaded.dispatchers.clone(), loaded.routes.clone());
        TestApp::start_with(
            |config| {
                on_redis(config, &url, &prefix);
                config.dispatchers = dispatchers;
                config.routes = routes;
            },
            |builder| builder,
        )
    };
    let (a, b) = (start().await, start().await);
    let (status, body) = post(
        &a,
        "/api/v1/dispatchers/w/register",
        Some(json!({"stale_threshold_seconds": 60, "endpoint": format!("{receiver_url}/work")})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // B reads the shared registry every second: its first dispatches may find no worker yet.
    wait_for_async("B to push to the worker A registered", || async {
        let response = b
            .post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed"}),
            )
            .await;
        response.status() == StatusCode::OK
    })
    .await;
    let seen = receiver.seen();
    assert_eq!(seen.last().unwrap().path, "/work");
    assert_eq!(seen.last().unwrap().body["topic"], "shop.orders.events");

    // Once it stops heartbeating past its threshold, B refuses at once instead of calling it.
    let (status, body) = post(
        &a,
        "/api/v1/dispatchers/w/register",
        Some(json!({"stale_threshold_seconds": 1, "endpoint": format!("{receiver_url}/work")})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let called = receiver.seen().len();
    wait_for_async("B to refuse the stale worker", || async {
        let response = b
            .post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed"}),
            )
            .await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        status == StatusCode::SERVICE_UNAVAILABLE
            && body["error_code"] == "worker_unavailable"
            && body["error_message"]
                .as_str()
                .unwrap_or("")
                .contains("stale")
    })
    .await;
    // Nothing reached the worker after it went stale (the refusals did not call it), though
    // calls made before B saw it stale may have.
    let after = receiver.seen().len();
    let (status, _) = post(
        &b,
        "/api/v1/messages/shop.orders.events",
        Some(json!({"message_type": "order.placed"})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(receiver.seen().len(), after, "a stale worker is not called");
    assert!(after >= called);
    server.abort();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    drop(redis);
}
