//! Faults, end to end: dispatchers that panic, hang or always fail; a sink backend that answers
//! 500s or 429s, hangs or drops connections; a disk that is full. Each test asserts that the
//! process keeps serving, that health tells the truth, and that every accepted message or event is
//! accounted for.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dispatchd::config::SinkSettings;
use dispatchd::engine::{
    Category, Dispatcher, Handler, HandlerError, Message, OutputMessage, Route,
};
use dispatchd::resilience::RetryPolicy;
use dispatchd::sinks::{DriverConfig, FullPolicy, SinkConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestApp, sample};

struct Panics;
#[async_trait]
impl Handler for Panics {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        panic!("a bug in a dispatcher")
    }
}

struct Hangs;
#[async_trait]
impl Handler for Hangs {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        std::future::pending().await
    }
}

struct Fails;
#[async_trait]
impl Handler for Fails {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        // A careless error message, as real ones are: it must not come out as it is.
        Err(HandlerError::permanent(
            "the backend said no: POST https://svc:hunter2-db-pass@billing/charge password=hunter2-db-pass",
        ))
    }
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test]
async fn dispatchers_that_panic_hang_or_fail_leave_the_process_serving_and_health_truthful() {
    let app = TestApp::start_with(
        |config| config.health.failure_limit = 3,
        |builder| {
            builder
                .dispatcher(Dispatcher::new("panics", Category::Intent, Panics))
                .dispatcher(
                    Dispatcher::new("hangs", Category::Intent, Hangs)
                        .with_timeout(Duration::from_millis(50)),
                )
                .dispatcher(Dispatcher::new("fails", Category::Intent, Fails))
                .route(Route::new(
                    "p",
                    "faults.panics.intents",
                    Category::Intent,
                    "panics",
                ))
                .route(Route::new(
                    "h",
                    "faults.hangs.intents",
                    Category::Intent,
                    "hangs",
                ))
                .route(Route::new(
                    "f",
                    "faults.fails.intents",
                    Category::Intent,
                    "fails",
                ))
        },
    )
    .await;
    let mut ids = BTreeSet::new();
    for round in 0..3 {
        for (topic, status) in [
            ("faults.panics.intents", StatusCode::BAD_GATEWAY),
            ("faults.hangs.intents", StatusCode::GATEWAY_TIMEOUT),
            ("faults.fails.intents", StatusCode::BAD_GATEWAY),
        ] {
            let response = app
                .post_message(
                    topic,
                    json!({"message_type": "probe", "payload": {"round": round}}),
                )
                .await;
            assert_eq!(response.status(), status, "{topic}");
            let result: Value = response.json().await.unwrap();
            assert!(!result.to_string().contains("hunter2"), "{result}");
            let expected = if status == StatusCode::GATEWAY_TIMEOUT {
                "timeout"
            } else {
                "dispatcher_error"
            };
            assert_eq!(result["status"], expected, "{topic}: {result}");
            ids.insert(result["dispatch_id"].as_str().unwrap().to_owned());
        }
        // Healthy dispatchers keep working beside them.
        let ok = app
            .post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed", "payload": {}}),
            )
            .await;
        assert_eq!(ok.status(), StatusCode::OK);
        ids.insert(
            ok.json::<Value>().await.unwrap()["dispatch_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for id in ["panics", "hangs", "fails"] {
        let health = app.get_json(&format!("/api/v1/dispatchers/{id}")).await;
        assert_eq!(health["healthy"], false, "{id}: {health}");
        assert_eq!(health["consecutive_failures"], 3, "{id}: {health}");
    }
    let log = app.get_json("/api/v1/dispatchers/log").await;
    assert_eq!(log["healthy"], true, "{log}");
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(
            &metrics,
            r#"dispatcher_executions_total{dispatcher_id="hangs",result="timeout"}"#
        ),
        Some(3.0)
    );

    // Every dispatch, failed or not, became exactly one event.
    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let events = lines(&dir.path().join("events.jsonl"));
    let seen: BTreeSet<String> = events
        .iter()
        .map(|e| e["runId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events.len(), ids.len(), "one event per dispatch");
    assert_eq!(seen, ids);
    let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert!(text.contains("the backend said no"), "the error is kept");
    assert!(
        !text.contains("hunter2"),
        "the secret in the error is not: {text}"
    );
}

/// How the fake backend misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// 500 to every request.
    AlwaysFails,
    /// 429 with `Retry-After: 0` to the first two requests, then 200.
    RateLimitedFirst,
    /// Closes the connection without answering the first two requests, then 200.
    DropsConnectionsFirst,
    /// Never answers the first request, then 200.
    HangsFirst,
}

/// A loopback HTTP/1.1 backend written on raw TCP, so it can misbehave at the socket level.
/// Returns its URL and the `runId`s of the events it accepted (answered 200).
async fn backend(fault: Fault) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ingest", listener.local_addr().unwrap());
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let requests = Arc::new(AtomicUsize::new(0));
    let keep = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let accepted = keep.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                loop {
                    let Some(body) = read_request(&mut socket).await else {
                        return;
                    };
                    let n = requests.fetch_add(1, Ordering::SeqCst);
                    let answer = match fault {
                        Fault::AlwaysFails => {
                            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
                        }
                        Fault::RateLimitedFirst if n < 2 => {
                            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\ncontent-length: 0\r\n\r\n"
                        }
                        Fault::DropsConnectionsFirst if n < 2 => return,
                        Fault::HangsFirst if n < 1 => {
                            std::future::pending::<()>().await;
                            return;
                        }
                        _ => {
                            let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
                            accepted.lock().unwrap().extend(
                                events
                                    .iter()
                                    .map(|e| e["runId"].as_str().unwrap().to_owned()),
                            );
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
                        }
                    };
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

/// One request's body, or `None` when the client closed the connection.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Some(buffer[head_end..head_end + length].to_vec())
}

async fn run_against(fault: Fault) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let (url, accepted) = backend(fault).await;
    let app = TestApp::start_with(
        |config| {
            let dead_letter = config.sinks[0]
                .driver
                .dead_letter
                .with_file_name("http.dead-letters.jsonl");
            config.sinks = vec![SinkSettings {
                sink: SinkConfig {
                    name: "backend".into(),
                    service: "http".into(),
                    endpoint: Some(url),
                    api_key: Some("sink-key-0123456789".into()),
                    headers: Default::default(),
                    timeout: Duration::from_millis(300),
                    fsync: false,
                },
                driver: DriverConfig {
                    batch_size: 5,
                    flush_interval: Duration::from_millis(20),
                    buffer: 100,
                    full: FullPolicy::Block,
                    retry: RetryPolicy {
                        attempts: 3,
                        initial_backoff: Duration::from_millis(5),
                        max_backoff: Duration::from_millis(20),
                    },
                    shutdown_deadline: Duration::from_secs(10),
                    send_timeout: Duration::from_millis(400),
                    dead_letter,
                },
            }];
        },
        |builder| builder,
    )
    .await;
    let sent = app.post_orders(12).await;
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let delivered: BTreeSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    let dead: BTreeSet<String> = lines(&dir.path().join("http.dead-letters.jsonl"))
        .iter()
        .map(|line| {
            line["event"]["runId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    (sent, delivered, dead)
}

#[tokio::test]
async fn a_backend_answering_500_gets_every_event_dead_lettered() {
    let (sent, delivered, dead) = run_against(Fault::AlwaysFails).await;
    assert!(delivered.is_empty());
    assert_eq!(dead, sent, "every event is in the dead-letter file");
}

#[tokio::test]
async fn a_rate_limiting_backend_gets_every_event_after_retries() {
    let (sent, delivered, dead) = run_against(Fault::RateLimitedFirst).await;
    assert_eq!(delivered, sent);
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test]
async fn a_backend_dropping_connections_gets_every_event_after_retries() {
    let (sent, delivered, dead) = run_against(Fault::DropsConnectionsFirst).await;
    assert_eq!(delivered, sent);
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test]
async fn a_backend_that_hangs_costs_a_timeout_and_a_retry_not_an_event() {
    let (sent, delivered, dead) = run_against(Fault::HangsFirst).await;
    assert_eq!(delivered, sent);
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test]
async fn a_full_disk_fails_the_jsonl_dispatcher_loudly_and_nothing_else() {
    let app = TestApp::start_with(
        |config| {
            config.health.failure_limit = 2;
            for dispatcher in &mut config.dispatchers {
                if let dispatchd::config::DispatcherKind::Jsonl { path } = &mut dispatcher.kind {
                    // Every write to /dev/full fails with ENOSPC, as on a full disk.
                    *path = "/dev/full".into();
                }
            }
        },
        |builder| builder,
    )
    .await;
    for _ in 0..2 {
        let response = app
            .post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed", "payload": {}}),
            )
            .await;
        // The log dispatcher succeeded, the JSONL one did not: the caller learns it.
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let result: Value = response.json().await.unwrap();
        assert_eq!(result["status"], "dispatcher_error", "{result}");
        let log = result["dispatchers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["dispatcher_id"] == "log")
            .unwrap()
            .clone();
        assert_eq!(log["result"], "success", "{log}");
        let jsonl = result["dispatchers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["dispatcher_id"] == "jsonl")
            .unwrap()
            .clone();
        assert_ne!(jsonl["result"], "success", "{jsonl}");
    }
    let health = app.get_json("/api/v1/dispatchers/jsonl").await;
    assert_eq!(health["healthy"], false, "{health}");
    assert_eq!(health["consecutive_failures"], 2, "{health}");
    let alive = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(alive.status(), StatusCode::OK);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_under_the_file_sink_dead_letters_every_event() {
    let app = TestApp::start_with(
        |config| {
            let sink = &mut config.sinks[0];
            assert_eq!(sink.sink.service, "file");
            // Every write to /dev/full fails with ENOSPC; the dead-letter file is on a good disk.
            sink.sink.endpoint = Some("/dev/full".into());
            sink.driver.batch_size = 5;
            sink.driver.flush_interval = Duration::from_millis(20);
            sink.driver.retry = RetryPolicy {
                attempts: 2,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(10),
            };
        },
        |builder| builder,
    )
    .await;
    // The sink's failures are not the dispatch's: every message is accepted.
    let ids = app.post_orders(12).await;
    // Each batch fails on the write itself, not one batch later: all 12 are dead letters and
    // none was counted as sent.
    let dead_lettered = r#"sink_events_total{outcome="dead_lettered",sink="events"}"#;
    crate::support::wait_for_async("12 dead-lettered events", || async {
        sample(&app.scrape().await, dead_lettered) == Some(12.0)
    })
    .await;
    let metrics = app.scrape().await;
    assert_eq!(
        sample(
            &metrics,
            r#"sink_events_total{outcome="sent",sink="events"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "{metrics}"
    );
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let letters = lines(&dir.path().join("events.dead-letters.jsonl"));
    let dead: BTreeSet<String> = letters
        .iter()
        .map(|line| line["event"]["runId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(letters.len(), 12);
    assert_eq!(
        dead, ids,
        "every accepted dispatch's event is a dead letter"
    );
    assert!(
        letters
            .iter()
            .all(|l| l["last_error"].as_str().unwrap().contains("space")),
        "{letters:?}"
    );
}
