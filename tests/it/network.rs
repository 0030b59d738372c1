//! The network dispatchers (`http`, `redis_stream`, `nats`) configured in TOML, against real
//! receivers: a loopback HTTP server that answers 200, 429, 500, slowly or not at all, the
//! machine's Redis and NATS, and our own `redis-server` and `nats-server` to kill mid-run.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use dispatchd::config::Config;
use dispatchd::dispatchers::{HttpDispatcher, HttpTarget, http_client};
use dispatchd::engine::{Category, Envelope, ErrorKind, Handler, Message};
use serde_json::{Value, json};

use crate::redis::{OwnRedis, free_port, own_redis, redis_url, unique};
use crate::support::{TestApp, required_tool, sample, wait_for_async};

/// What the loopback receiver answers to the next request.
#[derive(Clone)]
pub(crate) enum Reply {
    /// Status, extra headers, a JSON body.
    Answer(u16, Vec<(&'static str, String)>, Value),
    /// Takes longer than any dispatcher timeout of these tests.
    Slow,
}

/// One request the receiver got (recorded before it answers).
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
    peer: SocketAddr,
}

/// A loopback HTTP service playing the other side: answers from a script, then 200 `{}`.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    receiver.seen.lock().unwrap().push(Seen {
        method,
        path: uri.path().to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        peer,
    });
    let reply = receiver.script.lock().unwrap().pop_front();
    match reply {
        None => axum::Json(json!({})).into_response(),
        Some(Reply::Answer(status, headers, body)) => {
            let mut response = (
                axum::http::StatusCode::from_u16(status).unwrap(),
                axum::Json(body),
            )
                .into_response();
            for (name, value) in headers {
                response.headers_mut().insert(name, value.parse().unwrap());
            }
            response
        }
        Some(Reply::Slow) => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            axum::Json(json!({})).into_response()
        }
    }
}

impl Receiver {
    /// Serves on a free loopback port; the base URL and the server task (abort it to stop).
    pub(crate) async fn start(&self) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = axum::Router::new()
            .fallback(receive)
            .with_state(self.clone());
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        (url, server)
    }

    pub(crate) fn reply(&self, reply: Reply) {
        self.script.lock().unwrap().push_back(reply);
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// dispatchd with the dispatchers and routes of `toml` (read as a config file would be, with
/// `env` as the environment) in place of the defaults.
pub(crate) async fn app(toml: &str, env: &[(&str, &str)]) -> TestApp {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let loaded = Config::from_text(Path::new("test.toml"), toml, |name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    TestApp::start_with(
        move |config| {
            config.dispatchers = loaded.dispatchers;
            config.routes = loaded.routes;
        },
        |builder| builder,
    )
    .await
}

/// One dispatcher named `d` of `kind` and `fields`, reached by every event of `shop.*.events`.
fn one(kind: &str, fields: &str) -> String {
    format!(
        r#"[[dispatchers]]
dispatcher_id = "d"
kind = "{kind}"
category = "event"
{fields}

[[routes]]
route_id = "r"
topic_pattern = "shop.*.events"
message_category = "event"
dispatcher_id = "d"
"#
    )
}

pub(crate) async fn post(app: &TestApp, topic: &str, body: Value) -> (u16, Value) {
    let response = app.post_message(topic, body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn an_http_dispatcher_sends_the_documented_body_and_publishes_the_outputs_it_answers() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let config = format!(
        r#"[[dispatchers]]
dispatcher_id = "billing-hook"
kind = "http"
category = "evt"
url = "{url}/hooks/orders"
headers = {{ X-Team = "payments" }}
headers_env = {{ Authorization = "TEST_BILLING_TOKEN" }}

[[routes]]
route_id = "orders"
topic_pattern = "onex.evt.shop.**"
message_category = "event"
dispatcher_id = "billing-hook"
"#
    );
    let app = app(&config, &[("TEST_BILLING_TOKEN", "Bearer s3cret-token")]).await;
    receiver.reply(Reply::Answer(
        200,
        vec![],
        json!({"outputs": [{"topic": "onex.evt.shop.invoice-created.v1",
                            "envelope": {"message_type": "invoice.created", "payload": {"invoice": 9}}}]}),
    ));
    let (status, result) = post(
        &app,
        "onex.evt.shop.order-placed.v1",
        json!({"message_type": "order.placed", "message_id": "m-1",
               "correlation_id": "order-17", "payload": {"total": 42}}),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["status"], "success");
    assert_eq!(result["message_category"], "event", "evt names events");
    assert_eq!(result["output_count"], 1);
    assert_eq!(
        result["outputs"][0]["topic"],
        "onex.evt.shop.invoice-created.v1"
    );
    assert_eq!(
        result["outputs"][0]["envelope"]["correlation_id"],
        "order-17"
    );

    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.path, "/hooks/orders");
    assert_eq!(request.headers["x-team"], "payments");
    assert_eq!(request.headers["authorization"], "Bearer s3cret-token");
    assert_eq!(request.headers["content-type"], "application/json");
    assert_eq!(request.headers["idempotency-key"], "m-1");
    let body = &request.body;
    assert_eq!(body["topic"], "onex.evt.shop.order-placed.v1");
    assert_eq!(body["category"], "event");
    assert_eq!(body["dispatch_id"], result["dispatch_id"]);
    assert_eq!(body["correlation_id"], "order-17");
    assert_eq!(body["envelope"]["message_id"], "m-1");
    assert_eq!(body["envelope"]["message_type"], "order.placed");
    assert_eq!(body["envelope"]["payload"], json!({"total": 42}));

    // Measured like any dispatcher.
    let metrics = app.scrape().await;
    assert_eq!(
        sample(
            &metrics,
            r#"dispatcher_executions_total{dispatcher_id="billing-hook",result="success"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    // The secret never shows in the configuration dispatchd reports or in its results.
    assert!(!result.to_string().contains("s3cret"));
    app.stop().await.unwrap();
    server.abort();
}

#[tokio::test]
async fn http_answers_are_classified_transient_or_permanent_and_retried_accordingly() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let config = one(
        "http",
        &format!(
            r#"url = "{url}/in"
timeout = "300ms"
retry = {{ attempts = 2, initial_backoff = "10ms", max_backoff = "50ms" }}"#
        ),
    );
    let app = app(&config, &[]).await;
    let message = || json!({"message_type": "order.placed", "payload": {}});

    // 429, 500 and 408 are transient: retried, and the third try succeeds.
    receiver.reply(Reply::Answer(
        429,
        vec![("retry-after", "0".into())],
        json!({}),
    ));
    receiver.reply(Reply::Answer(500, vec![], json!({"error": "boom"})));
    let (status, result) = post(&app, "shop.orders.events", message()).await;
    assert_eq!(
        (status, &result["status"]),
        (200, &json!("success")),
        "{result}"
    );
    assert_eq!(result["dispatchers"][0]["attempts"], 3);
    receiver.reply(Reply::Answer(408, vec![], json!({})));
    let (_, result) = post(&app, "shop.orders.events", message()).await;
    assert_eq!(result["dispatchers"][0]["attempts"], 2, "{result}");

    // Other 4xx are permanent: one try, whatever the retry policy allows.
    let before = receiver.seen().len();
    receiver.reply(Reply::Answer(
        422,
        vec![],
        json!({"error": "unknown order"}),
    ));
    let (status, result) = post(&app, "shop.orders.events", message()).await;
    assert_eq!(status, 502, "{result}");
    assert_eq!(result["status"], "dispatcher_error");
    assert_eq!(result["dispatchers"][0]["attempts"], 1);
    assert!(
        result["error_message"]
            .as_str()
            .unwrap()
            .contains("422 Unprocessable Entity"),
        "{result}"
    );
    assert_eq!(receiver.seen().len(), before + 1);

    // A receiver slower than the timeout: each try is cut at 300 ms and the dispatch times out.
    for _ in 0..3 {
        receiver.reply(Reply::Slow);
    }
    let started = Instant::now();
    let (status, result) = post(&app, "shop.orders.events", message()).await;
    assert_eq!(status, 504, "{result}");
    assert_eq!(result["status"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(10), "does not hang");

    // Every message of these went over one or two pooled connections, not one each.
    let peers: BTreeSet<SocketAddr> = receiver.seen().iter().map(|s| s.peer).collect();
    let requests = receiver.seen().len();
    assert!(requests >= 9, "{requests}");
    // The slow requests' connections were dropped with their calls; the others were reused.
    assert!(
        peers.len() <= 5,
        "{} connections for {requests} requests",
        peers.len()
    );
    app.stop().await.unwrap();
    server.abort();
}

/// The handler itself, outside the engine: the error it returns for each kind of answer.
#[tokio::test]
async fn retry_after_and_dropped_connections_reach_the_engine_as_transient_errors() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let dispatcher = HttpDispatcher::new(
        http_client().unwrap(),
        HttpTarget::post(format!("{url}/in").parse().unwrap()),
    );
    let envelope = Envelope::new("t", json!({}));
    let message = Message::new("shop.orders.events", Category::Event, &envelope);

    receiver.reply(Reply::Answer(
        429,
        vec![("retry-after", "7".into())],
        json!({}),
    ));
    let error = dispatcher.handle(&message).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transient);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    receiver.reply(Reply::Answer(503, vec![], json!({})));
    assert_eq!(
        dispatcher.handle(&message).await.unwrap_err().kind(),
        ErrorKind::Transient
    );
    receiver.reply(Reply::Answer(401, vec![], json!({})));
    assert_eq!(
        dispatcher.handle(&message).await.unwrap_err().kind(),
        ErrorKind::Permanent
    );
    // 2xx with outputs that are not outputs: permanent (the message arrived).
    receiver.reply(Reply::Answer(
        200,
        vec![],
        json!({"outputs": [{"topic": 1}]}),
    ));
    assert_eq!(
        dispatcher.handle(&message).await.unwrap_err().kind(),
        ErrorKind::Permanent
    );
    server.abort();

    // A service that accepts the connection and drops it without an answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let dropper = tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            drop(socket);
        }
    });
    let dispatcher = HttpDispatcher::new(
        http_client().unwrap(),
        HttpTarget::post(format!("http://{address}/in").parse().unwrap()),
    );
    let error = dispatcher.handle(&message).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transient);
    assert!(error.message().contains("no answer from"), "{error}");
    dropper.abort();
    // Nobody listening at all: transient too.
    let error = dispatcher.handle(&message).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Transient, "{error}");
}

#[tokio::test]
async fn a_receiver_stopped_mid_run_had_received_every_message_answered_success() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let app = app(&one("http", &format!(r#"url = "{url}/in""#)), &[]).await;
    let mut succeeded = Vec::new();
    let mut server = Some(server);
    for n in 0..60 {
        if n == 30 {
            // Stops accepting and drops its connections.
            server.take().unwrap().abort();
        }
        let id = format!("m-{n}");
        let (_, result) = post(
            &app,
            "shop.orders.events",
            json!({"message_type": "t", "message_id": id, "payload": {}}),
        )
        .await;
        if result["status"] == "success" {
            succeeded.push(id);
        }
    }
    let received: BTreeSet<String> = receiver
        .seen()
        .iter()
        .map(|s| {
            s.body["envelope"]["message_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(succeeded.len() >= 30, "{succeeded:?}");
    assert!(succeeded.len() < 60, "the receiver was gone for the rest");
    for id in &succeeded {
        assert!(
            received.contains(id),
            "{id} answered success but never arrived"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_command_dispatcher_over_http_enforces_its_toml_policy() {
    let receiver = Receiver::default();
    let (url, server) = receiver.start().await;
    let config = format!(
        r#"[[dispatchers]]
dispatcher_id = "billing"
kind = "http"
category = "command"
url = "{url}/commands"

[dispatchers.policy]
name = "billing-rules"
default = "deny"

[[dispatchers.policy.rules]]
effect = "deny"
command_type = "refund"
params = {{ amount = {{ min = 500.01 }} }}

[[dispatchers.policy.rules]]
effect = "allow"
command_type = "refund"
params = {{ currency = ["EUR", "USD"] }}

[[routes]]
route_id = "billing"
topic_pattern = "shop.billing.commands"
message_category = "command"
dispatcher_id = "billing"
"#
    );
    let app = app(&config, &[]).await;
    let refund = |amount: u32, currency: &str| json!({"message_type": "refund", "payload": {"amount": amount, "currency": currency}});
    let (status, result) = post(&app, "shop.billing.commands", refund(20, "EUR")).await;
    assert_eq!(
        (status, &result["status"]),
        (200, &json!("success")),
        "{result}"
    );
    assert_eq!(receiver.seen().len(), 1);
    assert_eq!(receiver.seen()[0].body["category"], "command");
    assert_eq!(receiver.seen()[0].body["envelope"]["payload"]["amount"], 20);

    for denied in [
        refund(900, "EUR"),
        refund(20, "GBP"),
        json!({"message_type": "wipe", "payload": {}}),
    ] {
        let (status, result) = post(&app, "shop.billing.commands", denied).await;
        assert_eq!(
            (status, &result["status"]),
            (403, &json!("denied")),
            "{result}"
        );
        assert_eq!(result["dispatchers"][0]["result"], "denied", "{result}");
        assert_eq!(
            result["dispatchers"][0]["policy"], "billing-rules",
            "{result}"
        );
    }
    assert_eq!(
        receiver.seen().len(),
        1,
        "a denied command never reaches the target"
    );
    let metrics = app.scrape().await;
    assert_eq!(
        sample(
            &metrics,
            r#"dispatcher_adapter_invocations_total{adapter="http",command_type="refund"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"dispatcher_policy_denials_total{policy="billing-rules"}"#
        ),
        Some(3.0)
    );
    app.stop().await.unwrap();
    server.abort();
}

/// The entries of a stream, as the `data` JSON of each.
async fn stream_data(url: &str, stream: &str) -> Vec<Value> {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| serde_json::from_str(&entry.get::<String>("data").unwrap()).unwrap())
        .collect()
}

async fn delete_key(url: &str, key: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut connection)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_redis_stream_dispatcher_appends_each_message_for_consumers_elsewhere() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("dispatcher");
    let app = app(
        &one(
            "redis_stream",
            &format!("redis_url = \"{url}\"\nstream = \"{stream}\"\nmax_len = 1000"),
        ),
        &[],
    )
    .await;
    for n in 0..3 {
        let (status, result) = post(
            &app,
            "shop.orders.events",
            json!({"message_type": "order.placed", "correlation_id": "c", "payload": {"n": n}}),
        )
        .await;
        assert_eq!(status, 200, "{result}");
    }
    let entries = stream_data(&url, &stream).await;
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[2]["topic"], "shop.orders.events");
    assert_eq!(entries[2]["envelope"]["payload"]["n"], 2);
    assert_eq!(entries[2]["correlation_id"], "c");
    // What a dispatchd source reads: an output message.
    let _: dispatchd::engine::OutputMessage = serde_json::from_value(entries[0].clone()).unwrap();
    app.stop().await.unwrap();
    delete_key(&url, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_loses_nothing_answered_success_and_a_hung_one_is_a_bounded_error() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let stream = "orders";
    let app = app(
        &one(
            "redis_stream",
            &format!(
                "redis_url = \"{url}\"\nstream = \"{stream}\"\ncall_timeout = \"200ms\"\ntimeout = \"5s\""
            ),
        ),
        &[],
    )
    .await;
    let mut succeeded = Vec::new();
    let mut own = Some(own);
    let mut restarted = None;
    for n in 0..90 {
        if n == 40 {
            // Killed (SIGKILL) mid-run: what it acknowledged is in its append-only file.
            let (port, dir) = own.take().unwrap().kill();
            restarted = Some((port, dir));
        }
        if n == 50 {
            let (port, dir) = restarted.take().unwrap();
            own = Some(OwnRedis::start(port, dir));
            crate::redis::answers(&url).await;
        }
        let id = format!("m-{n}");
        let (_, result) = post(
            &app,
            "shop.orders.events",
            json!({"message_type": "t", "message_id": id, "payload": {}}),
        )
        .await;
        if result["status"] == "success" {
            succeeded.push(id);
        }
    }
    let stored: BTreeSet<String> = stream_data(&url, stream)
        .await
        .iter()
        .map(|e| e["envelope"]["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        succeeded.len() >= 60,
        "before the kill and after the restart: {succeeded:?}"
    );
    assert!(succeeded.len() < 90, "not while Redis was down");
    for id in &succeeded {
        assert!(
            stored.contains(id),
            "{id} answered success but is not in the stream"
        );
    }

    // A hung Redis (SIGSTOP): a transient error after call_timeout, not a hang.
    let own = own.unwrap();
    own.signal("STOP");
    let started = Instant::now();
    let (status, result) = post(
        &app,
        "shop.orders.events",
        json!({"message_type": "t", "payload": {}}),
    )
    .await;
    own.signal("CONT");
    assert_eq!(status, 502, "{result}");
    assert!(
        result["error_message"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{result}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "bounded");
    app.stop().await.unwrap();
}

/// The machine's NATS (with JetStream), or a visible skip; with `DISPATCHD_REQUIRE_TOOLS=1` (CI)
/// its absence fails.
async fn nats_url() -> Option<String> {
    let url =
        std::env::var("DISPATCHD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let connected = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url.as_str()))
        .await
        .is_ok_and(|c| c.is_ok());
    if !connected {
        assert!(
            std::env::var("DISPATCHD_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "NATS is required (DISPATCHD_REQUIRE_TOOLS=1) but {url} does not answer: install Debian's nats-server and run it with -js"
        );
        eprintln!("SKIPPED: no NATS at {url}");
        return None;
    }
    Some(url)
}

/// A subject and stream name no other test (or run) uses.
fn unique_subject(name: &str) -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (
        format!("dispatchd-test.{name}.{id}"),
        format!("DISPATCHD_TEST_{id}"),
    )
}

async fn create_stream(url: &str, name: &str, subject: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    jetstream
}

/// Every message of a stream: its `Nats-Msg-Id` and body.
async fn stream_messages(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<(String, Value)> {
    let mut stream = jetstream.get_stream(name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let id = message
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.to_string())
                .unwrap_or_default();
            messages.push((id, serde_json::from_slice(&message.payload).unwrap()));
        }
    }
    messages
}

#[tokio::test]
async fn a_nats_dispatcher_publishes_on_the_subject_and_jetstream_deduplicates() {
    use futures::StreamExt;
    let Some(url) = nats_url().await else { return };
    let (core_subject, _) = unique_subject("core");
    let (js_subject, stream_name) = unique_subject("js");
    let jetstream = create_stream(&url, &stream_name, &js_subject).await;
    let subscriber = async_nats::connect(url.as_str()).await.unwrap();
    let mut subscription = subscriber.subscribe(core_subject.clone()).await.unwrap();
    subscriber.flush().await.unwrap();
    let config = format!(
        r#"[[dispatchers]]
dispatcher_id = "core"
kind = "nats"
category = "event"
nats_url = "{url}"
subject = "{core_subject}"

[[dispatchers]]
dispatcher_id = "js"
kind = "nats"
category = "event"
nats_url = "{url}"
subject = "{js_subject}"
jetstream = true

[[routes]]
route_id = "core"
topic_pattern = "shop.orders.events"
message_category = "event"
dispatcher_id = "core"

[[routes]]
route_id = "js"
topic_pattern = "shop.payments.events"
message_category = "event"
dispatcher_id = "js"
"#
    );
    let app = app(&config, &[]).await;
    // The client connects in the background: the first message may find it still connecting.
    wait_for_async("the core dispatcher to publish", || async {
        post(
            &app,
            "shop.orders.events",
            json!({"message_type": "t", "message_id": "core-1", "payload": {"n": 1}}),
        )
        .await
        .1["status"]
            == "success"
    })
    .await;
    let received = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&received.payload).unwrap();
    assert_eq!(body["topic"], "shop.orders.events");
    assert_eq!(body["envelope"]["message_id"], "core-1");

    // The same message twice: both answered success, stored once (Nats-Msg-Id = message id).
    for _ in 0..2 {
        wait_for_async("the JetStream dispatcher to publish", || async {
            post(
                &app,
                "shop.payments.events",
                json!({"message_type": "paid", "message_id": "pay-1", "payload": {}}),
            )
            .await
            .1["status"]
                == "success"
        })
        .await;
    }
    let stored = stream_messages(&jetstream, &stream_name).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, "pay-1");
    assert_eq!(stored[0].1["envelope"]["message_type"], "paid");
    app.stop().await.unwrap();
    jetstream.delete_stream(&stream_name).await.unwrap();
}

/// A `nats-server` of our own with JetStream on a free port, its store in a directory that
/// outlives it, killed on drop.
struct OwnNats {
    child: Child,
}

impl OwnNats {
    fn start(port: u16, store: &Path) -> OwnNats {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        OwnNats { child }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn nats_answers(url: &str) -> async_nats::Client {
    wait_for_async("nats-server to answer", || async {
        async_nats::connect(url).await.is_ok()
    })
    .await;
    async_nats::connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_run_loses_nothing_acknowledged_by_jetstream() {
    if nats_url().await.is_none() || required_tool("nats-server").is_none() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let own = OwnNats::start(port, store.path());
    let jetstream = async_nats::jetstream::new(nats_answers(&url).await);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let app = app(
        &one(
            "nats",
            &format!("nats_url = \"{url}\"\nsubject = \"orders\"\njetstream = true\ncall_timeout = \"500ms\""),
        ),
        &[],
    )
    .await;
    wait_for_async("the dispatcher to connect", || async {
        post(
            &app,
            "shop.orders.events",
            json!({"message_type": "t", "message_id": "warm-up", "payload": {}}),
        )
        .await
        .1["status"]
            == "success"
    })
    .await;
    let mut succeeded = vec!["warm-up".to_owned()];
    let mut own = Some(own);
    for n in 0..90 {
        if n == 40 {
            own.take().unwrap().kill();
        }
        if n == 50 {
            own = Some(OwnNats::start(port, store.path()));
            nats_answers(&url).await;
        }
        let id = format!("m-{n}");
        let (_, result) = post(
            &app,
            "shop.orders.events",
            json!({"message_type": "t", "message_id": id, "payload": {}}),
        )
        .await;
        if result["status"] == "success" {
            succeeded.push(id);
        }
    }
    assert!(succeeded.len() >= 41, "{succeeded:?}");
    assert!(succeeded.len() < 91, "not while NATS was down");
    // It reconnects by itself and publishes again.
    wait_for_async("the dispatcher to reconnect", || async {
        post(
            &app,
            "shop.orders.events",
            json!({"message_type": "t", "message_id": "after", "payload": {}}),
        )
        .await
        .1["status"]
            == "success"
    })
    .await;
    succeeded.push("after".to_owned());
    let jetstream = async_nats::jetstream::new(nats_answers(&url).await);
    let stored: BTreeSet<String> = stream_messages(&jetstream, "ORDERS")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in &succeeded {
        assert!(
            stored.contains(id),
            "{id} was acknowledged but is not in the stream"
        );
    }
    app.stop().await.unwrap();
    drop(own);
}
