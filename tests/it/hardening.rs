//! Access control, limits and load shedding, over real HTTP on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dispatchd::auth::{ApiToken, Scope, Secret, Tokens};
use dispatchd::engine::{Category, Dispatcher, Route};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestApp, sample};

const INGEST: &str = "ingest-token-3b1f0c9e77d2";
const ADMIN: &str = "admin-token-9c4e21aa0f5b";
const METRICS: &str = "metrics-token-51d0e8c3b7aa";

fn token(name: &str, value: &str, scopes: &[Scope]) -> ApiToken {
    ApiToken {
        name: name.into(),
        secret: Secret::new(value),
        scopes: scopes.to_vec(),
    }
}

async fn scrape(app: &TestApp, bearer: Option<&str>) -> String {
    let mut request = app.client.get(app.url("/metrics"));
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

#[tokio::test]
async fn tokens_guard_ingest_and_the_dispatcher_api_by_scope() {
    let app = TestApp::start_with(
        |config| {
            config.auth = Tokens::new(vec![
                token("checkout", INGEST, &[Scope::Ingest]),
                token("operator", ADMIN, &[Scope::Admin]),
            ]);
        },
        |builder| builder,
    )
    .await;
    let ingest = |bearer: Option<&'static str>| {
        let mut request = app
            .client
            .post(app.url("/api/v1/messages/shop.orders.events"))
            .json(&json!({"message_type": "order.placed", "payload": {}}));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let missing = ingest(None).await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(missing.headers().contains_key("www-authenticate"));
    let missing: Value = missing.json().await.unwrap();
    let wrong = ingest(Some("ingest-token-3b1f0c9e77d3")).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let wrong: Value = wrong.json().await.unwrap();
    assert_eq!(missing, wrong, "no hint about which tokens exist");
    assert_eq!(wrong["error"]["code"], "unauthorized");

    let other_scope = ingest(Some(ADMIN)).await.unwrap();
    assert_eq!(other_scope.status(), StatusCode::FORBIDDEN);
    let allowed = ingest(Some(INGEST)).await.unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);

    // The worker API needs admin.
    let register = |bearer: &'static str| {
        app.client
            .post(app.url("/api/v1/dispatchers/billing-worker/register"))
            .bearer_auth(bearer)
            .json(&json!({}))
            .send()
    };
    assert_eq!(
        register(INGEST).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert!(register(ADMIN).await.unwrap().status().is_success());
    let list = app
        .client
        .get(app.url("/api/v1/dispatchers"))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::UNAUTHORIZED);

    // Health, readiness and (with no metrics token) /metrics stay open.
    for path in ["/health", "/ready"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let metrics = scrape(&app, None).await;
    assert_eq!(
        sample(&metrics, r#"http_auth_failures_total{reason="missing"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, r#"http_auth_failures_total{reason="invalid"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, r#"http_auth_failures_total{reason="forbidden"}"#),
        Some(2.0)
    );
    for secret in [INGEST, ADMIN] {
        assert!(!metrics.contains(secret));
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_metrics_token_closes_metrics_stats_and_the_status_page() {
    let app = TestApp::start_with(
        |config| {
            config.auth = Tokens::new(vec![token("prometheus", METRICS, &[Scope::Metrics])]);
        },
        |builder| builder,
    )
    .await;
    for path in ["/metrics", "/api/v1/stats", "/", "/api/v1/status"] {
        let open = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(open.status(), StatusCode::UNAUTHORIZED, "{path}");
        let with = app
            .client
            .get(app.url(path))
            .bearer_auth(METRICS)
            .send()
            .await
            .unwrap();
        assert_eq!(with.status(), StatusCode::OK, "{path}");
    }
    // A metrics token is not an ingest token.
    let ingest = app
        .client
        .post(app.url("/api/v1/messages/shop.orders.events"))
        .bearer_auth(METRICS)
        .json(&json!({"message_type": "order.placed", "payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(ingest.status(), StatusCode::FORBIDDEN);
    app.stop().await.unwrap();
}

/// Holds every message until released, counting arrivals.
async fn gated_app(
    edit: impl FnOnce(&mut dispatchd::config::Config),
) -> (TestApp, Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>) {
    let handler = crate::support::Gate::new();
    let (gate, arrived) = (handler.release.clone(), handler.arrived.clone());
    let app = TestApp::start_with(edit, |builder| {
        builder
            .dispatcher(Dispatcher::new("gate", Category::Intent, handler))
            .route(Route::new("to-gate", "**", Category::Intent, "gate"))
    })
    .await;
    (app, gate, arrived)
}

#[tokio::test]
async fn past_max_in_flight_requests_are_shed_with_retry_after_and_observability_stays_up() {
    let (app, gate, arrived) = gated_app(|config| config.server.max_in_flight = 1).await;
    let held = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/api/v1/messages/shop.orders.intents");
        async move {
            client
                .post(url)
                .json(&json!({"message_type": "order.hold", "payload": {}}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    crate::support::wait_for("the held request to reach its dispatcher", || {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;
    let shed = app
        .post_message(
            "shop.orders.events",
            json!({"message_type": "order.placed", "payload": {}}),
        )
        .await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");

    for path in ["/health", "/ready", "/metrics"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path} is never shed");
    }
    gate.add_permits(1);
    assert_eq!(
        held.await.unwrap(),
        StatusCode::OK,
        "the held request completes"
    );
    let after = app
        .post_message(
            "shop.orders.events",
            json!({"message_type": "order.placed", "payload": {}}),
        )
        .await;
    assert_eq!(after.status(), StatusCode::OK, "capacity is back");
    let metrics = scrape(&app, None).await;
    assert!(sample(&metrics, r#"http_requests_shed_total{reason="in_flight"}"#).unwrap() >= 1.0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_past_the_deadline_is_answered_503_and_counted() {
    let (app, gate, _) = gated_app(|config| {
        config.server.request_timeout = Duration::from_millis(200);
    })
    .await;
    let response = app
        .post_message(
            "shop.orders.intents",
            json!({"message_type": "order.hold", "payload": {}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let metrics = scrape(&app, None).await;
    assert_eq!(
        sample(&metrics, r#"http_requests_shed_total{reason="timeout"}"#),
        Some(1.0)
    );
    gate.close();
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_request_head_is_refused_with_431() {
    let app = TestApp::start_with(|config| config.server.max_header_bytes = 8192, |b| b).await;
    let response = app
        .client
        .get(app.url("/health"))
        .header("x-padding", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    // A head over the limit but within what the server buffers gets the JSON error every
    // other refusal has (hyper's own 431 for the 20 KB one above has no body).
    let response = app
        .client
        .post(app.url("/api/v1/messages/a.events"))
        .header("x-padding", "a".repeat(9_000))
        .json(&serde_json::json!({"message_type": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "head_too_large");
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = TestApp::start_with(
        |config| config.server.header_read_timeout = Duration::from_millis(300),
        |b| b,
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"POST /api/v1/messages/a.b.events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buffer)).await;
    assert!(closed.is_ok(), "the server closed the connection");
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    app.stop().await.unwrap();
}

/// At `max_connections` with every connection busy, nothing can be evicted: a new connection
/// waits until one turns idle, which then makes room for it at once.
#[tokio::test]
async fn past_max_connections_with_every_connection_busy_new_connections_wait() {
    let (app, gate, arrived) = gated_app(|config| {
        config.server.max_connections = 2;
        // Long enough that idleness alone closes nothing during the test.
        config.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    // Two requests in progress, one per connection. The clients live to the end of the test, so
    // their keep-alive connections stay open after their requests.
    let clients = [reqwest::Client::new(), reqwest::Client::new()];
    let mut held = Vec::new();
    for client in &clients {
        let client = client.clone();
        let url = app.url("/api/v1/messages/shop.orders.intents");
        held.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"message_type": "order.hold", "payload": {}}))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    crate::support::wait_for("both held requests to reach the dispatcher", || {
        arrived.load(Ordering::SeqCst) == 2
    })
    .await;
    let waiting = tokio::spawn({
        let client = reqwest::Client::new();
        let url = app.url("/health");
        async move { client.get(url).send().await.map(|r| r.status()) }
    });
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        while !waiting.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(early.is_err(), "served although both connections were busy");
    // One request ends; its connection stays open but idle, and makes room.
    gate.add_permits(1);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a connection turned idle")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    gate.add_permits(1);
    for held in held {
        assert_eq!(held.await.unwrap(), StatusCode::OK);
    }
    drop(clients);
    app.stop().await.unwrap();
}

/// The load generator itself: a short open-loop step against a real server answers every
/// request, and its numbers are coherent.
#[tokio::test]
async fn the_load_generator_reports_every_request_it_sent() {
    let app = TestApp::start().await;
    let options = dispatchd::loadtest::Options {
        target: format!("http://{}", app.addr),
        rates: vec![200],
        step: Duration::from_millis(500),
        connections: 4,
        topic: "load.test.events".into(),
        token: None,
        pid: Some(std::process::id()),
    };
    let mut reported = 0;
    let steps = dispatchd::loadtest::run(&options, |_| reported += 1)
        .await
        .unwrap();
    assert_eq!(reported, 1);
    let step = &steps[0];
    assert_eq!(step.sent, 100);
    assert_eq!((step.ok, step.errors), (100, 0));
    assert!(step.p50_us <= step.p99_us && step.p99_us <= step.max_us);
    let (start, end, max) = step.rss_kib.expect("this process's RSS");
    assert!(start > 0 && max >= start.max(end));
    assert_eq!(app.jsonl_lines().len(), 100, "every request was dispatched");
    app.stop().await.unwrap();
}

/// After a request, a keep-alive connection that stays silent is closed too: an idle client
/// cannot hold one of `max_connections` forever.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_head_timeout() {
    let app = TestApp::start_with(
        |config| config.server.header_read_timeout = Duration::from_millis(300),
        |b| b,
    )
    .await;
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4096];
    let n = idle.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
    // Silent from here on: the server must close the connection.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match idle.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
    app.stop().await.unwrap();
}

/// The example of issue 13: a secret under the payload's `usage`, which dispatch events copy to
/// `tokensUsage`, never reaches the events file.
#[tokio::test]
async fn a_secret_in_the_payloads_usage_never_reaches_the_events_file() {
    const SECRET: &str = "S3CRET-usage-7d1c";
    let app = TestApp::start().await;
    let response = app
        .post_message(
            "shop.orders.events",
            json!({
                "message_type": "completion.done",
                "payload": {"usage": {"api_key": SECRET, "prompt_tokens": 12}},
            }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert!(!events.contains(SECRET), "{events}");
    let event: Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(
        event["tokensUsage"],
        json!({"api_key": "[REDACTED]", "prompt_tokens": 12})
    );
    assert_eq!(event["input"]["payload"]["usage"]["api_key"], "[REDACTED]");
}
