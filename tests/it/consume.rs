//! The one consume loop (`dispatchd::bus::consume`) against a real Redis: sources reclaim what a
//! dead consumer left, a live owner keeps what it still works on, dead consumers leave their
//! group after the retention, and the stream is trimmed of what every group acknowledged, never of
//! what one still needs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatchd::app::{SinkService, SinkServiceConfig};
use dispatchd::bus::consume::{Acks, Consumer, Deliver};
use dispatchd::bus::redis::{ConsumerConfig, Entry};
use dispatchd::sinks::FileSink;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::redis::{delivered, event, redis_url, test_driver, unique, use_redis};
use crate::support::{TestApp, wait_for_async};

async fn connection(url: &str) -> MultiplexedConnection {
    crate::redis::connect(url).await
}

fn group_config(stream: &str, group: &str, consumer: &str) -> ConsumerConfig {
    ConsumerConfig {
        stream: stream.to_owned(),
        group: group.to_owned(),
        consumer: consumer.to_owned(),
        count: 100,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
        trim_every: None,
    }
}

/// `XREADGROUP … COUNT n … >` as `consumer`, never acknowledged: a consumer that died.
async fn read_and_die(
    connection: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) {
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(connection)
        .await
        .unwrap();
}

async fn create_group(connection: &mut MultiplexedConnection, stream: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(connection)
        .await
        .unwrap();
}

/// The `/metrics` text of a sink service.
async fn scrape(addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `XPENDING <stream> <group>`: how many entries are pending.
async fn pending(connection: &mut MultiplexedConnection, stream: &str, group: &str) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(connection)
        .await
        .unwrap();
    match summary {
        redis::Value::Array(fields) => redis::from_redis_value_ref(&fields[0]).unwrap(),
        other => panic!("XPENDING answered {other:?}"),
    }
}

/// The consumers of a group, by name.
async fn consumers(
    connection: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Vec<String> {
    let infos: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(connection)
        .await
        .unwrap();
    infos
        .iter()
        .map(|info| redis::from_redis_value_ref::<String>(&info["name"]).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_reclaims_what_a_dead_instance_left_pending() {
    let Some(url) = redis_url().await else { return };
    let prefix = unique("source-reclaim");
    let source = format!("{prefix}:inbound");
    let mut redis = connection(&url).await;
    create_group(&mut redis, &source, "dispatchd").await;
    for n in 0..20 {
        let message = json!({"topic": "shop.orders.events", "envelope": dispatchd::engine::Envelope::new("order.placed", json!({"n": n}))});
        let _: String = redis::cmd("XADD")
            .arg(&source)
            .arg("*")
            .arg("data")
            .arg(message.to_string())
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // Another instance read all 20 and was SIGKILLed before dispatching any.
    read_and_die(&mut redis, &source, "dispatchd", "dead-instance", 20).await;

    let app = TestApp::start_with(
        |config| {
            use_redis(config, &url, &prefix, "live-instance");
            config.bus.redis.as_mut().unwrap().claim_idle = Duration::from_millis(300);
            config.sources = vec![dispatchd::config::SourceConfig {
                stream: source.clone(),
                group: "dispatchd".into(),
            }];
        },
        |builder| builder,
    )
    .await;
    wait_for_async(
        "the dead instance's 20 entries to be dispatched",
        || async {
            let mut seen: Vec<u64> = app
                .jsonl_lines()
                .iter()
                .filter_map(|line| line["payload"]["n"].as_u64())
                .collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len() == 20
        },
    )
    .await;
    wait_for_async("every reclaimed entry to be acknowledged", || {
        let mut redis = redis.clone();
        let source = source.clone();
        async move { pending(&mut redis, &source, "dispatchd").await == 0 }
    })
    .await;
    app.stop().await.unwrap();
}

/// Holds every entry it is given, settling none: a sink retrying a slow backend.
struct Holding(Arc<Mutex<Vec<String>>>);

#[async_trait::async_trait]
impl Deliver for Holding {
    async fn deliver(&mut self, entry: Entry, _: &Acks) {
        self.0.lock().unwrap().push(entry.id);
    }

    async fn finish(self) {}
}

/// `XAUTOCLAIM` as `thief`: the ids it took.
async fn steal(redis: &mut MultiplexedConnection, stream: &str, idle: Duration) -> Vec<String> {
    let reply: redis::streams::StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg("g")
        .arg("thief")
        .arg(idle.as_millis() as u64)
        .arg("0-0")
        .query_async(redis)
        .await
        .unwrap();
    reply.claimed.into_iter().map(|entry| entry.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_still_working_keeps_its_entry_from_other_consumers() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("keep");
    let mut redis = connection(&url).await;
    crate::redis::publish(&url, &stream, 0..1).await;
    let claim_idle = Duration::from_millis(400);
    let held = Arc::new(Mutex::new(Vec::new()));
    let owner = Consumer::connect(
        &url,
        ConsumerConfig {
            claim_idle,
            ..group_config(&stream, "g", "owner")
        },
        None,
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let held = held.clone();
        owner.run(move |_| Holding(held), shutdown.clone())
    });
    crate::support::wait_for("the owner to take the entry", || {
        held.lock().unwrap().len() == 1
    })
    .await;

    // Another consumer with the same claim_idle tries for four times claim_idle: the owner,
    // still working, keeps the entry (its idle time is reset well within claim_idle).
    let mut every = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..16 {
        every.tick().await;
        let stolen = steal(&mut redis, &stream, claim_idle).await;
        assert!(stolen.is_empty(), "another consumer took {stolen:?}");
    }

    // Once the owner stops, its entry ages and is taken over.
    shutdown.cancel();
    running.await.unwrap();
    let id = held.lock().unwrap()[0].clone();
    wait_for_async("another consumer to take the entry over", || {
        let mut redis = redis.clone();
        let (stream, id) = (stream.clone(), id.clone());
        async move { steal(&mut redis, &stream, claim_idle).await == vec![id] }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumer_holding_nothing_is_removed_after_the_retention() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("retention");
    let mut redis = connection(&url).await;
    crate::redis::publish(&url, &stream, 0..1).await;
    create_group(&mut redis, &stream, "g").await;
    // One consumer that died holding an entry, one that died holding nothing.
    read_and_die(&mut redis, &stream, "g", "holder", 1).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(&stream)
        .arg("g")
        .arg("ghost")
        .query_async(&mut redis)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(dispatchd::sinks::service::run_from_redis(
        url.clone(),
        ConsumerConfig {
            retention: Duration::from_millis(300),
            ..group_config(&stream, "g", "alive")
        },
        Box::new(FileSink::new("file", dir.path().join("out.jsonl"), false)),
        test_driver(dir.path(), 10, 100),
        None,
        None,
        shutdown.clone(),
    ));
    wait_for_async("the idle consumer holding nothing to be removed", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move {
            !consumers(&mut redis, &stream, "g")
                .await
                .contains(&"ghost".to_owned())
        }
    })
    .await;
    // The one holding an entry (not claimed yet: claim_idle is 30 s) stays, and so does the live one.
    let left = consumers(&mut redis, &stream, "g").await;
    assert!(left.contains(&"holder".to_owned()), "{left:?}");
    assert!(left.contains(&"alive".to_owned()), "{left:?}");
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// `XADD`s `n` events in one pipeline.
async fn publish_batch(redis: &mut MultiplexedConnection, stream: &str, from: usize, n: usize) {
    let mut pipeline = redis::pipe();
    for i in from..from + n {
        pipeline
            .cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("data")
            .arg(serde_json::to_string(&event(i)).unwrap())
            .ignore();
    }
    let () = pipeline.query_async(redis).await.unwrap();
}

async fn length(redis: &mut MultiplexedConnection, stream: &str) -> usize {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(redis)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_stays_bounded_and_keeps_what_a_lagging_group_needs() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("trim");
    let mut redis = connection(&url).await;
    create_group(&mut redis, &stream, "fast").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(dispatchd::sinks::service::run_from_redis(
        url.clone(),
        ConsumerConfig {
            trim_every: Some(Duration::from_millis(50)),
            ..group_config(&stream, "fast", "sink-1")
        },
        Box::new(FileSink::new("file", &out, false)),
        test_driver(dir.path(), 100, 1000),
        None,
        None,
        shutdown.clone(),
    ));

    // About 2,000 events/s for 1.5 s, with a sink keeping up: the stream stays far below what
    // was published.
    let mut longest = 0;
    let mut every = tokio::time::interval(Duration::from_millis(50));
    for batch in 0..30 {
        every.tick().await;
        publish_batch(&mut redis, &stream, batch * 100, 100).await;
        longest = longest.max(length(&mut redis, &stream).await);
    }
    wait_for_async("the sink to receive the 3,000 events", || async {
        delivered(&out).len() == 3000
    })
    .await;
    wait_for_async("the acknowledged entries to be trimmed", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        // Approximate trimming removes whole nodes of 100 entries.
        async move { length(&mut redis, &stream).await <= 200 }
    })
    .await;
    assert!(longest < 1500, "the stream grew to {longest} entries");

    // A lagging group: created at the current end, it has read 300 of the next 500 and
    // acknowledged none, while the fast one takes all 500. (Several hundred, so that whole nodes
    // of the stream hold only its pending entries: approximate trimming removes only whole nodes.)
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("lagging")
        .arg("$")
        .query_async(&mut redis)
        .await
        .unwrap();
    publish_batch(&mut redis, &stream, 3000, 500).await;
    read_and_die(&mut redis, &stream, "lagging", "slow", 300).await;
    wait_for_async("the fast group to receive the 500", || async {
        delivered(&out).len() == 3500
    })
    .await;
    wait_for_async("the fast group to acknowledge them", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move { pending(&mut redis, &stream, "fast").await == 0 }
    })
    .await;
    // Whatever the sink's own trims did, one more now that the fast group acknowledged all: the
    // lagging group still finds all 500, its 300 pending, then the 200 never delivered to it.
    dispatchd::bus::consume::trim_acknowledged(&mut redis, &stream)
        .await
        .unwrap();
    let read = |from: &'static str, count: usize| {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("lagging")
                .arg("slow")
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(&stream)
                .arg(from)
                .query_async(&mut redis)
                .await
                .unwrap();
            // A pending entry that was trimmed comes back as its id without fields.
            reply
                .keys
                .into_iter()
                .flat_map(|key| key.ids)
                .filter(|entry| entry.get::<String>("data").is_some())
                .count()
        }
    };
    assert_eq!(
        read("0", 1000).await,
        300,
        "the lagging group's pending entries"
    );
    assert_eq!(
        read(">", 1000).await,
        200,
        "the entries never delivered to it"
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

fn sink_service_config(url: &str, stream: &str, out: &std::path::Path) -> SinkServiceConfig {
    SinkServiceConfig {
        service: "file".into(),
        endpoint: Some(out.display().to_string()),
        api_key: None,
        name: Some("file".into()),
        buffer: Some(100),
        batch_size: Some(10),
        flush_interval: Some(Duration::from_millis(50)),
        bus: Some(url.to_owned()),
        stream: Some(stream.to_owned()),
        group: None,
        consumer: Some("sink-service".into()),
        // The embedded [bus] values.
        claim_idle: None,
        consumer_retention: None,
        trim_every: None,
        dead_letter: Some(out.with_file_name("dead.jsonl")),
        replay_dead_letters: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_namespace: String::new(),
        from_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_service_is_built_then_run_by_the_app_layer() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("sink-service");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");

    // Bad input is a clear error at build, before anything runs.
    let error = SinkService::build(SinkServiceConfig {
        batch_size: Some(0),
        ..sink_service_config(&url, &stream, &out)
    })
    .await
    .err()
    .unwrap();
    assert_eq!(
        error.to_string(),
        "--batch-size must be between 1 and 10000"
    );
    let error = SinkService::build(SinkServiceConfig {
        bus: None,
        ..sink_service_config(&url, &stream, &out)
    })
    .await
    .err()
    .unwrap();
    assert!(error.to_string().contains("--bus"), "{error}");

    let service = SinkService::build(sink_service_config(&url, &stream, &out))
        .await
        .unwrap();
    let addr = service.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(service.run(shutdown.clone()));
    crate::redis::publish(&url, &stream, 0..5).await;
    wait_for_async("the events to reach the file", || async {
        delivered(&out).len() == 5
    })
    .await;
    let metrics = scrape(addr).await;
    assert!(metrics.contains("sink_events_total"), "{metrics}");
    shutdown.cancel();
    assert_eq!(running.await.unwrap().unwrap(), None);
}

/// An entry the sink cannot read (an event from a newer version with a result this one does not
/// know; text that is not JSON) is neither sent nor lost: it lands in the sink's dead letters,
/// counted as dead-lettered, and is acknowledged, while the events around it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_sink_cannot_read_becomes_a_dead_letter_and_is_acknowledged() {
    let Some(url) = redis_url().await else { return };
    let stream = unique("sink-unreadable");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let dead = out.with_file_name("dead.jsonl");
    let service = SinkService::build(sink_service_config(&url, &stream, &out))
        .await
        .unwrap();
    let addr = service.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(service.run(shutdown.clone()));

    let mut redis = connection(&url).await;
    let mut newer = serde_json::to_value(event(100)).unwrap();
    newer["output"]["dispatchers"] = json!([{
        "dispatcher_id": "jsonl", "result": "cancelled", "duration_ms": 1.5,
        "output_count": 0, "attempts": 1, "route_ids": ["r"]
    }]);
    crate::redis::publish(&url, &stream, 0..2).await;
    for data in [newer.to_string(), "not json".to_owned()] {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("data")
            .arg(data)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    crate::redis::publish(&url, &stream, 2..4).await;

    wait_for_async("the events and the two dead letters", || async {
        delivered(&out).len() == 4
            && std::fs::read_to_string(&dead).is_ok_and(|text| text.lines().count() == 2)
    })
    .await;
    let letters: Vec<serde_json::Value> = std::fs::read_to_string(&dead)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(letters[0]["reason"], "unreadable");
    assert_eq!(letters[0]["event"], newer, "kept as it was written");
    assert!(
        letters[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{}",
        letters[0]
    );
    assert_eq!(letters[1]["event"], "not json");
    wait_for_async("every entry to be acknowledged", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move { pending(&mut redis, &stream, "dispatchd-sink-file").await == 0 }
    })
    .await;
    let metrics = scrape(addr).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("sink_events_total{") && l.contains("outcome=\"dead_lettered\""))
        .unwrap_or_else(|| panic!("no dead_lettered count in {metrics}"));
    assert!(line.ends_with(" 2"), "{line}");
    let counted = format!(
        r#"bus_redis_unreadable_entries_total{{group="dispatchd-sink-file",stream="{stream}"}} 2"#
    );
    assert!(metrics.lines().any(|l| l == counted), "{metrics}");
    shutdown.cancel();
    assert_eq!(running.await.unwrap().unwrap(), None);
}

/// Holds every entry it is given and settles them all when it finishes: a sink flushing at
/// shutdown.
struct SettlingAtTheEnd(Arc<Mutex<Vec<String>>>, Option<Acks>);

#[async_trait::async_trait]
impl Deliver for SettlingAtTheEnd {
    async fn deliver(&mut self, entry: Entry, _: &Acks) {
        self.0.lock().unwrap().push(entry.id);
    }

    async fn finish(self) {
        let ids = self.0.lock().unwrap().clone();
        self.1.expect("the acks").ack(ids).await;
    }
}

/// A consumer stopping while Redis is down gives up its last acknowledgements after a few seconds
/// instead of retrying them for minutes; the entries stay pending, for the next consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stops_within_a_bound_when_redis_is_down_and_leaves_its_entries_pending() {
    let Some((own, url)) = crate::redis::own_redis().await else {
        return;
    };
    let stream = unique("hung");
    crate::redis::publish(&url, &stream, 0..3).await;
    let held = Arc::new(Mutex::new(Vec::new()));
    let consumer = Consumer::connect(&url, group_config(&stream, "g", "stopping"), None)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let mut running = tokio::spawn({
        let held = held.clone();
        consumer.run(
            move |acks| SettlingAtTheEnd(held, Some(acks.clone())),
            shutdown.clone(),
        )
    });
    crate::support::wait_for("the consumer to take the entries", || {
        held.lock().unwrap().len() == 3
    })
    .await;

    // Killed (its append-only file keeps the stream and the group), and started again after.
    let (port, dir) = own.kill();
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), &mut running).await;
    assert!(
        stopped.is_ok(),
        "the consumer stops within 30 s while Redis is down"
    );
    let _own = crate::redis::OwnRedis::start(port, dir);
    crate::redis::answers(&url).await;
    let mut redis = connection(&url).await;
    assert_eq!(
        pending(&mut redis, &stream, "g").await,
        3,
        "what could not be acknowledged stays pending, not lost"
    );
}
