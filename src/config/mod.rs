//! Configuration: the embedded defaults, a TOML file over them, and `DISPATCHD_*` environment
//! variables over both, validated into typed values.
//!
//! Owns: the raw serde shapes (nobody else sees them) and every check of user input, each
//! reported with where it came from (file and line, or environment variable) and the field's
//! path, all at once rather than one per run.
//!
//! Must not: build anything that runs. It returns [`Config`]; `app` turns it into a service.

mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::engine::{Category, Route};
use crate::health::HealthConfig;
use crate::resilience::ResilienceConfig;

/// The embedded defaults: what `dispatchd` runs with no config file.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Environment variables that override a config field.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("DISPATCHD_LISTEN", "server.listen"),
    ("DISPATCHD_REDIS_URL", "bus.redis_url"),
    ("DISPATCHD_METRICS_NAMESPACE", "metrics.namespace"),
    ("DISPATCHD_METRICS_ENABLED", "metrics.enabled"),
    ("DISPATCHD_LOG", "log.filter"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "otlp.endpoint"),
    ("DISPATCHD_API_TOKEN", "auth.api_token"),
];

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub health: HealthConfig,
    /// Traces (sampling, OTLP export) and the log format.
    pub tracing: crate::telemetry::traces::TracingConfig,
    /// Where dispatch events are forwarded.
    pub sinks: Vec<SinkSettings>,
    /// Where dispatch events travel to the sinks, and outputs are published.
    pub bus: BusConfig,
    /// Where out-of-process workers are registered.
    pub registry: RegistryConfig,
    /// Streams of messages to dispatch (Redis bus only).
    pub sources: Vec<SourceConfig>,
    pub dispatchers: Vec<DispatcherConfig>,
    pub routes: Vec<Route>,
    /// API tokens; empty leaves the API open (fine on loopback, warned about elsewhere).
    pub auth: crate::auth::Tokens,
    /// What is masked in data leaving through logs, instrumentation and sinks.
    pub redaction: crate::engine::Redactor,
    /// Things that are allowed but most likely mistakes (a dispatcher no route reaches):
    /// `check-config` prints them, `serve` logs them.
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `[server] instance_id`; `None` for the default, [`ServerConfig::instance_id`].
    pub instance_id: Option<String>,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// The request line and headers together, at most (larger: 431).
    pub max_header_bytes: usize,
    /// A connection with no request in progress (just opened, or after a response) must send
    /// a whole request head within this, or it is closed: HTTP/1 and HTTP/2 alike.
    pub header_read_timeout: Duration,
    /// A request (body read and dispatch included) must be answered within this, or it is
    /// answered 503 `request_timeout`.
    pub request_timeout: Duration,
    /// Requests being handled at once, at most; more are shed with 503 and `Retry-After`.
    /// `/health`, `/ready` and `/metrics` are never shed.
    pub max_in_flight: usize,
    /// Open connections at most; past it the connection idle the longest (else one only
    /// receiving a body) is closed to make room, and only when every connection has a request
    /// being dispatched or answered do new ones wait in the listen backlog.
    pub max_connections: usize,
    /// After SIGTERM, how long `/ready` answers 503 while the listener stays open and requests
    /// are served, so a load balancer stops sending before connections are refused.
    pub drain_delay: Duration,
    /// A request body must arrive at this many bytes per second at least, after
    /// `body_rate_grace`, or it is answered 408 `body_too_slow`; 0 turns the check off.
    pub min_body_rate: u64,
    /// The time a body has before `min_body_rate` applies to it.
    pub body_rate_grace: Duration,
}

impl ServerConfig {
    /// This process's identity among the instances (`service.instance.id`, the default Redis
    /// consumer name, a field of the startup log line): the configured one, else
    /// `<host name>:<port>` with the port actually bound, which no other process on the host
    /// can hold at the same time.
    pub fn instance_id(&self, bound_port: u16) -> String {
        match &self.instance_id {
            Some(id) => id.clone(),
            None => format!("{}:{bound_port}", host_name()),
        }
    }
}

/// The host name (the kernel's, not the environment's `HOSTNAME`: configuration reads the
/// environment only through the injected function), or `dispatchd` when it cannot be read.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "dispatchd".to_owned())
}

/// Where out-of-process workers are registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryKind {
    /// In this process: each instance knows only the workers that registered through it.
    Memory,
    /// In the bus's Redis, shared by every instance on it.
    Redis,
}

/// `[registry]`: where workers are registered and how long a gone one is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    /// Default: `redis` when the bus is Redis, else `memory`.
    pub kind: RegistryKind,
    /// How long a worker's record outlives its stale threshold without a heartbeat before it
    /// expires (and frees its `health.max_workers` slot). Redis only.
    pub retention: Duration,
    /// The prefix of the registry's Redis keys.
    pub key_prefix: String,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            kind: RegistryKind::Memory,
            retention: Duration::from_secs(3600),
            key_prefix: "dispatchd:registry".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Empty, or `[a-zA-Z_][a-zA-Z0-9_]*`.
    pub namespace: String,
    /// Series per metric before new label sets fold into one overflow series.
    pub cardinality_limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub filter: String,
}

/// The bus: in-memory (the default) or Redis Streams.
#[derive(Debug, Clone, PartialEq)]
pub struct BusConfig {
    /// `None` for the in-memory bus.
    pub redis: Option<RedisBusConfig>,
    /// The stream every dispatch event is published on.
    pub events_stream: String,
    /// Outputs of topic `t` are published on stream `<outputs_prefix>t` (Redis only).
    pub outputs_prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisBusConfig {
    pub url: String,
    /// `XADD … MAXLEN ~ n`: trims the stream, possibly before every group read it. Off by default.
    pub max_len: Option<usize>,
    /// This instance's consumer name (default `[server] instance_id`, itself host name and
    /// port): stable across restarts, never shared by two processes of one host.
    pub consumer: Option<String>,
    /// Entries pending with a consumer for longer are claimed by another.
    pub claim_idle: Duration,
    /// Consumers idle this long and holding no pending entry are removed from their group by
    /// any live member (`XGROUP DELCONSUMER`).
    pub consumer_retention: Duration,
    /// How often each consumer trims its stream of what every group acknowledged
    /// (`XTRIM … MINID`).
    pub trim_every: Duration,
    /// Where a dispatch event goes when Redis cannot take it (after a few quick retries), in the
    /// sinks' dead-letter format; `dispatchd republish` puts it back on the stream.
    pub dead_letter: PathBuf,
}

impl RedisBusConfig {
    /// A Redis bus at `url` (taken as it is) with every other setting from the embedded
    /// `[bus]`: what `dispatchd sink` consumes with unless its flags say otherwise.
    pub fn embedded(url: String) -> Result<RedisBusConfig, ConfigError> {
        raw::embedded_redis_bus(url)
    }
}

/// A stream of messages to dispatch: each entry's `data` is `{"topic": …, "envelope": {…}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub stream: String,
    pub group: String,
}

/// One configured sink: the plugin's settings and its driver's.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSettings {
    pub sink: crate::sinks::SinkConfig,
    pub driver: crate::sinks::DriverConfig,
}

impl SinkSettings {
    /// What a `[[sinks]]` element that sets only `name` and `service` runs with: every other
    /// setting from the embedded `[defaults.sinks]` (no endpoint, no key). `dispatchd sink`
    /// starts from these and lays its flags over them.
    pub fn embedded(name: &str, service: &str) -> Result<SinkSettings, ConfigError> {
        raw::embedded_sink(name, service)
    }
}

/// One configured dispatcher. The built-in kinds are handlers of events and intents.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatcherConfig {
    pub dispatcher_id: String,
    pub category: Category,
    pub message_types: Option<Vec<String>>,
    pub timeout: Duration,
    pub kind: DispatcherKind,
    /// Stale when no heartbeat for longer than this.
    pub stale_threshold: Duration,
    /// How often the lifecycle task heartbeats; shorter than `stale_threshold`.
    pub heartbeat_interval: Duration,
    /// Whether `/ready` requires it to be healthy.
    pub critical: bool,
    /// Retry, circuit breaker, rate limit, concurrency limit and de-duplication.
    pub resilience: ResilienceConfig,
}

#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DispatcherKind {
    /// Logs each message at info.
    Log,
    /// Appends each message as one JSON line to a file.
    Jsonl { path: PathBuf },
    /// Sends each message to a URL. On a command dispatcher it is the command adapter, and
    /// `policy` (when set) decides which commands it may run.
    Http {
        target: Box<crate::dispatchers::HttpTarget>,
        policy: Option<crate::engine::RulePolicy>,
    },
    /// Appends each message to a Redis stream.
    RedisStream(crate::dispatchers::RedisStreamTarget),
    /// Publishes each message on a NATS subject (optionally through JetStream).
    Nats(crate::dispatchers::NatsTarget),
    /// Pushes each message to the endpoint the remote worker of the same id registered, while it
    /// is registered and not stale.
    Worker,
}

impl DispatcherKind {
    pub const NAMES: &[&str] = &["log", "jsonl", "http", "redis_stream", "nats", "worker"];

    /// Its `kind` in a config file.
    pub fn name(&self) -> &'static str {
        match self {
            DispatcherKind::Log => "log",
            DispatcherKind::Jsonl { .. } => "jsonl",
            DispatcherKind::Http { .. } => "http",
            DispatcherKind::RedisStream(_) => "redis_stream",
            DispatcherKind::Nats(_) => "nats",
            DispatcherKind::Worker => "worker",
        }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Defaults,
    File { path: PathBuf, line: Option<usize> },
    Env(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Defaults => f.write_str("embedded defaults"),
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// The field's path, such as `routes[1].dispatcher_id`; empty for a whole-file error.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: `{}`: {}", self.origin, self.field, self.message)
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", list(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem found, in file order as far as known.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

/// Masks every value a secret could be in: values of keys that name one (`api_key`, `token`,
/// `authorization` header values…, by the redactor's default words) and credentials inside
/// URLs. Names of environment variables (`token_env`) are not secrets and stay.
fn mask(table: &mut toml::Table) {
    let redactor = crate::engine::Redactor::default();
    for (key, value) in table.iter_mut() {
        if key.ends_with("_env") {
            // Names of environment variables (`token_env`, `headers_env = { Authorization =
            // "BILLING_TOKEN" }`), never the secrets themselves.
            continue;
        }
        mask_value(value, redactor.is_sensitive(key));
    }
}

fn mask_value(value: &mut toml::Value, sensitive: bool) {
    match value {
        toml::Value::String(text) if sensitive => *text = crate::engine::REDACTED.to_owned(),
        toml::Value::String(text) => {
            if let std::borrow::Cow::Owned(clean) = crate::engine::sanitize(text) {
                *text = clean;
            }
        }
        toml::Value::Table(table) => mask(table),
        toml::Value::Array(values) => values.iter_mut().for_each(|v| mask_value(v, sensitive)),
        _ => {}
    }
}

fn list(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    format!("invalid configuration:\n  {}", lines.join("\n  "))
}

impl Config {
    /// The embedded defaults alone, ignoring the environment.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::load_with(None, |_| None)
    }

    /// Defaults, then `file`, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(file, |name| std::env::var(name).ok())
    }

    /// Like [`Config::load`] with the environment given as a function, for tests.
    pub fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Some((path, text))
            }
        };
        raw::load(file.as_ref().map(|(p, t)| (*p, t.as_str())), &env)
    }

    /// The configuration `serve` would run with, as TOML (the embedded defaults, the file and
    /// the environment merged, every secret masked), beside the result of validating it. The
    /// text is `None` when the file cannot be read or is not TOML at all.
    pub fn effective(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> (Option<String>, Result<Config, ConfigError>) {
        let text = match file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some((path, text)),
                Err(source) => {
                    let error = ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    };
                    return (None, Err(error));
                }
            },
        };
        let mut merged = None;
        let config = raw::layered(
            text.as_ref().map(|(p, t)| (*p, t.as_str())),
            &env,
            &mut merged,
        );
        let printed = merged.map(|mut table| {
            mask(&mut table);
            toml::to_string_pretty(&table).unwrap_or_default()
        });
        (printed, config)
    }

    /// Defaults, then `text` as if read from the file at `path` (which only names it in
    /// problems), then `env`: for configs that do not live in a file, and for the fuzz targets.
    pub fn from_text(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        raw::load(Some((path, text)), &env)
    }
}

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;
