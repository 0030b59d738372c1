use std::time::Duration;

use async_trait::async_trait;
use dispatchd::engine::{
    Category, CommandAdapter, Dispatcher, Effect, Handler, HandlerError, Message, OutputMessage,
    Route, RulePolicy,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::TestApp;

#[tokio::test]
async fn an_event_is_dispatched_logged_and_appended_to_the_jsonl_file() {
    let app = TestApp::start().await;
    let response = app
        .post_message(
            "shop.orders.events",
            json!({"message_type": "order.placed", "payload": {"order_id": 42}, "correlation_id": "c-1"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "success");
    assert_eq!(result["message_category"], "event");
    assert_eq!(result["correlation_id"], "c-1");
    let ran: Vec<&str> = result["dispatchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dispatcher_id"].as_str().unwrap())
        .collect();
    assert_eq!(ran, ["log", "jsonl"]);
    for field in [
        "dispatch_id",
        "topic",
        "message_type",
        "duration_ms",
        "outputs",
        "output_count",
        "error_message",
        "error_code",
        "trace_id",
        "span_id",
    ] {
        assert!(result.get(field).is_some(), "DispatchResult has {field}");
    }

    // The dispatch succeeded only after its line was committed, so it is there now.
    let lines = app.jsonl_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["topic"], "shop.orders.events");
    assert_eq!(lines[0]["payload"]["order_id"], 42);
    assert_eq!(lines[0]["message_id"], result["message_id"]);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_given_message_id_is_kept() {
    let app = TestApp::start().await;
    let result: Value = app
        .post_message(
            "a.events",
            json!({"message_type": "t", "message_id": "order-42"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(result["message_id"], "order-42");
    app.stop().await.unwrap();
}

async fn error_of(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("errors are JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned();
    let message = body["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_owned();
    (status, code, message)
}

#[tokio::test]
async fn bad_requests_get_a_json_error_with_a_4xx_status() {
    let app = TestApp::start().await;
    let url = app.url("/api/v1/messages/a.events");
    let post = |body: &'static str, content_type: &'static str| {
        app.client
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let (status, code, _) = error_of(post("not json", "application/json").await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_json")
    );

    let (status, code, message) = error_of(
        post(r#"{"payload": {}}"#, "application/json")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_envelope")
    );
    assert!(
        message.contains("missing field `message_type`"),
        "{message}"
    );

    let (status, code, message) = error_of(
        post(r#"{"message_type": "t", "paylod": 1}"#, "application/json")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_envelope")
    );
    assert!(message.contains("unknown field `paylod`"), "{message}");

    let (status, code, _) = error_of(
        post(r#"{"message_type": "t"}"#, "text/plain")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );

    let (status, code, _) = error_of(
        post(
            r#"{"message_type": "t", "message_id": ""}"#,
            "application/json",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_envelope")
    );

    let (status, code, _) =
        error_of(app.client.get(app.url("/nowhere")).send().await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );

    let (status, code, _) = error_of(app.client.get(&url).send().await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );

    // Nothing bad was dispatched, and the service still serves.
    assert!(app.jsonl_lines().is_empty());
    assert_eq!(
        app.client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = TestApp::start_with(|config| config.server.max_body_bytes = 1024, |b| b).await;
    let big = json!({"message_type": "t", "payload": "x".repeat(2048)});
    let (status, code, _) = error_of(app.post_message("a.events", big).await).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
    let small = json!({"message_type": "t", "payload": "x".repeat(100)});
    assert_eq!(
        app.post_message("a.events", small).await.status(),
        StatusCode::OK
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_topic_is_400_and_an_unrouted_one_404_both_with_the_result() {
    let app = TestApp::start().await;
    for topic in ["shop.orders", "shop.user_events", "a.events%20x"] {
        let response = app.post_message(topic, json!({"message_type": "t"})).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{topic}");
        let result: Value = response.json().await.unwrap();
        assert_eq!(result["status"], "invalid_message");
    }
    let response = app
        .post_message("ops.commands", json!({"message_type": "t"}))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "no_dispatcher");
    assert!(app.jsonl_lines().is_empty());
    app.stop().await.unwrap();
}

struct Slow;

#[async_trait]
impl Handler for Slow {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        std::future::pending::<()>().await;
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn dispatcher_failures_are_502_and_timeouts_504() {
    let app = TestApp::start_with(
        |_| {},
        |builder| {
            builder
                .dispatcher(Dispatcher::new(
                    "failing",
                    Category::Intent,
                    crate::support::Failing {
                        transient: true,
                        message: "upstream refused: token=abc123",
                    },
                ))
                .dispatcher(
                    Dispatcher::new("slow", Category::Intent, Slow)
                        .with_timeout(Duration::from_millis(50)),
                )
                .route(Route::new(
                    "to-failing",
                    "fail.intents",
                    Category::Intent,
                    "failing",
                ))
                .route(Route::new(
                    "to-slow",
                    "slow.intents",
                    Category::Intent,
                    "slow",
                ))
        },
    )
    .await;

    let response = app
        .post_message("fail.intents", json!({"message_type": "t"}))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "dispatcher_error");
    let error = result["error_message"].as_str().unwrap();
    assert!(
        error.contains("token=***") && !error.contains("abc123"),
        "{error}"
    );

    let response = app
        .post_message("slow.intents", json!({"message_type": "t"}))
        .await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "timeout");
    assert_eq!(result["dispatchers"][0]["result"], "timeout");
    app.stop().await.unwrap();
}

struct Deploys;

#[async_trait]
impl CommandAdapter for Deploys {
    fn name(&self) -> &'static str {
        "deploys"
    }

    async fn execute(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_command_a_policy_denies_is_403_and_names_the_policy() {
    let app =
        TestApp::start_with(
            |_| {},
            |builder| {
                builder
                    .dispatcher(Dispatcher::command("deployer", Deploys).with_policy(
                        RulePolicy::new("change-freeze", Effect::Allow).deny("deploy"),
                    ))
                    .route(Route::new(
                        "ops",
                        "ops.commands",
                        Category::Command,
                        "deployer",
                    ))
            },
        )
        .await;
    let response = app
        .post_message("ops.commands", json!({"message_type": "deploy"}))
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["status"], "denied");
    assert_eq!(result["error_code"], "policy_denied");
    assert_eq!(result["dispatchers"][0]["policy"], "change-freeze");
    assert_eq!(result["dispatchers"][0]["result"], "denied");

    let response = app
        .post_message("ops.commands", json!({"message_type": "rollback"}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    app.stop().await.unwrap();
}

/// A circuit breaker's and a policy's refusals through everything that reads a status: the HTTP
/// answer, `/metrics`, `/api/v1/stats`, the dispatcher's health, and the dispatch events.
#[tokio::test]
async fn refusals_are_statuses_of_their_own_and_never_count_as_errors() {
    use dispatchd::resilience::{BreakerConfig, ResilienceConfig, Trip};
    let app =
        TestApp::start_with(
            |_| {},
            |builder| {
                // One failure opens the breaker, for longer than the test.
                let mut guarded = builder.default_settings();
                guarded.resilience = ResilienceConfig {
                    breaker: Some(BreakerConfig {
                        trip: Trip::ConsecutiveFailures(1),
                        cool_down: Duration::from_secs(3600),
                        half_open_successes: 1,
                    }),
                    ..ResilienceConfig::default()
                };
                builder
                    .dispatcher_with(
                        Dispatcher::new(
                            "payments",
                            Category::Intent,
                            crate::support::Failing {
                                transient: true,
                                message: "upstream refused: token=abc123",
                            },
                        ),
                        guarded,
                    )
                    .dispatcher(Dispatcher::command("deployer", Deploys).with_policy(
                        RulePolicy::new("change-freeze", Effect::Allow).deny("deploy"),
                    ))
                    .route(Route::new(
                        "pay",
                        "pay.intents",
                        Category::Intent,
                        "payments",
                    ))
                    .route(Route::new(
                        "ops",
                        "ops.commands",
                        Category::Command,
                        "deployer",
                    ))
            },
        )
        .await;
    let post = |topic: &'static str, message_type: &'static str| {
        let app = &app;
        async move {
            let response = app
                .post_message(topic, json!({"message_type": message_type}))
                .await;
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };

    let (status, failed) = post("pay.intents", "capture").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{failed}");
    let (status, rejected) = post("pay.intents", "capture").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{rejected}");
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["error_code"], "rejected");
    assert_eq!(rejected["dispatchers"][0]["result"], "rejected");
    let (status, denied) = post("ops.commands", "deploy").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{denied}");
    assert_eq!(denied["status"], "denied");

    let metrics = app.scrape().await;
    for (series, value) in [
        (
            r#"dispatch_messages_total{category="intent",status="dispatcher_error"}"#,
            1.0,
        ),
        (
            r#"dispatch_messages_total{category="intent",status="rejected"}"#,
            1.0,
        ),
        (
            r#"dispatch_messages_total{category="command",status="denied"}"#,
            1.0,
        ),
        (
            r#"dispatcher_executions_total{dispatcher_id="payments",result="error"}"#,
            1.0,
        ),
        (
            r#"dispatcher_executions_total{dispatcher_id="payments",result="rejected"}"#,
            1.0,
        ),
        (
            r#"dispatcher_executions_total{dispatcher_id="deployer",result="denied"}"#,
            1.0,
        ),
        (
            r#"dispatcher_execution_duration_seconds_count{dispatcher_id="payments"}"#,
            1.0,
        ),
    ] {
        assert_eq!(
            crate::support::sample(&metrics, series),
            Some(value),
            "{series}"
        );
    }
    assert!(
        crate::support::sample(
            &metrics,
            r#"dispatcher_execution_duration_seconds_count{dispatcher_id="deployer"}"#
        )
        .is_none(),
        "a denied command never ran, so it has no latency"
    );

    let stats = app.get_json("/api/v1/stats").await;
    assert_eq!(stats["total_messages"], 3);
    assert_eq!(stats["by_status"]["dispatcher_error"], 1);
    assert_eq!(stats["by_status"]["rejected"], 1);
    assert_eq!(stats["by_status"]["denied"], 1);
    assert!(
        (stats["error_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{stats}"
    );
    assert!(
        (stats["refusal_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9,
        "{stats}"
    );
    let of = |id: &str| {
        stats["dispatchers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["dispatcher_id"] == id)
            .unwrap()
            .clone()
    };
    let payments = of("payments");
    assert_eq!(
        (
            &payments["execution_count"],
            &payments["error_count"],
            &payments["rejected_count"],
            &payments["error_rate"]
        ),
        (&json!(1), &json!(1), &json!(1), &json!(1.0)),
        "{payments}"
    );
    let deployer = of("deployer");
    assert_eq!(
        (
            &deployer["execution_count"],
            &deployer["denied_count"],
            &deployer["rejected_count"],
            &deployer["error_rate"]
        ),
        (&json!(0), &json!(1), &json!(0), &Value::Null),
        "{deployer}"
    );

    // The refusal did not add a failure to the dispatcher's health.
    let health = app.get_json("/api/v1/dispatchers/payments").await;
    assert_eq!(health["consecutive_failures"], 1, "{health}");

    // Dispatch events: a refusal ends (`end`) with its status; only the failure is an `error`.
    let (stopped, dir) = app.stop_keeping_files().await;
    stopped.unwrap();
    let events: Vec<Value> = std::fs::read_to_string(dir.path().join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let event_of = |result: &Value| {
        events
            .iter()
            .find(|e| e["runId"] == result["dispatch_id"])
            .unwrap_or_else(|| panic!("an event for {result}"))
            .clone()
    };
    assert_eq!(event_of(&failed)["event"], "error");
    for (result, status) in [(&rejected, "rejected"), (&denied, "denied")] {
        let event = event_of(result);
        assert_eq!(event["event"], "end", "{event}");
        assert_eq!(event["metadata"]["status"], status, "{event}");
        assert_eq!(event["output"]["status"], status, "{event}");
    }
}
