//! The `worker` kind: each message is pushed to a remote worker's registered endpoint.
//!
//! The dispatcher's id is the worker's id. The endpoint comes from the worker's registration
//! (`POST /api/v1/dispatchers/{id}/register` with `endpoint`), looked up in the health registry
//! at every dispatch (a read), so a worker that registers again elsewhere, or through another
//! instance sharing the registry, is followed at once. The request and the reading of the answer
//! are the `http` kind's (`POST`, the [`super::WireMessage`] body, `idempotency-key`, trace
//! context; 2xx success with optional outputs, 408/429/5xx transient, other 4xx permanent).
//!
//! Only a worker that can take the message is called: one not registered, registered without an
//! endpoint, stale or stopped is not, and the outcome says why at once
//! ([`HandlerError::unavailable`]: result `rejected`, error code `worker_unavailable`) instead of
//! waiting out the timeout.

use async_trait::async_trait;

use super::{HttpTarget, trace_headers};
use crate::engine::{Handler, HandlerError, Message, OutputMessage};
use crate::health::HealthRegistry;

/// Pushes events and intents to the worker registered under its dispatcher id.
#[derive(Clone)]
pub struct WorkerDispatcher {
    client: reqwest::Client,
    registry: HealthRegistry,
    worker_id: std::sync::Arc<str>,
}

impl WorkerDispatcher {
    /// `client` is the shared one ([`super::http_client`]); `registry` is where workers register.
    pub fn new(
        client: reqwest::Client,
        registry: HealthRegistry,
        worker_id: impl Into<std::sync::Arc<str>>,
    ) -> WorkerDispatcher {
        WorkerDispatcher {
            client,
            registry,
            worker_id: worker_id.into(),
        }
    }
}

#[async_trait]
impl Handler for WorkerDispatcher {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let endpoint = self
            .registry
            .worker_endpoint(&self.worker_id)
            .map_err(|why| HandlerError::unavailable(why.to_string()))?;
        HttpTarget::post(endpoint)
            .call(&self.client, message, trace_headers(message))
            .await
    }
}
