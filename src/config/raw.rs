//! The raw serde shapes and the layering: defaults ⊕ file ⊕ environment → validated [`Config`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    BusConfig, Config, ConfigError, DEFAULT_TOML, DispatcherConfig, DispatcherKind, ENV_OVERRIDES,
    LogConfig, MetricsConfig, Origin, Problem, RedisBusConfig, RegistryConfig, RegistryKind,
    ServerConfig, SinkSettings, SourceConfig,
};
use crate::engine::{
    BuildProblem, Category, Dispatcher, Engine, Handler, HandlerError, Message, OutputMessage,
    Route,
};
use crate::health::HealthConfig;
use crate::resilience::{
    BreakerConfig, ConcurrencyConfig, DedupConfig, RateLimitConfig, RateLimitMode,
    ResilienceConfig, RetryPolicy, Scope as ProtectionScope, Trip,
};
use crate::sinks::{DriverConfig, FullPolicy, SERVICES, SinkConfig};
use crate::telemetry::traces::{LogFormat, TracingConfig};

/// The largest cardinality limit a config may set: past it a scrape grows unbounded anyway.
const MAX_CARDINALITY_LIMIT: u64 = 100_000;

/// The most out-of-process workers a config may allow.
const MAX_WORKERS_LIMIT: u64 = 100_000;

/// The largest request body a config may allow.
const MAX_BODY_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    metrics: RawMetrics,
    log: RawLog,
    health: RawHealth,
    registry: RawRegistry,
    dispatchers: Option<Vec<RawDispatcher>>,
    routes: Option<Vec<RawRoute>>,
    sinks: Option<Vec<RawSink>>,
    bus: RawBus,
    tracing: RawTracing,
    otlp: RawOtlp,
    #[serde(default)]
    auth: RawAuth,
    redaction: RawRedaction,
    sources: Option<Vec<RawSource>>,
    /// Checked ([`defaults_shape`]) and laid under the lists' elements before this is read.
    #[allow(dead_code)]
    defaults: serde::de::IgnoredAny,
}

/// The shape of `[defaults.*]`: what each list's elements get for the fields they leave out.
/// Every field is in default.toml, the one home of the defaults: a file may change them, not add
/// to them. Read only to check that shape (the values reach the elements as TOML, through
/// [`spread`]), so that a problem with one is reported once, at its line, and every element
/// takes values of the right type; no field is ever read.
#[allow(dead_code)]
mod defaults_shape {
    use serde::Deserialize;

    use super::RawRetry;

    /// Only `[defaults]`: the rest of the file is checked once the defaults are spread.
    #[derive(Debug, Deserialize)]
    pub(super) struct Only {
        defaults: Defaults,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Defaults {
        sinks: Sinks,
        sources: Sources,
        routes: Routes,
        dispatchers: Dispatchers,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sinks {
        timeout: String,
        fsync: bool,
        batch_size: usize,
        flush_interval: String,
        buffer: usize,
        full_policy: String,
        shutdown_deadline: String,
        retry: RawRetry,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sources {
        group: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Routes {
        enabled: bool,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Dispatchers {
        timeout: String,
        critical: bool,
        method: String,
        call_timeout: String,
        nats_url: String,
        jetstream: bool,
        retry: Backoff,
        circuit_breaker: Breaker,
        rate_limit: RateLimit,
        concurrency: Concurrency,
        dedup: Dedup,
        policy: Policy,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Backoff {
        initial_backoff: String,
        max_backoff: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Breaker {
        cool_down: String,
        half_open_successes: u32,
        minimum_calls: u32,
        window: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RateLimit {
        mode: String,
        max_wait: String,
        scope: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Concurrency {
        max_waiting: usize,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Dedup {
        ttl: String,
        capacity: u64,
        scope: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Policy {
        default: String,
    }

    /// The tables of `[defaults]` and the fields each accepts, for the configuration reference.
    #[cfg(test)]
    pub(super) fn tables() -> Vec<(&'static str, &'static [&'static str])> {
        use super::reference::fields;
        vec![
            ("defaults", fields::<Defaults>()),
            ("defaults.sinks", fields::<Sinks>()),
            ("defaults.sinks.retry", fields::<RawRetry>()),
            ("defaults.sources", fields::<Sources>()),
            ("defaults.routes", fields::<Routes>()),
            ("defaults.dispatchers", fields::<Dispatchers>()),
            ("defaults.dispatchers.retry", fields::<Backoff>()),
            ("defaults.dispatchers.circuit_breaker", fields::<Breaker>()),
            ("defaults.dispatchers.rate_limit", fields::<RateLimit>()),
            ("defaults.dispatchers.concurrency", fields::<Concurrency>()),
            ("defaults.dispatchers.dedup", fields::<Dedup>()),
            ("defaults.dispatchers.policy", fields::<Policy>()),
        ]
    }
}

/// What the configuration accepts, read from the serde shapes themselves, for the test that
/// holds docs/configuration.md to them.
#[cfg(test)]
pub(super) mod reference {
    use serde::Deserialize;
    use serde::de::{self, Deserializer, Visitor};

    use super::*;

    /// The fields a derived `Deserialize` struct accepts: the list serde's derive passes to
    /// `deserialize_struct`. Hand-written (about twenty lines) rather than a crate such as
    /// serde-reflection, which cannot trace the `toml::Value` and `IgnoredAny` fields here.
    pub(crate) fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        struct Probe<'a>(&'a mut &'static [&'static str]);
        impl<'de> Deserializer<'de> for Probe<'_> {
            type Error = de::value::Error;

            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }

            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(de::Error::custom("probed"))
            }

            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Probe(&mut fields));
        assert!(
            !fields.is_empty(),
            "{} is not a struct",
            std::any::type_name::<T>()
        );
        fields
    }

    /// Every table of the configuration (`[]` marks the elements of a list of tables) with the
    /// fields it accepts.
    pub(crate) fn tables() -> Vec<(&'static str, &'static [&'static str])> {
        let mut tables = vec![
            ("", fields::<RawConfig>()),
            ("server", fields::<RawServer>()),
            ("auth", fields::<RawAuth>()),
            ("auth.tokens[]", fields::<RawToken>()),
            ("redaction", fields::<RawRedaction>()),
            ("metrics", fields::<RawMetrics>()),
            ("log", fields::<RawLog>()),
            ("tracing", fields::<RawTracing>()),
            ("otlp", fields::<RawOtlp>()),
            ("health", fields::<RawHealth>()),
            ("registry", fields::<RawRegistry>()),
            ("bus", fields::<RawBus>()),
            ("sinks[]", fields::<RawSink>()),
            ("sinks[].retry", fields::<RawRetry>()),
            ("sources[]", fields::<RawSource>()),
            ("dispatchers[]", fields::<RawDispatcher>()),
            ("dispatchers[].retry", fields::<RawRetry>()),
            ("dispatchers[].circuit_breaker", fields::<RawBreaker>()),
            ("dispatchers[].rate_limit", fields::<RawRateLimit>()),
            ("dispatchers[].concurrency", fields::<RawConcurrency>()),
            ("dispatchers[].dedup", fields::<RawDedup>()),
            ("dispatchers[].policy", fields::<RawPolicy>()),
            ("dispatchers[].policy.rules[]", fields::<RawPolicyRule>()),
            ("routes[]", fields::<RawRoute>()),
        ];
        tables.extend(defaults_shape::tables());
        tables
    }
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTracing {
    sampling_ratio: f64,
    log_format: String,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtlp {
    endpoint: String,
    metrics: bool,
    metrics_interval: String,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    kind: String,
    redis_url: Option<String>,
    events_stream: String,
    max_len: Option<usize>,
    consumer: Option<String>,
    claim_idle: String,
    consumer_retention: String,
    trim_every: String,
    outputs_prefix: String,
    dead_letter: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    stream: String,
    group: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    name: String,
    service: String,
    endpoint: Option<String>,
    api_key: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    timeout: String,
    fsync: bool,
    batch_size: usize,
    flush_interval: String,
    buffer: usize,
    full_policy: String,
    /// Computed from the name when not set.
    dead_letter: Option<String>,
    shutdown_deadline: String,
    retry: RawRetry,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    /// Not in the defaults: the default is computed (host name and bound port).
    instance_id: Option<String>,
    max_body_bytes: u64,
    shutdown_grace: String,
    max_header_bytes: u64,
    header_read_timeout: String,
    request_timeout: String,
    max_in_flight: u64,
    max_connections: u64,
    drain_delay: String,
    min_body_rate: u64,
    body_rate_grace: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    /// `DISPATCHD_API_TOKEN`: one token with the ingest and admin scopes.
    api_token: Option<String>,
    tokens: Option<Vec<RawToken>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: Option<String>,
    /// The token itself (prefer `token_env`: a file is easier to leak than the environment).
    token: Option<String>,
    /// The environment variable holding the token.
    token_env: Option<String>,
    scopes: Option<Vec<String>>,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedaction {
    deny: Vec<String>,
    allow: Vec<String>,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: bool,
    namespace: String,
    cardinality_limit: u64,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDispatcher {
    dispatcher_id: String,
    kind: String,
    category: String,
    message_types: Option<Vec<String>>,
    timeout: String,
    // Computed from the id when not set.
    path: Option<String>,
    // Computed ([health] stale_threshold, a quarter of it) when not set.
    stale_threshold: Option<String>,
    heartbeat_interval: Option<String>,
    /// Not given to workers, which say it when they register.
    critical: Option<bool>,
    retry: Option<RawRetry>,
    circuit_breaker: Option<RawBreaker>,
    rate_limit: Option<RawRateLimit>,
    concurrency: Option<RawConcurrency>,
    dedup: Option<RawDedup>,
    // The fields of one kind (see KIND_FIELDS): the defaults give those that have one to every
    // dispatcher of that kind, and to no other.
    // kind = "http"
    url: Option<String>,
    method: Option<String>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    /// Header name → the environment variable holding its value (a secret).
    headers_env: Option<std::collections::BTreeMap<String, String>>,
    /// Command dispatchers (category = "command") only.
    policy: Option<RawPolicy>,
    // kind = "redis_stream"
    redis_url: Option<String>,
    stream: Option<String>,
    max_len: Option<usize>,
    // kind = "nats"
    nats_url: Option<String>,
    subject: Option<String>,
    jetstream: Option<bool>,
    // redis_stream and nats
    call_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    /// The `policy` label of `dispatcher_policy_denials_total` (default: the dispatcher id).
    name: Option<String>,
    /// What a command no rule matches gets.
    default: String,
    rules: Option<Vec<RawPolicyRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyRule {
    effect: String,
    command_type: Option<String>,
    /// Payload field → a value, an array of values (one of), or `{ min = …, max = … }`.
    params: Option<std::collections::BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: u32,
    initial_backoff: String,
    max_backoff: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    consecutive_failures: Option<u32>,
    failure_ratio: Option<f64>,
    /// These two go with `failure_ratio`, and their defaults only to a breaker that has it.
    minimum_calls: Option<u32>,
    window: Option<String>,
    cool_down: String,
    half_open_successes: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: u32,
    /// Computed (`per_second`) when not set.
    burst: Option<u32>,
    mode: String,
    /// Mode "wait" only, and its default only to a limit of that mode.
    max_wait: Option<String>,
    /// "instance" or "cluster" (one bucket in the bus's Redis).
    scope: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConcurrency {
    max_in_flight: usize,
    max_waiting: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDedup {
    ttl: String,
    capacity: u64,
    /// "instance" or "cluster" (ids shared in the bus's Redis).
    scope: String,
}

/// Every field is in default.toml, the one home of the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// Not in the defaults: it follows bus.kind unless set.
    kind: Option<String>,
    retention: String,
    key_prefix: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    stale_threshold: String,
    failure_limit: u32,
    max_workers: u64,
    max_stale_threshold: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    route_id: String,
    topic_pattern: String,
    message_category: String,
    dispatcher_id: String,
    message_type: Option<String>,
    enabled: bool,
}

/// One validation pass: collects every problem, each placed by [`Origins`]. Each section of the
/// configuration is checked by a function of its own that takes it.
struct Checker<'o, 'a> {
    origins: &'o Origins<'a>,
    problems: Vec<Problem>,
}

impl Checker<'_, '_> {
    fn report(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let problem = self.origins.problem(field, message);
        self.problems.push(problem);
    }

    /// A duration such as `"30s"`, or a problem.
    fn duration(&mut self, text: &str, field: &str) -> Option<Duration> {
        match humantime::parse_duration(text) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.report(
                    field,
                    format!("`{text}` is not a duration such as \"30s\" or \"500ms\": {error}"),
                );
                None
            }
        }
    }

    /// A duration that must be more than zero.
    fn positive(&mut self, text: &str, field: &str) -> Option<Duration> {
        let value = self.duration(text, field)?;
        if value.is_zero() {
            self.report(field, "must be more than 0");
            return None;
        }
        Some(value)
    }
}

/// Knows where every field came from, to report problems by file line or variable name.
#[derive(Default)]
struct Origins<'a> {
    file: Option<(&'a Path, &'a str, Option<toml_edit::Document<&'a str>>)>,
    env: HashMap<&'static str, &'static str>,
    /// For each list of tables the file had elements removed from (they could not be read),
    /// the file index of each element that remains: validation sees the remaining ones, and
    /// its problems name the elements as the file numbers them.
    kept: HashMap<&'static str, Vec<usize>>,
    /// Each value [`spread`] filled in (`dispatchers[2].retry.max_backoff`, as the file numbers
    /// the elements) → the default it came from (`defaults.dispatchers.retry.max_backoff`).
    spread: HashMap<String, String>,
}

impl Origins<'_> {
    /// `routes[1].x` in the list validation sees → `routes[2].x` in the file, when the file's
    /// `routes[1]` could not be read.
    fn in_file(&self, field: &str) -> String {
        for (list, kept) in &self.kept {
            let Some(rest) = field.strip_prefix(list).and_then(|r| r.strip_prefix('[')) else {
                continue;
            };
            let Some((index, rest)) = rest.split_once(']') else {
                continue;
            };
            if let Some(original) = index.parse::<usize>().ok().and_then(|i| kept.get(i)) {
                return format!("{list}[{original}]{rest}");
            }
        }
        field.to_owned()
    }

    fn of(&self, field: &str) -> Origin {
        if let Some(var) = self.env.get(field) {
            return Origin::Env(var);
        }
        if let Some((path, text, document)) = &self.file {
            // The field itself, else the closest table around it that the file has (a
            // missing field is reported at its table's header).
            let mut at = Some(field);
            let offset = std::iter::from_fn(|| {
                let current = at?;
                at = current.rfind(['.', '[']).map(|end| &current[..end]);
                Some(current)
            })
            .find_map(|path| {
                document
                    .as_ref()
                    .and_then(|d| offset_of(d.as_table(), path))
            });
            if let Some(offset) = offset {
                return Origin::File {
                    path: path.to_path_buf(),
                    line: Some(line_of(text, offset)),
                };
            }
            // A list the file defines owns all of its elements' fields, set or defaulted.
            let list = field.split('[').next().unwrap_or(field);
            if field.contains('[')
                && document
                    .as_ref()
                    .is_some_and(|d| offset_of(d.as_table(), list).is_some())
            {
                return Origin::File {
                    path: path.to_path_buf(),
                    line: None,
                };
            }
        }
        Origin::Defaults
    }

    /// Where the file writes `field` itself, if it does.
    fn written(&self, field: &str) -> Option<Origin> {
        let (path, text, document) = self.file.as_ref()?;
        let offset = offset_of(document.as_ref()?.as_table(), field)?;
        Some(Origin::File {
            path: path.to_path_buf(),
            line: Some(line_of(text, offset)),
        })
    }

    fn problem(&self, field: impl Into<String>, message: impl Into<String>) -> Problem {
        let field = self.in_file(&field.into());
        // A value the file's own `[defaults.*]` gave the element is that line's problem (once,
        // however many elements took it); one from the embedded defaults stays the element's,
        // which is where a value of its own would go.
        if let Some(from) = self.spread.get(&field) {
            if let Some(origin) = self.written(from) {
                return Problem {
                    origin,
                    field: from.clone(),
                    message: message.into(),
                };
            }
        }
        Problem {
            origin: self.of(&field),
            field,
            message: message.into(),
        }
    }
}

/// default.toml as a table.
fn embedded_table() -> Result<toml::Table, ConfigError> {
    toml::from_str(DEFAULT_TOML).map_err(|e: toml::de::Error| defaults_error(e.message()))
}

/// A problem of the embedded defaults themselves (a test keeps them free of any).
fn defaults_error(message: &str) -> ConfigError {
    ConfigError::Invalid(vec![Problem {
        origin: Origin::Defaults,
        field: String::new(),
        message: message.to_owned(),
    }])
}

/// Reads `value`, a part of the embedded defaults, as `R` and validates it with `validate`,
/// whose problems name their fields as it says.
fn from_embedded<R: serde::de::DeserializeOwned, T>(
    value: toml::Value,
    validate: impl FnOnce(&R, &mut Checker<'_, '_>) -> T,
) -> Result<T, ConfigError> {
    let raw: R = value
        .try_into()
        .map_err(|e: toml::de::Error| defaults_error(e.message()))?;
    let origins = Origins::default();
    let mut check = Checker {
        origins: &origins,
        problems: Vec::new(),
    };
    let validated = validate(&raw, &mut check);
    if check.problems.is_empty() {
        Ok(validated)
    } else {
        Err(ConfigError::Invalid(check.problems))
    }
}

/// A sink that sets only its name and service, read as a `[[sinks]]` element: every other
/// setting comes from the embedded `[defaults.sinks]`.
pub(super) fn embedded_sink(name: &str, service: &str) -> Result<SinkSettings, ConfigError> {
    let mut table = embedded_table()?;
    let mut element = toml::Table::new();
    element.insert("name".to_owned(), name.into());
    element.insert("service".to_owned(), service.into());
    table.insert("sinks".to_owned(), vec![toml::Value::Table(element)].into());
    spread(&mut table, &mut Origins::default());
    let sink = match table.remove("sinks") {
        Some(toml::Value::Array(mut sinks)) => sinks.pop(),
        _ => None,
    };
    let Some(sink) = sink else {
        return Err(defaults_error(
            "the sink went missing while its defaults were laid under it",
        ));
    };
    from_embedded(sink, |raw: &RawSink, check| {
        sink_settings(raw, &|field| format!("defaults.sinks.{field}"), check)
    })
}

/// A Redis bus at `url` (not checked here) with every other setting from the embedded `[bus]`.
pub(super) fn embedded_redis_bus(url: String) -> Result<RedisBusConfig, ConfigError> {
    let Some(bus) = embedded_table()?.remove("bus") else {
        return Err(defaults_error("`bus` is missing"));
    };
    from_embedded(bus, |raw: &RawBus, check| redis_bus(raw, url, check))
}

pub(super) fn load(
    file: Option<(&Path, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    layered(file, env, &mut None)
}

/// Like [`load`], and leaves the merged table (defaults ⊕ file ⊕ environment, less what could
/// not be read) in `effective` when the file could be parsed at all.
pub(super) fn layered(
    file: Option<(&Path, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
    effective: &mut Option<toml::Table>,
) -> Result<Config, ConfigError> {
    let mut merged = embedded_table()?;
    let mut origins = Origins::default();
    let mut problems = Vec::new();
    let mut unreadable = Unreadable::default();
    let embedded = merged.clone();
    if let Some((path, text)) = file {
        // A syntax error ends the reading; shape errors (unknown fields, wrong types, missing
        // fields) are each reported at the file's lines and the rest read on.
        let table: toml::Table = toml::from_str(text).map_err(|e| invalid_toml(path, text, &e))?;
        origins.file = Some((path, text, toml_edit::Document::parse(text).ok()));
        // The default dispatchers and routes are one unit: a file that defines either list
        // replaces both, so no default route is left pointing at a dispatcher that is gone.
        if table.contains_key("dispatchers") || table.contains_key("routes") {
            merged.remove("dispatchers");
            merged.remove("routes");
        }
        merge(&mut merged, table);
        // Checked over the defaults, which give every table field its value (the defaults live
        // in default.toml only): a value the file got wrong falls back to its default. The
        // `[defaults.*]` first, so that the elements take only values of the right shape, and a
        // wrong one is reported once, at its line.
        check_shape::<defaults_shape::Only>(&mut merged, &embedded, &mut origins, &mut problems);
        spread(&mut merged, &mut origins);
        unreadable = check_shape::<RawConfig>(&mut merged, &embedded, &mut origins, &mut problems);
    } else {
        spread(&mut merged, &mut origins);
    }

    for &(var, field) in ENV_OVERRIDES {
        let Some(value) = env(var) else { continue };
        origins.env.insert(field, var);
        let value = if field == "metrics.enabled" {
            match value.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => toml::Value::Boolean(true),
                "false" | "0" | "no" => toml::Value::Boolean(false),
                _ => {
                    problems
                        .push(origins.problem(field, format!("`{value}` is not true or false")));
                    continue;
                }
            }
        } else {
            toml::Value::String(value)
        };
        set(&mut merged, field, value);
    }

    *effective = Some(merged.clone());
    let raw: RawConfig = match toml::Value::Table(merged).try_into() {
        Ok(raw) => raw,
        Err(error) => {
            // The file's shape was checked above: only the defaults can be at fault here.
            let error: toml::de::Error = error;
            problems.push(Problem {
                origin: Origin::Defaults,
                field: String::new(),
                message: error.message().to_owned(),
            });
            return Err(ConfigError::Invalid(problems));
        }
    };
    let mut check = Checker {
        origins: &origins,
        problems,
    };
    let config = validate(raw, env, &unreadable, &mut check);
    let mut problems = check.problems;
    // In the order a reader meets them in the file; the environment's and the defaults' last.
    problems.sort_by_key(|p| match p.origin {
        Origin::File {
            line: Some(line), ..
        } => (0, line),
        Origin::File { line: None, .. } => (1, 0),
        Origin::Env(_) => (2, 0),
        Origin::Defaults => (3, 0),
    });
    // A default several elements took is one problem.
    let mut unique: Vec<Problem> = Vec::with_capacity(problems.len());
    for problem in problems {
        if !unique.contains(&problem) {
            unique.push(problem);
        }
    }
    let problems = unique;
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(ConfigError::Invalid(problems)),
    }
}

fn invalid_toml(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let line = error.span().map(|span| line_of(text, span.start));
    ConfigError::Invalid(vec![Problem {
        origin: Origin::File {
            path: path.to_owned(),
            line,
        },
        field: String::new(),
        message: error.message().trim_end().to_owned(),
    }])
}

fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    unreadable: &Unreadable,
    check: &mut Checker<'_, '_>,
) -> Option<Config> {
    let limits = validate_limits(&raw.server, check);
    let auth = validate_auth(&raw.auth, env, check);
    let redaction = crate::engine::Redactor::new(
        raw.redaction.deny.clone(),
        Some(raw.redaction.allow.clone()).filter(|allow| !allow.is_empty()),
    );
    let listen = Some(raw.server.listen);
    let max_body_bytes = raw.server.max_body_bytes;
    let grace = raw.server.shutdown_grace;
    let metrics = validate_metrics(raw.metrics, check);
    let log = validate_log(raw.log, check);

    let listen = listen.and_then(|text| match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            check.report(
                "server.listen",
                format!("`{text}` is not an IP address and port such as 127.0.0.1:9000"),
            );
            None
        }
    });
    if !(1..=MAX_BODY_LIMIT).contains(&max_body_bytes) {
        check.report(
            "server.max_body_bytes",
            format!("must be between 1 and {MAX_BODY_LIMIT}"),
        );
    }
    let shutdown_grace = check.duration(&grace, "server.shutdown_grace");

    let health = validate_health(&raw.health, check);

    let raw_dispatchers = raw.dispatchers.unwrap_or_default();
    let raw_routes = raw.routes.unwrap_or_default();
    let sinks = raw
        .sinks
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, sink)| validate_sink(i, sink, env, check))
        .collect::<Vec<_>>();
    let bus = validate_bus(&raw.bus, check);
    let registry = validate_registry(&raw.registry, &raw.bus, check);
    let instance_id = validate_instance_id(raw.server.instance_id.as_deref(), check);
    let tracing = validate_tracing(&raw.tracing, &raw.otlp, &log.filter, check);
    let sources: Vec<SourceConfig> = raw
        .sources
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, source)| {
            if bus.redis.is_none() {
                check.report(
                    format!("sources[{i}].stream"),
                    "sources read from Redis: set bus.kind = \"redis\"",
                );
            }
            SourceConfig {
                group: source.group,
                stream: source.stream,
            }
        })
        .collect();
    let mut sink_names = HashMap::new();
    for (i, sink) in sinks.iter().enumerate() {
        if sink_names.insert(sink.sink.name.clone(), i).is_some() {
            check.report(
                format!("sinks[{i}].name"),
                format!("sink `{}` is configured twice", sink.sink.name),
            );
        }
    }
    let mut dispatchers = Vec::new();
    let mut jsonl_paths: HashMap<PathBuf, usize> = HashMap::new();
    // Dispatchers and routes whose category could not be read: the engine's category checks
    // would only repeat that problem.
    let mut no_category: Vec<&str> = Vec::new();
    for (i, d) in raw_dispatchers.iter().enumerate() {
        let at = |field: &str| format!("dispatchers[{i}].{field}");
        let category = match d.category.parse::<Category>() {
            Ok(category) => category,
            Err(error) => {
                check.report(at("category"), error.to_string());
                no_category.push(&d.dispatcher_id);
                Category::Event
            }
        };
        let timeout = check
            .duration(&d.timeout, &at("timeout"))
            .unwrap_or(Duration::MAX);
        let stale_threshold = match &d.stale_threshold {
            None => health.stale_threshold,
            Some(text) => check
                .positive(text, &at("stale_threshold"))
                .unwrap_or(health.stale_threshold),
        };
        if stale_threshold > health.max_stale_threshold {
            check.report(
                at("stale_threshold"),
                format!(
                    "must be at most health.max_stale_threshold ({})",
                    humantime::format_duration(health.max_stale_threshold)
                ),
            );
        }
        let heartbeat_interval = match &d.heartbeat_interval {
            None => stale_threshold / 4,
            Some(text) => check
                .positive(text, &at("heartbeat_interval"))
                .unwrap_or(stale_threshold / 4),
        };
        if heartbeat_interval >= stale_threshold {
            check.report(
                at("heartbeat_interval"),
                format!(
                    "({}) must be shorter than the stale threshold ({}), or the dispatcher goes stale between heartbeats",
                    humantime::format_duration(heartbeat_interval),
                    humantime::format_duration(stale_threshold)
                ),
            );
        }
        // Fields that belong to another kind are mistakes, each reported (the defaults fill in
        // none there).
        let set = [
            d.path.is_some(),
            d.url.is_some(),
            d.method.is_some(),
            d.headers.is_some(),
            d.headers_env.is_some(),
            d.policy.is_some(),
            d.redis_url.is_some(),
            d.stream.is_some(),
            d.max_len.is_some(),
            d.nats_url.is_some(),
            d.subject.is_some(),
            d.jetstream.is_some(),
            d.call_timeout.is_some(),
        ];
        if DispatcherKind::NAMES.contains(&d.kind.as_str()) {
            for ((field, kinds), set) in KIND_FIELDS.iter().zip(set) {
                if set && !kinds.contains(&d.kind.as_str()) {
                    check.report(
                        at(field),
                        format!("applies only to kind `{}`", kinds.join("` and `")),
                    );
                }
            }
        }
        // A field of this kind with a default: the defaults gave it to every dispatcher of the
        // kind, so it is missing only when the defaults lack it.
        let of_kind = |check: &mut Checker<'_, '_>, value: Option<&str>, field: &str| {
            if value.is_none() {
                check.report(at(field), format!("is required for kind `{}`", d.kind));
            }
            value.unwrap_or_default().to_owned()
        };
        let call_timeout = |check: &mut Checker<'_, '_>| {
            let text = of_kind(check, d.call_timeout.as_deref(), "call_timeout");
            check
                .positive(&text, &at("call_timeout"))
                .unwrap_or(Duration::MAX)
        };
        let kind = match d.kind.as_str() {
            "log" => DispatcherKind::Log,
            "jsonl" => {
                let path = d.path.clone().map(PathBuf::from).unwrap_or_else(|| {
                    PathBuf::from(format!("./dispatchd-data/{}.jsonl", d.dispatcher_id))
                });
                if let Some(other) = jsonl_paths.insert(path.clone(), i) {
                    check.report(
                        at("path"),
                        format!(
                            "`{}` is already written by dispatchers[{other}]",
                            path.display()
                        ),
                    );
                }
                DispatcherKind::Jsonl { path }
            }
            "http" => {
                let target = validate_http_target(d, &at, env, check);
                let policy = d.policy.as_ref().map(|raw| {
                    if category != Category::Command {
                        check.report(
                            at("policy"),
                            "applies only to command dispatchers (category = \"command\")",
                        );
                    }
                    validate_policy(raw, &d.dispatcher_id, &at, check)
                });
                DispatcherKind::Http {
                    target: Box::new(target),
                    policy,
                }
            }
            "redis_stream" => {
                let url = match (&d.redis_url, &bus.redis) {
                    (Some(url), _) => url.clone(),
                    (None, Some(redis)) => redis.url.clone(),
                    (None, None) => {
                        check.report(
                            at("redis_url"),
                            "is required unless the bus is Redis (bus.kind = \"redis\"), whose URL is the default",
                        );
                        String::new()
                    }
                };
                if !url.is_empty() {
                    if let Err(error) = redis::Client::open(url.as_str()) {
                        check.report(
                            at("redis_url"),
                            format!("not a Redis URL such as redis://127.0.0.1:6379: {error}"),
                        );
                    }
                }
                if d.stream.as_deref() == Some("") {
                    check.report(at("stream"), "must not be empty");
                }
                if d.max_len == Some(0) {
                    check.report(at("max_len"), "must be at least 1");
                }
                DispatcherKind::RedisStream(crate::dispatchers::RedisStreamTarget {
                    url,
                    stream: d.stream.clone(),
                    max_len: d.max_len,
                    call_timeout: call_timeout(check),
                })
            }
            "nats" => {
                let url = of_kind(check, d.nats_url.as_deref(), "nats_url");
                let problem = match url.parse::<async_nats::ServerAddr>() {
                    Ok(address) if address.host().is_empty() => Some("it has no host".to_owned()),
                    Ok(_) => None,
                    Err(error) => Some(error.to_string()),
                };
                if let Some(problem) = problem {
                    check.report(
                        at("nats_url"),
                        format!("not a NATS URL such as nats://127.0.0.1:4222: {problem}"),
                    );
                }
                if let Some(subject) = &d.subject {
                    let valid = !subject.is_empty()
                        && subject.split('.').all(|token| {
                            !token.is_empty()
                                && !token
                                    .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
                        });
                    if !valid {
                        check.report(
                            at("subject"),
                            format!("`{subject}` is not a NATS subject to publish on (dot-separated tokens, no spaces or wildcards)"),
                        );
                    }
                }
                if d.jetstream.is_none() {
                    check.report(at("jetstream"), "is required for kind `nats`");
                }
                DispatcherKind::Nats(crate::dispatchers::NatsTarget {
                    url,
                    subject: d.subject.clone(),
                    jetstream: d.jetstream == Some(true),
                    call_timeout: call_timeout(check),
                })
            }
            "worker" => {
                // The worker gives these when it registers; here they would silently do nothing.
                let set = [
                    d.stale_threshold.is_some(),
                    d.heartbeat_interval.is_some(),
                    d.critical.is_some(),
                ];
                for (field, set) in WORKER_FIELDS.into_iter().zip(set) {
                    if set {
                        check.report(
                            at(field),
                            "does not apply to kind `worker`: the worker sets it when it registers (POST /api/v1/dispatchers/{id}/register)",
                        );
                    }
                }
                DispatcherKind::Worker
            }
            other => {
                check.report(
                    at("kind"),
                    format!(
                        "unknown kind `{other}` (expected one of {})",
                        DispatcherKind::NAMES.join(", ")
                    ),
                );
                DispatcherKind::Log
            }
        };
        dispatchers.push(DispatcherConfig {
            dispatcher_id: d.dispatcher_id.clone(),
            category,
            message_types: d.message_types.clone(),
            timeout,
            kind,
            stale_threshold,
            heartbeat_interval,
            // A worker says it when it registers; the defaults give every other kind a value.
            critical: d.critical == Some(true),
            resilience: validate_resilience(d, &at, bus.redis.is_some(), check),
        });
    }

    let mut routes = Vec::new();
    for (i, r) in raw_routes.iter().enumerate() {
        let category = match r.message_category.parse::<Category>() {
            Ok(category) => category,
            Err(error) => {
                check.report(format!("routes[{i}].message_category"), error.to_string());
                no_category.push(&r.route_id);
                Category::Event
            }
        };
        routes.push(Route {
            route_id: r.route_id.clone(),
            topic_pattern: r.topic_pattern.clone(),
            message_category: category,
            dispatcher_id: r.dispatcher_id.clone(),
            message_type: r.message_type.clone(),
            enabled: r.enabled,
        });
    }

    // The engine's own checks are the single source of truth for ids, references and patterns;
    // a trial build with stand-in handlers finds them, and here they get their field paths.
    check_with_engine(&dispatchers, &routes, &no_category, unreadable, check);
    let warnings = unrouted(&dispatchers, &routes, unreadable, check.origins);

    Some(Config {
        server: ServerConfig {
            listen: listen?,
            instance_id: instance_id.clone(),
            max_body_bytes: usize::try_from(max_body_bytes).ok()?,
            shutdown_grace: shutdown_grace?,
            max_header_bytes: limits.max_header_bytes,
            header_read_timeout: limits.header_read_timeout,
            request_timeout: limits.request_timeout,
            max_in_flight: limits.max_in_flight,
            max_connections: limits.max_connections,
            drain_delay: limits.drain_delay,
            min_body_rate: limits.min_body_rate,
            body_rate_grace: limits.body_rate_grace,
        },
        auth,
        redaction,
        metrics,
        log,
        health,
        tracing: TracingConfig {
            instance_id: instance_id.clone().or_else(|| {
                listen
                    .filter(|address| address.port() != 0)
                    .map(|address| format!("{}:{}", super::host_name(), address.port()))
            }),
            ..tracing
        },
        sinks,
        bus,
        registry,
        sources,
        dispatchers,
        routes,
        warnings,
    })
}

fn validate_metrics(raw: RawMetrics, check: &mut Checker<'_, '_>) -> MetricsConfig {
    if !(1..=MAX_CARDINALITY_LIMIT).contains(&raw.cardinality_limit) {
        check.report(
            "metrics.cardinality_limit",
            format!("must be between 1 and {MAX_CARDINALITY_LIMIT}"),
        );
    }
    if !is_valid_namespace(&raw.namespace) {
        check.report(
            "metrics.namespace",
            format!(
                "`{}` must be empty or match [a-zA-Z_][a-zA-Z0-9_]*",
                raw.namespace
            ),
        );
    }
    MetricsConfig {
        enabled: raw.enabled,
        namespace: raw.namespace,
        cardinality_limit: usize::try_from(raw.cardinality_limit).unwrap_or(usize::MAX),
    }
}

fn validate_log(raw: RawLog, check: &mut Checker<'_, '_>) -> LogConfig {
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(&raw.filter) {
        check.report(
            "log.filter",
            format!("`{}` is not a valid filter: {error}", raw.filter),
        );
    }
    LogConfig { filter: raw.filter }
}

/// Traces and the OTLP export; `instance_id` is filled in by the caller.
fn validate_tracing(
    raw: &RawTracing,
    otlp: &RawOtlp,
    log_filter: &str,
    check: &mut Checker<'_, '_>,
) -> TracingConfig {
    let sampling_ratio = raw.sampling_ratio;
    if !(0.0..=1.0).contains(&sampling_ratio) {
        check.report("tracing.sampling_ratio", "must be between 0 and 1");
    }
    let log_format = match raw.log_format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            check.report(
                "tracing.log_format",
                format!("unknown format `{other}` (expected text or json)"),
            );
            LogFormat::Text
        }
    };
    let otlp_endpoint = Some(otlp.endpoint.clone()).filter(|e| !e.is_empty());
    if let Some(endpoint) = &otlp_endpoint {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            check.report(
                "otlp.endpoint",
                format!("`{endpoint}` is not an http(s) URL"),
            );
        }
    }
    let otlp_metrics_interval = check
        .positive(&otlp.metrics_interval, "otlp.metrics_interval")
        .unwrap_or(Duration::MAX);
    let otlp_metrics = otlp.metrics;
    if otlp_metrics && otlp_endpoint.is_none() {
        check.report(
            "otlp.metrics",
            "needs otlp.endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT)",
        );
    }
    TracingConfig {
        sampling_ratio,
        otlp_endpoint,
        log_format,
        otlp_metrics,
        otlp_metrics_interval,
        log_filter: log_filter.to_owned(),
        instance_id: None,
    }
}

/// A dispatcher no enabled route sends anything to: allowed (an embedder may add routes in
/// code), but in a config for `serve` almost always a mistake, so it is worth a warning.
fn unrouted(
    dispatchers: &[DispatcherConfig],
    routes: &[Route],
    unreadable: &Unreadable,
    origins: &Origins<'_>,
) -> Vec<Problem> {
    dispatchers
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            !unreadable.route_targets.contains(&d.dispatcher_id)
                && !routes
                    .iter()
                    .any(|r| r.enabled && r.dispatcher_id == d.dispatcher_id)
        })
        .map(|(i, d)| {
            let message = if routes.is_empty() {
                format!(
                    "dispatcher `{}` receives nothing: there are no routes, so every message would answer 404 no_dispatcher",
                    d.dispatcher_id
                )
            } else {
                format!(
                    "dispatcher `{}` receives nothing: no enabled route names it",
                    d.dispatcher_id
                )
            };
            origins.problem(format!("dispatchers[{i}].dispatcher_id"), message)
        })
        .collect()
}

struct StandIn;

#[async_trait]
impl Handler for StandIn {
    async fn handle(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl crate::engine::CommandAdapter for StandIn {
    fn name(&self) -> &'static str {
        "stand-in"
    }

    async fn execute(&self, _: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        Ok(Vec::new())
    }
}

/// The `http` kind's URL, method and headers; the secret headers' values are read from the
/// environment here, so a missing variable is reported with the rest.
fn validate_http_target(
    d: &RawDispatcher,
    at: &dyn Fn(&str) -> String,
    env: &dyn Fn(&str) -> Option<String>,
    check: &mut Checker<'_, '_>,
) -> crate::dispatchers::HttpTarget {
    use reqwest::header::{HeaderName, HeaderValue};
    let fallback = || reqwest::Url::parse("http://127.0.0.1/").expect("a valid URL");
    let url = match &d.url {
        None => {
            check.report(at("url"), "is required for kind `http`");
            fallback()
        }
        Some(text) => match reqwest::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => url,
            Ok(_) => {
                check.report(at("url"), "must be an http:// or https:// URL");
                fallback()
            }
            Err(error) => {
                check.report(at("url"), format!("not a URL: {error}"));
                fallback()
            }
        },
    };
    // The defaults give every http dispatcher a method.
    let text = d.method.as_deref().unwrap_or_default();
    let method = match text.to_ascii_uppercase().as_str() {
        "POST" => reqwest::Method::POST,
        "PUT" => reqwest::Method::PUT,
        "PATCH" => reqwest::Method::PATCH,
        _ => {
            check.report(
                at("method"),
                format!(
                    "`{text}` is not a method that carries a body (expected POST, PUT or PATCH)"
                ),
            );
            reqwest::Method::POST
        }
    };
    let mut headers = reqwest::header::HeaderMap::new();
    let mut add = |check: &mut Checker<'_, '_>,
                   field: String,
                   name: &str,
                   value: Option<String>,
                   secret: bool| {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            check.report(field, format!("`{name}` is not a header name"));
            return;
        };
        if headers.contains_key(&name) {
            check.report(field, format!("header `{name}` is set twice"));
            return;
        }
        let Some(value) = value else { return };
        match HeaderValue::from_str(&value) {
            Ok(mut value) => {
                value.set_sensitive(secret);
                headers.insert(name, value);
            }
            // Never the value itself: it may be the secret.
            Err(_) => check.report(
                field,
                "the value is not a valid header value (control characters or non-ASCII)",
            ),
        }
    };
    for (name, value) in d.headers.iter().flatten() {
        let field = at(&format!("headers.{name}"));
        let secret = crate::engine::Redactor::default().is_sensitive(name);
        add(check, field, name, Some(value.clone()), secret);
    }
    for (name, var) in d.headers_env.iter().flatten() {
        let field = at(&format!("headers_env.{name}"));
        let value = env(var);
        if value.is_none() {
            check.report(
                field.clone(),
                format!("the environment variable `{var}` is not set"),
            );
        }
        add(check, field, name, value, true);
    }
    crate::dispatchers::HttpTarget {
        url,
        method,
        headers,
    }
}

/// A command dispatcher's policy, for the engine's [`crate::engine::RulePolicy`].
fn validate_policy(
    raw: &RawPolicy,
    dispatcher_id: &str,
    at: &dyn Fn(&str) -> String,
    check: &mut Checker<'_, '_>,
) -> crate::engine::RulePolicy {
    use crate::engine::{Condition, Effect, ParamRule, RulePolicy};
    let effect = |check: &mut Checker<'_, '_>, text: &str, field: String| match text {
        "allow" => Effect::Allow,
        "deny" => Effect::Deny,
        other => {
            check.report(
                field,
                format!("unknown effect `{other}` (expected allow or deny)"),
            );
            Effect::Deny
        }
    };
    let default = effect(check, &raw.default, at("policy.default"));
    let name = raw.name.as_deref().unwrap_or(dispatcher_id);
    if !crate::engine::is_valid_id(name) {
        check.report(
            at("policy.name"),
            "must be 1 to 128 characters of [A-Za-z0-9_.-]",
        );
    }
    let mut policy = RulePolicy::named(name, default);
    for (i, rule) in raw.rules.iter().flatten().enumerate() {
        let at_rule = |field: &str| at(&format!("policy.rules[{i}].{field}"));
        let effect = effect(check, &rule.effect, at_rule("effect"));
        let mut params = Vec::new();
        for (path, value) in rule.params.iter().flatten() {
            let field = at_rule(&format!("params.{path}"));
            if path.is_empty() || path.split('.').any(str::is_empty) {
                check.report(
                    field.clone(),
                    "is not a field path such as `amount` or `customer.tier`",
                );
            }
            let json = |v: &toml::Value| serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
            let condition = match value {
                toml::Value::Array(values) => Condition::OneOf(values.iter().map(json).collect()),
                toml::Value::Table(bounds) => {
                    let bound = |check: &mut Checker<'_, '_>, key: &str| match bounds.get(key) {
                        None => None,
                        Some(toml::Value::Integer(n)) => Some(*n as f64),
                        Some(toml::Value::Float(n)) => Some(*n),
                        Some(_) => {
                            check.report(format!("{field}.{key}"), "must be a number");
                            None
                        }
                    };
                    let (min, max) = (bound(check, "min"), bound(check, "max"));
                    if let Some(other) =
                        bounds.keys().find(|k| !matches!(k.as_str(), "min" | "max"))
                    {
                        check.report(
                            format!("{field}.{other}"),
                            "unknown bound (expected min or max)",
                        );
                    }
                    if min.is_none() && max.is_none() {
                        check.report(field.clone(), "a range needs min, max or both");
                    }
                    Condition::Range { min, max }
                }
                scalar => Condition::OneOf(vec![json(scalar)]),
            };
            params.push((path.clone(), condition));
        }
        policy = policy.rule(ParamRule {
            effect,
            command_type: rule.command_type.clone(),
            params,
        });
    }
    policy
}

fn check_with_engine(
    dispatchers: &[DispatcherConfig],
    routes: &[Route],
    no_category: &[&str],
    unreadable: &Unreadable,
    check: &mut Checker<'_, '_>,
) {
    let mut builder = Engine::builder();
    for d in dispatchers {
        let mut dispatcher = match (&d.kind, d.category) {
            (DispatcherKind::Http { .. }, Category::Command) => {
                Dispatcher::command(d.dispatcher_id.as_str(), StandIn)
            }
            _ => Dispatcher::new(d.dispatcher_id.as_str(), d.category, StandIn),
        }
        .with_timeout(d.timeout);
        if let Some(types) = &d.message_types {
            dispatcher = dispatcher.with_message_types(types.iter().cloned());
        }
        builder = builder.dispatcher(dispatcher);
    }
    for route in routes {
        builder = builder.route(route.clone());
    }
    let Err(error) = builder.build() else { return };
    // The nth problem about the same id is about its nth element (a third duplicate is the
    // third element, not the second again).
    let mut seen: HashMap<(&'static str, String), usize> = HashMap::new();
    let mut nth = |list: &'static str, id: &str, skip: usize| {
        // Only duplicates count on: every other problem is about the first element of an id.
        let mut first = skip;
        let n = if skip == 0 {
            &mut first
        } else {
            seen.entry((list, id.to_owned())).or_insert(skip)
        };
        let index = match list {
            "dispatchers" => dispatchers
                .iter()
                .enumerate()
                .filter(|(_, d)| d.dispatcher_id == id)
                .nth(*n)
                .map(|(i, _)| i),
            _ => routes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.route_id == id)
                .nth(*n)
                .map(|(i, _)| i),
        };
        *n += 1;
        format!("{list}[{}]", index.unwrap_or_default())
    };
    for problem in error.problems {
        let field = match &problem {
            BuildProblem::InvalidDispatcherId(id) => {
                format!("{}.dispatcher_id", nth("dispatchers", id, 0))
            }
            BuildProblem::DuplicateDispatcher(id) => {
                format!("{}.dispatcher_id", nth("dispatchers", id, 1))
            }
            BuildProblem::ZeroTimeout(id) => format!("{}.timeout", nth("dispatchers", id, 0)),
            BuildProblem::CommandWithoutAdapter(id) | BuildProblem::PolicyOutsideCommand(id) => {
                format!("{}.category", nth("dispatchers", id, 0))
            }
            BuildProblem::InvalidRouteId(id) => format!("{}.route_id", nth("routes", id, 0)),
            BuildProblem::DuplicateRoute(id) => format!("{}.route_id", nth("routes", id, 1)),
            BuildProblem::UnknownDispatcher { dispatcher, .. }
                if unreadable.dispatchers.contains(dispatcher) =>
            {
                // That dispatcher's own problem says why it is missing.
                continue;
            }
            BuildProblem::UnknownDispatcher { route, .. } => {
                format!("{}.dispatcher_id", nth("routes", route, 0))
            }
            BuildProblem::CategoryMismatch {
                route, dispatcher, ..
            } if no_category.contains(&route.as_str())
                || no_category.contains(&dispatcher.as_str()) =>
            {
                continue;
            }
            BuildProblem::UnreachablePattern { route, .. }
                if no_category.contains(&route.as_str()) =>
            {
                continue;
            }
            BuildProblem::CategoryMismatch { route, .. } => {
                format!("{}.message_category", nth("routes", route, 0))
            }
            BuildProblem::InvalidPattern { route, .. }
            | BuildProblem::UnreachablePattern { route, .. } => {
                format!("{}.topic_pattern", nth("routes", route, 0))
            }
            BuildProblem::UnreachableMessageType { route, .. } => {
                format!("{}.message_type", nth("routes", route, 0))
            }
            // A problem a newer engine finds: reported for the whole file until placed here.
            _ => String::new(),
        };
        let message = match &problem {
            BuildProblem::CommandWithoutAdapter(id) => {
                let kind = dispatchers
                    .iter()
                    .find(|d| d.dispatcher_id == *id)
                    .map_or("log", |d| d.kind.name());
                format!(
                    "kind `{kind}` handles events and intents; a command dispatcher needs kind = \"http\" (its command adapter) or an adapter registered in code"
                )
            }
            other => other.to_string(),
        };
        check.report(field, message);
    }
}

/// The server's limits, validated (defaults where a field is absent).
struct Limits {
    max_header_bytes: usize,
    header_read_timeout: Duration,
    request_timeout: Duration,
    max_in_flight: usize,
    max_connections: usize,
    drain_delay: Duration,
    min_body_rate: u64,
    body_rate_grace: Duration,
}

fn validate_limits(raw: &RawServer, check: &mut Checker<'_, '_>) -> Limits {
    // An out-of-range value is reported; what it is replaced with does not matter, the
    // configuration is refused.
    let mut count = |value: u64, field: &str, range: std::ops::RangeInclusive<u64>| {
        if !range.contains(&value) {
            check.report(
                field,
                format!("must be between {} and {}", range.start(), range.end()),
            );
        }
        usize::try_from(value).unwrap_or(usize::MAX)
    };
    // hyper needs at least 8 KiB of read buffer; past 1 MiB a header is an attack.
    let max_header_bytes = count(
        raw.max_header_bytes,
        "server.max_header_bytes",
        8192..=1024 * 1024,
    );
    let max_in_flight = count(raw.max_in_flight, "server.max_in_flight", 1..=1_000_000);
    let max_connections = count(raw.max_connections, "server.max_connections", 1..=1_000_000);
    // 0 turns the check off; past 1 GB/s it would refuse healthy clients on a fast network.
    let min_body_rate = count(raw.min_body_rate, "server.min_body_rate", 0..=1_000_000_000) as u64;
    let mut positive =
        |text: &str, field: &str| check.positive(text, field).unwrap_or(Duration::MAX);
    Limits {
        max_header_bytes,
        header_read_timeout: positive(&raw.header_read_timeout, "server.header_read_timeout"),
        request_timeout: positive(&raw.request_timeout, "server.request_timeout"),
        max_in_flight,
        max_connections,
        drain_delay: check
            .duration(&raw.drain_delay, "server.drain_delay")
            .unwrap_or_default(),
        min_body_rate,
        body_rate_grace: check
            .duration(&raw.body_rate_grace, "server.body_rate_grace")
            .unwrap_or_default(),
    }
}

/// The API tokens. A problem names the field and never shows a token.
fn validate_auth(
    raw: &RawAuth,
    env: &dyn Fn(&str) -> Option<String>,
    check: &mut Checker<'_, '_>,
) -> crate::auth::Tokens {
    use crate::auth::{ApiToken, MIN_TOKEN_CHARS, Scope, Secret};
    let mut tokens = Vec::new();
    let accept = |token: &str, field: &str, check: &mut Checker<'_, '_>| {
        if token.chars().count() < MIN_TOKEN_CHARS || token.chars().any(char::is_whitespace) {
            check.report(
                field,
                format!("a token must be at least {MIN_TOKEN_CHARS} characters, without spaces"),
            );
            None
        } else {
            Some(Secret::new(token))
        }
    };
    if let Some(token) = raw.api_token.as_deref().filter(|t| !t.is_empty()) {
        if let Some(secret) = accept(token, "auth.api_token", check) {
            tokens.push(ApiToken {
                name: "DISPATCHD_API_TOKEN".to_owned(),
                secret,
                scopes: vec![Scope::Ingest, Scope::Admin],
            });
        }
    }
    for (i, token) in raw.tokens.iter().flatten().enumerate() {
        let at = |field: &str| format!("auth.tokens[{i}].{field}");
        let name = token.name.clone().unwrap_or_else(|| format!("token {i}"));
        let value = match (&token.token, &token.token_env) {
            (Some(value), None) => Some(value.clone()),
            (None, Some(var)) => {
                let value = env(var);
                if value.is_none() {
                    check.report(
                        at("token_env"),
                        format!("the environment variable `{var}` is not set"),
                    );
                }
                value
            }
            _ => {
                check.report(at("token"), "set exactly one of token and token_env");
                None
            }
        };
        let mut scopes = Vec::new();
        match &token.scopes {
            None => check.report(at("scopes"), "is required"),
            Some(list) if list.is_empty() => {
                check.report(at("scopes"), "must name at least one scope");
            }
            Some(list) => {
                for scope in list {
                    match Scope::parse(scope) {
                        Some(scope) => scopes.push(scope),
                        None => check.report(
                            at("scopes"),
                            format!("unknown scope `{scope}` (expected ingest, admin or metrics)"),
                        ),
                    }
                }
            }
        }
        let field = if token.token.is_some() {
            at("token")
        } else {
            at("token_env")
        };
        if let Some(secret) = value.and_then(|v| accept(&v, &field, check)) {
            tokens.push(ApiToken {
                name,
                secret,
                scopes,
            });
        }
    }
    crate::auth::Tokens::new(tokens)
}

fn validate_resilience(
    d: &RawDispatcher,
    at: &dyn Fn(&str) -> String,
    redis_bus: bool,
    check: &mut Checker<'_, '_>,
) -> ResilienceConfig {
    // Each section is the dispatcher's own, its missing fields filled in from the defaults. A
    // refused value is reported; what stands in for it does not matter, the configuration is
    // refused.
    let retry = d.retry.as_ref().map(|r| {
        let initial_backoff = check.positive(&r.initial_backoff, &at("retry.initial_backoff"));
        let max_backoff = check.positive(&r.max_backoff, &at("retry.max_backoff"));
        if let (Some(initial), Some(max)) = (initial_backoff, max_backoff) {
            if initial > max {
                check.report(
                    at("retry.initial_backoff"),
                    "must not be longer than retry.max_backoff",
                );
            }
        }
        if r.attempts > 100 {
            check.report(at("retry.attempts"), "must be at most 100");
        }
        RetryPolicy {
            attempts: r.attempts,
            initial_backoff: initial_backoff.unwrap_or_default(),
            max_backoff: max_backoff.unwrap_or_default(),
        }
    });
    let breaker = d.circuit_breaker.as_ref().map(|b| {
        let cool_down = check
            .positive(&b.cool_down, &at("circuit_breaker.cool_down"))
            .unwrap_or_default();
        let trip = match (b.consecutive_failures, b.failure_ratio) {
            (Some(n), None) => Trip::ConsecutiveFailures(n),
            (None, Some(ratio)) => {
                // The defaults give both to every breaker with a failure ratio.
                if b.minimum_calls.is_none() || b.window.is_none() {
                    check.report(
                        at("circuit_breaker"),
                        "failure_ratio needs minimum_calls and window",
                    );
                }
                let window = b
                    .window
                    .as_deref()
                    .and_then(|window| check.positive(window, &at("circuit_breaker.window")));
                Trip::FailureRatio {
                    ratio,
                    minimum_calls: b.minimum_calls.unwrap_or_default(),
                    window: window.unwrap_or_default(),
                }
            }
            _ => Trip::ConsecutiveFailures(0),
        };
        BreakerConfig {
            trip,
            cool_down,
            half_open_successes: b.half_open_successes,
        }
    });
    let rate_limit = d.rate_limit.as_ref().map(|r| {
        let mode = match r.mode.as_str() {
            "wait" => {
                // The defaults give every limit that waits a max_wait.
                let max_wait = r
                    .max_wait
                    .as_deref()
                    .and_then(|max_wait| check.positive(max_wait, &at("rate_limit.max_wait")));
                if r.max_wait.is_none() {
                    check.report(at("rate_limit.max_wait"), "is required for mode \"wait\"");
                }
                RateLimitMode::Wait {
                    max_wait: max_wait.unwrap_or_default(),
                }
            }
            _ => RateLimitMode::Reject,
        };
        let one = NonZeroU32::MIN;
        RateLimitConfig {
            per_second: NonZeroU32::new(r.per_second).unwrap_or(one),
            burst: NonZeroU32::new(r.burst.unwrap_or(r.per_second)).unwrap_or(one),
            mode,
            scope: protection_scope(&r.scope),
        }
    });
    let concurrency = d.concurrency.as_ref().map(|c| ConcurrencyConfig {
        max_in_flight: c.max_in_flight,
        max_waiting: c.max_waiting,
    });
    let dedup = d.dedup.as_ref().map(|c| DedupConfig {
        ttl: check.positive(&c.ttl, &at("dedup.ttl")).unwrap_or_default(),
        capacity: c.capacity,
        scope: protection_scope(&c.scope),
    });

    // The shapes above are read; here every other rule of a value is checked.
    let mut check = |ok: bool, field: &str, message: &str| {
        if !ok {
            check.report(at(field), message);
        }
    };
    if let Some(b) = &d.circuit_breaker {
        check(
            b.consecutive_failures.is_some() != b.failure_ratio.is_some(),
            "circuit_breaker",
            "set either consecutive_failures or failure_ratio (with minimum_calls and window)",
        );
        check(
            b.consecutive_failures != Some(0),
            "circuit_breaker.consecutive_failures",
            "must be at least 1",
        );
        if let Some(ratio) = b.failure_ratio {
            check(
                ratio > 0.0 && ratio <= 1.0,
                "circuit_breaker.failure_ratio",
                "must be above 0 and at most 1",
            );
        } else {
            check(
                b.minimum_calls.is_none() && b.window.is_none(),
                "circuit_breaker",
                "minimum_calls and window go with failure_ratio",
            );
        }
        check(
            b.minimum_calls != Some(0),
            "circuit_breaker.minimum_calls",
            "must be at least 1",
        );
        check(
            b.half_open_successes != 0,
            "circuit_breaker.half_open_successes",
            "must be at least 1",
        );
    }
    if let Some(r) = &d.rate_limit {
        check(
            r.per_second >= 1,
            "rate_limit.per_second",
            "must be at least 1",
        );
        check(r.burst != Some(0), "rate_limit.burst", "must be at least 1");
        check(
            matches!(r.mode.as_str(), "wait" | "reject"),
            "rate_limit.mode",
            "must be \"wait\" or \"reject\"",
        );
        check(
            r.max_wait.is_none() || r.mode != "reject",
            "rate_limit.max_wait",
            "applies only to mode \"wait\"",
        );
    }
    if let Some(c) = &d.concurrency {
        check(
            c.max_in_flight >= 1,
            "concurrency.max_in_flight",
            "must be at least 1",
        );
    }
    if let Some(c) = &d.dedup {
        check(c.capacity != 0, "dedup.capacity", "must be at least 1");
        let max = crate::resilience::MAX_CAPACITY;
        check(
            c.capacity <= max,
            "dedup.capacity",
            &format!("must be at most {max} (its table would take more than 1 GiB)"),
        );
    }
    let scopes = [
        ("rate_limit.scope", d.rate_limit.as_ref().map(|r| &r.scope)),
        ("dedup.scope", d.dedup.as_ref().map(|c| &c.scope)),
    ];
    for (field, scope) in scopes {
        let Some(scope) = scope else { continue };
        check(
            matches!(scope.as_str(), "instance" | "cluster"),
            field,
            "must be \"instance\" or \"cluster\"",
        );
        check(
            scope != "cluster" || redis_bus,
            field,
            "\"cluster\" keeps its state in the bus's Redis: set bus.kind = \"redis\" (and bus.redis_url)",
        );
    }
    ResilienceConfig {
        retry,
        breaker,
        rate_limit,
        concurrency,
        dedup,
    }
}

/// An unknown scope was reported by the checks; it stands as `instance` meanwhile.
fn protection_scope(text: &str) -> ProtectionScope {
    match text {
        "cluster" => ProtectionScope::Cluster,
        _ => ProtectionScope::Instance,
    }
}

fn validate_sink(
    i: usize,
    raw: &RawSink,
    env: &dyn Fn(&str) -> Option<String>,
    check: &mut Checker<'_, '_>,
) -> SinkSettings {
    let at = |field: &str| format!("sinks[{i}].{field}");
    let mut require = |ok: bool, field: &str, message: String| {
        if !ok {
            check.report(at(field), message);
        }
    };
    require(
        crate::engine::is_valid_id(&raw.name),
        "name",
        "must be 1 to 128 characters of [A-Za-z0-9_.-]".into(),
    );
    require(
        SERVICES.contains(&raw.service.as_str()),
        "service",
        format!(
            "unknown service `{}` (expected one of {})",
            raw.service,
            SERVICES.join(", ")
        ),
    );
    let needs_endpoint = matches!(raw.service.as_str(), "file" | "http");
    require(
        !needs_endpoint || raw.endpoint.is_some(),
        "endpoint",
        format!("the {} sink needs an endpoint", raw.service),
    );
    let api_key = raw.api_key.clone().or_else(|| env("DISPATCHD_API_KEY"));
    let needs_key = matches!(raw.service.as_str(), "lunary" | "helicone");
    require(
        !needs_key || api_key.is_some(),
        "api_key",
        format!(
            "the {} sink needs an api key (or DISPATCHD_API_KEY)",
            raw.service
        ),
    );
    if let (Some(key), "lunary") = (&api_key, raw.service.as_str()) {
        if let Err(why) = crate::sinks::check_lunary_key(key) {
            let whose = if raw.api_key.is_some() {
                "the api key"
            } else {
                "DISPATCHD_API_KEY"
            };
            require(false, "api_key", format!("{whose} {why}"));
        }
    }
    let mut settings = sink_settings(raw, &at, check);
    settings.sink.api_key = api_key;
    settings
}

/// A sink's plugin and driver settings from its element (the defaults filled in), every value
/// checked; what the plugin needs (an endpoint, a key) is the caller's to check.
fn sink_settings(
    raw: &RawSink,
    at: &dyn Fn(&str) -> String,
    check: &mut Checker<'_, '_>,
) -> SinkSettings {
    let mut require = |ok: bool, field: &str, message: &str| {
        if !ok {
            check.report(at(field), message);
        }
    };
    require(
        (1..=10_000).contains(&raw.batch_size),
        "batch_size",
        "must be between 1 and 10000",
    );
    require(raw.buffer >= 1, "buffer", "must be at least 1");
    let full = match raw.full_policy.as_str() {
        "block" => FullPolicy::Block,
        "drop_newest" => FullPolicy::DropNewest,
        other => {
            check.report(
                at("full_policy"),
                format!("unknown policy `{other}` (expected block or drop_newest)"),
            );
            FullPolicy::Block
        }
    };
    // A refused value is reported; what stands in for it does not matter.
    let mut positive =
        |text: &str, field: &str| check.positive(text, &at(field)).unwrap_or_default();
    let timeout = positive(&raw.timeout, "timeout");
    let retry = RetryPolicy {
        attempts: raw.retry.attempts,
        initial_backoff: positive(&raw.retry.initial_backoff, "retry.initial_backoff"),
        max_backoff: positive(&raw.retry.max_backoff, "retry.max_backoff"),
    };
    let dead_letter = raw
        .dead_letter
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(format!("./dispatchd-data/{}.dead-letters.jsonl", raw.name))
        });
    SinkSettings {
        sink: SinkConfig {
            name: raw.name.clone(),
            service: raw.service.clone(),
            endpoint: raw.endpoint.clone(),
            api_key: raw.api_key.clone(),
            headers: raw.headers.clone(),
            timeout,
            fsync: raw.fsync,
        },
        driver: DriverConfig {
            batch_size: raw.batch_size,
            flush_interval: positive(&raw.flush_interval, "flush_interval"),
            buffer: raw.buffer,
            full,
            retry,
            shutdown_deadline: positive(&raw.shutdown_deadline, "shutdown_deadline"),
            send_timeout: timeout + crate::sinks::SEND_TIMEOUT_MARGIN,
            dead_letter,
        },
    }
}

/// The Redis settings of `[bus]`, with `url` (checked by the caller).
fn redis_bus(raw: &RawBus, url: String, check: &mut Checker<'_, '_>) -> RedisBusConfig {
    let mut positive =
        |text: &str, field: &str| check.positive(text, field).unwrap_or(Duration::MAX);
    RedisBusConfig {
        url,
        max_len: raw.max_len.filter(|n| *n > 0),
        consumer: raw.consumer.clone(),
        claim_idle: positive(&raw.claim_idle, "bus.claim_idle"),
        consumer_retention: positive(&raw.consumer_retention, "bus.consumer_retention"),
        trim_every: positive(&raw.trim_every, "bus.trim_every"),
        dead_letter: PathBuf::from(&raw.dead_letter),
    }
}

fn validate_bus(raw: &RawBus, check: &mut Checker<'_, '_>) -> BusConfig {
    let events_stream = raw.events_stream.clone();
    let outputs_prefix = raw.outputs_prefix.clone();
    // Checked whatever the kind: a file may set them before it turns Redis on.
    let settings = redis_bus(raw, raw.redis_url.clone().unwrap_or_default(), check);
    let redis = match raw.kind.as_str() {
        "memory" => None,
        "redis" => match &raw.redis_url {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                Some(settings)
            }
            Some(url) => {
                check.report("bus.redis_url", format!("`{url}` is not a redis:// URL"));
                None
            }
            None => {
                // Nothing sets the URL: the line to blame is the one that chose Redis.
                let origin = check.origins.of("bus.kind");
                check.problems.push(Problem {
                    origin,
                    field: "bus.redis_url".to_owned(),
                    message: "is required when bus.kind is \"redis\" (or DISPATCHD_REDIS_URL)"
                        .to_owned(),
                });
                None
            }
        },
        other => {
            check.report(
                "bus.kind",
                format!("unknown kind `{other}` (expected memory or redis)"),
            );
            None
        }
    };
    BusConfig {
        redis,
        events_stream,
        outputs_prefix,
    }
}

/// `[server] instance_id`: shown in metrics, logs and Redis consumer names, so printable and
/// bounded.
fn validate_instance_id(raw: Option<&str>, check: &mut Checker<'_, '_>) -> Option<String> {
    let id = raw?;
    let valid = (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if !valid {
        check.report(
            "server.instance_id",
            "must be 1 to 128 characters of [A-Za-z0-9_.:-]",
        );
        return None;
    }
    Some(id.to_owned())
}

fn validate_registry(
    raw: &RawRegistry,
    bus: &RawBus,
    check: &mut Checker<'_, '_>,
) -> RegistryConfig {
    let bus_is_redis = bus.kind == "redis";
    let kind = match raw.kind.as_deref() {
        // Computed: it follows the bus.
        None if bus_is_redis => RegistryKind::Redis,
        None => RegistryKind::Memory,
        Some("memory") => RegistryKind::Memory,
        Some("redis") if bus_is_redis => RegistryKind::Redis,
        Some("redis") => {
            check.report(
                "registry.kind",
                "\"redis\" keeps the registry on the bus's Redis: it needs bus.kind = \"redis\"",
            );
            RegistryKind::Memory
        }
        Some(other) => {
            check.report(
                "registry.kind",
                format!("unknown kind `{other}` (expected memory or redis)"),
            );
            RegistryKind::Memory
        }
    };
    let retention = check
        .positive(&raw.retention, "registry.retention")
        .unwrap_or(Duration::MAX);
    if raw.key_prefix.is_empty() {
        check.report("registry.key_prefix", "must not be empty");
    }
    let key_prefix = raw.key_prefix.clone();
    RegistryConfig {
        kind,
        retention,
        key_prefix,
    }
}

fn validate_health(raw: &RawHealth, check: &mut Checker<'_, '_>) -> HealthConfig {
    let max_stale_threshold = check
        .positive(&raw.max_stale_threshold, "health.max_stale_threshold")
        .unwrap_or(Duration::MAX);
    let stale_threshold = check
        .positive(&raw.stale_threshold, "health.stale_threshold")
        .unwrap_or(Duration::ZERO);
    if stale_threshold > max_stale_threshold {
        check.report(
            "health.stale_threshold",
            "must be at most health.max_stale_threshold",
        );
    }
    let failure_limit = raw.failure_limit;
    if failure_limit == 0 {
        check.report("health.failure_limit", "must be at least 1");
    }
    let max_workers = raw.max_workers;
    if max_workers > MAX_WORKERS_LIMIT {
        check.report(
            "health.max_workers",
            format!("must be at most {MAX_WORKERS_LIMIT}: every worker is a set of series"),
        );
    }
    HealthConfig {
        stale_threshold,
        failure_limit,
        max_workers: usize::try_from(max_workers).unwrap_or(usize::MAX),
        max_stale_threshold,
    }
}

/// Empty (no prefix), or `[a-zA-Z_][a-zA-Z0-9_]*`.
fn is_valid_namespace(namespace: &str) -> bool {
    let mut bytes = namespace.bytes();
    bytes
        .next()
        .is_none_or(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The fields of one kind of dispatcher, and the kinds each belongs to: on a dispatcher of
/// another kind such a field is a mistake, and its default (when it has one) is not filled in.
const KIND_FIELDS: [(&str, &[&str]); 13] = [
    ("path", &["jsonl"]),
    ("url", &["http"]),
    ("method", &["http"]),
    ("headers", &["http"]),
    ("headers_env", &["http"]),
    ("policy", &["http"]),
    ("redis_url", &["redis_stream"]),
    ("stream", &["redis_stream"]),
    ("max_len", &["redis_stream"]),
    ("nats_url", &["nats"]),
    ("subject", &["nats"]),
    ("jetstream", &["nats"]),
    ("call_timeout", &["redis_stream", "nats"]),
];

/// What a worker says when it registers: on a `worker` dispatcher these are mistakes, and their
/// defaults are not filled in.
const WORKER_FIELDS: [&str; 3] = ["stale_threshold", "heartbeat_interval", "critical"];

/// The tables of an element that every element has, filled in from the defaults when it does not
/// write them. Any other table of an element (a dispatcher's `retry`, `circuit_breaker`, …) is
/// off unless written, and only a written one gets the defaults' fields.
const TABLES_EVERY_ELEMENT_HAS: [(&str, &str); 1] = [("sinks", "retry")];

/// Lays `[defaults.<list>]` under every element of each list: key by key, nested tables too, the
/// element's own values winning. Remembers in `origins` which default each value filled in came
/// from, so that a problem with it is reported where that default is written.
fn spread(table: &mut toml::Table, origins: &mut Origins<'_>) {
    let Some(toml::Value::Table(defaults)) = table.get("defaults").cloned() else {
        return;
    };
    for (list, defaults) in &defaults {
        let toml::Value::Table(defaults) = defaults else {
            continue;
        };
        let Some(toml::Value::Array(elements)) = table.get_mut(list) else {
            continue;
        };
        for (i, element) in elements.iter_mut().enumerate() {
            let toml::Value::Table(element) = element else {
                continue;
            };
            let mut to = Spread {
                list,
                kind: element
                    .get("kind")
                    .and_then(toml::Value::as_str)
                    .map(str::to_owned),
                filled: &mut origins.spread,
            };
            to.fill(
                element,
                defaults,
                "",
                &format!("{list}[{i}]"),
                &format!("defaults.{list}"),
            );
        }
    }
}

/// One element being filled in by [`spread`].
struct Spread<'s> {
    list: &'s str,
    /// The element's `kind` (dispatchers).
    kind: Option<String>,
    filled: &'s mut HashMap<String, String>,
}

impl Spread<'_> {
    /// Fills `table` (the element, or its table `section`, at `at`) from `defaults` (at `from`).
    fn fill(
        &mut self,
        table: &mut toml::Table,
        defaults: &toml::Table,
        section: &str,
        at: &str,
        from: &str,
    ) {
        for (key, default) in defaults {
            let (at, from) = (format!("{at}.{key}"), format!("{from}.{key}"));
            match (table.get_mut(key), default) {
                (Some(toml::Value::Table(inner)), toml::Value::Table(defaults)) => {
                    self.fill(inner, defaults, key, &at, &from);
                }
                // The element's own value wins (a wrong shape is the shape check's to report).
                (Some(_), _) => {}
                (None, toml::Value::Table(defaults)) => {
                    if section.is_empty() && TABLES_EVERY_ELEMENT_HAS.contains(&(self.list, key)) {
                        let mut inner = toml::Table::new();
                        self.fill(&mut inner, defaults, key, &at, &from);
                        table.insert(key.clone(), toml::Value::Table(inner));
                    }
                }
                (None, value) => {
                    if self.applies(section, key, table, defaults) {
                        table.insert(key.clone(), value.clone());
                        self.filled.insert(at, from);
                    }
                }
            }
        }
    }

    /// Whether the default `key` of `section` (empty: the element itself) goes to this element,
    /// whose `section` is `table`: a field of one kind only to dispatchers of that kind, what a
    /// worker registers to no worker, and a protection's field that goes with one setting only
    /// where that setting is (or defaults to) it.
    fn applies(
        &self,
        section: &str,
        key: &str,
        table: &toml::Table,
        defaults: &toml::Table,
    ) -> bool {
        if self.list != "dispatchers" {
            return true;
        }
        let kind = self.kind.as_deref();
        match section {
            "" => {
                let of_kind = KIND_FIELDS
                    .iter()
                    .find(|(field, _)| *field == key)
                    .is_none_or(|(_, kinds)| kind.is_some_and(|kind| kinds.contains(&kind)));
                of_kind && !(kind == Some("worker") && WORKER_FIELDS.contains(&key))
            }
            "circuit_breaker" => {
                !matches!(key, "minimum_calls" | "window") || table.contains_key("failure_ratio")
            }
            "rate_limit" => {
                let mode = table.get("mode").or_else(|| defaults.get("mode"));
                key != "max_wait" || mode.and_then(toml::Value::as_str) != Some("reject")
            }
            _ => true,
        }
    }
}

/// Lays `over` onto `base`: tables merge key by key, anything else (lists included) replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn set(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut table = table;
    let mut keys = dotted.split('.').peekable();
    while let Some(key) = keys.next() {
        if keys.peek().is_none() {
            table.insert(key.to_owned(), value);
            return;
        }
        let entry = table
            .entry(key.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        table = next;
    }
}

/// The byte offset where `field` (such as `routes[1].dispatcher_id`) is written in the document.
/// What the shape check had to leave out of the file, so validation does not report its
/// consequences as problems of their own.
#[derive(Debug, Default)]
struct Unreadable {
    /// Ids of `[[dispatchers]]` elements left out: a route naming one is not "unknown".
    dispatchers: Vec<String>,
    /// Dispatcher ids named by `[[routes]]` elements left out: such a dispatcher is not
    /// "unrouted".
    route_targets: Vec<String>,
}

/// Lists of tables whose elements are read one by one: an element that cannot be read is left
/// out (and the others keep their file index in problems).
const TABLE_LISTS: [&str; 5] = ["dispatchers", "routes", "sinks", "sources", "auth.tokens"];

/// Leaf names of the fields that take a duration, for a message that says so.
const DURATION_FIELDS: &[&str] = &[
    "shutdown_grace",
    "header_read_timeout",
    "request_timeout",
    "idle_timeout",
    "drain_delay",
    "body_rate_grace",
    "timeout",
    "stale_threshold",
    "heartbeat_interval",
    "max_stale_threshold",
    "retention",
    "initial_backoff",
    "max_backoff",
    "window",
    "cool_down",
    "max_wait",
    "ttl",
    "claim_idle",
    "consumer_retention",
    "trim_every",
    "flush_interval",
    "shutdown_deadline",
    "metrics_interval",
    "call_timeout",
];

/// The most shape problems reported for one file; past it the file is hardly a config.
const MAX_SHAPE_PROBLEMS: usize = 100;

/// Reads the file's table into `Shape` (the whole [`RawConfig`], or [`defaults_shape::Only`]) and reports
/// every unknown field, wrongly typed value and missing required field with its full path. serde stops at the first problem, so
/// each one's key is taken out of `table` and the rest read again; an element of a list of
/// tables that cannot be read is taken out whole, and `origins` remembers which file elements
/// remain.
fn check_shape<Shape: serde::de::DeserializeOwned>(
    table: &mut toml::Table,
    defaults: &toml::Table,
    origins: &mut Origins<'_>,
    problems: &mut Vec<Problem>,
) -> Unreadable {
    let mut unreadable = Unreadable::default();
    for _ in 0..MAX_SHAPE_PROBLEMS {
        let value = toml::Value::Table(table.clone());
        let Err(error) = serde_path_to_error::deserialize::<_, Shape>(value) else {
            return unreadable;
        };
        let path = match error.path().to_string() {
            root if root == "." => String::new(),
            path => path,
        };
        let message = error.inner().message().trim_end().to_owned();
        // An unknown key is already the last segment of the path; a missing one is not.
        let join = |leaf: &str| {
            if path == leaf || path.ends_with(&format!(".{leaf}")) {
                path.clone()
            } else if path.is_empty() {
                leaf.to_owned()
            } else {
                format!("{path}.{leaf}")
            }
        };
        let (field, text, remove) = if let Some(rest) = message.strip_prefix("unknown field `") {
            let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let expected = expected.trim_start_matches(',').trim();
            let text = match closest(name, expected) {
                Some(known) => format!("unknown field (did you mean `{known}`?)"),
                None if expected.is_empty() => "unknown field".to_owned(),
                None => format!("unknown field, {expected}"),
            };
            (join(name), text, join(name))
        } else if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or(rest);
            // The table that lacks it cannot be read: leave it out.
            (join(name), "is required".to_owned(), path.clone())
        } else {
            let leaf = path.rsplit('.').next().unwrap_or(&path);
            let leaf = leaf.split('[').next().unwrap_or(leaf);
            (path.clone(), friendly(&message, leaf), path.clone())
        };
        problems.push(origins.problem(field, text));
        if !remove_at(table, defaults, &remove, origins, &mut unreadable) {
            // Nothing could be taken out (it should not happen): stop rather than loop.
            return unreadable;
        }
    }
    unreadable
}

/// Takes the item at `path` (as validation numbers it) out of `table`. An element of one of
/// [`TABLE_LISTS`] is taken out whole and remembered; an element of any other array takes its
/// whole array with it (its siblings would otherwise be renumbered).
fn remove_at(
    table: &mut toml::Table,
    defaults: &toml::Table,
    path: &str,
    origins: &mut Origins<'_>,
    unreadable: &mut Unreadable,
) -> bool {
    for list in TABLE_LISTS {
        let Some(rest) = path.strip_prefix(list).and_then(|r| r.strip_prefix('[')) else {
            continue;
        };
        let Some((index, rest)) = rest.split_once(']') else {
            continue;
        };
        let Ok(index) = index.parse::<usize>() else {
            continue;
        };
        if !rest.is_empty() {
            break;
        }
        let Some(toml::Value::Array(elements)) = lookup(table, list) else {
            return false;
        };
        if index >= elements.len() {
            return false;
        }
        let element = elements.remove(index);
        let id = |key: &str| {
            element
                .get(key)
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
        };
        match list {
            "dispatchers" => unreadable.dispatchers.extend(id("dispatcher_id")),
            "routes" => unreadable.route_targets.extend(id("dispatcher_id")),
            _ => {}
        }
        let count = elements.len() + 1;
        let kept = origins
            .kept
            .entry(list)
            .or_insert_with(|| (0..count).collect());
        if index < kept.len() {
            kept.remove(index);
        }
        return true;
    }
    // `a.b[3]` (not a list of tables) or `a.b[3].c`: the array, or the key, goes back to its
    // default, or goes.
    let path = match path.rfind('[') {
        Some(open) if path.ends_with(']') => &path[..open],
        _ => path,
    };
    if !path.contains('[') {
        let mut defaults = defaults.clone();
        if let Some(default) = lookup(&mut defaults, path).cloned() {
            if let Some(slot) = lookup(table, path) {
                if *slot != default {
                    *slot = default;
                    return true;
                }
            }
        }
    }
    let path = match path.rfind('[') {
        Some(open) if path.ends_with(']') => &path[..open],
        _ => path,
    };
    let (parent, key) = match path.rsplit_once('.') {
        Some((parent, key)) => (Some(parent), key),
        None => (None, path),
    };
    let container = match parent {
        None => Some(table),
        Some(parent) => match lookup(table, parent) {
            Some(toml::Value::Table(inner)) => Some(inner),
            _ => None,
        },
    };
    container.is_some_and(|c| c.remove(key).is_some())
}

/// The value at a path such as `dispatchers[1].retry` (indices as validation numbers them).
fn lookup<'t>(table: &'t mut toml::Table, path: &str) -> Option<&'t mut toml::Value> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut value = step(table, first)?;
    for part in parts {
        let toml::Value::Table(inner) = value else {
            return None;
        };
        value = step(inner, part)?;
    }
    Some(value)
}

fn step<'t>(table: &'t mut toml::Table, part: &str) -> Option<&'t mut toml::Value> {
    match part.split_once('[') {
        None => table.get_mut(part),
        Some((name, index)) => {
            let index = index.trim_end_matches(']').parse::<usize>().ok()?;
            match table.get_mut(name)? {
                toml::Value::Array(elements) => elements.get_mut(index),
                _ => None,
            }
        }
    }
}

/// The known field (from serde's `expected one of `a`, `b``) a misspelt `name` most likely
/// meant: at most two edits away.
fn closest<'e>(name: &str, expected: &'e str) -> Option<&'e str> {
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|known| (edit_distance(name, known), known))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known)
}

/// Levenshtein distance, on chars; field names are short.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// serde's `invalid type: string "1MB", expected u64` in the words of a config file:
/// `must be a whole number (found string "1MB")`.
fn friendly(message: &str, leaf: &str) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some((found, expected)) = rest.and_then(|r| r.rsplit_once(", expected ")) else {
        return message.to_owned();
    };
    let wanted = match expected {
        "u8" => "a whole number from 0 to 255".to_owned(),
        "u16" => "a whole number from 0 to 65535".to_owned(),
        "u32" => "a whole number from 0 to 4294967295".to_owned(),
        "u64" | "usize" => "a whole number, 0 or more".to_owned(),
        "i64" | "i32" => "a whole number".to_owned(),
        "f64" | "f32" => "a number".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a string" if DURATION_FIELDS.contains(&leaf) => {
            "a duration in quotes, such as \"30s\" or \"500ms\"".to_owned()
        }
        "a string" => "text in quotes".to_owned(),
        "a sequence" => "a list, such as [\"a\", \"b\"]".to_owned(),
        other if other.starts_with("struct ") || other == "a map" => "a table".to_owned(),
        other => other.to_owned(),
    };
    format!("must be {wanted} (found {found})")
}

fn offset_of(root: &toml_edit::Table, field: &str) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = root;
    let mut span = None;
    let mut parts = field.split('.').peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (
                name,
                Some(rest.trim_end_matches(']').parse::<usize>().ok()?),
            ),
            None => (part, None),
        };
        let item = table.get(name)?;
        span = item.span().or(span);
        table = match (index, item) {
            (None, _) if last => break,
            (None, item) => item.as_table_like()?,
            (Some(i), toml_edit::Item::ArrayOfTables(tables)) => {
                let element = tables.get(i)?;
                span = element.span().or(span);
                if last {
                    break;
                }
                element
            }
            (Some(i), toml_edit::Item::Value(toml_edit::Value::Array(array))) => {
                let element = array.get(i)?;
                span = element.span().or(span);
                if last {
                    break;
                }
                element.as_inline_table()?
            }
            (Some(_), _) => return None,
        };
    }
    span.map(|s| s.start)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |before| before.matches('\n').count() + 1)
}
