//! Dead-letter files: what a sink finally could not deliver, one JSON line per event, with why.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::DispatchEvent;
use crate::engine::sanitize;

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub sink: String,
    /// `permanent` (the service refused it), `retries_exhausted`, `refused_by_service` or
    /// `shutdown` (still queued when the deadline passed).
    pub reason: String,
    pub attempts: u32,
    /// Sanitized and capped.
    pub last_error: String,
    #[serde(with = "humantime_serde")]
    pub failed_at: SystemTime,
    pub event: DispatchEvent,
}

/// Appends dead letters to a JSONL file, synced before it returns: a dead letter is the last
/// place an event can be, so it must survive a crash.
#[derive(Debug, Clone)]
pub struct DeadLetterFile {
    path: PathBuf,
}

impl DeadLetterFile {
    pub fn new(path: impl Into<PathBuf>) -> DeadLetterFile {
        DeadLetterFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn append(
        &self,
        sink: &str,
        reason: &str,
        attempts: u32,
        last_error: &str,
        events: &[DispatchEvent],
    ) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::new();
        for event in events {
            write_line(&mut lines, sink, reason, attempts, last_error, event)?;
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await?;
        file.write_all(&lines).await?;
        // Wait for the write itself: tokio's `File` answers before it is done, and `sync_data`
        // would swallow its error (a full disk) and sync nothing.
        file.flush().await?;
        file.sync_data().await
    }
}

/// Appends one dead letter, as a JSON line, to `out`: the format every dead-letter file shares
/// (the sinks' and the Redis bus's).
pub fn write_line(
    out: &mut Vec<u8>,
    sink: &str,
    reason: &str,
    attempts: u32,
    last_error: &str,
    event: &DispatchEvent,
) -> serde_json::Result<()> {
    #[derive(Serialize)]
    struct Letter<'a> {
        sink: &'a str,
        reason: &'a str,
        attempts: u32,
        last_error: &'a str,
        #[serde(with = "humantime_serde")]
        failed_at: SystemTime,
        event: &'a DispatchEvent,
    }
    serde_json::to_writer(
        &mut *out,
        &Letter {
            sink,
            reason,
            attempts,
            last_error: &sanitize(last_error),
            failed_at: SystemTime::now(),
            event,
        },
    )?;
    out.push(b'\n');
    Ok(())
}

/// Reads the events of a dead-letter file (to replay them). Names the line of any that is not a
/// dead letter.
pub fn read(path: &Path) -> Result<Vec<DispatchEvent>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str::<DeadLetter>(line)
                .map(|letter| letter.event)
                .map_err(|e| format!("{}:{}: not a dead letter: {e}", path.display(), n + 1))
        })
        .collect()
}
