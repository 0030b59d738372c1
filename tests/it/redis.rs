use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dispatchd::bus::redis::{ConsumerConfig, RedisPublisher};
use dispatchd::sinks::{
    DispatchEvent, DriverConfig, EventInput, EventMetadata, EventOutput, FileSink, FullPolicy,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{sample, wait_for_async};

const BINARY: &str = env!("CARGO_BIN_EXE_dispatchd");

/// The machine's Redis, or a visible skip; with `DISPATCHD_REQUIRE_TOOLS=1` (CI) its absence fails.
pub(crate) async fn redis_url() -> Option<String> {
    let url = std::env::var("DISPATCHD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let reachable = match redis::Client::open(url.as_str()) {
        Ok(client) => client.get_multiplexed_async_connection().await.is_ok(),
        Err(_) => false,
    };
    if !reachable {
        assert!(
            std::env::var("DISPATCHD_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "Redis is required (DISPATCHD_REQUIRE_TOOLS=1) but {url} does not answer"
        );
        eprintln!("SKIPPED: no Redis at {url}");
        return None;
    }
    Some(url)
}

/// A connection to `url`.
pub(crate) async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A stream and group no other test (or run) uses.
pub(crate) fn unique(name: &str) -> String {
    format!("dispatchd-test:{name}:{}", uuid::Uuid::new_v4())
}

pub(crate) fn event(n: usize) -> DispatchEvent {
    DispatchEvent {
        kind: "chain".into(),
        event: "end".into(),
        run_id: format!("run-{n:05}"),
        parent_run_id: None,
        name: "shop.orders.events".into(),
        timestamp: SystemTime::now(),
        input: EventInput {
            payload: json!({"n": n}),
            ..EventInput::default()
        },
        output: EventOutput::default(),
        user_id: None,
        tokens_usage: None,
        metadata: EventMetadata::default(),
        tags: vec![],
        log_id: format!("run-{n:05}"),
    }
}

pub(crate) async fn publish(url: &str, stream: &str, range: std::ops::Range<usize>) {
    let publisher = RedisPublisher::connect(url, stream, None).await.unwrap();
    for n in range {
        publisher
            .publish(&serde_json::to_string(&event(n)).unwrap())
            .await
            .unwrap();
    }
}

/// Run ids in the file, with how often each appears.
pub(crate) fn delivered(path: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        // A process killed mid-write may leave a torn last line; it is not a delivery.
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
            *seen
                .entry(event["runId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    seen
}

struct Child_(Child);

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dispatchd sink` (file) reading `stream` as group `group`, consumer `worker-1`.
fn sink_command(url: &str, stream: &str, group: &str, out: &Path, dead: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args([
            "sink",
            "--service",
            "file",
            "--batch-size",
            "50",
            "--flush-interval",
            "50ms",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--endpoint")
        .arg(out)
        .arg("--dead-letter")
        .arg(dead)
        .args([
            "--bus",
            url,
            "--stream",
            stream,
            "--group",
            group,
            "--consumer",
            "worker-1",
        ]);
    command
}

fn sink_process(url: &str, stream: &str, out: &Path, dead: &Path) -> Child_ {
    Child_(
        sink_command(url, stream, "g", out, dead)
            .env("DISPATCHD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A `dispatchd sink` whose log is kept, and the address of its `/metrics`.
struct LoggedSink {
    _child: Child_,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl LoggedSink {
    fn start(url: &str, stream: &str, group: &str, out: &Path, dead: &Path) -> LoggedSink {
        let mut child = sink_command(url, stream, group, out, dead)
            .env("DISPATCHD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let child = Child_(child);
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let addr = loop {
            let line = lines
                .next()
                .expect("dispatchd sink logs before exiting")
                .unwrap();
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        // Draining stdout also keeps the child from blocking on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        LoggedSink {
            _child: child,
            addr,
            log,
        }
    }

    async fn scrape(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn lines_with(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(text))
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_across_a_crash_with_duplicates_bounded() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("crash");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let dead = dir.path().join("dead.jsonl");
    const N: usize = 2000;
    publish(&url, &stream, 0..N).await;

    let first = sink_process(&url, &stream, &out, &dead);
    wait_for_async("the first worker to deliver some events", || async {
        delivered(&out).len() >= 200
    })
    .await;
    // Abruptly: no flush, no acknowledgement of what is in flight.
    let mut first = first;
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    let second = sink_process(&url, &stream, &out, &dead);
    wait_for_async("every event to arrive", || async {
        delivered(&out).len() == N
    })
    .await;
    let pid = second.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    let seen = delivered(&out);
    assert_eq!(seen.len(), N, "no event lost");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    // In flight at the kill: the batch being written and at most two settled batches whose
    // acknowledgement had not reached Redis (the acknowledgement channel holds one).
    assert!(
        duplicates <= 3 * 50,
        "at most the batches in flight are sent twice, not {duplicates}"
    );
    assert!(!dead.exists(), "nothing was dead-lettered");
    drop(second);
}

/// Batches of `batch_size`, `buffer` queued, short waits; dead letters under `dir`.
pub(crate) fn test_driver(dir: &Path, batch_size: usize, buffer: usize) -> DriverConfig {
    DriverConfig {
        batch_size,
        flush_interval: Duration::from_millis(50),
        buffer,
        full: FullPolicy::Block,
        retry: dispatchd::resilience::RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        },
        shutdown_deadline: Duration::from_secs(5),
        send_timeout: Duration::from_secs(5),
        dead_letter: dir.join("dead.jsonl"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_dead_consumer_left_pending_are_reclaimed_under_traffic() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("reclaim");
    publish(&url, &stream, 0..100).await;
    // A consumer takes 60 entries and dies without acknowledging them.
    let mut connection = connect(&url).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead-worker")
        .arg("COUNT")
        .arg(60)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut connection)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let shutdown = CancellationToken::new();
    let consumer = ConsumerConfig {
        stream: stream.clone(),
        group: "g".into(),
        consumer: "alive".into(),
        count: 20,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_millis(300),
        retention: Duration::from_secs(3600),
        trim_every: None,
    };
    let driver = test_driver(dir.path(), 20, 100);
    let running = tokio::spawn(dispatchd::sinks::service::run_from_redis(
        url.clone(),
        consumer,
        Box::new(FileSink::new("file", &out, false)),
        driver,
        None,
        None,
        shutdown.clone(),
    ));
    // New traffic keeps flowing meanwhile.
    publish(&url, &stream, 100..300).await;
    wait_for_async(
        "the dead consumer's entries and the new ones to arrive",
        || async { delivered(&out).len() == 300 },
    )
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .query_async(&mut connection)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(
        summary[0],
        redis::Value::Int(0),
        "everything was acknowledged"
    );
}

/// A Redis of our own on a free port, with an append-only file so a restart keeps the stream.
pub(crate) struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    pub(crate) fn start(port: u16, dir: tempfile::TempDir) -> OwnRedis {
        OwnRedis::spawn(
            port,
            dir,
            &["--appendonly", "yes", "--appendfsync", "always"],
        )
    }

    /// Without persistence: what it held is gone when it stops, as after a restart of a Redis
    /// that keeps nothing on disk.
    fn start_without_persistence(port: u16) -> OwnRedis {
        OwnRedis::spawn(port, tempfile::tempdir().unwrap(), &["--appendonly", "no"])
    }

    fn spawn(port: u16, dir: tempfile::TempDir, persistence: &[&str]) -> OwnRedis {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(persistence)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        OwnRedis {
            port,
            dir,
            child: Some(child),
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server: a stopped Redis keeps its connections open
    /// and answers nothing, as a hung one does.
    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal} {pid}");
    }

    pub(crate) fn kill(mut self) -> (u16, tempfile::TempDir) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let port = self.port;
        (
            port,
            std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()),
        )
    }
}

/// A Redis of our own on a free port, answering, and its URL; `None` (a visible skip, or a
/// failure under `DISPATCHD_REQUIRE_TOOLS=1`) without Redis or `redis-server`.
pub(crate) async fn own_redis() -> Option<(OwnRedis, String)> {
    if redis_url().await.is_none() || crate::support::required_tool("redis-server").is_none() {
        return None;
    }
    let port = free_port();
    let own = OwnRedis::start(port, tempfile::tempdir().unwrap());
    let url = format!("redis://127.0.0.1:{port}");
    answers(&url).await;
    Some((own, url))
}

/// Waits, bounded, until the Redis at `url` answers.
/// Waits until Redis answers a `PING`: a server still loading its append-only file accepts
/// connections but answers every command with `LOADING`.
pub(crate) async fn answers(url: &str) {
    wait_for_async("redis to answer", || async {
        let Ok(mut connection) = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
        else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .is_ok()
    })
    .await;
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_when_redis_restarts_mid_stream() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let stream = unique("restart");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let dead = dir.path().join("dead.jsonl");
    publish(&url, &stream, 0..100).await;
    let worker = sink_process(&url, &stream, &out, &dead);
    wait_for_async("the first events", || async {
        delivered(&out).len() == 100
    })
    .await;

    let (port, data) = own.kill();
    let own = OwnRedis::start(port, data);
    answers(&url).await;
    publish(&url, &stream, 100..200).await;
    wait_for_async("the events published after the restart", || async {
        delivered(&out).len() == 200
    })
    .await;
    drop(worker);
    drop(own);
}

#[tokio::test]
async fn a_dead_letter_file_is_replayed_by_the_sink_command() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let out = dir.path().join("out.jsonl");
    let file = dispatchd::sinks::dead_letter::DeadLetterFile::new(&dead);
    let events: Vec<DispatchEvent> = (0..3).map(event).collect();
    file.append("http", "retries_exhausted", 6, "HTTP 503: down", &events)
        .await
        .unwrap();

    let output = Command::new(BINARY)
        .args(["sink", "--service", "file", "--listen", "127.0.0.1:0"])
        .arg("--endpoint")
        .arg(&out)
        .arg("--replay-dead-letters")
        .arg(&dead)
        .arg("--dead-letter")
        .arg(dir.path().join("again.jsonl"))
        .env("DISPATCHD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("replayed 3 events"));
    assert_eq!(delivered(&out).len(), 3);
    assert!(
        !dead.exists(),
        "moved aside, so a second replay cannot send them twice"
    );
}

struct Echo;

#[async_trait::async_trait]
impl dispatchd::engine::Handler for Echo {
    async fn handle(
        &self,
        message: &dispatchd::engine::Message<'_>,
    ) -> Result<Vec<dispatchd::engine::OutputMessage>, dispatchd::engine::HandlerError> {
        let reply = message.envelope.derive("order.confirmed", json!({}));
        Ok(vec![dispatchd::engine::OutputMessage::new(
            "shop.confirmations.events",
            reply,
        )])
    }
}

/// The run ids of the dispatch events on `stream`, in stream order.
async fn stream_run_ids(url: &str, stream: &str) -> Vec<String> {
    let mut connection = connect(url).await;
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    entries
        .ids
        .iter()
        .map(|entry| {
            let data: String = entry.get("data").unwrap();
            serde_json::from_str::<DispatchEvent>(&data).unwrap().run_id
        })
        .collect()
}

/// serve on the Redis at `url`: events on `<prefix>:events`, outputs under `<prefix>:topic:`, the
/// bus dead-letter file beside the sinks'.
pub(crate) fn use_redis(
    config: &mut dispatchd::config::Config,
    url: &str,
    prefix: &str,
    consumer: &str,
) {
    config.bus.redis = Some(dispatchd::config::RedisBusConfig {
        url: url.to_owned(),
        max_len: None,
        consumer: Some(consumer.to_owned()),
        claim_idle: Duration::from_secs(30),
        consumer_retention: Duration::from_secs(3600),
        // These tests read the events stream back: nothing trimmed during a test.
        trim_every: Duration::from_secs(3600),
        dead_letter: config.sinks[0]
            .driver
            .dead_letter
            .with_file_name("bus.dead-letters.jsonl"),
    });
    config.bus.events_stream = format!("{prefix}:events");
    config.bus.outputs_prefix = format!("{prefix}:topic:");
}

/// The `echo` dispatcher (one output per message) on `orders.intents`.
fn with_echo(builder: dispatchd::app::AppBuilder) -> dispatchd::app::AppBuilder {
    use dispatchd::engine::{Category, Dispatcher, Route};
    builder
        .dispatcher(Dispatcher::new("echo", Category::Intent, Echo))
        .route(Route::new(
            "echo",
            "orders.intents",
            Category::Intent,
            "echo",
        ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_redis_publishes_events_and_outputs_and_dispatches_a_source() {
    let Some(url) = redis_url().await else { return };
    let prefix = unique("serve");
    let source_stream = format!("{prefix}:inbound");
    let outputs_prefix = format!("{prefix}:topic:");
    let app = crate::support::TestApp::start_with(
        |config| {
            use_redis(config, &url, &prefix, "test-instance");
            config.sources = vec![dispatchd::config::SourceConfig {
                stream: source_stream.clone(),
                group: "dispatchd".into(),
            }];
            for sink in &mut config.sinks {
                sink.driver.flush_interval = Duration::from_millis(50);
            }
        },
        with_echo,
    )
    .await;

    let result: serde_json::Value = app
        .post_message("orders.intents", json!({"message_type": "order.place"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(result["status"], "success");
    let run_id = result["dispatch_id"].as_str().unwrap().to_owned();

    // The event went through the Redis stream to the file sink's consumer group.
    let events = app.dir.path().join("events.jsonl");
    wait_for_async("the event to reach the file sink through Redis", || async {
        delivered(&events).contains_key(&run_id)
    })
    .await;

    // The output was published under its topic.
    let mut connection = connect(&url).await;
    let outputs: usize = redis::cmd("XLEN")
        .arg(format!("{outputs_prefix}shop.confirmations.events"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(outputs, 1);

    // A message on the source stream is dispatched and acknowledged, in its sender's trace: a
    // sender that does not sample (`-00`) gets no sampled trace back, though new traces are kept.
    let sender_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut envelope = dispatchd::engine::Envelope::new("order.placed", json!({"from": "redis"}));
    envelope.headers.insert(
        "traceparent".into(),
        format!("00-{sender_trace}-00f067aa0ba902b7-00"),
    );
    let message = json!({"topic": "shop.orders.events", "envelope": envelope});
    let _: String = redis::cmd("XADD")
        .arg(&source_stream)
        .arg("*")
        .arg("data")
        .arg(message.to_string())
        .query_async(&mut connection)
        .await
        .unwrap();
    wait_for_async("the source message to be dispatched", || async {
        app.jsonl_lines()
            .iter()
            .any(|line| line["payload"]["from"] == "redis")
    })
    .await;
    let from_source = || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| event["input"]["payload"]["from"] == "redis")
    };
    wait_for_async("the source message's event", || async {
        from_source().is_some()
    })
    .await;
    let from_source = from_source().unwrap();
    let traceparent = from_source["metadata"]["traceparent"].as_str().unwrap();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields[1], sender_trace, "{traceparent}");
    assert_ne!(
        fields[2], "00f067aa0ba902b7",
        "a span of its own: {traceparent}"
    );
    assert_eq!(fields[3], "00", "the sender's decision: {traceparent}");
    wait_for_async("the source entry to be acknowledged", || {
        let mut connection = connection.clone();
        let stream = source_stream.clone();
        async move {
            let pending: redis::Value = redis::cmd("XPENDING").arg(&stream).arg("dispatchd").query_async(&mut connection).await.unwrap();
            matches!(pending, redis::Value::Array(ref summary) if summary[0] == redis::Value::Int(0))
        }
    })
    .await;
    app.stop().await.unwrap();
}

/// serve on a Redis bus whose Redis dies: ingest keeps answering 200, each event Redis cannot take
/// lands in the bus dead-letter file and is counted, and publishing resumes once Redis is back.
/// Every accepted dispatch's event is in the stream or in the dead-letter file, never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dead_letters_events_while_redis_is_down_and_publishes_again_after() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("outage");
    let stream = format!("{prefix}:events");
    let app = crate::support::TestApp::start_with(
        |config| use_redis(config, &url, &prefix, "outage"),
        with_echo,
    )
    .await;
    let series = |outcome: &str| {
        format!(r#"bus_redis_events_total{{outcome="{outcome}",stream="{stream}"}}"#)
    };
    let count = |metrics: &str, outcome: &str| {
        crate::support::sample(metrics, &series(outcome)).unwrap_or(0.0)
    };

    let mut accepted = app.post_orders(5).await;
    assert_eq!(count(&app.scrape().await, "published"), 5.0);
    let ready = app.get_json("/ready").await;
    assert_eq!(ready["bus"], json!({"kind": "redis", "publishing": "ok"}));

    let (port, data) = own.kill();
    accepted.extend(app.post_orders(5).await);
    let metrics = app.scrape().await;
    assert_eq!(count(&metrics, "dead_lettered"), 5.0, "{metrics}");
    assert_eq!(count(&metrics, "dropped"), 0.0, "{metrics}");
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    // /ready tells, and stays 200: dispatch works without the bus.
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        ready["bus"],
        json!({"kind": "redis", "publishing": "failing"})
    );
    // Dispatches whose handler has outputs cannot publish them: each is answered (not held
    // while the connection re-establishes itself) as publish_failed, for the caller to retry.
    // Their events are counted like the others.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for _ in 0..2 {
        let answer = impatient
            .post(app.url("/api/v1/messages/orders.intents"))
            .json(&json!({"message_type": "order.place"}))
            .send()
            .await
            .expect("answered while Redis is down");
        assert_eq!(answer.status(), reqwest::StatusCode::BAD_GATEWAY);
        let result: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(result["status"], "publish_failed", "{result}");
        accepted.insert(result["dispatch_id"].as_str().unwrap().to_owned());
    }

    let own = OwnRedis::start(port, data);
    answers(&url).await;
    // The first publish after the restart may still meet the old connection; publishing
    // resumes within a few messages.
    // Polled with a bound (20 s), a message each time: the breaker lets a probe through a
    // second after the last failure, and the connection has to be re-established.
    let mut resumed = false;
    for _ in 0..400 {
        accepted.extend(app.post_orders(1).await);
        if count(&app.scrape().await, "published") > 5.0 {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "publishing resumed after Redis came back");
    assert_eq!(app.get_json("/ready").await["bus"]["publishing"], "ok");

    let metrics = app.scrape().await;
    let (published, dead_lettered) = (
        count(&metrics, "published"),
        count(&metrics, "dead_lettered"),
    );
    assert_eq!(
        published + dead_lettered,
        accepted.len() as f64,
        "{metrics}"
    );

    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let in_stream: std::collections::BTreeSet<String> =
        stream_run_ids(&url, &stream).await.into_iter().collect();
    let dead_letters = std::fs::read_to_string(dir.path().join("bus.dead-letters.jsonl")).unwrap();
    let dead: std::collections::BTreeSet<String> = dead_letters
        .lines()
        .map(|line| {
            let letter: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(letter["sink"], "bus");
            assert_eq!(letter["reason"], "publish_failed");
            letter["event"]["runId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(in_stream.len() as f64, published);
    assert_eq!(dead.len() as f64, dead_lettered);
    assert!(in_stream.is_disjoint(&dead));
    let all: std::collections::BTreeSet<String> = in_stream.union(&dead).cloned().collect();
    assert_eq!(
        all, accepted,
        "every accepted dispatch's event is accounted for"
    );

    // And `republish` puts the dead letters on the stream: now it holds every event.
    let republished =
        dispatchd::bus::redis::republish(&url, &stream, &dir.path().join("bus.dead-letters.jsonl"))
            .await
            .unwrap();
    assert_eq!(
        (republished.published, republished.returned),
        (dead.len(), 0)
    );
    let in_stream: std::collections::BTreeSet<String> =
        stream_run_ids(&url, &stream).await.into_iter().collect();
    assert_eq!(in_stream, accepted);
    drop(own);
}

/// `dispatchd republish` puts a dead-letter file's events back on the stream for every group,
/// moving the file aside; a file that is not dead letters is refused naming its line, untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_puts_dead_letters_back_on_the_stream() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("republish");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bus.dead-letters.jsonl");
    dispatchd::sinks::dead_letter::DeadLetterFile::new(&file)
        .append(
            "bus",
            "publish_failed",
            3,
            "redis: connection refused",
            &[event(1), event(2), event(3)],
        )
        .await
        .unwrap();

    let output = Command::new(BINARY)
        .args(["republish", "--bus", &url, "--stream", &stream])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("republished 3 events"), "{stdout}");
    assert!(!file.exists(), "moved aside");
    assert!(
        dir.path()
            .join("bus.dead-letters.republished.jsonl")
            .exists()
    );

    let run_ids = stream_run_ids(&url, &stream).await;
    assert_eq!(run_ids, ["run-00001", "run-00002", "run-00003"]);

    let bad = dir.path().join("not-letters.jsonl");
    std::fs::write(&bad, "{\"sink\":\"bus\"}\n").unwrap();
    let output = Command::new(BINARY)
        .args(["republish", "--bus", &url, "--stream", &stream])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not-letters.jsonl:1: not a dead letter"),
        "{stderr}"
    );
    assert!(bad.exists(), "left where it was");
}

/// serve on a Redis that hangs (stopped, its connections open and silent): each wait is bounded
/// by dispatchd, not by the connection's own 5 s response timeout. A dispatch with outputs is
/// answered `publish_failed` after 2 s; an event goes to the dead-letter file after its 500 ms
/// attempts; both say which bound fired. Once Redis answers again, publishing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_costs_bounded_waits_and_no_event() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("hung");
    let app = crate::support::TestApp::start_with(
        |config| use_redis(config, &url, &prefix, "hung"),
        with_echo,
    )
    .await;
    let mut accepted = app.post_orders(2).await;

    own.signal("STOP");
    let answer = app
        .post_message("orders.intents", json!({"message_type": "order.place"}))
        .await;
    assert_eq!(answer.status(), reqwest::StatusCode::BAD_GATEWAY);
    let result: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(result["status"], "publish_failed", "{result}");
    assert!(
        result["error_message"]
            .as_str()
            .unwrap()
            .contains("no answer within 2s"),
        "{result}"
    );
    accepted.insert(result["dispatch_id"].as_str().unwrap().to_owned());
    accepted.extend(app.post_orders(1).await);

    own.signal("CONT");
    let mut resumed = false;
    for _ in 0..400 {
        accepted.extend(app.post_orders(1).await);
        if app.get_json("/ready").await["bus"]["publishing"] == "ok" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "publishing resumed once Redis answered again");

    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let dead_letters = std::fs::read_to_string(dir.path().join("bus.dead-letters.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(dead_letters.lines().next().unwrap()).unwrap();
    assert!(
        first["last_error"]
            .as_str()
            .unwrap()
            .contains("no answer within 500ms"),
        "{first}"
    );
    // Nothing lost: every accepted dispatch's event is in the stream or the file. (A hung XADD
    // may still be applied when Redis resumes, so here an event may be in both.)
    let mut seen: std::collections::BTreeSet<String> =
        stream_run_ids(&url, &format!("{prefix}:events"))
            .await
            .into_iter()
            .collect();
    for line in dead_letters.lines() {
        let letter: serde_json::Value = serde_json::from_str(line).unwrap();
        seen.insert(letter["event"]["runId"].as_str().unwrap().to_owned());
    }
    assert!(
        accepted.is_subset(&seen),
        "every accepted dispatch's event is accounted for"
    );
    drop(own);
}

/// The runbook's recovery while serve runs: `republish` moves the bus dead-letter file aside, and
/// the next outage's dead letters go to a new file at the path, not to the moved one, so the next
/// `republish` finds them. In the end every accepted dispatch's event is in the stream. (It starts
/// on a dead-letter file a crash left torn: the first outage's letters must still all parse.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_while_serve_runs_and_the_next_outage_writes_a_new_dead_letter_file() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("republish-live");
    let stream = format!("{prefix}:events");
    // A crash mid-write left a torn dead letter: moved aside at start, and counted.
    let app = crate::support::TestApp::start_with(
        |config| {
            use_redis(config, &url, &prefix, "live");
            let dead = &config.bus.redis.as_ref().unwrap().dead_letter;
            std::fs::write(dead, r#"{"sink":"bus","reason":"publ"#).unwrap();
        },
        |b| b,
    )
    .await;
    let dead = app.dir.path().join("bus.dead-letters.jsonl");
    let torn = crate::support::sample(
        &app.scrape().await,
        r#"file_torn_tails_total{file_kind="bus_dead_letters"}"#,
    );
    assert_eq!(torn, Some(1.0));
    let letters = |path: &Path| -> std::collections::BTreeSet<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let letter: serde_json::Value = serde_json::from_str(line).unwrap();
                letter["event"]["runId"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let mut accepted = app.post_orders(2).await;

    let mut own = own;
    for outage in 1..=2 {
        let (port, data) = own.kill();
        let lost_to_redis = app.post_orders(2).await;
        assert_eq!(
            letters(&dead),
            lost_to_redis,
            "outage {outage}: its dead letters are in {}",
            dead.display()
        );
        accepted.extend(lost_to_redis);
        own = OwnRedis::start(port, data);
        answers(&url).await;
        // serve keeps running meanwhile, as the runbook has it.
        let republished = dispatchd::bus::redis::republish(&url, &stream, &dead)
            .await
            .unwrap_or_else(|e| panic!("outage {outage}: {e}"));
        assert_eq!((republished.published, republished.returned), (2, 0));
        let expected = match outage {
            1 => "bus.dead-letters.republished.jsonl",
            _ => "bus.dead-letters.republished-2.jsonl",
        };
        assert_eq!(republished.moved_to, app.dir.path().join(expected));
        assert!(!dead.exists(), "outage {outage}: nothing left behind");
    }
    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    assert_eq!(
        letters(&dir.path().join("bus.dead-letters.republished.jsonl")).len(),
        2,
        "the first moved file holds the first outage's letters only"
    );
    let in_stream: std::collections::BTreeSet<String> =
        stream_run_ids(&url, &stream).await.into_iter().collect();
    assert_eq!(in_stream, accepted, "every accepted dispatch's event");
    drop(own);
}

/// `dispatchd sink` follows logrotate too: after `mv` and SIGHUP it stays up and writes to a new
/// file, the old one keeping what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_command_reopens_its_file_on_sighup() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("hangup");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let rotated = dir.path().join("out.jsonl.1");
    let mut worker = sink_process(&url, &stream, &out, &dir.path().join("dead.jsonl"));
    publish(&url, &stream, 0..20).await;
    wait_for_async("the first events", || async { delivered(&out).len() == 20 }).await;

    std::fs::rename(&out, &rotated).unwrap();
    let pid = worker.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    publish(&url, &stream, 20..40).await;
    wait_for_async("the later events, in a new file", || async {
        delivered(&out).len() == 20
    })
    .await;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "SIGHUP did not stop it"
    );
    let old: Vec<String> = delivered(&rotated).into_keys().collect();
    let new: Vec<String> = delivered(&out).into_keys().collect();
    assert_eq!(
        old,
        (0..20).map(|n| format!("run-{n:05}")).collect::<Vec<_>>()
    );
    assert_eq!(
        new,
        (20..40).map(|n| format!("run-{n:05}")).collect::<Vec<_>>()
    );
}

/// Metrics on, and the Redis bus's observer of them.
fn bus_telemetry() -> (
    dispatchd::telemetry::Telemetry,
    Option<Arc<dyn dispatchd::bus::BusObserver>>,
) {
    let telemetry = dispatchd::telemetry::Telemetry::new(&dispatchd::config::MetricsConfig {
        enabled: true,
        namespace: String::new(),
        cardinality_limit: 2000,
    });
    let observer = telemetry
        .bus_metrics()
        .map(|m| m as Arc<dyn dispatchd::bus::BusObserver>);
    (telemetry, observer)
}

/// A series' value in a scrape; 0 when absent.
fn value(metrics: &str, series: &str) -> f64 {
    sample(metrics, series).unwrap_or(0.0)
}

/// Someone deletes a sink's consumer group while it reads: the consumer creates it again after
/// the newest entry it had read, so events published afterwards arrive, and those it had
/// already delivered are not sent again (from `0` the whole stream would be). Counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_group_is_created_again_and_later_events_arrive_once() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("nogroup");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let (telemetry, observer) = bus_telemetry();
    let shutdown = CancellationToken::new();
    let running = spawn_file_sink(url.clone(), &stream, &out, observer, shutdown.clone());
    publish(&url, &stream, 0..10).await;
    wait_for_async("the first events", || async { delivered(&out).len() == 10 }).await;

    let mut connection = connect(&url).await;
    let destroyed: u64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg("g")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(destroyed, 1);
    publish(&url, &stream, 10..20).await;
    wait_for_async(
        "the events published after the group was deleted",
        || async { delivered(&out).len() == 20 },
    )
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let seen = delivered(&out);
    assert!(seen.values().all(|n| *n == 1), "none sent twice: {seen:?}");
    let metrics = telemetry.render().unwrap();
    let labels = format!(r#"{{group="g",stream="{stream}"}}"#);
    assert_eq!(
        value(
            &metrics,
            &format!("bus_redis_group_recreated_total{labels}")
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, &format!("bus_redis_read_errors_total{labels}")),
        0.0,
        "NOGROUP is handled, not a failed read: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("bus_redis_abandoned_entries_total{labels}")
        ),
        Some(0.0),
        "a clean stop leaves nothing unacknowledged: {metrics}"
    );
}

/// `run_from_redis` as member `c` of group `g` of `stream`, into a file sink at `out`.
fn spawn_file_sink(
    url: String,
    stream: &str,
    out: &Path,
    observer: Option<Arc<dyn dispatchd::bus::BusObserver>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), dispatchd::bus::redis::BusError>> {
    let consumer = ConsumerConfig {
        stream: stream.to_owned(),
        group: "g".into(),
        consumer: "c".into(),
        count: 20,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
        trim_every: None,
    };
    tokio::spawn(dispatchd::sinks::service::run_from_redis(
        url,
        consumer,
        Box::new(FileSink::new("file", out, false)),
        test_driver(out.parent().unwrap(), 20, 100),
        None,
        observer,
        shutdown,
    ))
}

/// A Redis user that may do everything but `XACK`, removed when dropped.
struct UserWithoutXack {
    admin: String,
    name: String,
}

impl UserWithoutXack {
    /// Creates it through `url` (the default user); answers it and its URL.
    async fn create(url: &str) -> (UserWithoutXack, String) {
        let name = format!("dispatchd-test-noack-{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect(url).await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg(">secret")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg("-xack")
            .query_async(&mut admin)
            .await
            .unwrap();
        let user_url = url.replacen("redis://", &format!("redis://{name}:secret@"), 1);
        let user = UserWithoutXack {
            admin: url.to_owned(),
            name,
        };
        (user, user_url)
    }

    /// Grants or takes back `XACK`; connected clients follow at once.
    async fn allow_xack(&self, url: &str, allowed: bool) {
        let mut admin = connect(url).await;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&self.name)
            .arg(if allowed { "+xack" } else { "-xack" })
            .query_async(&mut admin)
            .await
            .unwrap();
    }
}

impl Drop for UserWithoutXack {
    fn drop(&mut self) {
        if let Ok(mut admin) =
            redis::Client::open(self.admin.as_str()).and_then(|client| client.get_connection())
        {
            let _: Result<u64, _> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.name)
                .query(&mut admin);
        }
    }
}

/// Redis refuses a consumer's acknowledgements (an ACL without `XACK`) while it reads: the events
/// still reach the sink, every failed `XACK` is counted and the entries stay pending. Granted
/// `XACK`, the same consumer acknowledges them all, with no restart (as the runbook says).
/// Refused again, it stops within a bound and counts exactly the entries it leaves
/// unacknowledged, instead of hanging or saying nothing; and nothing reaches the sink twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_acknowledgements_are_counted_and_the_entries_stay_pending() {
    let Some(url) = redis_url().await else { return };
    let (user, user_url) = UserWithoutXack::create(&url).await;
    let stream = unique("noack");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let (telemetry, observer) = bus_telemetry();
    let shutdown = CancellationToken::new();
    let running = spawn_file_sink(user_url, &stream, &out, observer, shutdown.clone());
    let connection = connect(&url).await;
    let pending = || {
        let (mut connection, stream) = (connection.clone(), stream.clone());
        async move {
            let summary: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
                .arg(&stream)
                .arg("g")
                .query_async(&mut connection)
                .await
                .unwrap();
            summary.0
        }
    };
    let labels = format!(r#"{{group="g",stream="{stream}"}}"#);
    let errors = format!("bus_redis_ack_errors_total{labels}");
    let abandoned = format!("bus_redis_abandoned_entries_total{labels}");
    let now = |series: &str| value(&telemetry.render().unwrap(), series);

    // Three batches: the acknowledgements queue up behind the first.
    publish(&url, &stream, 0..50).await;
    wait_for_async("the events, and a refused acknowledgement", || async {
        delivered(&out).len() == 50 && now(&errors) >= 1.0
    })
    .await;
    assert_eq!(
        pending().await,
        50,
        "refused acknowledgements leave the entries pending"
    );
    assert_eq!(
        sample(&telemetry.render().unwrap(), &abandoned),
        Some(0.0),
        "nothing given up while the consumer still tries"
    );

    user.allow_xack(&url, true).await;
    wait_for_async("every entry acknowledged once XACK is allowed", || async {
        pending().await == 0
    })
    .await;

    user.allow_xack(&url, false).await;
    let refused_so_far = now(&errors);
    publish(&url, &stream, 50..100).await;
    wait_for_async("the next events, refused again", || async {
        delivered(&out).len() == 100 && now(&errors) > refused_so_far
    })
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the consumer stops within a bound though Redis refuses its acknowledgements")
        .unwrap()
        .unwrap();
    assert_eq!(pending().await, 50);
    assert_eq!(
        now(&abandoned),
        50.0,
        "the entries left unacknowledged, and only those, counted once"
    );
    // The batch whose acknowledgements were waiting for the acknowledger when the stop came was
    // sent already: the stop does not send it again.
    let seen = delivered(&out);
    assert!(seen.values().all(|n| *n == 1), "none sent twice: {seen:?}");
}

/// A sink that sends nothing until the test opens it.
struct Gated {
    open: Arc<tokio::sync::Semaphore>,
    sent: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl dispatchd::sinks::Sink for Gated {
    fn name(&self) -> &str {
        "gated"
    }

    async fn send_events(
        &self,
        batch: &[DispatchEvent],
    ) -> Result<dispatchd::sinks::Delivery, dispatchd::sinks::SendError> {
        let _open = self.open.acquire().await.unwrap();
        self.sent.fetch_add(batch.len(), Ordering::SeqCst);
        Ok(dispatchd::sinks::Delivery::default())
    }
}

/// `bus_redis_pending_entries` and `bus_redis_consumer_lag` follow the backlog within a couple of
/// seconds (they are read every second), also while the consumer waits for a sink that takes
/// nothing, and not only every half `claim_idle` (15 s by default) as they used to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauges_follow_the_backlog_within_seconds() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("backlog");
    let dir = tempfile::tempdir().unwrap();
    let (telemetry, observer) = bus_telemetry();
    let open = Arc::new(tokio::sync::Semaphore::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let consumer = ConsumerConfig {
        stream: stream.clone(),
        group: "g".into(),
        consumer: "c".into(),
        count: 5,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
        trim_every: None,
    };
    let running = tokio::spawn(dispatchd::sinks::service::run_from_redis(
        url.clone(),
        consumer,
        Box::new(Gated {
            open: open.clone(),
            sent: sent.clone(),
        }),
        test_driver(dir.path(), 5, 5),
        None,
        observer,
        shutdown.clone(),
    ));
    let labels = format!(r#"{{group="g",stream="{stream}"}}"#);
    let backlog = || {
        let metrics = telemetry.render().unwrap();
        let pending = sample(&metrics, &format!("bus_redis_pending_entries{labels}"));
        let lag = sample(&metrics, &format!("bus_redis_consumer_lag{labels}"));
        pending.zip(lag).map(|(pending, lag)| pending + lag)
    };
    // Within this of a change, the gauges show it: a reading every second, with room for a
    // loaded machine. The old reading every half `claim_idle` would take 15 s.
    const FRESH: Duration = Duration::from_secs(5);
    crate::support::wait_for("the first reading", || backlog() == Some(0.0)).await;
    assert_eq!(
        sample(
            &telemetry.render().unwrap(),
            &format!("bus_redis_oldest_undelivered_age_seconds{labels}")
        ),
        Some(0.0),
        "nothing waits in an empty stream"
    );

    // 30 entries: some read and held by the sink (pending), the rest not yet read (lag).
    publish(&url, &stream, 0..30).await;
    let changed = std::time::Instant::now();
    crate::support::wait_for("the gauges to show 30 entries", || backlog() == Some(30.0)).await;
    assert!(changed.elapsed() < FRESH, "{:?}", changed.elapsed());
    let metrics = telemetry.render().unwrap();
    assert!(
        value(&metrics, &format!("bus_redis_pending_entries{labels}")) > 0.0,
        "the entries the sink holds are pending: {metrics}"
    );
    assert_eq!(sent.load(Ordering::SeqCst), 0);
    // The sink holds what it read and the consumer reads no more: the oldest entry not yet
    // delivered waits, and its age grows with the clock.
    let age = || {
        sample(
            &telemetry.render().unwrap(),
            &format!("bus_redis_oldest_undelivered_age_seconds{labels}"),
        )
    };
    assert!(
        value(&metrics, &format!("bus_redis_consumer_lag{labels}")) > 0.0,
        "{metrics}"
    );
    crate::support::wait_for(
        "the oldest undelivered entry to have waited a second",
        || age().is_some_and(|age| age >= 1.0),
    )
    .await;

    // The sink takes them all: the backlog empties, and the gauges follow.
    open.add_permits(1000);
    wait_for_async("the sink to take every entry", || async {
        sent.load(Ordering::SeqCst) == 30
    })
    .await;
    let drained = std::time::Instant::now();
    crate::support::wait_for("the gauges to show an empty backlog", || {
        backlog() == Some(0.0) && age() == Some(0.0)
    })
    .await;
    assert!(drained.elapsed() < FRESH, "{:?}", drained.elapsed());

    shutdown.cancel();
    running.await.unwrap().unwrap();
    let metrics = telemetry.render().unwrap();
    assert_eq!(
        sample(&metrics, &format!("bus_redis_consumer_lag{labels}")),
        None,
        "a stopped consumer's backlog is unknown, not its last value: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            &format!("bus_redis_oldest_undelivered_age_seconds{labels}")
        ),
        None,
        "{metrics}"
    );
}

/// Appends a `[[sources]]` message (an order event whose payload says `from`) to `stream`.
async fn post_to_source(url: &str, stream: &str, from: &str) {
    let mut connection = connect(url).await;
    let message = json!({"topic": "shop.orders.events", "envelope": dispatchd::engine::Envelope::new("order.placed", json!({"from": from}))});
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("data")
        .arg(message.to_string())
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// Redis restarts without its data (no persistence): serve's sink, its `[[sources]]` source and
/// a `dispatchd sink` process each find their group gone (`NOGROUP`), create it again, count it,
/// log it once, and deliver what is published afterwards. Before, each logged `NOGROUP` every
/// 5 s and delivered nothing, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_create_their_groups_again_when_redis_restarts_empty() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let prefix = unique("empty-restart");
    let stream = format!("{prefix}:events");
    let source = format!("{prefix}:inbound");
    let app = crate::support::TestApp::start_with(
        |config| {
            use_redis(config, &url, &prefix, "empty-restart");
            config.sources = vec![dispatchd::config::SourceConfig {
                stream: source.clone(),
                group: "dispatchd".into(),
            }];
            for sink in &mut config.sinks {
                sink.driver.flush_interval = Duration::from_millis(50);
            }
        },
        |builder| builder,
    )
    .await;
    let served = app.dir.path().join("events.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let worker = LoggedSink::start(&url, &stream, "g", &out, &dir.path().join("dead.jsonl"));
    // `dispatchd sink` names its instance too: host name and the port it listens on.
    let port = worker.addr.rsplit(':').next().unwrap().to_owned();
    let instance = format!("{}:{port}", dispatchd::config::host_name());
    let metrics = worker.scrape().await;
    assert!(
        metrics.contains(&format!(r#"service_instance_id="{instance}""#)),
        "{metrics}"
    );
    let arrived = |ids: &std::collections::BTreeSet<String>| {
        let (served, out) = (delivered(&served), delivered(&out));
        ids.iter()
            .all(|id| served.contains_key(id) && out.contains_key(id))
    };

    let before = app.post_orders(3).await;
    wait_for_async("the events before the restart, in both sinks", || async {
        arrived(&before)
    })
    .await;
    post_to_source(&url, &source, "before").await;
    let dispatched = |from: &str| {
        app.jsonl_lines()
            .iter()
            .any(|line| line["payload"]["from"] == from)
    };
    crate::support::wait_for("the source message before the restart", || {
        dispatched("before")
    })
    .await;

    // Killed, and started again on the same port with nothing: Redis without its streams and
    // groups, as after a restart without persistence.
    let (port, _data) = own.kill();
    let own = OwnRedis::start_without_persistence(port);
    answers(&url).await;

    // The first events after the restart may go to the bus dead-letter file while the publisher
    // reconnects; one arriving in both sinks shows publishing and both groups work again.
    let mut first = std::collections::BTreeSet::new();
    for _ in 0..400 {
        first.extend(app.post_orders(1).await);
        if first.iter().any(|id| arrived(&[id.clone()].into())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = app.post_orders(5).await;
    wait_for_async(
        "every event posted after the restart, in both sinks",
        || async { arrived(&after) },
    )
    .await;
    post_to_source(&url, &source, "after").await;
    crate::support::wait_for("the source message after the restart", || {
        dispatched("after")
    })
    .await;

    let metrics = app.scrape().await;
    let recreated = |metrics: &str, stream: &str, group: &str| {
        value(
            metrics,
            &format!(r#"bus_redis_group_recreated_total{{group="{group}",stream="{stream}"}}"#),
        )
    };
    assert_eq!(
        recreated(&metrics, &stream, "dispatchd-sink-events"),
        1.0,
        "{metrics}"
    );
    assert_eq!(recreated(&metrics, &source, "dispatchd"), 1.0, "{metrics}");
    assert!(
        value(
            &metrics,
            &format!(
                r#"bus_redis_read_errors_total{{group="dispatchd-sink-events",stream="{stream}"}}"#
            )
        ) >= 1.0,
        "reads failed while Redis was down: {metrics}"
    );
    let worker_metrics = worker.scrape().await;
    assert_eq!(
        recreated(&worker_metrics, &stream, "g"),
        1.0,
        "{worker_metrics}"
    );
    assert_eq!(
        worker.lines_with("consumer group was gone"),
        1,
        "logged once"
    );
    assert_eq!(worker.lines_with("NOGROUP"), 0, "not a failing read");
    app.stop().await.unwrap();
    drop(worker);
    drop(own);
}

/// A `[[sources]]` stream whose key holds something else (`WRONGTYPE`) cannot be read: serve
/// keeps trying and counts each failure (`bus_redis_read_errors_total`, which alerts), instead of
/// giving the source up after one log line; once the key is a stream, its messages are dispatched,
/// and an entry that is not a message is kept in `<stream>:unreadable` rather than dropped; what
/// this version can read there, `dispatchd requeue` dispatches once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_start_is_counted_and_retried() {
    let Some(url) = redis_url().await else { return };
    let prefix = unique("wrongtype");
    let source = format!("{prefix}:inbound");
    let mut connection = connect(&url).await;
    let _: () = redis::cmd("SET")
        .arg(&source)
        .arg("not a stream")
        .query_async(&mut connection)
        .await
        .unwrap();
    let app = crate::support::TestApp::start_with(
        |config| {
            use_redis(config, &url, &prefix, "wrongtype");
            config.sources = vec![dispatchd::config::SourceConfig {
                stream: source.clone(),
                group: "dispatchd".into(),
            }];
        },
        |builder| builder,
    )
    .await;
    let series = format!(r#"bus_redis_read_errors_total{{group="dispatchd",stream="{source}"}}"#);
    wait_for_async("failed attempts to be counted", || async {
        value(&app.scrape().await, &series) >= 2.0
    })
    .await;

    let _: () = redis::cmd("DEL")
        .arg(&source)
        .query_async(&mut connection)
        .await
        .unwrap();
    post_to_source(&url, &source, "fixed").await;
    crate::support::wait_for("the source message", || {
        app.jsonl_lines()
            .iter()
            .any(|line| line["payload"]["from"] == "fixed")
    })
    .await;

    // An entry that is not a message is not dispatched, and not lost either: it is kept in
    // `<stream>:unreadable` with why and the id it had, and acknowledged.
    let bad: String = redis::cmd("XADD")
        .arg(&source)
        .arg("*")
        .arg("data")
        .arg("{\"topic\": 7}")
        .query_async(&mut connection)
        .await
        .unwrap();
    post_to_source(&url, &source, "after the bad one").await;
    crate::support::wait_for("the message after the bad one", || {
        app.jsonl_lines()
            .iter()
            .any(|line| line["payload"]["from"] == "after the bad one")
    })
    .await;
    let kept = kept_entries(&mut connection, &source).await;
    assert_eq!(kept.ids.len(), 1, "{kept:?}");
    let field = |name: &str| -> String { kept.ids[0].get(name).unwrap() };
    assert_eq!(field("data"), "{\"topic\": 7}");
    assert_eq!(field("entry_id"), bad);
    assert!(
        field("error").contains("invalid type"),
        "{}",
        field("error")
    );
    let counted =
        format!(r#"bus_redis_unreadable_entries_total{{group="dispatchd",stream="{source}"}}"#);
    assert_eq!(value(&app.scrape().await, &counted), 1.0);
    // Acknowledgements are sent in batches, after the deliveries.
    wait_for_async("every entry to be acknowledged", || {
        let mut connection = connection.clone();
        let source = source.clone();
        async move {
            let pending: redis::Value = redis::cmd("XPENDING")
                .arg(&source)
                .arg("dispatchd")
                .query_async(&mut connection)
                .await
                .unwrap();
            let redis::Value::Array(summary) = pending else {
                panic!("XPENDING answered {pending:?}")
            };
            redis::from_redis_value_ref::<i64>(&summary[0]).unwrap() == 0
        }
    })
    .await;

    // After an upgrade: an entry an older version kept because it could not read it, which this
    // one can, beside the one no version reads. `dispatchd requeue` moves the first back onto
    // the stream, where the source dispatches it, and leaves the other; run again, it moves
    // nothing twice.
    let message = json!({"topic": "shop.orders.events", "envelope": dispatchd::engine::Envelope::new("order.placed", json!({"from": "kept by an older version"}))});
    let _: String = redis::cmd("XADD")
        .arg(format!("{source}:unreadable"))
        .arg("*")
        .arg("data")
        .arg(message.to_string())
        .arg("error")
        .arg("unknown variant `newer`")
        .arg("entry_id")
        .arg("1-1")
        .query_async(&mut connection)
        .await
        .unwrap();
    let requeue = || {
        let output = Command::new(BINARY)
            .args(["requeue", &source, "--bus", &url])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let first = requeue();
    assert!(
        first.contains("moved 1 entries") && first.contains("; 1 left there"),
        "{first}"
    );
    assert!(
        first.contains("invalid type"),
        "says why one stays: {first}"
    );
    let requeued = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|line| line["payload"]["from"] == "kept by an older version")
            .count()
    };
    crate::support::wait_for("the requeued message", || requeued(&app.jsonl_lines()) == 1).await;
    let kept = kept_entries(&mut connection, &source).await;
    assert_eq!(kept.ids.len(), 1, "{kept:?}");
    assert_eq!(kept.ids[0].get::<String>("entry_id").unwrap(), bad);
    let second = requeue();
    assert!(
        second.contains("moved 0 entries") && second.contains("; 1 left there"),
        "{second}"
    );
    post_to_source(&url, &source, "after the requeue").await;
    crate::support::wait_for("the message after the requeue", || {
        app.jsonl_lines()
            .iter()
            .any(|line| line["payload"]["from"] == "after the requeue")
    })
    .await;
    assert_eq!(requeued(&app.jsonl_lines()), 1, "dispatched once");
    app.stop().await.unwrap();
}

/// `requeue` looks only at what was kept when it started: a consumer of an older version, still
/// running, keeps again everything that is moved back (here a task that copies each new entry of
/// the stream to `<stream>:unreadable`), and the command still ends, having moved each entry once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_ends_while_an_older_consumer_keeps_again_what_it_moves() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("requeue");
    let kept = format!("{stream}:unreadable");
    let mut connection = connect(&url).await;
    let message = json!({"topic": "shop.orders.events", "envelope": dispatchd::engine::Envelope::new("order.placed", json!({}))}).to_string();
    for _ in 0..250 {
        let _: String = redis::cmd("XADD")
            .arg(&kept)
            .arg("*")
            .arg("data")
            .arg(&message)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let stop = CancellationToken::new();
    let older = tokio::spawn({
        let (mut connection, stream, kept, stop) = (
            connection.clone(),
            stream.clone(),
            kept.clone(),
            stop.clone(),
        );
        async move {
            let mut last = "0".to_owned();
            while !stop.is_cancelled() {
                let read: redis::streams::StreamReadReply = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(50)
                    .arg("BLOCK")
                    .arg(50)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&last)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
                for entry in read.keys.iter().flat_map(|key| &key.ids) {
                    let data: String = entry.get("data").unwrap();
                    let _: String = redis::cmd("XADD")
                        .arg(&kept)
                        .arg("*")
                        .arg("data")
                        .arg(data)
                        .query_async(&mut connection)
                        .await
                        .unwrap();
                    last = entry.id.clone();
                }
            }
        }
    });
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        dispatchd::bus::redis::requeue_unreadable(&url, &stream),
    )
    .await
    .expect("requeue ends");
    stop.cancel();
    older.await.unwrap();
    assert_eq!(done.unwrap().moved, 250, "each kept entry moved once");
    let length: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(length, 250);
}

/// What a source keeps in `<source>:unreadable`, oldest first.
async fn kept_entries(
    connection: &mut redis::aio::MultiplexedConnection,
    source: &str,
) -> redis::streams::StreamRangeReply {
    redis::cmd("XRANGE")
        .arg(format!("{source}:unreadable"))
        .arg("-")
        .arg("+")
        .query_async(connection)
        .await
        .unwrap()
}

/// Build, then run: a start that fails at its last step (the engine refuses a route) leaves no
/// task and no Redis connection behind, though the Redis bus, its dead-letter file, a sink and a
/// JSONL dispatcher were all set up before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_at_its_last_step_leaves_no_task_and_no_connection() {
    let Some((own, url)) = own_redis().await else {
        return;
    };
    let clients = || async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut connection)
            .await
            .unwrap();
        // This connection is one of them.
        list.lines().count() - 1
    };
    let dir = tempfile::tempdir().unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let mut config = crate::support::test_config(dir.path());
    use_redis(&mut config, &url, &unique("failed-start"), "failed-start");
    let built = dispatchd::app::App::builder(config)
        .route(dispatchd::engine::Route::new(
            "broken",
            "**",
            dispatchd::engine::Category::Event,
            "nobody",
        ))
        .build()
        .await;
    let Err(error) = built else {
        panic!("the engine refuses a route to an unknown dispatcher")
    };
    assert!(format!("{error:#}").contains("nobody"), "{error:#}");
    wait_for_async("no connection of the failed start left", || async {
        clients().await == 0
    })
    .await;
    wait_for_async("no task of the failed start left", || async {
        metrics.num_alive_tasks() <= baseline
    })
    .await;
    drop(own);
}
