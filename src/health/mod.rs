//! Dispatcher lifecycle and health: who is registered, when each last proved alive, how often it
//! failed in a row, and what that means.
//!
//! Owns: the [`HealthRegistry`] (in-process dispatchers and out-of-process workers alike), the
//! health model ([`evaluate`]), the lifecycle task that heartbeats for in-process dispatchers and
//! is restarted under supervision when it panics ([`supervise`]), the strategy that feeds
//! dispatch outcomes into the registry ([`HealthStrategy`]), and the per-dispatcher statistics
//! of the dispatcher API ([`DispatcherStats`]: counts, latency percentiles, last error and
//! topic), and where a remote worker takes its messages ([`HealthRegistry::worker_endpoint`]).
//!
//! Invariants:
//! - Health is a pure function of (now, last heartbeat, stale threshold, consecutive failures,
//!   failure limit, state). Reading it, scraping it or serving it changes nothing.
//! - Time is tokio's clock, so tests run on paused time.
//! - Ids are `[A-Za-z0-9_.-]{1,128}` and out-of-process registrations are bounded
//!   (`health.max_workers`), so no client can grow label cardinality without limit.
//! - The dispatch path takes no lock here: [`HealthStrategy`] holds each in-process record by
//!   engine index and updates atomics.
//!
//! Must not: import telemetry. Metrics observe the registry through [`LifecycleObserver`] and
//! read it at scrape time.

mod stats;
mod strategy;
mod supervisor;
pub mod workers;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tokio::time::Instant;

use crate::engine::is_valid_id;
pub use stats::{DispatcherStats, Latency, StatsSnapshot};
pub use strategy::HealthStrategy;
pub use supervisor::{RestartBackoff, supervise};
pub use workers::{Registered, Snapshot, StoreError, StoredWorker, WorkerRecord, WorkerStore};

/// The validated `[health]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// For dispatchers and workers that set none.
    pub stale_threshold: Duration,
    /// Consecutive failures at which a dispatcher is unhealthy.
    pub failure_limit: u32,
    /// Out-of-process workers registered at once, at most.
    pub max_workers: usize,
    /// The largest stale threshold a worker may ask for.
    pub max_stale_threshold: Duration,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            stale_threshold: Duration::from_secs(120),
            failure_limit: 5,
            max_workers: 1000,
            max_stale_threshold: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where a dispatcher runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Run by this engine; registered at startup, heartbeats from its lifecycle task.
    InProcess,
    /// A worker elsewhere that reports over HTTP.
    Remote,
}

/// A dispatcher's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Registered, not yet started.
    Starting,
    Running,
    /// Running, but its circuit breaker is open (or half-open): calls are refused. Unhealthy.
    Degraded,
    /// Stopped; unhealthy until it starts again.
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Degraded => "degraded",
            State::Stopped => "stopped",
        }
    }

    fn from_u8(value: u8) -> State {
        match value {
            0 => State::Starting,
            1 => State::Running,
            3 => State::Degraded,
            _ => State::Stopped,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            State::Starting => 0,
            State::Running => 1,
            State::Stopped => 2,
            State::Degraded => 3,
        }
    }
}

/// A lifecycle event, as counted by `dispatcher_lifecycle_events_total{event}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleEvent {
    Start,
    Stop,
    Restart,
    Register,
    Unregister,
}

impl LifecycleEvent {
    pub const ALL: [LifecycleEvent; 5] = [
        LifecycleEvent::Start,
        LifecycleEvent::Stop,
        LifecycleEvent::Restart,
        LifecycleEvent::Register,
        LifecycleEvent::Unregister,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::Start => "start",
            LifecycleEvent::Stop => "stop",
            LifecycleEvent::Restart => "restart",
            LifecycleEvent::Register => "register",
            LifecycleEvent::Unregister => "unregister",
        }
    }
}

/// Told about every lifecycle event and heartbeat (the metrics implement it).
pub trait LifecycleObserver: Send + Sync + 'static {
    fn on_event(&self, dispatcher_id: &str, event: LifecycleEvent);
    fn on_heartbeat(&self, dispatcher_id: &str);
    /// `+1` when a dispatcher starts running, `-1` when it stops.
    fn on_active(&self, dispatcher_id: &str, delta: i64);
}

/// What the registry knows of one dispatcher. Mutable parts are atomics so heartbeats and
/// dispatch outcomes never take the registry's lock.
#[derive(Debug)]
pub struct Record {
    id: Arc<str>,
    origin: Origin,
    critical: bool,
    stale_threshold: Duration,
    /// Nanoseconds since the registry's epoch.
    last_heartbeat: AtomicU64,
    /// Nanoseconds since the epoch at the last start; `u64::MAX` before any.
    started: AtomicU64,
    consecutive_failures: AtomicU32,
    state: AtomicU8,
    /// Where a worker takes its messages (`kind = "worker"` dispatchers push there).
    endpoint: Option<reqwest::Url>,
}

/// The health answer for one dispatcher, as `GET /api/v1/dispatchers` serves it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DispatcherHealth {
    pub dispatcher_id: String,
    pub healthy: bool,
    pub is_stale: bool,
    pub heartbeat_age_seconds: f64,
    pub consecutive_failures: u32,
    /// Seconds since it last started; 0 before it started.
    pub uptime_seconds: f64,
    pub state: State,
    pub critical: bool,
    pub origin: Origin,
    pub stale_threshold_seconds: f64,
    /// Where a worker takes its messages, without credentials or query; absent when it gave none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Why it is unhealthy; absent when healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The inputs of the health model, all plain values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    pub heartbeat_age: Duration,
    pub stale_threshold: Duration,
    pub consecutive_failures: u32,
    pub failure_limit: u32,
    pub state: State,
}

/// The verdict of the health model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub is_stale: bool,
    pub reason: Option<String>,
}

/// The health model, a pure function: stale when the last heartbeat is older than the
/// threshold; healthy when not stale, not stopped, and with fewer consecutive failures than the
/// limit.
pub fn evaluate(observation: Observation) -> Verdict {
    let is_stale = observation.heartbeat_age > observation.stale_threshold;
    let reason = if observation.state == State::Stopped {
        Some("stopped".to_owned())
    } else if observation.state == State::Degraded {
        Some("degraded: its circuit breaker is open".to_owned())
    } else if is_stale {
        Some(format!(
            "stale: no heartbeat for {:.0} s (threshold {:.0} s)",
            observation.heartbeat_age.as_secs_f64(),
            observation.stale_threshold.as_secs_f64()
        ))
    } else if observation.consecutive_failures >= observation.failure_limit {
        Some(format!(
            "{} consecutive failures (limit {})",
            observation.consecutive_failures, observation.failure_limit
        ))
    } else {
        None
    };
    Verdict {
        healthy: reason.is_none(),
        is_stale,
        reason,
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("dispatcher id `{0}` must be 1 to 128 characters of [A-Za-z0-9_.-]")]
    InvalidId(String),
    #[error("{0} workers are registered already, the most health.max_workers allows")]
    LimitReached(usize),
    #[error(
        "`{0}` is a dispatcher of this process; workers cannot register, heartbeat or unregister it"
    )]
    InProcess(String),
    #[error("stale threshold must be more than 0 s and at most {max} s", max = .0.as_secs())]
    InvalidThreshold(Duration),
}

/// An operation named a dispatcher the registry does not know.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("no dispatcher `{0}` is registered")]
pub struct UnknownDispatcher(pub String);

/// How a dispatcher registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub origin: Origin,
    /// `None` for the configured default.
    pub stale_threshold: Option<Duration>,
    pub critical: bool,
    /// A worker's http(s) URL to push its messages to; `None` for a worker that only reports.
    pub endpoint: Option<reqwest::Url>,
}

/// Why a message cannot be pushed to a worker now: the outcome's error message.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum WorkerUnavailable {
    #[error("worker `{0}` is not registered")]
    NotRegistered(String),
    #[error("worker `{0}` registered without an endpoint")]
    NoEndpoint(String),
    #[error(
        "worker `{id}` is stale: no heartbeat for {age:.1} s (threshold {threshold:.1} s)",
        age = .age.as_secs_f64(),
        threshold = .threshold.as_secs_f64()
    )]
    Stale {
        id: String,
        age: Duration,
        threshold: Duration,
    },
    #[error("worker `{0}` is stopped")]
    Stopped(String),
}

/// The lifecycle and health registry. Cheap to clone.
#[derive(Clone)]
pub struct HealthRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    config: HealthConfig,
    epoch: Instant,
    records: RwLock<HashMap<Arc<str>, Arc<Record>>>,
    observer: Option<Arc<dyn LifecycleObserver>>,
    /// Where workers are kept when they are shared with other instances; `None` keeps them in
    /// `records` with the in-process dispatchers.
    shared: Option<Shared>,
}

/// The shared store and the last snapshot read from it, which scrapes read so they never wait
/// on the store.
struct Shared {
    store: Arc<dyn WorkerStore>,
    cache: RwLock<Option<(Instant, Snapshot)>>,
    /// 0 not yet known, 1 reachable, 2 unreachable at the last attempt.
    available: AtomicU8,
}

/// Why a worker's registration, heartbeat or unregistration failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error(transparent)]
    Refused(#[from] RegisterError),
    #[error(transparent)]
    Unknown(#[from] UnknownDispatcher),
    #[error("the shared dispatcher registry is unavailable: {0}")]
    Unavailable(String),
}

/// The shared registry could not be read.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("the shared dispatcher registry is unavailable: {0}")]
pub struct RegistryUnavailable(pub String);

impl HealthRegistry {
    pub fn new(
        config: HealthConfig,
        observer: Option<Arc<dyn LifecycleObserver>>,
    ) -> HealthRegistry {
        HealthRegistry {
            inner: Arc::new(Inner {
                config,
                epoch: Instant::now(),
                records: RwLock::new(HashMap::new()),
                observer,
                shared: None,
            }),
        }
    }

    /// A registry whose out-of-process workers live in `store`, shared by every instance that
    /// uses it; in-process dispatchers stay this instance's own.
    pub fn shared(
        config: HealthConfig,
        observer: Option<Arc<dyn LifecycleObserver>>,
        store: Arc<dyn WorkerStore>,
    ) -> HealthRegistry {
        HealthRegistry {
            inner: Arc::new(Inner {
                config,
                epoch: Instant::now(),
                records: RwLock::new(HashMap::new()),
                observer,
                shared: Some(Shared {
                    store,
                    cache: RwLock::new(None),
                    available: AtomicU8::new(0),
                }),
            }),
        }
    }

    /// Whether workers live in a store shared with other instances.
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Whether the shared store answered at the last attempt; `None` for a registry that keeps
    /// its workers in memory, or before the first attempt.
    pub fn store_available(&self) -> Option<bool> {
        match self
            .inner
            .shared
            .as_ref()?
            .available
            .load(Ordering::Relaxed)
        {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    fn store_result<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Some(shared) = &self.inner.shared {
            let up = !matches!(result, Err(StoreError::Unavailable(_)));
            shared
                .available
                .store(if up { 1 } else { 2 }, Ordering::Relaxed);
            if !up {
                // Old data must not pass for current: scrapes show no worker rather than a
                // false "stale".
                *write(&shared.cache) = None;
            }
        }
        result
    }

    /// Reads every worker from the shared store into the cache scrapes read, and answers their
    /// health now. Without a shared store: the workers in memory.
    pub async fn refresh(&self) -> Result<Vec<DispatcherHealth>, RegistryUnavailable> {
        let Some(shared) = &self.inner.shared else {
            return Ok(self
                .all()
                .into_iter()
                .filter(|h| h.origin == Origin::Remote)
                .collect());
        };
        let snapshot = self.store_result(shared.store.snapshot().await);
        match snapshot {
            Ok(snapshot) => {
                let health = snapshot.health(self.inner.config.failure_limit);
                *write(&shared.cache) = Some((Instant::now(), snapshot));
                Ok(health)
            }
            Err(error) => {
                tracing::warn!(%error, "The shared dispatcher registry could not be read.");
                Err(RegistryUnavailable(error.reason()))
            }
        }
    }

    /// Refreshes the cache of the shared store every `every` until `stop`; returns at once for
    /// a registry in memory.
    pub async fn keep_fresh(self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        if !self.is_shared() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let _ = self.refresh().await;
        }
    }

    /// Every dispatcher's health, the workers read from the shared store now: what
    /// `GET /api/v1/dispatchers` answers.
    pub async fn list(&self) -> Result<Vec<DispatcherHealth>, RegistryUnavailable> {
        if !self.is_shared() {
            return Ok(self.all());
        }
        let workers = self.refresh().await?;
        let mut all = self.local();
        all.extend(workers);
        all.sort_by(|a, b| a.dispatcher_id.cmp(&b.dispatcher_id));
        Ok(all)
    }

    /// One dispatcher's health; a worker is read from the shared store now.
    pub async fn dispatcher(
        &self,
        id: &str,
    ) -> Result<Option<DispatcherHealth>, RegistryUnavailable> {
        if let Some(local) = self.health(id) {
            return Ok(Some(local));
        }
        if !self.is_shared() {
            return Ok(None);
        }
        Ok(self
            .refresh()
            .await?
            .into_iter()
            .find(|h| h.dispatcher_id == id))
    }

    /// A worker registers (or registers again) through this instance. With a shared store, a
    /// live worker registering again is renewed (`register`, its uptime kept); one whose
    /// record went stale comes back (`restart`).
    pub async fn register_worker(
        &self,
        id: &str,
        stale_threshold: Option<Duration>,
        critical: bool,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<DispatcherHealth, WorkerError> {
        // The endpoint travels in the record's extra fields, so a shared store carries it.
        let endpoint = extra
            .get("endpoint")
            .and_then(serde_json::Value::as_str)
            .and_then(|text| text.parse::<reqwest::Url>().ok());
        let registration = Registration {
            origin: Origin::Remote,
            stale_threshold,
            critical,
            endpoint,
        };
        let Some(shared) = &self.inner.shared else {
            self.register(id, registration)?;
            return self
                .health(id)
                .ok_or_else(|| UnknownDispatcher(id.to_owned()).into());
        };
        let stale_threshold = self.checked_threshold(id, &registration)?;
        if self.health(id).is_some() {
            return Err(RegisterError::InProcess(id.to_owned()).into());
        }
        let record = WorkerRecord {
            stale_threshold_seconds: stale_threshold.as_secs_f64(),
            critical,
            extra,
        };
        let result = shared
            .store
            .register(id, &record, self.inner.config.max_workers)
            .await;
        let (registered, stored, now_ms) = match self.store_result(result) {
            Ok(done) => done,
            Err(StoreError::LimitReached(n)) => return Err(RegisterError::LimitReached(n).into()),
            Err(StoreError::Unavailable(why)) => return Err(WorkerError::Unavailable(why)),
        };
        self.emit(
            id,
            match registered {
                Registered::Restarted => LifecycleEvent::Restart,
                Registered::New | Registered::Renewed => LifecycleEvent::Register,
            },
        );
        Ok(stored.health(now_ms, self.inner.config.failure_limit))
    }

    /// A worker's heartbeat, received by this instance.
    pub async fn heartbeat_worker(&self, id: &str) -> Result<DispatcherHealth, WorkerError> {
        self.not_in_process(id)?;
        let Some(shared) = &self.inner.shared else {
            self.heartbeat(id)?;
            return self
                .health(id)
                .ok_or_else(|| UnknownDispatcher(id.to_owned()).into());
        };
        let result = shared.store.heartbeat(id).await;
        match self.store_result(result) {
            Ok(Some((stored, now_ms))) => {
                if let Some(observer) = &self.inner.observer {
                    observer.on_heartbeat(id);
                }
                Ok(stored.health(now_ms, self.inner.config.failure_limit))
            }
            Ok(None) => Err(UnknownDispatcher(id.to_owned()).into()),
            Err(error) => Err(WorkerError::Unavailable(error.reason())),
        }
    }

    /// A worker leaves, through this instance.
    pub async fn unregister_worker(&self, id: &str) -> Result<(), WorkerError> {
        self.not_in_process(id)?;
        let Some(shared) = &self.inner.shared else {
            return Ok(self.unregister(id)?);
        };
        let result = shared.store.unregister(id).await;
        match self.store_result(result) {
            Ok(true) => {
                self.emit(id, LifecycleEvent::Unregister);
                Ok(())
            }
            Ok(false) => Err(UnknownDispatcher(id.to_owned()).into()),
            Err(error) => Err(WorkerError::Unavailable(error.reason())),
        }
    }

    fn not_in_process(&self, id: &str) -> Result<(), WorkerError> {
        if !is_valid_id(id) {
            return Err(RegisterError::InvalidId(id.to_owned()).into());
        }
        match read(&self.inner.records).get(id) {
            Some(record) if record.origin == Origin::InProcess => {
                Err(RegisterError::InProcess(id.to_owned()).into())
            }
            _ => Ok(()),
        }
    }

    fn checked_threshold(
        &self,
        id: &str,
        registration: &Registration,
    ) -> Result<Duration, RegisterError> {
        if !is_valid_id(id) {
            return Err(RegisterError::InvalidId(id.to_owned()));
        }
        let config = &self.inner.config;
        let stale_threshold = registration
            .stale_threshold
            .unwrap_or(config.stale_threshold);
        if stale_threshold.is_zero() || stale_threshold > config.max_stale_threshold {
            return Err(RegisterError::InvalidThreshold(config.max_stale_threshold));
        }
        Ok(stale_threshold)
    }

    /// This instance's own dispatchers (and, without a shared store, its workers), ordered by id.
    fn local(&self) -> Vec<DispatcherHealth> {
        let now = self.now();
        let records: Vec<Arc<Record>> = read(&self.inner.records).values().cloned().collect();
        let mut all: Vec<DispatcherHealth> =
            records.iter().map(|r| self.evaluate(r, now)).collect();
        all.sort_by(|a, b| a.dispatcher_id.cmp(&b.dispatcher_id));
        all
    }

    /// This process's in-process dispatchers: what `/ready` judges it by.
    pub fn in_process(&self) -> Vec<DispatcherHealth> {
        let mut own = self.local();
        own.retain(|h| h.origin == Origin::InProcess);
        own
    }

    pub fn config(&self) -> &HealthConfig {
        &self.inner.config
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.inner.epoch))
    }

    fn emit(&self, id: &str, event: LifecycleEvent) {
        tracing::debug!(
            dispatcher_id = id,
            event = event.as_str(),
            "Dispatcher lifecycle event."
        );
        if let Some(observer) = &self.inner.observer {
            observer.on_event(id, event);
        }
    }

    /// Registers a dispatcher (state `starting`, its heartbeat clock starting now) and emits
    /// `register`. A worker registering again under the same id while it is not stale is
    /// renewed and emits `register` again (it did not restart, its uptime goes on); one whose
    /// record went stale, or an in-process dispatcher, emits `restart` instead.
    pub fn register(
        &self,
        id: &str,
        registration: Registration,
    ) -> Result<Arc<Record>, RegisterError> {
        let stale_threshold = self.checked_threshold(id, &registration)?;
        let config = &self.inner.config;
        let now = self.now();
        let remote = registration.origin == Origin::Remote;
        let record = Arc::new(Record {
            id: id.into(),
            origin: registration.origin,
            critical: registration.critical,
            stale_threshold,
            last_heartbeat: AtomicU64::new(now),
            started: AtomicU64::new(if remote { now } else { u64::MAX }),
            consecutive_failures: AtomicU32::new(0),
            endpoint: registration.endpoint,
            // A worker registers when it runs; an in-process dispatcher runs once its task starts.
            state: AtomicU8::new(
                if remote {
                    State::Running
                } else {
                    State::Starting
                }
                .as_u8(),
            ),
        });
        let previous = {
            let mut records = write(&self.inner.records);
            if let Some(existing) = records.get(id) {
                if existing.origin != registration.origin {
                    return Err(RegisterError::InProcess(id.to_owned()));
                }
                // A live worker registering again did not restart: it keeps its uptime.
                if remote && !existing.is_stale(now) {
                    record
                        .started
                        .store(existing.started.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            } else if remote {
                let workers = records
                    .values()
                    .filter(|r| r.origin == Origin::Remote)
                    .count();
                if workers >= config.max_workers {
                    return Err(RegisterError::LimitReached(workers));
                }
            }
            records.insert(record.id.clone(), record.clone())
        };
        match previous {
            Some(previous) if remote && !previous.is_stale(now) => {
                self.emit(id, LifecycleEvent::Register);
            }
            Some(previous) => {
                self.emit(id, LifecycleEvent::Restart);
                if previous.state() == State::Running && !remote {
                    self.active(id, -1);
                }
            }
            None => {
                self.emit(id, LifecycleEvent::Register);
                if remote {
                    self.active(id, 1);
                }
            }
        }
        Ok(record)
    }

    fn active(&self, id: &str, delta: i64) {
        if let Some(observer) = &self.inner.observer {
            observer.on_active(id, delta);
        }
    }

    /// Removes a dispatcher and emits `unregister`. Its gauge series vanish from the next
    /// scrape.
    pub fn unregister(&self, id: &str) -> Result<(), UnknownDispatcher> {
        let removed = write(&self.inner.records).remove(id);
        let Some(record) = removed else {
            return Err(UnknownDispatcher(id.to_owned()));
        };
        if record.origin == Origin::Remote && record.state() == State::Running {
            self.active(id, -1);
        }
        self.emit(id, LifecycleEvent::Unregister);
        Ok(())
    }

    /// Marks a dispatcher running, renews its heartbeat and emits `start`.
    pub fn start(&self, id: &str) -> Result<(), UnknownDispatcher> {
        let record = self.record(id)?;
        let now = self.now();
        record.started.store(now, Ordering::Relaxed);
        record.last_heartbeat.store(now, Ordering::Relaxed);
        let previous = State::from_u8(record.state.swap(State::Running.as_u8(), Ordering::AcqRel));
        if !matches!(previous, State::Running | State::Degraded) {
            self.active(id, 1);
        }
        self.emit(id, LifecycleEvent::Start);
        Ok(())
    }

    /// Marks a dispatcher stopped and emits `stop`.
    pub fn stop(&self, id: &str) -> Result<(), UnknownDispatcher> {
        let record = self.record(id)?;
        let previous = State::from_u8(record.state.swap(State::Stopped.as_u8(), Ordering::AcqRel));
        if matches!(previous, State::Running | State::Degraded) {
            self.active(id, -1);
        }
        self.emit(id, LifecycleEvent::Stop);
        Ok(())
    }

    /// Marks a running dispatcher degraded (its breaker opened) or running again (it closed).
    pub fn set_degraded(&self, id: &str, degraded: bool) -> Result<(), UnknownDispatcher> {
        let record = self.record(id)?;
        let (from, to) = if degraded {
            (State::Running, State::Degraded)
        } else {
            (State::Degraded, State::Running)
        };
        let _ = record.state.compare_exchange(
            from.as_u8(),
            to.as_u8(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        Ok(())
    }

    /// A dispatcher's task was restarted after a panic: emits `restart` and counts a failure.
    pub fn restart(&self, id: &str) -> Result<(), UnknownDispatcher> {
        let record = self.record(id)?;
        record.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.emit(id, LifecycleEvent::Restart);
        Ok(())
    }

    /// Records a heartbeat: the dispatcher proved alive now.
    pub fn heartbeat(&self, id: &str) -> Result<(), UnknownDispatcher> {
        let record = self.record(id)?;
        record.last_heartbeat.store(self.now(), Ordering::Relaxed);
        if let Some(observer) = &self.inner.observer {
            observer.on_heartbeat(id);
        }
        Ok(())
    }

    pub fn record_success(&self, id: &str) -> Result<(), UnknownDispatcher> {
        self.record(id)?.succeeded();
        Ok(())
    }

    pub fn record_failure(&self, id: &str) -> Result<(), UnknownDispatcher> {
        self.record(id)?.failed();
        Ok(())
    }

    /// The record of a registered dispatcher, to update it without a lookup.
    pub fn record(&self, id: &str) -> Result<Arc<Record>, UnknownDispatcher> {
        read(&self.inner.records)
            .get(id)
            .cloned()
            .ok_or_else(|| UnknownDispatcher(id.to_owned()))
    }

    /// Where to push a message for worker `id` now: its endpoint while it is registered with
    /// one and not stale or stopped, else why not. Consecutive failures do not close the door
    /// (only a call can end them; a breaker on the dispatcher is what stops calling a failing
    /// worker). A read of the registry, as [`HealthRegistry::health`] is.
    pub fn worker_endpoint(&self, id: &str) -> Result<reqwest::Url, WorkerUnavailable> {
        if let Some(shared) = &self.inner.shared {
            if self.health(id).is_none() {
                return self.shared_worker_endpoint(shared, id);
            }
        }
        let record = read(&self.inner.records)
            .get(id)
            .cloned()
            .ok_or_else(|| WorkerUnavailable::NotRegistered(id.to_owned()))?;
        let Some(endpoint) = &record.endpoint else {
            return Err(WorkerUnavailable::NoEndpoint(id.to_owned()));
        };
        if record.state() == State::Stopped {
            return Err(WorkerUnavailable::Stopped(id.to_owned()));
        }
        let age = Duration::from_nanos(
            self.now()
                .saturating_sub(record.last_heartbeat.load(Ordering::Relaxed)),
        );
        if age > record.stale_threshold {
            return Err(WorkerUnavailable::Stale {
                id: id.to_owned(),
                age,
                threshold: record.stale_threshold,
            });
        }
        Ok(endpoint.clone())
    }

    /// [`HealthRegistry::worker_endpoint`] for a worker of the shared store, from the last
    /// snapshot read (aged by the time since): any instance delivers to a worker registered
    /// through another.
    fn shared_worker_endpoint(
        &self,
        shared: &Shared,
        id: &str,
    ) -> Result<reqwest::Url, WorkerUnavailable> {
        let cache = read(&shared.cache);
        let Some((at, snapshot)) = cache.as_ref() else {
            return Err(WorkerUnavailable::NotRegistered(id.to_owned()));
        };
        let worker = snapshot
            .workers
            .iter()
            .find(|w| w.id == id)
            .ok_or_else(|| WorkerUnavailable::NotRegistered(id.to_owned()))?;
        let endpoint = worker
            .record
            .extra
            .get("endpoint")
            .and_then(serde_json::Value::as_str)
            .and_then(|text| text.parse::<reqwest::Url>().ok())
            .ok_or_else(|| WorkerUnavailable::NoEndpoint(id.to_owned()))?;
        // The same pure evaluation every health answer uses, at the store's clock.
        let health = worker.health(aged_now_ms(*at, snapshot), self.inner.config.failure_limit);
        if health.is_stale {
            return Err(WorkerUnavailable::Stale {
                id: id.to_owned(),
                age: Duration::from_secs_f64(health.heartbeat_age_seconds),
                threshold: Duration::from_secs_f64(health.stale_threshold_seconds),
            });
        }
        Ok(endpoint)
    }

    /// One dispatcher's health now.
    pub fn health(&self, id: &str) -> Option<DispatcherHealth> {
        let record = read(&self.inner.records).get(id).cloned()?;
        Some(self.evaluate(&record, self.now()))
    }

    /// Every dispatcher's health now, ordered by id, without waiting: shared workers as of the
    /// last snapshot read (their ages moved on by the time since), none while the shared store
    /// is unreachable. What the scrape-time gauges read.
    pub fn all(&self) -> Vec<DispatcherHealth> {
        let mut all = self.local();
        if let Some(shared) = &self.inner.shared {
            if let Some((at, snapshot)) = read(&shared.cache).as_ref() {
                let now_ms = aged_now_ms(*at, snapshot);
                all.extend(
                    snapshot
                        .workers
                        .iter()
                        .map(|w| w.health(now_ms, self.inner.config.failure_limit)),
                );
                all.sort_by(|a, b| a.dispatcher_id.cmp(&b.dispatcher_id));
            }
        }
        all
    }

    pub fn healthy_count(&self) -> usize {
        self.all().iter().filter(|h| h.healthy).count()
    }

    pub fn stale_count(&self) -> usize {
        self.all().iter().filter(|h| h.is_stale).count()
    }

    fn evaluate(&self, record: &Record, now: u64) -> DispatcherHealth {
        let heartbeat_age =
            Duration::from_nanos(now.saturating_sub(record.last_heartbeat.load(Ordering::Relaxed)));
        let started = record.started.load(Ordering::Relaxed);
        let uptime = if started == u64::MAX {
            Duration::ZERO
        } else {
            Duration::from_nanos(now.saturating_sub(started))
        };
        let state = record.state();
        let consecutive_failures = record.consecutive_failures.load(Ordering::Relaxed);
        let verdict = evaluate(Observation {
            heartbeat_age,
            stale_threshold: record.stale_threshold,
            consecutive_failures,
            failure_limit: self.inner.config.failure_limit,
            state,
        });
        DispatcherHealth {
            dispatcher_id: record.id.to_string(),
            healthy: verdict.healthy,
            is_stale: verdict.is_stale,
            heartbeat_age_seconds: heartbeat_age.as_secs_f64(),
            consecutive_failures,
            uptime_seconds: if state == State::Stopped {
                0.0
            } else {
                uptime.as_secs_f64()
            },
            state,
            critical: record.critical,
            origin: record.origin,
            stale_threshold_seconds: record.stale_threshold.as_secs_f64(),
            endpoint: record
                .endpoint
                .as_ref()
                .map(|url| crate::dispatchers::display_url(url.as_str())),
            reason: verdict.reason,
        }
    }
}

impl Record {
    pub fn id(&self) -> &str {
        &self.id
    }

    fn is_stale(&self, now: u64) -> bool {
        Duration::from_nanos(now.saturating_sub(self.last_heartbeat.load(Ordering::Relaxed)))
            > self.stale_threshold
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// A success resets the failure count.
    pub fn succeeded(&self) {
        // Skip the write when already zero, the common case, to keep the cache line shared.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    pub fn failed(&self) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health registry follows the circuit breakers: `degraded` while one is open or half-open.
impl crate::resilience::ResilienceObserver for HealthRegistry {
    fn breaker_state(&self, dispatcher_id: &str, state: crate::resilience::BreakerState) {
        let degraded = state != crate::resilience::BreakerState::Closed;
        // A dispatcher not registered (yet) has no state to change.
        let _ = self.set_degraded(dispatcher_id, degraded);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX - 1)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;

/// The store's clock now, from a snapshot read at `at`: its time moved on by the time since.
fn aged_now_ms(at: Instant, snapshot: &workers::Snapshot) -> u64 {
    let since = Instant::now().saturating_duration_since(at);
    snapshot
        .now_ms
        .saturating_add(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}
