//! The HTTP interface: liveness and readiness, ingest, `/metrics`, the stats API, and the
//! dispatcher health and lifecycle API.
//!
//! Owns: the axum `Router` with each route's declared access and load rule (`api_routes`),
//! request parsing, the JSON error shape and the mapping from a dispatch status to an HTTP
//! status.
//!
//! Invariants: every error answer is `{"error":{"code","message"}}` with a 4xx/5xx status,
//! including unknown paths, wrong methods and oversized bodies; nothing a client sends can
//! panic a handler; internal error text is never sent as is.
//!
//! Must not: hold any state of its own beyond what [`ApiState`] carries, or bind sockets (the
//! `app` binds; tests call [`router`] with `oneshot`).

mod dispatchers;
mod error;
mod guard;
mod messages;
mod observe;
mod openapi;
mod serve;
mod status;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::Scope;
use crate::bus::EventBus;
use crate::engine::Engine;
use crate::health::{DispatcherStats, HealthRegistry};
use crate::telemetry::Telemetry;
pub use error::ApiError;
pub use guard::Guard;
use guard::Routes;
pub use messages::{IngestBody, parse_envelope, status_code};
pub use serve::{ConnectionLimits, serve};
pub use status::{StatusReport, render as render_status};

/// What the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub engine: Engine,
    pub telemetry: Telemetry,
    pub health: HealthRegistry,
    /// Cancelled when shutdown begins: `/ready` answers 503 from then on.
    pub draining: CancellationToken,
    /// Where each dispatch's event is published; `None` publishes nothing.
    pub events: Option<Arc<dyn EventBus>>,
    pub started: Instant,
    /// Cancelled when the shutdown grace period ends: requests still dispatching then answer
    /// 503 instead of holding the process open.
    pub abandon: CancellationToken,
    /// Per-dispatcher counts, latency, last error and topic for `GET /api/v1/dispatchers/{id}`;
    /// `None` serves health alone.
    pub stats: Option<Arc<DispatcherStats>>,
    /// This instance's identity, shown by the status page; `None` for an embedded router.
    pub instance_id: Option<String>,
    /// Earlier call counts, for the status page's recent rates.
    pub recent: Arc<status::RecentCalls>,
    /// When nothing exports spans: each dispatch's trace context is made by this instead of by
    /// an ingest span through `tracing-opentelemetry` (the same ids, sampling and propagation;
    /// the `ingest` span is then only a log span, target `dispatchd::ingest`). `None`, the
    /// default, opens the `dispatchd::trace` ingest span.
    pub unexported: Option<Arc<crate::propagation::Unexported>>,
}

impl ApiState {
    pub fn new(
        engine: Engine,
        telemetry: Telemetry,
        health: HealthRegistry,
        draining: CancellationToken,
    ) -> ApiState {
        ApiState {
            engine,
            telemetry,
            health,
            draining,
            events: None,
            started: Instant::now(),
            abandon: CancellationToken::new(),
            stats: None,
            instance_id: None,
            recent: Arc::default(),
            unexported: None,
        }
    }
}

/// Builds the whole API, open to anyone and unbounded but for `max_body_bytes`: for tests and
/// embedders who guard it themselves. `serve` uses [`guarded_router`].
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    guarded_router(state, max_body_bytes, Guard::open())
}

/// The API behind `guard`: tokens by each route's declared scope, the body limits, the in-flight
/// bound and the request deadline.
pub fn guarded_router(state: ApiState, max_body_bytes: usize, guard: Guard) -> Router {
    assemble(api_routes(), state, max_body_bytes, guard)
}

/// Every route of the API, each with who may call it and whether the load bounds apply, and its
/// OpenAPI description (`routes!` takes the path and method from the handler's
/// `#[utoipa::path]`). A route added anywhere else needs the `admin` scope (see [`guard`]) and is
/// missing from `/api/v1/openapi.json`, which a test catches.
fn api_routes() -> Routes<Arc<ApiState>> {
    use guard::Access::{Metrics, Open, Scope as Needs};
    use guard::Load::{Bounded, Exempt};
    use utoipa::OpenApi;
    use utoipa_axum::routes;
    Routes::new(openapi::ApiDoc::openapi())
        .route(Open, Exempt, routes!(health))
        .route(Open, Exempt, routes!(dispatchers::ready))
        .route(Metrics, Exempt, routes!(observe::metrics))
        .route(Metrics, Bounded, routes!(observe::stats))
        .route(Metrics, Bounded, routes!(openapi::document))
        .route(Metrics, Bounded, routes!(status::page))
        .route(Metrics, Bounded, routes!(status::json))
        .route(Needs(Scope::Ingest), Bounded, routes!(messages::ingest))
        .route(Needs(Scope::Admin), Bounded, routes!(dispatchers::list))
        .route(Needs(Scope::Admin), Bounded, routes!(dispatchers::one))
        .route(Needs(Scope::Admin), Bounded, routes!(dispatchers::routes))
        .route(Needs(Scope::Admin), Bounded, routes!(dispatchers::register))
        .route(
            Needs(Scope::Admin),
            Bounded,
            routes!(dispatchers::heartbeat),
        )
        .route(
            Needs(Scope::Admin),
            Bounded,
            routes!(dispatchers::unregister),
        )
}

/// The OpenAPI 3.1 description of the API that [`router`] serves. `GET /api/v1/openapi.json`
/// answers it with the instance's own limits added (`[health] max_stale_threshold`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().router.into_openapi()
}

/// The router of `routes` behind `guard`, which reads their declared policies.
fn assemble(
    routes: Routes<Arc<ApiState>>,
    state: ApiState,
    max_body_bytes: usize,
    guard: Guard,
) -> Router {
    let Routes { router, policies } = routes;
    let (router, description) = router.split_for_parts();
    let document = openapi::Document::new(&description, state.health.config().max_stale_threshold);
    let durations = state.telemetry.http_metrics();
    // `layer` runs after routing, so the guard sees the matched route's template; it also times
    // the requests it lets through.
    router
        .layer(axum::Extension(document))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            guard.bind(policies, max_body_bytes, durations),
            guard::guard,
        ))
        // One `Arc` for the request to clone: the state's own clone takes two cancellation
        // tokens' locks and copies a string.
        .with_state(Arc::new(state))
}

/// The API of a process that only forwards events (`dispatchd sink`): `/health` and `/metrics`.
pub fn metrics_router(telemetry: Telemetry) -> Router {
    let started = Instant::now();
    Router::new()
        .route(
            "/health",
            get(move || async move {
                Json(json!({
                    "status": "ok",
                    "version": env!("CARGO_PKG_VERSION"),
                    "uptime_seconds": started.elapsed().as_secs_f64(),
                }))
            }),
        )
        .route("/metrics", get(observe::metrics_of))
        .fallback(error::not_found)
        .with_state(telemetry)
}

/// The liveness answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct Liveness {
    /// Always `ok`: any answer at all means alive.
    status: &'static str,
    version: &'static str,
    uptime_seconds: f64,
}

/// Liveness: answers while the process serves, whatever the dispatchers' state (readiness is
/// `/ready`).
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "probes",
    security(()),
    responses((status = 200, description = "The process serves", body = Liveness))
)]
async fn health(State(state): State<Arc<ApiState>>) -> Json<Liveness> {
    Json(Liveness {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    use super::guard::{Access, Load, Policy};
    use super::*;
    use crate::auth::{ApiToken, Secret, Tokens};

    const INGEST: &str = "ingest-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";
    const METRICS: &str = "metrics-token-0123456789";

    fn state() -> ApiState {
        ApiState::new(
            Engine::builder().build().unwrap(),
            Telemetry::disabled(),
            HealthRegistry::new(Default::default(), None),
            CancellationToken::new(),
        )
    }

    fn guard() -> Guard {
        let token = |name: &str, secret: &str, scope| ApiToken {
            name: name.into(),
            secret: Secret::new(secret),
            scopes: vec![scope],
        };
        Guard::new(
            Tokens::new(vec![
                token("ingest", INGEST, Scope::Ingest),
                token("admin", ADMIN, Scope::Admin),
                token("metrics", METRICS, Scope::Metrics),
            ]),
            16,
            std::time::Duration::from_secs(10),
            None,
        )
    }

    async fn status(router: &Router, method: Method, path: &str, bearer: Option<&str>) -> u16 {
        let mut request = Request::builder().method(method.clone()).uri(path);
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = if method == Method::POST {
            request = request.header("content-type", "application/json");
            Body::from(r#"{"message_type":"t"}"#)
        } else {
            Body::empty()
        };
        let response = router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        response.status().as_u16()
    }

    #[test]
    fn every_route_is_declared_with_its_access_and_load() {
        use Access::{Metrics, Open, Scope as Needs};
        use Load::{Bounded, Exempt};
        let expected = [
            ("/", Metrics, Bounded),
            ("/api/v1/status", Metrics, Bounded),
            ("/health", Open, Exempt),
            ("/ready", Open, Exempt),
            ("/metrics", Metrics, Exempt),
            ("/api/v1/stats", Metrics, Bounded),
            ("/api/v1/openapi.json", Metrics, Bounded),
            ("/api/v1/messages/{topic}", Needs(Scope::Ingest), Bounded),
            ("/api/v1/dispatchers", Needs(Scope::Admin), Bounded),
            ("/api/v1/dispatchers/{id}", Needs(Scope::Admin), Bounded),
            ("/api/v1/routes", Needs(Scope::Admin), Bounded),
            (
                "/api/v1/dispatchers/{id}/register",
                Needs(Scope::Admin),
                Bounded,
            ),
            (
                "/api/v1/dispatchers/{id}/heartbeat",
                Needs(Scope::Admin),
                Bounded,
            ),
            (
                "/api/v1/dispatchers/{id}/unregister",
                Needs(Scope::Admin),
                Bounded,
            ),
        ];
        let mut declared: Vec<_> = api_routes().policies.into_iter().collect();
        declared.sort_by(|a, b| a.0.cmp(&b.0));
        let mut expected: Vec<_> = expected
            .into_iter()
            .map(|(path, access, load)| (path.to_owned(), Policy { access, load }))
            .collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(declared, expected);
    }

    /// Each route, asked with no token, with each token: refused exactly as its scope says.
    #[tokio::test]
    async fn every_route_answers_by_its_scope() {
        let router = guarded_router(state(), 1024, guard());
        let table = [
            (Method::GET, "/health", None),
            (Method::GET, "/ready", None),
            (Method::GET, "/metrics", Some(METRICS)),
            (Method::GET, "/api/v1/stats", Some(METRICS)),
            (Method::GET, "/", Some(METRICS)),
            (Method::GET, "/api/v1/status", Some(METRICS)),
            (Method::GET, "/api/v1/openapi.json", Some(METRICS)),
            (Method::POST, "/api/v1/messages/a.b.events", Some(INGEST)),
            (Method::GET, "/api/v1/dispatchers", Some(ADMIN)),
            (Method::GET, "/api/v1/dispatchers/w", Some(ADMIN)),
            (Method::GET, "/api/v1/routes", Some(ADMIN)),
            (Method::POST, "/api/v1/dispatchers/w/register", Some(ADMIN)),
            (Method::POST, "/api/v1/dispatchers/w/heartbeat", Some(ADMIN)),
            (
                Method::POST,
                "/api/v1/dispatchers/w/unregister",
                Some(ADMIN),
            ),
        ];
        for (method, path, needed) in table {
            let anonymous = status(&router, method.clone(), path, None).await;
            for token in [INGEST, ADMIN, METRICS] {
                let got = status(&router, method.clone(), path, Some(token)).await;
                let allowed = needed.is_none_or(|needed| needed == token);
                assert_eq!(
                    allowed,
                    got != 403 && got != 401,
                    "{method} {path} with {token}: {got}"
                );
            }
            let open = needed.is_none();
            assert_eq!(open, anonymous != 401, "{method} {path}: {anonymous}");
        }
        // A path that is no route is a 404 to anyone.
        assert_eq!(status(&router, Method::GET, "/nowhere", None).await, 404);
    }

    /// Every `$ref` in `value` names something `document` has.
    fn unresolved_refs(document: &serde_json::Value, value: &serde_json::Value) -> Vec<String> {
        match value {
            serde_json::Value::Object(map) => map
                .iter()
                .flat_map(|(key, inner)| match (key.as_str(), inner.as_str()) {
                    ("$ref", Some(target)) => {
                        let pointer = target.trim_start_matches('#');
                        if document.pointer(pointer).is_some() {
                            Vec::new()
                        } else {
                            vec![target.to_owned()]
                        }
                    }
                    _ => unresolved_refs(document, inner),
                })
                .collect(),
            serde_json::Value::Array(items) => items
                .iter()
                .flat_map(|inner| unresolved_refs(document, inner))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The description and the route table are one: the same paths, one operation each, and the
    /// security each declares is the route's access.
    #[test]
    fn the_description_has_exactly_the_declared_routes_with_their_security() {
        let document = serde_json::to_value(openapi()).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        let routes = api_routes();
        let described: std::collections::BTreeSet<&str> = document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let declared: std::collections::BTreeSet<&str> =
            routes.policies.keys().map(String::as_str).collect();
        assert_eq!(described, declared);
        for (path, item) in document["paths"].as_object().unwrap() {
            let operations: Vec<_> = item.as_object().unwrap().iter().collect();
            assert_eq!(operations.len(), 1, "{path}: {operations:?}");
            let security = &operations[0].1["security"];
            let schemes: Vec<&str> = security
                .as_array()
                .unwrap_or_else(|| panic!("{path} declares its security"))
                .iter()
                .map(|requirement| {
                    if requirement.get("bearer").is_some() {
                        "bearer"
                    } else {
                        "none"
                    }
                })
                .collect();
            let expected: &[&str] = match routes.policies[path.as_str()].access {
                Access::Open => &["none"],
                Access::Metrics => &["none", "bearer"],
                Access::Scope(_) => &["bearer"],
            };
            assert_eq!(schemes, expected, "{path}");
        }
        assert_eq!(unresolved_refs(&document, &document), Vec::<String>::new());
        assert!(document.pointer(openapi::STALE_THRESHOLD).is_some());
    }

    /// The served document is the description, with this instance's limits.
    #[tokio::test]
    async fn the_served_description_states_this_instances_limits() {
        let health = crate::health::HealthConfig {
            max_stale_threshold: std::time::Duration::from_secs(600),
            ..Default::default()
        };
        let mut state = state();
        state.health = HealthRegistry::new(health, None);
        let response = router(state, 1024)
            .oneshot(
                Request::builder()
                    .uri("/api/v1/openapi.json")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let field = document.pointer(openapi::STALE_THRESHOLD).unwrap();
        assert_eq!(field["maximum"], 600.0);
        assert_eq!(field["minimum"], 0.001);
        assert_eq!(
            document["paths"].as_object().unwrap().len(),
            api_routes().policies.len()
        );
    }

    /// A route that reaches the router without being declared with `Routes::route` is not
    /// open: it needs the admin scope once any token exists.
    #[tokio::test]
    async fn a_route_added_without_declaring_its_scope_is_closed() {
        let extended = || {
            let mut routes = api_routes();
            routes.router = routes
                .router
                .route("/api/v1/extra", get(|| async { "extra" }));
            routes
        };
        let router = assemble(extended(), state(), 1024, guard());
        assert_eq!(
            status(&router, Method::GET, "/api/v1/extra", None).await,
            401
        );
        for token in [INGEST, METRICS] {
            let got = status(&router, Method::GET, "/api/v1/extra", Some(token)).await;
            assert_eq!(got, 403, "{token}");
        }
        let admin = status(&router, Method::GET, "/api/v1/extra", Some(ADMIN)).await;
        assert_eq!(admin, 200);
        // With no token configured at all the API is open, that route too.
        let open = assemble(extended(), state(), 1024, Guard::open());
        assert_eq!(status(&open, Method::GET, "/api/v1/extra", None).await, 200);
    }
}
