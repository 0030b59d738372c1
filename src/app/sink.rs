//! `dispatchd sink` assembled: one sink fed from a Redis consumer group through the bus's consume
//! loop (or replaying a dead-letter file), with `/metrics` and `/health` served beside it.
//!
//! Build, then run, like [`App`](super::App): [`SinkService::build`] validates, builds the
//! telemetry, the sink and its driver configuration, and binds the listener, so everything that
//! can fail is reported before anything runs; [`SinkService::run`] serves until the shutdown
//! token fires (or the replay is done), flushes, and shuts the meter provider down. The CLI only
//! parses, prints and turns signals into the token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::appender::{FileObserver, Files};
use crate::bus::BusObserver;
use crate::bus::redis::ConsumerConfig;
use crate::sinks::{DriverConfig, FullPolicy, Sink, SinkConfig, SinkDriver, SinkObserver};
use crate::telemetry::Telemetry;

/// What `dispatchd sink` was asked to run (its command line, parsed).
#[derive(Debug, Clone)]
pub struct SinkServiceConfig {
    /// The sink plugin: `file`, `http`, `lunary` or `helicone`.
    pub service: String,
    pub endpoint: Option<String>,
    pub api_key: Option<String>,
    /// The sink's name (the `sink` label); default the service.
    pub name: Option<String>,
    pub buffer: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// The Redis to read from; required unless replaying.
    pub bus: Option<String>,
    pub stream: String,
    /// Default `dispatchd-sink-<name>`.
    pub group: Option<String>,
    /// Default the host name.
    pub consumer: Option<String>,
    pub claim_idle: Duration,
    pub consumer_retention: Duration,
    pub trim_every: Duration,
    /// Default `./dispatchd-data/<name>.dead-letters.jsonl`.
    pub dead_letter: Option<PathBuf>,
    /// Send this dead-letter file's events again, then stop.
    pub replay_dead_letters: Option<PathBuf>,
    /// Where `/metrics` and `/health` are served.
    pub listen: SocketAddr,
    /// Prefixes every metric name (`DISPATCHD_METRICS_NAMESPACE`).
    pub metrics_namespace: String,
}

/// What a replay did, for the CLI to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub count: usize,
    pub file: PathBuf,
    /// Where the file was moved before its events were sent.
    pub moved_to: PathBuf,
}

/// `dispatchd sink`, built and bound, not yet running.
pub struct SinkService {
    config: SinkServiceConfig,
    name: String,
    /// Host name and bound port: the default consumer name and `service.instance.id`.
    instance_id: String,
    telemetry: Telemetry,
    files: Files,
    sink: Box<dyn Sink>,
    driver: DriverConfig,
    listener: TcpListener,
}

impl SinkService {
    /// Validates, builds the telemetry and the sink, and binds the listener.
    pub async fn build(config: SinkServiceConfig) -> anyhow::Result<SinkService> {
        anyhow::ensure!(
            (1..=10_000).contains(&config.batch_size),
            "--batch-size must be between 1 and 10000"
        );
        anyhow::ensure!(config.buffer >= 1, "--buffer must be at least 1");
        anyhow::ensure!(
            config.replay_dead_letters.is_some() || config.bus.is_some(),
            "--bus (or DISPATCHD_REDIS_URL) is required to read events"
        );
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| config.service.clone());
        // Bound first: the instance id is the host name and the bound port, so two sink
        // processes on one host never share a consumer or a `service.instance.id`.
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let instance_id = format!(
            "{}:{}",
            crate::config::host_name(),
            listener.local_addr()?.port()
        );
        let telemetry = Telemetry::for_instance(
            &crate::config::MetricsConfig {
                enabled: true,
                namespace: config.metrics_namespace.clone(),
                cardinality_limit: 2000,
            },
            None,
            &instance_id,
        );
        // The files this service appends to (the file sink's, the dead letters) follow SIGHUP, and
        // their repairs are counted.
        let files = Files::new(
            telemetry
                .file_metrics()
                .map(|m| Arc::new(m) as Arc<dyn FileObserver>),
        );
        let sink = crate::sinks::build_with(
            &SinkConfig {
                name: name.clone(),
                service: config.service.clone(),
                endpoint: config.endpoint.clone(),
                api_key: config.api_key.clone(),
                headers: Default::default(),
                timeout: Duration::from_secs(10),
                fsync: false,
            },
            &files,
        )
        .map_err(anyhow::Error::msg)?;
        let driver = DriverConfig {
            batch_size: config.batch_size,
            flush_interval: config.flush_interval,
            buffer: config.buffer,
            full: FullPolicy::Block,
            retry: crate::resilience::RetryPolicy {
                attempts: 5,
                initial_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(30),
            },
            shutdown_deadline: Duration::from_secs(10),
            send_timeout: Duration::from_secs(11),
            dead_letter: config.dead_letter.clone().unwrap_or_else(|| {
                PathBuf::from(format!("./dispatchd-data/{name}.dead-letters.jsonl"))
            }),
        };
        Ok(SinkService {
            config,
            name,
            instance_id,
            telemetry,
            files,
            sink,
            driver,
            listener,
        })
    }

    /// The address `/metrics` and `/health` are served on (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The appended files, for the caller to reopen on SIGHUP.
    pub fn files(&self) -> Files {
        self.files.clone()
    }

    /// Serves `/metrics` and `/health` and runs the sink until `shutdown` (reading the stream),
    /// or until the dead-letter file was sent again (replaying); then flushes and shuts the
    /// meter provider down.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<Option<Replayed>> {
        let SinkService {
            config,
            name,
            instance_id,
            telemetry,
            files: _,
            sink,
            driver,
            listener,
        } = self;
        tracing::info!(listen = %listener.local_addr()?, instance_id = %instance_id, sink = %name, "dispatchd sink is serving /metrics and /health.");
        // The same connection limits as serve's defaults: a slow client cannot hold this port.
        let stop_server = shutdown.child_token();
        let server = tokio::spawn(crate::http::serve(
            listener,
            crate::http::metrics_router(telemetry.clone()),
            crate::http::ConnectionLimits {
                max_connections: 256,
                max_header_bytes: 16 * 1024,
                header_read_timeout: Duration::from_secs(10),
            },
            telemetry.http_metrics(),
            stop_server.clone(),
        ));
        let observer = telemetry
            .sink_metrics()
            .map(|m| Arc::new(m) as Arc<dyn SinkObserver>);

        let outcome = match (&config.replay_dead_letters, &config.bus) {
            (Some(file), _) => replay(file, sink, driver, observer).await.map(Some),
            (None, None) => Err(anyhow::anyhow!(
                "--bus (or DISPATCHD_REDIS_URL) is required to read events"
            )),
            (None, Some(url)) => {
                let consumer = ConsumerConfig {
                    stream: config.stream.clone(),
                    group: config
                        .group
                        .clone()
                        .unwrap_or_else(|| format!("dispatchd-sink-{name}")),
                    consumer: config
                        .consumer
                        .clone()
                        .unwrap_or_else(|| instance_id.clone()),
                    count: config.batch_size,
                    block: Duration::from_secs(1),
                    claim_idle: config.claim_idle,
                    retention: config.consumer_retention,
                    trim_every: Some(config.trim_every),
                };
                let bus_observer = telemetry.bus_metrics().map(|m| m as Arc<dyn BusObserver>);
                crate::sinks::service::run_from_redis(
                    url.clone(),
                    consumer,
                    sink,
                    driver,
                    observer,
                    bus_observer,
                    shutdown.clone(),
                )
                .await
                .context("reading the stream")
                .map(|()| None)
            }
        };
        stop_server.cancel();
        let _ = server.await;
        telemetry.shutdown();
        outcome
    }
}

/// Sends the events of a dead-letter file again through the sink's driver. The file is moved
/// aside first: events that fail again are appended to the dead-letter file, which may be this
/// one (and which a running `dispatchd sink` may be appending to).
async fn replay(
    file: &std::path::Path,
    sink: Box<dyn Sink>,
    driver: DriverConfig,
    observer: Option<Arc<dyn SinkObserver>>,
) -> anyhow::Result<Replayed> {
    let path = file.to_owned();
    let (events, moved_to) =
        tokio::task::spawn_blocking(move || crate::sinks::dead_letter::take(&path, "replayed"))
            .await?
            .map_err(anyhow::Error::msg)?;
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let handle = SinkDriver::spawn(sink, driver, observer, &tracker, stop.clone());
    let count = events.len();
    for event in events {
        handle.offer(event).await;
    }
    drop(handle);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(Replayed {
        count,
        file: file.to_owned(),
        moved_to,
    })
}
