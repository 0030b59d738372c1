//! Integration tests: one binary, one module per capability, all through real HTTP on loopback.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

// The TestApp helper: dispatchd on port 0 with its files in a temporary directory.
mod support;
// The W3C trace context cases of tests/data/traceparent-cases.txt (also read by tests/traces.rs).
mod w3c_cases;

// POST /api/v1/messages/{topic}: statuses, JSON errors, limits.
mod ingest;
// Graceful shutdown: draining in-flight requests, the grace deadline, the final flush.
mod shutdown;
// The real binary: serve on the embedded defaults, SIGTERM, check-config.
mod binary;
// /metrics, the stats API, the golden names, docs/metrics.md, promtool and an independent parser.
mod metrics;
// /metrics in OpenMetrics 1.0: negotiation, prometheus_client's parser, exemplars = OTLP traces.
mod openmetrics;
// Dispatchers that panic, hang or fail, sink backends that misbehave, a full disk.
mod faults;
// Tokens, limits, load shedding and secrets that must never come out.
mod hardening;
// Hostile clients at the HTTP edge: silent and stalled connections, floods, slow bodies.
mod edge;
// /ready, /api/v1/dispatchers and the worker lifecycle API, on paused time.
mod health;
// `dispatchd simulate`: every protection's metrics move under the demonstration traffic.
mod simulate;
// The event pipeline: dispatch events through the driver to the sinks, and each plugin's exact
// request shape against a loopback server that plays the service.
mod pipeline;
// The engine crate depends on no I/O crate (from Cargo.lock).
mod architecture;
// Redis Streams, against a real Redis: at-least-once across a crash, reclaim, Redis restarts.
mod redis;
// The one consume loop on a real Redis: reclaim by sources, owners keeping entries, consumer
// retention, trimming what every group acknowledged.
mod consume;
// Instances on one Redis: their identities, the dispatcher registry they share, Redis gone.
mod registry;
// Dashboards and alerts against a real Prometheus scraping a real dispatchd; promtool on the rules.
mod monitoring;
// Appended files: a torn last line moved aside at start, and SIGHUP reopening them (logrotate).
mod files;
// Network dispatchers from TOML (http, redis_stream, nats) against real receivers, killed mid-run.
mod network;
// Remote workers that receive work (`kind = "worker"`), the dispatcher statistics and /api/v1/routes.
mod workers;
// dedup and rate limits with scope = "cluster": several instances on one Redis, and Redis gone.
mod scope;
// W3C trace context, strictly: every case of the W3C suite and the spec through both extractors.
mod trace_context;
// Three serve and two sink processes on one Redis as one service: kills, a restart, real Prometheus.
mod cluster;
// Packaging: completions, man pages, the systemd unit, the Kubernetes manifests (validated, and
// generated from alerts/ and dashboards/), the Dockerfile and compose file, `dispatchd health`.
mod packaging;
// simulate, loadtest and sink telling the user what happened; an address in use said once.
mod tools;
// The status page at `/` in a real headless Chromium, and `dispatchd top` under a real tmux.
mod status;
// GET /api/v1/openapi.json: the description matches the router; openapi-spec-validator and
// schemathesis against the real binary.
mod openapi;
