//! Dispatchers: what a handler is, how it fails, and how it is registered.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::command::{CommandAdapter, Policy};
use super::envelope::{Envelope, OutputMessage};
use super::instrument::TraceSpan;
use super::topic::Category;
use crate::resilience::Protections;

/// The timeout a dispatcher gets when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a handler is given: the message and where it came from. Borrowed, because every
/// dispatcher of a fan-out reads the same message concurrently.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub category: Category,
    pub envelope: &'a Envelope,
    /// The dispatch this call is part of (`DispatchResult::dispatch_id`).
    pub dispatch_id: uuid::Uuid,
    /// The span of this dispatcher's call when the engine traces this dispatch: a handler that
    /// calls out propagates it with [`TraceSpan::inject`]. `None` when the engine opened no span
    /// (no tracer, not sampled); the caller's context is then the current `tracing` span's.
    pub trace: Option<&'a dyn TraceSpan>,
}

impl<'a> Message<'a> {
    /// A message outside any dispatch (tests, tools): a fresh dispatch id, no span.
    pub fn new(topic: &'a str, category: Category, envelope: &'a Envelope) -> Message<'a> {
        Message {
            topic,
            category,
            envelope,
            dispatch_id: uuid::Uuid::new_v4(),
            trace: None,
        }
    }
}

/// Whether trying again could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A passing condition (a timeout upstream, a connection reset): retrying may succeed.
    Transient,
    /// The message itself cannot be handled: retrying would fail the same way.
    Permanent,
    /// The dispatcher had no one to hand the message to (a remote worker that is stale or not
    /// registered) and did not try: the outcome is `rejected` (not now, retry later), with the
    /// dispatch's `error_code` `worker_unavailable`. Not retried within the dispatch, not counted
    /// by the circuit breaker, and not a failure of the dispatcher's health.
    Unavailable,
}

/// A handler's failure. Any `std::error::Error` converts into a transient one with `?`; use
/// [`HandlerError::permanent`] for failures no retry can fix. The message is sanitized before it
/// is stored or logged, but handlers should still not put secrets in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

impl HandlerError {
    pub fn transient(message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: ErrorKind::Transient,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: ErrorKind::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Nobody was there to take the message, so nothing was tried (see [`ErrorKind::Unavailable`]).
    pub fn unavailable(message: impl Into<String>) -> HandlerError {
        HandlerError {
            kind: ErrorKind::Unavailable,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The earliest the other side wants to be asked again (an HTTP `Retry-After`). A retry
    /// waits at least this long, capped by the retry policy's `max_backoff`; without a retry
    /// policy nothing is retried anyway.
    pub fn with_retry_after(mut self, retry_after: Duration) -> HandlerError {
        self.retry_after = Some(retry_after);
        self
    }

    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> HandlerError {
        HandlerError::transient(error.to_string())
    }
}

/// The extension point for event and intent dispatchers.
///
/// ```
/// use async_trait::async_trait;
/// use dispatchd_engine::{Handler, HandlerError, Message, OutputMessage};
///
/// struct Audit;
///
/// #[async_trait]
/// impl Handler for Audit {
///     async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
///         let confirmed = message.envelope.derive("audit.recorded", serde_json::json!({}));
///         Ok(vec![OutputMessage::new("audit.events", confirmed)])
///     }
/// }
/// ```
///
/// The engine runs the future under the dispatcher's timeout and drops it when time runs out, so
/// a handler must be cancel-safe at its await points. A panic is caught and reported as an
/// error of that dispatcher only.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError>;

    /// Says whether the handler can still do its work (its connection is up, its writer is
    /// alive). The service's lifecycle task calls it on every heartbeat interval and records a
    /// heartbeat only when it returns `Ok`, so a handler that cannot work goes stale. The default
    /// is always alive.
    async fn heartbeat(&self) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[derive(Clone)]
pub(crate) enum Kind {
    Handler(Arc<dyn Handler>),
    Command(Arc<dyn CommandAdapter>),
}

/// A dispatcher as registered with the builder: identity, what it accepts, and how it runs.
#[derive(Clone)]
pub struct Dispatcher {
    pub(crate) id: Arc<str>,
    /// `dispatcher <id>`, the name of its trace spans, made once.
    pub(crate) span_name: Arc<str>,
    pub(crate) category: Category,
    pub(crate) message_types: Option<BTreeSet<String>>,
    pub(crate) timeout: Duration,
    pub(crate) kind: Kind,
    /// Checked before a command adapter runs; the builder refuses them on other dispatchers.
    pub(crate) policies: Vec<Arc<dyn Policy>>,
    pub(crate) protections: Option<Arc<Protections>>,
}

impl Dispatcher {
    /// An event or intent dispatcher. The id is its name in routes, metrics and health, so it
    /// must be stable across restarts.
    pub fn new(id: impl Into<Arc<str>>, category: Category, handler: impl Handler) -> Dispatcher {
        Dispatcher::from_arc(id, category, Arc::new(handler))
    }

    pub fn from_arc(
        id: impl Into<Arc<str>>,
        category: Category,
        handler: Arc<dyn Handler>,
    ) -> Dispatcher {
        let id = id.into();
        Dispatcher {
            span_name: format!("dispatcher {id}").into(),
            id,
            category,
            message_types: None,
            timeout: DEFAULT_TIMEOUT,
            kind: Kind::Handler(handler),
            policies: Vec::new(),
            protections: None,
        }
    }

    /// A command dispatcher: every command passes the policies, in order, before the adapter
    /// runs.
    pub fn command(id: impl Into<Arc<str>>, adapter: impl CommandAdapter) -> Dispatcher {
        let id = id.into();
        Dispatcher {
            span_name: format!("dispatcher {id}").into(),
            id,
            category: Category::Command,
            message_types: None,
            timeout: DEFAULT_TIMEOUT,
            kind: Kind::Command(Arc::new(adapter)),
            policies: Vec::new(),
            protections: None,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Dispatcher {
        self.timeout = timeout;
        self
    }

    /// Accept only these message types (by default, all).
    pub fn with_message_types<I, S>(mut self, types: I) -> Dispatcher
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.message_types = Some(types.into_iter().map(Into::into).collect());
        self
    }

    /// Protects it with retries, a circuit breaker, a rate limit, a concurrency limit and
    /// de-duplication, as configured (see `crate::resilience` for the order they apply in).
    pub fn with_protections(mut self, protections: Protections) -> Dispatcher {
        self.protections = Some(Arc::new(protections));
        self
    }

    pub fn protections(&self) -> Option<&Protections> {
        self.protections.as_deref()
    }

    /// Adds a policy to a command dispatcher; the builder refuses it on any other.
    pub fn with_policy(mut self, policy: impl Policy) -> Dispatcher {
        self.policies.push(Arc::new(policy));
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn category(&self) -> Category {
        self.category
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Asks the handler or command adapter whether it is alive ([`Handler::heartbeat`]).
    pub async fn heartbeat(&self) -> Result<(), HandlerError> {
        match &self.kind {
            Kind::Handler(handler) => handler.heartbeat().await,
            Kind::Command(adapter) => adapter.heartbeat().await,
        }
    }

    pub(crate) fn accepts_type(&self, message_type: &str) -> bool {
        self.message_types
            .as_ref()
            .is_none_or(|types| types.contains(message_type))
    }
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("id", &self.id)
            .field("category", &self.category)
            .field("message_types", &self.message_types)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
