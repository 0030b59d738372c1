//! The sink plugins and their registry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Delivery, DispatchEvent, SendError, Sink, SinkError, Transform, parse_retry_after};

/// The plugins [`build`] knows, by `service` name.
pub const SERVICES: &[&str] = &["file", "http", "lunary", "helicone"];

/// Lunary's and Helicone's cloud ingestion hosts, used when no endpoint is given.
const LUNARY_DEFAULT: &str = "https://api.lunary.ai";
const HELICONE_DEFAULT: &str = "https://api.worker.helicone.ai";

/// The paths Lunary and Helicone ingest on, below their base URL.
const LUNARY_PATH: &str = "/v1/runs/ingest";
const HELICONE_PATH: &str = "/custom/v1/log";

/// The URL to post to from a configured `endpoint`: a base URL gets the service's path, a full
/// URL (what llm-proxy configurations hold, such as `https://api.lunary.ai/v1/runs/ingest`) is
/// taken as it is.
fn ingest_url(endpoint: &str, path: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with(path) {
        base.to_owned()
    } else {
        format!("{base}{path}")
    }
}

/// One configured sink.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// The `sink` label.
    pub name: String,
    /// One of [`SERVICES`].
    pub service: String,
    /// A path for `file`; a URL for `http`; for `lunary` and `helicone` a base URL or the full
    /// ingestion URL (default: their cloud).
    pub endpoint: Option<String>,
    pub api_key: Option<String>,
    /// Extra request headers (`http`).
    pub headers: BTreeMap<String, String>,
    /// Per request (HTTP plugins).
    pub timeout: Duration,
    /// `file`: sync the file after every batch.
    pub fsync: bool,
}

/// Builds the plugin a config names. Extend by matching your own `service` before calling this.
pub fn build(config: &SinkConfig) -> Result<Box<dyn Sink>, String> {
    let client = || {
        reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| format!("sink `{}`: {e}", config.name))
    };
    let endpoint = config.endpoint.clone();
    Ok(match config.service.as_str() {
        "file" => Box::new(FileSink::new(
            &config.name,
            endpoint.ok_or_else(|| {
                format!(
                    "sink `{}`: the file sink needs an endpoint (a path)",
                    config.name
                )
            })?,
            config.fsync,
        )),
        "http" => Box::new(HttpSink {
            name: config.name.clone(),
            url: endpoint.ok_or_else(|| {
                format!(
                    "sink `{}`: the http sink needs an endpoint (a URL)",
                    config.name
                )
            })?,
            headers: config.headers.clone(),
            client: client()?,
        }),
        "lunary" => Box::new(LunarySink {
            name: config.name.clone(),
            url: ingest_url(endpoint.as_deref().unwrap_or(LUNARY_DEFAULT), LUNARY_PATH),
            api_key: config
                .api_key
                .clone()
                .ok_or_else(|| format!("sink `{}`: lunary needs an api key", config.name))?,
            client: client()?,
        }),
        "helicone" => Box::new(HeliconeSink {
            name: config.name.clone(),
            url: ingest_url(
                endpoint.as_deref().unwrap_or(HELICONE_DEFAULT),
                HELICONE_PATH,
            ),
            api_key: config
                .api_key
                .clone()
                .ok_or_else(|| format!("sink `{}`: helicone needs an api key", config.name))?,
            client: client()?,
        }),
        other => {
            return Err(format!(
                "unknown sink service `{other}` (expected one of {})",
                SERVICES.join(", ")
            ));
        }
    })
}

/// Appends each event as a JSON line; optionally syncs after every batch.
pub struct FileSink {
    name: String,
    path: PathBuf,
    fsync: bool,
    file: Mutex<Option<tokio::fs::File>>,
}

impl FileSink {
    pub fn new(name: &str, path: impl Into<PathBuf>, fsync: bool) -> FileSink {
        FileSink {
            name: name.to_owned(),
            path: path.into(),
            fsync,
            file: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn init(&mut self) -> Result<(), SinkError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| SinkError::transient(e.to_string()))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(|e| SinkError::transient(format!("opening {}: {e}", self.path.display())))?;
        *self.file.lock().await = Some(file);
        Ok(())
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let mut lines = Vec::with_capacity(batch.len() * 512);
        for event in batch {
            // The identity transform, serialized straight from the struct: no intermediate Value.
            serde_json::to_writer(&mut lines, event)
                .map_err(|e| SinkError::permanent(e.to_string()))?;
            lines.push(b'\n');
        }
        let mut file = self.file.lock().await;
        let file = file
            .as_mut()
            .ok_or_else(|| SinkError::transient("the file is not open"))?;
        // One write of whole lines: a crash leaves whole lines, or a torn last one. tokio's
        // `File` answers a write before the blocking thread has done it; `flush` waits for it
        // and returns its error (a full disk), which would otherwise surface only on a later
        // batch while this one counted as delivered.
        file.write_all(&lines)
            .await
            .map_err(|e| SinkError::transient(e.to_string()))?;
        file.flush()
            .await
            .map_err(|e| SinkError::transient(e.to_string()))?;
        if self.fsync {
            file.sync_data()
                .await
                .map_err(|e| SinkError::transient(e.to_string()))?;
        }
        Ok(Delivery::default())
    }

    async fn close(&self) -> Result<(), SinkError> {
        if let Some(file) = self.file.lock().await.as_mut() {
            file.sync_all()
                .await
                .map_err(|e| SinkError::transient(e.to_string()))?;
        }
        Ok(())
    }
}

/// POSTs each batch as a JSON array.
pub struct HttpSink {
    name: String,
    url: String,
    headers: BTreeMap<String, String>,
    client: reqwest::Client,
}

/// Sends one request and classifies what came back.
async fn post(request: reqwest::RequestBuilder) -> Result<reqwest::Response, SinkError> {
    let response = request.send().await.map_err(|error| {
        // No answer (refused, reset, timed out): the request may not have arrived; retry.
        SinkError::transient(format!("no answer: {error}"))
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = response.text().await.unwrap_or_default();
    Err(SinkError::from_status(status.as_u16(), retry_after, &body))
}

#[async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        // The identity transform, serialized straight from the structs.
        let mut request = self.client.post(&self.url).json(batch);
        // The batch's span, linked to each event's trace (each event carries its own
        // `metadata.traceparent` in the body).
        let mut trace = BTreeMap::new();
        crate::propagation::inject_current(&mut trace);
        for (name, value) in &trace {
            request = request.header(name, value);
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        post(request).await?;
        Ok(Delivery::default())
    }
}

/// Lunary's run ingestion: `POST /v1/runs/ingest` with `{"events": [...]}` and the project's
/// public key as a bearer token. Each dispatch becomes a `start` event and an `end` (or `error`)
/// event of one run; Lunary answers per event, and a dispatch it refused is dead-lettered alone.
pub struct LunarySink {
    name: String,
    url: String,
    api_key: String,
    client: reqwest::Client,
}

/// Maps a dispatch to Lunary's run events.
#[derive(Debug, Default, Clone, Copy)]
pub struct LunaryTransform;

impl LunaryTransform {
    pub fn events(&self, event: &DispatchEvent) -> [Value; 2] {
        let duration_ms = event.metadata["duration_ms"].as_f64().unwrap_or(0.0);
        let started = event
            .timestamp
            .checked_sub(Duration::from_secs_f64(duration_ms.max(0.0) / 1000.0))
            .unwrap_or(event.timestamp);
        let mut start = json!({
            "type": event.kind,
            "event": "start",
            "runId": event.run_id,
            "name": event.name,
            "timestamp": humantime::format_rfc3339_millis(started).to_string(),
            "input": event.input,
            "tags": event.tags,
            "metadata": event.metadata,
        });
        if let Some(parent) = &event.parent_run_id {
            start["parentRunId"] = json!(parent);
        }
        if let Some(user) = &event.user_id {
            start["userId"] = json!(user);
        }
        let mut end = json!({
            "type": event.kind,
            "event": event.event,
            "runId": event.run_id,
            "timestamp": humantime::format_rfc3339_millis(event.timestamp).to_string(),
            "output": event.output,
        });
        if let Some(usage) = &event.tokens_usage {
            end["tokensUsage"] = usage.clone();
        }
        if event.event == "error" {
            end["error"] = json!({ "message": event.metadata["error_message"] });
        }
        [start, end]
    }
}

impl Transform for LunaryTransform {
    fn transform(&self, event: &DispatchEvent) -> Value {
        Value::Array(self.events(event).into())
    }
}

#[async_trait]
impl Sink for LunarySink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let events: Vec<Value> = batch
            .iter()
            .flat_map(|e| LunaryTransform.events(e))
            .collect();
        let request = self
            .client
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .json(&json!({ "events": events }));
        let response = post(request).await?;
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        // `{"results": [{"id": runId, "success": bool, "error": "..."}]}`; a run that already
        // exists was delivered by an earlier attempt, which is a success.
        let mut refused = Vec::new();
        for result in answer["results"].as_array().into_iter().flatten() {
            let failed = result["success"] == Value::Bool(false);
            let error = result["error"].as_str().unwrap_or("refused");
            if failed && !error.contains("already exists") {
                if let Some(index) = batch
                    .iter()
                    .position(|e| Some(e.run_id.as_str()) == result["id"].as_str())
                {
                    if !refused.iter().any(|(i, _)| *i == index) {
                        refused.push((
                            index,
                            format!("lunary refused run {}: {error}", batch[index].run_id),
                        ));
                    }
                }
            }
        }
        Ok(Delivery { refused })
    }
}

/// Helicone's custom logging: `POST /custom/v1/log`, one event per request, with the API key as a
/// bearer token. A failure part way through a batch reports how many went through, so they are
/// not sent twice.
pub struct HeliconeSink {
    name: String,
    url: String,
    api_key: String,
    client: reqwest::Client,
}

/// Maps a dispatch to Helicone's `HeliconeAsyncLogRequest`.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeliconeTransform;

fn timing(at: SystemTime) -> Value {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({ "seconds": since.as_secs(), "milliseconds": since.subsec_millis() })
}

impl Transform for HeliconeTransform {
    fn transform(&self, event: &DispatchEvent) -> Value {
        let duration_ms = event.metadata["duration_ms"].as_f64().unwrap_or(0.0);
        let started = event
            .timestamp
            .checked_sub(Duration::from_secs_f64(duration_ms.max(0.0) / 1000.0))
            .unwrap_or(event.timestamp);
        let mut meta = serde_json::Map::new();
        meta.insert("run_id".into(), json!(event.run_id));
        meta.insert("log_id".into(), json!(event.log_id));
        meta.insert("tags".into(), json!(event.tags.join(",")));
        if let Some(parent) = &event.parent_run_id {
            meta.insert("parent_run_id".into(), json!(parent));
        }
        if let Some(user) = &event.user_id {
            meta.insert("user_id".into(), json!(user));
        }
        let failed = event.event == "error";
        let mut response = json!({
            "_type": "data",
            "name": event.name,
            "status": if failed { "error" } else { "success" },
            "output": event.output,
        });
        if let Some(usage) = &event.tokens_usage {
            response["usage"] = usage.clone();
        }
        json!({
            "providerRequest": {
                "url": "custom-model-nopath",
                "json": { "_type": "data", "name": event.name, "type": event.kind, "input": event.input, "metadata": event.metadata },
                "meta": meta,
            },
            "providerResponse": {
                "json": response,
                "status": if failed { 500 } else { 200 },
                "headers": {},
            },
            "timing": { "startTime": timing(started), "endTime": timing(event.timestamp) },
        })
    }
}

#[async_trait]
impl Sink for HeliconeSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        for (sent, event) in batch.iter().enumerate() {
            let request = self
                .client
                .post(&self.url)
                .bearer_auth(&self.api_key)
                .json(&HeliconeTransform.transform(event));
            post(request).await.map_err(|error| SendError {
                accepted: sent,
                error,
            })?;
        }
        Ok(Delivery::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lunary_and_helicone_take_a_base_url_or_the_full_one() {
        for (endpoint, url) in [
            (
                "https://api.lunary.ai",
                "https://api.lunary.ai/v1/runs/ingest",
            ),
            (
                "https://api.lunary.ai/",
                "https://api.lunary.ai/v1/runs/ingest",
            ),
            (
                "https://api.lunary.ai/v1/runs/ingest",
                "https://api.lunary.ai/v1/runs/ingest",
            ),
            (
                "https://api.lunary.ai/v1/runs/ingest/",
                "https://api.lunary.ai/v1/runs/ingest",
            ),
            (
                "http://127.0.0.1:8080/lunary",
                "http://127.0.0.1:8080/lunary/v1/runs/ingest",
            ),
        ] {
            assert_eq!(ingest_url(endpoint, LUNARY_PATH), url, "{endpoint}");
        }
        for (endpoint, url) in [
            (
                "https://api.worker.helicone.ai",
                "https://api.worker.helicone.ai/custom/v1/log",
            ),
            (
                "https://api.worker.helicone.ai/custom/v1/log",
                "https://api.worker.helicone.ai/custom/v1/log",
            ),
        ] {
            assert_eq!(ingest_url(endpoint, HELICONE_PATH), url, "{endpoint}");
        }
    }
}
