use std::io::Write;

use super::*;
use crate::telemetry::traces::LogFormat;

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn load(text: &str) -> Result<Config, ConfigError> {
    let f = file(text);
    Config::load_with(Some(f.path()), |_| None)
}

fn problems(text: &str) -> Vec<String> {
    let f = file(text);
    let error = Config::load_with(Some(f.path()), |_| None).unwrap_err();
    let prefix = f.path().display().to_string();
    error
        .problems()
        .iter()
        .map(|p| p.to_string().replace(&prefix, "FILE"))
        .collect()
}

#[test]
fn the_embedded_defaults_route_events_to_log_and_jsonl() {
    let config = Config::embedded().unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(config.server.max_body_bytes, 1024 * 1024);
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
    assert!(config.metrics.enabled);
    assert_eq!(config.metrics.namespace, "");
    let ids: Vec<&str> = config
        .dispatchers
        .iter()
        .map(|d| d.dispatcher_id.as_str())
        .collect();
    assert_eq!(ids, ["log", "jsonl"]);
    assert_eq!(
        config.dispatchers[1].kind,
        DispatcherKind::Jsonl {
            path: "./dispatchd-data/messages.jsonl".into()
        }
    );
    assert!(
        config
            .routes
            .iter()
            .all(|r| r.topic_pattern == "**" && r.message_category == Category::Event)
    );
}

#[test]
fn a_file_merges_tables_and_replaces_lists() {
    let config = load(
        r#"
[server]
listen = "127.0.0.1:0"

[[dispatchers]]
dispatcher_id = "audit"
kind = "jsonl"
category = "intents"
timeout = "250ms"
message_types = ["refund"]

[[routes]]
route_id = "audit"
topic_pattern = "billing.**"
message_category = "intent"
dispatcher_id = "audit"
"#,
    )
    .unwrap();
    assert_eq!(config.server.listen.port(), 0);
    assert_eq!(
        config.server.max_body_bytes,
        1024 * 1024,
        "untouched keys keep their defaults"
    );
    assert_eq!(config.dispatchers.len(), 1);
    let audit = &config.dispatchers[0];
    assert_eq!(audit.category, Category::Intent);
    assert_eq!(audit.timeout, Duration::from_millis(250));
    assert_eq!(
        audit.kind,
        DispatcherKind::Jsonl {
            path: "./dispatchd-data/audit.jsonl".into()
        }
    );
    assert_eq!(config.routes.len(), 1);
    assert!(config.routes[0].enabled);
}

#[test]
fn the_environment_overrides_the_file() {
    let f = file("[metrics]\nnamespace = \"from_file\"\n");
    let env = |name: &str| match name {
        "DISPATCHD_LISTEN" => Some("127.0.0.1:7777".to_owned()),
        "DISPATCHD_METRICS_NAMESPACE" => Some("from_env".to_owned()),
        "DISPATCHD_METRICS_ENABLED" => Some("false".to_owned()),
        "DISPATCHD_LOG" => Some("debug".to_owned()),
        _ => None,
    };
    let config = Config::load_with(Some(f.path()), env).unwrap();
    assert_eq!(config.server.listen.port(), 7777);
    assert_eq!(config.metrics.namespace, "from_env");
    assert!(!config.metrics.enabled);
    assert_eq!(config.log.filter, "debug");
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let env = |name: &str| (name == "DISPATCHD_LISTEN").then(|| "localhost".to_owned());
    let error = Config::load_with(None, env).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid configuration:\n  environment variable DISPATCHD_LISTEN: `server.listen`: `localhost` is not an IP address and port such as 127.0.0.1:9000"
    );
}

#[test]
fn unknown_fields_are_errors_with_their_line() {
    assert_eq!(
        problems("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n"),
        ["FILE:3: `server.lisen`: unknown field (did you mean `listen`?)"]
    );
}

#[test]
fn syntax_errors_point_at_their_line() {
    let found = problems("[server]\nlisten = \n");
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("FILE:2: "), "{found:?}");
}

#[test]
fn a_missing_file_is_a_read_error() {
    let error =
        Config::load_with(Some(Path::new("/nonexistent/dispatchd.toml")), |_| None).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot read config file /nonexistent/dispatchd.toml")
    );
}

#[test]
fn every_semantic_problem_is_reported_with_path_and_line() {
    let found = problems(
        r#"[server]
listen = "nowhere"
shutdown_grace = "soon"

[metrics]
namespace = "9lives"

[[dispatchers]]
dispatcher_id = "a"
kind = "carrier-pigeon"
category = "event"

[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"
path = "x.jsonl"

[[routes]]
route_id = "r1"
topic_pattern = "a.b*"
message_category = "event"
dispatcher_id = "a"

[[routes]]
route_id = "r2"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "ghost"
"#,
    );
    let expected = [
        "FILE:2: `server.listen`: `nowhere` is not an IP address and port such as 127.0.0.1:9000",
        "FILE:3: `server.shutdown_grace`: `soon` is not a duration such as \"30s\" or \"500ms\": expected number at 0",
        "FILE:6: `metrics.namespace`: `9lives` must be empty or match [a-zA-Z_][a-zA-Z0-9_]*",
        "FILE:10: `dispatchers[0].kind`: unknown kind `carrier-pigeon` (expected one of log, jsonl, http, redis_stream, nats, worker)",
        "FILE:14: `dispatchers[1].dispatcher_id`: dispatcher `a` is registered twice",
        "FILE:17: `dispatchers[1].path`: applies only to kind `jsonl`",
        "FILE:21: `routes[0].topic_pattern`: route `r1` has an invalid topic pattern `a.b*`: pattern segment 1 (`b*`) must be `*`, `**` or made of [A-Za-z0-9_-] (wildcards are whole segments)",
        "FILE:29: `routes[1].dispatcher_id`: route `r2` names dispatcher `ghost`, which is not registered",
    ];
    assert_eq!(found, expected);
}

#[test]
fn categories_and_command_routes_are_checked() {
    let found = problems(
        r#"[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "commands"

[[dispatchers]]
dispatcher_id = "b"
kind = "log"
category = "gossip"
"#,
    );
    assert_eq!(
        found,
        [
            "FILE:4: `dispatchers[0].category`: kind `log` handles events and intents; a command dispatcher needs kind = \"http\" (its command adapter) or an adapter registered in code",
            "FILE:9: `dispatchers[1].category`: unknown category `gossip` (expected event, command or intent)"
        ]
    );
    let found = problems(
        "[[dispatchers]]\ndispatcher_id = \"a\"\nkind = \"log\"\ncategory = \"command\"\n",
    );
    assert_eq!(
        found,
        [
            "FILE:4: `dispatchers[0].category`: kind `log` handles events and intents; a command dispatcher needs kind = \"http\" (its command adapter) or an adapter registered in code"
        ]
    );
}

#[test]
fn health_settings_are_validated_so_staleness_can_fire() {
    let config = load(
        r#"
[health]
stale_threshold = "60s"
failure_limit = 3

[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"
critical = true

[[dispatchers]]
dispatcher_id = "b"
kind = "log"
category = "event"
stale_threshold = "20s"
heartbeat_interval = "2s"
"#,
    )
    .unwrap();
    assert_eq!(config.health.failure_limit, 3);
    let a = &config.dispatchers[0];
    assert_eq!(
        (a.stale_threshold, a.heartbeat_interval, a.critical),
        (Duration::from_secs(60), Duration::from_secs(15), true)
    );
    let b = &config.dispatchers[1];
    assert_eq!(
        (b.stale_threshold, b.heartbeat_interval, b.critical),
        (Duration::from_secs(20), Duration::from_secs(2), false)
    );

    let found = problems(
        r#"[health]
failure_limit = 0
max_workers = 1000000

[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"
stale_threshold = "10s"
heartbeat_interval = "10s"
"#,
    );
    assert_eq!(
        found,
        [
            "FILE:2: `health.failure_limit`: must be at least 1",
            "FILE:3: `health.max_workers`: must be at most 100000: every worker is a set of series",
            "FILE:10: `dispatchers[0].heartbeat_interval`: (10s) must be shorter than the stale threshold (10s), or the dispatcher goes stale between heartbeats",
        ]
    );
}

#[test]
fn protections_are_parsed_with_defaults_and_checked() {
    use crate::resilience::{RateLimitMode, Trip};

    let config = load(
        r#"
[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"

[dispatchers.retry]
attempts = 3

[dispatchers.circuit_breaker]
failure_ratio = 0.5
minimum_calls = 20
window = "30s"

[dispatchers.rate_limit]
per_second = 50
mode = "reject"

[dispatchers.concurrency]
max_in_flight = 4

[dispatchers.dedup]
ttl = "5m"
"#,
    )
    .unwrap();
    let r = &config.dispatchers[0].resilience;
    let retry = r.retry.unwrap();
    assert_eq!(
        (retry.attempts, retry.initial_backoff, retry.max_backoff),
        (3, Duration::from_millis(100), Duration::from_secs(10))
    );
    let breaker = r.breaker.unwrap();
    assert_eq!(
        breaker.trip,
        Trip::FailureRatio {
            ratio: 0.5,
            minimum_calls: 20,
            window: Duration::from_secs(30)
        }
    );
    assert_eq!(
        (breaker.cool_down, breaker.half_open_successes),
        (Duration::from_secs(30), 1)
    );
    let limit = r.rate_limit.unwrap();
    assert_eq!(
        (limit.per_second.get(), limit.burst.get(), limit.mode),
        (50, 50, RateLimitMode::Reject)
    );
    assert_eq!(r.concurrency.unwrap().max_in_flight, 4);
    assert_eq!(r.dedup.unwrap().ttl, Duration::from_secs(300));
    assert!(
        Config::embedded()
            .unwrap()
            .dispatchers
            .iter()
            .all(|d| d.resilience.is_empty())
    );

    let found = problems(
        r#"[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"

[dispatchers.circuit_breaker]
consecutive_failures = 3
failure_ratio = 0.5

[dispatchers.rate_limit]
per_second = 0
mode = "sometimes"

[dispatchers.retry]
attempts = 1000
initial_backoff = "20s"

[dispatchers.dedup]
capacity = 100000000
"#,
    );
    assert_eq!(
        found,
        [
            "FILE:6: `dispatchers[0].circuit_breaker`: set either consecutive_failures or failure_ratio (with minimum_calls and window)",
            "FILE:11: `dispatchers[0].rate_limit.per_second`: must be at least 1",
            "FILE:12: `dispatchers[0].rate_limit.mode`: must be \"wait\" or \"reject\"",
            "FILE:15: `dispatchers[0].retry.attempts`: must be at most 100",
            "FILE:16: `dispatchers[0].retry.initial_backoff`: must not be longer than retry.max_backoff",
            "FILE:19: `dispatchers[0].dedup.capacity`: must be at most 16777216 (its table would take more than 1 GiB)",
        ]
    );
}

#[test]
fn config_from_text_reads_like_a_file_and_names_it_in_problems() {
    let text = "[server]\nlisten = \"127.0.0.1:9999\"\n";
    let from_text = Config::from_text(Path::new("inline.toml"), text, |_| None).unwrap();
    assert_eq!(from_text.server.listen, load(text).unwrap().server.listen);
    assert_eq!(from_text.server.listen.port(), 9999);

    let error = Config::from_text(Path::new("inline.toml"), "[server]\nlisten = 7\n", |_| None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("inline.toml:2"), "{error}");
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases(300)))]

        /// Whatever a config file holds, loading it answers a config or problems, never a panic.
        #[test]
        fn arbitrary_files_never_panic(text in "(\\[[a-z_.]{1,12}\\]\n|[a-z_]{1,12} = (\"[^\"\\\\\n]{0,12}\"|[0-9]{1,6}|true)\n|\\[\\[(dispatchers|routes|sinks)\\]\\]\n){0,12}") {
            let _ = Config::from_text(Path::new("fuzz.toml"), &text, |_| None);
        }
    }
}

#[test]
fn tracing_and_otlp_settings_are_read_and_checked() {
    let config = load(
        r#"
[tracing]
sampling_ratio = 0.25
log_format = "json"

[otlp]
endpoint = "http://127.0.0.1:4318"
metrics = true
metrics_interval = "15s"
"#,
    )
    .unwrap();
    assert_eq!(config.tracing.sampling_ratio, 0.25);
    assert_eq!(config.tracing.log_format, LogFormat::Json);
    assert_eq!(
        config.tracing.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318")
    );
    assert!(config.tracing.otlp_metrics);
    assert_eq!(
        config.tracing.otlp_metrics_interval,
        Duration::from_secs(15)
    );

    assert_eq!(
        problems(
            r#"
[tracing]
sampling_ratio = 1.5
log_format = "xml"

[otlp]
endpoint = "collector:4318"
metrics_interval = "0s"
"#
        ),
        [
            "FILE:3: `tracing.sampling_ratio`: must be between 0 and 1",
            "FILE:4: `tracing.log_format`: unknown format `xml` (expected text or json)",
            "FILE:7: `otlp.endpoint`: `collector:4318` is not an http(s) URL",
            "FILE:8: `otlp.metrics_interval`: must be more than 0",
        ]
    );
    assert_eq!(
        problems("[otlp]\nmetrics = true\n"),
        ["FILE:2: `otlp.metrics`: needs otlp.endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT)"]
    );
}

#[test]
fn tokens_come_from_the_environment_and_the_file_and_problems_never_show_them() {
    let f = file(
        r#"
[[auth.tokens]]
name = "checkout"
token_env = "CHECKOUT_TOKEN"
scopes = ["ingest"]

[[auth.tokens]]
name = "prometheus"
token = "metrics-token-0123456789"
scopes = ["metrics"]
"#,
    );
    let env = |name: &str| match name {
        "DISPATCHD_API_TOKEN" => Some("env-api-token-0123456789".to_owned()),
        "CHECKOUT_TOKEN" => Some("checkout-token-0123456789".to_owned()),
        _ => None,
    };
    let config = Config::load_with(Some(f.path()), env).unwrap();
    let tokens = &config.auth;
    use crate::auth::Scope;
    let check = |token: &str, scope| {
        tokens
            .check(Some(format!("Bearer {token}").as_bytes()), scope)
            .map(str::to_owned)
    };
    assert_eq!(
        check("env-api-token-0123456789", Scope::Admin).as_deref(),
        Ok("DISPATCHD_API_TOKEN")
    );
    assert_eq!(
        check("checkout-token-0123456789", Scope::Ingest).as_deref(),
        Ok("checkout")
    );
    assert_eq!(
        check("metrics-token-0123456789", Scope::Metrics).as_deref(),
        Ok("prometheus")
    );
    assert!(tokens.any_with(Scope::Metrics));
    assert!(!format!("{config:?}").contains("0123456789"));

    let problems = problems(
        r#"
[[auth.tokens]]
token = "short"
scopes = ["ingest", "everything"]

[[auth.tokens]]
token_env = "NOT_SET_ANYWHERE"
scopes = []

[[auth.tokens]]
token = "long-enough-token-0123"
token_env = "ALSO"
scopes = ["admin"]
"#,
    );
    assert_eq!(
        problems,
        [
            "FILE:3: `auth.tokens[0].token`: a token must be at least 16 characters, without spaces",
            "FILE:4: `auth.tokens[0].scopes`: unknown scope `everything` (expected ingest, admin or metrics)",
            "FILE:7: `auth.tokens[1].token_env`: the environment variable `NOT_SET_ANYWHERE` is not set",
            "FILE:8: `auth.tokens[1].scopes`: must name at least one scope",
            "FILE:11: `auth.tokens[2].token`: set exactly one of token and token_env",
        ]
    );
    assert!(
        problems
            .iter()
            .all(|p| !p.contains("short\"") && !p.contains("0123\""))
    );
}

#[test]
fn server_limits_have_defaults_and_bounds() {
    let config = Config::embedded().unwrap();
    assert_eq!(config.server.max_header_bytes, 16 * 1024);
    assert_eq!(config.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.server.request_timeout, Duration::from_secs(30));
    assert_eq!(config.server.max_in_flight, 1024);
    assert_eq!(config.server.max_connections, 4096);
    assert_eq!(config.server.drain_delay, Duration::from_secs(5));
    assert_eq!(config.server.min_body_rate, 1024);
    assert_eq!(config.server.body_rate_grace, Duration::from_secs(5));
    assert!(config.auth.is_empty());
    assert_eq!(
        problems(
            "[server]\nmax_header_bytes = 100\nheader_read_timeout = \"0s\"\nmax_in_flight = 0\n"
        ),
        [
            "FILE:2: `server.max_header_bytes`: must be between 8192 and 1048576",
            "FILE:3: `server.header_read_timeout`: must be more than 0",
            "FILE:4: `server.max_in_flight`: must be between 1 and 1000000",
        ]
    );
}

#[test]
fn the_drain_delay_and_the_body_rate_may_be_turned_off_and_are_checked() {
    let off = load(
        "[server]
drain_delay = \"0s\"\nmin_body_rate = 0\n",
    )
    .unwrap();
    assert_eq!(off.server.drain_delay, Duration::ZERO);
    assert_eq!(off.server.min_body_rate, 0);
    assert_eq!(
        problems(
            "[server]\ndrain_delay = \"soon\"\nmin_body_rate = 2000000000\nbody_rate_grace = \"5\"\n"
        ),
        [
            "FILE:2: `server.drain_delay`: `soon` is not a duration such as \"30s\" or \"500ms\": expected number at 0",
            "FILE:3: `server.min_body_rate`: must be between 0 and 1000000000",
            "FILE:4: `server.body_rate_grace`: `5` is not a duration such as \"30s\" or \"500ms\": time unit needed, for example 5sec or 5ms",
        ]
    );
}

#[test]
fn redaction_words_extend_the_defaults() {
    let config = load("[redaction]\ndeny = [\"iban\"]\nallow = []\n").unwrap();
    assert!(config.redaction.is_sensitive("customer_iban"));
    assert!(config.redaction.is_sensitive("password"));
    assert!(!config.redaction.is_sensitive("order_id"));
    let strict = load("[redaction]\nallow = [\"order_id\"]\n").unwrap();
    assert!(strict.redaction.is_sensitive("email"));
    assert!(!strict.redaction.is_sensitive("order_id"));
}

#[test]
fn the_redis_bus_is_read_with_its_dead_letter_file_and_checked() {
    let config = load(
        r#"
[bus]
kind = "redis"
redis_url = "redis://127.0.0.1:6379"
claim_idle = "5s"
consumer_retention = "10m"
trim_every = "250ms"
dead_letter = "/var/lib/dispatchd/bus.dead-letters.jsonl"
"#,
    )
    .unwrap();
    let redis = config.bus.redis.unwrap();
    assert_eq!(redis.claim_idle, Duration::from_secs(5));
    assert_eq!(redis.consumer_retention, Duration::from_secs(600));
    assert_eq!(redis.trim_every, Duration::from_millis(250));
    assert_eq!(
        redis.dead_letter,
        Path::new("/var/lib/dispatchd/bus.dead-letters.jsonl")
    );

    let default = load("[bus]\nkind = \"redis\"\nredis_url = \"redis://h:6379\"\n").unwrap();
    assert_eq!(
        default.bus.redis.unwrap().dead_letter,
        Path::new("./dispatchd-data/bus.dead-letters.jsonl")
    );

    assert_eq!(
        problems("[bus]\nkind = \"redis\"\nredis_url = \"http://h\"\n"),
        ["FILE:3: `bus.redis_url`: `http://h` is not a redis:// URL"]
    );
}

/// What `check-config` prints for a file: its problems (or, when it is valid, its warnings),
/// with the temporary file's path as FILE.
fn report(text: &str) -> Vec<String> {
    let f = file(text);
    let prefix = f.path().display().to_string();
    let shown = |p: &Problem| p.to_string().replace(&prefix, "FILE");
    match Config::load_with(Some(f.path()), |_| None) {
        Ok(config) => config
            .warnings
            .iter()
            .map(|w| format!("warning: {}", shown(w)))
            .collect(),
        Err(error) => error.problems().iter().map(shown).collect(),
    }
}

const LOG_A: &str =
    "[[dispatchers]]\ndispatcher_id = \"a\"\nkind = \"log\"\ncategory = \"event\"\n";

/// Broken files as a new user writes them, and exactly what check-config says of each: every
/// problem, each with its line and full field path.
#[test]
fn check_config_reports_every_problem_of_each_broken_file() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "two misspelt fields in two sections",
            "[server]\nlistn = \"x\"\n[metrics]\nenabld = true\n".to_owned(),
            vec![
                "FILE:2: `server.listn`: unknown field (did you mean `listen`?)",
                "FILE:4: `metrics.enabld`: unknown field (did you mean `enabled`?)",
            ],
        ),
        (
            "an unknown field far from any known one lists the known ones",
            "[log]\nverbosity = 3\n".to_owned(),
            vec!["FILE:2: `log.verbosity`: unknown field, expected `filter`"],
        ),
        (
            "wrong types, each named, none hiding the next",
            "[server]\nmax_body_bytes = \"1MB\"\nrequest_timeout = 30\n[metrics]\nenabled = \"yes\"\n[tracing]\nsampling_ratio = \"all\"\n".to_owned(),
            vec![
                "FILE:2: `server.max_body_bytes`: must be a whole number, 0 or more (found string \"1MB\")",
                "FILE:3: `server.request_timeout`: must be a duration in quotes, such as \"30s\" or \"500ms\" (found integer `30`)",
                "FILE:5: `metrics.enabled`: must be true or false (found string \"yes\")",
                "FILE:7: `tracing.sampling_ratio`: must be a number (found string \"all\")",
            ],
        ),
        (
            "a bad category hides neither an unknown dispatcher nor a bad pattern",
            format!("{LOG_A}\n[[routes]]\nroute_id = \"r1\"\ntopic_pattern = \"x.events.*\"\nmessage_category = \"evnt\"\ndispatcher_id = \"a\"\n\n[[routes]]\nroute_id = \"r2\"\ntopic_pattern = \"x..y\"\nmessage_category = \"event\"\ndispatcher_id = \"nope\"\n"),
            vec![
                "FILE:9: `routes[0].message_category`: unknown category `evnt` (expected event, command or intent)",
                "FILE:14: `routes[1].topic_pattern`: route `r2` has an invalid topic pattern `x..y`: pattern segment 1 is empty",
                "FILE:16: `routes[1].dispatcher_id`: route `r2` names dispatcher `nope`, which is not registered",
            ],
        ),
        (
            "each duplicate route id at its own line",
            format!("{LOG_A}{}", "[[routes]]\nroute_id = \"r\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"a\"\n".repeat(3)),
            vec![
                "FILE:11: `routes[1].route_id`: route `r` is registered twice",
                "FILE:16: `routes[2].route_id`: route `r` is registered twice",
            ],
        ),
        (
            "the Redis bus without a URL is blamed on the line that chose it",
            "[bus]\nkind = \"redis\"\n".to_owned(),
            vec!["FILE:2: `bus.redis_url`: is required when bus.kind is \"redis\" (or DISPATCHD_REDIS_URL)"],
        ),
        (
            "a route missing a field is reported, and the next route keeps its own number and line",
            format!("{LOG_A}\n[[routes]]\nroute_id = \"r1\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\n\n[[routes]]\nroute_id = \"r2\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"ghost\"\n"),
            vec![
                "FILE:6: `routes[0].dispatcher_id`: is required",
                "FILE:15: `routes[1].dispatcher_id`: route `r2` names dispatcher `ghost`, which is not registered",
            ],
        ),
        (
            "a dispatcher that cannot be read is not also an unknown dispatcher of its route",
            "[[dispatchers]]\ndispatcher_id = \"a\"\ncategory = \"event\"\n\n[[routes]]\nroute_id = \"r\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"a\"\n".to_owned(),
            vec!["FILE:1: `dispatchers[0].kind`: is required"],
        ),
        (
            "a nested table: a misspelt key and the required key it then lacks",
            "[[dispatchers]]\ndispatcher_id = \"a\"\nkind = \"log\"\ncategory = \"event\"\n[dispatchers.retry]\natempts = 3\n\n[[routes]]\nroute_id = \"r\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"a\"\n".to_owned(),
            vec![
                "FILE:5: `dispatchers[0].retry.attempts`: is required",
                "FILE:6: `dispatchers[0].retry.atempts`: unknown field (did you mean `attempts`?)",
            ],
        ),
        (
            "a route no topic can reach",
            format!("{LOG_A}[[routes]]\nroute_id = \"r\"\ntopic_pattern = \"shop.orders\"\nmessage_category = \"event\"\ndispatcher_id = \"a\"\n"),
            vec!["FILE:7: `routes[0].topic_pattern`: route `r` can never match: no topic matching `shop.orders` has category event (a topic's category is one whole segment such as `events`)"],
        ),
        (
            "dispatchers but no routes: valid, with a warning",
            LOG_A.to_owned(),
            vec!["warning: FILE:2: `dispatchers[0].dispatcher_id`: dispatcher `a` receives nothing: there are no routes, so every message would answer 404 no_dispatcher"],
        ),
    ];
    for (what, text, expected) in cases {
        assert_eq!(report(&text), expected, "{what}");
    }
}

#[test]
fn the_effective_configuration_masks_every_secret() {
    let f = file(
        r#"[auth]
api_token = "supersecret-token-1234"
[[auth.tokens]]
name = "ci"
token_env = "CI_TOKEN"
scopes = ["ingest"]
[bus]
kind = "redis"
redis_url = "redis://user:hunter2@127.0.0.1:6379"
[[sinks]]
name = "lunary"
service = "lunary"
endpoint = "http://127.0.0.1:1"
api_key = "6d4b1a52-9c3e-4f7a-8b21-0c5d9e8f7a61"
headers = { Authorization = "Bearer abcdefabcdef", X-Team = "blue" }
[[dispatchers]]
dispatcher_id = "billing"
kind = "http"
category = "event"
url = "http://127.0.0.1:1/in"
headers = { Authorization = "Bearer 0123dispatcher" }
headers_env = { X-Api-Key = "BILLING_KEY" }
[[routes]]
route_id = "billing"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "billing"
"#,
    );
    let env = |name: &str| match name {
        "CI_TOKEN" => Some("ci-token-from-env-0123".to_owned()),
        "BILLING_KEY" => Some("billing-key-from-env".to_owned()),
        _ => None,
    };
    let (text, config) = Config::effective(Some(f.path()), env);
    let text = text.unwrap();
    config.unwrap();
    for secret in [
        "supersecret",
        "hunter2",
        "6d4b1a52",
        "abcdefabcdef",
        "ci-token-from-env",
        "0123dispatcher",
        "billing-key-from-env",
    ] {
        assert!(!text.contains(secret), "{secret} in\n{text}");
    }
    for kept in [
        "CI_TOKEN",
        "X-Api-Key = \"BILLING_KEY\"",
        "X-Team = \"blue\"",
        "127.0.0.1:6379",
        "listen = \"127.0.0.1:9000\"",
    ] {
        assert!(text.contains(kept), "{kept} missing from\n{text}");
    }
    // What is printed reads back as the same configuration (less the masked secrets).
    let reread: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(reread["bus"]["kind"].as_str(), Some("redis"));
}

#[test]
fn a_sink_api_key_comes_from_the_injected_environment() {
    let f = file("[[sinks]]\nname = \"l\"\nservice = \"lunary\"\n");
    let key = "0f6b2c1e-4a7d-4e2b-9c3f-5d8e1a2b3c4d";
    let env = |name: &str| (name == "DISPATCHD_API_KEY").then(|| key.to_owned());
    let config = Config::load_with(Some(f.path()), env).unwrap();
    assert_eq!(config.sinks[0].sink.api_key.clone(), Some(key.to_owned()));
    let error = Config::load_with(Some(f.path()), |_| None).unwrap_err();
    assert!(error.to_string().contains("needs an api key"), "{error}");
}

/// Lunary answers 401 to a key that is not a UUID (it takes it for a session token), so
/// check-config says so where the key was written, or names the variable it came from; the key
/// itself is never printed. Helicone keys have no such form.
#[test]
fn a_lunary_api_key_that_is_not_a_uuid_is_reported_where_it_was_set() {
    let text = "[[sinks]]\nname = \"l\"\nservice = \"lunary\"\napi_key = \"pk-s3cr3t-value\"\n";
    let found = problems(text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("FILE:4: `sinks[0].api_key`: the api key is not a UUID"),
        "{found:?}"
    );
    assert!(!found[0].contains("s3cr3t"), "{found:?}");

    let f = file("[[sinks]]\nname = \"l\"\nservice = \"lunary\"\n");
    let env = |name: &str| (name == "DISPATCHD_API_KEY").then(|| "pk-s3cr3t-value".to_owned());
    let error = Config::load_with(Some(f.path()), env).unwrap_err();
    let shown = error.to_string();
    assert!(
        shown.contains("`sinks[0].api_key`: DISPATCHD_API_KEY is not a UUID"),
        "{shown}"
    );
    assert!(!shown.contains("s3cr3t"), "{shown}");

    let helicone =
        "[[sinks]]\nname = \"h\"\nservice = \"helicone\"\napi_key = \"sk-helicone-abc\"\n";
    assert!(load(helicone).is_ok());
}

/// Every field of the network kinds, read into their validated shapes.
#[test]
fn network_dispatchers_are_read_with_their_defaults() {
    let f = file(
        r#"[bus]
kind = "redis"
redis_url = "redis://127.0.0.1:6390"

[[dispatchers]]
dispatcher_id = "billing"
kind = "http"
category = "cmd"
url = "https://billing.internal:8443/commands"
method = "put"
timeout = "5s"
headers = { X-Team = "payments" }
headers_env = { Authorization = "BILLING_TOKEN" }

[dispatchers.policy]
default = "deny"

[[dispatchers.policy.rules]]
effect = "deny"
command_type = "refund"
params = { amount = { min = 500.01 } }

[[dispatchers.policy.rules]]
effect = "allow"
command_type = "refund"
params = { currency = ["EUR", "USD"], "order.channel" = "web" }

[[dispatchers]]
dispatcher_id = "stream"
kind = "redis_stream"
category = "event"
stream = "orders"
max_len = 10000

[[dispatchers]]
dispatcher_id = "nats"
kind = "nats"
category = "evt"
jetstream = true
call_timeout = "750ms"

[[routes]]
route_id = "billing"
topic_pattern = "onex.cmd.billing.*"
message_category = "command"
dispatcher_id = "billing"

[[routes]]
route_id = "orders"
topic_pattern = "onex.evt.**"
message_category = "event"
dispatcher_id = "stream"

[[routes]]
route_id = "nats"
topic_pattern = "shop.*.events"
message_category = "event"
dispatcher_id = "nats"
"#,
    );
    let env = |name: &str| (name == "BILLING_TOKEN").then(|| "Bearer t0p-s3cret".to_owned());
    let config = Config::load_with(Some(f.path()), env).unwrap();
    let [billing, stream, nats] = &config.dispatchers[..] else {
        panic!("three dispatchers")
    };
    assert_eq!(billing.category, Category::Command);
    let DispatcherKind::Http { target, policy } = &billing.kind else {
        panic!("http: {:?}", billing.kind)
    };
    assert_eq!(
        target.url.as_str(),
        "https://billing.internal:8443/commands"
    );
    assert_eq!(target.method, reqwest::Method::PUT);
    assert_eq!(target.headers["x-team"], "payments");
    assert_eq!(target.headers["authorization"], "Bearer t0p-s3cret");
    assert!(target.headers["authorization"].is_sensitive());
    assert!(
        !format!("{config:?}").contains("t0p-s3cret"),
        "never printed"
    );
    let policy = policy.as_ref().expect("a policy");
    use crate::engine::{Decision, Envelope, Message, Policy};
    assert_eq!(policy.name(), "billing", "named after the dispatcher");
    let check = |payload: serde_json::Value| {
        let envelope = Envelope::new("refund", payload);
        policy.check(&Message::new(
            "onex.cmd.billing.refund",
            Category::Command,
            &envelope,
        ))
    };
    assert_eq!(
        check(serde_json::json!({"amount": 20, "currency": "EUR", "order": {"channel": "web"}})),
        Decision::Allow
    );
    assert!(matches!(
        check(serde_json::json!({"amount": 900, "currency": "EUR", "order": {"channel": "web"}})),
        Decision::Deny { .. }
    ));
    assert!(matches!(
        check(serde_json::json!({"amount": 20, "currency": "GBP", "order": {"channel": "web"}})),
        Decision::Deny { .. }
    ));

    assert_eq!(
        stream.kind,
        DispatcherKind::RedisStream(crate::dispatchers::RedisStreamTarget {
            url: "redis://127.0.0.1:6390".into(),
            stream: Some("orders".into()),
            max_len: Some(10000),
            call_timeout: Duration::from_secs(2),
        }),
        "the bus's Redis by default"
    );
    assert_eq!(
        nats.kind,
        DispatcherKind::Nats(crate::dispatchers::NatsTarget {
            url: "nats://127.0.0.1:4222".into(),
            subject: None,
            jetstream: true,
            call_timeout: Duration::from_millis(750),
        })
    );
    assert_eq!(nats.category, Category::Event);
}

#[test]
fn network_dispatcher_mistakes_are_each_reported_with_their_path() {
    let found = problems(
        r#"[[dispatchers]]
dispatcher_id = "a"
kind = "http"
category = "event"
method = "GET"
subject = "x"
headers_env = { Authorization = "NOT_SET_ANYWHERE" }
headers = { "bad header" = "v" }

[dispatchers.policy]
default = "maybe"

[[dispatchers]]
dispatcher_id = "b"
kind = "redis_stream"
category = "event"
max_len = 0
call_timeout = "soon"

[[dispatchers]]
dispatcher_id = "c"
kind = "nats"
category = "command"
nats_url = "nats://"
subject = "a.*"

[[dispatchers]]
dispatcher_id = "d"
kind = "http"
category = "command"
url = "ftp://files.example/in"

[[dispatchers.policy.rules]]
effect = "allow"
comand_type = "refund"

[[routes]]
route_id = "r"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "a"
"#,
    );
    assert_eq!(
        found,
        [
            "FILE:1: `dispatchers[0].url`: is required for kind `http`",
            "FILE:5: `dispatchers[0].method`: `GET` is not a method that carries a body (expected POST, PUT or PATCH)",
            "FILE:6: `dispatchers[0].subject`: applies only to kind `nats`",
            "FILE:7: `dispatchers[0].headers_env.Authorization`: the environment variable `NOT_SET_ANYWHERE` is not set",
            "FILE:8: `dispatchers[0].headers.bad header`: `bad header` is not a header name",
            "FILE:10: `dispatchers[0].policy`: applies only to command dispatchers (category = \"command\")",
            "FILE:11: `dispatchers[0].policy.default`: unknown effect `maybe` (expected allow or deny)",
            "FILE:13: `dispatchers[1].redis_url`: is required unless the bus is Redis (bus.kind = \"redis\"), whose URL is the default",
            "FILE:17: `dispatchers[1].max_len`: must be at least 1",
            "FILE:18: `dispatchers[1].call_timeout`: `soon` is not a duration such as \"30s\" or \"500ms\": expected number at 0",
            "FILE:23: `dispatchers[2].category`: kind `nats` handles events and intents; a command dispatcher needs kind = \"http\" (its command adapter) or an adapter registered in code",
            "FILE:24: `dispatchers[2].nats_url`: not a NATS URL such as nats://127.0.0.1:4222: it has no host",
            "FILE:25: `dispatchers[2].subject`: `a.*` is not a NATS subject to publish on (dot-separated tokens, no spaces or wildcards)",
            "FILE:31: `dispatchers[3].url`: must be an http:// or https:// URL",
            "FILE:35: `dispatchers[3].policy.rules[0].comand_type`: unknown field (did you mean `command_type`?)",
        ]
    );
}

#[test]
fn a_worker_dispatcher_takes_its_liveness_from_the_worker_and_serves_no_commands() {
    let config = load(
        r#"[[dispatchers]]
dispatcher_id = "shipping-worker"
kind = "worker"
category = "event"
timeout = "5s"

[[routes]]
route_id = "r"
topic_pattern = "shop.shipments.events"
message_category = "event"
dispatcher_id = "shipping-worker"
"#,
    )
    .unwrap();
    assert_eq!(config.dispatchers[0].kind, DispatcherKind::Worker);
    assert_eq!(config.dispatchers[0].kind.name(), "worker");
    let found = problems(
        r#"[[dispatchers]]
dispatcher_id = "w"
kind = "worker"
category = "event"
stale_threshold = "30s"
critical = true
url = "http://127.0.0.1:1/"

[[dispatchers]]
dispatcher_id = "c"
kind = "worker"
category = "command"

[[routes]]
route_id = "r"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "w"

[[routes]]
route_id = "rc"
topic_pattern = "**"
message_category = "command"
dispatcher_id = "c"
"#,
    );
    assert_eq!(
        found,
        [
            "FILE:5: `dispatchers[0].stale_threshold`: does not apply to kind `worker`: the worker sets it when it registers (POST /api/v1/dispatchers/{id}/register)",
            "FILE:6: `dispatchers[0].critical`: does not apply to kind `worker`: the worker sets it when it registers (POST /api/v1/dispatchers/{id}/register)",
            "FILE:7: `dispatchers[0].url`: applies only to kind `http`",
            "FILE:12: `dispatchers[1].category`: kind `worker` handles events and intents; a command dispatcher needs kind = \"http\" (its command adapter) or an adapter registered in code",
        ]
    );
}

#[test]
fn the_instance_id_defaults_to_host_and_bound_port_and_is_checked() {
    let config = Config::embedded().unwrap();
    assert_eq!(config.server.instance_id, None);
    let host = host_name();
    assert_eq!(config.server.instance_id(9001), format!("{host}:9001"));
    assert_eq!(
        config.tracing.instance_id.as_deref(),
        Some(format!("{host}:9000").as_str()),
        "spans name the configured port before anything is bound"
    );

    let config = load("[server]\ninstance_id = \"eu-1.a\"\n").unwrap();
    assert_eq!(config.server.instance_id(9001), "eu-1.a");
    assert_eq!(config.tracing.instance_id.as_deref(), Some("eu-1.a"));

    let problems = problems("[server]\ninstance_id = \"has space\"\n");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("server.instance_id") && problems[0].contains("[A-Za-z0-9_.:-]"),
        "{problems:?}"
    );
}

#[test]
fn the_registry_follows_the_bus_unless_told_and_is_checked() {
    let memory = Config::embedded().unwrap();
    assert_eq!(memory.registry.kind, RegistryKind::Memory);
    assert_eq!(memory.registry.retention, Duration::from_secs(3600));

    let redis = "[bus]\nkind = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n";
    let config = load(redis).unwrap();
    assert_eq!(
        config.registry.kind,
        RegistryKind::Redis,
        "the natural default"
    );
    let config = load(&format!(
        "{redis}[registry]\nkind = \"memory\"\nretention = \"10m\"\nkey_prefix = \"eu\"\n"
    ))
    .unwrap();
    assert_eq!(config.registry.kind, RegistryKind::Memory);
    assert_eq!(config.registry.retention, Duration::from_secs(600));
    assert_eq!(config.registry.key_prefix, "eu");

    let problems = problems("[registry]\nkind = \"redis\"\nretention = \"0s\"\n");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("registry.kind") && problems[0].contains("bus.kind"));
    assert!(problems[1].contains("registry.retention"));
    let problems = self::problems("[registry]\nkind = \"etcd\"\n");
    assert!(problems[0].contains("unknown kind `etcd`"), "{problems:?}");
}

#[test]
fn protection_scopes_default_to_instance_and_cluster_needs_the_redis_bus() {
    use crate::resilience::Scope;

    let dispatcher = r#"
[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"

[dispatchers.rate_limit]
per_second = 20
mode = "reject"
SCOPE_LIMIT

[dispatchers.dedup]
ttl = "5m"
SCOPE_DEDUP
"#;
    let with = |limit: &str, dedup: &str| {
        dispatcher
            .replace("SCOPE_LIMIT", limit)
            .replace("SCOPE_DEDUP", dedup)
    };
    let config = load(&with("", "")).unwrap();
    let r = &config.dispatchers[0].resilience;
    assert_eq!(r.rate_limit.unwrap().scope, Scope::Instance);
    assert_eq!(r.dedup.unwrap().scope, Scope::Instance);

    let redis = "[bus]\nkind = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n";
    let text = format!(
        "{redis}{}",
        with("scope = \"cluster\"", "scope = \"cluster\"")
    );
    let config = load(&text).unwrap();
    let r = &config.dispatchers[0].resilience;
    assert_eq!(r.rate_limit.unwrap().scope, Scope::Cluster);
    assert_eq!(r.dedup.unwrap().scope, Scope::Cluster);

    assert_eq!(
        problems(&with("scope = \"cluster\"", "scope = \"fleet\"")),
        [
            "FILE:10: `dispatchers[0].rate_limit.scope`: \"cluster\" keeps its state in the bus's Redis: set bus.kind = \"redis\" (and bus.redis_url)",
            "FILE:14: `dispatchers[0].dedup.scope`: must be \"instance\" or \"cluster\"",
        ]
    );
    assert_eq!(
        problems(&with("", "scoped = \"cluster\"")),
        ["FILE:14: `dispatchers[0].dedup.scoped`: unknown field (did you mean `scope`?)"]
    );
}

/// `[defaults.<list>]` of default.toml, as a table.
fn embedded_defaults(list: &str) -> toml::Table {
    let table: toml::Table = toml::from_str(DEFAULT_TOML).unwrap();
    table["defaults"][list].as_table().unwrap().clone()
}

fn duration(value: &toml::Value) -> Duration {
    humantime::parse_duration(value.as_str().unwrap()).unwrap()
}

/// Every element default a config reads is the value default.toml gives it: change one there
/// and the configuration follows (and nothing else holds a copy to drift).
#[test]
fn element_defaults_are_the_values_default_toml_gives() {
    use crate::engine::{Effect, RulePolicy};
    use crate::resilience::{RateLimitMode, Scope, Trip};

    let config = load(
        r#"[bus]
kind = "redis"
redis_url = "redis://127.0.0.1:6379"

[[sources]]
stream = "in"

[[sinks]]
name = "s"
service = "file"
endpoint = "out.jsonl"

[[dispatchers]]
dispatcher_id = "log"
kind = "log"
category = "event"
retry = { attempts = 1 }
circuit_breaker = { failure_ratio = 0.5 }
rate_limit = { per_second = 1 }
concurrency = { max_in_flight = 1 }
dedup = {}

[[dispatchers]]
dispatcher_id = "nats"
kind = "nats"
category = "event"

[[dispatchers]]
dispatcher_id = "stream"
kind = "redis_stream"
category = "event"

[[dispatchers]]
dispatcher_id = "billing"
kind = "http"
category = "command"
url = "http://127.0.0.1:1/"
policy = {}

[[routes]]
route_id = "log"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "log"
"#,
    )
    .unwrap();

    let d = embedded_defaults("dispatchers");
    let [log, nats, stream, billing] = &config.dispatchers[..] else {
        panic!("four dispatchers")
    };
    assert_eq!(log.timeout, duration(&d["timeout"]));
    assert_eq!(
        crate::engine::DEFAULT_TIMEOUT,
        duration(&d["timeout"]),
        "a dispatcher built in code times out like one configured"
    );
    assert_eq!(Some(log.critical), d["critical"].as_bool());
    let r = &log.resilience;
    let retry = r.retry.unwrap();
    assert_eq!(
        retry.initial_backoff,
        duration(&d["retry"]["initial_backoff"])
    );
    assert_eq!(retry.max_backoff, duration(&d["retry"]["max_backoff"]));
    let breaker = r.breaker.unwrap();
    let b = &d["circuit_breaker"];
    assert_eq!(breaker.cool_down, duration(&b["cool_down"]));
    assert_eq!(
        Some(i64::from(breaker.half_open_successes)),
        b["half_open_successes"].as_integer()
    );
    assert_eq!(
        breaker.trip,
        Trip::FailureRatio {
            ratio: 0.5,
            minimum_calls: u32::try_from(b["minimum_calls"].as_integer().unwrap()).unwrap(),
            window: duration(&b["window"]),
        }
    );
    let limit = r.rate_limit.unwrap();
    assert_eq!(d["rate_limit"]["mode"].as_str(), Some("wait"));
    assert_eq!(
        limit.mode,
        RateLimitMode::Wait {
            max_wait: duration(&d["rate_limit"]["max_wait"])
        }
    );
    assert_eq!(d["rate_limit"]["scope"].as_str(), Some("instance"));
    assert_eq!(limit.scope, Scope::Instance);
    assert_eq!(
        Some(r.concurrency.unwrap().max_waiting as i64),
        d["concurrency"]["max_waiting"].as_integer()
    );
    let dedup = r.dedup.unwrap();
    assert_eq!(dedup.ttl, duration(&d["dedup"]["ttl"]));
    assert_eq!(
        Some(dedup.capacity as i64),
        d["dedup"]["capacity"].as_integer()
    );
    assert_eq!(d["dedup"]["scope"].as_str(), Some("instance"));
    assert_eq!(dedup.scope, Scope::Instance);

    let DispatcherKind::Nats(target) = &nats.kind else {
        panic!("nats: {:?}", nats.kind)
    };
    assert_eq!(Some(target.url.as_str()), d["nats_url"].as_str());
    assert_eq!(Some(target.jetstream), d["jetstream"].as_bool());
    assert_eq!(target.call_timeout, duration(&d["call_timeout"]));
    let DispatcherKind::RedisStream(target) = &stream.kind else {
        panic!("redis_stream: {:?}", stream.kind)
    };
    assert_eq!(target.call_timeout, duration(&d["call_timeout"]));
    let DispatcherKind::Http { target, policy } = &billing.kind else {
        panic!("http: {:?}", billing.kind)
    };
    assert_eq!(Some(target.method.as_str()), d["method"].as_str());
    let default = match d["policy"]["default"].as_str() {
        Some("allow") => Effect::Allow,
        _ => Effect::Deny,
    };
    assert_eq!(
        policy.as_ref(),
        Some(&RulePolicy::named("billing", default))
    );

    let s = embedded_defaults("sinks");
    let sink = &config.sinks[0];
    assert_eq!(sink.sink.timeout, duration(&s["timeout"]));
    assert_eq!(Some(sink.sink.fsync), s["fsync"].as_bool());
    let driver = &sink.driver;
    assert_eq!(Some(driver.batch_size as i64), s["batch_size"].as_integer());
    assert_eq!(driver.flush_interval, duration(&s["flush_interval"]));
    assert_eq!(Some(driver.buffer as i64), s["buffer"].as_integer());
    assert_eq!(s["full_policy"].as_str(), Some("block"));
    assert_eq!(driver.full, crate::sinks::FullPolicy::Block);
    assert_eq!(driver.shutdown_deadline, duration(&s["shutdown_deadline"]));
    assert_eq!(
        Some(i64::from(driver.retry.attempts)),
        s["retry"]["attempts"].as_integer()
    );
    assert_eq!(
        driver.retry.initial_backoff,
        duration(&s["retry"]["initial_backoff"])
    );
    assert_eq!(
        driver.retry.max_backoff,
        duration(&s["retry"]["max_backoff"])
    );
    assert_eq!(
        driver.send_timeout,
        sink.sink.timeout + crate::sinks::SEND_TIMEOUT_MARGIN
    );
    assert_eq!(
        driver.dead_letter,
        Path::new("./dispatchd-data/s.dead-letters.jsonl")
    );
    // What `dispatchd sink` starts from is what a file's element gets.
    let mut element = sink.clone();
    element.sink.endpoint = None;
    assert_eq!(SinkSettings::embedded("s", "file").unwrap(), element);

    assert_eq!(
        Some(config.sources[0].group.as_str()),
        embedded_defaults("sources")["group"].as_str()
    );
    assert_eq!(
        Some(config.routes[0].enabled),
        embedded_defaults("routes")["enabled"].as_bool()
    );
    assert_eq!(
        config.bus.redis,
        Some(RedisBusConfig::embedded("redis://127.0.0.1:6379".to_owned()).unwrap())
    );
}

/// A file's `[defaults.*]` apply to each of its elements that does not set the field, and only
/// to those; an element's own value wins; a protection stays off where it is not written; and
/// `dispatchd config` shows the values each element ends up with.
#[test]
fn a_files_defaults_apply_to_every_element_that_leaves_the_field_out() {
    let f = file(
        r#"[defaults.dispatchers]
timeout = "5s"
call_timeout = "750ms"

[defaults.dispatchers.retry]
max_backoff = "3s"

[defaults.sinks]
batch_size = 7

[[sinks]]
name = "a"
service = "file"
endpoint = "a.jsonl"

[[sinks]]
name = "b"
service = "file"
endpoint = "b.jsonl"
batch_size = 50

[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"
retry = { attempts = 2 }

[[dispatchers]]
dispatcher_id = "b"
kind = "nats"
category = "event"
timeout = "1s"

[[dispatchers]]
dispatcher_id = "c"
kind = "log"
category = "event"
retry = { attempts = 2, max_backoff = "9s" }

[[routes]]
route_id = "r"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "a"

[[routes]]
route_id = "rb"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "b"

[[routes]]
route_id = "rc"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "c"
"#,
    );
    let (text, config) = Config::effective(Some(f.path()), |_| None);
    let config = config.unwrap();
    let [a, b, c] = &config.dispatchers[..] else {
        panic!("three dispatchers")
    };
    assert_eq!(
        (a.timeout, b.timeout, c.timeout),
        (
            Duration::from_secs(5),
            Duration::from_secs(1),
            Duration::from_secs(5)
        )
    );
    let retry = a.resilience.retry.unwrap();
    assert_eq!(retry.max_backoff, Duration::from_secs(3));
    let embedded = embedded_defaults("dispatchers");
    assert_eq!(
        retry.initial_backoff,
        duration(&embedded["retry"]["initial_backoff"]),
        "a default the file does not change stays the embedded one"
    );
    assert_eq!(
        b.resilience.retry, None,
        "no [dispatchers.retry]: not retried"
    );
    assert_eq!(
        c.resilience.retry.unwrap().max_backoff,
        Duration::from_secs(9)
    );
    let DispatcherKind::Nats(target) = &b.kind else {
        panic!("nats")
    };
    assert_eq!(target.call_timeout, Duration::from_millis(750));
    let batches: Vec<usize> = config.sinks.iter().map(|s| s.driver.batch_size).collect();
    assert_eq!(batches, [7, 50]);

    let effective: toml::Table = toml::from_str(&text.unwrap()).unwrap();
    let dispatchers = effective["dispatchers"].as_array().unwrap();
    assert_eq!(dispatchers[0]["timeout"].as_str(), Some("5s"));
    assert_eq!(dispatchers[0]["retry"]["max_backoff"].as_str(), Some("3s"));
    assert_eq!(dispatchers[1]["timeout"].as_str(), Some("1s"));
    assert_eq!(dispatchers[1]["call_timeout"].as_str(), Some("750ms"));
    assert!(
        dispatchers[1].get("retry").is_none(),
        "a protection the dispatcher does not write stays off"
    );
    assert!(
        dispatchers[0].get("call_timeout").is_none(),
        "a field of another kind is not filled in"
    );
    assert_eq!(effective["sinks"][0]["batch_size"].as_integer(), Some(7));
    assert_eq!(
        effective["sinks"][0]["retry"]["attempts"].as_integer(),
        embedded_defaults("sinks")["retry"]["attempts"].as_integer(),
        "every sink has a retry"
    );
}

/// A default goes only where it applies: a field of one kind to that kind's dispatchers, what a
/// worker registers to no worker, a breaker's window to a failure-ratio breaker, max_wait to a
/// limit that waits. So a fleet-wide default is never an "applies only to" mistake elsewhere.
#[test]
fn defaults_go_only_where_they_apply() {
    let f = file(
        r#"[defaults.dispatchers]
nats_url = "nats://10.0.0.1:4222"
critical = true

[defaults.dispatchers.rate_limit]
mode = "reject"

[[dispatchers]]
dispatcher_id = "log"
kind = "log"
category = "event"
circuit_breaker = { consecutive_failures = 3 }
rate_limit = { per_second = 5 }

[[dispatchers]]
dispatcher_id = "waits"
kind = "log"
category = "event"
rate_limit = { per_second = 5, mode = "wait" }

[[dispatchers]]
dispatcher_id = "w"
kind = "worker"
category = "event"

[[routes]]
route_id = "log"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "log"

[[routes]]
route_id = "waits"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "waits"

[[routes]]
route_id = "w"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "w"
"#,
    );
    let (text, config) = Config::effective(Some(f.path()), |_| None);
    let config = config.unwrap();
    let [log, waits, worker] = &config.dispatchers[..] else {
        panic!("three dispatchers")
    };
    use crate::resilience::{RateLimitMode, Trip};
    assert!(log.critical && !worker.critical);
    assert_eq!(
        log.resilience.breaker.unwrap().trip,
        Trip::ConsecutiveFailures(3)
    );
    assert_eq!(
        log.resilience.rate_limit.unwrap().mode,
        RateLimitMode::Reject
    );
    let embedded = embedded_defaults("dispatchers");
    assert_eq!(
        waits.resilience.rate_limit.unwrap().mode,
        RateLimitMode::Wait {
            max_wait: duration(&embedded["rate_limit"]["max_wait"])
        }
    );
    let effective: toml::Table = toml::from_str(&text.unwrap()).unwrap();
    let dispatchers = effective["dispatchers"].as_array().unwrap();
    for (field, i) in [("nats_url", 0), ("critical", 2)] {
        assert!(dispatchers[i].get(field).is_none(), "{field} on {i}");
    }
    assert!(dispatchers[0]["circuit_breaker"].get("window").is_none());
    assert!(dispatchers[0]["rate_limit"].get("max_wait").is_none());
}

/// A bad value in a file's `[defaults.*]` is reported once, at its line, under its own path,
/// however many elements took it; a value of the embedded defaults that does not fit an element
/// is blamed on the element; an element that lacks a required field is still reported at the
/// element.
#[test]
fn a_bad_default_is_reported_once_at_its_line() {
    assert_eq!(
        report(
            r#"[defaults.dispatchers]
timeout = "soon"
tiemout = "5s"
critical = "yes"

[defaults.dispatchers.retry]
initial_backoff = "20s"

[defaults.sinks]
batch_size = -3
flush_interval = "0s"

[defaults.sink]
buffer = 5

[[sinks]]
name = "s"
service = "file"
endpoint = "s.jsonl"

[[dispatchers]]
dispatcher_id = "a"
kind = "log"
category = "event"
retry = { attempts = 2, max_backoff = "1s" }

[[dispatchers]]
dispatcher_id = "b"
kind = "log"
category = "event"

[[dispatchers]]
dispatcher_id = "c"
category = "event"

[[routes]]
route_id = "a"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "a"

[[routes]]
route_id = "b"
topic_pattern = "**"
message_category = "event"
dispatcher_id = "b"
"#
        ),
        [
            "FILE:2: `defaults.dispatchers.timeout`: `soon` is not a duration such as \"30s\" or \"500ms\": expected number at 0",
            "FILE:3: `defaults.dispatchers.tiemout`: unknown field (did you mean `timeout`?)",
            "FILE:4: `defaults.dispatchers.critical`: must be true or false (found string \"yes\")",
            "FILE:7: `defaults.dispatchers.retry.initial_backoff`: must not be longer than retry.max_backoff",
            "FILE:10: `defaults.sinks.batch_size`: must be a whole number, 0 or more (found integer `-3`)",
            "FILE:11: `defaults.sinks.flush_interval`: must be more than 0",
            "FILE:13: `defaults.sink`: unknown field (did you mean `sinks`?)",
            "FILE:32: `dispatchers[2].kind`: is required",
        ]
    );
    // The embedded initial_backoff (100ms) against the element's own max_backoff.
    assert_eq!(
        report(&format!(
            "{LOG_A}retry = {{ attempts = 2, max_backoff = \"50ms\" }}\n[[routes]]\nroute_id = \"r\"\ntopic_pattern = \"**\"\nmessage_category = \"event\"\ndispatcher_id = \"a\"\n"
        )),
        [
            "FILE:5: `dispatchers[0].retry.initial_backoff`: must not be longer than retry.max_backoff"
        ]
    );
}

/// Every default lives in default.toml: validation reads the values the defaults filled in, never
/// a literal of its own (one computed from another value is written as that computation, and
/// default.toml says what it is).
#[test]
fn no_default_is_written_in_the_validation_code() {
    let literal = |rest: &str| {
        rest.starts_with(|c: char| c.is_ascii_digit() || c == '"')
            || [
                "true",
                "false",
                "Duration::from",
                "crate::engine::DEFAULT",
                "DEFAULT_",
            ]
            .iter()
            .any(|start| rest.starts_with(start))
    };
    let mut found = Vec::new();
    for (n, line) in include_str!("raw.rs").lines().enumerate() {
        let code = line.trim();
        if code.starts_with("//") {
            continue;
        }
        let defaulted = ["unwrap_or(", "unwrap_or_else(|| ", "None => "]
            .iter()
            .any(|call| {
                code.match_indices(call)
                    .any(|(at, _)| literal(&code[at + call.len()..]))
            });
        let named = [
            "const DEFAULT_",
            "None | Some(",
            "#[serde(default =",
            "Duration::from_",
        ]
        .iter()
        .any(|pattern| code.contains(pattern));
        if defaulted || named {
            found.push(format!("raw.rs:{}: {code}", n + 1));
        }
    }
    assert!(
        found.is_empty(),
        "defaults belong in default.toml:\n{}",
        found.join("\n")
    );
}

/// The library's own `Default`s (for embedders and tests that build without a config) are the
/// embedded defaults, not a second opinion.
#[test]
fn library_defaults_match_the_embedded_ones() {
    let embedded = Config::embedded().unwrap();
    assert_eq!(embedded.health, crate::health::HealthConfig::default());
    assert_eq!(embedded.registry, RegistryConfig::default());
    let tracing = crate::telemetry::traces::TracingConfig::default();
    assert_eq!(
        (
            embedded.tracing.sampling_ratio,
            embedded.tracing.log_format,
            embedded.tracing.otlp_metrics,
            embedded.tracing.otlp_metrics_interval,
            embedded.tracing.log_filter.as_str(),
        ),
        (
            tracing.sampling_ratio,
            tracing.log_format,
            tracing.otlp_metrics,
            tracing.otlp_metrics_interval,
            tracing.log_filter.as_str(),
        )
    );
}
