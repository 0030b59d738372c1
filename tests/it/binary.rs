//! The real binary, run as a user would.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub(crate) const BINARY: &str = env!("CARGO_BIN_EXE_dispatchd");

/// Kills the child if a test fails before it stopped it.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary in `dir` on a free port, on the embedded defaults but for `server` (the
/// body of a `[server]` table), and returns it with the address it logged.
fn start(dir: &std::path::Path, server: &str) -> (Running, String) {
    let config = dir.join("dispatchd.toml");
    std::fs::write(&config, format!("[server]\n{server}\n")).unwrap();
    let child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir)
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env_remove("DISPATCHD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    started(child)
}

/// SIGTERM as a load balancer sees it: `/ready` turns 503 `shutting_down` while ingest is still
/// served for the drain delay; then the process stops cleanly with every message committed.
#[tokio::test]
async fn serves_the_embedded_defaults_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut running, addr) = start(dir.path(), "drain_delay = \"2s\"");

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = client
        .post(format!("http://{addr}/api/v1/messages/shop.orders.events"))
        .json(&json!({"message_type": "order.placed", "payload": {"order_id": 42}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success");

    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    crate::support::wait_for_async("/ready to answer 503 after SIGTERM", || async {
        let ready = client
            .get(format!("http://{addr}/ready"))
            .send()
            .await
            .expect("the listener stays open while draining");
        ready.status() == 503 && ready.json::<Value>().await.unwrap()["status"] == "shutting_down"
    })
    .await;
    let draining = client
        .post(format!("http://{addr}/api/v1/messages/shop.orders.events"))
        .json(&json!({"message_type": "order.placed", "payload": {"order_id": 43}}))
        .send()
        .await
        .expect("the listener stays open while draining");
    assert_eq!(draining.status(), 200, "still served while draining");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dispatchd did not exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");

    let text = std::fs::read_to_string(dir.path().join("dispatchd-data/messages.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["payload"]["order_id"], 42);
    assert_eq!(lines[0]["message_id"], result["message_id"]);
    assert_eq!(lines[1]["payload"]["order_id"], 43);
}

#[test]
fn check_config_prints_every_problem_with_its_location_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"nowhere\"\n\n[[routes]]\nroute_id = \"r\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"ghost\"\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    let path = file.display();
    assert!(
        stderr.contains(&format!("{path}:2: `server.listen`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{path}:8: `routes[0].dispatcher_id`: route `r` names dispatcher `ghost`"
        )),
        "{stderr}"
    );
}

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("good.toml");
    std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:9100\"\n").unwrap();
    let output = Command::new(BINARY)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("is valid: 2 dispatchers, 2 routes, listening on 127.0.0.1:9100"),
        "{stdout}"
    );
}

/// Every example config in examples/ is valid as shipped, without a warning, and together they
/// show every dispatcher kind and a command dispatcher.
#[test]
fn check_config_accepts_every_example_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut kinds = std::collections::BTreeSet::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let output = Command::new(BINARY)
            .arg("check-config")
            .arg(&path)
            .env("BILLING_TOKEN", "Bearer example-token")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}: {stdout}{stderr}",
            path.display()
        );
        assert!(
            !stdout.contains("warning") && !stderr.contains("warning"),
            "{}: {stdout}{stderr}",
            path.display()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let config: toml::Table = toml::from_str(&text).unwrap();
        for dispatcher in config["dispatchers"].as_array().unwrap() {
            let kind = dispatcher["kind"].as_str().unwrap();
            kinds.insert(match dispatcher["category"].as_str().unwrap() {
                "command" => format!("{kind} command"),
                _ => kind.to_owned(),
            });
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
    let mut expected: std::collections::BTreeSet<String> = dispatchd::config::DispatcherKind::NAMES
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
    expected.insert("http command".to_owned());
    assert_eq!(kinds, expected);
}

/// The exact output of check-config for a file with several problems of every kind, found
/// through `--config` after the subcommand, before it, and DISPATCHD_CONFIG.
#[test]
fn check_config_finds_its_file_wherever_it_is_named_and_prints_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "[server]\nlistn = \"x\"\nmax_body_bytes = \"1MB\"\n[metrics]\nenabld = true\n",
    )
    .unwrap();
    let path = file.display();
    let expected = format!(
        "error: invalid configuration (3 problems):\n  {path}:2: `server.listn`: unknown field (did you mean `listen`?)\n  {path}:3: `server.max_body_bytes`: must be a whole number, 0 or more (found string \"1MB\")\n  {path}:5: `metrics.enabld`: unknown field (did you mean `enabled`?)\n"
    );
    let runs = [
        Command::new(BINARY)
            .args(["check-config", "--config"])
            .arg(&file)
            .output(),
        Command::new(BINARY)
            .arg("--config")
            .arg(&file)
            .arg("check-config")
            .output(),
        Command::new(BINARY)
            .arg("check-config")
            .env("DISPATCHD_CONFIG", &file)
            .output(),
    ];
    for output in runs {
        let output = output.unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert_eq!(String::from_utf8(output.stderr).unwrap(), expected);
    }
}

/// `dispatchd config`: the merged configuration as TOML that reads back, secrets masked, the
/// environment's overrides in it.
#[test]
fn config_prints_the_effective_configuration_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("with-secrets.toml");
    std::fs::write(
        &file,
        "[auth]\napi_token = \"supersecret-token-1234\"\n[metrics]\nnamespace = \"shop\"\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .arg("config")
        .arg("--config")
        .arg(&file)
        .env("DISPATCHD_LISTEN", "127.0.0.1:9555")
        .env_remove("DISPATCHD_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(!text.contains("supersecret"), "{text}");
    let table: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(table["server"]["listen"].as_str(), Some("127.0.0.1:9555"));
    assert_eq!(table["metrics"]["namespace"].as_str(), Some("shop"));
    assert_eq!(table["auth"]["api_token"].as_str(), Some("[REDACTED]"));
    assert!(
        table["dispatchers"]
            .as_array()
            .is_some_and(|d| d.len() == 2)
    );
}

/// `serve --log-format json`: one JSON object per line, and the line a dispatcher logs inside a
/// dispatch carries the caller's trace id and the dispatch's span id.
#[tokio::test]
async fn json_logs_carry_the_trace_of_the_dispatch_they_happen_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BINARY)
        .args(["serve", "--log-format", "json"])
        .current_dir(dir.path())
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env_remove("DISPATCHD_CONFIG")
        .env_remove("DISPATCHD_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let _running = Running(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| -> Value {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no log line while waiting for {what}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr = loop {
        let line = next("the listen address");
        if let Some(listen) = line["fields"]["listen"].as_str() {
            // The startup line names the instance: host name and the port bound.
            let port = listen.rsplit(':').next().unwrap();
            assert_eq!(
                line["fields"]["instance_id"],
                format!("{}:{port}", dispatchd::config::host_name()),
                "{line}"
            );
            break listen.to_owned();
        }
    };

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/messages/shop.orders.events"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"message_type": "order.placed", "payload": {"order_id": 7}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["trace_id"], trace_id);

    let line = loop {
        let line = next("the log dispatcher's line");
        if line["fields"]["message"] == "Received a message." {
            break line;
        }
    };
    let spans = line["spans"].as_array().expect("the spans in scope");
    let ingest = spans
        .iter()
        .find(|span| span["trace_id"].is_string())
        .unwrap_or_else(|| panic!("no span with a trace id on {line}"));
    assert_eq!(ingest["trace_id"], trace_id, "on {line}");
    let span_id = ingest["span_id"].as_str().unwrap();
    assert_eq!(span_id.len(), 16, "a W3C span id: {span_id}");
    assert!(span_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(
        span_id, "00f067aa0ba902b7",
        "our own span, not the caller's"
    );
    assert_eq!(line["level"], "INFO");
}

/// The binary as an operator runs it against a collector: `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` from the environment, `[otlp] metrics` from
/// the file; the dispatch's spans and the metrics both arrive, under that service name.
#[tokio::test]
async fn the_binary_exports_traces_and_metrics_to_the_collector_in_its_environment() {
    let (endpoint, received) = crate::support::otlp_receiver();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatchd.toml");
    std::fs::write(
        &config,
        "[otlp]\nmetrics = true\nmetrics_interval = \"100ms\"\n",
    )
    .unwrap();
    let child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env("DISPATCHD_LOG", "warn,dispatchd=info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_SERVICE_NAME", "checkout-dispatch")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env("DISPATCHD_API_TOKEN", "otlp-test-token-7c1e9a44d2")
        .env_remove("DISPATCHD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let (running, addr) = started(child);

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/messages/shop.orders.events"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .bearer_auth("otlp-test-token-7c1e9a44d2")
        .header("x-api-key", "otlp-test-api-key-55")
        .json(
            &json!({"message_type": "order.placed", "payload": {"password": "otlp-test-password"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    crate::support::wait_for("the dispatch span and a metrics push", || {
        let spans = crate::support::otlp_spans(&received);
        let dispatched = spans.iter().any(|(_, span)| {
            span.name == "process shop.orders.events" && hex(&span.trace_id) == trace_id
        });
        let pushed = |name: &str| {
            crate::support::otlp_metrics(&received)
                .iter()
                .any(|request| {
                    request
                        .resource_metrics
                        .iter()
                        .flat_map(|r| &r.scope_metrics)
                        .flat_map(|s| &s.metrics)
                        .any(|m| m.name == name && otlp_count(m) > 0)
                })
        };
        // The latency histograms are dispatchd's own on `/metrics`; with OTLP on, the SDK's
        // copies are recorded too, and pushed.
        dispatched
            && pushed("dispatch_messages")
            && pushed("dispatch_duration")
            && pushed("dispatcher_execution_duration")
            && pushed("http.server.request.duration")
    })
    .await;
    let spans = crate::support::otlp_spans(&received);
    let (service, dispatch) = spans
        .iter()
        .find(|(_, span)| span.name == "process shop.orders.events")
        .unwrap();
    assert!(
        service.contains("checkout-dispatch"),
        "service.name {service}"
    );
    let children: Vec<&str> = spans
        .iter()
        .filter(|(_, span)| span.parent_span_id == dispatch.span_id)
        .map(|(_, span)| span.name.as_str())
        .collect();
    assert!(
        children.contains(&"dispatcher log"),
        "children {children:?}"
    );
    let request = &crate::support::otlp_metrics(&received)[0];
    let attributes = format!("{:?}", request.resource_metrics[0].resource);
    assert!(attributes.contains("checkout-dispatch"), "{attributes}");
    assert!(
        attributes.contains("deployment.environment"),
        "{attributes}"
    );
    // Neither the token, nor a secret header, nor a secret in the payload is in any export.
    for (_, body) in received.lock().unwrap().iter() {
        let bytes = String::from_utf8_lossy(body);
        for secret in [
            "otlp-test-token-7c1e9a44d2",
            "otlp-test-api-key-55",
            "otlp-test-password",
        ] {
            assert!(!bytes.contains(secret), "{secret} was exported");
        }
    }
    drop(running);
}

/// A collector nobody listens at: each export that fails (after the exporter's retries) is
/// counted per signal on `/metrics`, and logged at most once a minute per signal instead of the
/// SDK's own line per failed request. Dispatch answers as usual.
#[tokio::test]
async fn exports_to_an_unreachable_collector_are_counted_per_signal_and_logged_once_a_minute() {
    // A loopback port nobody listens on: bound, then let go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatchd.toml");
    std::fs::write(
        &config,
        format!(
            "[otlp]\nendpoint = \"http://{closed}\"\nmetrics = true\nmetrics_interval = \"100ms\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env("DISPATCHD_LOG", "info")
        .env_remove("DISPATCHD_CONFIG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let (running, addr, log) = started_keeping_log(child);
    let client = reqwest::Client::new();
    let failed = || {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            let text = client
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let at = |signal: &str| {
                crate::support::sample(
                    &text,
                    &format!("otlp_exports_failed_total{{signal=\"{signal}\"}}"),
                )
                .unwrap_or(0.0)
            };
            (at("traces"), at("metrics"))
        }
    };
    // Two span exports (a dispatch's spans are exported within a second), each failing.
    for round in 1..=2 {
        let response = client
            .post(format!("http://{addr}/api/v1/messages/shop.orders.events"))
            .json(&json!({"message_type": "order.placed", "payload": {"round": round}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "dispatch is unaffected");
        crate::support::wait_for_async("a failed span export", || async {
            failed().await.0 >= f64::from(round)
        })
        .await;
    }
    crate::support::wait_for_async("two failed metrics pushes", || async {
        failed().await.1 >= 2.0
    })
    .await;

    let lines = log.lock().unwrap().clone();
    let reported = |signal: &str| {
        lines
            .iter()
            .filter(|line| {
                line.contains("Exporting to the OTLP collector failed")
                    && line.contains(&format!("signal=\"{signal}\""))
            })
            .count()
    };
    assert_eq!(reported("traces"), 1, "{lines:#?}");
    assert_eq!(reported("metrics"), 1, "{lines:#?}");
    assert!(
        !lines
            .iter()
            .any(|line| line.contains("Export.Failed")
                || line.contains("PeriodicReader.ExportError")),
        "the SDK's line per failed request is left out: {lines:#?}"
    );
    drop(running);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits for a spawned `serve` to log its address (text logs) and keeps draining its stdout.
fn started(child: Child) -> (Running, String) {
    let (running, addr, _) = started_keeping_log(child);
    (running, addr)
}

/// The log lines a child wrote to stdout so far.
pub(crate) type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Like [`started`], and keeps the log lines written after the one with the address.
pub(crate) fn started_keeping_log(mut child: Child) -> (Running, String, Log) {
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("dispatchd logs before exiting")
            .unwrap();
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let log = Log::default();
    let keep = log.clone();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            keep.lock().unwrap().push(line);
        }
    });
    (running, addr, log)
}

/// Credentials in a payload, in headers and in tokens (right and wrong) reach neither the log
/// (at debug, JSON), nor the dispatch events a sink forwards, nor any error answer.
#[tokio::test]
async fn secrets_never_reach_logs_events_or_error_answers() {
    const TOKEN: &str = "api-token-5e2d1f0b9a8c7d6e";
    const WRONG: &str = "api-token-0000ffff1111eeee";
    const PASSWORD: &str = "hunter2-correct-horse";
    const API_KEY: &str = "sk-live-7f3a9b2c4d";
    const DSN: &str = "s3cr3t-dsn-pass";
    let dir = tempfile::tempdir().unwrap();
    // Stopped with SIGTERM below: no load balancer to wait for.
    let config = dir.path().join("dispatchd.toml");
    std::fs::write(&config, "[server]\ndrain_delay = \"0s\"\n").unwrap();
    let mut child = Command::new(BINARY)
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env("DISPATCHD_LOG", "debug")
        .env("DISPATCHD_API_TOKEN", TOKEN)
        .env_remove("DISPATCHD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut running = Running(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let lines_tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let _ = lines_tx.send(line);
            }
        });
    }
    drop(lines_tx);
    let mut log = Vec::new();
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("dispatchd logs its address");
        log.push(line.clone());
        if let Ok(json) = serde_json::from_str::<Value>(&line) {
            if let Some(listen) = json["fields"]["listen"].as_str() {
                break listen.to_owned();
            }
        }
    };

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/messages/shop.orders.events");
    let body = json!({
        "message_type": "order.placed",
        "headers": {"x-api-key": API_KEY},
        "payload": {
            "order_id": 9,
            "customer": {"password": PASSWORD, "apiKey": API_KEY},
            "dsn": format!("postgres://app:{DSN}@db/orders"),
        },
    });
    let mut answers = String::new();
    for bearer in [None, Some(WRONG), Some(TOKEN)] {
        let mut request = client.post(&url).header("x-api-key", API_KEY).json(&body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let response = request.send().await.unwrap();
        let expected = if bearer == Some(TOKEN) { 200 } else { 401 };
        assert_eq!(response.status(), expected);
        answers.push_str(&response.text().await.unwrap());
    }
    let bad = client
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(format!("{{\"password\": \"{PASSWORD}\", \"api_key\": "))
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error(), "{}", bad.status());
    answers.push_str(&bad.text().await.unwrap());

    // Stop it: the sink flushes its events file on the way out.
    crate::support::terminate(&mut running.0).await;
    log.extend(lines.try_iter());
    let log = log.join("\n");
    let events = std::fs::read_to_string(dir.path().join("dispatchd-data/events.jsonl")).unwrap();
    assert!(
        events.contains("\"order_id\":9"),
        "the event was forwarded: {events}"
    );
    assert!(
        log.contains("Received a message."),
        "the message was logged"
    );
    for secret in [TOKEN, WRONG, PASSWORD, API_KEY, DSN] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        assert!(
            !events.contains(secret),
            "{secret} in the events:\n{events}"
        );
        assert!(
            !answers.contains(secret),
            "{secret} in an answer:\n{answers}"
        );
    }
}

/// SIGTERM while clients are sending: every message answered 200 is in the JSONL file and has
/// its dispatch event, and the process exits cleanly. Requests after the listener closed fail
/// to connect or answer 503; none is half-accepted.
#[tokio::test]
async fn sigterm_under_load_loses_no_accepted_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mut running, addr) = start(dir.path(), "drain_delay = \"0s\"");
    let accepted: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for worker in 0..4 {
        let accepted = accepted.clone();
        let count = count.clone();
        let url = format!("http://{addr}/api/v1/messages/shop.orders.events");
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0..5_000 {
                let sent = client
                    .post(&url)
                    .json(&json!({"message_type": "order.placed", "payload": {"worker": worker, "n": n}}))
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                let status = response.status().as_u16();
                let Ok(result) = response.json::<Value>().await else { return };
                match status {
                    200 => {
                        accepted.lock().unwrap().push((
                            result["message_id"].as_str().unwrap().to_owned(),
                            result["dispatch_id"].as_str().unwrap().to_owned(),
                        ));
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    503 => assert_eq!(result["error"]["code"], "shutting_down"),
                    other => panic!("unexpected status {other}: {result}"),
                }
            }
        }));
    }
    crate::support::wait_for("300 accepted messages", || {
        count.load(std::sync::atomic::Ordering::SeqCst) >= 300
    })
    .await;
    let status = crate::support::terminate(&mut running.0).await;
    assert!(status.success(), "exit status {status}");
    for client in clients {
        client.await.unwrap();
    }

    let accepted = accepted.lock().unwrap().clone();
    let written: std::collections::BTreeSet<String> =
        std::fs::read_to_string(dir.path().join("dispatchd-data/messages.jsonl"))
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["message_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
    let events: std::collections::BTreeSet<String> =
        std::fs::read_to_string(dir.path().join("dispatchd-data/events.jsonl"))
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["runId"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
    assert!(accepted.len() >= 300);
    for (message_id, dispatch_id) in &accepted {
        assert!(
            written.contains(message_id),
            "accepted {message_id} is not in messages.jsonl"
        );
        assert!(
            events.contains(dispatch_id),
            "accepted dispatch {dispatch_id} has no event"
        );
    }
}

/// A file's `[defaults.*]`: `check-config` reports a bad one once, at its line, however many
/// elements take it, and `dispatchd config` shows the value each element ends up with.
#[test]
fn defaults_of_a_file_are_checked_at_their_line_and_shown_on_each_element() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defaults.toml");
    let dispatchers = "[[dispatchers]]\ndispatcher_id = \"a\"\nkind = \"log\"\ncategory = \"event\"\n\n[[dispatchers]]\ndispatcher_id = \"b\"\nkind = \"log\"\ncategory = \"event\"\ntimeout = \"1s\"\n\n[[routes]]\nroute_id = \"a\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"a\"\n\n[[routes]]\nroute_id = \"b\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"b\"\n";
    std::fs::write(
        &file,
        format!("[defaults.sinks]\nbatch_size = 0\n\n[defaults.dispatchers]\ntimeout = \"soon\"\n\n{dispatchers}[[sinks]]\nname = \"x\"\nservice = \"file\"\nendpoint = \"x.jsonl\"\n[[sinks]]\nname = \"y\"\nservice = \"file\"\nendpoint = \"y.jsonl\"\n"),
    )
    .unwrap();
    let output = Command::new(BINARY)
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let path = file.display();
    assert_eq!(
        String::from_utf8(output.stderr).unwrap(),
        format!(
            "error: invalid configuration (2 problems):\n  {path}:2: `defaults.sinks.batch_size`: must be between 1 and 10000\n  {path}:5: `defaults.dispatchers.timeout`: `soon` is not a duration such as \"30s\" or \"500ms\": expected number at 0\n"
        )
    );

    std::fs::write(
        &file,
        format!("[defaults.dispatchers]\ntimeout = \"5s\"\n\n{dispatchers}"),
    )
    .unwrap();
    let output = Command::new(BINARY)
        .arg("config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let table: toml::Table = toml::from_str(&String::from_utf8(output.stdout).unwrap()).unwrap();
    let timeouts: Vec<&str> = table["dispatchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["timeout"].as_str().unwrap())
        .collect();
    assert_eq!(timeouts, ["5s", "1s"]);
    assert_eq!(
        table["defaults"]["dispatchers"]["timeout"].as_str(),
        Some("5s")
    );
}

/// A pushed metric's total: a sum's values, a histogram's counts.
fn otlp_count(metric: &opentelemetry_proto::tonic::metrics::v1::Metric) -> u64 {
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value};
    match &metric.data {
        Some(Data::Histogram(histogram)) => histogram.data_points.iter().map(|p| p.count).sum(),
        Some(Data::Sum(sum)) => sum
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(Value::AsInt(n)) => n as u64,
                Some(Value::AsDouble(x)) => x as u64,
                None => 0,
            })
            .sum(),
        _ => 0,
    }
}
