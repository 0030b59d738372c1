//! The sink plugins and their registry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Delivery, DispatchEvent, SendError, Sink, SinkError, Transform, parse_retry_after};
use crate::appender::{AppendFile, FileKind, Files, commit_shared};

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
/// A file sink built here has a reopen signal of its own (see [`build_with`]).
pub fn build(config: &SinkConfig) -> Result<Box<dyn Sink>, String> {
    build_with(config, &Files::default())
}

/// [`build`], with a file sink that follows `files`' reopen signal (SIGHUP) and reports repairs
/// to its observer: what serve and `dispatchd sink` use.
pub fn build_with(config: &SinkConfig, files: &Files) -> Result<Box<dyn Sink>, String> {
    let client = || {
        reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| format!("sink `{}`: {e}", config.name))
    };
    let endpoint = config.endpoint.clone();
    Ok(match config.service.as_str() {
        "file" => Box::new(
            FileSink::new(
                &config.name,
                endpoint.ok_or_else(|| {
                    format!(
                        "sink `{}`: the file sink needs an endpoint (a path)",
                        config.name
                    )
                })?,
                config.fsync,
            )
            .with_files(files),
        ),
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

/// Appends each event as a JSON line; optionally syncs after every batch. The file is an
/// [`AppendFile`]: a torn last line is moved aside when it is opened, and it is reopened on the
/// reopen signal or when its path is moved (see [`crate::appender`]).
pub struct FileSink {
    name: String,
    path: PathBuf,
    fsync: bool,
    files: Files,
    file: Option<Arc<Mutex<AppendFile>>>,
}

impl FileSink {
    pub fn new(name: &str, path: impl Into<PathBuf>, fsync: bool) -> FileSink {
        FileSink {
            name: name.to_owned(),
            path: path.into(),
            fsync,
            files: Files::default(),
            file: None,
        }
    }

    /// Follows `files`' reopen signal and reports repairs to its observer (default: a signal of
    /// its own, no observer).
    pub fn with_files(mut self, files: &Files) -> FileSink {
        self.files = files.clone();
        self
    }
}

impl FileSink {
    /// What one batch appends: a JSON line per event.
    pub(crate) fn lines(batch: &[DispatchEvent]) -> Result<Vec<u8>, SinkError> {
        let mut lines = Vec::with_capacity(batch.len() * 512);
        for event in batch {
            // The identity transform, serialized straight from the struct: no intermediate Value.
            serde_json::to_writer(&mut lines, event)
                .map_err(|e| SinkError::permanent(e.to_string()))?;
            lines.push(b'\n');
        }
        Ok(lines)
    }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn init(&mut self) -> Result<(), SinkError> {
        let mut file = self.files.file(&self.path, FileKind::SinkEvents);
        let file = tokio::task::spawn_blocking(move || file.open().map(|()| file))
            .await
            .map_err(|e| SinkError::transient(e.to_string()))?
            .map_err(|e| SinkError::transient(format!("opening {}: {e}", self.path.display())))?;
        self.file = Some(Arc::new(Mutex::new(file)));
        Ok(())
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let lines = FileSink::lines(batch)?;
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| SinkError::transient("the file is not open"))?;
        // One write of whole lines, which returns only once the OS has them (its error, a full
        // disk, fails this batch): a crash leaves whole lines, or a torn last one that the next
        // open moves aside.
        let (written, _) = commit_shared(file, lines, self.fsync).await;
        written.map_err(|e| SinkError::transient(e.to_string()))?;
        Ok(Delivery::default())
    }

    async fn close(&self) -> Result<(), SinkError> {
        if let Some(file) = self.file.clone() {
            tokio::task::spawn_blocking(move || {
                file.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .sync_all()
            })
            .await
            .map_err(|e| SinkError::transient(e.to_string()))?
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

impl HttpSink {
    /// The request body of one batch: the events as a JSON array.
    pub(crate) fn body(batch: &[DispatchEvent]) -> Result<Vec<u8>, SinkError> {
        // The identity transform, serialized straight from the structs.
        serde_json::to_vec(batch).map_err(|e| SinkError::permanent(e.to_string()))
    }
}

#[async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(HttpSink::body(batch)?);
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

impl LunarySink {
    /// The request body of one batch: `{"events": [...]}`, two run events per dispatch.
    pub(crate) fn body(batch: &[DispatchEvent]) -> Value {
        let events: Vec<Value> = batch
            .iter()
            .flat_map(|e| LunaryTransform.events(e))
            .collect();
        json!({ "events": events })
    }
}

#[async_trait]
impl Sink for LunarySink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let request = self
            .client
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .json(&LunarySink::body(batch));
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

impl HeliconeSink {
    /// The request body for one event (Helicone takes one per request).
    pub(crate) fn body(event: &DispatchEvent) -> Value {
        HeliconeTransform.transform(event)
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
                .json(&HeliconeSink::body(event));
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
    use std::io::Write;

    use super::*;
    use crate::appender::FileObserver;
    use crate::sinks::driver_tests::event;

    #[derive(Default)]
    struct Repairs(Mutex<Vec<(FileKind, u64)>>);

    impl FileObserver for Repairs {
        fn torn_tail(&self, kind: FileKind, bytes: u64) {
            self.0.lock().unwrap().push((kind, bytes));
        }
    }

    fn run_ids(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                let event: DispatchEvent = serde_json::from_str(line).expect("a whole event");
                event.run_id
            })
            .collect()
    }

    #[tokio::test]
    async fn the_file_sink_moves_a_torn_tail_aside_and_follows_its_file_being_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let whole = serde_json::to_string(&event(0)).unwrap();
        std::fs::write(&path, format!("{whole}\n{}", &whole[..30])).unwrap();
        let repairs = Arc::new(Repairs::default());
        let files = Files::new(Some(repairs.clone()));
        let mut sink = FileSink::new("events", &path, false).with_files(&files);
        sink.init().await.unwrap();
        sink.send_events(&[event(1)]).await.unwrap();
        assert_eq!(run_ids(&path), ["run-0", "run-1"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("events.jsonl.torn")).unwrap(),
            format!("{}\n", &whole[..30])
        );
        assert_eq!(*repairs.0.lock().unwrap(), [(FileKind::SinkEvents, 30)]);

        // logrotate: move, signal; the next batch goes to a new file at the path.
        let rotated = dir.path().join("events.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        files.reopen();
        sink.send_events(&[event(2)]).await.unwrap();
        sink.close().await.unwrap();
        assert_eq!(run_ids(&rotated), ["run-0", "run-1"]);
        assert_eq!(run_ids(&path), ["run-2"]);

        // A fragment written behind its back is repaired on the signal's reopen too.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"type\"")
            .unwrap();
        files.reopen();
        sink.send_events(&[event(3)]).await.unwrap();
        assert_eq!(run_ids(&path), ["run-2", "run-3"]);
        assert_eq!(repairs.0.lock().unwrap().len(), 2);
    }

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
