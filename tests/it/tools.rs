//! The demo and load tools tell the user what happened: `simulate`'s progress by status and by
//! protection with its warnings counted, `--target` against a plain serve, `loadtest`'s errors
//! by status, `sink --config`, a replay that binds nothing, and an address in use said once.

use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatchd::simulate::{Options, run};
use tokio_util::sync::CancellationToken;

use crate::binary::BINARY;
use crate::support::{TestApp, test_config};

async fn output(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.stdin(Stdio::null()).output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `dispatchd simulate` (in `dir`, 200 messages a second, a progress line a second) until a
/// progress line shows every one of `wanted`, then interrupts it as Ctrl-C would; returns its
/// stdout and stderr. Bounded: the simulation stops by itself after 60 s.
fn simulate_until(dir: &std::path::Path, log: Option<&str>, wanted: &[&str]) -> (String, String) {
    use std::io::{BufRead, Read};
    let mut command = Command::new(BINARY);
    command
        .args(["simulate", "--rate", "200", "--duration", "60s"])
        .args(["--progress-every", "1s"])
        .current_dir(dir)
        .env("DISPATCHD_LISTEN", "127.0.0.1:0")
        .env_remove("DISPATCHD_CONFIG")
        .env_remove("DISPATCHD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(log) = log {
        command.env("DISPATCHD_LOG", log);
    }
    let mut child = command.spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    // Read on a thread of its own, so a full pipe never stalls the process.
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut running = crate::binary::Running(child);
    let mut out = String::new();
    let mut interrupted = false;
    for line in stdout.lines() {
        let line = line.unwrap();
        out.push_str(&line);
        out.push('\n');
        if !interrupted && line.contains("s  sent ") && wanted.iter().all(|w| line.contains(w)) {
            let pid = running.0.id().to_string();
            assert!(
                Command::new("kill")
                    .args(["-INT", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            interrupted = true;
        }
    }
    let status = running.0.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(status.success(), "{status}\n{out}\n{errors}");
    assert!(
        interrupted,
        "no progress line showed all of {wanted:?}:\n{out}"
    );
    (out, errors)
}

/// Progress lines say the HTTP statuses, the dispatch statuses and the protections at work, and
/// count the warnings instead of printing them; with DISPATCHD_LOG they go to stderr, never
/// between the progress lines.
#[test]
fn simulate_reports_outcomes_by_protection_and_counts_its_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = simulate_until(
        dir.path(),
        None,
        &[
            "breaker open ",
            "rate limited ",
            "policy denied ",
            "duplicate skipped ",
            "dispatcher_error ",
        ],
    );
    assert!(
        !stdout.contains("WARN"),
        "warnings between the progress lines:\n{stdout}"
    );
    assert!(!stderr.contains("WARN"), "{stderr}");
    let done = stdout
        .lines()
        .find(|l| l.starts_with("done:"))
        .unwrap_or_else(|| panic!("a summary line:\n{stdout}"));
    for part in [
        "HTTP 200 ",
        "503 ",
        "dispatches success ",
        "rejected ",
        "protections ",
        "breaker open ",
        "rate limited ",
        "policy denied ",
        "duplicate skipped ",
        "| warnings ",
    ] {
        assert!(done.contains(part), "{part:?} in {done}");
    }
    // The demonstration's failures are logged as warnings: counted, and said where to see them.
    let warnings: u64 = done.rsplit("warnings ").next().unwrap().parse().unwrap();
    assert!(warnings > 0, "{done}");
    assert!(
        stdout.contains(&format!("dispatchd logged {warnings} warnings")),
        "{stdout}"
    );

    let (stdout, stderr) = simulate_until(dir.path(), Some("warn"), &["dispatcher_error "]);
    assert!(!stdout.contains("WARN"), "{stdout}");
    assert!(
        stderr.contains("WARN") && stderr.contains("A dispatch failed."),
        "{stderr}"
    );
}

/// Against a plain `serve`, only the demonstration topics it routes are sent (its answer to the
/// others would be 404 no_dispatcher), and the summary says which were left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_against_a_plain_serve_sends_only_what_it_routes() {
    let app = TestApp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        target: Some(app.url("")),
        ..Options::new(100.0, Duration::from_secs(1))
    };
    let summary = run(
        test_config(dir.path()),
        options,
        CancellationToken::new(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        summary.topics_left_out,
        ["shop.payments.intents", "shop.billing.commands"]
    );
    assert!(summary.sent > 0);
    assert_eq!(
        summary.by_status.keys().copied().collect::<Vec<_>>(),
        [200],
        "{:?}",
        summary.by_status
    );
    // A target that routes none of them is an error that says what to do.
    let none = TestApp::start_with(
        |config| {
            config
                .routes
                .retain(|r| r.message_category != dispatchd::engine::Category::Event);
        },
        |builder| builder,
    )
    .await;
    let options = Options {
        target: Some(none.url("")),
        ..Options::new(100.0, Duration::from_secs(1))
    };
    let error = run(
        test_config(dir.path()),
        options,
        CancellationToken::new(),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("routes none of the demonstration topics")
            && error.contains("without --target"),
        "{error}"
    );
    app.stop().await.unwrap();
    none.stop().await.unwrap();
}

/// A load test whose every answer was 400 says to check the topic, with dispatchd's reason,
/// and breaks the errors down by status; one against nothing asks whether dispatchd runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_breaks_errors_down_by_status_and_says_what_to_check() {
    let app = TestApp::start().await;
    let mut command = Command::new(BINARY);
    command
        .args(["loadtest", "--target", &app.url("")])
        .args(["--topic", "shop.orders", "--rates", "20", "--step", "1s"])
        .args(["--connections", "2"])
        .env_remove("DISPATCHD_API_TOKEN");
    let bad_topic = output(command).await;
    assert_eq!(bad_topic.status.code(), Some(1));
    let (stdout, stderr) = (text(&bad_topic.stdout), text(&bad_topic.stderr));
    assert!(stdout.contains("errors by status: 400 20"), "{stdout}");
    assert!(
        stderr.contains("every answer was 400: check the topic (--topic shop.orders)")
            && stderr.contains("topic has no category segment"),
        "{stderr}"
    );
    assert!(!stderr.contains("is dispatchd running"), "{stderr}");

    let addr = app.addr;
    app.stop().await.unwrap();
    let mut command = Command::new(BINARY);
    command
        .args(["loadtest", "--target", &format!("http://{addr}")])
        .args(["--rates", "5", "--step", "1s", "--connections", "1"])
        .env_remove("DISPATCHD_API_TOKEN");
    let nothing = output(command).await;
    assert_eq!(nothing.status.code(), Some(1));
    let stderr = text(&nothing.stderr);
    assert!(
        stderr.contains("no request was answered: is dispatchd running at"),
        "{stderr}"
    );
}

/// serve, sink and simulate each report an address in use in one line naming it and what to
/// do, and exit non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_is_reported_once_clearly() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    for (args, how) in [
        (vec!["serve"], "DISPATCHD_LISTEN"),
        (vec!["simulate", "--duration", "1s"], "DISPATCHD_LISTEN"),
        (
            vec![
                "sink",
                "--service",
                "file",
                "--endpoint",
                "out.jsonl",
                "--bus",
                "redis://127.0.0.1:1",
                "--listen",
                &addr,
            ],
            "--listen",
        ),
    ] {
        let mut command = Command::new(BINARY);
        command
            .args(&args)
            .current_dir(dir.path())
            .env("DISPATCHD_LISTEN", &addr)
            .env_remove("DISPATCHD_CONFIG")
            .env_remove("DISPATCHD_LOG");
        let output = output(command).await;
        let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        let mentions: Vec<&str> = stdout
            .lines()
            .chain(stderr.lines())
            .filter(|l| l.contains(&addr) || l.to_lowercase().contains("in use"))
            .collect();
        assert_eq!(
            mentions,
            [format!(
                "error: {addr} is already in use by another process (another dispatchd?): stop it, or choose another address with {how}{}",
                if how == "--listen" {
                    " or DISPATCHD_LISTEN"
                } else {
                    " or [server] listen"
                }
            )],
            "{args:?}"
        );
    }
    drop(held);
}

/// `dispatchd sink --config` runs the file's `[[sinks]]` element: its service, endpoint,
/// headers and retries (here none: the first 503 dead-letters the batch, where the embedded
/// defaults would retry it 5 times). A replay opens no listener: it succeeds while the
/// --listen address is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_runs_the_sink_of_its_config_file_and_a_replay_binds_nothing() {
    // The HTTP backend: answers 503 to everything and keeps each request's x-tenant header.
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let keep = seen.clone();
    let router = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        keep.lock().unwrap().push(
            headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        );
        async { axum::http::StatusCode::SERVICE_UNAVAILABLE }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let again = dir.path().join("again.jsonl");
    let file = dispatchd::sinks::dead_letter::DeadLetterFile::new(&dead);
    let events: Vec<_> = (0..3).map(crate::redis::event).collect();
    file.append("hook", "retries_exhausted", 6, "HTTP 503: down", &events)
        .await
        .unwrap();
    let config = dir.path().join("sinks.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[sinks]]
name = "other"
service = "file"
endpoint = "other.jsonl"

[[sinks]]
name = "hook"
service = "http"
endpoint = "http://{backend}/events"
headers = {{ "x-tenant" = "acme" }}
timeout = "2s"
dead_letter = "{}"
retry = {{ attempts = 0, initial_backoff = "10ms", max_backoff = "10ms" }}
"#,
            again.display()
        ),
    )
    .unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();

    let sink = |name: Option<&str>| {
        let mut command = Command::new(BINARY);
        command
            .args(["sink", "--config"])
            .arg(&config)
            .args(name.map(|n| ["--name", n]).into_iter().flatten())
            .arg("--replay-dead-letters")
            .arg(&dead)
            .args(["--listen", &taken])
            .current_dir(dir.path())
            .env("DISPATCHD_LOG", "error")
            .env_remove("DISPATCHD_CONFIG")
            .env_remove("DISPATCHD_REDIS_URL");
        output(command)
    };
    // Two sinks in the file: which one is a question, not a guess.
    let ambiguous = sink(None).await;
    assert_eq!(ambiguous.status.code(), Some(1));
    assert!(
        text(&ambiguous.stderr).contains("has 2 [[sinks]] (other, hook): choose one with --name"),
        "{}",
        text(&ambiguous.stderr)
    );

    let replay = sink(Some("hook")).await;
    let (stdout, stderr) = (text(&replay.stdout), text(&replay.stderr));
    assert!(replay.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed 3 events"), "{stdout}");
    assert_eq!(
        *seen.lock().unwrap(),
        [Some("acme".to_owned())],
        "one request, with the file's header, and no retry"
    );
    let dead_again = std::fs::read_to_string(&again).unwrap();
    assert_eq!(
        dead_again.lines().count(),
        3,
        "the batch dead-lettered where the file says: {dead_again}"
    );
    assert!(dead_again.contains("run-00002"));

    // --service for a sink the file does not name: the flags run it, as without a file (a
    // DISPATCHD_CONFIG meant for serve does not get in the way).
    let out = dir.path().join("out.jsonl");
    let mut command = Command::new(BINARY);
    command
        .args(["sink", "--service", "file", "--endpoint"])
        .arg(&out)
        .arg("--replay-dead-letters")
        .arg(&again)
        .current_dir(dir.path())
        .env("DISPATCHD_CONFIG", &config)
        .env("DISPATCHD_LOG", "error")
        .env_remove("DISPATCHD_REDIS_URL");
    let flags = output(command).await;
    assert!(flags.status.success(), "{}", text(&flags.stderr));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        3,
        "the file sink of the flags got the events"
    );
    drop(held);
    server.abort();
}
