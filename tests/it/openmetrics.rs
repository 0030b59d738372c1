//! `/metrics` in OpenMetrics 1.0: content negotiation, the official Python parser on the output,
//! and exemplars that name the traces of sampled dispatches, which the OTLP export carries too.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::support::Received;

/// What Prometheus 2.x sends when it scrapes.
pub(crate) const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// The real binary, every trace sampled and exported to a loopback OTLP receiver: the process's
/// own subscriber reads a caller's `traceparent`, as in production.
pub(crate) struct TracedApp {
    running: crate::binary::Running,
    pub(crate) addr: String,
    received: Received,
    _dir: tempfile::TempDir,
}

impl TracedApp {
    pub(crate) async fn start() -> TracedApp {
        let (endpoint, received) = crate::support::otlp_receiver();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dispatchd.toml");
        std::fs::write(&config, "[tracing]\nsampling_ratio = 1.0\n").unwrap();
        let child = Command::new(crate::binary::BINARY)
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .env("DISPATCHD_LISTEN", "127.0.0.1:0")
            .env("DISPATCHD_LOG", "warn,dispatchd=info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env_remove("DISPATCHD_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let (running, addr, _) = crate::binary::started_keeping_log(child);
        TracedApp {
            running,
            addr,
            received,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Posts an order event as part of the caller's trace `trace_id`, sampled or not.
    pub(crate) async fn post_in_trace(&self, trace_id: &str, sampled: bool) {
        let flags = if sampled { "01" } else { "00" };
        let response = reqwest::Client::new()
            .post(self.url("/api/v1/messages/shop.orders.events"))
            .header(
                "traceparent",
                format!("00-{trace_id}-b7ad6b7169203331-{flags}"),
            )
            .json(&json!({"message_type": "order.placed", "payload": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let result: Value = response.json().await.unwrap();
        assert_eq!(result["trace_id"], trace_id);
    }

    /// The trace ids of the dispatch spans the OTLP receiver got, once `expected` are all there
    /// (the process exports from a thread of its own; bounded wait).
    pub(crate) async fn exported_trace_ids(&self, expected: &[String]) -> BTreeSet<String> {
        let exported = || -> BTreeSet<String> {
            crate::support::otlp_spans(&self.received)
                .into_iter()
                .filter(|(_, span)| span.name == "process shop.orders.events")
                .map(|(_, span)| hex(&span.trace_id))
                .collect()
        };
        crate::support::wait_for("the dispatch spans over OTLP", || {
            let exported = exported();
            expected.iter().all(|id| exported.contains(id))
        })
        .await;
        exported()
    }

    pub(crate) async fn stop(mut self) {
        let status = crate::support::terminate(&mut self.running.0).await;
        assert!(
            status.success(),
            "dispatchd exits cleanly on SIGTERM: {status}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sampled trace ids, distinct per test run.
pub(crate) fn trace_ids(count: usize) -> Vec<String> {
    (0..count)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect()
}

/// Python with `prometheus_client`, or `None` (skipped, visibly) outside CI.
fn python_with_prometheus_client() -> Option<std::path::PathBuf> {
    let python = crate::support::required_tool("python3")?;
    let found = Command::new(&python)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var("DISPATCHD_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "the Python package prometheus_client is required (DISPATCHD_REQUIRE_TOOLS=1): python3 -m pip install prometheus_client"
        );
        eprintln!(
            "SKIPPED: the Python package prometheus_client is not installed (python3 -m pip install prometheus_client)"
        );
        return None;
    }
    Some(python)
}

/// Runs tests/data/openmetrics_parse.py on `text`: its JSON, or the parser's error.
fn parse_with_prometheus_client(python: &std::path::Path, text: &str) -> Value {
    use std::io::Write as _;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/openmetrics_parse.py"
    );
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client refuses the OpenMetrics output: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn scrape(app: &TracedApp, accept: Option<&str>) -> (String, Option<String>, String) {
    let mut request = reqwest::Client::new().get(app.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let vary = response
        .headers()
        .get("vary")
        .map(|v| v.to_str().unwrap().to_owned());
    (content_type, vary, response.text().await.unwrap())
}

#[tokio::test]
async fn openmetrics_parses_with_prometheus_client_and_its_exemplars_are_the_sampled_traces() {
    let traced = TracedApp::start().await;
    let sampled = trace_ids(6);
    let unsampled = trace_ids(3);
    for trace_id in &sampled {
        traced.post_in_trace(trace_id, true).await;
    }
    for trace_id in &unsampled {
        traced.post_in_trace(trace_id, false).await;
    }

    // Asked as Prometheus asks: OpenMetrics.
    let (content_type, vary, text) = scrape(&traced, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert_eq!(vary.as_deref(), Some("accept"));
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE dispatch_messages counter\n"));
    assert!(text.contains("# UNIT dispatch_duration_seconds seconds\n"));

    // Not asked: the 0.0.4 text, no exemplars, no EOF.
    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (content_type, _, plain) = scrape(&traced, accept).await;
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(plain.contains("# TYPE dispatch_messages_total counter\n"));
        assert!(!plain.contains("# EOF") && !plain.contains("trace_id"));
    }

    let exported = traced.exported_trace_ids(&sampled).await;
    for trace_id in &sampled {
        assert!(exported.contains(trace_id), "{trace_id} exported over OTLP");
    }

    let Some(python) = python_with_prometheus_client() else {
        traced.stop().await;
        return;
    };
    let parsed = parse_with_prometheus_client(&python, &text);
    let families: BTreeSet<(String, String, String)> = parsed["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_owned(),
                f["type"].as_str().unwrap().to_owned(),
                f["unit"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("dispatch_messages", "counter", ""),
        ("dispatch_duration_seconds", "histogram", "seconds"),
        (
            "dispatcher_execution_duration_seconds",
            "histogram",
            "seconds",
        ),
        ("target", "info", ""),
    ] {
        let expected = (
            expected.0.to_owned(),
            expected.1.to_owned(),
            expected.2.to_owned(),
        );
        assert!(families.contains(&expected), "{expected:?} in {families:?}");
    }
    let exemplars = parsed["exemplars"].as_array().unwrap();
    for histogram in [
        "dispatch_duration_seconds_bucket",
        "dispatcher_execution_duration_seconds_bucket",
    ] {
        let traces: Vec<&str> = exemplars
            .iter()
            .filter(|e| e["sample"] == histogram)
            .map(|e| e["exemplar"]["trace_id"].as_str().unwrap())
            .collect();
        assert!(!traces.is_empty(), "{histogram} carries exemplars");
        for trace_id in traces {
            assert!(
                sampled.iter().any(|s| s == trace_id),
                "{trace_id} on {histogram} is one of the sampled dispatches"
            );
            assert!(exported.contains(trace_id), "{trace_id} is exported");
            assert!(!unsampled.iter().any(|u| u == trace_id));
        }
    }
    for exemplar in exemplars {
        // The exemplar's value lies in its bucket, its span id is a W3C span id and its time is
        // this run's.
        let le: f64 = match exemplar["le"].as_str().unwrap() {
            "+Inf" => f64::INFINITY,
            le => le.parse().unwrap(),
        };
        assert!(exemplar["value"].as_f64().unwrap() <= le, "{exemplar}");
        assert_eq!(exemplar["exemplar"]["span_id"].as_str().unwrap().len(), 16);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let at = exemplar["timestamp"].as_f64().unwrap();
        assert!(at > now - 600.0 && at <= now + 1.0, "{exemplar}");
    }
    traced.stop().await;
}
