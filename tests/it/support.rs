use std::net::SocketAddr;
use std::time::Duration;

use dispatchd::app::{App, AppBuilder};
use dispatchd::config::{Config, DispatcherKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running dispatchd on a free loopback port, stopped by [`TestApp::stop`] (or on drop).
pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    telemetry_enabled: bool,
    pub(crate) client: reqwest::Client,
    pub(crate) dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The embedded defaults, listening on a free port, writing under `dir`.
pub(crate) fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config::embedded().expect("embedded defaults are valid");
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    // No load balancer to drain: stop at once (tests of the drain set their own).
    config.server.drain_delay = Duration::ZERO;
    for dispatcher in &mut config.dispatchers {
        if let DispatcherKind::Jsonl { path } = &mut dispatcher.kind {
            *path = dir.join("messages.jsonl");
        }
    }
    for sink in &mut config.sinks {
        if sink.sink.service == "file" {
            sink.sink.endpoint = Some(
                dir.join(format!("{}.jsonl", sink.sink.name))
                    .display()
                    .to_string(),
            );
        }
        sink.driver.dead_letter = dir.join(format!("{}.dead-letters.jsonl", sink.sink.name));
    }
    config
}

impl TestApp {
    pub(crate) async fn start() -> TestApp {
        TestApp::start_with(|_| {}, |builder| builder).await
    }

    pub(crate) async fn start_with(
        edit: impl FnOnce(&mut Config),
        extend: impl FnOnce(AppBuilder) -> AppBuilder,
    ) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        edit(&mut config);
        let app = extend(App::builder(config))
            .build()
            .await
            .expect("app builds");
        let addr = app.local_addr();
        let telemetry_enabled = app.telemetry().is_enabled();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        TestApp {
            addr,
            telemetry_enabled,
            client,
            dir,
            shutdown,
            task: Some(task),
        }
    }

    pub(crate) fn telemetry_enabled(&self) -> bool {
        self.telemetry_enabled
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) async fn post_message(
        &self,
        topic: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/api/v1/messages/{topic}")))
            .json(&body)
            .send()
            .await
            .expect("request sent")
    }

    /// Posts `count` order events, each answered 200 (the process keeps serving whatever a
    /// sink or the bus does), and returns their dispatch ids.
    pub(crate) async fn post_orders(&self, count: usize) -> std::collections::BTreeSet<String> {
        let mut ids = std::collections::BTreeSet::new();
        for n in 0..count {
            let response = self
                .post_message(
                    "shop.orders.events",
                    serde_json::json!({"message_type": "order.placed", "payload": {"n": n}}),
                )
                .await;
            assert_eq!(response.status(), reqwest::StatusCode::OK, "message {n}");
            let result: serde_json::Value = response.json().await.unwrap();
            ids.insert(result["dispatch_id"].as_str().unwrap().to_owned());
        }
        ids
    }

    /// The text of `GET /metrics`.
    pub(crate) async fn scrape(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await;
        response
            .expect("request sent")
            .text()
            .await
            .expect("a text answer")
    }

    /// `GET path`, answered as JSON (whatever the status).
    pub(crate) async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON answer")
    }

    pub(crate) fn jsonl_lines(&self) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("messages.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    /// Signals shutdown without waiting.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the service and keeps its files: what `App::run` returned, and the directory.
    pub(crate) async fn stop_keeping_files(mut self) -> (anyhow::Result<()>, tempfile::TempDir) {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (self.stop().await, dir)
    }

    /// Stops the service and returns what `App::run` returned, within a bound.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("dispatchd stops within 30 s")
            .expect("the run task did not panic")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits for `condition` with a bound, polling on tokio's clock.
pub(crate) async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    // 20 s at most: generous for a loaded 2-core CI machine, instant under paused time.
    for _ in 0..2000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Finds an external tool the test needs. Outside CI a missing tool skips the test with a
/// visible message; with `DISPATCHD_REQUIRE_TOOLS=1` (set by `.ci/run`) it fails the test.
pub(crate) fn required_tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("DISPATCHD_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{name} is required (DISPATCHD_REQUIRE_TOOLS=1) but not on PATH: install the Debian package that provides it (prometheus, redis-server, nats-server, haproxy, nginx-light)"
        );
        eprintln!(
            "SKIPPED: {name} is not on PATH (install the Debian package that provides it to run this test)"
        );
    }
    found
}

/// Waits for an async `condition` with a bound.
pub(crate) async fn wait_for_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // 20 s at most: generous for a loaded 2-core CI machine, instant under paused time.
    for _ in 0..2000 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The value of one exact series line of a scrape (`name{labels}`), if present.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// What an OTLP receiver got: the path posted to (`/v1/traces`, `/v1/metrics`) and the body.
pub(crate) type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, axum::body::Bytes)>>>;

/// A loopback OTLP/HTTP receiver on a thread of its own: it answers 200 to every `POST` and
/// keeps the path and the body (protobuf, to decode with `opentelemetry-proto`). Returns the
/// base URL to configure as the OTLP endpoint.
pub(crate) fn otlp_receiver() -> (String, Received) {
    let received: Received = Default::default();
    let (address, ready) = std::sync::mpsc::channel();
    let keep = received.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            address.send(listener.local_addr().unwrap()).unwrap();
            let router = axum::Router::new().fallback(
                move |uri: axum::http::Uri, body: axum::body::Bytes| {
                    keep.lock().unwrap().push((uri.path().to_owned(), body));
                    async { axum::http::StatusCode::OK }
                },
            );
            axum::serve(listener, router).await.unwrap();
        });
    });
    let address: SocketAddr = ready.recv().unwrap();
    (format!("http://{address}"), received)
}

/// The metrics export requests an OTLP receiver got, decoded.
pub(crate) fn otlp_metrics(
    received: &Received,
) -> Vec<opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest> {
    use prost::Message as _;
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _)| path == "/v1/metrics")
        .map(|(_, body)| {
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest::decode(
                body.clone(),
            )
            .unwrap()
        })
        .collect()
}

/// The spans an OTLP receiver got, with their resource's `service.name`.
pub(crate) fn otlp_spans(
    received: &Received,
) -> Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)> {
    use prost::Message as _;
    let mut spans = Vec::new();
    for (path, body) in received.lock().unwrap().iter() {
        if path != "/v1/traces" {
            continue;
        }
        let request =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                body.clone(),
            )
            .unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .map(|a| format!("{:?}", a.value))
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push((service.clone(), span));
            }
        }
    }
    spans
}

/// Sends SIGTERM to `child` and waits (bounded) for it to exit.
pub(crate) async fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIGTERM to {pid}");
    for _ in 0..3000 {
        if let Some(status) = child.try_wait().expect("the child's status") {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the process did not exit within 30 s of SIGTERM");
}

/// A handler that always fails: transiently (retried where a policy allows) or permanently.
pub(crate) struct Failing {
    pub(crate) transient: bool,
    pub(crate) message: &'static str,
}

#[async_trait::async_trait]
impl dispatchd::engine::Handler for Failing {
    async fn handle(
        &self,
        _: &dispatchd::engine::Message<'_>,
    ) -> Result<Vec<dispatchd::engine::OutputMessage>, dispatchd::engine::HandlerError> {
        Err(if self.transient {
            dispatchd::engine::HandlerError::transient(self.message)
        } else {
            dispatchd::engine::HandlerError::permanent(self.message)
        })
    }
}

/// A handler that holds each call until the test releases a permit: it counts arrivals and
/// tells the test when a call has entered.
#[derive(Clone)]
pub(crate) struct Gate {
    pub(crate) arrived: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) entered: std::sync::Arc<tokio::sync::Notify>,
    pub(crate) release: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Gate {
    pub(crate) fn new() -> Gate {
        Gate {
            arrived: Default::default(),
            entered: Default::default(),
            release: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

#[async_trait::async_trait]
impl dispatchd::engine::Handler for Gate {
    async fn handle(
        &self,
        _: &dispatchd::engine::Message<'_>,
    ) -> Result<Vec<dispatchd::engine::OutputMessage>, dispatchd::engine::HandlerError> {
        self.arrived
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.entered.notify_one();
        let _permit = self
            .release
            .acquire()
            .await
            .map_err(|_| dispatchd::engine::HandlerError::permanent("closed"))?;
        Ok(Vec::new())
    }
}
