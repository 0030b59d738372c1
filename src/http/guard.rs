//! What stands between a client and a handler: access control, early refusals, load shedding and
//! the request deadline.
//!
//! Who may call a route is declared with the route ([`Routes::route`]), in one table the guard
//! reads by the matched route template. A route that reaches the router any other way is in no
//! table and needs the `admin` scope: closed by default. A path that matches no route is a 404
//! to anyone.
//!
//! Order, outermost first: the token check (cheapest, and an unauthenticated caller must not take
//! a slot), the declared body length (413 before a byte of the body is read), then for routes
//! under the load bounds, within the request deadline: the body is received (size, minimum rate),
//! then the in-flight bound (a full server answers at once instead of queueing), then the
//! handler, timed into `http_server_request_duration_seconds` by its route template. The body is
//! received before the in-flight permit is taken, so a client that trickles its body holds a
//! connection, never one of the permits dispatching needs. `/health`, `/ready` and `/metrics` are
//! never shed or timed out: they are how an operator sees an overloaded process.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

use super::error::ApiError;
use super::serve::ConnectionActivity;
use crate::auth::{Denied, Scope, Tokens};
use crate::telemetry::HttpMetrics;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Anyone, always (orchestrators probe these).
    Open,
    /// Anyone until some token has the `metrics` scope; then that scope.
    Metrics,
    /// A token with this scope, once any token is configured.
    Scope(Scope),
}

/// Whether the load bounds (request deadline, body limits, in-flight bound) apply to a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Load {
    Bounded,
    /// Never shed or timed out.
    Exempt,
}

/// A route's access and load rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Policy {
    pub(super) access: Access,
    pub(super) load: Load,
}

/// For a route that is in the router but was not declared with [`Routes::route`].
const UNDECLARED: Policy = Policy {
    access: Access::Scope(Scope::Admin),
    load: Load::Bounded,
};

/// For a path that matches no route: the 404 fallback.
const UNMATCHED: Policy = Policy {
    access: Access::Open,
    load: Load::Bounded,
};

/// A router whose every route was declared with its [`Policy`] and described in the OpenAPI
/// document: [`Routes::route`] takes a handler with its `#[utoipa::path]` (through
/// `utoipa_axum::routes!`), so a route cannot be added here without its description, and the
/// path the router matches is the path the description names.
pub(super) struct Routes<S> {
    pub(super) router: OpenApiRouter<S>,
    pub(super) policies: HashMap<String, Policy>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub(super) fn new(openapi: utoipa::openapi::OpenApi) -> Routes<S> {
        Routes {
            router: OpenApiRouter::with_openapi(openapi),
            policies: HashMap::new(),
        }
    }

    /// Adds the described handler(s) `methods` at their path, callable as `access` allows, under
    /// the load bounds or not.
    pub(super) fn route(
        mut self,
        access: Access,
        load: Load,
        methods: UtoipaMethodRouter<S>,
    ) -> Routes<S> {
        for path in methods.1.paths.keys() {
            self.policies.insert(path.clone(), Policy { access, load });
        }
        self.router = self.router.routes(methods);
        self
    }
}

/// The guard's configuration and counters. Cheap to clone.
#[derive(Clone)]
pub struct Guard {
    tokens: Arc<Tokens>,
    in_flight: Arc<Semaphore>,
    request_timeout: Duration,
    metrics: Option<HttpMetrics>,
    /// Where each request that reaches its route's handler is timed
    /// (`http_server_request_duration_seconds`): the API's telemetry, set by [`bind`](Self::bind).
    durations: Option<HttpMetrics>,
    min_body_rate: Option<BodyRate>,
    max_body_bytes: usize,
    /// The request line and headers, at most (431 as JSON past it).
    max_head_bytes: usize,
    policies: Arc<HashMap<String, Policy>>,
}

/// The rate a request body must keep once its grace period has passed.
#[derive(Debug, Clone, Copy)]
struct BodyRate {
    bytes_per_second: u64,
    grace: Duration,
}

impl Guard {
    pub fn new(
        tokens: Tokens,
        max_in_flight: usize,
        request_timeout: Duration,
        metrics: Option<HttpMetrics>,
    ) -> Guard {
        Guard {
            tokens: Arc::new(tokens),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            request_timeout,
            metrics,
            durations: None,
            min_body_rate: None,
            max_body_bytes: usize::MAX,
            max_head_bytes: usize::MAX,
            policies: Arc::default(),
        }
    }

    /// Answers 431 `head_too_large`, as JSON like every other error, to a request whose line and
    /// headers add up to more than `bytes`. (hyper's own limit, set above this one by `serve`,
    /// remains the backstop for heads too large to buffer; it answers 431 without a body.)
    pub fn max_header_bytes(mut self, bytes: usize) -> Guard {
        self.max_head_bytes = bytes;
        self
    }

    /// Answers 408 `body_too_slow` to a request whose body, once `grace` has passed, has
    /// arrived at fewer than `bytes_per_second` on average since the request began. 0 turns
    /// the check off (the default).
    pub fn min_body_rate(mut self, bytes_per_second: u64, grace: Duration) -> Guard {
        self.min_body_rate = (bytes_per_second > 0).then_some(BodyRate {
            bytes_per_second,
            grace,
        });
        self
    }

    /// No tokens, a large bound and a long deadline: what `router` installs by default.
    pub fn open() -> Guard {
        Guard::new(
            Tokens::default(),
            Semaphore::MAX_PERMITS,
            Duration::from_secs(3600),
            None,
        )
    }

    /// The guard of one router: its routes' policies, its body limit and where it times requests.
    pub(super) fn bind(
        mut self,
        policies: HashMap<String, Policy>,
        max_body_bytes: usize,
        durations: Option<HttpMetrics>,
    ) -> Guard {
        self.policies = Arc::new(policies);
        self.max_body_bytes = max_body_bytes;
        self.durations = durations;
        self
    }

    /// The policy of the route a request matched.
    fn policy(&self, route: Option<&MatchedPath>) -> Policy {
        match route {
            Some(path) => self
                .policies
                .get(path.as_str())
                .copied()
                .unwrap_or(UNDECLARED),
            None => UNMATCHED,
        }
    }

    /// The scope a request needs, or `None` when it is open to anyone.
    fn scope(&self, access: Access) -> Option<Scope> {
        if self.tokens.is_empty() {
            return None;
        }
        match access {
            Access::Open => None,
            Access::Metrics => self
                .tokens
                .any_with(Scope::Metrics)
                .then_some(Scope::Metrics),
            Access::Scope(scope) => Some(scope),
        }
    }

    fn shed(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.shed(reason);
        }
    }

    /// Runs the route's handler; with `durations`, times it into
    /// `http_server_request_duration_seconds` by the matched route's template (never the raw
    /// path, so a client cannot create series). Measured from here, once the guard let the
    /// request through, to the response; requests the guard refused are counted by their own
    /// metrics instead. Here rather than in a middleware layer of its own: each `from_fn` layer
    /// clones the service below it and boxes two futures per request.
    async fn run(&self, route: Option<MatchedPath>, request: Request, next: Next) -> Response {
        match (&self.durations, route) {
            (Some(durations), Some(route)) => durations.time(route.as_str(), request, next).await,
            _ => next.run(request).await,
        }
    }

    /// The body (within its limits), then a permit, then the handler.
    async fn bounded(&self, route: Option<MatchedPath>, request: Request, next: Next) -> Response {
        let (parts, body) = request.into_parts();
        // While the body arrives the connection may be evicted to make room (`serve`).
        let mut upload = parts
            .extensions
            .get::<ConnectionActivity>()
            .map(ConnectionActivity::upload);
        let received = receive(body, self.max_body_bytes, self.min_body_rate, |bytes| {
            if let Some(upload) = upload.as_mut() {
                upload.received(bytes);
            }
        });
        let body = match received.await {
            Ok(body) => body,
            Err(refusal) => {
                if refusal == Refusal::TooSlow {
                    self.shed("body_too_slow");
                }
                return refusal.into_response();
            }
        };
        if upload.is_some_and(|upload| !upload.finish()) {
            // Its connection was chosen to make room while the body arrived: the answer is
            // most likely lost with it, but the request goes no further.
            return overloaded("dispatchd is at server.max_connections; retry shortly");
        }
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            self.shed("in_flight");
            return overloaded(
                "dispatchd is handling as many requests as it allows; retry shortly",
            );
        };
        self.run(route, Request::from_parts(parts, Body::from(body)), next)
            .await
    }
}

pub(super) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if head_bytes(&request) > guard.max_head_bytes {
        return ApiError::HeadTooLarge.into_response();
    }
    // A reference-counted string: no copy of the template per request.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let policy = guard.policy(route.as_ref());
    if let Some(scope) = guard.scope(policy.access) {
        let authorization = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if let Err(denied) = guard.tokens.check(authorization, scope) {
            if let Some(metrics) = &guard.metrics {
                metrics.auth_failed(denied.as_str());
            }
            return refused(denied);
        }
    }
    // hyper's hint is exact when the client declared a Content-Length.
    if request.body().size_hint().lower() > guard.max_body_bytes as u64 {
        return Refusal::TooLarge.into_response();
    }
    if policy.load == Load::Exempt {
        return guard.run(route, request, next).await;
    }
    match tokio::time::timeout(guard.request_timeout, guard.bounded(route, request, next)).await {
        Ok(response) => response,
        Err(_) => {
            guard.shed("timeout");
            ApiError::RequestTimeout.into_response()
        }
    }
}

/// The size of the request line and headers as an HTTP/1.1 client sent them.
fn head_bytes(request: &Request) -> usize {
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n ".len();
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len())
        .sum();
    line + headers + 2
}

/// 503 `overloaded` with `Retry-After`.
fn overloaded(message: &'static str) -> Response {
    ApiError::Overloaded(message).into_response()
}

/// Why a body was refused while it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    TooLarge,
    TooSlow,
    /// The client went away or broke the framing.
    Unreadable,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::TooLarge => ApiError::PayloadTooLarge,
            Refusal::TooSlow => ApiError::BodyTooSlow,
            Refusal::Unreadable => {
                ApiError::InvalidBody("the request body could not be read".to_owned())
            }
        }
        .into_response()
    }
}

/// Reads the whole body, refusing it past `limit` bytes or, with a `rate`, as soon as it has
/// fallen behind: once the grace period has passed, the bytes received must keep up with
/// `bytes_per_second` times the time since the grace period ended.
async fn receive(
    body: Body,
    limit: usize,
    rate: Option<BodyRate>,
    mut received_chunk: impl FnMut(usize),
) -> Result<Bytes, Refusal> {
    let started = Instant::now();
    let mut stream = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    loop {
        let next = match rate {
            None => stream.next().await,
            Some(rate) => {
                let owed = Duration::from_secs_f64(received as f64 / rate.bytes_per_second as f64);
                let deadline = started + rate.grace + owed;
                // Biased: the body first, so a chunk already received never registers the
                // deadline's timer (a timer earlier than the runtime's next wake-up writes to
                // its eventfd: a system call per request, for a body that was all there).
                tokio::select! {
                    biased;
                    next = stream.next() => next,
                    () = tokio::time::sleep_until(deadline) => return Err(Refusal::TooSlow),
                }
            }
        };
        match next {
            None => break,
            Some(Ok(chunk)) => {
                received += chunk.len();
                received_chunk(chunk.len());
                if received > limit {
                    return Err(Refusal::TooLarge);
                }
                chunks.push(chunk);
            }
            Some(Err(_)) => return Err(Refusal::Unreadable),
        }
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// 401 for no token or an unknown one (the same answer for both: no hint about which tokens
/// exist), 403 for a known token without the scope.
fn refused(denied: Denied) -> Response {
    match denied {
        Denied::Missing | Denied::Invalid => ApiError::Unauthorized,
        Denied::Forbidden => ApiError::Forbidden,
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body sent as `(delay before the chunk, chunk size)` pairs, on paused time.
    fn trickle(chunks: Vec<(Duration, usize)>) -> Body {
        let stream = futures::stream::unfold(chunks.into_iter(), |mut chunks| async move {
            let (delay, size) = chunks.next()?;
            tokio::time::sleep(delay).await;
            Some((
                Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size])),
                chunks,
            ))
        });
        Body::from_stream(stream)
    }

    const RATE: Option<BodyRate> = Some(BodyRate {
        bytes_per_second: 100,
        grace: Duration::from_secs(5),
    });

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_the_rate_is_received_whole() {
        // 100 bytes a second from the start: always ahead of the requirement.
        let body = trickle((0..10).map(|_| (Duration::from_secs(1), 100)).collect());
        let received = receive(body, 10_000, RATE, |_| {}).await.unwrap();
        assert_eq!(received.len(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_gets_its_grace_period_then_must_keep_up() {
        // Nothing for 4.9 s is within the grace period; 200 bytes then buy two more seconds.
        let started = Instant::now();
        let body = trickle(vec![
            (Duration::from_millis(4900), 200),
            (Duration::from_secs(60), 1),
        ]);
        assert_eq!(
            receive(body, 10_000, RATE, |_| {}).await,
            Err(Refusal::TooSlow)
        );
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn one_byte_every_two_seconds_is_refused_after_the_grace_period() {
        let started = Instant::now();
        let body = trickle((0..100).map(|_| (Duration::from_secs(2), 1)).collect());
        assert_eq!(
            receive(body, 10_000, RATE, |_| {}).await,
            Err(Refusal::TooSlow)
        );
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_rate_only_the_size_is_bounded() {
        let slow = trickle(vec![(Duration::from_secs(600), 10)]);
        assert_eq!(receive(slow, 10, None, |_| {}).await.unwrap().len(), 10);
        let large = trickle(vec![(Duration::ZERO, 6), (Duration::ZERO, 5)]);
        assert_eq!(
            receive(large, 10, None, |_| {}).await,
            Err(Refusal::TooLarge)
        );
    }
}
