use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use dispatchd::sinks::{DispatchEvent, Retry, SinkConfig, build};
use serde_json::{Value, json};

use crate::support::TestApp;

#[tokio::test]
async fn every_dispatch_becomes_an_event_and_shutdown_flushes_the_file_sink() {
    let app = TestApp::start().await;
    let mut dispatch_ids = Vec::new();
    for topic in ["shop.orders.events", "shop.orders.events", "not-a-topic"] {
        let result: Value = app
            .post_message(
                topic,
                json!({"message_type": "order.placed", "payload": {"usage": {"prompt": 3}}}),
            )
            .await
            .json()
            .await
            .unwrap();
        dispatch_ids.push(result["dispatch_id"].as_str().unwrap().to_owned());
    }
    // The flush interval is 5 s; shutdown must flush the partial batch without waiting for it.
    let stopped = tokio::time::timeout(Duration::from_secs(4), app.stop_keeping_files()).await;
    let (stopped, dir) = stopped.expect("stops before the flush interval");
    stopped.unwrap();
    let kept = dir.path().join("events.jsonl");

    let events: Vec<Value> = std::fs::read_to_string(&kept)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["runId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, dispatch_ids);
    for field in [
        "type",
        "event",
        "runId",
        "name",
        "timestamp",
        "input",
        "output",
        "metadata",
        "tags",
        "log_id",
    ] {
        assert!(events[0].get(field).is_some(), "{field}");
    }
    assert_eq!(events[0]["event"], "end");
    assert_eq!(events[0]["tokensUsage"]["prompt"], 3);
    assert_eq!(events[2]["event"], "error");
    assert_eq!(events[2]["metadata"]["status"], "invalid_message");
}

/// A scripted answer: status, headers, JSON body.
type Answer = (StatusCode, Vec<(&'static str, String)>, Value);

/// A loopback server playing a service: records each request, answers from a script (then 200).
#[derive(Clone, Default)]
struct Service {
    requests: Arc<Mutex<Vec<(String, HeaderMap, Value)>>>,
    answers: Arc<Mutex<VecDeque<Answer>>>,
}

async fn record(
    State(service): State<Service>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    service
        .requests
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), headers, body));
    let (status, headers, body) =
        service
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or((StatusCode::OK, vec![], json!({})));
    let mut response = (status, axum::Json(body)).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

impl Service {
    async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().fallback(record).with_state(self.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        (format!("http://{addr}"), task)
    }

    fn answer(&self, status: u16, headers: Vec<(&'static str, String)>, body: Value) {
        self.answers.lock().unwrap().push_back((
            StatusCode::from_u16(status).unwrap(),
            headers,
            body,
        ));
    }
}

fn config(service: &str, endpoint: String) -> SinkConfig {
    SinkConfig {
        name: service.to_owned(),
        service: service.to_owned(),
        endpoint: Some(endpoint),
        api_key: Some("key-123".to_owned()),
        headers: [("x-tenant".to_owned(), "acme".to_owned())].into(),
        timeout: Duration::from_secs(5),
        fsync: false,
    }
}

fn event(n: usize, failed: bool) -> DispatchEvent {
    DispatchEvent {
        kind: "chain".into(),
        event: if failed { "error" } else { "end" }.into(),
        run_id: format!("00000000-0000-4000-8000-00000000000{n}"),
        parent_run_id: Some("corr-1".into()),
        name: "shop.orders.events".into(),
        timestamp: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
        input: json!({"message_type": "order.placed"}),
        output: json!({"status": "success"}),
        user_id: Some("user-7".into()),
        tokens_usage: Some(json!({"prompt": 10, "completion": 5})),
        metadata: json!({"duration_ms": 250.0, "error_message": null}),
        tags: vec!["event".into(), "success".into()],
        log_id: format!("log-{n}"),
    }
}

#[tokio::test]
async fn the_http_sink_posts_a_json_array_with_its_headers_and_classifies_answers() {
    let service = Service::default();
    let (url, server) = service.start().await;
    let sink = build(&config("http", format!("{url}/hooks/events"))).unwrap();
    sink.send_events(&[event(1, false), event(2, false)])
        .await
        .unwrap();
    let (path, headers, body) = service.requests.lock().unwrap()[0].clone();
    assert_eq!(path, "/hooks/events");
    assert_eq!(headers["x-tenant"], "acme");
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert_eq!(body[0]["runId"], "00000000-0000-4000-8000-000000000001");

    service.answer(503, vec![], json!({}));
    let error = sink
        .send_events(&[event(1, false)])
        .await
        .unwrap_err()
        .error;
    assert_eq!((error.retry, error.status), (Retry::Transient, Some(503)));
    service.answer(429, vec![("retry-after", "7".into())], json!({}));
    let error = sink
        .send_events(&[event(1, false)])
        .await
        .unwrap_err()
        .error;
    assert_eq!(
        (error.retry, error.retry_after),
        (Retry::Transient, Some(Duration::from_secs(7)))
    );
    service.answer(400, vec![], json!({"error": "bad"}));
    let error = sink
        .send_events(&[event(1, false)])
        .await
        .unwrap_err()
        .error;
    assert_eq!(error.retry, Retry::Permanent);
    server.abort();

    // No answer at all is transient.
    let error = sink
        .send_events(&[event(1, false)])
        .await
        .unwrap_err()
        .error;
    assert_eq!(error.retry, Retry::Transient);
}

#[tokio::test]
async fn the_lunary_sink_sends_start_and_end_of_each_run_and_refuses_per_run() {
    let service = Service::default();
    let (url, server) = service.start().await;
    let sink = build(&config("lunary", url)).unwrap();
    service.answer(
        200,
        vec![],
        json!({"results": [
            {"id": "00000000-0000-4000-8000-000000000001", "success": true},
            {"id": "00000000-0000-4000-8000-000000000002", "success": false, "error": "invalid input"},
        ]}),
    );
    let delivery = sink
        .send_events(&[event(1, false), event(2, true)])
        .await
        .unwrap();
    assert_eq!(delivery.refused.len(), 1);
    assert_eq!(delivery.refused[0].0, 1);

    let (path, headers, body) = service.requests.lock().unwrap()[0].clone();
    assert_eq!(path, "/v1/runs/ingest");
    assert_eq!(headers["authorization"], "Bearer key-123");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 4, "a start and an end per run");
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["runId"], "00000000-0000-4000-8000-000000000001");
    assert_eq!(events[0]["parentRunId"], "corr-1");
    assert_eq!(events[0]["userId"], "user-7");
    assert_eq!(
        events[0]["timestamp"], "2023-11-14T22:13:20.000Z",
        "start = end − duration"
    );
    assert_eq!(events[1]["event"], "end");
    assert_eq!(events[1]["tokensUsage"]["completion"], 5);
    assert_eq!(events[3]["event"], "error");

    // A run Lunary already has (an earlier attempt got through) is not refused.
    service.answer(200, vec![], json!({"results": [{"id": "00000000-0000-4000-8000-000000000001", "success": false, "error": "Run with this ID already exists in the database."}]}));
    assert!(
        sink.send_events(&[event(1, false)])
            .await
            .unwrap()
            .refused
            .is_empty()
    );
    server.abort();
}

#[tokio::test]
async fn lunary_and_helicone_endpoints_may_be_the_full_urls_llm_proxy_configs_hold() {
    let service = Service::default();
    let (url, server) = service.start().await;
    for (service_name, full) in [
        ("lunary", format!("{url}/v1/runs/ingest")),
        ("helicone", format!("{url}/custom/v1/log/")),
    ] {
        service.answer(200, vec![], json!({}));
        let sink = build(&config(service_name, full)).unwrap();
        sink.send_events(&[event(1, false)]).await.unwrap();
    }
    let paths: Vec<String> = service
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(path, _, _)| path.clone())
        .collect();
    assert_eq!(paths, ["/v1/runs/ingest", "/custom/v1/log"]);
    server.abort();
}

#[tokio::test]
async fn the_helicone_sink_logs_each_event_and_reports_how_far_it_got() {
    let service = Service::default();
    let (url, server) = service.start().await;
    let sink = build(&config("helicone", url)).unwrap();
    service.answer(200, vec![], json!({}));
    service.answer(500, vec![], json!({"error": "overloaded"}));
    let error = sink
        .send_events(&[event(1, false), event(2, false), event(3, false)])
        .await
        .unwrap_err();
    assert_eq!(
        error.accepted, 1,
        "the first went through and must not be sent again"
    );
    assert_eq!(error.error.retry, Retry::Transient);

    let requests = service.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let (path, headers, body) = &requests[0];
    assert_eq!(path, "/custom/v1/log");
    assert_eq!(headers["authorization"], "Bearer key-123");
    assert_eq!(body["providerRequest"]["url"], "custom-model-nopath");
    assert_eq!(body["providerRequest"]["json"]["_type"], "data");
    assert_eq!(
        body["providerRequest"]["meta"]["run_id"],
        "00000000-0000-4000-8000-000000000001"
    );
    assert_eq!(body["providerResponse"]["status"], 200);
    assert_eq!(body["providerResponse"]["json"]["usage"]["prompt"], 10);
    assert_eq!(
        body["timing"]["endTime"],
        json!({"seconds": 1_700_000_000u64, "milliseconds": 250})
    );
    assert_eq!(
        body["timing"]["startTime"],
        json!({"seconds": 1_700_000_000u64, "milliseconds": 0})
    );
    server.abort();
}

#[tokio::test]
async fn plugins_refuse_configurations_they_cannot_work_with() {
    let mut lunary = config("lunary", "http://127.0.0.1:1".into());
    lunary.api_key = None;
    assert!(build(&lunary).err().unwrap().contains("needs an api key"));
    let mut file = config("file", String::new());
    file.endpoint = None;
    assert!(build(&file).err().unwrap().contains("needs an endpoint"));
    let mut unknown = config("file", "x".into());
    unknown.service = "kafka".into();
    assert!(
        build(&unknown)
            .err()
            .unwrap()
            .contains("unknown sink service `kafka`")
    );
}

#[tokio::test]
async fn a_service_that_hangs_is_a_transient_failure_after_the_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config = config("http", url);
    config.timeout = Duration::from_millis(200);
    let sink = build(&config).unwrap();
    let error = sink
        .send_events(&[event(1, false)])
        .await
        .unwrap_err()
        .error;
    assert_eq!((error.retry, error.status), (Retry::Transient, None));
    assert!(error.message.starts_with("no answer"), "{}", error.message);
    holder.abort();
}
