//! The one error type of the HTTP API: every refusal a handler, an extractor or the guard can
//! answer, each with its status and stable code, all rendered as
//! `{"error":{"code","message"}}`.

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openapi::{ErrorBody, ErrorDetail};

use crate::health::RegisterError;
use crate::telemetry::RenderError;

/// The longest client-supplied text (a path segment, a parser's message) echoed in an error.
const MAX_ECHO_CHARS: usize = 200;

/// An error answer. The message is safe to show the client: internal error text never reaches
/// it, and what the client sent is echoed capped and sanitized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("no such endpoint")]
    NotFound,
    #[error("this endpoint does not accept that method")]
    MethodNotAllowed,
    /// The path's `{topic}` could not be read.
    #[error("{0}")]
    InvalidTopic(String),
    /// The body is not JSON at all.
    #[error("{0}")]
    InvalidJson(String),
    /// JSON, but not a valid envelope.
    #[error("{0}")]
    InvalidEnvelope(String),
    /// JSON, but not a valid registration.
    #[error("{0}")]
    InvalidRegistration(String),
    /// The body could not be read (the client went away or broke the framing).
    #[error("{0}")]
    InvalidBody(String),
    #[error("the request body is larger than server.max_body_bytes")]
    PayloadTooLarge,
    #[error("the request head (request line and headers) is larger than server.max_header_bytes")]
    HeadTooLarge,
    #[error("the request body arrived slower than server.min_body_rate")]
    BodyTooSlow,
    #[error("send the body as JSON with content-type: application/json")]
    UnsupportedMediaType,
    #[error("a dispatcher id is 1 to 128 characters of [A-Za-z0-9_.-]")]
    InvalidDispatcherId,
    #[error("no dispatcher `{0}` is registered")]
    UnknownDispatcher(String),
    /// A worker call on a dispatcher of this process.
    #[error("`{0}` is a dispatcher of this process; it heartbeats by itself")]
    InProcessDispatcher(String),
    #[error("{0}")]
    TooManyWorkers(String),
    /// The shared dispatcher registry (Redis) cannot be reached.
    #[error("{0}")]
    RegistryUnavailable(String),
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("this token does not allow this request")]
    Forbidden,
    #[error("{0}")]
    Overloaded(&'static str),
    #[error(
        "the request was not answered within server.request_timeout; it may have been dispatched in part"
    )]
    RequestTimeout,
    #[error("dispatchd shut down before this dispatch finished; it may have run in part")]
    ShuttingDown,
    #[error("metrics are disabled in this configuration (metrics.enabled = false)")]
    MetricsDisabled,
    #[error("the metrics could not be encoded")]
    MetricsEncodingFailed,
    #[error("{0}")]
    MetricsUnavailable(&'static str),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound | ApiError::UnknownDispatcher(_) | ApiError::MetricsDisabled => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidTopic(_)
            | ApiError::InvalidJson(_)
            | ApiError::InvalidBody(_)
            | ApiError::InvalidDispatcherId => StatusCode::BAD_REQUEST,
            ApiError::InvalidEnvelope(_) | ApiError::InvalidRegistration(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InProcessDispatcher(_) => StatusCode::CONFLICT,
            ApiError::TooManyWorkers(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Overloaded(_)
            | ApiError::RequestTimeout
            | ApiError::ShuttingDown
            | ApiError::RegistryUnavailable(_)
            | ApiError::MetricsUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MetricsEncodingFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidTopic(_) => "invalid_topic",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidEnvelope(_) => "invalid_envelope",
            ApiError::InvalidRegistration(_) => "invalid_registration",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::HeadTooLarge => "head_too_large",
            ApiError::BodyTooSlow => "body_too_slow",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::InvalidDispatcherId => "invalid_dispatcher_id",
            ApiError::UnknownDispatcher(_) => "unknown_dispatcher",
            ApiError::InProcessDispatcher(_) => "in_process_dispatcher",
            ApiError::TooManyWorkers(_) => "too_many_workers",
            ApiError::RegistryUnavailable(_) => "registry_unavailable",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::MetricsDisabled => "metrics_disabled",
            ApiError::MetricsEncodingFailed => "metrics_encoding_failed",
            ApiError::MetricsUnavailable(_) => "metrics_unavailable",
        }
    }

    /// Why a JSON body could not be read as `what` (`envelope`, `registration`): 400
    /// `invalid_json` when it is not JSON, 422 when it is JSON of the wrong shape, the same on
    /// every endpoint. A body that is JSON but not an object is said to be so, rather than
    /// reported at its first element.
    pub fn from_json(body: &[u8], error: &serde_json::Error, what: &str) -> ApiError {
        let shape = |message: String| match what {
            "registration" => ApiError::InvalidRegistration(message),
            _ => ApiError::InvalidEnvelope(message),
        };
        match error.classify() {
            serde_json::error::Category::Data => {
                let first = body.iter().find(|b| !b.is_ascii_whitespace());
                if first != Some(&b'{') {
                    return shape(format!(
                        "the body must be a JSON object (the {what}), not {}",
                        json_kind(first.copied())
                    ));
                }
                shape(echo(&format!("the body is not a valid {what}: {error}")))
            }
            _ => ApiError::InvalidJson(echo(&format!("the body is not JSON: {error}"))),
        }
    }
}

fn json_kind(first: Option<u8>) -> &'static str {
    match first {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Client-supplied text as an error may show it: secrets masked, at most [`MAX_ECHO_CHARS`].
pub(super) fn echo(text: &str) -> String {
    let clean = crate::engine::sanitize(text);
    match clean.char_indices().nth(MAX_ECHO_CHARS) {
        None => clean.into_owned(),
        Some((end, _)) => format!("{}…", &clean[..end]),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = (self.status(), Json(body)).into_response();
        match self {
            ApiError::Unauthorized => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"dispatchd\""),
                );
            }
            ApiError::Overloaded(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> ApiError {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            _ => ApiError::InvalidBody(echo(&rejection.body_text())),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::InvalidTopic(echo(&rejection.body_text()))
    }
}

impl From<RegisterError> for ApiError {
    fn from(error: RegisterError) -> ApiError {
        match error {
            RegisterError::InvalidId(_) => ApiError::InvalidDispatcherId,
            RegisterError::LimitReached(_) => ApiError::TooManyWorkers(error.to_string()),
            RegisterError::InProcess(id) => ApiError::InProcessDispatcher(id),
            RegisterError::InvalidThreshold(_) => ApiError::InvalidRegistration(error.to_string()),
        }
    }
}

impl From<RenderError> for ApiError {
    fn from(error: RenderError) -> ApiError {
        match error {
            RenderError::Disabled => ApiError::MetricsDisabled,
            RenderError::Unavailable(_) => {
                ApiError::MetricsUnavailable("the metrics exporter is unavailable")
            }
            RenderError::Encode(_) => ApiError::MetricsEncodingFailed,
        }
    }
}

/// The request body, whose rejections are [`ApiError`]s.
pub(super) struct Body(pub(super) axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body, ApiError> {
        Ok(Body(axum::body::Bytes::from_request(request, state).await?))
    }
}

/// A path parameter, whose rejections are [`ApiError`]s.
pub(super) struct PathParam(pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<PathParam, ApiError> {
        let axum::extract::Path(value) =
            axum::extract::Path::<String>::from_request_parts(parts, state).await?;
        Ok(PathParam(value))
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_are_the_same_on_every_endpoint_and_say_what_is_wrong() {
        let error = |body: &str, what| {
            let parse: Result<serde_json::Value, _> = serde_json::from_str(body);
            let err = match parse {
                Err(e) => e,
                Ok(_) => serde_json::from_str::<std::collections::BTreeMap<String, u8>>(body)
                    .unwrap_err(),
            };
            let api = ApiError::from_json(body.as_bytes(), &err, what);
            (api.status(), api.code(), api.to_string())
        };
        let (status, code, _) = error("{not json", "envelope");
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, "invalid_json"));
        let (status, code, _) = error("{not json", "registration");
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, "invalid_json"));
        let (status, code, message) = error("[1,2]", "envelope");
        assert_eq!(
            (status, code),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_envelope")
        );
        assert_eq!(
            message,
            "the body must be a JSON object (the envelope), not an array"
        );
        let (_, code, message) = error("\"x\"", "registration");
        assert_eq!(code, "invalid_registration");
        assert!(message.ends_with("not a string"), "{message}");
    }

    #[test]
    fn echoed_text_is_capped_and_masked() {
        let long = "t".repeat(6000);
        let shown = echo(&long);
        assert_eq!(shown.chars().count(), MAX_ECHO_CHARS + 1);
        assert!(echo("password=hunter2 went wrong").contains("***"));
    }

    #[test]
    fn every_error_renders_the_same_shape() {
        for error in [
            ApiError::NotFound,
            ApiError::HeadTooLarge,
            ApiError::Overloaded("busy"),
            ApiError::Unauthorized,
        ] {
            let status = error.status();
            let code = error.code();
            let response = error.into_response();
            assert_eq!(response.status(), status);
            assert!(!code.is_empty());
        }
    }
}
