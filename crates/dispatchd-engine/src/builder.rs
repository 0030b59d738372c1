//! The builder: registration and every check, so that a built engine cannot be misconfigured.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::dispatcher::{Dispatcher, Kind};
use super::instrument::{Hooks, InstrumentationStrategy, TraceContext};
use super::pattern::{PatternError, TopicPattern};
use super::redact::Redactor;
use super::route::{CompiledRoute, Route};
use super::topic::Category;
use super::{Engine, Inner, OutputPublisher};

/// The longest dispatcher or route id, in bytes. Ids are metric label values.
pub const MAX_ID_LEN: usize = 128;

/// One thing wrong with what was registered.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildProblem {
    #[error("dispatcher id `{0}` must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_.-]")]
    InvalidDispatcherId(String),
    #[error("dispatcher `{0}` is registered twice")]
    DuplicateDispatcher(String),
    #[error("dispatcher `{0}` has a zero timeout")]
    ZeroTimeout(String),
    #[error(
        "dispatcher `{0}` has category command but no command adapter (use Dispatcher::command)"
    )]
    CommandWithoutAdapter(String),
    #[error("dispatcher `{0}` has policies but policies apply only to command dispatchers")]
    PolicyOutsideCommand(String),
    #[error("route id `{0}` must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_.-]")]
    InvalidRouteId(String),
    #[error("route `{0}` is registered twice")]
    DuplicateRoute(String),
    #[error("route `{route}` names dispatcher `{dispatcher}`, which is not registered")]
    UnknownDispatcher { route: String, dispatcher: String },
    #[error(
        "route `{route}` has category {route_category} but its dispatcher `{dispatcher}` has category {dispatcher_category}"
    )]
    CategoryMismatch {
        route: String,
        route_category: Category,
        dispatcher: String,
        dispatcher_category: Category,
    },
    #[error("route `{route}` has an invalid topic pattern `{pattern}`: {source}")]
    InvalidPattern {
        route: String,
        pattern: String,
        source: PatternError,
    },
    #[error(
        "route `{route}` filters on message type `{message_type}`, which its dispatcher `{dispatcher}` does not accept, so it can never match"
    )]
    UnreachableMessageType {
        route: String,
        message_type: String,
        dispatcher: String,
    },
    #[error(
        "route `{route}` can never match: no topic matching `{pattern}` has category {category} (a topic's category is one whole segment such as `{segment}`)"
    )]
    UnreachablePattern {
        route: String,
        pattern: String,
        category: Category,
        segment: &'static str,
    },
}

/// Everything wrong with a registration, found in one pass so a user fixes it all at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    pub problems: Vec<BuildProblem>,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, problem) in self.problems.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BuildError {}

/// Registers dispatchers and routes, then freezes them into an [`Engine`].
#[derive(Default)]
pub struct EngineBuilder {
    dispatchers: Vec<Dispatcher>,
    routes: Vec<Route>,
    strategy: Option<Arc<dyn InstrumentationStrategy>>,
    publisher: Option<Arc<dyn OutputPublisher>>,
    trace_context: Option<Arc<dyn TraceContext>>,
    redactor: Redactor,
}

impl EngineBuilder {
    pub fn new() -> EngineBuilder {
        EngineBuilder::default()
    }

    pub fn dispatcher(mut self, dispatcher: Dispatcher) -> EngineBuilder {
        self.dispatchers.push(dispatcher);
        self
    }

    pub fn route(mut self, route: Route) -> EngineBuilder {
        self.routes.push(route);
        self
    }

    /// The strategy that observes every dispatch. One at most; compose several with
    /// `instrumentation::Composite`.
    pub fn instrumentation(mut self, strategy: Arc<dyn InstrumentationStrategy>) -> EngineBuilder {
        self.strategy = Some(strategy);
        self
    }

    /// Where handler outputs go. Without one, outputs are only returned in the result.
    pub fn publisher(mut self, publisher: Arc<dyn OutputPublisher>) -> EngineBuilder {
        self.publisher = Some(publisher);
        self
    }

    /// What instrumentation strategies see of command params: values of keys naming a secret
    /// are masked. The default masks [`super::DEFAULT_DENY`].
    pub fn redactor(mut self, redactor: Redactor) -> EngineBuilder {
        self.redactor = redactor;
        self
    }

    /// Names the trace in each result and carries it into output headers.
    pub fn trace_context(mut self, trace_context: Arc<dyn TraceContext>) -> EngineBuilder {
        self.trace_context = Some(trace_context);
        self
    }

    /// The ids of the dispatchers registered so far, in registration order: the order of
    /// [`super::DispatcherRef::index`] once built.
    pub fn dispatcher_ids(&self) -> impl Iterator<Item = &str> {
        self.dispatchers.iter().map(|d| d.id())
    }

    /// Validates everything and freezes it. Reports every problem, not only the first.
    pub fn build(self) -> Result<Engine, BuildError> {
        let mut problems = Vec::new();
        let mut index_of: HashMap<&str, usize> = HashMap::new();
        for (index, dispatcher) in self.dispatchers.iter().enumerate() {
            let id = dispatcher.id();
            if !is_valid_id(id) {
                problems.push(BuildProblem::InvalidDispatcherId(id.to_owned()));
            }
            if index_of.insert(id, index).is_some() {
                problems.push(BuildProblem::DuplicateDispatcher(id.to_owned()));
            }
            if dispatcher.timeout == Duration::ZERO {
                problems.push(BuildProblem::ZeroTimeout(id.to_owned()));
            }
            let is_command = matches!(dispatcher.kind, Kind::Command(_));
            if dispatcher.category == Category::Command && !is_command {
                problems.push(BuildProblem::CommandWithoutAdapter(id.to_owned()));
            }
            if !is_command && !dispatcher.policies.is_empty() {
                problems.push(BuildProblem::PolicyOutsideCommand(id.to_owned()));
            }
        }

        let mut routes_by_category: [Vec<CompiledRoute>; 3] = Default::default();
        let mut seen_routes = HashMap::new();
        for route in &self.routes {
            let name = route.route_id.as_str();
            if !is_valid_id(name) {
                problems.push(BuildProblem::InvalidRouteId(name.to_owned()));
            }
            if seen_routes.insert(name, ()).is_some() {
                problems.push(BuildProblem::DuplicateRoute(name.to_owned()));
            }
            let pattern = match route.topic_pattern.parse::<TopicPattern>() {
                Ok(pattern) if !pattern.can_match(route.message_category) => {
                    problems.push(BuildProblem::UnreachablePattern {
                        route: name.to_owned(),
                        pattern: route.topic_pattern.clone(),
                        category: route.message_category,
                        segment: route.message_category.segment(),
                    });
                    None
                }
                Ok(pattern) => Some(pattern),
                Err(source) => {
                    problems.push(BuildProblem::InvalidPattern {
                        route: name.to_owned(),
                        pattern: route.topic_pattern.clone(),
                        source,
                    });
                    None
                }
            };
            let Some(&dispatcher) = index_of.get(route.dispatcher_id.as_str()) else {
                problems.push(BuildProblem::UnknownDispatcher {
                    route: name.to_owned(),
                    dispatcher: route.dispatcher_id.clone(),
                });
                continue;
            };
            let target = &self.dispatchers[dispatcher];
            if target.category != route.message_category {
                problems.push(BuildProblem::CategoryMismatch {
                    route: name.to_owned(),
                    route_category: route.message_category,
                    dispatcher: route.dispatcher_id.clone(),
                    dispatcher_category: target.category,
                });
                continue;
            }
            if let Some(message_type) = &route.message_type {
                if !target.accepts_type(message_type) {
                    problems.push(BuildProblem::UnreachableMessageType {
                        route: name.to_owned(),
                        message_type: message_type.clone(),
                        dispatcher: route.dispatcher_id.clone(),
                    });
                }
            }
            if let (Some(pattern), true) = (pattern, route.enabled) {
                routes_by_category[category_slot(route.message_category)].push(CompiledRoute {
                    route_id: name.into(),
                    pattern,
                    dispatcher,
                    message_type: route.message_type.as_deref().map(Into::into),
                });
            }
        }

        if !problems.is_empty() {
            return Err(BuildError { problems });
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                dispatchers: self.dispatchers.into_boxed_slice(),
                routes: self.routes.into_boxed_slice(),
                routes_by_category: routes_by_category.map(Vec::into_boxed_slice),
                hooks: Hooks::new(self.strategy),
                publisher: self.publisher,
                trace_context: self.trace_context,
                redactor: self.redactor,
            }),
        })
    }
}

pub(crate) fn category_slot(category: Category) -> usize {
    match category {
        Category::Event => 0,
        Category::Command => 1,
        Category::Intent => 2,
    }
}

/// `[A-Za-z0-9_.-]{1,128}`: safe as a metric label, a log field and a URL path segment.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
