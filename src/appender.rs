//! An append-only file written in groups: one writer task owns the file, takes every line
//! waiting, writes them, flushes once (and syncs once, when asked), then answers each caller. A
//! caller's `append` returns only after its line reached the operating system (or the disk), and
//! a write error fails the lines it concerns instead of vanishing.
//!
//! Written here rather than taken from a crate: what it must do is specific (bounded queue as
//! backpressure, one answer per line, commit at shutdown on a task tracker) and small. The JSONL
//! dispatcher appends messages through it; serve's Redis publisher appends the dead letters of
//! events Redis could not take, synced, so an outage costs one `fsync` per group of events rather
//! than one per event.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Lines waiting for the writer. When full, callers wait: backpressure, not growth.
const QUEUE_CAPACITY: usize = 1024;
/// The most lines one commit takes.
const MAX_BATCH: usize = 256;

/// Why a line was not committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the writer has shut down")]
    Closed,
    #[error("the writer stopped before committing")]
    Lost,
    #[error("{0}")]
    Io(String),
}

struct Job {
    line: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// A handle on the writer; cheap to clone.
#[derive(Clone)]
pub struct Appender {
    path: Arc<Path>,
    queue: mpsc::Sender<Job>,
}

impl Appender {
    /// Opens `path` for appending (creating its directory) and starts the writer on `tracker`.
    /// With `sync`, each commit ends with `sync_data`. When `shutdown` is cancelled the writer
    /// stops taking lines, commits what is queued and ends.
    pub async fn open(
        path: &Path,
        sync: bool,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> io::Result<Appender> {
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
            sync,
            shutdown,
            path.to_owned(),
        ));
        Ok(Appender {
            path: path.into(),
            queue,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `line` (which should end with a newline) and waits until it is committed.
    pub async fn append(&self, line: Vec<u8>) -> Result<(), AppendError> {
        let (done, committed) = oneshot::channel();
        self.queue
            .send(Job { line, done })
            .await
            .map_err(|_| AppendError::Closed)?;
        committed
            .await
            .map_err(|_| AppendError::Lost)?
            .map_err(AppendError::Io)
    }

    /// Whether the writer stopped taking lines.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

async fn write_loop(
    mut jobs: mpsc::Receiver<Job>,
    mut file: BufWriter<tokio::fs::File>,
    sync: bool,
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
                commit(&mut file, sync, &mut batch).await;
            }
            () = shutdown.cancelled() => {
                jobs.close();
                while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    commit(&mut file, sync, &mut batch).await;
                }
                break;
            }
        }
    }
    if let Err(error) = file.flush().await {
        tracing::error!(path = %path.display(), %error, "The final flush of an appended file failed.");
    }
    tracing::debug!(path = %path.display(), "A file writer stopped.");
}

async fn commit(file: &mut BufWriter<tokio::fs::File>, sync: bool, batch: &mut Vec<Job>) {
    let mut written = Ok(());
    for job in batch.iter() {
        written = file.write_all(&job.line).await;
        if written.is_err() {
            break;
        }
    }
    if written.is_ok() {
        // Flushing the buffer also waits for tokio's blocking write and returns its error.
        written = file.flush().await;
    }
    if written.is_ok() && sync {
        written = file.get_ref().sync_data().await;
    }
    let answer = written.map_err(|error| error.to_string());
    for job in batch.drain(..) {
        // The caller may have gone (a timeout); its line is written all the same.
        let _ = job.done.send(answer.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_lines_are_all_committed_before_their_callers_return() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/letters.jsonl");
        let tracker = TaskTracker::new();
        let appender = Appender::open(&path, true, &tracker, CancellationToken::new())
            .await
            .unwrap();
        let writes = (0..100).map(|n| {
            let appender = appender.clone();
            async move { appender.append(format!("{n}\n").into_bytes()).await }
        });
        for outcome in futures::future::join_all(writes).await {
            outcome.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut numbers: Vec<u32> = text.lines().map(|l| l.parse().unwrap()).collect();
        numbers.sort_unstable();
        assert_eq!(numbers, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_full_disk_fails_every_line_it_concerns() {
        let tracker = TaskTracker::new();
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        let appender = Appender::open(
            Path::new("/dev/full"),
            false,
            &tracker,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        for _ in 0..2 {
            let error = appender.append(b"line\n".to_vec()).await.unwrap_err();
            assert!(
                matches!(&error, AppendError::Io(text) if text.contains("space")),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn after_shutdown_lines_are_refused_and_queued_ones_were_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let appender = Appender::open(&path, false, &tracker, shutdown.clone())
            .await
            .unwrap();
        appender.append(b"first\n".to_vec()).await.unwrap();
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(appender.is_closed());
        assert_eq!(
            appender.append(b"late\n".to_vec()).await,
            Err(AppendError::Closed)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\n");
    }
}
