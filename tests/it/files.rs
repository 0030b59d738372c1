//! The files dispatchd appends to: a torn last line left by a crash is moved aside at start, and
//! SIGHUP reopens every file (logrotate), in process and with the real binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatchd::config::DispatcherKind;
use serde_json::{Value, json};

use crate::support::{TestApp, sample, wait_for};

const BINARY: &str = env!("CARGO_BIN_EXE_dispatchd");

/// What a SIGKILL in the middle of a write leaves: whole lines, then part of one.
const FRAGMENT: &str = r#"{"topic":"shop.orders.events","category":"ev"#;

/// Every line of a JSON Lines file, each of which must parse.
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "{}: a line that does not parse ({e}): {line}",
                    path.display()
                )
            })
        })
        .collect()
}

fn with_fragment(path: &Path, whole: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("{whole}\n{FRAGMENT}")).unwrap();
}

#[tokio::test]
async fn torn_last_lines_are_moved_aside_at_start_so_every_line_parses() {
    let whole = json!({"topic": "earlier", "n": 0});
    let app = TestApp::start_with(
        |config| {
            for dispatcher in &config.dispatchers {
                if let DispatcherKind::Jsonl { path } = &dispatcher.kind {
                    with_fragment(path, &whole);
                }
            }
            for sink in &mut config.sinks {
                with_fragment(Path::new(sink.sink.endpoint.as_ref().unwrap()), &whole);
                sink.driver.flush_interval = Duration::from_millis(20);
            }
        },
        |builder| builder,
    )
    .await;
    let accepted = app.post_orders(3).await;

    let dir = app.dir.path().to_owned();
    let events = dir.join("events.jsonl");
    wait_for("the events to be flushed", || lines(&events).len() == 4).await;
    let messages = app.jsonl_lines();
    assert_eq!(messages.len(), 4, "the earlier line and one per message");
    assert_eq!(messages[0], whole);
    let run_ids: std::collections::BTreeSet<String> = lines(&events)[1..]
        .iter()
        .map(|event| event["runId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(run_ids, accepted);
    for name in ["messages.jsonl", "events.jsonl"] {
        let torn = std::fs::read_to_string(dir.join(format!("{name}.torn"))).unwrap();
        assert_eq!(torn, format!("{FRAGMENT}\n"), "{name}.torn");
    }
    let metrics = app.scrape().await;
    for kind in ["messages", "sink_events"] {
        assert_eq!(
            sample(
                &metrics,
                &format!(r#"file_torn_tails_total{{file_kind="{kind}"}}"#)
            ),
            Some(1.0),
            "{kind}: {metrics}"
        );
    }
    app.stop().await.unwrap();
}

/// The repair and slow-write counters of every appended file exist at zero from the start, so
/// that the first torn tail or slow write is an increase to Prometheus (a series that appears
/// at 1 is not one) and the dashboard's panel has its lines.
#[tokio::test]
async fn file_counters_start_at_zero_for_each_appended_file() {
    let app = TestApp::start().await;
    let metrics = app.scrape().await;
    for family in ["file_torn_tails_total", "file_slow_writes_total"] {
        for kind in ["messages", "sink_events"] {
            let series = format!(r#"{family}{{file_kind="{kind}"}}"#);
            assert_eq!(sample(&metrics, &series), Some(0.0), "{series}: {metrics}");
        }
    }
    app.stop().await.unwrap();
}

/// Kills the child if a test fails before it stopped it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dispatchd serve` as logrotate meets it: torn files at start, then `mv` and SIGHUP while it
/// serves. It stays up, new lines go to new files, the old ones keep the old lines, and every
/// accepted message and event is in one of them, once.
#[tokio::test]
async fn serve_repairs_torn_files_and_reopens_them_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dispatchd-data");
    let whole = json!({"topic": "earlier", "n": 0});
    with_fragment(&data.join("messages.jsonl"), &whole);
    with_fragment(&data.join("events.jsonl"), &whole);
    let config = dir.path().join("dispatchd.toml");
    std::fs::write(
        &config,
        "[[sinks]]\nname = \"events\"\nservice = \"file\"\nendpoint = \"./dispatchd-data/events.jsonl\"\nflush_interval = \"20ms\"\n",
    )
    .unwrap();
    let mut child = Command::new(BINARY)
        .args(["serve", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env("DISPATCHD_LOG", "warn,dispatchd=info")
        .env_remove("DISPATCHD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut running = Running(child);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (address, listening) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(rest) = line.split("listen=").nth(1) {
                    let _ = address.send(rest.split_whitespace().next().unwrap().to_owned());
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let addr = listening
        .recv_timeout(Duration::from_secs(20))
        .expect("dispatchd logs its address");
    let client = reqwest::Client::new();
    let post = |n: u32| {
        let request = client
            .post(format!("http://{addr}/api/v1/messages/shop.orders.events"))
            .json(&json!({"message_type": "order.placed", "payload": {"n": n}}))
            .send();
        async move {
            let response = request.await.expect("dispatchd answers");
            assert_eq!(response.status(), 200, "message {n}");
            let result: Value = response.json().await.unwrap();
            result["dispatch_id"].as_str().unwrap().to_owned()
        }
    };
    let before = [post(1).await, post(2).await];
    let events = data.join("events.jsonl");
    wait_for("the first events to be flushed", || {
        lines(&events).len() == 3
    })
    .await;

    // logrotate: move the files, then SIGHUP.
    for name in ["messages.jsonl", "events.jsonl"] {
        std::fs::rename(data.join(name), data.join(format!("{name}.1"))).unwrap();
    }
    let pid = running.0.id().to_string();
    let sent = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(sent.success());
    let after = [post(3).await, post(4).await];
    wait_for("the later events to be flushed", || {
        lines(&events).len() == 2
    })
    .await;
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "SIGHUP did not stop dispatchd"
    );

    let payloads = |path: &Path| -> Vec<Value> {
        lines(path)
            .into_iter()
            .map(|line| line["payload"]["n"].clone())
            .collect()
    };
    assert_eq!(
        payloads(&data.join("messages.jsonl.1")),
        [Value::Null, json!(1), json!(2)]
    );
    assert_eq!(payloads(&data.join("messages.jsonl")), [json!(3), json!(4)]);
    let run_ids = |path: &Path| -> Vec<String> {
        lines(path)
            .iter()
            .filter_map(|event| event["runId"].as_str().map(str::to_owned))
            .collect()
    };
    let mut old = run_ids(&data.join("events.jsonl.1"));
    old.sort();
    let mut expected = before.to_vec();
    expected.sort();
    assert_eq!(old, expected);
    let mut new = run_ids(&events);
    new.sort();
    let mut expected = after.to_vec();
    expected.sort();
    assert_eq!(new, expected);

    let status = crate::support::terminate(&mut running.0).await;
    assert!(status.success(), "exit status {status}");
    for name in ["messages.jsonl", "events.jsonl"] {
        let torn = std::fs::read_to_string(data.join(format!("{name}.torn"))).unwrap();
        assert_eq!(torn, format!("{FRAGMENT}\n"), "{name}.torn");
    }
    let log = log.lock().unwrap();
    for name in ["messages.jsonl", "events.jsonl"] {
        assert!(
            log.iter().any(|line| line.contains("WARN")
                && line.contains(&format!("dispatchd-data/{name}"))
                && line.contains(&format!("bytes={}", FRAGMENT.len()))),
            "a WARN line names {name} and the byte count: {log:#?}"
        );
    }
    assert!(
        log.iter().any(|line| line.contains("Received SIGHUP")),
        "{log:#?}"
    );
}

/// Group commit over HTTP, both ways: requests in flight together have their lines committed in
/// shared writes, and each one finds its own line in the file the moment its 200 arrives; a
/// write that fails (ENOSPC on /dev/full) fails exactly the requests whose lines it carried,
/// with a 502 naming the file, while the other file's writer keeps answering 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_see_their_line_before_their_answer_and_a_failed_write_fails_only_its_own()
 {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    let toml = format!(
        r#"
[[dispatchers]]
dispatcher_id = "good"
kind = "jsonl"
category = "event"
path = "{}"

[[dispatchers]]
dispatcher_id = "full"
kind = "jsonl"
category = "event"
path = "/dev/full"

[[routes]]
route_id = "good"
topic_pattern = "shop.good.events"
message_category = "event"
dispatcher_id = "good"

[[routes]]
route_id = "full"
topic_pattern = "shop.full.events"
message_category = "event"
dispatcher_id = "full"
"#,
        good.display()
    );
    let app = crate::network::app(&toml, &[]).await;
    let requests = (0..96).map(|n| {
        let app = &app;
        let good = &good;
        async move {
            let topic = if n % 3 == 0 { "full" } else { "good" };
            let id = format!("m-{n}");
            let response = app
                .post_message(
                    &format!("shop.{topic}.events"),
                    json!({"message_type": "order.placed", "message_id": id, "payload": {"n": n}}),
                )
                .await;
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            // Read at once: the answer came after the commit, not before.
            let committed = lines(good)
                .iter()
                .any(|line| line["message_id"] == id.as_str());
            (topic, status, body, committed)
        }
    });
    for (topic, status, body, committed) in futures::future::join_all(requests).await {
        if topic == "good" {
            assert_eq!(status, reqwest::StatusCode::OK, "{body}");
            assert!(
                committed,
                "answered 200 before its line was in the file: {body}"
            );
        } else {
            assert_eq!(status, reqwest::StatusCode::BAD_GATEWAY, "{body}");
            assert!(!committed);
            let error = body["dispatchers"][0]["error_message"].as_str().unwrap();
            assert!(error.contains("/dev/full"), "{body}");
        }
    }
    assert_eq!(
        lines(&good).len(),
        64,
        "one line per accepted message, no more"
    );
    app.stop().await.unwrap();
}
