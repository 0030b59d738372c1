use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use dispatchd::config::MetricsConfig;
use dispatchd::engine::{Category, Dispatcher, Engine, Route};
use dispatchd::health::{HealthConfig, HealthRegistry, LifecycleObserver, Origin, Registration};
use dispatchd::http::{ApiState, router};
use dispatchd::telemetry::Telemetry;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::support::{TestApp, sample};

/// The API over a registry of its own, driven with `oneshot` so tokio's paused clock rules.
struct Api {
    router: Router,
    draining: CancellationToken,
    health: HealthRegistry,
}

fn api(config: HealthConfig) -> Api {
    let telemetry = Telemetry::new(&MetricsConfig {
        enabled: true,
        namespace: String::new(),
        cardinality_limit: 2000,
    });
    let observer = telemetry
        .lifecycle_metrics()
        .map(|m| Arc::new(m) as Arc<dyn LifecycleObserver>);
    let health = HealthRegistry::new(config, observer);
    telemetry.observe_health(&health);
    let engine = Engine::builder().build().unwrap();
    let draining = CancellationToken::new();
    let state = ApiState::new(engine, telemetry, health.clone(), draining.clone());
    Api {
        router: router(state, 1024 * 1024),
        draining,
        health,
    }
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, String) {
        let mut request = Request::builder().method(method).uri(path);
        let body = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn json(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, text) = self.call(method, path, body).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON from {path}: {text}")),
        )
    }

    async fn metrics(&self) -> String {
        let (status, text) = self.call("GET", "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        text
    }
}

#[tokio::test(start_paused = true)]
async fn a_stale_critical_worker_is_reported_but_never_makes_the_instance_unready() {
    let api = api(HealthConfig::default());
    let (status, _) = api
        .json(
            "POST",
            "/api/v1/dispatchers/billing-worker/register",
            Some(json!({"stale_threshold_seconds": 30, "critical": true})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(31)).await;
    let (status, body) = api.json("GET", "/ready", None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready")),
        "a worker's health is not this instance's fault: {body}"
    );
    assert_eq!(body["unhealthy"][0]["dispatcher_id"], "billing-worker");
    assert_eq!(body["unhealthy"][0]["origin"], "remote");
    assert_eq!(
        body["unhealthy"][0]["reason"],
        "stale: no heartbeat for 31 s (threshold 30 s)"
    );
    let (status, health) = api
        .json("POST", "/api/v1/dispatchers/billing-worker/heartbeat", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["healthy"], true);
}

#[tokio::test(start_paused = true)]
async fn ready_flips_to_503_for_an_unhealthy_critical_dispatcher_of_its_own_and_back() {
    let api = api(HealthConfig::default());
    let own = Registration {
        origin: Origin::InProcess,
        stale_threshold: Some(Duration::from_secs(30)),
        critical: true,
        endpoint: None,
    };
    api.health.register("payments", own).unwrap();
    api.health.start("payments").unwrap();
    let (status, body) = api.json("GET", "/ready", None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ready"))
    );

    tokio::time::advance(Duration::from_secs(31)).await;
    let (status, body) = api.json("GET", "/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["unhealthy"][0]["dispatcher_id"], "payments");
    assert_eq!(body["unhealthy"][0]["origin"], "in_process");
    let (status, _) = api.json("GET", "/health", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "liveness does not depend on dispatchers"
    );

    api.health.heartbeat("payments").unwrap();
    let (status, _) = api.json("GET", "/ready", None).await;
    assert_eq!(status, StatusCode::OK);

    api.draining.cancel();
    let (status, body) = api.json("GET", "/ready", None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_stale_worker_that_is_not_critical_is_reported_but_keeps_ready() {
    let api = api(HealthConfig::default());
    api.json(
        "POST",
        "/api/v1/dispatchers/batch/register",
        Some(json!({"stale_threshold_seconds": 5})),
    )
    .await;
    tokio::time::advance(Duration::from_secs(6)).await;
    let (status, body) = api.json("GET", "/ready", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["unhealthy"][0]["critical"], false);
    let (_, list) = api.json("GET", "/api/v1/dispatchers", None).await;
    assert_eq!(
        (
            list["total"].as_u64(),
            list["healthy"].as_u64(),
            list["stale"].as_u64()
        ),
        (Some(1), Some(0), Some(1))
    );
    let worker = &list["dispatchers"][0];
    for field in [
        "dispatcher_id",
        "healthy",
        "is_stale",
        "heartbeat_age_seconds",
        "consecutive_failures",
        "uptime_seconds",
        "state",
    ] {
        assert!(worker.get(field).is_some(), "{field}");
    }
    assert_eq!(worker["heartbeat_age_seconds"], 6.0);
    assert_eq!(worker["state"], "running");
}

#[tokio::test(start_paused = true)]
async fn the_health_metrics_follow_the_registry_and_vanish_on_unregister() {
    let api = api(HealthConfig::default());
    api.json(
        "POST",
        "/api/v1/dispatchers/w1/register",
        Some(json!({"stale_threshold_seconds": 60})),
    )
    .await;
    tokio::time::advance(Duration::from_secs(20)).await;
    api.json("POST", "/api/v1/dispatchers/w1/heartbeat", None)
        .await;
    api.json("POST", "/api/v1/dispatchers/w1/heartbeat", None)
        .await;
    tokio::time::advance(Duration::from_secs(5)).await;

    let text = api.metrics().await;
    let at = |series: &str| sample(&text, series);
    assert_eq!(
        at(r#"dispatcher_active_total{dispatcher_id="w1"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_heartbeat_total{dispatcher_id="w1"}"#),
        Some(2.0)
    );
    assert_eq!(
        at(r#"dispatcher_lifecycle_events_total{dispatcher_id="w1",event="register"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_health_status{dispatcher_id="w1",is_stale="false",origin="remote"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_heartbeat_age_seconds{dispatcher_id="w1"}"#),
        Some(5.0)
    );
    assert_eq!(
        at(r#"dispatcher_uptime_seconds{dispatcher_id="w1"}"#),
        Some(25.0)
    );
    assert_eq!(
        at(r#"dispatcher_consecutive_failures{dispatcher_id="w1"}"#),
        Some(0.0)
    );

    tokio::time::advance(Duration::from_secs(60)).await;
    let text = api.metrics().await;
    assert_eq!(
        sample(
            &text,
            r#"dispatcher_health_status{dispatcher_id="w1",is_stale="true",origin="remote"}"#
        ),
        Some(0.0)
    );
    assert!(!text.contains(
        r#"dispatcher_health_status{dispatcher_id="w1",is_stale="false",origin="remote"}"#
    ));

    let (status, _) = api
        .json("POST", "/api/v1/dispatchers/w1/unregister", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = api.metrics().await;
    for gauge in [
        "dispatcher_health_status",
        "dispatcher_heartbeat_age_seconds",
        "dispatcher_uptime_seconds",
        "dispatcher_consecutive_failures",
    ] {
        assert!(
            !text.contains(&format!("{gauge}{{dispatcher_id=\"w1\"")),
            "{gauge} vanished"
        );
    }
    assert_eq!(
        sample(&text, r#"dispatcher_active_total{dispatcher_id="w1"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"dispatcher_lifecycle_events_total{dispatcher_id="w1",event="unregister"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(start_paused = true)]
async fn bad_ids_bodies_and_bounds_are_refused_with_json_errors() {
    let api = api(HealthConfig {
        max_workers: 2,
        ..HealthConfig::default()
    });
    let code = |body: &Value| body["error"]["code"].as_str().unwrap().to_owned();

    let (status, body) = api
        .json("POST", "/api/v1/dispatchers/bad%20id/register", None)
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::BAD_REQUEST, "invalid_dispatcher_id")
    );
    let long = "x".repeat(129);
    let (status, _) = api
        .json(
            "POST",
            &format!("/api/v1/dispatchers/{long}/register"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body) = api
        .json(
            "POST",
            "/api/v1/dispatchers/w/register",
            Some(json!({"stale_threshold_seconds": -1})),
        )
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_registration")
    );
    let (status, body) = api
        .json(
            "POST",
            "/api/v1/dispatchers/w/register",
            Some(json!({"stale_threshold_seconds": 1e7})),
        )
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_registration")
    );
    let (status, body) = api
        .json(
            "POST",
            "/api/v1/dispatchers/w/register",
            Some(json!({"stale": 5})),
        )
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_registration")
    );

    for id in ["a", "b"] {
        let (status, _) = api
            .json("POST", &format!("/api/v1/dispatchers/{id}/register"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = api
        .json("POST", "/api/v1/dispatchers/c/register", None)
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "too_many_workers")
    );

    let (status, body) = api
        .json("POST", "/api/v1/dispatchers/ghost/heartbeat", None)
        .await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "unknown_dispatcher")
    );
    let (status, body) = api.json("GET", "/api/v1/dispatchers/ghost", None).await;
    assert_eq!(
        (status, code(&body).as_str()),
        (StatusCode::NOT_FOUND, "unknown_dispatcher")
    );
    let (status, _) = api
        .json("POST", "/api/v1/dispatchers/ghost/unregister", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn in_process_dispatchers_are_registered_running_and_count_their_failures() {
    let app = TestApp::start_with(
        |_| {},
        |builder| {
            builder
                .dispatcher(Dispatcher::new(
                    "flaky",
                    Category::Intent,
                    crate::support::Failing {
                        transient: true,
                        message: "down",
                    },
                ))
                .route(Route::new("r", "**", Category::Intent, "flaky"))
        },
    )
    .await;
    crate::support::wait_for_async("every dispatcher to be running", || async {
        let list: Value = app
            .client
            .get(app.url("/api/v1/dispatchers"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["dispatchers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "running")
    })
    .await;
    let list: Value = app
        .client
        .get(app.url("/api/v1/dispatchers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["dispatchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dispatcher_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["flaky", "jsonl", "log"]);
    assert_eq!(list["dispatchers"][0]["origin"], "in_process");

    for _ in 0..5 {
        app.post_message("a.intents", json!({"message_type": "t"}))
            .await;
    }
    let flaky: Value = app
        .client
        .get(app.url("/api/v1/dispatchers/flaky"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(flaky["consecutive_failures"], 5);
    assert_eq!(flaky["healthy"], false);
    assert_eq!(flaky["reason"], "5 consecutive failures (limit 5)");

    // A worker cannot impersonate an in-process dispatcher.
    let response = app
        .client
        .post(app.url("/api/v1/dispatchers/flaky/heartbeat"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let response = app
        .client
        .post(app.url("/api/v1/dispatchers/log/register"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn ready_shows_the_bus() {
    let app = crate::support::TestApp::start().await;
    let ready = app.get_json("/ready").await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["bus"], json!({"kind": "memory", "publishing": "ok"}));
    app.stop().await.unwrap();
}
