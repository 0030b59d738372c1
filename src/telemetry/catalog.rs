//! Every instrument dispatchd exports: name, type, unit, labels, HELP text and buckets.
//!
//! Names here are OpenTelemetry instrument names. The Prometheus exporter derives the exported
//! name: it appends `_total` to counters and a unit suffix (`s` → `_seconds`), and prefixes the
//! configured namespace, and writes `_` for a `.`. So `dispatch_messages` (a counter) is
//! exported as `dispatch_messages_total`, `http.server.request.duration` (the stable HTTP
//! convention's name, which OTLP carries) as `http_server_request_duration_seconds`, and an
//! instrument name must never carry those suffixes itself.
//! [`InstrumentSpec::exported_name`] computes the exported name; a test checks every one against
//! PRODUCT.md's table and `docs/metrics.md`.

/// The OpenTelemetry instrument kind, and the Prometheus type it is exported as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    /// An UpDownCounter: exported as a gauge, with no `_total` added.
    UpDownCounter,
    Histogram,
    /// An observable gauge: computed by a callback at scrape time.
    ObservableGauge,
    /// A gauge set when its value changes.
    Gauge,
    /// A counter read by a callback at scrape time.
    ObservableCounter,
}

impl Kind {
    /// The `# TYPE` the exporter writes.
    pub fn prometheus_type(self) -> &'static str {
        match self {
            Kind::Counter | Kind::ObservableCounter => "counter",
            Kind::UpDownCounter | Kind::ObservableGauge | Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One instrument's declaration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstrumentSpec {
    pub name: &'static str,
    pub kind: Kind,
    /// UCUM, as OTLP carries it: `s` for seconds, an annotation for counts of things
    /// (`{message}`), empty for values without one (states, ratios). The Prometheus exporter
    /// adds `_seconds` for `s` and nothing for an annotation, so the names on `/metrics` do not
    /// depend on it.
    pub unit: &'static str,
    /// The HELP text.
    pub description: &'static str,
    /// Label keys, in the fixed order every recording passes them.
    pub labels: &'static [&'static str],
    /// Explicit histogram boundaries (the OpenTelemetry defaults, 0, 5, 10, 25 …, suit
    /// milliseconds, not seconds).
    pub buckets: &'static [f64],
}

impl InstrumentSpec {
    /// The name on `/metrics` for `namespace` (empty for none).
    pub fn exported_name(&self, namespace: &str) -> String {
        let mut name = String::new();
        if !namespace.is_empty() {
            name.push_str(namespace);
            if !namespace.ends_with('_') {
                name.push('_');
            }
        }
        // The exporter writes `_` for every character Prometheus does not allow (the `.` of an
        // OpenTelemetry semantic-conventions name).
        name.extend(self.name.chars().map(prometheus_char));
        match self.unit {
            "s" => name.push_str("_seconds"),
            "1" => name.push_str("_ratio"),
            _ => {}
        }
        if matches!(self.kind, Kind::Counter | Kind::ObservableCounter) {
            name.push_str("_total");
        }
        name
    }

    /// The label names on `/metrics`: the attribute keys, with `_` for `.` as the exporter
    /// writes them (`http.route` is `http_route`).
    pub fn exported_labels(&self) -> impl Iterator<Item = String> + '_ {
        self.labels
            .iter()
            .map(|label| label.chars().map(prometheus_char).collect())
    }
}

/// A character of an OpenTelemetry name as the Prometheus exporter writes it.
fn prometheus_char(c: char) -> char {
    if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
        c
    } else {
        '_'
    }
}

/// Label keys, one vocabulary across metrics, logs and spans.
pub mod label {
    pub const CATEGORY: &str = "category";
    pub const STATUS: &str = "status";
    pub const DISPATCHER_ID: &str = "dispatcher_id";
    pub const RESULT: &str = "result";
    pub const ADAPTER: &str = "adapter";
    pub const COMMAND_TYPE: &str = "command_type";
    pub const POLICY: &str = "policy";
    // The HTTP server conventions' keys, as OTLP carries them; the Prometheus exporter writes
    // `http_route`, `http_request_method` and `http_response_status_code`.
    pub const HTTP_ROUTE: &str = "http.route";
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    pub const METRIC: &str = "metric";
    pub const EVENT: &str = "event";
    pub const IS_STALE: &str = "is_stale";
    /// `in_process` (this instance's own dispatcher) or `remote` (a worker; with a shared
    /// registry every instance exports the same series, so rules aggregate them over instances).
    pub const ORIGIN: &str = "origin";
    pub const CACHE: &str = "cache";
    pub const OPERATION: &str = "operation";
    pub const SINK: &str = "sink";
    pub const OUTCOME: &str = "outcome";
    pub const STATUS_FAMILY: &str = "status_family";
    pub const STREAM: &str = "stream";
    pub const GROUP: &str = "group";
    pub const REASON: &str = "reason";
    pub const FILE_KIND: &str = "file_kind";
    pub const SIGNAL: &str = "signal";
    pub const CARRIER: &str = "carrier";
    pub const PROTECTION: &str = "protection";
}

/// Latency from 10 µs to 10 s: dispatch is microseconds when handlers are local and seconds when
/// they call out, and both must be readable.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub const DISPATCH_MESSAGES: InstrumentSpec = InstrumentSpec {
    name: "dispatch_messages",
    kind: Kind::Counter,
    unit: "{message}",
    description: "Messages dispatched by the engine, by category and final status.",
    labels: &[label::CATEGORY, label::STATUS],
    buckets: &[],
};

pub const DISPATCH_DURATION: InstrumentSpec = InstrumentSpec {
    name: "dispatch_duration",
    kind: Kind::Histogram,
    unit: "s",
    description: "Engine latency per message, from receipt to result, in seconds.",
    labels: &[label::CATEGORY, label::STATUS],
    buckets: LATENCY_BUCKETS,
};

pub const DISPATCHER_EXECUTIONS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_executions",
    kind: Kind::Counter,
    unit: "{run}",
    description: "Dispatcher runs, refusals and de-duplication skips, by dispatcher and result (success, error, timeout, rejected, denied, skipped).",
    labels: &[label::DISPATCHER_ID, label::RESULT],
    buckets: &[],
};

pub const DISPATCHER_EXECUTION_DURATION: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_execution_duration",
    kind: Kind::Histogram,
    unit: "s",
    description: "Latency of one dispatcher run (refusals and skips did not run), in seconds.",
    labels: &[label::DISPATCHER_ID],
    buckets: LATENCY_BUCKETS,
};

pub const DISPATCHER_ADAPTER_INVOCATIONS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_adapter_invocations",
    kind: Kind::Counter,
    unit: "{call}",
    description: "Command adapter calls, by adapter and command type.",
    labels: &[label::ADAPTER, label::COMMAND_TYPE],
    buckets: &[],
};

pub const DISPATCHER_POLICY_DENIALS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_policy_denials",
    kind: Kind::Counter,
    unit: "{command}",
    description: "Commands refused by a policy, by policy.",
    labels: &[label::POLICY],
    buckets: &[],
};

/// Named as the stable HTTP server convention names it, so OTLP carries
/// `http.server.request.duration`; on `/metrics` it is `http_server_request_duration_seconds`.
pub const HTTP_SERVER_REQUEST_DURATION: InstrumentSpec = InstrumentSpec {
    name: "http.server.request.duration",
    kind: Kind::Histogram,
    unit: "s",
    description: "Latency of dispatchd's own HTTP API, by route template, method and status code.",
    labels: &[
        label::HTTP_ROUTE,
        label::HTTP_REQUEST_METHOD,
        label::HTTP_RESPONSE_STATUS_CODE,
    ],
    buckets: LATENCY_BUCKETS,
};

pub const HTTP_AUTH_FAILURES: InstrumentSpec = InstrumentSpec {
    name: "http_auth_failures",
    kind: Kind::Counter,
    unit: "{request}",
    description: "Requests refused by access control, by reason (missing, invalid, forbidden).",
    labels: &[label::REASON],
    buckets: &[],
};

pub const HTTP_REQUESTS_SHED: InstrumentSpec = InstrumentSpec {
    name: "http_requests_shed",
    kind: Kind::Counter,
    unit: "{request}",
    description: "Requests refused instead of being served, by reason (in_flight: 503, over server.max_in_flight; timeout: 503, over server.request_timeout; body_too_slow: 408, a body slower than server.min_body_rate).",
    labels: &[label::REASON],
    buckets: &[],
};

pub const HTTP_CONNECTIONS_CLOSED: InstrumentSpec = InstrumentSpec {
    name: "http_connections_closed",
    kind: Kind::Counter,
    unit: "{connection}",
    description: "Connections the server closed on its own, by reason (idle: no request head within server.header_read_timeout; evicted: closed to make room for a new connection at server.max_connections, the longest idle or else one only receiving a body).",
    labels: &[label::REASON],
    buckets: &[],
};

pub const DISPATCHER_WORKER_THREADS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_worker_threads",
    kind: Kind::ObservableGauge,
    unit: "{thread}",
    description: "Worker threads of the tokio runtime.",
    labels: &[],
    buckets: &[],
};

pub const DISPATCHER_ACTIVE: InstrumentSpec = InstrumentSpec {
    // An UpDownCounter, exported as a gauge; the name keeps `_total` for compatibility with
    // existing dashboards (PRODUCT.md), and the exporter adds nothing to it.
    name: "dispatcher_active_total",
    kind: Kind::UpDownCounter,
    unit: "{dispatcher}",
    description: "Dispatchers currently running: 1 while running, 0 after stop. A gauge despite the _total, kept for existing dashboards.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_HEARTBEAT: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_heartbeat",
    kind: Kind::Counter,
    unit: "{heartbeat}",
    description: "Heartbeats received, from in-process lifecycle tasks and from workers over HTTP.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_LIFECYCLE_EVENTS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_lifecycle_events",
    kind: Kind::Counter,
    unit: "{event}",
    description: "Lifecycle events by dispatcher and event (start, stop, restart, register, unregister).",
    labels: &[label::DISPATCHER_ID, label::EVENT],
    buckets: &[],
};

pub const DISPATCHER_UPTIME: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_uptime",
    kind: Kind::ObservableGauge,
    unit: "s",
    description: "Seconds since the dispatcher last started.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_HEALTH_STATUS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_health_status",
    kind: Kind::ObservableGauge,
    unit: "",
    description: "1 when the dispatcher is healthy (not stale, not stopped, failures below the limit), 0 when not.",
    labels: &[label::DISPATCHER_ID, label::IS_STALE, label::ORIGIN],
    buckets: &[],
};

pub const DISPATCHER_HEARTBEAT_AGE: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_heartbeat_age",
    kind: Kind::ObservableGauge,
    unit: "s",
    description: "Seconds since the dispatcher's last heartbeat.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_CONSECUTIVE_FAILURES: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_consecutive_failures",
    kind: Kind::ObservableGauge,
    unit: "{failure}",
    description: "Failures of the dispatcher since its last success.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

/// Whether the shared dispatcher registry (`[registry] kind = "redis"`) answered at its last
/// read; absent with a registry in memory. While it is 0 the workers' series are absent too:
/// the registry never reports a worker as stale because it could not read it.
pub const DISPATCHER_REGISTRY_UP: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_registry_up",
    kind: Kind::ObservableGauge,
    unit: "",
    description: "1 when the shared dispatcher registry answered at its last read, 0 when it could not be reached.",
    labels: &[],
    buckets: &[],
};

/// Waits are usually zero (a token was free) or a fraction of a second; `0` is its own bucket so
/// "calls that waited at all" is a query.
pub const DELAY_BUCKETS: &[f64] = &[
    0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub const DISPATCHER_CIRCUIT_BREAKER_STATE: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_circuit_breaker_state",
    kind: Kind::Gauge,
    unit: "",
    description: "Circuit breaker state: 0 closed, 0.5 half-open, 1 open.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_CIRCUIT_BREAKER_TRIPS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_circuit_breaker_trips",
    kind: Kind::Counter,
    unit: "{trip}",
    description: "Times the circuit breaker opened.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_RATE_LIMITER_DELAY: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_rate_limiter_delay",
    kind: Kind::Histogram,
    unit: "s",
    description: "Wait the rate limiter applied before a call, in seconds (0 when a token was free).",
    labels: &[label::DISPATCHER_ID],
    buckets: DELAY_BUCKETS,
};

pub const DISPATCHER_RETRIES: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_retries",
    kind: Kind::Counter,
    unit: "{retry}",
    description: "Retries of a dispatcher's calls after transient errors or timeouts.",
    labels: &[label::DISPATCHER_ID],
    buckets: &[],
};

pub const DISPATCHER_CLUSTER_FALLBACKS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_cluster_fallbacks",
    kind: Kind::Counter,
    unit: "{call}",
    description: "Calls a cluster-scoped protection decided on this instance alone because Redis did not answer in time (dedup ran the call, the rate limiter used the instance's own bucket).",
    labels: &[label::DISPATCHER_ID, label::PROTECTION],
    buckets: &[],
};

pub const DISPATCHER_CACHE_OPERATIONS: InstrumentSpec = InstrumentSpec {
    name: "dispatcher_cache_operations",
    kind: Kind::Counter,
    unit: "{operation}",
    description: "Cache activity by cache, operation (get, set, invalidate, expire) and result (hit, miss, none).",
    labels: &[label::CACHE, label::OPERATION, label::RESULT],
    buckets: &[],
};

pub const DISPATCHER_CACHE_HIT_RATIO: InstrumentSpec = InstrumentSpec {
    // Unit left empty on purpose: unit "1" would make the exporter append `_ratio` again.
    name: "dispatcher_cache_hit_ratio",
    kind: Kind::Gauge,
    unit: "",
    description: "Cache hits divided by gets, since start.",
    labels: &[label::CACHE],
    buckets: &[],
};

/// Backend calls take from milliseconds to the HTTP timeout.
pub const SINK_REQUEST_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 4.0, 8.0, 16.0];

/// Batches hold 1 to `batch_size` events (default 100, at most 10,000).
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0,
];

pub const SINK_EVENTS: InstrumentSpec = InstrumentSpec {
    name: "sink_events",
    kind: Kind::Counter,
    unit: "{event}",
    description: "Dispatch events in the pipeline, by sink and outcome (received, sent, retried, dropped, dead_lettered).",
    labels: &[label::SINK, label::OUTCOME],
    buckets: &[],
};

pub const SINK_BATCH_SIZE: InstrumentSpec = InstrumentSpec {
    name: "sink_batch_size",
    kind: Kind::Histogram,
    unit: "{event}",
    description: "Events per batch handed to a sink.",
    labels: &[label::SINK],
    buckets: BATCH_SIZE_BUCKETS,
};

pub const SINK_REQUEST_DURATION: InstrumentSpec = InstrumentSpec {
    name: "sink_request_duration",
    kind: Kind::Histogram,
    unit: "s",
    description: "Latency of one call to a sink's backend, by status family (2xx, 4xx, 5xx, error).",
    labels: &[label::SINK, label::STATUS_FAMILY],
    buckets: SINK_REQUEST_BUCKETS,
};

pub const SINK_QUEUE_DEPTH: InstrumentSpec = InstrumentSpec {
    name: "sink_queue_depth",
    kind: Kind::Gauge,
    unit: "{event}",
    description: "Events waiting for a sink: queued plus in the batch being built.",
    labels: &[label::SINK],
    buckets: &[],
};

pub const BUS_PENDING_ENTRIES: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_pending_entries",
    kind: Kind::ObservableGauge,
    unit: "{entry}",
    description: "Entries of a Redis stream delivered to a consumer group but not yet acknowledged (read every second; absent while unknown).",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_CONSUMER_LAG: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_consumer_lag",
    kind: Kind::ObservableGauge,
    unit: "{entry}",
    description: "Entries of a Redis stream not yet delivered to a consumer group (read every second; absent while unknown).",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_UNDELIVERED_AGE: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_oldest_undelivered_age",
    kind: Kind::ObservableGauge,
    unit: "s",
    description: "How long the oldest entry of a Redis stream not yet delivered to a consumer group has waited, on Redis' clock; 0 when none waits (read every second; absent while unknown).",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_RECONNECTS: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_reconnects",
    kind: Kind::Counter,
    unit: "{reconnect}",
    description: "Times a Redis stream consumer got answers again after Redis was unreachable.",
    labels: &[label::STREAM],
    buckets: &[],
};

pub const BUS_EVENTS: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_events",
    kind: Kind::Counter,
    unit: "{event}",
    description: "Dispatch events this process published on a Redis stream, by outcome (published; dead_lettered when Redis could not take them; dropped when the dead-letter file could not either).",
    labels: &[label::STREAM, label::OUTCOME],
    buckets: &[],
};

pub const BUS_READ_ERRORS: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_read_errors",
    kind: Kind::Counter,
    unit: "{read}",
    description: "Reads of a Redis stream by a consumer group that failed (Redis unreachable, or refusing); the consumer backs off and retries.",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_GROUP_RECREATED: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_group_recreated",
    kind: Kind::Counter,
    unit: "{recreation}",
    description: "Times a consumer found its Redis consumer group gone (NOGROUP: Redis lost its data, or the group or stream was deleted) and created it again; events may have been lost.",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_UNREADABLE: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_unreadable_entries",
    kind: Kind::Counter,
    unit: "{entry}",
    description: "Entries of a Redis stream that a consumer group could not read as what it consumes (a sink: a dispatch event; a source: a message), kept rather than processed: in the sink's dead-letter file, or in the stream <stream>:unreadable.",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_ACK_ERRORS: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_ack_errors",
    kind: Kind::Counter,
    unit: "{acknowledgement}",
    description: "Acknowledgements (XACK) of a Redis stream by a consumer group that failed (Redis unreachable, or refusing); each is tried again.",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const BUS_ABANDONED: InstrumentSpec = InstrumentSpec {
    name: "bus_redis_abandoned_entries",
    kind: Kind::Counter,
    unit: "{entry}",
    description: "Entries of a Redis stream a consumer group took and left unacknowledged (Redis refused the acknowledgement 50 times, or the consumer stopped before it could acknowledge them): they stay pending and are delivered again, and the work of those already settled is done twice.",
    labels: &[label::STREAM, label::GROUP],
    buckets: &[],
};

pub const OTLP_EXPORTS_FAILED: InstrumentSpec = InstrumentSpec {
    name: "otlp_exports_failed",
    kind: Kind::ObservableCounter,
    unit: "{request}",
    description: "OTLP export requests that failed after the exporter's retries (collector unreachable, refusing or too slow), by signal (traces, metrics); their data is lost.",
    labels: &[label::SIGNAL],
    buckets: &[],
};

pub const TRACE_SPANS_DROPPED: InstrumentSpec = InstrumentSpec {
    name: "trace_spans_dropped",
    kind: Kind::ObservableCounter,
    unit: "{span}",
    description: "Trace spans dropped because the OTLP export queue was full (a slow or absent collector).",
    labels: &[],
    buckets: &[],
};

pub const TRACE_CONTEXT_INVALID: InstrumentSpec = InstrumentSpec {
    name: "trace_context_invalid",
    kind: Kind::ObservableCounter,
    unit: "{context}",
    description: "Incoming traceparent values that were present but invalid (malformed, or sent more than once), by carrier (http: the request's header; envelope: the message's headers); each such dispatch started a new trace instead of continuing the caller's.",
    labels: &[label::CARRIER],
    buckets: &[],
};

/// Not an OpenTelemetry instrument: computed at scrape time from what the exporter gathered
/// (see [`super::Telemetry::render`]). Declared here so the catalog is the one list of names.
pub const METRIC_CARDINALITY_OVERFLOW: InstrumentSpec = InstrumentSpec {
    name: "metric_cardinality_overflow",
    kind: Kind::ObservableGauge,
    unit: "",
    description: "1 for each metric that passed its cardinality limit: new label sets of it are folded into one otel_metric_overflow=\"true\" series and lost.",
    labels: &[label::METRIC],
    buckets: &[],
};

pub const FILE_TORN_TAILS: InstrumentSpec = InstrumentSpec {
    name: "file_torn_tails",
    kind: Kind::Counter,
    unit: "{tail}",
    description: "Torn last lines (a crash or a failed write mid-line) moved aside to <file>.torn when an appended file was opened, by file kind (messages, sink_events, sink_dead_letters, bus_dead_letters).",
    labels: &[label::FILE_KIND],
    buckets: &[],
};

pub const FILE_SLOW_WRITES: InstrumentSpec = InstrumentSpec {
    name: "file_slow_writes",
    kind: Kind::Counter,
    unit: "{write}",
    description: "Appends written in place that took longer than 1 ms waiting on the file, by file kind (a slow or saturated disk; not a CPU taken away); one over 10 ms, or two within a second, send that file's writes to the blocking pool for 10 s.",
    labels: &[label::FILE_KIND],
    buckets: &[],
};

/// Every instrument, in the order of PRODUCT.md's table.
pub const ALL: &[InstrumentSpec] = &[
    DISPATCHER_ACTIVE,
    DISPATCHER_HEARTBEAT,
    DISPATCHER_LIFECYCLE_EVENTS,
    DISPATCHER_UPTIME,
    DISPATCHER_HEALTH_STATUS,
    DISPATCHER_HEARTBEAT_AGE,
    DISPATCHER_CONSECUTIVE_FAILURES,
    DISPATCHER_REGISTRY_UP,
    DISPATCH_MESSAGES,
    DISPATCH_DURATION,
    DISPATCHER_EXECUTIONS,
    DISPATCHER_EXECUTION_DURATION,
    DISPATCHER_ADAPTER_INVOCATIONS,
    DISPATCHER_POLICY_DENIALS,
    DISPATCHER_CIRCUIT_BREAKER_STATE,
    DISPATCHER_CIRCUIT_BREAKER_TRIPS,
    DISPATCHER_RATE_LIMITER_DELAY,
    DISPATCHER_RETRIES,
    DISPATCHER_CACHE_OPERATIONS,
    DISPATCHER_CACHE_HIT_RATIO,
    SINK_EVENTS,
    SINK_BATCH_SIZE,
    SINK_REQUEST_DURATION,
    SINK_QUEUE_DEPTH,
    BUS_PENDING_ENTRIES,
    BUS_CONSUMER_LAG,
    BUS_UNDELIVERED_AGE,
    BUS_RECONNECTS,
    BUS_EVENTS,
    BUS_READ_ERRORS,
    BUS_GROUP_RECREATED,
    BUS_UNREADABLE,
    BUS_ACK_ERRORS,
    BUS_ABANDONED,
    HTTP_SERVER_REQUEST_DURATION,
    HTTP_AUTH_FAILURES,
    HTTP_REQUESTS_SHED,
    HTTP_CONNECTIONS_CLOSED,
    DISPATCHER_WORKER_THREADS,
    TRACE_SPANS_DROPPED,
    TRACE_CONTEXT_INVALID,
    OTLP_EXPORTS_FAILED,
    METRIC_CARDINALITY_OVERFLOW,
    FILE_TORN_TAILS,
    DISPATCHER_CLUSTER_FALLBACKS,
    FILE_SLOW_WRITES,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_match_the_contract() {
        let names: Vec<String> = ALL.iter().map(|spec| spec.exported_name("")).collect();
        assert_eq!(
            names,
            [
                "dispatcher_active_total",
                "dispatcher_heartbeat_total",
                "dispatcher_lifecycle_events_total",
                "dispatcher_uptime_seconds",
                "dispatcher_health_status",
                "dispatcher_heartbeat_age_seconds",
                "dispatcher_consecutive_failures",
                "dispatcher_registry_up",
                "dispatch_messages_total",
                "dispatch_duration_seconds",
                "dispatcher_executions_total",
                "dispatcher_execution_duration_seconds",
                "dispatcher_adapter_invocations_total",
                "dispatcher_policy_denials_total",
                "dispatcher_circuit_breaker_state",
                "dispatcher_circuit_breaker_trips_total",
                "dispatcher_rate_limiter_delay_seconds",
                "dispatcher_retries_total",
                "dispatcher_cache_operations_total",
                "dispatcher_cache_hit_ratio",
                "sink_events_total",
                "sink_batch_size",
                "sink_request_duration_seconds",
                "sink_queue_depth",
                "bus_redis_pending_entries",
                "bus_redis_consumer_lag",
                "bus_redis_oldest_undelivered_age_seconds",
                "bus_redis_reconnects_total",
                "bus_redis_events_total",
                "bus_redis_read_errors_total",
                "bus_redis_group_recreated_total",
                "bus_redis_unreadable_entries_total",
                "bus_redis_ack_errors_total",
                "bus_redis_abandoned_entries_total",
                "http_server_request_duration_seconds",
                "http_auth_failures_total",
                "http_requests_shed_total",
                "http_connections_closed_total",
                "dispatcher_worker_threads",
                "trace_spans_dropped_total",
                "trace_context_invalid_total",
                "otlp_exports_failed_total",
                "metric_cardinality_overflow",
                "file_torn_tails_total",
                "dispatcher_cluster_fallbacks_total",
                "file_slow_writes_total",
            ]
        );
        assert_eq!(
            DISPATCH_MESSAGES.exported_name("ns"),
            "ns_dispatch_messages_total"
        );
    }

    #[test]
    fn instrument_names_carry_no_suffix_the_exporter_adds() {
        for spec in ALL {
            // The one exception is the contract's own: a gauge named _total.
            if spec.kind != Kind::UpDownCounter {
                assert!(!spec.name.ends_with("_total"), "{}", spec.name);
            }
            assert!(!spec.name.ends_with("_seconds"), "{}", spec.name);
            assert!(
                spec.kind != Kind::Histogram || !spec.buckets.is_empty(),
                "{}",
                spec.name
            );
            assert!(
                spec.buckets.windows(2).all(|w| w[0] < w[1]),
                "{}",
                spec.name
            );
        }
    }
}
