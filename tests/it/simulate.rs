use std::time::Duration;

use dispatchd::engine::DispatchStatus;
use dispatchd::simulate::{Options, run};
use tokio_util::sync::CancellationToken;

use crate::support::{test_config, wait_for_async};

fn sample(text: &str, series: &str) -> f64 {
    crate::support::sample(text, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulation_moves_the_breaker_rate_limiter_and_cache_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let options = Options {
        progress_every: Duration::from_secs(1),
        ..Options::new(200.0, Duration::from_secs(60))
    };
    let stop = CancellationToken::new();
    let (serving, address) = tokio::sync::oneshot::channel();
    let simulation = tokio::spawn(run(config, options, stop.clone(), Some(serving)));
    let address = address.await.expect("the in-process dispatchd listens");
    let client = reqwest::Client::new();

    // Bounded: at most 500 scrapes, 10 ms apart, far beyond what the traffic needs.
    let scrape = || async {
        client
            .get(format!("http://{address}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let moved = |text: &str| {
        sample(
            text,
            r#"dispatcher_circuit_breaker_trips_total{dispatcher_id="demo-flaky"}"#,
        ) >= 1.0
            && sample(
                text,
                r#"dispatcher_rate_limiter_delay_seconds_sum{dispatcher_id="demo-audit"}"#,
            ) > 0.0
            && sample(
                text,
                r#"dispatcher_cache_operations_total{cache="dedup.demo-fast",operation="get",result="hit"}"#,
            ) >= 1.0
            && sample(
                text,
                r#"dispatcher_retries_total{dispatcher_id="demo-flaky"}"#,
            ) >= 1.0
            && sample(
                text,
                r#"dispatcher_executions_total{dispatcher_id="demo-slow",result="timeout"}"#,
            ) >= 1.0
            && sample(
                text,
                r#"dispatcher_policy_denials_total{policy="refund-guard"}"#,
            ) >= 1.0
    };
    wait_for_async("every protection's metrics to move", || async {
        moved(&scrape().await)
    })
    .await;
    let text = scrape().await;
    assert!(text.contains(r#"dispatcher_circuit_breaker_state{dispatcher_id="demo-flaky"}"#));
    // Everything the full demonstration exports is documented, with its type and labels.
    let documented = crate::metrics::documented();
    for (name, (kind, labels)) in crate::metrics::families(&text) {
        let Some((doc_kind, doc_labels)) = documented.get(&name) else {
            panic!("{name} is exported but not in docs/metrics.md");
        };
        assert_eq!((doc_kind, doc_labels), (&kind, &labels), "{name}");
    }
    assert!(
        sample(
            &text,
            r#"dispatcher_cache_hit_ratio{cache="dedup.demo-fast"}"#
        ) > 0.0
    );
    // A duplicate the cache caught is a skip of the dispatcher, and counted as one.
    assert!(
        sample(
            &text,
            r#"dispatcher_executions_total{dispatcher_id="demo-fast",result="skipped"}"#
        ) >= 1.0
    );

    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(30), simulation)
        .await
        .expect("the simulation stops")
        .unwrap()
        .unwrap();
    assert!(summary.sent > 0);
    for status in [200, 403, 503, 504] {
        assert!(
            summary.by_status.get(&status).copied().unwrap_or(0) > 0,
            "{status} in {:?}",
            summary.by_status
        );
    }
    // The protections refuse a good share of the mix: statuses of their own, not errors.
    for status in [
        DispatchStatus::Success,
        DispatchStatus::Rejected,
        DispatchStatus::Denied,
    ] {
        assert!(
            summary
                .by_dispatch_status
                .get(&status)
                .copied()
                .unwrap_or(0)
                > 0,
            "{status} in {:?}",
            summary.by_dispatch_status
        );
    }
    println!(
        "simulate: {:?}, failures {:?} of the dispatches that ran",
        summary.by_dispatch_status,
        summary.failure_ratio()
    );
}
