//! Event pipeline throughput: events through the driver to the file sink, from the in-memory bus
//! and through Redis Streams.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dispatchd::bus::redis::{ConsumerConfig, RedisPublisher};
use dispatchd::bus::{EventBus, MemoryBus};
use dispatchd::resilience::RetryPolicy;
use dispatchd::sinks::{
    DispatchEvent, DriverConfig, EventInput, EventMetadata, EventOutput, FileSink, FullPolicy,
    Outcome, SinkDriver, SinkObserver,
};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const EVENTS: u64 = 20_000;

/// Wakes the benchmark once `target` events were sent.
#[derive(Default)]
struct Sent {
    count: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

impl SinkObserver for Sent {
    fn events(&self, _: &str, outcome: Outcome, count: u64) {
        if outcome == Outcome::Sent {
            let total = self.count.fetch_add(count, Ordering::AcqRel) + count;
            if total >= self.target.load(Ordering::Acquire) {
                self.done.notify_one();
            }
        }
    }
    fn batch(&self, _: &str, _: usize) {}
    fn request(&self, _: &str, _: &str, _: Duration) {}
    fn queue_depth(&self, _: &str, _: usize) {}
}

fn event(n: u64) -> DispatchEvent {
    DispatchEvent {
        kind: "chain".into(),
        event: "end".into(),
        run_id: format!("run-{n}"),
        parent_run_id: None,
        name: "shop.orders.events".into(),
        timestamp: SystemTime::now(),
        input: EventInput {
            message_type: "order.placed".into(),
            payload: json!({"order": n}),
            ..EventInput::default()
        },
        output: EventOutput {
            status: "success".into(),
            ..EventOutput::default()
        },
        user_id: None,
        tokens_usage: None,
        metadata: EventMetadata {
            category: "event".into(),
            status: "success".into(),
            duration_ms: 0.4,
            ..EventMetadata::default()
        },
        tags: vec!["event".into(), "success".into()],
        log_id: format!("run-{n}"),
    }
}

fn driver(dir: &std::path::Path) -> DriverConfig {
    DriverConfig {
        batch_size: 100,
        flush_interval: Duration::from_millis(20),
        buffer: 10_000,
        full: FullPolicy::Block,
        retry: RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        },
        shutdown_deadline: Duration::from_secs(10),
        send_timeout: Duration::from_secs(10),
        dead_letter: dir.join("dead.jsonl"),
    }
}

fn memory_to_file(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sent = Arc::new(Sent::default());
    let tracker = TaskTracker::new();
    let handle = runtime.block_on(async {
        SinkDriver::spawn(
            Box::new(FileSink::new("file", dir.path().join("out.jsonl"), false)),
            driver(dir.path()),
            Some(sent.clone() as Arc<dyn SinkObserver>),
            &tracker,
            CancellationToken::new(),
        )
    });
    let bus = MemoryBus::new(vec![handle]);
    let events: Vec<DispatchEvent> = (0..EVENTS).map(event).collect();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    group.bench_function("memory_bus_to_file_batch_100", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    let target = sent.count.load(Ordering::Acquire) + EVENTS;
                    sent.target.store(target, Ordering::Release);
                    for event in &events {
                        bus.publish(event.clone()).await;
                    }
                    while sent.count.load(Ordering::Acquire) < target {
                        sent.done.notified().await;
                    }
                }
                started.elapsed()
            })
        });
    });
    group.finish();
}

fn redis_to_file(c: &mut Criterion) {
    let url = "redis://127.0.0.1:6379";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Ok(publisher) = runtime.block_on(async {
        let stream = format!("dispatchd-bench:{}", uuid::Uuid::new_v4());
        RedisPublisher::connect(url, &stream, None)
            .await
            .map(|p| (p, stream))
    }) else {
        eprintln!("SKIPPED: no Redis at {url}");
        return;
    };
    let (publisher, stream) = publisher;
    let dir = tempfile::tempdir().unwrap();
    let sent = Arc::new(Sent::default());
    let stop = CancellationToken::new();
    runtime.spawn(dispatchd::sinks::service::run_from_redis(
        url.into(),
        ConsumerConfig {
            stream: stream.clone(),
            group: "bench".into(),
            consumer: "bench-1".into(),
            count: 500,
            block: Duration::from_millis(100),
            claim_idle: Duration::from_secs(60),
            retention: Duration::from_secs(3600),
            trim_every: None,
        },
        Box::new(FileSink::new("file", dir.path().join("out.jsonl"), false)),
        driver(dir.path()),
        Some(sent.clone() as Arc<dyn SinkObserver>),
        None,
        stop.clone(),
    ));
    let payloads: Vec<String> = (0..EVENTS)
        .map(|n| serde_json::to_string(&event(n)).unwrap())
        .collect();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    group.bench_function("redis_stream_to_file_batch_100", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iterations {
                    let target = sent.count.load(Ordering::Acquire) + EVENTS;
                    sent.target.store(target, Ordering::Release);
                    // Publishers in parallel, as several dispatchd instances would be.
                    let chunks: Vec<Vec<String>> =
                        payloads.chunks(500).map(|c| c.to_vec()).collect();
                    let mut publishing = Vec::new();
                    for chunk in chunks {
                        let publisher = publisher.clone();
                        publishing.push(tokio::spawn(async move {
                            for data in chunk {
                                publisher.publish(&data).await.unwrap();
                            }
                        }));
                    }
                    for task in publishing {
                        task.await.unwrap();
                    }
                    while sent.count.load(Ordering::Acquire) < target {
                        sent.done.notified().await;
                    }
                }
                started.elapsed()
            })
        });
    });
    group.finish();
    stop.cancel();
    runtime.block_on(async {
        let mut connection = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .query_async(&mut connection)
            .await
            .unwrap();
    });
}

criterion_group!(benches, memory_to_file, redis_to_file);
criterion_main!(benches);
