use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use dispatchd::resilience::RetryPolicy;
use dispatchd::sinks::{
    Delivery, DispatchEvent, DriverConfig, EventInput, EventMetadata, EventOutput, FullPolicy,
    Outcome, Retry, Sink, SinkConfig, SinkDriver, SinkHandle, SinkObserver, build,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::{TestApp, wait_for};

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

/// A Lunary project key has the form of a UUID; Lunary answers 401 to anything else.
const LUNARY_KEY: &str = "6d4b1a52-9c3e-4f7a-8b21-0c5d9e8f7a61";

fn config(service: &str, endpoint: String) -> SinkConfig {
    SinkConfig {
        name: service.to_owned(),
        service: service.to_owned(),
        endpoint: Some(endpoint),
        api_key: Some(
            if service == "lunary" {
                LUNARY_KEY
            } else {
                "key-123"
            }
            .to_owned(),
        ),
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
        input: EventInput {
            message_type: "order.placed".into(),
            ..EventInput::default()
        },
        output: EventOutput {
            status: "success".into(),
            ..EventOutput::default()
        },
        user_id: Some("user-7".into()),
        tokens_usage: Some(json!({"prompt": 10, "completion": 5})),
        metadata: EventMetadata {
            duration_ms: 250.0,
            category: "event".into(),
            status: if failed {
                "dispatcher_error"
            } else {
                "success"
            }
            .into(),
            ..EventMetadata::default()
        },
        tags: vec!["event".into(), "success".into()],
        log_id: format!("00000000-0000-4000-9000-00000000000{n}"),
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
    assert_eq!(headers["authorization"], format!("Bearer {LUNARY_KEY}"));
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 4, "a start and an end per run");
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["runId"], "00000000-0000-4000-8000-000000000001");
    assert_eq!(events[0].get("parentRunId"), None);
    assert_eq!(events[0]["metadata"]["correlation_id"], "corr-1");
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
        body["providerRequest"]["meta"],
        json!({
            "Helicone-Request-Id": "00000000-0000-4000-9000-000000000001",
            "Helicone-User-Id": "user-7",
            "Helicone-Property-Category": "event",
            "Helicone-Property-Status": "success",
            "Helicone-Property-Correlation-Id": "corr-1",
            "Helicone-Property-Tags": "event,success",
        })
    );
    assert_eq!(body["providerResponse"]["status"], 200);
    assert_eq!(
        body["providerResponse"]["json"]["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 5})
    );
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
    // What `dispatchd sink --service lunary --api-key K` gets for a key Lunary would refuse,
    // without the key in the message.
    lunary.api_key = Some("pk-s3cr3t".into());
    let error = build(&lunary).err().unwrap();
    assert!(
        error.contains("sink `lunary`: the lunary api key is not a UUID"),
        "{error}"
    );
    assert!(!error.contains("s3cr3t"), "{error}");
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

/// Counts `sink_events_total` by outcome, as the metrics do.
#[derive(Default)]
struct Counts(Mutex<BTreeMap<&'static str, u64>>);

impl SinkObserver for Counts {
    fn events(&self, _: &str, outcome: Outcome, count: u64) {
        *self.0.lock().unwrap().entry(outcome.as_str()).or_default() += count;
    }
    fn batch(&self, _: &str, _: usize) {}
    fn request(&self, _: &str, _: &str, _: Duration) {}
    fn queue_depth(&self, _: &str, _: usize) {}
}

impl Counts {
    fn get(&self, outcome: &str) -> u64 {
        self.0.lock().unwrap().get(outcome).copied().unwrap_or(0)
    }
}

/// A sink plugin behind the real driver, with quick retries and a dead-letter file.
struct Driven {
    handle: SinkHandle,
    counts: Arc<Counts>,
    tracker: TaskTracker,
    stop: CancellationToken,
    dead_letters: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Driven {
    fn start(sink: Box<dyn Sink>, batch_size: usize, attempts: u32) -> Driven {
        let dir = tempfile::tempdir().unwrap();
        let dead_letters = dir.path().join("dead.jsonl");
        let counts = Arc::new(Counts::default());
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let config = DriverConfig {
            batch_size,
            flush_interval: Duration::from_secs(60),
            buffer: 100,
            full: FullPolicy::Block,
            retry: RetryPolicy {
                attempts,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            shutdown_deadline: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            dead_letter: dead_letters.clone(),
        };
        let handle = SinkDriver::spawn(sink, config, Some(counts.clone()), &tracker, stop.clone());
        Driven {
            handle,
            counts,
            tracker,
            stop,
            dead_letters,
            _dir: dir,
        }
    }

    /// Waits until `n` events are settled (sent or dead-lettered), then stops the driver.
    async fn settle(&self, n: u64) {
        let counts = self.counts.clone();
        wait_for("the events to be settled", || {
            counts.get("sent") + counts.get("dead_lettered") >= n
        })
        .await;
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        assert_eq!(self.counts.get("received"), n);
    }

    /// `(runId, reason, last_error)` of each dead letter.
    fn dead_letters(&self) -> Vec<(String, String, String)> {
        std::fs::read_to_string(&self.dead_letters)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let letter: Value = serde_json::from_str(line).unwrap();
                let text = |field: &str| letter[field].as_str().unwrap().to_owned();
                (
                    letter["event"]["runId"].as_str().unwrap().to_owned(),
                    text("reason"),
                    text("last_error"),
                )
            })
            .collect()
    }
}

/// Lunary's body limit: koa-bodyparser's `jsonLimit: "20mb"` (lunary-ai/lunary
/// `packages/backend/src/index.ts`) is 20 MiB; a longer body is answered 413.
const LUNARY_LIMIT: usize = 20 * 1024 * 1024;

/// A loopback Lunary that holds clients to what its API does (lunary-ai/lunary
/// `packages/backend`): a key that is not a UUID is 401 (`api/v1/auth/utils.ts`); past
/// `max_requests`, 429 with `Retry-After` (koa-ratelimit, `utils/ratelimit.ts`: 150 a minute),
/// a request before that wait is over is refused again and counted as `early`, and after it a
/// new window starts; a body
/// over 20 MiB is 413; then `api/v1/runs/ingest.ts`: a start's `parentRunId` must be a run it
/// has (else it sleeps 5 s and drops it: recorded here as `unknown_parents`), a second start of a
/// run is "already exists", and an end's usage is read from `tokensUsage.prompt` and
/// `.completion` only.
#[derive(Clone)]
struct Lunary {
    state: Arc<Mutex<LunaryState>>,
    max_requests: usize,
    retry_after: Duration,
}

#[derive(Default)]
struct LunaryState {
    /// Each run's start metadata, by run id.
    runs: BTreeMap<String, Value>,
    /// Every start taken, in order (a run twice would show twice).
    starts: Vec<String>,
    unknown_parents: Vec<String>,
    /// `tokensUsage.prompt` and `.completion` of each end, as Lunary reads them.
    usage: BTreeMap<String, (Option<f64>, Option<f64>)>,
    largest_body: usize,
    too_large: usize,
    limited: usize,
    early: usize,
    in_window: usize,
    blocked_until: Option<tokio::time::Instant>,
}

async fn lunary_ingest(State(lunary): State<Lunary>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // zod's `uuid()`: the hyphenated form.
    if key.len() != 36 || uuid::Uuid::try_parse(key).is_err() {
        let answer = json!({"message": "Invalid access token"});
        return (StatusCode::UNAUTHORIZED, axum::Json(answer)).into_response();
    }
    let mut state = lunary.state.lock().unwrap();
    let now = tokio::time::Instant::now();
    if let Some(until) = state.blocked_until {
        if now < until {
            state.early += 1;
            state.limited += 1;
            return too_many(until - now);
        }
        state.blocked_until = None;
        state.in_window = 0;
    }
    state.in_window += 1;
    if state.in_window > lunary.max_requests {
        // The window ends when the wait it asks for does, however fast requests came: the
        // test does not depend on the machine's speed.
        state.blocked_until = Some(now + lunary.retry_after);
        state.limited += 1;
        return too_many(lunary.retry_after);
    }
    state.largest_body = state.largest_body.max(body.len());
    if body.len() > LUNARY_LIMIT {
        state.too_large += 1;
        let answer = json!({"message": "request entity too large"});
        return (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(answer)).into_response();
    }
    let body: Value = serde_json::from_slice(&body).unwrap();
    let mut events = body["events"].as_array().cloned().unwrap_or_default();
    events.sort_by_key(|e| e["timestamp"].as_str().unwrap_or_default().to_owned());
    let mut results = Vec::new();
    for event in events {
        let run = event["runId"].as_str().unwrap().to_owned();
        let mut result = json!({"id": run, "success": true});
        match event["event"].as_str().unwrap() {
            "start" => {
                if let Some(parent) = event["parentRunId"].as_str() {
                    if !state.runs.contains_key(parent) {
                        state.unknown_parents.push(parent.to_owned());
                    }
                }
                if state.runs.contains_key(&run) {
                    result = json!({"id": run, "success": false,
                        "error": "Run with this ID already exists in the database."});
                } else {
                    state.runs.insert(run.clone(), event["metadata"].clone());
                    state.starts.push(run);
                }
            }
            _ => {
                let read = |field: &str| event["tokensUsage"][field].as_f64();
                let usage = (read("prompt"), read("completion"));
                state.usage.insert(run, usage);
            }
        }
        results.push(result);
    }
    axum::Json(json!({ "results": results })).into_response()
}

/// koa-ratelimit's answer: 429, `Retry-After` in seconds (rounded up here, so a client that
/// honours it is never early) and its `Rate-Limit-*` headers.
fn too_many(wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        "Sometimes You Just Have to Slow Down.",
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert("retry-after", seconds.into());
    headers.insert("rate-limit-remaining", 0.into());
    response
}

impl Lunary {
    /// Takes `max_requests`, then asks for a wait of a second.
    fn new(max_requests: usize) -> Lunary {
        Lunary {
            state: Arc::default(),
            max_requests,
            retry_after: Duration::from_secs(1),
        }
    }

    async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/v1/runs/ingest", post(lunary_ingest))
            .layer(DefaultBodyLimit::max(4 * LUNARY_LIMIT))
            .with_state(self.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        (format!("http://{addr}"), task)
    }
}

#[tokio::test]
async fn lunary_gets_no_correlation_id_as_a_parent_run_and_the_token_usage_it_reads() {
    let lunary = Lunary::new(150);
    let (url, server) = lunary.start().await;
    let sink = build(&config("lunary", url)).unwrap();
    let mut openai = event(1, false);
    openai.tokens_usage =
        Some(json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}));
    let mut anthropic = event(2, false);
    anthropic.tokens_usage = Some(json!({"input_tokens": 7, "output_tokens": 3}));
    let mut without = event(3, true);
    without.tokens_usage = None;
    let delivery = sink
        .send_events(&[openai, anthropic, without])
        .await
        .unwrap();
    assert_eq!(delivery, Delivery::default());

    let state = lunary.state.lock().unwrap();
    assert_eq!(
        state.unknown_parents,
        Vec::<String>::new(),
        "a correlation id is no run: Lunary would wait 5 s for each and drop it"
    );
    let run = |n: usize| format!("00000000-0000-4000-8000-00000000000{n}");
    assert_eq!(state.starts, [run(1), run(2), run(3)]);
    assert_eq!(state.runs[&run(1)]["correlation_id"], "corr-1");
    assert_eq!(state.usage[&run(1)], (Some(10.0), Some(5.0)));
    assert_eq!(state.usage[&run(2)], (Some(7.0), Some(3.0)));
    assert_eq!(state.usage[&run(3)], (None, None));
    drop(state);
    server.abort();
}

/// An event whose payload is `bytes` long.
fn large_event(n: usize, bytes: usize) -> DispatchEvent {
    let mut event = event(n, false);
    event.input = EventInput {
        message_type: "document.indexed".into(),
        payload: json!({"text": "x".repeat(bytes)}),
        ..EventInput::default()
    };
    event
}

/// One batch of 42 MB (three 7 MB dispatches and a 21 MB one) against a Lunary that takes
/// 20 MiB a request and then asks for a second's wait: the batch goes in requests under the limit, the
/// one Lunary rate-limits waits out `Retry-After` and goes again without repeating what was
/// taken, and the dispatch too large for any request is dead-lettered as `permanent` with why.
/// (Sent whole, as before, the batch was answered 413 and all of it dead-lettered.)
#[tokio::test]
async fn lunary_batches_stay_under_its_body_limit_and_wait_out_its_rate_limit() {
    let lunary = Lunary::new(1);
    let (url, server) = lunary.start().await;
    let driven = Driven::start(build(&config("lunary", url)).unwrap(), 4, 3);
    for n in 0..3 {
        driven.handle.offer(large_event(n, 7_000_000)).await;
    }
    driven.handle.offer(large_event(3, 21_000_000)).await;
    driven.settle(4).await;

    assert_eq!(
        (
            driven.counts.get("sent"),
            driven.counts.get("dead_lettered")
        ),
        (3, 1)
    );
    assert!(driven.counts.get("retried") >= 1, "the 429 was retried");
    let state = lunary.state.lock().unwrap();
    assert_eq!(state.too_large, 0, "no request over 20 MiB");
    assert!(state.largest_body <= LUNARY_LIMIT);
    assert!(state.limited >= 1, "the rate limit was met");
    assert_eq!(state.early, 0, "nothing came back before Retry-After");
    let run = |n: usize| format!("00000000-0000-4000-8000-00000000000{n}");
    assert_eq!(state.starts, [run(0), run(1), run(2)], "each once");
    drop(state);
    let letters = driven.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].0.as_str(), letters[0].1.as_str()),
        (run(3).as_str(), "permanent")
    );
    assert!(letters[0].2.contains("413"), "{letters:?}");
    server.abort();
}

/// A loopback Helicone worker holding clients to `POST /custom/v1/log` as Helicone/helicone
/// `worker/src/api/helpers/logAsync.ts` answers it: `providerRequest.meta` is read as headers
/// (`new Headers(meta)`, case-insensitive; only `Helicone-*` mean anything,
/// `worker/src/lib/HeliconeHeaders.ts`); a log it cannot store is answered **200 with
/// `{"error": …}`**; a `Helicone-Request-Id` it already has fails the insert with a duplicate key,
/// also 200 with an error; a log longer than 10 MiB is 400; a stored log is 200 `ok`.
#[derive(Clone, Default)]
struct Helicone {
    state: Arc<Mutex<HeliconeState>>,
}

#[derive(Default)]
struct HeliconeState {
    /// The `helicone-*` headers of each stored log, by request id.
    stored: BTreeMap<String, BTreeMap<String, String>>,
    /// How many more times a request id fails to be stored.
    failing: BTreeMap<String, usize>,
    too_large: usize,
}

async fn helicone_log(State(helicone): State<Helicone>, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    // `JSON.stringify(asyncLogModel).length`: UTF-16 code units.
    if body.to_string().encode_utf16().count() > 10 * 1024 * 1024 {
        helicone.state.lock().unwrap().too_large += 1;
        return (StatusCode::BAD_REQUEST, "Payload too large").into_response();
    }
    let headers: BTreeMap<String, String> = body["providerRequest"]["meta"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| (name.to_lowercase(), value.as_str().unwrap().to_owned()))
        .filter(|(name, _)| name.starts_with("helicone-"))
        .collect();
    let id = headers
        .get("helicone-request-id")
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut state = helicone.state.lock().unwrap();
    if let Some(left) = state.failing.get_mut(&id).filter(|left| **left > 0) {
        *left -= 1;
        return axum::Json(json!({"error": "Rate limited"})).into_response();
    }
    if state.stored.contains_key(&id) {
        let error = json!({"requestError": {"code": "23505",
            "message": "duplicate key value violates unique constraint \"request_pkey\""}});
        return axum::Json(json!({"error": error.to_string()})).into_response();
    }
    state.stored.insert(id.clone(), headers);
    ([("helicone-id", id)], "ok").into_response()
}

impl Helicone {
    async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/custom/v1/log", post(helicone_log))
            .layer(DefaultBodyLimit::max(4 * LUNARY_LIMIT))
            .with_state(self.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        (format!("http://{addr}"), task)
    }
}

/// Helicone's 200 `{"error": …}` is a failure: the first event is stored on its retry, the
/// second never is and ends dead-lettered; `sent` counts only what Helicone stored. The stored
/// log carries its `Helicone-*` headers, and a resend of it (a duplicate request id) is a
/// delivery, not a failure.
#[tokio::test]
async fn helicone_200_with_an_error_is_retried_then_dead_lettered_and_never_counted_sent() {
    let helicone = Helicone::default();
    let (url, server) = helicone.start().await;
    let (first, second) = (event(1, false), event(2, false));
    helicone.state.lock().unwrap().failing.extend([
        (first.log_id.clone(), 1),
        (second.log_id.clone(), usize::MAX),
    ]);
    let driven = Driven::start(build(&config("helicone", url.clone())).unwrap(), 2, 2);
    driven.handle.offer(first.clone()).await;
    driven.handle.offer(second.clone()).await;
    driven.settle(2).await;

    assert_eq!(
        (
            driven.counts.get("sent"),
            driven.counts.get("dead_lettered")
        ),
        (1, 1)
    );
    assert!(
        driven.counts.get("retried") >= 2,
        "each failure was retried"
    );
    let letters = driven.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, second.run_id);
    assert_eq!(letters[0].1, "retries_exhausted");
    assert!(letters[0].2.contains("Rate limited"), "{letters:?}");
    {
        let state = helicone.state.lock().unwrap();
        let stored: Vec<&String> = state.stored.keys().collect();
        assert_eq!(stored, [&first.log_id]);
        let headers = &state.stored[&first.log_id];
        assert_eq!(headers["helicone-request-id"], first.log_id);
        assert_eq!(headers["helicone-user-id"], "user-7");
        assert_eq!(headers["helicone-property-category"], "event");
        assert_eq!(headers["helicone-property-status"], "success");
        assert_eq!(headers["helicone-property-correlation-id"], "corr-1");
    }

    let sink = build(&config("helicone", url)).unwrap();
    sink.send_events(&[first]).await.unwrap();
    assert_eq!(helicone.state.lock().unwrap().stored.len(), 1);
    server.abort();
}

/// A log Helicone would refuse as too large (400) is not sent: it is dead-lettered as
/// `permanent` with why, and the event after it in the batch is still delivered. (Sent, the 400
/// dead-lettered it and every event after it.)
#[tokio::test]
async fn a_log_too_large_for_helicone_is_dead_lettered_alone() {
    let helicone = Helicone::default();
    let (url, server) = helicone.start().await;
    let driven = Driven::start(build(&config("helicone", url)).unwrap(), 2, 2);
    driven.handle.offer(large_event(1, 11_000_000)).await;
    let after = event(2, false);
    driven.handle.offer(after.clone()).await;
    driven.settle(2).await;

    assert_eq!(
        (
            driven.counts.get("sent"),
            driven.counts.get("dead_lettered")
        ),
        (1, 1)
    );
    let letters = driven.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, "00000000-0000-4000-8000-000000000001");
    assert_eq!(letters[0].1, "permanent");
    assert!(letters[0].2.contains("400"), "{letters:?}");
    let state = helicone.state.lock().unwrap();
    assert_eq!(state.too_large, 0, "never sent");
    assert_eq!(state.stored.keys().collect::<Vec<_>>(), [&after.log_id]);
    drop(state);
    server.abort();
}
