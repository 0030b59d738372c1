use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{Category, Envelope, Handler, HandlerError, Message, OutputMessage};

/// Lines waiting for the writer. When full, handlers wait (policy `block`), bounded by their
/// dispatcher's timeout.
const QUEUE_CAPACITY: usize = 1024;
/// The most lines one write-and-flush commits.
const MAX_BATCH: usize = 256;

/// One line of the file: the topic and category, then the envelope's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonlLine {
    pub topic: String,
    pub category: Category,
    #[serde(flatten)]
    pub envelope: Envelope,
}

struct Job {
    line: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Appends each message as one JSON line. A single writer task owns the file and commits in
/// groups: it writes every line waiting, flushes once, then answers each handler, so a dispatch
/// succeeds only after its line reached the operating system, and a write error fails the
/// dispatches it concerns instead of vanishing.
#[derive(Clone)]
pub struct JsonlFile {
    path: Arc<Path>,
    queue: mpsc::Sender<Job>,
}

impl JsonlFile {
    /// Opens `path` for appending (creating its directory) and starts the writer on `tracker`.
    /// When `shutdown` is cancelled the writer stops taking lines, commits what is queued,
    /// flushes and ends.
    pub async fn open(
        path: &Path,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> io::Result<JsonlFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let (queue, jobs) = mpsc::channel(QUEUE_CAPACITY);
        tracker.spawn(write_loop(
            jobs,
            BufWriter::new(file),
            shutdown,
            path.to_owned(),
        ));
        Ok(JsonlFile {
            path: path.into(),
            queue,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl Handler for JsonlFile {
    async fn handle(&self, message: &Message<'_>) -> Result<Vec<OutputMessage>, HandlerError> {
        let line = JsonlLine {
            topic: message.topic.to_owned(),
            category: message.category,
            envelope: message.envelope.clone(),
        };
        let mut bytes = serde_json::to_vec(&line)?;
        bytes.push(b'\n');
        let (done, committed) = oneshot::channel();
        self.queue
            .send(Job { line: bytes, done })
            .await
            .map_err(|_| HandlerError::transient("the JSONL writer has shut down"))?;
        committed
            .await
            .map_err(|_| HandlerError::transient("the JSONL writer stopped before committing"))?
            .map_err(|error| {
                HandlerError::transient(format!("writing {}: {error}", self.path.display()))
            })?;
        Ok(Vec::new())
    }

    /// Alive while the writer task still takes lines.
    async fn heartbeat(&self) -> Result<(), HandlerError> {
        if self.queue.is_closed() {
            Err(HandlerError::transient("the JSONL writer has stopped"))
        } else {
            Ok(())
        }
    }
}

async fn write_loop(
    mut jobs: mpsc::Receiver<Job>,
    mut file: BufWriter<tokio::fs::File>,
    shutdown: CancellationToken,
    path: PathBuf,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            received = jobs.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                commit(&mut file, &mut batch).await;
            }
            () = shutdown.cancelled() => {
                jobs.close();
                while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    commit(&mut file, &mut batch).await;
                }
                break;
            }
        }
    }
    if let Err(error) = file.flush().await {
        tracing::error!(path = %path.display(), %error, "The final flush of a JSONL file failed.");
    }
    tracing::debug!(path = %path.display(), "The JSONL writer stopped.");
}

async fn commit(file: &mut BufWriter<tokio::fs::File>, batch: &mut Vec<Job>) {
    let mut written = Ok(());
    for job in batch.iter() {
        written = file.write_all(&job.line).await;
        if written.is_err() {
            break;
        }
    }
    if written.is_ok() {
        written = file.flush().await;
    }
    let answer = written.map_err(|error| error.to_string());
    for job in batch.drain(..) {
        // The handler may have timed out and gone; its line is written all the same.
        let _ = job.done.send(answer.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<'a>(envelope: &'a Envelope) -> Message<'a> {
        Message {
            topic: "shop.orders.events",
            category: Category::Event,
            envelope,
        }
    }

    #[tokio::test]
    async fn every_line_is_committed_before_the_handler_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/out.jsonl");
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let file = JsonlFile::open(&path, &tracker, shutdown.clone())
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

    #[tokio::test]
    async fn an_unwritable_path_fails_at_open() {
        let tracker = TaskTracker::new();
        let error = JsonlFile::open(
            Path::new("/proc/dispatchd/x.jsonl"),
            &tracker,
            CancellationToken::new(),
        )
        .await
        .err()
        .expect("cannot create a directory in /proc");
        assert!(!error.to_string().is_empty());
    }
}
