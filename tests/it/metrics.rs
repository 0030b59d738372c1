use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use dispatchd::engine::{
    Category, CommandAdapter, Dispatcher, Effect, HandlerError, Message, OutputMessage, Route,
    RulePolicy,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestApp, required_tool, sample};

struct Ops;

#[async_trait]
impl CommandAdapter for Ops {
    fn name(&self) -> &'static str {
        "ops"
    }

    async fn execute(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

/// dispatchd with, beside the defaults, a failing intent dispatcher and a command dispatcher
/// behind a policy, so that every metric of the catalog can be made to appear.
async fn canonical_app(edit: impl FnOnce(&mut dispatchd::config::Config)) -> TestApp {
    TestApp::start_with(edit, |builder| {
        builder
            .dispatcher(Dispatcher::new(
                "failing",
                Category::Intent,
                crate::support::Failing {
                    transient: false,
                    message: "refused",
                },
            ))
            .dispatcher(
                Dispatcher::command("ops", Ops)
                    .with_policy(RulePolicy::new("change-freeze", Effect::Allow).deny("deploy")),
            )
            .route(Route::new("to-failing", "**", Category::Intent, "failing"))
            .route(Route::new(
                "to-ops",
                "ops.commands",
                Category::Command,
                "ops",
            ))
    })
    .await
}

/// Success, failure, a denied and an allowed command, an invalid topic, and a health check.
async fn canonical_traffic(app: &TestApp, successes: usize) {
    for n in 0..successes {
        let response = app
            .post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed", "payload": {"n": n}}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(
        app.post_message("shop.intents", json!({"message_type": "t"}))
            .await
            .status(),
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        app.post_message("ops.commands", json!({"message_type": "deploy"}))
            .await
            .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.post_message("ops.commands", json!({"message_type": "restart"}))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.post_message("not-a-topic", json!({"message_type": "t"}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    for step in ["register", "heartbeat"] {
        let url = app.url(&format!("/api/v1/dispatchers/remote-worker/{step}"));
        let response = app.client.post(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{step}");
    }
}

async fn scrape(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    response.text().await.unwrap()
}

/// Each family's `# TYPE` and the label keys its samples use (`le` excluded).
pub(crate) fn families(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut families: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
        } else if !line.starts_with('#') && !line.is_empty() {
            let series = line.split(' ').next().unwrap();
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| families.contains_key(*base))
                })
                .unwrap_or(name);
            let keys = families
                .get_mut(family)
                .expect("a sample belongs to a typed family");
            for pair in labels
                .trim_end_matches('}')
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let key = pair.split('=').next().unwrap();
                if key != "le" {
                    keys.1.insert(key.to_owned());
                }
            }
        }
    }
    families
}

#[tokio::test]
async fn n_messages_show_as_exactly_n_on_their_series() {
    let app = canonical_app(|_| {}).await;
    canonical_traffic(&app, 7).await;
    // A path no route has, and a method the ingest path does not have: the client's, not timed.
    for (method, path, status) in [
        (reqwest::Method::GET, "/api/v1/no-such-thing", 404),
        (
            reqwest::Method::GET,
            "/api/v1/messages/shop.orders.events",
            405,
        ),
    ] {
        let response = app
            .client
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
    }
    let text = scrape(&app).await;
    let at = |series: &str| sample(&text, series);

    assert_eq!(
        at(r#"dispatch_messages_total{category="event",status="success"}"#),
        Some(7.0)
    );
    assert_eq!(
        at(r#"dispatch_duration_seconds_count{category="event",status="success"}"#),
        Some(7.0)
    );
    assert_eq!(
        at(r#"dispatch_duration_seconds_bucket{category="event",status="success",le="+Inf"}"#),
        Some(7.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="jsonl",result="success"}"#),
        Some(7.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="failing",result="error"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="intent",status="dispatcher_error"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_policy_denials_total{policy="change-freeze"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="command",status="denied"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_executions_total{dispatcher_id="ops",result="denied"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatcher_adapter_invocations_total{adapter="ops",command_type="restart"}"#),
        Some(1.0)
    );
    assert_eq!(
        at(r#"dispatch_messages_total{category="unknown",status="invalid_message"}"#),
        Some(1.0)
    );
    assert!(at("dispatcher_worker_threads").unwrap() >= 1.0);

    // The HTTP histogram is labelled by the route template, one series for every topic.
    let route = r#"http_server_request_duration_seconds_count{http_request_method="POST",http_response_status_code="200",http_route="/api/v1/messages/{topic}"}"#;
    assert_eq!(at(route), Some(8.0));
    assert!(
        !text.contains("shop.orders.events") && !text.contains("no-such-thing"),
        "no raw path or topic becomes a label"
    );
    let statuses: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("http_server_request_duration_seconds_count{"))
        .collect();
    assert!(
        statuses
            .iter()
            .all(|line| !line.contains("\"404\"") && !line.contains("\"405\"")),
        "{statuses:#?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_stats_api_agrees_with_the_metrics() {
    let app = canonical_app(|_| {}).await;
    canonical_traffic(&app, 6).await;
    let stats: Value = app
        .client
        .get(app.url("/api/v1/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["total_messages"], 10);
    assert_eq!(stats["by_status"]["success"], 7);
    assert_eq!(stats["by_status"]["dispatcher_error"], 1);
    assert_eq!(stats["by_status"]["denied"], 1);
    assert_eq!(stats["by_status"]["invalid_message"], 1);
    assert!((stats["success_rate"].as_f64().unwrap() - 0.7).abs() < 1e-9);
    // The failing dispatcher and the invalid topic are errors; the policy's refusal is not.
    assert!((stats["error_rate"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    assert!((stats["refusal_rate"].as_f64().unwrap() - 0.1).abs() < 1e-9);
    for percentile in ["avg", "p50", "p95", "p99"] {
        assert!(
            stats["latency_ms"][percentile].as_f64().unwrap() > 0.0,
            "{percentile}"
        );
    }
    let dispatchers = stats["dispatchers"].as_array().unwrap();
    let ids: Vec<&str> = dispatchers
        .iter()
        .map(|d| d["dispatcher_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["log", "jsonl", "failing", "ops"]);
    let failing = &dispatchers[2];
    assert_eq!(
        (
            failing["execution_count"].as_u64(),
            failing["error_count"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(failing["error_rate"], 1.0);
    let ops = &dispatchers[3];
    assert_eq!(
        (
            ops["execution_count"].as_u64(),
            ops["denied_count"].as_u64(),
            ops["rejected_count"].as_u64(),
            ops["error_rate"].as_f64()
        ),
        (Some(1), Some(1), Some(0), Some(0.0))
    );
    assert_eq!(dispatchers[0]["execution_count"], 6);
    assert_eq!(dispatchers[0]["error_rate"], 0.0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn names_types_and_label_keys_match_the_golden_file() {
    let app = canonical_app(|_| {}).await;
    canonical_traffic(&app, 2).await;
    let text = scrape(&app).await;
    let actual: String = families(&text)
        .into_iter()
        .map(|(name, (kind, labels))| {
            let labels: Vec<String> = labels.into_iter().collect();
            format!("{name} {kind} {}\n", labels.join(","))
        })
        .collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/golden/metrics.txt");
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(path, &actual).unwrap();
    }
    let golden =
        std::fs::read_to_string(path).expect("the golden file exists (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        actual, golden,
        "exported metrics changed; review, then UPDATE_GOLDEN=1"
    );
    app.stop().await.unwrap();
}

/// The rows of docs/metrics.md's table: name → (type, label keys).
pub(crate) fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    docs.lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let name = cells[0]
                .trim_start_matches("| ")
                .trim_matches('`')
                .to_owned();
            let kind = cells[1].to_owned();
            let labels = if cells[3] == "none" {
                BTreeSet::new()
            } else {
                cells[3]
                    .split(", ")
                    .map(|l| l.trim_matches('`').to_owned())
                    .collect()
            };
            (name, (kind, labels))
        })
        .collect()
}

#[tokio::test]
async fn docs_metrics_md_describes_exactly_what_is_exported() {
    let app = canonical_app(|_| {}).await;
    canonical_traffic(&app, 2).await;
    let exported = families(&scrape(&app).await);
    let documented = documented();
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let documented_units: BTreeMap<String, String> = docs
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let name = cells[0].trim_start_matches("| ").trim_matches('`');
            (name.to_owned(), cells[2].to_owned())
        })
        .collect();
    for (name, (kind, labels)) in &exported {
        let Some((doc_kind, doc_labels)) = documented.get(name) else {
            panic!("{name} is exported but not in docs/metrics.md");
        };
        assert_eq!(doc_kind, kind, "type of {name}");
        assert_eq!(doc_labels, labels, "labels of {name}");
    }
    let catalog: BTreeSet<String> = dispatchd::telemetry::catalog::ALL
        .iter()
        .map(|spec| spec.exported_name(""))
        .chain(["target_info".to_owned()])
        .collect();
    for (name, (kind, labels)) in &documented {
        assert!(
            catalog.contains(name),
            "{name} is documented but dispatchd has no such metric"
        );
        if let Some(spec) = dispatchd::telemetry::catalog::ALL
            .iter()
            .find(|s| s.exported_name("") == *name)
        {
            assert_eq!(spec.kind.prometheus_type(), kind, "type of {name}");
            let spec_labels: BTreeSet<String> = spec.exported_labels().collect();
            assert_eq!(&spec_labels, labels, "labels of {name}");
            // The unit OTLP carries is the table's, in UCUM: `s`, none, or `{singular}`.
            let word = &documented_units[name];
            let unit = match word.as_str() {
                "seconds" => "s".to_owned(),
                "none" => String::new(),
                plural => match plural.strip_suffix("ies") {
                    Some(stem) => format!("{{{stem}y}}"),
                    None => format!("{{{}}}", plural.trim_end_matches('s')),
                },
            };
            assert_eq!(spec.unit, unit, "unit of {name} ({word})");
        }
    }
    for name in &catalog {
        assert!(
            documented.contains_key(name),
            "{name} is in the catalog but not in docs/metrics.md"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn promtool_finds_nothing_wrong_with_a_real_scrape() {
    let Some(promtool) = required_tool("promtool") else {
        return;
    };
    let app = canonical_app(|_| {}).await;
    canonical_traffic(&app, 3).await;
    let text = scrape(&app).await;
    app.stop().await.unwrap();

    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let findings = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    // The contract keeps `_total` on the gauge dispatcher_active_total on purpose; nothing else
    // may be reported.
    let unexpected: Vec<&str> = findings
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.contains("dispatcher_active_total"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics reported:\n{findings}"
    );
}

#[tokio::test]
async fn an_independent_parser_reads_the_scrape() {
    let app = canonical_app(|_| {}).await;
    canonical_traffic(&app, 4).await;
    let text = scrape(&app).await;
    app.stop().await.unwrap();

    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let find = |metric: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("category") == Some("event")
                    && s.labels.get("status") == Some("success")
            })
            .unwrap_or_else(|| panic!("{metric} for successful events"))
    };
    let counter = find("dispatch_messages_total");
    assert!(
        matches!(counter.value, prometheus_parse::Value::Counter(n) if n == 4.0),
        "{:?}",
        counter.value
    );
    let histogram = find("dispatch_duration_seconds");
    let prometheus_parse::Value::Histogram(buckets) = &histogram.value else {
        panic!(
            "dispatch_duration_seconds is a histogram: {:?}",
            histogram.value
        );
    };
    assert_eq!(buckets.len(), 20, "19 explicit boundaries and +Inf");
    assert_eq!(buckets.last().map(|b| b.count), Some(4.0));
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative"
    );
    assert!(scrape.docs.contains_key("dispatch_messages_total"));
}

#[tokio::test]
async fn a_namespace_prefixes_every_exported_name() {
    let app = canonical_app(|config| config.metrics.namespace = "shop".to_owned()).await;
    canonical_traffic(&app, 1).await;
    let text = scrape(&app).await;
    for name in families(&text).keys() {
        assert!(name.starts_with("shop_") || name == "target_info", "{name}");
    }
    assert_eq!(
        sample(
            &text,
            r#"shop_dispatch_messages_total{category="event",status="success"}"#
        ),
        Some(1.0)
    );
    let stats: Value = app
        .client
        .get(app.url("/api/v1/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["by_status"]["success"], 2,
        "the stats read the namespaced names"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn with_metrics_disabled_metrics_and_stats_answer_404_and_dispatch_still_works() {
    let app = canonical_app(|config| config.metrics.enabled = false).await;
    canonical_traffic(&app, 1).await;
    for path in ["/metrics", "/api/v1/stats"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "metrics_disabled");
    }
    assert!(!app.telemetry_enabled());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_exporter_that_failed_answers_503() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let engine = dispatchd::engine::Engine::builder().build().unwrap();
    let state = dispatchd::http::ApiState::new(
        engine,
        dispatchd::telemetry::Telemetry::unavailable("registry clash"),
        dispatchd::health::HealthRegistry::new(Default::default(), None),
        tokio_util::sync::CancellationToken::new(),
    );
    let router = dispatchd::http::router(state, 1024);
    let response = router
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "metrics_unavailable");
    assert!(
        !body.to_string().contains("registry clash"),
        "internals are not sent to the client"
    );
}

/// `[otlp] metrics = true`: the same instruments are pushed to an OTLP/HTTP collector, with the
/// same values as `/metrics`, under the resource's service name.
#[tokio::test]
async fn metrics_are_pushed_to_an_otlp_collector_too() {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;

    let (endpoint, received) = crate::support::otlp_receiver();
    let app = canonical_app(|config| {
        config.tracing.otlp_endpoint = Some(endpoint);
        config.tracing.otlp_metrics = true;
        config.tracing.otlp_metrics_interval = Duration::from_millis(100);
    })
    .await;
    for n in 0..3 {
        let response = app
            .post_message(
                "shop.orders.events",
                json!({"message_type": "order.placed", "payload": {"n": n}}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    // The last export of the `success` series of the `log` dispatcher; the reader pushes every
    // 100 ms, so wait (bounded) until a push has seen all three.
    let successes = || -> Option<(f64, String)> {
        let mut last = None;
        for request in crate::support::otlp_metrics(&received) {
            for resource in &request.resource_metrics {
                let service = resource
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|a| a.key == "service.name")
                    .map(|a| format!("{:?}", a.value))
                    .unwrap_or_default();
                for metric in resource.scope_metrics.iter().flat_map(|s| &s.metrics) {
                    if metric.name != "dispatcher_executions" {
                        continue;
                    }
                    let Some(Data::Sum(sum)) = &metric.data else {
                        panic!("dispatcher_executions is not a sum: {metric:?}")
                    };
                    for point in &sum.data_points {
                        let label = |key: &str| {
                            point
                                .attributes
                                .iter()
                                .find(|a| a.key == key)
                                .map(|a| format!("{:?}", a.value))
                                .unwrap_or_default()
                        };
                        if label("dispatcher_id").contains("\"log\"")
                            && label("result").contains("\"success\"")
                        {
                            let value = match point.value {
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(v)) => v as f64,
                                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(v)) => v,
                                None => 0.0,
                            };
                            last = Some((value, service.clone()));
                        }
                    }
                }
            }
        }
        last
    };
    crate::support::wait_for("an OTLP push with three successes", || {
        successes().is_some_and(|(value, _)| value == 3.0)
    })
    .await;
    let (_, service) = successes().unwrap();
    assert!(service.contains("dispatchd"), "service.name was {service}");

    // Over OTLP: UCUM units, and the HTTP server metric as the stable convention names it, with
    // its attribute keys and an integer status code.
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let requests = crate::support::otlp_metrics(&received);
    let last = requests.last().unwrap();
    let metrics: Vec<_> = last
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .collect();
    let metric = |name: &str| {
        *metrics
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name} over OTLP"))
    };
    for (name, unit) in [
        ("dispatch_messages", "{message}"),
        ("dispatcher_executions", "{run}"),
        ("dispatch_duration", "s"),
        ("dispatcher_active_total", "{dispatcher}"),
        ("dispatcher_health_status", ""),
    ] {
        assert_eq!(metric(name).unit, unit, "the unit of {name}");
    }
    assert!(
        metrics
            .iter()
            .all(|m| m.name != "http_server_request_duration"),
        "the HTTP metric under its Prometheus-style name"
    );
    let http = metric("http.server.request.duration");
    assert_eq!(http.unit, "s");
    let Some(Data::Histogram(histogram)) = &http.data else {
        panic!("http.server.request.duration is not a histogram: {http:?}")
    };
    let posted = histogram
        .data_points
        .iter()
        .find(|p| {
            p.attributes.iter().any(|a| {
                a.key == "http.route"
                    && a.value.as_ref().and_then(|v| v.value.clone())
                        == Some(Any::StringValue("/api/v1/messages/{topic}".into()))
            })
        })
        .expect("the ingest route's series");
    let attribute = |key: &str| {
        posted
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
    };
    assert_eq!(
        attribute("http.request.method"),
        Some(Any::StringValue("POST".into()))
    );
    assert_eq!(
        attribute("http.response.status_code"),
        Some(Any::IntValue(200))
    );
    assert_eq!(posted.count, 3);

    let scrape = scrape(&app).await;
    assert_eq!(
        sample(
            &scrape,
            "dispatcher_executions_total{dispatcher_id=\"log\",result=\"success\"}"
        ),
        Some(3.0),
        "the same count on /metrics"
    );
    app.stop().await.unwrap();
}
