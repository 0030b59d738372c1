//! Hostile clients at the HTTP edge, over real sockets on loopback: connections that stay
//! silent or stall, a flood of them past `max_connections`, bodies declared too large, bodies
//! that trickle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dispatchd::engine::{
    Category, Dispatcher, Handler, HandlerError, Message, OutputMessage, Route,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TestApp, sample, wait_for_async};

/// What a client sends before the HTTP/2 server speaks: the connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the server closes the connection; `true` if it did within `bound`.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> bool {
    let mut buffer = vec![0u8; 4096];
    tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// One HTTP/2 frame: a 9-byte header (length, type, flags, stream id) and its payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Speaks just enough HTTP/2 (prior knowledge) to send `GET /health` on stream 1 and read the
/// response's HEADERS frame, then leaves the connection open.
async fn h2_get_health(stream: &mut TcpStream) {
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;
    // HPACK: :method GET, :scheme http (static table 2 and 6), then :path and :authority as
    // literals with indexed names (4 and 1), not indexed.
    let mut block = vec![0x82, 0x86, 0x04, 7];
    block.extend_from_slice(b"/health");
    block.extend_from_slice(&[0x01, 1, b'x']);
    let mut out = H2_PREFACE.to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend(h2_frame(HEADERS, END_STREAM_AND_HEADERS, 1, &block));
    stream.write_all(&out).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await.unwrap();
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await.unwrap();
            let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            if header[3] == HEADERS && id == 1 {
                // HPACK `:status: 200` is static-table entry 8.
                assert_eq!(
                    payload.first(),
                    Some(&0x88),
                    "GET /health over HTTP/2 is 200"
                );
                return;
            }
        }
    })
    .await
    .expect("an HTTP/2 answer");
}

#[tokio::test]
async fn connections_that_send_nothing_or_stall_are_closed_within_the_head_timeout() {
    let app = TestApp::start_with(
        |config| config.server.header_read_timeout = Duration::from_millis(300),
        |b| b,
    )
    .await;
    let nothing = TcpStream::connect(app.addr).await.unwrap();
    let mut part_of_a_head = TcpStream::connect(app.addr).await.unwrap();
    part_of_a_head
        .write_all(b"POST /api/v1/messages/a.b.events HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut preface_only = TcpStream::connect(app.addr).await.unwrap();
    preface_only.write_all(H2_PREFACE).await.unwrap();
    let mut silent_h2 = TcpStream::connect(app.addr).await.unwrap();
    h2_get_health(&mut silent_h2).await;

    // Far beyond the 300 ms the config allows: only a connection left open fails this.
    let bound = Duration::from_secs(5);
    let mut connections = [
        ("nothing", nothing),
        ("part of a head", part_of_a_head),
        ("only the HTTP/2 preface", preface_only),
        ("HTTP/2, silent after a request", silent_h2),
    ];
    let closed = futures::future::join_all(
        connections
            .iter_mut()
            .map(|(_, stream)| closed_within(stream, bound)),
    )
    .await;
    let left_open: Vec<&str> = connections
        .iter()
        .zip(closed)
        .filter(|(_, closed)| !closed)
        .map(|((what, _), _)| *what)
        .collect();
    assert!(left_open.is_empty(), "left open: {left_open:?}");
    let metrics = app.scrape().await;
    assert_eq!(
        sample(&metrics, r#"http_connections_closed_total{reason="idle"}"#),
        Some(4.0),
        "{metrics}"
    );
    app.stop().await.unwrap();
}

/// Holds every dispatch until released.
struct Gate(Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>);

#[async_trait]
impl Handler for Gate {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        let _pass = self
            .0
            .acquire()
            .await
            .map_err(|_| HandlerError::permanent("closed"))?;
        Ok(Vec::new())
    }
}

/// Thousands of silent connections against `max_connections = 64`: the oldest idle one makes
/// room for each newcomer, so probes and ingest answer at once, and a connection with a request
/// in progress is never the one closed.
#[tokio::test]
async fn past_max_connections_the_longest_idle_connection_makes_room() {
    const MAX: usize = 64;
    const SILENT: usize = 1500;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let handler = Gate(gate.clone(), arrived.clone());
    let app = TestApp::start_with(
        |config| {
            config.server.max_connections = MAX;
            // Long enough that no silent connection is closed for idleness during the test.
            config.server.header_read_timeout = Duration::from_secs(60);
        },
        |builder| {
            builder
                .dispatcher(Dispatcher::new("gate", Category::Intent, handler))
                .route(Route::new("to-gate", "**", Category::Intent, "gate"))
        },
    )
    .await;
    // A request in progress, on the oldest connection of all.
    let held = tokio::spawn({
        let client = reqwest::Client::new();
        let url = app.url("/api/v1/messages/shop.orders.intents");
        async move {
            client
                .post(url)
                .json(&json!({"message_type": "order.hold", "payload": {}}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    crate::support::wait_for("the held request to reach its dispatcher", || {
        arrived.load(Ordering::SeqCst) == 1
    })
    .await;

    let mut silent = Vec::with_capacity(SILENT);
    for n in 0..SILENT {
        // Past the slots and the kernel's backlog, a connection completes only if the server
        // keeps making room.
        let connect = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(app.addr));
        let stream = connect
            .await
            .unwrap_or_else(|_| panic!("silent connection {n} was never accepted"));
        silent.push(stream.unwrap());
    }
    // Each scrape is one more connection: the server has caught up once it has closed all but
    // the newest silent ones.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_for_async(
        "the server to close the oldest silent connections",
        || async {
            let text = client
                .get(app.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            sample(&text, r#"http_connections_closed_total{reason="evicted"}"#)
                .is_some_and(|n| n >= (SILENT - MAX) as f64)
        },
    )
    .await;

    // The limit is reached and every slot but one holds a silent client: probes still answer.
    let mut took = Vec::new();
    for path in ["/health", "/ready", "/health", "/ready", "/health"] {
        let started = Instant::now();
        let response =
            tokio::time::timeout(Duration::from_secs(5), client.get(app.url(path)).send())
                .await
                .unwrap_or_else(|_| {
                    panic!("{path} did not answer while the connection limit is reached")
                })
                .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        took.push(started.elapsed());
    }
    took.sort();
    eprintln!("5 probes with {MAX} slots held by silent connections: {took:?}");
    // The median, so one scheduling hiccup of a loaded 2-core CI machine is not a failure; each
    // probe is bounded by the 5 s timeout above.
    assert!(
        took[2] < Duration::from_millis(100),
        "probes took {took:?} at the connection limit"
    );
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client
            .post(app.url("/api/v1/messages/shop.orders.events"))
            .json(&json!({"message_type": "order.placed", "payload": {}}))
            .send(),
    )
    .await
    .expect("ingest answers at the connection limit")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The oldest silent connections were closed; the one with a request in progress was not.
    let mut first = silent.swap_remove(0);
    assert!(closed_within(&mut first, Duration::from_secs(5)).await);
    gate.add_permits(1);
    assert_eq!(
        held.await.unwrap(),
        StatusCode::OK,
        "the held request completes"
    );
    drop(silent);
    app.stop().await.unwrap();
}

/// Every slot taken by a client trickling its body (and in no hurry to be refused): nothing of
/// those requests has been dispatched, so the one that has sent the least makes room for a probe.
#[tokio::test]
async fn past_max_connections_a_connection_still_receiving_its_body_makes_room() {
    const MAX: usize = 16;
    let app = TestApp::start_with(
        |config| {
            config.server.max_connections = MAX;
            config.server.body_rate_grace = Duration::from_secs(60);
        },
        |b| b,
    )
    .await;
    let mut trickling = Vec::new();
    for _ in 0..=MAX {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream
            .write_all(
                b"POST /api/v1/messages/shop.orders.events HTTP/1.1\r\nHost: x\r\n\
                  Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
            )
            .await
            .unwrap();
        trickling.push(stream);
    }
    // One more than the slots: the server has made room once one of them is closed.
    let closed = tokio::time::timeout(
        Duration::from_secs(20),
        futures::future::select_all(trickling.iter_mut().map(|stream| {
            Box::pin(async move {
                let mut buffer = [0u8; 64];
                while let Ok(1..) = stream.read(&mut buffer).await {}
            })
        })),
    )
    .await;
    assert!(closed.is_ok(), "no connection made room for the last one");

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let health = tokio::time::timeout(
            Duration::from_secs(5),
            client.get(app.url("/health")).send(),
        )
        .await
        .expect("/health answers while every slot receives a body")
        .unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        took.push(started.elapsed());
    }
    took.sort();
    assert!(
        took[1] < Duration::from_millis(100),
        "/health took {took:?}"
    );
    let metrics = app.scrape().await;
    let evicted = sample(
        &metrics,
        r#"http_connections_closed_total{reason="evicted"}"#,
    );
    assert!(evicted.is_some_and(|n| n >= 2.0), "{evicted:?}");
    drop(trickling);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_read() {
    let app = TestApp::start_with(|config| config.server.max_body_bytes = 1024, |b| b).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    // The head alone: a server that waited for the body would answer only at its deadline.
    stream
        .write_all(
            b"POST /api/v1/messages/shop.orders.events HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") || !answer.ends_with(b"}}") {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buffer[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer before the body was sent");
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    app.stop().await.unwrap();
}

/// One client that trickles its body a byte every 200 ms (the issue's one byte every 2 s, scaled
/// to the test's grace period), reconnecting after each answer, until `stop`. Counts the
/// connections it got going, and keeps the status line and body of each answer.
async fn trickle_bodies(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    trickling: Arc<AtomicUsize>,
    answers: Arc<std::sync::Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"POST /api/v1/messages/shop.orders.events HTTP/1.1\r\nHost: x\r\n\
                  Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
            )
            .await
            .unwrap();
        trickling.fetch_add(1, Ordering::SeqCst);
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        let mut writing = true;
        let read_all = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                tokio::select! {
                    read = stream.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => answer.extend_from_slice(&buffer[..n]),
                    },
                    () = tokio::time::sleep(Duration::from_millis(200)), if writing => {
                        writing = stream.write_all(b" ").await.is_ok();
                    }
                }
            }
        })
        .await;
        let answer = String::from_utf8_lossy(&answer);
        let status_line = answer.lines().next().unwrap_or("no answer");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let kept = match read_all {
            Ok(()) => format!("{status_line} {body}"),
            Err(_) => "not answered within 20 s".to_owned(),
        };
        answers.lock().unwrap().push(kept);
    }
}

/// More clients trickling their bodies than `max_in_flight` allows requests, reconnecting after
/// each refusal: each is answered 408 once its grace period is over, and normal ingest keeps
/// answering 200 the whole time (the permits are taken only once a body has arrived).
#[tokio::test]
async fn slow_bodies_are_refused_with_408_and_never_starve_ingest() {
    const ATTACKERS: usize = 12;
    let app = TestApp::start_with(
        |config| {
            config.server.max_in_flight = 4;
            config.server.min_body_rate = 100;
            config.server.body_rate_grace = Duration::from_millis(300);
        },
        |b| b,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let trickling = Arc::new(AtomicUsize::new(0));
    let answers: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            tokio::spawn(trickle_bodies(
                app.addr,
                stop.clone(),
                trickling.clone(),
                answers.clone(),
            ))
        })
        .collect();
    crate::support::wait_for("every attacker to be trickling", || {
        trickling.load(Ordering::SeqCst) >= ATTACKERS
    })
    .await;

    // Normal ingest from two clients, until the attackers have had two answers each (and at
    // least 100 requests were sent).
    let (mut sent, mut ok) = (0usize, 0usize);
    let mut statuses = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < 100 || answers.lock().unwrap().len() < 2 * ATTACKERS {
        assert!(
            Instant::now() < deadline,
            "the attackers were not answered in time"
        );
        let (a, b) = tokio::join!(
            app.post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed", "payload": {}})
            ),
            app.post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed", "payload": {}})
            ),
        );
        for status in [a.status(), b.status()] {
            sent += 1;
            ok += usize::from(status == StatusCode::OK);
            *statuses.entry(status.as_u16()).or_insert(0) += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for attacker in attackers {
        attacker.await.unwrap();
    }
    eprintln!("{ok} of {sent} normal requests answered 200 beside {ATTACKERS} trickling clients");
    assert!(
        ok * 100 >= sent * 99,
        "{ok} of {sent} normal requests answered 200: {statuses:?}"
    );
    let answers = answers.lock().unwrap().clone();
    for answer in &answers {
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains(r#""code":"body_too_slow""#),
            "a trickling body was answered {answer}"
        );
    }
    let metrics = app.scrape().await;
    let counted = sample(
        &metrics,
        r#"http_requests_shed_total{reason="body_too_slow"}"#,
    );
    assert_eq!(counted, Some(answers.len() as f64));
    app.stop().await.unwrap();
}
