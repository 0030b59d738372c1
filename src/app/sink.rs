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
use crate::config::{Config, RedisBusConfig, SinkSettings};
use crate::sinks::{DriverConfig, Sink, SinkDriver, SinkObserver};
use crate::telemetry::Telemetry;

/// What `dispatchd sink` was asked to run (its command line, parsed). What is `None` is what
/// a `[[sinks]]` element and the Redis bus of `serve` get: the embedded `[defaults.sinks]` and
/// `[bus]` values.
#[derive(Debug, Clone)]
pub struct SinkServiceConfig {
    /// The sink plugin: `file`, `http`, `lunary` or `helicone`.
    pub service: String,
    pub endpoint: Option<String>,
    pub api_key: Option<String>,
    /// The sink's name (the `sink` label); default the service.
    pub name: Option<String>,
    /// Default `[defaults.sinks] buffer`.
    pub buffer: Option<usize>,
    /// Default `[defaults.sinks] batch_size`.
    pub batch_size: Option<usize>,
    /// Default `[defaults.sinks] flush_interval`.
    pub flush_interval: Option<Duration>,
    /// The Redis to read from; required unless replaying.
    pub bus: Option<String>,
    /// Default `[bus] events_stream`.
    pub stream: Option<String>,
    /// Default `dispatchd-sink-<name>`.
    pub group: Option<String>,
    /// Default the host name and the bound port.
    pub consumer: Option<String>,
    /// Default `[bus] claim_idle`.
    pub claim_idle: Option<Duration>,
    /// Default `[bus] consumer_retention`.
    pub consumer_retention: Option<Duration>,
    /// Default `[bus] trim_every`.
    pub trim_every: Option<Duration>,
    /// Default `./dispatchd-data/<name>.dead-letters.jsonl`.
    pub dead_letter: Option<PathBuf>,
    /// Send this dead-letter file's events again, then stop.
    pub replay_dead_letters: Option<PathBuf>,
    /// Where `/metrics` and `/health` are served.
    pub listen: SocketAddr,
    /// Prefixes every metric name (`DISPATCHD_METRICS_NAMESPACE`).
    pub metrics_namespace: String,
    /// A config file's `[[sinks]]` element and `[bus]` (`dispatchd sink --config`): the sink's
    /// settings (headers, timeout, retries, …) and the bus's come from there instead of the
    /// embedded defaults; the flags given still win.
    pub from_file: Option<FromFile>,
}

/// What `dispatchd sink --config FILE` takes from the file.
#[derive(Debug, Clone)]
pub struct FromFile {
    pub sink: SinkSettings,
    pub bus: crate::config::BusConfig,
}

impl FromFile {
    /// The `[[sinks]]` element named `name`, or the only one; an error names the file's sinks.
    pub fn select(config: &Config, name: Option<&str>) -> anyhow::Result<FromFile> {
        let names: Vec<&str> = config.sinks.iter().map(|s| s.sink.name.as_str()).collect();
        let sink = match name {
            Some(name) => config.sinks.iter().find(|s| s.sink.name == name),
            None if config.sinks.len() == 1 => config.sinks.first(),
            None => anyhow::bail!(
                "the configuration has {} [[sinks]] ({}): choose one with --name",
                names.len(),
                names.join(", ")
            ),
        };
        let Some(sink) = sink else {
            anyhow::bail!(
                "the configuration has no [[sinks]] named `{}` (it has: {})",
                name.unwrap_or_default(),
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            );
        };
        Ok(FromFile {
            sink: sink.clone(),
            bus: config.bus.clone(),
        })
    }
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
    name: String,
    /// Host name and bound port: the default consumer name and `service.instance.id`.
    instance_id: String,
    telemetry: Telemetry,
    files: Files,
    sink: Box<dyn Sink>,
    driver: DriverConfig,
    /// Where the events are read, and how; `None` when a dead-letter file is replayed.
    source: Option<(String, ConsumerConfig)>,
    replay_dead_letters: Option<PathBuf>,
    limits: crate::http::ConnectionLimits,
    /// `None` when replaying: a replay serves nothing, so it holds no port and can run beside
    /// the `dispatchd sink` that wrote the file.
    listener: Option<TcpListener>,
}

impl SinkService {
    /// Validates, builds the telemetry and the sink, and binds the listener.
    pub async fn build(config: SinkServiceConfig) -> anyhow::Result<SinkService> {
        anyhow::ensure!(
            config.replay_dead_letters.is_some()
                || config.bus.is_some()
                || config
                    .from_file
                    .as_ref()
                    .is_some_and(|f| f.bus.redis.is_some()),
            "--bus (or DISPATCHD_REDIS_URL, or a [bus] with kind = \"redis\" in --config) is required to read events"
        );
        let name = config
            .name
            .clone()
            .or_else(|| config.from_file.as_ref().map(|f| f.sink.sink.name.clone()))
            .unwrap_or_else(|| config.service.clone());
        let settings = settings(&config, &name)?;
        let embedded = Config::embedded().context("the embedded defaults")?;
        // Bound first: the instance id is the host name and the bound port, so two sink
        // processes on one host never share a consumer or a `service.instance.id`. A replay
        // binds nothing.
        let (listener, instance_id) = if config.replay_dead_letters.is_some() {
            (None, format!("{}:replay", crate::config::host_name()))
        } else {
            let listener = TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let port = listener.local_addr()?.port();
            (
                Some(listener),
                format!("{}:{port}", crate::config::host_name()),
            )
        };
        let file_bus = config.from_file.as_ref().map(|f| &f.bus);
        let bus_url = config.bus.clone().or_else(|| {
            file_bus
                .and_then(|bus| bus.redis.as_ref())
                .map(|redis| redis.url.clone())
        });
        let source = match &bus_url {
            None => None,
            Some(url) => {
                let redis = match file_bus.and_then(|bus| bus.redis.clone()) {
                    Some(redis) => redis,
                    None => RedisBusConfig::embedded(url.clone()).context("the embedded [bus]")?,
                };
                let consumer = ConsumerConfig {
                    stream: config.stream.clone().unwrap_or_else(|| {
                        file_bus.map_or_else(
                            || embedded.bus.events_stream.clone(),
                            |bus| bus.events_stream.clone(),
                        )
                    }),
                    group: config
                        .group
                        .clone()
                        .unwrap_or_else(|| format!("dispatchd-sink-{name}")),
                    consumer: config
                        .consumer
                        .clone()
                        .unwrap_or_else(|| instance_id.clone()),
                    count: settings.driver.batch_size,
                    block: Duration::from_secs(1),
                    claim_idle: config.claim_idle.unwrap_or(redis.claim_idle),
                    retention: config
                        .consumer_retention
                        .unwrap_or(redis.consumer_retention),
                    trim_every: Some(config.trim_every.unwrap_or(redis.trim_every)),
                };
                Some((url.clone(), consumer))
            }
        };
        let telemetry = Telemetry::for_instance(
            &crate::config::MetricsConfig {
                enabled: true,
                namespace: config.metrics_namespace.clone(),
                ..embedded.metrics
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
        let sink = crate::sinks::build_with(&settings.sink, &files).map_err(anyhow::Error::msg)?;
        Ok(SinkService {
            name,
            instance_id,
            telemetry,
            files,
            sink,
            driver: settings.driver,
            source,
            replay_dead_letters: config.replay_dead_letters,
            // serve's limits, but fewer connections: a slow client cannot hold this port.
            limits: crate::http::ConnectionLimits {
                max_connections: 256,
                max_header_bytes: embedded.server.max_header_bytes,
                header_read_timeout: embedded.server.header_read_timeout,
            },
            listener,
        })
    }

    /// The address `/metrics` and `/health` are served on (port 0 resolved); an error when
    /// replaying, which serves nothing.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(listener) => listener.local_addr(),
            None => Err(std::io::Error::other(
                "a replay of dead letters serves nothing",
            )),
        }
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
            name,
            instance_id,
            telemetry,
            files: _,
            sink,
            driver,
            source,
            replay_dead_letters,
            limits,
            listener,
        } = self;
        let stop_server = shutdown.child_token();
        let server = match listener {
            Some(listener) => {
                tracing::info!(listen = %listener.local_addr()?, instance_id = %instance_id, sink = %name, "dispatchd sink is serving /metrics and /health.");
                Some(tokio::spawn(crate::http::serve(
                    listener,
                    crate::http::metrics_router(telemetry.clone()),
                    limits,
                    telemetry.http_metrics(),
                    stop_server.clone(),
                )))
            }
            None => None,
        };
        let observer = telemetry
            .sink_metrics()
            .map(|m| Arc::new(m) as Arc<dyn SinkObserver>);

        let outcome = match (replay_dead_letters, source) {
            (Some(file), _) => replay(&file, sink, driver, observer).await.map(Some),
            (None, None) => Err(anyhow::anyhow!(
                "--bus (or DISPATCHD_REDIS_URL) is required to read events"
            )),
            (None, Some((url, consumer))) => {
                let bus_observer = telemetry.bus_metrics().map(|m| m as Arc<dyn BusObserver>);
                crate::sinks::service::run_from_redis(
                    url,
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
        if let Some(server) = server {
            let _ = server.await;
        }
        telemetry.shutdown();
        outcome
    }
}

/// The sink's settings: the config file's `[[sinks]]` element, else the embedded
/// `[defaults.sinks]`, and the flags over them.
fn settings(config: &SinkServiceConfig, name: &str) -> anyhow::Result<SinkSettings> {
    let mut settings = match &config.from_file {
        Some(file) => {
            anyhow::ensure!(
                file.sink.sink.service == config.service,
                "--service {} is not the service of [[sinks]] `{}` ({}); leave --service out to use the file's",
                config.service,
                file.sink.sink.name,
                file.sink.sink.service
            );
            let mut settings = file.sink.clone();
            settings.sink.name = name.to_owned();
            settings
        }
        None => SinkSettings::embedded(name, &config.service)
            .context("the embedded [defaults.sinks]")?,
    };
    if let Some(endpoint) = &config.endpoint {
        settings.sink.endpoint = Some(endpoint.clone());
    }
    if let Some(api_key) = &config.api_key {
        settings.sink.api_key = Some(api_key.clone());
    }
    let driver = &mut settings.driver;
    if let Some(batch_size) = config.batch_size {
        anyhow::ensure!(
            (1..=10_000).contains(&batch_size),
            "--batch-size must be between 1 and 10000"
        );
        driver.batch_size = batch_size;
    }
    if let Some(buffer) = config.buffer {
        anyhow::ensure!(buffer >= 1, "--buffer must be at least 1");
        driver.buffer = buffer;
    }
    if let Some(flush_interval) = config.flush_interval {
        driver.flush_interval = flush_interval;
    }
    if let Some(dead_letter) = &config.dead_letter {
        driver.dead_letter = dead_letter.clone();
    }
    Ok(settings)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> SinkServiceConfig {
        SinkServiceConfig {
            service: "file".into(),
            endpoint: Some("out.jsonl".into()),
            api_key: None,
            name: None,
            buffer: None,
            batch_size: None,
            flush_interval: None,
            bus: None,
            stream: None,
            group: None,
            consumer: None,
            claim_idle: None,
            consumer_retention: None,
            trim_every: None,
            dead_letter: None,
            replay_dead_letters: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_namespace: String::new(),
            from_file: None,
        }
    }

    /// With a config file's element, everything of it is taken (headers, timeout, retries…),
    /// the flags given win, and a --service that is not the element's is refused.
    #[test]
    fn a_config_files_sink_is_taken_whole_and_the_flags_given_win() {
        let mut file = SinkSettings::embedded("hook", "http").unwrap();
        file.sink.endpoint = Some("http://127.0.0.1:9/events".into());
        file.sink.headers.insert("x-tenant".into(), "acme".into());
        file.sink.timeout = Duration::from_secs(3);
        file.driver.retry.attempts = 0;
        let config = SinkServiceConfig {
            service: "http".into(),
            endpoint: None,
            from_file: Some(FromFile {
                sink: file.clone(),
                bus: Config::embedded().unwrap().bus,
            }),
            ..flags()
        };
        assert_eq!(settings(&config, "hook").unwrap(), file);

        let given = settings(
            &SinkServiceConfig {
                endpoint: Some("http://127.0.0.1:9/other".into()),
                batch_size: Some(7),
                ..config.clone()
            },
            "hook",
        )
        .unwrap();
        assert_eq!(
            given.sink.endpoint.as_deref(),
            Some("http://127.0.0.1:9/other")
        );
        assert_eq!(given.driver.batch_size, 7);
        assert_eq!(
            (&given.sink.headers, given.sink.timeout, &given.driver.retry),
            (&file.sink.headers, file.sink.timeout, &file.driver.retry)
        );

        let error = settings(
            &SinkServiceConfig {
                service: "file".into(),
                ..config
            },
            "hook",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "--service file is not the service of [[sinks]] `hook` (http); leave --service out to use the file's"
        );
    }

    /// The flags left out take what a `[[sinks]]` element gets from the embedded defaults; the
    /// flags given win, and are checked.
    #[test]
    fn flags_left_out_take_the_embedded_sink_defaults() {
        let mut expected = SinkSettings::embedded("file", "file").unwrap();
        expected.sink.endpoint = Some("out.jsonl".into());
        assert_eq!(settings(&flags(), "file").unwrap(), expected);

        let given = settings(
            &SinkServiceConfig {
                batch_size: Some(7),
                buffer: Some(9),
                flush_interval: Some(Duration::from_millis(250)),
                dead_letter: Some("dead.jsonl".into()),
                ..flags()
            },
            "file",
        )
        .unwrap();
        assert_eq!(
            (
                given.driver.batch_size,
                given.driver.buffer,
                given.driver.flush_interval,
                given.driver.dead_letter.as_path()
            ),
            (
                7,
                9,
                Duration::from_millis(250),
                std::path::Path::new("dead.jsonl")
            )
        );
        assert_eq!(given.driver.retry, expected.driver.retry);

        let error = settings(
            &SinkServiceConfig {
                buffer: Some(0),
                ..flags()
            },
            "file",
        )
        .unwrap_err();
        assert_eq!(error.to_string(), "--buffer must be at least 1");
    }
}
