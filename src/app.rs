//! The service assembled: configuration in, a bound and running dispatchd out.
//!
//! Startup reads in order: build (bind the listener, open files, build the engine, all of which
//! can fail and are reported before anything runs; telemetry first, so everything built after
//! it is measured) → [`App::run`] (serve until the shutdown token fires) → drain in-flight
//! requests within `server.shutdown_grace` → stop and flush the writers → shut the meter
//! provider down. Tests build on port 0 and cancel the token to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DispatcherKind};
use crate::dispatchers::{JsonlFile, LogDispatcher};
use crate::engine::{Dispatcher, Engine, Route};
use crate::http::{self, ApiState};
use crate::instrumentation::{Composite, TracingStrategy};
use crate::telemetry::Telemetry;

/// How long abandoned requests get to send their 503 before the server task is aborted.
const ABANDON_WAIT: Duration = Duration::from_secs(2);

/// Builds an [`App`] from a [`Config`], plus any dispatchers registered in code.
pub struct AppBuilder {
    config: Config,
    dispatchers: Vec<Dispatcher>,
    routes: Vec<Route>,
}

impl AppBuilder {
    /// Registers a dispatcher written in Rust beside the configured ones.
    pub fn dispatcher(mut self, dispatcher: Dispatcher) -> AppBuilder {
        self.dispatchers.push(dispatcher);
        self
    }

    pub fn route(mut self, route: Route) -> AppBuilder {
        self.routes.push(route);
        self
    }

    /// Binds the listener, opens the dispatchers' files and builds the engine.
    pub async fn build(self) -> anyhow::Result<App> {
        let config = self.config;
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let local_addr = listener
            .local_addr()
            .context("the listener has no address")?;

        let telemetry = Telemetry::new(&config.metrics);
        let writers = TaskTracker::new();
        let stop_writers = CancellationToken::new();
        let mut engine = Engine::builder();
        for spec in &config.dispatchers {
            let mut dispatcher = match &spec.kind {
                DispatcherKind::Log => {
                    Dispatcher::new(spec.dispatcher_id.as_str(), spec.category, LogDispatcher)
                }
                DispatcherKind::Jsonl { path } => {
                    let file = JsonlFile::open(path, &writers, stop_writers.clone())
                        .await
                        .with_context(|| {
                            format!(
                                "dispatcher `{}` cannot open {}",
                                spec.dispatcher_id,
                                path.display()
                            )
                        })?;
                    Dispatcher::new(spec.dispatcher_id.as_str(), spec.category, file)
                }
            };
            dispatcher = dispatcher.with_timeout(spec.timeout);
            if let Some(types) = &spec.message_types {
                dispatcher = dispatcher.with_message_types(types.iter().cloned());
            }
            engine = engine.dispatcher(dispatcher);
        }
        for dispatcher in self.dispatchers {
            engine = engine.dispatcher(dispatcher);
        }
        for route in config.routes.iter().cloned().chain(self.routes) {
            engine = engine.route(route);
        }
        let mut strategies = Composite::new().with(Arc::new(TracingStrategy));
        let ids: Vec<String> = engine.dispatcher_ids().map(str::to_owned).collect();
        if let Some(metrics) = telemetry.engine_strategy(ids.iter().map(String::as_str)) {
            strategies = strategies.with(Arc::new(metrics));
        }
        let engine = engine
            .instrumentation(Arc::new(strategies))
            .build()
            .context("invalid dispatchers or routes")?;

        Ok(App {
            config,
            listener,
            local_addr,
            engine,
            telemetry,
            writers,
            stop_writers,
        })
    }
}

/// A built service: bound, not yet serving.
pub struct App {
    config: Config,
    listener: TcpListener,
    local_addr: SocketAddr,
    engine: Engine,
    telemetry: Telemetry,
    writers: TaskTracker,
    stop_writers: CancellationToken,
}

impl App {
    pub fn builder(config: Config) -> AppBuilder {
        AppBuilder {
            config,
            dispatchers: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// The address actually bound (the port is known here when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish within `server.shutdown_grace`, and stops the writers after they committed
    /// everything queued.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let state = ApiState::new(self.engine.clone(), self.telemetry.clone());
        let abandon = state.abandon.clone();
        let router = http::router(state, self.config.server.max_body_bytes);
        tracing::info!(
            listen = %self.local_addr,
            dispatchers = self.engine.dispatchers().len(),
            routes = self.engine.routes().len(),
            "dispatchd is serving."
        );

        let server = axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future();
        let mut server = tokio::spawn(server);
        let served = tokio::select! {
            served = &mut server => Some(served),
            () = shutdown.cancelled() => None,
        };
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
