use std::io;
use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::appender::{AppendError, Appender, FileKind, Files};
use crate::engine::{Category, Envelope, Handler, HandlerError, Message, OutputMessage, json};

/// One line of the file: the topic and category, then the envelope's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonlLine {
    pub topic: String,
    pub category: Category,
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// Appends the line of `envelope` on `topic`, newline included: what serde writes of a
/// [`JsonlLine`] (a test compares them), from borrowed data and without serde's flattening
/// (which buffers the envelope's fields through a map serializer).
fn write_line(out: &mut Vec<u8>, topic: &str, category: Category, envelope: &Envelope) {
    out.extend_from_slice(b"{\"topic\":");
    json::write_str(out, topic);
    out.extend_from_slice(b",\"category\":\"");
    out.extend_from_slice(category.as_str().as_bytes());
    out.extend_from_slice(b"\",");
    envelope.write_json_fields(out);
    out.extend_from_slice(b"}\n");
}

/// Appends each message as one JSON line, through an [`Appender`]: a single writer task commits
/// in groups, so a dispatch succeeds only after its line reached the operating system, and a
/// write error fails the dispatches it concerns instead of vanishing.
#[derive(Clone)]
pub struct JsonlFile {
    file: Appender,
}

impl JsonlFile {
    /// Opens `path` for appending (creating its directory, moving a torn last line aside) and
    /// starts the writer on `tracker`; it reopens the file on `files`' signal or when the path
    /// is moved. When `shutdown` is cancelled the writer stops taking lines, commits what is
    /// queued and ends.
    pub async fn open(
        path: &Path,
        files: &Files,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> io::Result<JsonlFile> {
        Ok(JsonlFile {
            file: Appender::open(path, FileKind::Messages, false, files, tracker, shutdown).await?,
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

#[async_trait]
impl Handler for JsonlFile {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let mut bytes = Vec::with_capacity(256);
        write_line(
            &mut bytes,
            message.topic,
            message.category,
            message.envelope,
        );
        self.file.append(bytes).await.map_err(|error| match error {
            AppendError::Closed => HandlerError::transient("the JSONL writer has shut down"),
            AppendError::Lost => {
                HandlerError::transient("the JSONL writer stopped before committing")
            }
            AppendError::Io(error) => {
                HandlerError::transient(format!("writing {}: {error}", self.path().display()))
            }
        })?;
        Ok(Vec::new())
    }

    /// Alive while the writer task still takes lines.
    async fn heartbeat(&self) -> Result<(), HandlerError> {
        if self.file.is_closed() {
            Err(HandlerError::transient("the JSONL writer has stopped"))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<'a>(envelope: &'a Envelope) -> Message<'a> {
        Message::new("shop.orders.events", Category::Event, envelope)
    }

    #[tokio::test]
    async fn every_line_is_committed_before_the_handler_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/out.jsonl");
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let file = JsonlFile::open(&path, &Files::default(), &tracker, shutdown.clone())
            .await
            .unwrap();

        let envelopes: Vec<Envelope> = (0..50)
            .map(|n| Envelope::new("order.placed", serde_json::json!({ "n": n })))
            .collect();
        let writes = envelopes.iter().map(|e| {
            let file = file.clone();
            async move { file.handle(&message(e)).await }
        });
        for outcome in futures::future::join_all(writes).await {
            outcome.unwrap();
        }
        // Committed means readable now, before any shutdown or flush.
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<JsonlLine> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 50);
        assert_eq!(lines[0].topic, "shop.orders.events");
        let mut ids: Vec<&str> = lines
            .iter()
            .map(|l| l.envelope.message_id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 50);

        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let error = file.handle(&message(&envelopes[0])).await.unwrap_err();
        assert_eq!(error.message(), "the JSONL writer has shut down");
    }

    /// The line written by hand is what serde writes of a [`JsonlLine`], for every category,
    /// with and without the envelope's optional fields, with text that needs escaping.
    #[test]
    fn the_line_is_what_serde_writes_of_a_jsonl_line() {
        let plain = Envelope::new("order.placed", serde_json::json!({ "n": 1 }));
        let full = Envelope::new(
            "order.\"placed\"",
            serde_json::json!({ "a\nb": ["\\", 1.5, null, { "é": "\u{1}" }] }),
        )
        .with_correlation_id("c-\t1")
        .with_header("user_id", "u\"42")
        .with_header("x-trace", "");
        for envelope in [plain, full] {
            for category in Category::ALL {
                for topic in ["shop.orders.events", "a.\"b\".cmd"] {
                    let mut ours = Vec::new();
                    write_line(&mut ours, topic, category, &envelope);
                    let theirs = serde_json::to_string(&JsonlLine {
                        topic: topic.into(),
                        category,
                        envelope: envelope.clone(),
                    })
                    .unwrap();
                    assert_eq!(String::from_utf8(ours).unwrap(), format!("{theirs}\n"));
                }
            }
        }
    }

    #[tokio::test]
    async fn an_unwritable_path_fails_at_open() {
        let tracker = TaskTracker::new();
        let error = JsonlFile::open(
            Path::new("/proc/dispatchd/x.jsonl"),
            &Files::default(),
            &tracker,
            CancellationToken::new(),
        )
        .await
        .err()
        .expect("cannot create a directory in /proc");
        assert!(!error.to_string().is_empty());
    }

    #[tokio::test]
    async fn a_message_after_a_crash_mid_line_starts_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.jsonl");
        let envelope = Envelope::new("order.placed", serde_json::json!({ "n": 1 }));
        let whole = serde_json::to_string(&JsonlLine {
            topic: "shop.orders.events".into(),
            category: Category::Event,
            envelope: envelope.clone(),
        })
        .unwrap();
        // What a SIGKILL mid-write leaves: whole lines, then part of one.
        std::fs::write(&path, format!("{whole}\n{}", &whole[..20])).unwrap();
        let tracker = TaskTracker::new();
        let file = JsonlFile::open(&path, &Files::default(), &tracker, CancellationToken::new())
            .await
            .unwrap();
        file.handle(&message(&envelope)).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<JsonlLine> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line parses"))
            .collect();
        assert_eq!(lines.len(), 2);
        let torn = std::fs::read_to_string(dir.path().join("messages.jsonl.torn")).unwrap();
        assert_eq!(torn, format!("{}\n", &whole[..20]));
    }
}
