//! The service assembled: configuration in, a bound and running dispatchd out.
//!
//! Startup reads in order: build (telemetry first, so everything built after it is measured;
//! bind the listener; open files; register every dispatcher with the health registry; build the
//! engine; all of which can fail and is reported before anything runs) → [`App::run`] (start
//! each dispatcher's lifecycle task, serve until the shutdown token fires) → `/ready` answers 503
//! while the listener stays open for `server.drain_delay`, so load balancers stop sending → close
//! the listener and drain in-flight requests within `server.shutdown_grace` → stop the lifecycle
//! tasks (`stop`, `unregister`) →
//! stop and flush the writers → shut the meter provider down. Tests build on port 0 and cancel
//! the token to stop.

mod sink;

pub use sink::{FromFile, Replayed, SinkService, SinkServiceConfig};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::SpanKind;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::appender::{Appender, FileKind, FileObserver, Files};
use crate::bus::consume::{Acks, Consumer, Deliver};
use crate::bus::redis::{ConsumerConfig, Entry, RedisOutputs, RedisPublisher};
use crate::bus::registry::RedisWorkers;
use crate::bus::{BusObserver, EventBus, MemoryBus};
use crate::config::{Config, DispatcherKind, RegistryKind};
use crate::dispatchers::{
    HttpCommand, HttpDispatcher, JsonlFile, LogDispatcher, NatsDispatcher, RedisStreamDispatcher,
    WorkerDispatcher,
};
use crate::engine::{Dispatcher, Engine, Route};
use crate::engine::{OutputMessage, OutputPublisher};
use crate::health::{
    DispatcherStats, HealthRegistry, HealthStrategy, LifecycleObserver, Origin, Registration,
    RestartBackoff, supervise,
};
use crate::http::{self, ApiState};
use crate::instrumentation::{Composite, TracingStrategy};
use crate::propagation::Unexported;
use crate::resilience::{Observers, Protections, ResilienceConfig, ResilienceObserver, Scope};
use crate::resilience_redis::{ClusterRedis, RedisDedup, RedisRateLimit};
use crate::sinks::DispatchEvent;
use crate::sinks::service::run_from_redis;
use crate::sinks::{SinkDriver, SinkObserver};
use crate::telemetry::Telemetry;

/// How often the shared registry is read for the health gauges.
const REGISTRY_REFRESH: Duration = Duration::from_secs(1);

/// How long abandoned requests get to send their 503 before the server task is aborted.
const ABANDON_WAIT: Duration = Duration::from_secs(2);

/// Builds an [`App`] from a [`Config`], plus any dispatchers registered in code.
pub struct AppBuilder {
    config: Config,
    dispatchers: Vec<(Dispatcher, DispatcherSettings)>,
    routes: Vec<Route>,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
}

/// How one in-process dispatcher proves it is alive, and how it is protected.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatcherSettings {
    pub stale_threshold: Duration,
    pub heartbeat_interval: Duration,
    pub critical: bool,
    pub resilience: ResilienceConfig,
}

impl AppBuilder {
    /// The tracer the engine opens its spans with (from [`crate::telemetry::traces::Traces`]);
    /// used when an OTLP endpoint is configured. Without one the engine opens no span of its own
    /// (results, outputs and events still carry the caller's trace).
    pub fn tracer(mut self, tracer: opentelemetry_sdk::trace::SdkTracer) -> AppBuilder {
        self.tracer = Some(tracer);
        self
    }

    /// Registers a dispatcher written in Rust beside the configured ones, with the configured
    /// default stale threshold, a heartbeat every quarter of it, not critical, unprotected.
    pub fn dispatcher(self, dispatcher: Dispatcher) -> AppBuilder {
        let settings = self.default_settings();
        self.dispatcher_with(dispatcher, settings)
    }

    /// The settings [`AppBuilder::dispatcher`] uses, to start from.
    pub fn default_settings(&self) -> DispatcherSettings {
        let stale_threshold = self.config.health.stale_threshold;
        DispatcherSettings {
            stale_threshold,
            heartbeat_interval: stale_threshold / 4,
            critical: false,
            resilience: ResilienceConfig::default(),
        }
    }

    /// Registers a dispatcher written in Rust with its own settings. Its protections are built
    /// here, measured like the configured dispatchers'.
    pub fn dispatcher_with(
        mut self,
        dispatcher: Dispatcher,
        settings: DispatcherSettings,
    ) -> AppBuilder {
        self.dispatchers.push((dispatcher, settings));
        self
    }

    pub fn route(mut self, route: Route) -> AppBuilder {
        self.routes.push(route);
        self
    }

    /// Binds the listener, opens the dispatchers' files, registers the dispatchers and builds
    /// the engine.
    pub async fn build(self) -> anyhow::Result<App> {
        let config = self.config;
        // Bound first: the default instance id names the port actually bound.
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let local_addr = listener
            .local_addr()
            .context("the listener has no address")?;
        let instance_id = config.server.instance_id(local_addr.port());
        let otlp = match (&config.tracing.otlp_endpoint, config.tracing.otlp_metrics) {
            (Some(endpoint), true) => {
                Some((endpoint.as_str(), config.tracing.otlp_metrics_interval))
            }
            _ => None,
        };
        let telemetry = Telemetry::for_instance(&config.metrics, otlp, &instance_id);

        // Build, then run: what build spawns (file writers, sink drivers) is cancelled when the
        // App is dropped, so a build that fails after them leaves nothing behind; the Redis
        // consumers are only started by `run`.
        let writers = TaskTracker::new();
        let stop_writers = CancellationToken::new();
        let mut background = vec![stop_writers.clone().drop_guard()];
        // Every file the service appends to shares the reopen signal (SIGHUP) and the repair count.
        let files = Files::new(
            telemetry
                .file_metrics()
                .map(|metrics| Arc::new(metrics) as Arc<dyn FileObserver>),
        );

        // The event pipeline: one driver per configured sink, fed by the in-memory bus, or each
        // reading the Redis events stream through its own consumer group.
        let sinks = TaskTracker::new();
        let stop_sinks = CancellationToken::new();
        background.push(stop_sinks.clone().drop_guard());
        let mut consumers: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
        let sink_observer = telemetry
            .sink_metrics()
            .map(|metrics| Arc::new(metrics) as Arc<dyn SinkObserver>);
        let (bus, outputs): (Arc<dyn EventBus>, Option<Arc<dyn OutputPublisher>>) = match &config
            .bus
            .redis
        {
            None => {
                let mut handles = Vec::new();
                for settings in &config.sinks {
                    let sink = crate::sinks::build_with(&settings.sink, &files)
                        .map_err(anyhow::Error::msg)?;
                    handles.push(SinkDriver::spawn(
                        sink,
                        settings.driver.clone(),
                        sink_observer.clone(),
                        &sinks,
                        stop_sinks.clone(),
                    ));
                }
                (Arc::new(MemoryBus::new(handles)), None)
            }
            Some(redis) => {
                let stream = config.bus.events_stream.as_str();
                let bus_observer = telemetry.bus_metrics().map(|m| m as Arc<dyn BusObserver>);
                let publisher = RedisPublisher::connect(&redis.url, stream, redis.max_len)
                    .await
                    .with_context(|| format!("cannot connect to Redis at {}", redis.url))?
                    .with_dead_letter(
                        Appender::open(
                            &redis.dead_letter,
                            FileKind::BusDeadLetters,
                            true,
                            &files,
                            &writers,
                            stop_writers.clone(),
                        )
                        .await
                        .with_context(|| format!("cannot open {}", redis.dead_letter.display()))?,
                    )
                    .with_observer(bus_observer.clone());
                let consumer = redis
                    .consumer
                    .clone()
                    .unwrap_or_else(|| instance_id.clone());
                for settings in &config.sinks {
                    let sink = crate::sinks::build_with(&settings.sink, &files)
                        .map_err(anyhow::Error::msg)?;
                    let group = ConsumerConfig {
                        stream: stream.to_owned(),
                        group: format!("dispatchd-sink-{}", settings.sink.name),
                        consumer: consumer.clone(),
                        count: settings.driver.batch_size,
                        block: Duration::from_secs(1),
                        claim_idle: redis.claim_idle,
                        retention: redis.consumer_retention,
                        trim_every: Some(redis.trim_every),
                    };
                    let url = redis.url.clone();
                    let (driver, observer, bus_observer) = (
                        settings.driver.clone(),
                        sink_observer.clone(),
                        bus_observer.clone(),
                    );
                    let stop = stop_sinks.clone();
                    consumers.push(Box::pin(async move {
                        let run =
                            run_from_redis(url, group, sink, driver, observer, bus_observer, stop);
                        if let Err(error) = run.await {
                            tracing::error!(%error, "A sink could not read the events stream.");
                        }
                    }));
                }
                let outputs = RedisOutputs::connect(&redis.url, &config.bus.outputs_prefix)
                    .await
                    .with_context(|| format!("cannot connect to Redis at {}", redis.url))?;
                (Arc::new(publisher), Some(Arc::new(outputs)))
            }
        };
        let observer = telemetry
            .lifecycle_metrics()
            .map(|metrics| Arc::new(metrics) as Arc<dyn LifecycleObserver>);
        let health = match (&config.registry.kind, &config.bus.redis) {
            (RegistryKind::Redis, Some(redis)) => {
                let store = RedisWorkers::connect(
                    &redis.url,
                    &config.registry.key_prefix,
                    config.registry.retention,
                )
                .await
                .with_context(|| format!("cannot connect to Redis at {}", redis.url))?;
                HealthRegistry::shared(config.health.clone(), observer, Arc::new(store))
            }
            _ => HealthRegistry::new(config.health.clone(), observer),
        };
        telemetry.observe_health(&health);

        let mut dispatchers = Vec::new();
        // Remote workers' dispatchers: registered by the workers themselves, no lifecycle task.
        let mut workers = std::collections::HashSet::new();
        // One keep-alive connection pool for every `http` and `worker` dispatcher.
        let mut http_client = None;
        for spec in &config.dispatchers {
            let id = spec.dispatcher_id.as_str();
            let mut dispatcher = match &spec.kind {
                DispatcherKind::Log => Dispatcher::new(
                    id,
                    spec.category,
                    LogDispatcher::new(config.redaction.clone()),
                ),
                DispatcherKind::Jsonl { path } => {
                    let file = JsonlFile::open(path, &files, &writers, stop_writers.clone())
                        .await
                        .with_context(|| {
                            format!("dispatcher `{id}` cannot open {}", path.display())
                        })?;
                    Dispatcher::new(id, spec.category, file)
                }
                DispatcherKind::Http { target, policy } => {
                    let client = match &http_client {
                        Some(client) => client,
                        None => http_client.insert(
                            crate::dispatchers::http_client()
                                .context("cannot build the HTTP client")?,
                        ),
                    };
                    if spec.category == crate::engine::Category::Command {
                        let adapter = HttpCommand::new(client.clone(), (**target).clone());
                        let command = Dispatcher::command(id, adapter);
                        match policy {
                            Some(policy) => command.with_policy(policy.clone()),
                            None => command,
                        }
                    } else {
                        let handler = HttpDispatcher::new(client.clone(), (**target).clone());
                        Dispatcher::new(id, spec.category, handler)
                    }
                }
                DispatcherKind::RedisStream(target) => {
                    let handler = RedisStreamDispatcher::new(target.clone())
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("dispatcher `{id}`"))?;
                    Dispatcher::new(id, spec.category, handler)
                }
                DispatcherKind::Nats(target) => {
                    let handler = NatsDispatcher::connect(target.clone())
                        .await
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("dispatcher `{id}`"))?;
                    Dispatcher::new(id, spec.category, handler)
                }
                DispatcherKind::Worker => {
                    let client = match &http_client {
                        Some(client) => client,
                        None => http_client.insert(
                            crate::dispatchers::http_client()
                                .context("cannot build the HTTP client")?,
                        ),
                    };
                    workers.insert(id.to_owned());
                    let handler = WorkerDispatcher::new(client.clone(), health.clone(), id);
                    Dispatcher::new(id, spec.category, handler)
                }
            };
            dispatcher = dispatcher.with_timeout(spec.timeout);
            if let Some(types) = &spec.message_types {
                dispatcher = dispatcher.with_message_types(types.iter().cloned());
            }
            let settings = DispatcherSettings {
                stale_threshold: spec.stale_threshold,
                heartbeat_interval: spec.heartbeat_interval,
                critical: spec.critical,
                resilience: spec.resilience.clone(),
            };
            dispatchers.push((dispatcher, settings));
        }
        dispatchers.extend(self.dispatchers);

        // The protections report to the metrics and, for the breakers, to the health registry.
        let mut observers = Observers::default();
        observers.0.push(Arc::new(health.clone()));
        if let Some(metrics) = telemetry.resilience_metrics() {
            observers.0.push(Arc::new(metrics));
        }
        let observers: Arc<dyn ResilienceObserver> = Arc::new(observers);
        // Cluster-scoped protections share one connection to the bus's Redis, made on first use.
        let mut cluster: Option<Arc<ClusterRedis>> = None;
        let mut protected = Vec::with_capacity(dispatchers.len());
        for (dispatcher, settings) in dispatchers {
            if settings.resilience.is_empty() {
                protected.push((dispatcher, settings));
                continue;
            }
            let resilience = &settings.resilience;
            let mut protections =
                Protections::new(dispatcher.id(), resilience, Some(observers.clone()));
            let dedup = resilience.dedup.filter(|c| c.scope == Scope::Cluster);
            let rate_limit = resilience.rate_limit.filter(|c| c.scope == Scope::Cluster);
            if dedup.is_some() || rate_limit.is_some() {
                let redis = match (&cluster, &config.bus.redis) {
                    (Some(redis), _) => redis.clone(),
                    (None, Some(bus)) => {
                        let redis = ClusterRedis::new(&bus.url).map_err(anyhow::Error::msg)?;
                        cluster = Some(redis.clone());
                        redis
                    }
                    (None, None) => anyhow::bail!(
                        "dispatcher `{}`: scope \"cluster\" needs the Redis bus (bus.kind = \"redis\")",
                        dispatcher.id()
                    ),
                };
                if let Some(dedup) = dedup {
                    let running = resilience.longest_call(dispatcher.timeout());
                    let store = RedisDedup::new(redis.clone(), dispatcher.id(), running, dedup.ttl);
                    protections = protections.with_cluster_dedup(Arc::new(store));
                }
                if let Some(rate_limit) = rate_limit {
                    let store = RedisRateLimit::new(redis, dispatcher.id(), &rate_limit);
                    protections = protections.with_cluster_rate_limit(Arc::new(store));
                }
            }
            protected.push((dispatcher.with_protections(protections), settings));
        }
        let dispatchers = protected;

        for (dispatcher, liveness) in &dispatchers {
            if workers.contains(dispatcher.id()) {
                continue;
            }
            let registration = Registration {
                origin: Origin::InProcess,
                stale_threshold: Some(liveness.stale_threshold),
                critical: liveness.critical,
                endpoint: None,
            };
            health
                .register(dispatcher.id(), registration)
                .with_context(|| format!("dispatcher `{}` cannot register", dispatcher.id()))?;
        }

        let mut engine = Engine::builder();
        for (dispatcher, _) in &dispatchers {
            engine = engine.dispatcher(dispatcher.clone());
        }
        for route in config.routes.iter().cloned().chain(self.routes) {
            engine = engine.route(route);
        }
        let ids: Vec<String> = engine.dispatcher_ids().map(str::to_owned).collect();
        let ids = || ids.iter().map(String::as_str);
        let stats = Arc::new(DispatcherStats::new(ids()));
        let mut strategies = Composite::new()
            .with(Arc::new(TracingStrategy))
            .with(Arc::new(HealthStrategy::new(&health, ids())))
            .with(stats.clone());
        if let Some(metrics) = telemetry.engine_strategy(ids()) {
            strategies = strategies.with(Arc::new(metrics));
        }
        if let Some(outputs) = outputs {
            engine = engine.publisher(outputs);
        }
        // Trace ids in results and traceparent in outputs, from the dispatch span.
        // Without an exporter the engine's spans would go nowhere: ids only, and the ingest
        // and source spans give way to contexts made directly.
        let mut trace = crate::propagation::SpanTraceContext::new(config.tracing.sampling_ratio);
        if let (Some(tracer), Some(_)) = (self.tracer, &config.tracing.otlp_endpoint) {
            trace = trace.with_tracer(tracer);
        }
        let unexported = config
            .tracing
            .otlp_endpoint
            .is_none()
            .then(|| Arc::new(Unexported::new(config.tracing.sampling_ratio)));
        engine = engine.trace_context(Arc::new(trace));
        let engine = engine
            .redactor(config.redaction.clone())
            .instrumentation(Arc::new(strategies))
            .build()
            .context("invalid dispatchers or routes")?;

        let liveness = dispatchers
            .into_iter()
            .map(|(_, liveness)| liveness)
            .collect();
        Ok(App {
            config,
            instance_id,
            listener,
            local_addr,
            engine,
            liveness,
            workers,
            stats,
            health,
            telemetry,
            unexported,
            bus,
            sinks,
            stop_sinks,
            writers,
            stop_writers,
            files,
            consumers,
            _background: background,
        })
    }
}

/// A built service: bound, not yet serving.
pub struct App {
    config: Config,
    /// `[server] instance_id`, or host name and bound port.
    instance_id: String,
    listener: TcpListener,
    local_addr: SocketAddr,
    engine: Engine,
    /// By engine index.
    liveness: Vec<DispatcherSettings>,
    /// The `worker` dispatchers' ids: their workers register and heartbeat themselves.
    workers: std::collections::HashSet<String>,
    stats: Arc<DispatcherStats>,
    health: HealthRegistry,
    telemetry: Telemetry,
    /// Set when nothing exports spans (no OTLP endpoint): trace context without spans.
    unexported: Option<Arc<Unexported>>,
    bus: Arc<dyn EventBus>,
    sinks: TaskTracker,
    stop_sinks: CancellationToken,
    writers: TaskTracker,
    stop_writers: CancellationToken,
    files: Files,
    /// The sinks' Redis consumers, started by `run`.
    consumers: Vec<futures::future::BoxFuture<'static, ()>>,
    /// Cancels the writers and sink drivers when the App is dropped, run or not.
    _background: Vec<tokio_util::sync::DropGuard>,
}

impl App {
    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder {
            config,
            dispatchers: Vec::new(),
            routes: Vec::new(),
            tracer: None,
        }
    }

    /// The address actually bound (the port is known here when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// This instance's identity: `service.instance.id`, the default Redis consumer name.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// The files the service appends to: [`Files::reopen`] makes each writer reopen its file at
    /// its next commit (what SIGHUP does).
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Starts every dispatcher's lifecycle task and serves until `shutdown` is cancelled, then
    /// answers `/ready` with 503 while still serving for `server.drain_delay`, stops accepting,
    /// lets in-flight requests finish within `server.shutdown_grace`, stops the
    /// lifecycle tasks, stops the writers after they committed everything queued, and shuts the
    /// meter provider down.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        for consumer in self.consumers.drain(..) {
            self.sinks.spawn(consumer);
        }
        let lifecycles = TaskTracker::new();
        let stop_lifecycles = CancellationToken::new();
        for (dispatcher, liveness) in self.engine.dispatchers().iter().zip(&self.liveness) {
            if self.workers.contains(dispatcher.id()) {
                continue;
            }
            lifecycles.spawn(supervise(
                self.health.clone(),
                dispatcher.clone(),
                liveness.heartbeat_interval,
                RestartBackoff::default(),
                stop_lifecycles.clone(),
            ));
        }
        // The shared registry's snapshot, which scrapes read, is never older than this.
        lifecycles.spawn(
            self.health
                .clone()
                .keep_fresh(REGISTRY_REFRESH, stop_lifecycles.clone()),
        );

        let mut state = ApiState::new(
            self.engine.clone(),
            self.telemetry.clone(),
            self.health.clone(),
            shutdown.clone(),
        );
        state.events = Some(self.bus.clone());
        state.stats = Some(self.stats.clone());
        state.instance_id = Some(self.instance_id.clone());
        state.unexported = self.unexported.clone();

        // Inbound sources: consumers, stopped first at shutdown.
        let sources = TaskTracker::new();
        let stop_sources = CancellationToken::new();
        if let Some(redis) = &self.config.bus.redis {
            let consumer = redis
                .consumer
                .clone()
                .unwrap_or_else(|| self.instance_id.clone());
            for source in &self.config.sources {
                let group = ConsumerConfig {
                    stream: source.stream.clone(),
                    group: source.group.clone(),
                    consumer: consumer.clone(),
                    count: 100,
                    block: Duration::from_secs(1),
                    claim_idle: redis.claim_idle,
                    retention: redis.consumer_retention,
                    trim_every: Some(redis.trim_every),
                };
                sources.spawn(consume_source(
                    redis.url.clone(),
                    group,
                    self.engine.clone(),
                    self.unexported.clone(),
                    self.bus.clone(),
                    self.telemetry
                        .bus_metrics()
                        .map(|m| m as Arc<dyn BusObserver>),
                    stop_sources.clone(),
                ));
            }
        }
        sources.close();
        let abandon = state.abandon.clone();
        let server_config = &self.config.server;
        let guard = http::Guard::new(
            self.config.auth.clone(),
            server_config.max_in_flight,
            server_config.request_timeout,
            self.telemetry.http_metrics(),
        )
        .min_body_rate(server_config.min_body_rate, server_config.body_rate_grace)
        .max_header_bytes(server_config.max_header_bytes);
        let router = http::guarded_router(state, server_config.max_body_bytes, guard);
        let limits = http::ConnectionLimits {
            max_connections: server_config.max_connections,
            max_header_bytes: server_config.max_header_bytes,
            header_read_timeout: server_config.header_read_timeout,
        };
        if open_beyond_loopback(self.local_addr, &self.config.auth) {
            tracing::warn!(
                listen = %self.local_addr,
                "dispatchd listens beyond loopback WITHOUT ACCESS CONTROL: anyone who can reach this address can ingest messages and register workers. Set DISPATCHD_API_TOKEN or [[auth.tokens]] (see docs/security.md)."
            );
        }
        tracing::info!(
            listen = %self.local_addr,
            instance_id = %self.instance_id,
            dispatchers = self.engine.dispatchers().len(),
            routes = self.engine.routes().len(),
            "dispatchd is serving."
        );

        // `shutdown` turns /ready to 503 at once; `stop_accepting` closes the listener after the
        // drain delay.
        let stop_accepting = CancellationToken::new();
        let server = http::serve(
            self.listener,
            router,
            limits,
            self.telemetry.http_metrics(),
            stop_accepting.clone(),
        );
        let mut server = tokio::spawn(server);
        let mut served = tokio::select! {
            served = &mut server => Some(served),
            () = shutdown.cancelled() => None,
        };
        // Stop the consumers first: nothing new comes in from them while the rest drains.
        stop_sources.cancel();
        if served.is_none() {
            let drain_delay = self.config.server.drain_delay;
            if !drain_delay.is_zero() {
                tracing::info!(
                    ?drain_delay,
                    "Shutting down: /ready answers 503 while requests are still served, so load balancers stop sending."
                );
            }
            let drain = async {
                tokio::select! {
                    () = tokio::time::sleep(drain_delay) => None,
                    ended = &mut server => Some(ended),
                }
            };
            (_, served) = tokio::join!(sources.wait(), drain);
        } else {
            sources.wait().await;
        }
        stop_accepting.cancel();
        let served = match served {
            Some(served) => served,
            None => {
                let grace = self.config.server.shutdown_grace;
                tracing::info!(?grace, "Shutting down: draining in-flight requests.");
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!(
                            ?grace,
                            "In-flight requests did not finish within the grace period; abandoning them."
                        );
                        // Abandoned requests answer 503 at once, which lets their connections
                        // close; the server then ends by itself. Aborting is the last resort.
                        abandon.cancel();
                        match tokio::time::timeout(ABANDON_WAIT, &mut server).await {
                            Ok(served) => served,
                            Err(_) => {
                                server.abort();
                                Ok(Ok(()))
                            }
                        }
                    }
                }
            }
        };

        stop_lifecycles.cancel();
        lifecycles.close();
        lifecycles.wait().await;
        // Every dispatch has published its event by now: flush the sinks.
        self.stop_sinks.cancel();
        self.sinks.close();
        self.sinks.wait().await;
        self.stop_writers.cancel();
        self.writers.close();
        self.writers.wait().await;
        self.telemetry.shutdown();
        tracing::info!("dispatchd stopped.");
        served
            .context("the HTTP server task failed")?
            .context("the HTTP server failed")
    }
}

/// Whether the API is reachable from other machines with no token required: worth a loud
/// warning at startup.
fn open_beyond_loopback(listen: SocketAddr, tokens: &crate::auth::Tokens) -> bool {
    tokens.is_empty() && !listen.ip().is_loopback()
}

/// Dispatches the messages of one source stream through the bus's consume loop: each entry's
/// `data` is an [`OutputMessage`] (`{"topic": …, "envelope": {…}}`); it is acknowledged once its
/// dispatch reached a terminal status (else released, and dispatched again after `claim_idle`),
/// and its dispatch event is published like any other. An entry that is not a message is
/// copied to `<stream>:unreadable` (see [`ToEngine::keep_unreadable`]) and acknowledged, so it
/// cannot block the group and is not lost. Like a sink's consumer, it reads
/// its own pending entries first, reclaims what dead consumers left, creates its group again when
/// Redis lost it, counts failed reads, and reports its backlog.
async fn consume_source(
    url: String,
    config: ConsumerConfig,
    engine: Engine,
    unexported: Option<Arc<Unexported>>,
    bus: Arc<dyn EventBus>,
    observer: Option<Arc<dyn BusObserver>>,
    stop: CancellationToken,
) {
    let stream = config.stream.clone();
    let backoff = |failures: u32| {
        Duration::from_millis(100).saturating_mul(2u32.saturating_pow(failures.min(6)))
    };
    // Retried, and counted as failed reads, until it works: a source that cannot start (the key
    // holds something else than a stream, an ACL refuses `XGROUP`, Redis went away) must not
    // stop for good with one log line.
    if let Some(observer) = &observer {
        observer.consumer_started(&config.stream, &config.group);
    }
    let mut failures = 0u32;
    let consumer = loop {
        match Consumer::connect(&url, config.clone(), observer.clone()).await {
            Ok(consumer) => break consumer,
            Err(error) => {
                failures += 1;
                if let Some(observer) = &observer {
                    observer.read_failed(&config.stream, &config.group);
                }
                tracing::error!(%error, stream = %stream, "A source cannot read its stream; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        }
    };
    consumer
        .run(
            |_| ToEngine {
                engine,
                unexported,
                bus,
                stream,
                url,
                group: config.group.clone(),
                observer,
                unreadable: None,
            },
            stop,
        )
        .await;
}

/// A source's side of the consume loop: each entry is dispatched in turn.
struct ToEngine {
    engine: Engine,
    /// Set when nothing exports spans (see [`ApiState::unexported`]).
    unexported: Option<Arc<Unexported>>,
    bus: Arc<dyn EventBus>,
    stream: String,
    /// The Redis that holds the stream: where an entry that is not a message is kept.
    url: String,
    group: String,
    /// Counts entries that are not messages (`bus_redis_unreadable_entries_total`).
    observer: Option<Arc<dyn BusObserver>>,
    /// Where they are kept: opened at the first one and kept, so that a producer writing many
    /// costs no connection per entry; dropped after a failure and opened again at the next.
    unreadable: Option<redis::aio::MultiplexedConnection>,
}

/// How many entries a source keeps in `<stream>:unreadable` at most (`MAXLEN ~`): the newest.
const UNREADABLE_KEPT: usize = 10_000;

impl ToEngine {
    /// Keeps an entry that is not a message in the stream `<stream>:unreadable`, with its
    /// `data` (when it has one), the reason it could not be read (`error`) and the id it had
    /// (`entry_id`), so that it is not lost: an envelope from a newer version, or a producer's
    /// mistake, can be read there (`XRANGE`) and posted again. Answers whether Redis took it,
    /// within 2 s.
    async fn keep_unreadable(&mut self, entry: &Entry, error: &str) -> bool {
        let key = format!("{}:unreadable", self.stream);
        let (url, cached) = (&self.url, &mut self.unreadable);
        let kept = async {
            let mut connection = match cached.take() {
                Some(connection) => connection,
                None => {
                    redis::Client::open(url.as_str())?
                        .get_multiplexed_async_connection()
                        .await?
                }
            };
            let mut command = redis::cmd("XADD");
            command
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(UNREADABLE_KEPT)
                .arg("*");
            if let Some(data) = &entry.data {
                command.arg("data").arg(data);
            }
            command
                .arg("error")
                .arg(error)
                .arg("entry_id")
                .arg(&entry.id);
            let id = command.query_async::<String>(&mut connection).await?;
            *cached = Some(connection);
            Ok::<_, redis::RedisError>(id)
        };
        match tokio::time::timeout(Duration::from_secs(2), kept).await {
            Ok(Ok(_)) => true,
            Ok(Err(redis_error)) => {
                tracing::error!(stream = %key, id = %entry.id, error = %redis_error, "Could not keep an unreadable source entry; it stays pending.");
                false
            }
            Err(_) => {
                tracing::error!(stream = %key, id = %entry.id, "Could not keep an unreadable source entry within 2 s; it stays pending.");
                false
            }
        }
    }
}

#[async_trait::async_trait]
impl Deliver for ToEngine {
    async fn deliver(&mut self, entry: Entry, acks: &Acks) {
        let (engine, stream) = (&self.engine, &self.stream);
        let message = crate::bus::redis::source_message(entry.data.as_deref());
        let terminal = match message {
            Ok(OutputMessage { topic, envelope }) => {
                // The sender's trace, from the envelope's headers, is the dispatch's parent.
                let parent = crate::propagation::extract_map(&envelope.headers);
                let result = match &self.unexported {
                    None => {
                        let span = tracing::info_span!(
                            target: "dispatchd::trace",
                            "source",
                            otel.name = %format_args!("{stream} receive"),
                            otel.kind = "consumer",
                        );
                        let _ = span.set_parent(parent);
                        engine.dispatch(&topic, &envelope).instrument(span).await
                    }
                    Some(unexported) => {
                        let context = unexported.child(&parent, "receive", SpanKind::Consumer);
                        let span = tracing::info_span!(
                            target: "dispatchd::source",
                            "source",
                            otel.name = %format_args!("{stream} receive"),
                            otel.kind = "consumer",
                        );
                        let dispatch = engine.dispatch(&topic, &envelope).instrument(span);
                        opentelemetry::context::FutureExt::with_context(dispatch, context).await
                    }
                };
                self.bus
                    .publish(DispatchEvent::from_dispatch(
                        &result,
                        &envelope,
                        engine.redactor(),
                    ))
                    .await;
                result.status.is_terminal()
            }
            Err(error) => {
                // Never dispatched, but not lost: kept beside the stream, then acknowledged so
                // that it cannot block the group. If Redis does not take it, it stays pending.
                tracing::error!(stream = %stream, id = %entry.id, %error, "A source entry is not a message this version can read; keeping it in <stream>:unreadable.");
                if let Some(observer) = &self.observer {
                    observer.unreadable(stream, &self.group);
                }
                self.keep_unreadable(&entry, &error).await
            }
        };
        if terminal {
            acks.ack(vec![entry.id]).await;
        } else {
            acks.release(&entry.id);
        }
    }

    async fn finish(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ApiToken, Scope, Secret, Tokens};

    #[test]
    fn only_an_open_api_beyond_loopback_is_warned_about() {
        let token = Tokens::new(vec![ApiToken {
            name: "t".into(),
            secret: Secret::new("0123456789abcdef"),
            scopes: vec![Scope::Ingest],
        }]);
        let open = Tokens::default();
        assert!(open_beyond_loopback("0.0.0.0:9000".parse().unwrap(), &open));
        assert!(open_beyond_loopback("[::]:9000".parse().unwrap(), &open));
        assert!(open_beyond_loopback(
            "10.1.2.3:9000".parse().unwrap(),
            &open
        ));
        assert!(!open_beyond_loopback(
            "127.0.0.1:9000".parse().unwrap(),
            &open
        ));
        assert!(!open_beyond_loopback("[::1]:9000".parse().unwrap(), &open));
        assert!(!open_beyond_loopback(
            "0.0.0.0:9000".parse().unwrap(),
            &token
        ));
    }
}
