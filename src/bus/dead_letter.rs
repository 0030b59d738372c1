//! Dead-letter files: what a sink finally could not deliver, one JSON line per event, with why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::DispatchEvent;
use crate::appender::{AppendFile, FileKind, FileObserver};
use crate::engine::sanitize;

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub sink: String,
    /// `permanent` (the service refused it, or could not take it: one alone over its body
    /// limit), `retries_exhausted`, `refused_by_service`, `shutdown` (still queued when the
    /// deadline passed) or `unreadable` (a bus entry this version could not read; see
    /// [`DeadLetterFile::append_unreadable`]).
    pub reason: String,
    pub attempts: u32,
    /// Sanitized and capped.
    pub last_error: String,
    #[serde(with = "humantime_serde")]
    pub failed_at: SystemTime,
    pub event: DispatchEvent,
}

/// Appends dead letters to a JSONL file, synced before it returns: a dead letter is the last
/// place an event can be, so it must survive a crash. The file is opened for each append (dead
/// letters are rare), so a file moved aside or rotated is followed without a signal; each open
/// moves a torn last line aside first (see [`crate::appender`]), and the write holds the lock
/// [`take`] waits for.
#[derive(Clone)]
pub struct DeadLetterFile {
    path: PathBuf,
    observer: Option<Arc<dyn FileObserver>>,
}

impl DeadLetterFile {
    pub fn new(path: impl Into<PathBuf>) -> DeadLetterFile {
        DeadLetterFile {
            path: path.into(),
            observer: None,
        }
    }

    /// Told when a torn last line is repaired (as `sink_dead_letters`).
    pub fn with_observer(mut self, observer: Option<Arc<dyn FileObserver>>) -> DeadLetterFile {
        self.observer = observer;
        self
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
        self.commit(lines).await
    }

    /// Keeps a bus entry that is not a dispatch event this version can read (`data`, or `None`
    /// when the entry has no `data` field), with why (`error`): reason `unreadable`, 0 attempts,
    /// and as its `event` the entry's JSON as it was, or its text as a JSON string when it is not
    /// JSON. An event written by a newer version (a result this one does not know) is kept for
    /// that version's replay or republish; this version's refuses the file, naming the line.
    pub async fn append_unreadable(
        &self,
        sink: &str,
        data: Option<&str>,
        error: &str,
    ) -> std::io::Result<()> {
        // Read back into a value and written compactly, so that a JSON spread over several lines
        // stays one line of the file.
        let event = match data {
            Some(text) => serde_json::from_str::<serde_json::Value>(text)
                .unwrap_or_else(|_| serde_json::Value::String(text.to_owned())),
            None => serde_json::Value::Null,
        };
        let mut line = Vec::new();
        write_letter(&mut line, sink, UNREADABLE, 0, error, &event)?;
        self.commit(line).await
    }

    async fn commit(&self, lines: Vec<u8>) -> std::io::Result<()> {
        let mut file = AppendFile::new(
            &self.path,
            FileKind::SinkDeadLetters,
            self.observer.clone(),
            None,
        );
        tokio::task::spawn_blocking(move || file.commit(&lines, true))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// The reason of a dead letter kept from the bus because it is not a dispatch event this
/// version can read ([`DeadLetterFile::append_unreadable`]).
pub const UNREADABLE: &str = "unreadable";

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
    write_letter(out, sink, reason, attempts, last_error, event)
}

fn write_letter<E: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    sink: &str,
    reason: &str,
    attempts: u32,
    last_error: &str,
    event: &E,
) -> serde_json::Result<()> {
    #[derive(Serialize)]
    struct Letter<'a, E: ?Sized> {
        sink: &'a str,
        reason: &'a str,
        attempts: u32,
        last_error: &'a str,
        #[serde(with = "humantime_serde")]
        failed_at: SystemTime,
        event: &'a E,
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
    parse(path, &text)
}

/// Takes the events of a dead-letter file to send them again: reads it and moves it aside to
/// `<stem>.<suffix>.jsonl` (`-2`, `-3` … when taken), under the lock its writers take, so a
/// running dispatchd writes its next dead letters to a new file at `path`, never to the moved
/// one. A torn last line is moved to `<path>.torn` first; a file with a line that is not a dead
/// letter is refused, naming the line, and left where it is.
pub fn take(path: &Path, suffix: &str) -> Result<(Vec<DispatchEvent>, PathBuf), String> {
    crate::appender::move_aside(path, suffix, |text| parse(path, text))
}

fn parse(path: &Path, text: &str) -> Result<Vec<DispatchEvent>, String> {
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::sinks::driver_tests::event;

    fn run_ids(events: &[DispatchEvent]) -> Vec<&str> {
        events.iter().map(|e| e.run_id.as_str()).collect()
    }

    /// Records repairs.
    #[derive(Default)]
    struct Repairs(std::sync::Mutex<Vec<(FileKind, u64)>>);

    impl FileObserver for Repairs {
        fn torn_tail(&self, kind: FileKind, bytes: u64) {
            self.0.lock().unwrap().push((kind, bytes));
        }
    }

    #[tokio::test]
    async fn a_torn_dead_letter_is_moved_aside_before_the_next_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.dead-letters.jsonl");
        let repairs = Arc::new(Repairs::default());
        let file = DeadLetterFile::new(&path).with_observer(Some(repairs.clone()));
        file.append("events", "permanent", 1, "HTTP 400", &[event(1)])
            .await
            .unwrap();
        let fragment = "{\"sink\":\"events\",\"reason\":\"perm";
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(fragment.as_bytes())
            .unwrap();
        file.append("events", "permanent", 1, "HTTP 400", &[event(2)])
            .await
            .unwrap();

        let events = read(&path).expect("every line is a dead letter");
        assert_eq!(run_ids(&events), ["run-1", "run-2"]);
        let torn = std::fs::read_to_string(dir.path().join("events.dead-letters.jsonl.torn"));
        assert_eq!(torn.unwrap(), format!("{fragment}\n"));
        assert_eq!(
            *repairs.0.lock().unwrap(),
            [(FileKind::SinkDeadLetters, fragment.len() as u64)]
        );
    }

    /// An entry this version cannot read is kept whole, one line each: its JSON as it was (even
    /// spread over lines), or its text. A version that can read it gets the event back; this
    /// one refuses the file, naming the line, rather than dropping what it cannot read.
    #[tokio::test]
    async fn an_unreadable_entry_is_kept_whole_and_read_back_by_a_version_that_knows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.dead-letters.jsonl");
        let file = DeadLetterFile::new(&path);
        let mut newer = serde_json::to_value(event(7)).unwrap();
        newer["output"]["dispatchers"] = serde_json::json!([{
            "dispatcher_id": "jsonl", "result": "cancelled", "duration_ms": 1.5,
            "output_count": 0, "attempts": 1, "route_ids": ["r"]
        }]);
        let spread = serde_json::to_string_pretty(&newer).unwrap();
        let error = serde_json::from_str::<DispatchEvent>(&spread)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cancelled"), "{error}");
        file.append_unreadable("events", Some(&spread), &error)
            .await
            .unwrap();
        file.append_unreadable("events", Some("not json"), "expected value")
            .await
            .unwrap();
        file.append_unreadable("events", None, "the entry has no `data` field")
            .await
            .unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let letters: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(letters.len(), 3, "{text}");
        for letter in &letters {
            assert_eq!(letter["sink"], "events");
            assert_eq!(letter["reason"], UNREADABLE);
            assert_eq!(letter["attempts"], 0);
        }
        assert_eq!(letters[0]["event"], newer);
        assert_eq!(letters[0]["last_error"], error.as_str());
        assert_eq!(letters[1]["event"], "not json");
        assert_eq!(letters[2]["event"], serde_json::Value::Null);

        // This version names the line it cannot read, and leaves the file where it is.
        let refused = take(&path, "replayed").unwrap_err();
        assert!(
            refused.contains("events.dead-letters.jsonl:1: not a dead letter"),
            "{refused}"
        );
        assert!(path.exists());
        // A version that knows the result reads the event as it was written.
        let known = text
            .lines()
            .next()
            .unwrap()
            .replace("\"cancelled\"", "\"error\"");
        let letter: DeadLetter = serde_json::from_str(&known).unwrap();
        assert_eq!(letter.event.run_id, "run-7");
    }

    #[tokio::test]
    async fn take_repairs_reads_and_moves_the_file_so_the_next_letter_starts_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.dead-letters.jsonl");
        let file = DeadLetterFile::new(&path);
        file.append("bus", "publish_failed", 3, "redis: down", &[event(1)])
            .await
            .unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"sink\":")
            .unwrap();

        let (events, moved_to) = take(&path, "republished").unwrap();
        assert_eq!(run_ids(&events), ["run-1"]);
        assert_eq!(
            moved_to,
            dir.path().join("bus.dead-letters.republished.jsonl")
        );
        assert!(!path.exists());
        file.append("bus", "publish_failed", 3, "redis: down", &[event(2)])
            .await
            .unwrap();
        assert_eq!(run_ids(&read(&path).unwrap()), ["run-2"]);
        assert_eq!(run_ids(&read(&moved_to).unwrap()), ["run-1"]);
    }
}
