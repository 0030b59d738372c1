//! The real binary, run as a user would.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_dispatchd");

/// Kills the child if a test fails before it stopped it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary in `dir` on a free port and returns it with the address it logged.
fn start(dir: &std::path::Path) -> (Running, String) {
    let mut child = Command::new(BINARY)
        .current_dir(dir)
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env_remove("DISPATCHD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
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
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (running, addr)
}

#[tokio::test]
async fn serves_the_embedded_defaults_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut running, addr) = start(dir.path());

    let client = reqwest::Client::new();
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
    let line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["payload"]["order_id"], 42);
    assert_eq!(line["message_id"], result["message_id"]);
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
