//! The status page in a real headless Chromium, and `dispatchd top` in a real tmux, both against
//! the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::binary::{BINARY, Running, started_keeping_log};
use crate::support::required_tool;

/// Starts `dispatchd serve` on the embedded defaults in `dir`, on a free port.
fn serve(dir: &Path) -> (Running, String) {
    let config = dir.join("dispatchd.toml");
    std::fs::write(&config, "[server]\ndrain_delay = \"0s\"\n").unwrap();
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
    let (running, addr, _) = started_keeping_log(child);
    (running, addr)
}

/// What Chromium rendered of `url` after its scripts and layout ran, and a screenshot of it.
fn chromium(binary: &Path, profile: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let mut command = Command::new(binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--window-size=1280,720",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .expect("chromium runs");
    assert!(output.status.success(), "chromium failed: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The `data-health` of the row of `id` in a DOM dump.
fn row_health(dom: &str, id: &str) -> Option<String> {
    let row = dom
        .split("<tr ")
        .find(|row| row.contains(&format!("data-id=\"{id}\"")))?;
    let health = row.split("data-health=\"").nth(1)?;
    Some(health.split('"').next()?.to_owned())
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    let response = client.post(url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// `GET /api/v1/status` and `GET /` on a running service: the dispatchers' numbers follow the
/// traffic, the sinks, bus, instance and readiness are there, and the page says the same.
#[tokio::test]
async fn the_status_report_follows_the_traffic() {
    let app = crate::support::TestApp::start().await;
    let before = app.get_json("/api/v1/status").await;
    assert_eq!(before["readiness"]["status"], "ready");
    assert_eq!(before["version"], env!("CARGO_PKG_VERSION"));
    assert!(before["instance"].as_str().is_some_and(|i| !i.is_empty()));
    assert_eq!(before["bus"], json!({"kind": "memory", "publishing": "ok"}));
    let ids: Vec<&str> = before["dispatchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dispatcher_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["jsonl", "log"]);
    assert!(before["dispatchers"][1]["latency_p50_ms"].is_null());

    app.post_orders(4).await;
    let after = app.get_json("/api/v1/status").await;
    let log = &after["dispatchers"][1];
    assert_eq!(log["dispatcher_id"], "log");
    assert_eq!(log["health"], "healthy");
    assert_eq!(log["calls"], 4);
    assert_eq!(log["errors"], 0);
    assert_eq!(log["error_ratio"], 0.0);
    assert!(
        log["latency_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{log}"
    );
    if app.telemetry_enabled() {
        let sinks = after["sinks"].as_array().unwrap();
        assert!(
            sinks.iter().any(|s| s["received"].as_u64() >= Some(4)),
            "{sinks:?}"
        );
    }

    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert_eq!(
        row_health(&html, "log").as_deref(),
        Some("healthy"),
        "{html}"
    );
    assert!(html.contains("<td class=\"n\">4</td>"), "{html}");
    app.stop().await.unwrap();
}

/// The page as a person sees it: rendered by Chromium with every dispatcher's row; a worker
/// that stops heartbeating turns red on a reload.
#[tokio::test]
async fn the_status_page_renders_in_chromium_and_a_stale_worker_turns_red() {
    let Some(chromium_binary) = required_tool("chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_running, addr) = serve(dir.path());
    let client = reqwest::Client::new();
    let worker = format!("http://{addr}/api/v1/dispatchers/billing-worker");
    post(
        &client,
        format!("{worker}/register"),
        json!({"stale_threshold_seconds": 2}),
    )
    .await;
    post(&client, format!("{worker}/heartbeat"), json!({})).await;
    post(
        &client,
        format!("http://{addr}/api/v1/messages/shop.orders.events"),
        json!({"message_type": "order.placed", "payload": {"order_id": 1}}),
    )
    .await;

    let profile = dir.path().join("chromium-profile");
    let page = format!("http://{addr}/");
    let dom = chromium(&chromium_binary, &profile, &page, None);
    assert!(dom.contains("<meta http-equiv=\"refresh\""), "{dom}");
    assert!(dom.contains("class=\"badge ready\""), "{dom}");
    for id in ["log", "jsonl"] {
        assert_eq!(
            row_health(&dom, id).as_deref(),
            Some("healthy"),
            "{id}: {dom}"
        );
    }
    // Heartbeated just now; its threshold is 2 s.
    let fresh = row_health(&dom, "billing-worker");
    assert!(
        matches!(fresh.as_deref(), Some("healthy" | "stale")),
        "{fresh:?}: {dom}"
    );
    assert!(dom.contains("data-sink=\"jsonl\"") || dom.contains("<table id=\"sinks\">"));
    assert!(dom.contains("href=\"/metrics\"") && dom.contains("href=\"/api/v1/openapi.json\""));

    // No more heartbeats: within a refresh (reloads, bounded) the row is stale and red.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dom = loop {
        let dom = chromium(&chromium_binary, &profile, &page, None);
        if row_health(&dom, "billing-worker").as_deref() == Some("stale") {
            break dom;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never turned stale: {dom}"
        );
    };
    assert!(dom.contains("class=\"dispatcher health-stale\" data-id=\"billing-worker\""));
    // The class a stale row has is the red one of the page's own style.
    assert!(dom.contains(
        "tr.health-stale,tr.health-unhealthy,tr.health-stopped{background:#ffebe9;color:#a40e26}"
    ));

    // Kept for a person to look at (CI keeps the directory as an artifact).
    let kept: PathBuf = tempfile::Builder::new()
        .prefix("dispatchd-status-page-")
        .tempdir()
        .unwrap()
        .keep();
    let screenshot = kept.join("status.png");
    chromium(&chromium_binary, &profile, &page, Some(&screenshot));
    let png = std::fs::read(&screenshot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        png.len()
    );
    eprintln!("status page screenshot: {}", screenshot.display());
}

/// A tmux server of its own (`-L`), killed at the end whatever happens.
struct Tmux {
    binary: PathBuf,
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs")
    }

    fn capture(&self, session: &str) -> Option<String> {
        let output = self.run(&["capture-pane", "-p", "-t", session]);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn alive(&self, session: &str) -> bool {
        self.run(&["has-session", "-t", session]).status.success()
    }

    /// Captures `session` until `done` says so, within 30 s.
    async fn wait_for(&self, session: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..300 {
            if let Some(screen) = self.capture(session) {
                if done(&screen) {
                    return screen;
                }
                last = screen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}; the screen was:\n{last}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The CALLS column of `id`'s row on a `dispatchd top` screen.
fn calls_of(screen: &str, id: &str) -> Option<u64> {
    let line = screen.lines().find(|line| {
        line.trim_start_matches(['│', '|', ' '])
            .split_whitespace()
            .next()
            == Some(id)
    })?;
    // DISPATCHER HEALTH RATE/S CALLS …
    line.trim_start_matches(['│', '|', ' '])
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// `dispatchd top` under tmux: the dispatchers appear, their numbers move with traffic, an
/// instance that is not there is said so, and `q` quits.
#[tokio::test]
async fn top_shows_a_live_instance_under_tmux_and_quits_on_q() {
    let Some(binary) = required_tool("tmux") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_running, addr) = serve(dir.path());
    let tmux = Tmux {
        binary,
        socket: format!("dispatchd-top-{}", std::process::id()),
    };
    let url = format!("http://{addr}");
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "30",
        "--",
        BINARY,
        "top",
        "--url",
        &url,
        "--interval",
        "200ms",
    ]);
    assert!(started.status.success(), "{started:?}");

    let screen = tmux
        .wait_for("top", "the dispatchers", |s| {
            s.contains("DISPATCHER") && calls_of(s, "log").is_some() && s.contains("READY")
        })
        .await;
    assert!(screen.contains("jsonl"), "{screen}");
    assert!(screen.contains("bus memory: ok"), "{screen}");
    let before = calls_of(&screen, "log").unwrap();

    let client = reqwest::Client::new();
    for order_id in 0..5 {
        post(
            &client,
            format!("{url}/api/v1/messages/shop.orders.events"),
            json!({"message_type": "order.placed", "payload": {"order_id": order_id}}),
        )
        .await;
    }
    let screen = tmux
        .wait_for("top", "the calls to move", |s| {
            calls_of(s, "log").is_some_and(|calls| calls >= before + 5)
        })
        .await;
    assert!(!screen.contains("cannot reach"), "{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let mut quit = false;
    for _ in 0..100 {
        if !tmux.alive("top") {
            quit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(quit, "top did not quit on q: {:?}", tmux.capture("top"));

    // An address where nothing listens: a clear line, not a panic; it keeps trying.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "nowhere",
        "-x",
        "120",
        "-y",
        "20",
        "--",
        BINARY,
        "top",
        "--url",
        &nowhere,
        "--interval",
        "200ms",
    ]);
    assert!(started.status.success(), "{started:?}");
    let screen = tmux
        .wait_for("nowhere", "the unreachable message", |s| {
            s.contains("cannot reach")
        })
        .await;
    assert!(screen.contains(&nowhere) && screen.contains("Is dispatchd running there?"));
    assert!(!screen.contains("panicked"), "{screen}");
    tmux.run(&["send-keys", "-t", "nowhere", "q"]);
    let mut quit = false;
    for _ in 0..100 {
        if !tmux.alive("nowhere") {
            quit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(quit, "top did not quit on q while unreachable");
}

/// Without a terminal `top` draws nothing: it exits 1 and says where a script should look.
#[test]
fn top_without_a_terminal_says_so_and_exits() {
    let output = Command::new(BINARY)
        .args(["top", "--url", "http://127.0.0.1:9"])
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("dispatchd top draws on a terminal")
            && stderr.contains("http://127.0.0.1:9/api/v1/status"),
        "{stderr}"
    );
    // Nothing on stdout: no escape sequence of a half-set-up screen.
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);
}
