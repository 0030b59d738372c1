//! The sink plugins and their registry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{
    Delivery, DispatchEvent, Retry, SendError, Sink, SinkError, Transform, parse_retry_after,
};
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
        "lunary" => {
            let api_key = config
                .api_key
                .clone()
                .ok_or_else(|| format!("sink `{}`: lunary needs an api key", config.name))?;
            check_lunary_key(&api_key)
                .map_err(|e| format!("sink `{}`: the lunary api key {e}", config.name))?;
            Box::new(LunarySink {
                name: config.name.clone(),
                url: ingest_url(endpoint.as_deref().unwrap_or(LUNARY_DEFAULT), LUNARY_PATH),
                api_key,
                client: client()?,
                max_body: LUNARY_MAX_BODY,
            })
        }
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
    pub(crate) fn lines(batch: &[DispatchEvent]) -> Vec<u8> {
        // An event with a small payload is ~1 KiB: room for the usual batch without regrowing
        // (each regrowth copies every line before it).
        let mut lines = Vec::with_capacity(batch.len() * 1024);
        for event in batch {
            // The identity transform, written straight from the struct: no intermediate Value.
            event.write_json(&mut lines);
            lines.push(b'\n');
        }
        lines
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
        let lines = FileSink::lines(batch);
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

/// Lunary's request body limit: its API parses JSON with koa-bodyparser's `jsonLimit: "20mb"`
/// (lunary-ai/lunary `packages/backend/src/index.ts`), which the `bytes` package reads as
/// 20 MiB, and answers 413 to a longer body. A batch is split into requests of at most this
/// many bytes.
pub const LUNARY_MAX_BODY: usize = 20 * 1024 * 1024;

/// `{"events":[` and `]}` around a Lunary request's run events.
const LUNARY_FRAME: (&[u8], &[u8]) = (b"{\"events\":[", b"]}");

/// Whether Lunary takes `key` as an API key. Its auth middleware reads a key only when it is a
/// UUID (`validateUUID`, lunary-ai/lunary `packages/backend/src/api/v1/auth/utils.ts`) and takes
/// anything else for a session JWT, answering 401; project keys, public and private, are UUIDs.
/// The hyphenated form only, as zod's `uuid()` checks it. Never says what the key was.
pub fn check_lunary_key(key: &str) -> Result<(), String> {
    let bytes = key.as_bytes();
    let uuid = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if uuid {
        Ok(())
    } else {
        Err(
            "is not a UUID: Lunary answers 401 to any other key; use the project's public key, \
             which looks like 6d4b1a52-0000-4000-8000-000000000000"
                .into(),
        )
    }
}

/// Prompt and completion token counts of a usage object, in the shapes senders write them:
/// OpenAI's `prompt_tokens`/`completion_tokens`, Anthropic's `input_tokens`/`output_tokens`,
/// Lunary's own `prompt`/`completion`, and the camelCase forms of these. Each is a non-negative
/// number or absent.
#[derive(Debug, Default, Clone, PartialEq)]
struct TokenCounts {
    prompt: Option<Value>,
    completion: Option<Value>,
}

impl TokenCounts {
    fn of(usage: &Value) -> TokenCounts {
        let first = |keys: &[&str]| {
            keys.iter().find_map(|key| {
                usage
                    .get(key)
                    .filter(|n| n.as_f64().is_some_and(|n| n >= 0.0))
                    .cloned()
            })
        };
        TokenCounts {
            prompt: first(&[
                "prompt_tokens",
                "input_tokens",
                "prompt",
                "promptTokens",
                "inputTokens",
            ]),
            completion: first(&[
                "completion_tokens",
                "output_tokens",
                "completion",
                "completionTokens",
                "outputTokens",
            ]),
        }
    }

    /// The counts under the names a service reads, or `None` when there is neither.
    fn named(&self, prompt: &str, completion: &str) -> Option<Value> {
        let mut counts = serde_json::Map::new();
        if let Some(n) = &self.prompt {
            counts.insert(prompt.into(), n.clone());
        }
        if let Some(n) = &self.completion {
            counts.insert(completion.into(), n.clone());
        }
        (!counts.is_empty()).then_some(Value::Object(counts))
    }
}

/// Lunary's run ingestion: `POST /v1/runs/ingest` with `{"events": [...]}` and the project's
/// public key as a bearer token. Each dispatch becomes a `start` event and an `end` (or `error`)
/// event of one run; Lunary answers per event, and a dispatch it refused is dead-lettered alone.
/// A batch goes in as many requests as keep each body within [`LUNARY_MAX_BODY`]; a dispatch
/// that alone is over it is not sent (Lunary would answer 413) but dead-lettered as `permanent`.
pub struct LunarySink {
    name: String,
    url: String,
    api_key: String,
    client: reqwest::Client,
    max_body: usize,
}

/// Maps a dispatch to Lunary's run events, as its ingest route reads them (lunary-ai/lunary
/// `packages/backend/src/api/v1/runs/ingest.ts`, `registerRunEvent`).
///
/// - No `parentRunId`: Lunary looks a start's `parentRunId` up as a run, and when there is none
///   it sleeps 5 s, looks again and drops it; what a dispatch event has there is the message's
///   correlation id, which is not a run. It goes in the start's `metadata` as `correlation_id`
///   instead (Lunary keeps first-level strings, numbers and booleans of `metadata`, and renames
///   keys to camelCase: `correlationId`).
/// - `tokensUsage` is `{prompt, completion}`, what Lunary reads, from the usage fields the
///   sender wrote ([`TokenCounts`]); absent when there were none.
#[derive(Debug, Default, Clone, Copy)]
pub struct LunaryTransform;

impl LunaryTransform {
    pub fn events(&self, event: &DispatchEvent) -> [Value; 2] {
        let duration_ms = event.metadata.finite_duration_ms();
        let started = event
            .timestamp
            .checked_sub(Duration::from_secs_f64(duration_ms.max(0.0) / 1000.0))
            .unwrap_or(event.timestamp);
        let mut metadata = serde_json::to_value(&event.metadata).unwrap_or_default();
        if let (Some(correlation_id), Value::Object(fields)) = (&event.parent_run_id, &mut metadata)
        {
            fields.insert("correlation_id".into(), json!(correlation_id));
        }
        let mut start = json!({
            "type": event.kind,
            "event": "start",
            "runId": event.run_id,
            "name": event.name,
            "timestamp": humantime::format_rfc3339_millis(started).to_string(),
            "input": event.input,
            "tags": event.tags,
            "metadata": metadata,
        });
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
        if let Some(usage) = event
            .tokens_usage
            .as_ref()
            .and_then(|usage| TokenCounts::of(usage).named("prompt", "completion"))
        {
            end["tokensUsage"] = usage;
        }
        if event.event == "error" {
            end["error"] = json!({ "message": event.metadata.error_message });
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
    /// The request body of a batch that fits in one request: `{"events": [...]}`, two run
    /// events per dispatch (what the tests check; sending splits by size first).
    #[cfg(test)]
    pub(crate) fn body(batch: &[DispatchEvent]) -> Result<Vec<u8>, SinkError> {
        let items = batch
            .iter()
            .map(LunarySink::item)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LunarySink::framed(&items))
    }

    /// `{"events":[` the items, comma-separated, `]}`.
    fn framed(items: &[Vec<u8>]) -> Vec<u8> {
        let size = items.iter().map(|item| item.len() + 1).sum::<usize>();
        let mut body = Vec::with_capacity(LUNARY_FRAME.0.len() + size + LUNARY_FRAME.1.len());
        body.extend_from_slice(LUNARY_FRAME.0);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(LUNARY_FRAME.1);
        body
    }

    /// One dispatch's run events as they go in the `events` array: `start,end`.
    fn item(event: &DispatchEvent) -> Result<Vec<u8>, SinkError> {
        let [start, end] = LunaryTransform.events(event);
        let mut item =
            serde_json::to_vec(&start).map_err(|e| SinkError::permanent(e.to_string()))?;
        item.push(b',');
        serde_json::to_writer(&mut item, &end).map_err(|e| SinkError::permanent(e.to_string()))?;
        Ok(item)
    }

    /// Posts the run events of `batch` (serialized in `items`) in one request; answers the
    /// dispatches Lunary refused (index in `batch`, reason).
    async fn post_chunk(
        &self,
        batch: &[DispatchEvent],
        items: &[Vec<u8>],
    ) -> Result<Vec<(usize, String)>, SinkError> {
        let body = LunarySink::framed(items);
        let request = self
            .client
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        let response = post(request).await?;
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        // `{"results": [{"id": runId, "success": bool, "error": "..."}]}`; a run that already
        // exists was delivered by an earlier attempt, which is a success.
        let mut refused: Vec<(usize, String)> = Vec::new();
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
        Ok(refused)
    }
}

#[async_trait]
impl Sink for LunarySink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let items = batch
            .iter()
            .map(LunarySink::item)
            .collect::<Result<Vec<_>, _>>()?;
        let frame = LUNARY_FRAME.0.len() + LUNARY_FRAME.1.len();
        let mut delivery = Delivery::default();
        // How many dispatches from the start of the batch on were accepted without a gap: what a
        // failure part way may report (after a refused or unsent one, the retry sends the rest
        // again, and Lunary answers "already exists" for those it has).
        let mut accepted = 0;
        let mut next = 0;
        while next < batch.len() {
            if frame + items[next].len() > self.max_body {
                delivery.unsendable.push((
                    next,
                    format!(
                        "run {} is {} bytes as Lunary run events, over the {} bytes Lunary takes \
                         in one request (it answers 413): not sent",
                        batch[next].run_id,
                        frame + items[next].len(),
                        self.max_body
                    ),
                ));
                next += 1;
                continue;
            }
            let first = next;
            let mut size = frame + items[next].len();
            next += 1;
            while next < batch.len() && size + 1 + items[next].len() <= self.max_body {
                size += 1 + items[next].len();
                next += 1;
            }
            let refused = self
                .post_chunk(&batch[first..next], &items[first..next])
                .await
                .map_err(|error| SendError { accepted, error })?;
            if accepted == first {
                accepted = refused.iter().map(|(i, _)| first + i).min().unwrap_or(next);
            }
            delivery
                .refused
                .extend(refused.into_iter().map(|(i, reason)| (first + i, reason)));
        }
        Ok(delivery)
    }
}

/// The largest log Helicone's worker takes: it answers 400 when `JSON.stringify` of the body is
/// longer than 10 MiB (UTF-16 code units; Helicone/helicone `worker/src/api/helpers/logAsync.ts`).
pub const HELICONE_MAX_BODY: usize = 10 * 1024 * 1024;

/// Helicone's custom logging: `POST /custom/v1/log`, one event per request, with the API key as a
/// bearer token. A failure part way through a batch reports how many went through, so they are
/// not sent twice; an event whose log is over [`HELICONE_MAX_BODY`] is not sent (Helicone would
/// refuse it) but dead-lettered as `permanent`, and the others go on.
///
/// Helicone's worker (Helicone/helicone `worker/src/api/helpers/logAsync.ts`) answers **200 with
/// `{"error": …}`** when it could not store a log (rate limited, a database error): that is a
/// transient failure here, retried and then dead-lettered, never `sent`. A log it already has
/// (`Helicone-Request-Id` is the event's `log_id`, so a resend is recognised) comes back as a
/// duplicate key error, which is a delivery.
pub struct HeliconeSink {
    name: String,
    url: String,
    api_key: String,
    client: reqwest::Client,
}

/// Maps a dispatch to Helicone's `HeliconeAsyncLogRequest`.
///
/// `providerRequest.meta` is read as request headers (`new Headers(meta)` then
/// `HeliconeHeaders`, Helicone/helicone `worker/src/lib/HeliconeHeaders.ts`): only `Helicone-*`
/// keys mean anything there. Sent: `Helicone-Request-Id` (the `log_id`, when it is a UUID:
/// resends are idempotent), `Helicone-User-Id` (the `userId`), and `Helicone-Property-*` for the
/// category, status, error code, correlation id and tags. Usage goes in
/// `providerResponse.json.usage` as `prompt_tokens`/`completion_tokens`, what Helicone reads
/// (`worker/src/lib/dbLogger/DBLoggable.ts`, `getUsage`).
#[derive(Debug, Default, Clone, Copy)]
pub struct HeliconeTransform;

fn timing(at: SystemTime) -> Value {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({ "seconds": since.as_secs(), "milliseconds": since.subsec_millis() })
}

/// `text` as a header value Helicone can take: `new Headers(meta)` throws on control characters
/// and characters beyond Latin-1 (the whole log would be refused) and keeps Latin-1 as bytes, so
/// anything outside printable ASCII becomes `?`.
fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

impl HeliconeTransform {
    /// The `Helicone-*` headers of one event, as `providerRequest.meta`.
    fn meta(event: &DispatchEvent) -> serde_json::Map<String, Value> {
        let mut meta = serde_json::Map::new();
        let mut set = |name: &str, value: &str| {
            let value = header_value(value);
            if !value.is_empty() {
                meta.insert(name.to_owned(), Value::String(value));
            }
        };
        // Helicone keeps request ids as UUIDs (a dispatch event's `log_id` is one); another
        // would fail its insert, so it gets an id of Helicone's own instead.
        if uuid::Uuid::try_parse(&event.log_id).is_ok() {
            set("Helicone-Request-Id", &event.log_id);
        }
        if let Some(user) = &event.user_id {
            set("Helicone-User-Id", user);
        }
        for (property, field) in [
            ("Category", Some(&event.metadata.category)),
            ("Status", Some(&event.metadata.status)),
            ("Error-Code", event.metadata.error_code.as_ref()),
        ] {
            if let Some(value) = field {
                set(&format!("Helicone-Property-{property}"), value);
            }
        }
        if let Some(correlation_id) = &event.parent_run_id {
            set("Helicone-Property-Correlation-Id", correlation_id);
        }
        if !event.tags.is_empty() {
            set("Helicone-Property-Tags", &event.tags.join(","));
        }
        meta
    }
}

impl Transform for HeliconeTransform {
    fn transform(&self, event: &DispatchEvent) -> Value {
        let duration_ms = event.metadata.finite_duration_ms();
        let started = event
            .timestamp
            .checked_sub(Duration::from_secs_f64(duration_ms.max(0.0) / 1000.0))
            .unwrap_or(event.timestamp);
        let failed = event.event == "error";
        let mut response = json!({
            "_type": "data",
            "name": event.name,
            "status": if failed { "error" } else { "success" },
            "output": event.output,
        });
        if let Some(usage) = event
            .tokens_usage
            .as_ref()
            .and_then(|usage| TokenCounts::of(usage).named("prompt_tokens", "completion_tokens"))
        {
            response["usage"] = usage;
        }
        json!({
            "providerRequest": {
                "url": "custom-model-nopath",
                "json": { "_type": "data", "name": event.name, "type": event.kind, "input": event.input, "metadata": event.metadata },
                "meta": HeliconeTransform::meta(event),
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

    /// What a 2xx answer's body says: `"ok"`, or `{"error": …}` when the log was not stored.
    /// A duplicate key (Postgres `23505`, from inserting a `Helicone-Request-Id` it already has:
    /// `worker/src/lib/dbLogger/RequestResponseStore.ts`) means an earlier attempt stored it.
    fn stored(body: &str) -> Result<(), SinkError> {
        let Ok(Value::Object(answer)) = serde_json::from_str::<Value>(body) else {
            return Ok(());
        };
        let error = match answer.get("error") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::String(error)) => error.clone(),
            Some(error) => error.to_string(),
        };
        if error.contains("23505") || error.contains("duplicate key") {
            return Ok(());
        }
        let error: String = error.chars().take(200).collect();
        Err(SinkError {
            retry: Retry::Transient,
            retry_after: None,
            status: Some(200),
            message: format!("helicone answered 200 without storing the log: {error}"),
        })
    }
}

#[async_trait]
impl Sink for HeliconeSink {
    fn name(&self) -> &str {
        &self.name
    }

    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError> {
        let mut delivery = Delivery::default();
        for (sent, event) in batch.iter().enumerate() {
            let body = serde_json::to_string(&HeliconeSink::body(event))
                .map_err(|e| SinkError::permanent(e.to_string()))?;
            let length = body.encode_utf16().count();
            if length > HELICONE_MAX_BODY {
                delivery.unsendable.push((
                    sent,
                    format!(
                        "run {} is a log of {length} characters, over the {HELICONE_MAX_BODY} \
                         Helicone takes (it answers 400): not sent",
                        event.run_id
                    ),
                ));
                continue;
            }
            let request = self
                .client
                .post(&self.url)
                .bearer_auth(&self.api_key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            let stored = match post(request).await {
                Ok(response) => match response.text().await {
                    Ok(body) => HeliconeSink::stored(&body),
                    // Cut off mid-answer: it may or may not be stored; a resend is idempotent.
                    Err(error) => Err(SinkError::transient(format!("no whole answer: {error}"))),
                },
                Err(error) => Err(error),
            };
            // Accepted so far: those before this one, unless one of them was not sent.
            let accepted = delivery
                .unsendable
                .first()
                .map_or(sent, |(first, _)| *first);
            stored.map_err(|error| SendError { accepted, error })?;
        }
        Ok(delivery)
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
    fn a_lunary_key_is_a_hyphenated_uuid() {
        assert!(check_lunary_key("6d4b1a52-9c3e-4f7a-8b21-0C5D9E8F7A61").is_ok());
        for refused in [
            "",
            "pk-live-123",
            "6d4b1a529c3e4f7a8b210c5d9e8f7a61",
            "{6d4b1a52-9c3e-4f7a-8b21-0c5d9e8f7a61}",
            "6d4b1a52-9c3e-4f7a-8b21-0c5d9e8f7a6g",
            "6d4b1a52-9c3e-4f7a-8b21-0c5d9e8f7a61 ",
        ] {
            let error = check_lunary_key(refused).unwrap_err();
            assert!(error.starts_with("is not a UUID"), "{refused}: {error}");
        }
    }

    #[test]
    fn token_counts_are_read_in_the_shapes_senders_write_them() {
        for (usage, prompt, completion) in [
            (
                json!({"prompt_tokens": 10, "completion_tokens": 5}),
                Some(10),
                Some(5),
            ),
            (
                json!({"input_tokens": 7, "output_tokens": 3}),
                Some(7),
                Some(3),
            ),
            (json!({"prompt": 2, "completion": 1}), Some(2), Some(1)),
            (
                json!({"promptTokens": 4, "completionTokens": 6}),
                Some(4),
                Some(6),
            ),
            (json!({"prompt_tokens": 9}), Some(9), None),
            (
                json!({"prompt_tokens": "9", "completion_tokens": -1}),
                None,
                None,
            ),
            (json!("[REDACTED]"), None, None),
        ] {
            let counts = TokenCounts::of(&usage);
            assert_eq!(
                (counts.prompt, counts.completion),
                (prompt.map(|n| json!(n)), completion.map(|n| json!(n))),
                "{usage}"
            );
        }
        assert_eq!(
            TokenCounts::of(&json!({})).named("prompt", "completion"),
            None
        );
    }

    /// Helicone answers 200 to a log it did not store, with `{"error": …}`.
    #[test]
    fn a_helicone_200_with_an_error_is_a_transient_failure_unless_the_log_is_a_duplicate() {
        assert_eq!(HeliconeSink::stored("ok"), Ok(()));
        assert_eq!(HeliconeSink::stored("{}"), Ok(()));
        assert_eq!(HeliconeSink::stored(r#"{"error": null}"#), Ok(()));
        let error = HeliconeSink::stored(r#"{"error": "Rate limited"}"#).unwrap_err();
        assert_eq!((error.retry, error.status), (Retry::Transient, Some(200)));
        assert!(error.message.contains("Rate limited"), "{error}");
        let error = HeliconeSink::stored(r#"{"error": {"message": "db down"}}"#).unwrap_err();
        assert!(error.message.contains("db down"), "{error}");
        let duplicate = json!({"error": json!({"requestError": {"code": "23505",
            "message": "duplicate key value violates unique constraint \"request_pkey\""}})
            .to_string()});
        assert_eq!(HeliconeSink::stored(&duplicate.to_string()), Ok(()));
    }

    #[test]
    fn helicone_headers_carry_only_what_a_header_value_can() {
        assert_eq!(header_value(" user\n7\u{0}é "), "user?7??");
        let mut event = event(1);
        event.log_id = "not-a-uuid".into();
        event.user_id = Some("u\r\n1".into());
        let meta = HeliconeTransform::meta(&event);
        assert_eq!(
            meta.get("Helicone-Request-Id"),
            None,
            "Helicone ids are UUIDs"
        );
        assert_eq!(meta["Helicone-User-Id"], "u??1");
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
