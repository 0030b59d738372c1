//! The `http` dispatcher against a loopback receiver: what one message costs through it, beside
//! a bare `reqwest` POST of the same body on the same pooled client (the overhead is the
//! difference), and how many messages per second it sustains with many in flight.
//!
//! The receiver runs on a runtime and thread of its own and answers 200 with an empty JSON
//! object; the client side runs on a current-thread runtime, as in the other benches.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dispatchd::dispatchers::{HttpDispatcher, HttpTarget, WireMessage, http_client};
use dispatchd::engine::{Category, Dispatcher, Engine, Envelope, Handler, Message, Route};
use futures::StreamExt;

/// Starts the receiver; its base URL.
fn receiver() -> String {
    let (address, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            address.send(listener.local_addr().unwrap()).unwrap();
            let router = axum::Router::new().fallback(|_body: axum::body::Bytes| async {
                ([("content-type", "application/json")], "{}")
            });
            axum::serve(listener, router).await.unwrap();
        });
    });
    format!("http://{}/in", ready.recv().unwrap())
}

fn engine(dispatcher: HttpDispatcher) -> Engine {
    Engine::builder()
        .dispatcher(Dispatcher::new("http", Category::Event, dispatcher))
        .route(Route::new(
            "r",
            "shop.orders.events",
            Category::Event,
            "http",
        ))
        .build()
        .unwrap()
}

fn http(c: &mut Criterion) {
    let url = receiver();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = http_client().unwrap();
    let dispatcher = HttpDispatcher::new(client.clone(), HttpTarget::post(url.parse().unwrap()));
    let engine = engine(dispatcher.clone());
    let envelope = Envelope::new(
        "order.placed",
        serde_json::json!({"order_id": 42, "total": 99.5, "currency": "EUR"}),
    );
    let message = Message::new("shop.orders.events", Category::Event, &envelope);
    let body = WireMessage::of(&message).to_vec().unwrap();

    let mut group = c.benchmark_group("http_dispatcher");
    group.throughput(Throughput::Elements(1));
    // One message at a time: the latency of each path.
    group.bench_function("bare_reqwest_post", |b| {
        b.to_async(&runtime).iter(|| async {
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success());
            response.bytes().await.unwrap();
        });
    });
    group.bench_function("handler", |b| {
        b.to_async(&runtime)
            .iter(|| async { dispatcher.handle(&message).await.unwrap() });
    });
    group.bench_function("engine_dispatch", |b| {
        b.to_async(&runtime).iter(|| async {
            let result = engine.dispatch("shop.orders.events", &envelope).await;
            assert!(result.status.is_successful());
        });
    });
    // Many in flight at once: the sustained rate (criterion reports elements per second).
    let engine = Arc::new(engine);
    for in_flight in [16, 64] {
        group.bench_function(
            BenchmarkId::new("engine_dispatch_concurrent", in_flight),
            |b| {
                b.to_async(&runtime).iter_custom(|iterations| {
                    let engine = engine.clone();
                    let envelope = envelope.clone();
                    async move {
                        let started = Instant::now();
                        futures::stream::iter(0..iterations)
                            .map(|_| {
                                let engine = engine.clone();
                                let envelope = &envelope;
                                async move {
                                    let result =
                                        engine.dispatch("shop.orders.events", envelope).await;
                                    assert!(result.status.is_successful());
                                }
                            })
                            .buffer_unordered(in_flight)
                            .collect::<Vec<()>>()
                            .await;
                        started.elapsed()
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group!(
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    targets = http
);
criterion_main!(benches);
