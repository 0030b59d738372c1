//! The files dispatchd appends to, and the writer that commits lines to them in groups.
//!
//! Every appended file (the JSONL dispatcher's messages, the file sink's events, the sinks' and
//! the Redis bus's dead letters) is written through an [`AppendFile`], which keeps three promises:
//!
//! - **Whole lines after a crash.** A process killed mid-write can leave a partial last line. On
//!   every open the bytes after the last newline are moved to `<file>.torn` (appended to, one
//!   fragment per line, synced) and the file is cut back to its last whole line, so the next line
//!   starts whole. Each repair is logged (WARN, with the path and the byte count) and counted
//!   (`file_torn_tails_total{file_kind}`). A write that failed part way (a full disk) is repaired
//!   the same way before the next one.
//! - **Reopen, the logrotate way.** [`Files::reopen`] (SIGHUP) makes every writer reopen its path
//!   at its next commit; and before each commit the writer compares the path's device and inode
//!   with its open file's (one `stat`), so a file moved aside (`mv`, `dispatchd republish`) is
//!   replaced by a new one at the path by the next commit, signal or not.
//! - **Nothing lands in a file after it was taken.** Each commit holds an exclusive `flock` on its
//!   file from that check to the end of its write (and sync). [`move_aside`] takes the same lock
//!   before it reads and renames a file, so a commit either finished before (and is read) or
//!   starts after (and finds the path moved, and writes to a new file).
//!
//! [`Appender`] is the group-commit writer on top: one writer task owns the file, takes every
//! line waiting, writes them in one call (check, write, flush to the OS, and `fsync` when
//! asked), then answers each caller. Without `fsync`, on an open file whose last such call was
//! fast, the call runs in place on the writer task (a few microseconds into the page cache);
//! otherwise on tokio's blocking pool ([`commit_shared`] says when and why). A caller's `append` returns only after its line reached
//! the operating system (or the disk), and a write error fails the lines it concerns instead of
//! vanishing. Written here rather than taken from a crate: what it must do is specific (bounded
//! queue as backpressure, one answer per line, commit at shutdown on a task tracker) and small.
//! The JSONL dispatcher appends messages through it; serve's Redis publisher appends the dead
//! letters of events Redis could not take, synced, so an outage costs one `fsync` per group of
//! events rather than one per event.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Lines waiting for the writer. When full, callers wait: backpressure, not growth.
const QUEUE_CAPACITY: usize = 1024;
/// The most lines one commit takes.
const MAX_BATCH: usize = 256;
/// A commit buffer larger than this (a huge line went through) is not kept for the next one.
const KEEP_BUFFER: usize = 1 << 20;
/// Times an open retries when the path is replaced between opening and locking it.
const OPEN_ATTEMPTS: usize = 8;
/// A commit in place (see [`commit_shared`]) that took longer than this, and slept, is a slow
/// write: counted, and a second one within [`SLOW_WINDOW`] sends the file's next commits to the
/// blocking pool for [`SLOW_BACKOFF`].
const SLOW_IN_PLACE: Duration = Duration::from_millis(1);
/// A commit in place that took longer than this sends the file to the blocking pool at once.
const STALL_IN_PLACE: Duration = Duration::from_millis(10);
const SLOW_WINDOW: Duration = Duration::from_secs(1);
const SLOW_BACKOFF: Duration = Duration::from_secs(10);

/// Which file it is: the `file_kind` label of `file_torn_tails_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The JSONL dispatcher's file.
    Messages,
    /// The file sink's events.
    SinkEvents,
    /// A sink's dead letters.
    SinkDeadLetters,
    /// The Redis bus's dead letters (events Redis could not take).
    BusDeadLetters,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Messages => "messages",
            FileKind::SinkEvents => "sink_events",
            FileKind::SinkDeadLetters => "sink_dead_letters",
            FileKind::BusDeadLetters => "bus_dead_letters",
        }
    }
}

/// Told about repairs (the metrics implement it).
pub trait FileObserver: Send + Sync + 'static {
    /// A file of `kind` will be appended to: its counters can start at zero, so that the first
    /// repair or slow write is an increase (Prometheus's `increase` does not see a series that
    /// appears at 1).
    fn appending(&self, _kind: FileKind) {}
    /// A torn last line of `bytes` bytes was moved aside.
    fn torn_tail(&self, kind: FileKind, bytes: u64);
    /// An append written in place took longer than 1 ms and slept during it: it waited on the
    /// file (see [`commit_shared`] for when the file's next ones go to the blocking pool).
    fn slow_write(&self, _kind: FileKind) {}
}

/// What every appended file of a process shares: the reopen signal and the observer of repairs.
/// Cheap to clone; the app holds one and hands it to each writer it builds.
#[derive(Clone)]
pub struct Files {
    generation: Arc<watch::Sender<u64>>,
    observer: Option<Arc<dyn FileObserver>>,
}

impl Default for Files {
    /// A reopen signal of its own and no observer.
    fn default() -> Files {
        Files::new(None)
    }
}

impl Files {
    pub fn new(observer: Option<Arc<dyn FileObserver>>) -> Files {
        Files {
            generation: Arc::new(watch::channel(0).0),
            observer,
        }
    }

    /// Asks every writer built from these `Files` to reopen its path at its next commit (what
    /// SIGHUP does). A writer with nothing to write keeps its file until it has.
    pub fn reopen(&self) {
        self.generation.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn observer(&self) -> Option<Arc<dyn FileObserver>> {
        self.observer.clone()
    }

    /// A file at `path` that follows the reopen signal; not open yet.
    pub(crate) fn file(&self, path: &Path, kind: FileKind) -> AppendFile {
        AppendFile::new(
            path,
            kind,
            self.observer.clone(),
            Some(self.generation.subscribe()),
        )
    }
}

/// The device and inode a path or an open file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    device: u64,
    inode: u64,
}

impl Identity {
    #[cfg(unix)]
    fn of(metadata: &std::fs::Metadata) -> Identity {
        use std::os::unix::fs::MetadataExt;
        Identity {
            device: metadata.dev(),
            inode: metadata.ino(),
        }
    }

    /// Elsewhere a moved file is not noticed; SIGHUP does not exist there either.
    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Identity {
        Identity {
            device: 0,
            inode: 0,
        }
    }

    fn of_path(path: &Path) -> io::Result<Identity> {
        std::fs::metadata(path).map(|m| Identity::of(&m))
    }
}

/// One file opened for appending, with blocking I/O: call it from a blocking thread. Opened at
/// the first commit (or by [`AppendFile::open`]), reopened when asked or when its path names
/// another file. See the module docs for what it promises.
pub(crate) struct AppendFile {
    path: PathBuf,
    kind: FileKind,
    observer: Option<Arc<dyn FileObserver>>,
    reopen: Option<watch::Receiver<u64>>,
    open: Option<OpenFile>,
    /// A write failed part way: the tail may be torn, and is repaired before the next write.
    suspect: bool,
    /// Until when commits go to the blocking pool because those written in place were slow.
    slow_until: Option<Instant>,
    /// When the last slow commit in place ended.
    last_slow: Option<Instant>,
    /// How many commits it made (the tests of group commit read it).
    commits: u64,
}

struct OpenFile {
    file: File,
    identity: Identity,
}

impl AppendFile {
    /// A file at `path`, not open yet. Without `reopen` it still follows a move of its path.
    pub(crate) fn new(
        path: &Path,
        kind: FileKind,
        observer: Option<Arc<dyn FileObserver>>,
        reopen: Option<watch::Receiver<u64>>,
    ) -> AppendFile {
        if let Some(observer) = &observer {
            observer.appending(kind);
        }
        AppendFile {
            path: path.to_owned(),
            kind,
            observer,
            reopen,
            open: None,
            suspect: false,
            slow_until: None,
            last_slow: None,
            commits: 0,
        }
    }

    /// Whether a commit without `sync` may run in place, on the caller's thread: the file is
    /// open, whole, not asked to reopen, and not sent to the blocking pool by slow commits.
    /// Reopening and repairing read the file.
    fn may_commit_in_place(&self, now: Instant) -> bool {
        self.open.is_some()
            && !self.suspect
            && self.slow_until.is_none_or(|until| now >= until)
            && !self
                .reopen
                .as_ref()
                // Closed: nothing can ask any more (as `commit` reads it).
                .is_some_and(|reopen| reopen.has_changed().unwrap_or(false))
    }

    /// Notes how long a commit in place took, `waited` telling whether its thread slept during
    /// it (asked only of a commit past [`SLOW_IN_PLACE`]). A slow commit that slept (writeback
    /// throttling, a lock, a network file system) is counted; past [`STALL_IN_PLACE`], or when it
    /// is the second within [`SLOW_WINDOW`], the next commits of this file go to the blocking
    /// pool for [`SLOW_BACKOFF`]. One that never slept was slow because its CPU was taken away
    /// (another thread, a virtual CPU descheduled), not because of the file: the blocking pool
    /// would not spare it (it needs the same CPU, and two thread switches per commit), so it is
    /// neither counted nor acted on. On a loaded host such commits used to send the files of the
    /// default config to the blocking pool under every benchmark run (two context switches per
    /// request); they now stay in place.
    fn note_in_place(&mut self, started: Instant, waited: impl FnOnce() -> bool) {
        let now = Instant::now();
        let took = now.duration_since(started);
        if took <= SLOW_IN_PLACE {
            self.slow_until = None;
            return;
        }
        if !waited() {
            tracing::debug!(
                path = %self.path.display(),
                took_ms = took.as_secs_f64() * 1e3,
                "An append written in place took longer than 1 ms without waiting on the file: its CPU was taken."
            );
            return;
        }
        if let Some(observer) = &self.observer {
            observer.slow_write(self.kind);
        }
        let again = self
            .last_slow
            .is_some_and(|at| now.duration_since(at) <= SLOW_WINDOW);
        self.last_slow = Some(now);
        if took > STALL_IN_PLACE || again {
            self.slow_until = Some(now + SLOW_BACKOFF);
            // At most once per backoff per file: the next commits do not run in place.
            tracing::warn!(
                path = %self.path.display(),
                took_ms = took.as_secs_f64() * 1e3,
                backoff_s = SLOW_BACKOFF.as_secs(),
                "Appends were slow (one over 10 ms, or two over 1 ms within a second): this file's writes go to the blocking pool for a while."
            );
        } else {
            tracing::debug!(
                path = %self.path.display(),
                took_ms = took.as_secs_f64() * 1e3,
                "An append written in place took longer than 1 ms."
            );
        }
    }

    /// Opens it now (creating its directory and the file, repairing a torn tail), so that a bad
    /// path fails at startup rather than at the first line.
    pub(crate) fn open(&mut self) -> io::Result<()> {
        self.prepare(true)?;
        if let Some(open) = &self.open {
            unlock(&open.file);
        }
        Ok(())
    }

    /// Appends `bytes` (whole lines) and returns once they reached the operating system, or the
    /// disk with `sync`.
    pub(crate) fn commit(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        self.commits += 1;
        let asked = match &mut self.reopen {
            Some(reopen) if reopen.has_changed().unwrap_or(false) => {
                reopen.borrow_and_update();
                true
            }
            _ => false,
        };
        self.prepare(asked)?;
        let Some(open) = &mut self.open else {
            return Err(io::Error::other("the file is not open"));
        };
        let mut written = open.file.write_all(bytes);
        if written.is_ok() && sync {
            written = open.file.sync_data();
        }
        unlock(&open.file);
        if written.is_err() {
            self.suspect = true;
        }
        written
    }

    /// Syncs what was written (at close).
    pub(crate) fn sync_all(&mut self) -> io::Result<()> {
        match &self.open {
            Some(open) => open.file.sync_all(),
            None => Ok(()),
        }
    }

    /// Leaves the file open, locked, named by its path, and with whole lines: reopened when
    /// `reopen` asks, when none is open, or when the path names another file now.
    fn prepare(&mut self, reopen: bool) -> io::Result<()> {
        if let (Some(open), false) = (&self.open, reopen) {
            // Best effort: a file system without locks still gets the path check.
            lock(&open.file);
            match Identity::of_path(&self.path) {
                Ok(identity) if identity == open.identity => {
                    if self.suspect {
                        match repair_tail(&open.file, &self.path) {
                            Ok(torn) => self.note_repair(torn),
                            Err(error) => {
                                unlock(&open.file);
                                return Err(self.repair_failed(error));
                            }
                        }
                        self.suspect = false;
                    }
                    return Ok(());
                }
                _ => {
                    unlock(&open.file);
                }
            }
        }
        let reopened = self.open.is_some();
        // Closed first: its lock must not be held while the new file (maybe the same) is locked.
        self.open = None;
        let (file, identity) = open_locked(&self.path, true)?;
        let torn = match repair_tail(&file, &self.path) {
            Ok(torn) => torn,
            Err(error) => return Err(self.repair_failed(error)),
        };
        self.note_repair(torn);
        if reopened {
            tracing::info!(path = %self.path.display(), "Reopened a file.");
        }
        self.open = Some(OpenFile { file, identity });
        self.suspect = false;
        Ok(())
    }

    fn note_repair(&self, bytes: u64) {
        if bytes > 0 {
            if let Some(observer) = &self.observer {
                observer.torn_tail(self.kind, bytes);
            }
        }
    }

    fn repair_failed(&self, error: io::Error) -> io::Error {
        io::Error::new(
            error.kind(),
            format!(
                "cannot repair the torn last line of {}: {error}",
                self.path.display()
            ),
        )
    }
}

/// Takes the exclusive lock (`flock`) that every writer of a file, and [`move_aside`], hold while
/// they use it. It belongs to the open file, so two opens in one process exclude each other too.
/// Best effort: on a file system without locks the path checks still apply.
#[cfg(unix)]
fn lock(file: &File) {
    flock(file, rustix::fs::FlockOperation::LockExclusive);
}

#[cfg(unix)]
fn unlock(file: &File) {
    flock(file, rustix::fs::FlockOperation::Unlock);
}

#[cfg(unix)]
fn flock(file: &File, operation: rustix::fs::FlockOperation) {
    // A signal (SIGHUP) can interrupt the wait; wait again.
    while rustix::fs::flock(file, operation) == Err(rustix::io::Errno::INTR) {}
}

#[cfg(not(unix))]
fn lock(_: &File) {}

#[cfg(not(unix))]
fn unlock(_: &File) {}

/// Opens `path` for reading and appending (creating it and its directory with `create`), locks
/// it, and checks that the path still names the file locked: a file moved aside meanwhile (by
/// [`move_aside`]) is let go and the path opened again.
fn open_locked(path: &Path, create: bool) -> io::Result<(File, Identity)> {
    for _ in 0..OPEN_ATTEMPTS {
        if create {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(create)
            .open(path)?;
        lock(&file);
        let identity = Identity::of(&file.metadata()?);
        match Identity::of_path(path) {
            Ok(now) if now == identity => return Ok((file, identity)),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound && create => {}
            Err(error) => return Err(error),
        }
    }
    Err(io::Error::other(format!(
        "{} kept being replaced while it was opened",
        path.display()
    )))
}

/// Where the torn tails of `path` go: `<path>.torn`.
pub fn torn_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".torn");
    PathBuf::from(name)
}

/// Moves the bytes after the last newline of `file` (at `path`) to `<path>.torn`, followed by a
/// newline, syncs it, then cuts `file` back to its last whole line. Answers how many bytes were
/// moved (0 when the file ends with a newline, is empty, or is not a regular file). The fragment
/// is synced before the cut: a crash in between leaves it in both places, never in neither.
fn repair_tail(file: &File, path: &Path) -> io::Result<u64> {
    let metadata = file.metadata()?;
    let len = metadata.len();
    if !metadata.is_file() || len == 0 {
        return Ok(0);
    }
    let mut reader = file;
    let keep = whole_lines_end(&mut reader, len)?;
    if keep == len {
        return Ok(0);
    }
    let torn = torn_path(path);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&torn)?;
    reader.seek(SeekFrom::Start(keep))?;
    let mut fragment = Vec::with_capacity(((len - keep).min(KEEP_BUFFER as u64) as usize) + 1);
    let mut left = len - keep;
    while left > 0 {
        fragment.clear();
        let read = (&mut reader)
            .take(left.min(KEEP_BUFFER as u64))
            .read_to_end(&mut fragment)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        out.write_all(&fragment)?;
        left -= read as u64;
    }
    out.write_all(b"\n")?;
    out.sync_data()?;
    file.set_len(keep)?;
    file.sync_data()?;
    tracing::warn!(
        path = %path.display(),
        bytes = len - keep,
        torn = %torn.display(),
        "A file ended in a torn line (a crash or a failed write mid-line); the partial line was moved aside so the next line starts whole."
    );
    Ok(len - keep)
}

/// The offset just past the last newline of the first `len` bytes (0 when there is none).
fn whole_lines_end(reader: &mut &File, len: u64) -> io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut chunk = vec![0u8; CHUNK.min(len) as usize];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let part = &mut chunk[..(end - start) as usize];
        reader.seek(SeekFrom::Start(start))?;
        reader.read_exact(part)?;
        if let Some(at) = part.iter().rposition(|&b| b == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Takes a file out of its writers' way: under the writers' lock, repairs its torn tail, reads
/// it, hands its text to `check` (which may refuse it: the file then stays where it is), and
/// renames it to `<stem>.<suffix>.jsonl` (or `<stem>.<suffix>-2.jsonl` and so on when that name
/// is taken). A writer's commit in progress finishes first and is read; every later one finds
/// the path moved and writes a new file. Answers what `check` returned and where the file went.
pub fn move_aside<T>(
    path: &Path,
    suffix: &str,
    check: impl FnOnce(&str) -> Result<T, String>,
) -> Result<(T, PathBuf), String> {
    let cannot_read = |e: io::Error| format!("cannot read {}: {e}", path.display());
    let (file, _) = open_locked(path, false).map_err(cannot_read)?;
    repair_tail(&file, path).map_err(cannot_read)?;
    let mut text = String::new();
    let mut reader = &file;
    reader.seek(SeekFrom::Start(0)).map_err(cannot_read)?;
    reader.read_to_string(&mut text).map_err(cannot_read)?;
    let checked = check(&text)?;
    let moved_to = (1..1000)
        .map(|n| match n {
            1 => path.with_extension(format!("{suffix}.jsonl")),
            n => path.with_extension(format!("{suffix}-{n}.jsonl")),
        })
        .find(|candidate| !candidate.exists())
        .ok_or_else(|| format!("no free name to move {} to", path.display()))?;
    std::fs::rename(path, &moved_to).map_err(|e| {
        format!(
            "cannot move {} to {}: {e}",
            path.display(),
            moved_to.display()
        )
    })?;
    // Dropping the file releases the lock: waiting writers find the path moved.
    drop(file);
    Ok((checked, moved_to))
}

/// Removes `path` if it is empty, under the writers' lock (a writer that just created it and is
/// about to write keeps it). Answers whether it was removed.
pub fn remove_if_empty(path: &Path) -> io::Result<bool> {
    let file = match open_locked(path, false) {
        Ok((file, _)) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    if file.metadata()?.len() > 0 {
        return Ok(false);
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

/// How many times the calling thread has slept (its voluntary context switches, from
/// `getrusage(RUSAGE_THREAD)`): what tells a commit that waited on its file from one whose CPU
/// was taken away, which is an involuntary switch, or no switch at all when the hypervisor
/// deschedules the virtual CPU. One system call; read before every commit in place, and after
/// one only when it was slow. `None` where it cannot be read (not Linux): every slow commit then
/// counts as waiting, the rule by the clock alone.
#[derive(Debug, Clone, Copy)]
struct Sleeps(Option<std::ffi::c_long>);

impl Sleeps {
    fn now() -> Sleeps {
        #[cfg(target_os = "linux")]
        {
            use nix::sys::resource::{UsageWho, getrusage};
            Sleeps(
                getrusage(UsageWho::RUSAGE_THREAD)
                    .ok()
                    .map(|usage| usage.voluntary_context_switches()),
            )
        }
        #[cfg(not(target_os = "linux"))]
        {
            Sleeps(None)
        }
    }

    /// Whether the thread slept since `before` (read on the same thread); when either reading
    /// is missing, yes.
    fn since(self, before: Sleeps) -> bool {
        match (before.0, self.0) {
            (Some(before), Some(now)) => now > before,
            _ => true,
        }
    }
}

/// Runs `commit` of a shared [`AppendFile`]. Answers its result and gives `bytes` back (to
/// reuse the buffer).
///
/// Without `sync`, on an open and whole file that nobody else holds, the commit runs in place:
/// its `flock`, `stat`, `write` and `flock` hand the bytes to the page cache in a few
/// microseconds, which costs less than waking a blocking-pool thread and being woken by it (a
/// profile of the default config at its ceiling had those wake-ups at a quarter of the CPU). A
/// commit in place that takes longer than [`STALL_IN_PLACE`], or two longer than
/// [`SLOW_IN_PLACE`] within [`SLOW_WINDOW`], while its thread slept ([`Sleeps`]: a disk under
/// writeback pressure, a network file system, not a CPU taken away), send the file's commits to
/// the blocking pool for [`SLOW_BACKOFF`]: a slow disk
/// stalls a runtime worker for at most 10 ms at a time, at most once a second, or twice before
/// each backoff. Opening, reopening, repairs and `fsync` always go to the blocking pool.
pub(crate) async fn commit_shared(
    file: &Arc<Mutex<AppendFile>>,
    bytes: Vec<u8>,
    sync: bool,
) -> (io::Result<()>, Vec<u8>) {
    if !sync {
        if let Ok(mut held) = file.try_lock() {
            let started = Instant::now();
            if held.may_commit_in_place(started) {
                let sleeps = Sleeps::now();
                let written = held.commit(&bytes, false);
                held.note_in_place(started, || Sleeps::now().since(sleeps));
                return (written, bytes);
            }
        }
    }
    let file = file.clone();
    let done = tokio::task::spawn_blocking(move || {
        let written = file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commit(&bytes, sync);
        (written, bytes)
    })
    .await;
    done.unwrap_or_else(|error| {
        (
            Err(io::Error::other(format!(
                "the write did not finish: {error}"
            ))),
            Vec::new(),
        )
    })
}

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
    /// Opens `path` for appending (creating its directory, repairing a torn last line) and starts
    /// the writer on `tracker`; the writer follows `files`' reopen signal and reports repairs to
    /// its observer as `kind`. With `sync`, each commit ends with `sync_data`. When `shutdown` is
    /// cancelled the writer stops taking lines, commits what is queued and ends.
    pub async fn open(
        path: &Path,
        kind: FileKind,
        sync: bool,
        files: &Files,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> io::Result<Appender> {
        let mut file = files.file(path, kind);
        let file = tokio::task::spawn_blocking(move || file.open().map(|()| file))
            .await
            .map_err(io::Error::other)??;
        Ok(Appender::start(
            Arc::new(Mutex::new(file)),
            sync,
            tracker,
            shutdown,
        ))
    }

    /// Starts the writer of an opened `file` on `tracker`.
    fn start(
        file: Arc<Mutex<AppendFile>>,
        sync: bool,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Appender {
        let path: Arc<Path> = file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .path
            .as_path()
            .into();
        let (queue, jobs) = mpsc::channel(QUEUE_CAPACITY);
        tracker.spawn(write_loop(jobs, file, sync, shutdown, path.to_path_buf()));
        Appender { path, queue }
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
    file: Arc<Mutex<AppendFile>>,
    sync: bool,
    shutdown: CancellationToken,
    path: PathBuf,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut buffer = Vec::new();
    loop {
        tokio::select! {
            received = jobs.recv_many(&mut batch, MAX_BATCH) => {
                if received == 0 {
                    break;
                }
                gather(&mut jobs, &mut batch).await;
                commit(&file, sync, &mut batch, &mut buffer).await;
            }
            () = shutdown.cancelled() => {
                jobs.close();
                while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    commit(&file, sync, &mut batch, &mut buffer).await;
                }
                break;
            }
        }
    }
    tracing::debug!(path = %path.display(), "A file writer stopped.");
}

/// Lets every task that is ready to run go first, then takes the lines they queued meanwhile:
/// the group in group commit. Without it there is no group under load. A caller's line wakes
/// the writer, and tokio runs a task woken by the running one next (its LIFO slot). So the
/// writer took each line alone, and a server at its ceiling with 32 connections made one commit
/// per request: its `getrusage`, `flock`, `statx`, `write` and `flock` were five of every
/// request's seven system calls. `yield_now` defers the writer until its worker has run what
/// was ready, at most one scheduler round: the connections served in that round add their lines
/// to this commit. An idle server pays one poll of the I/O driver per commit.
async fn gather(jobs: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
    if batch.len() >= MAX_BATCH {
        return;
    }
    tokio::task::yield_now().await;
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Writes the batch's lines in one blocking call, then answers each caller.
async fn commit(
    file: &Arc<Mutex<AppendFile>>,
    sync: bool,
    batch: &mut Vec<Job>,
    buffer: &mut Vec<u8>,
) {
    let mut lines = std::mem::take(buffer);
    lines.clear();
    for job in batch.iter() {
        lines.extend_from_slice(&job.line);
    }
    let (written, lines) = commit_shared(file, lines, sync).await;
    if lines.capacity() <= KEEP_BUFFER {
        *buffer = lines;
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

    async fn open(path: &Path, files: &Files, tracker: &TaskTracker) -> Appender {
        Appender::open(
            path,
            FileKind::Messages,
            true,
            files,
            tracker,
            CancellationToken::new(),
        )
        .await
        .unwrap()
    }

    /// Counts repairs by kind, and slow writes.
    #[derive(Default)]
    struct Repairs(Mutex<Vec<(FileKind, u64)>>, Mutex<Vec<FileKind>>);

    impl FileObserver for Repairs {
        fn torn_tail(&self, kind: FileKind, bytes: u64) {
            self.0.lock().unwrap().push((kind, bytes));
        }

        fn slow_write(&self, kind: FileKind) {
            self.1.lock().unwrap().push(kind);
        }
    }

    fn observed() -> (Files, Arc<Repairs>) {
        let repairs = Arc::new(Repairs::default());
        (Files::new(Some(repairs.clone())), repairs)
    }

    fn parsed_lines(path: &Path) -> Vec<u32> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap_or_else(|_| panic!("a whole line: {l:?}")))
            .collect()
    }

    #[tokio::test]
    async fn concurrent_lines_are_all_committed_before_their_callers_return() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/letters.jsonl");
        let tracker = TaskTracker::new();
        let appender = open(&path, &Files::default(), &tracker).await;
        let writes = (0..100).map(|n| {
            let appender = appender.clone();
            async move { appender.append(format!("{n}\n").into_bytes()).await }
        });
        for outcome in futures::future::join_all(writes).await {
            outcome.unwrap();
        }
        let mut numbers = parsed_lines(&path);
        numbers.sort_unstable();
        assert_eq!(numbers, (0..100).collect::<Vec<_>>());
    }

    /// Lines that callers queue in one scheduler round share a commit: the group in group
    /// commit. On the runtime dispatchd serves on (multi-thread), a task woken by the running
    /// one runs next (tokio's LIFO slot), so without [`gather`] the writer, woken by each line,
    /// took it alone: 64 callers made 64 commits.
    #[test]
    fn lines_queued_in_one_round_share_a_commit() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grouped.jsonl");
        let mut file = Files::default().file(&path, FileKind::Messages);
        file.open().unwrap();
        let file = Arc::new(Mutex::new(file));
        let tracker = TaskTracker::new();
        let shared = file.clone();
        runtime.block_on(async move {
            let appender = Appender::start(shared, false, &tracker, CancellationToken::new());
            // Spawned from a task on the worker, so that every caller is in its queue before
            // the first runs, as connections that became readable together are.
            tokio::spawn(async move {
                let callers: Vec<_> = (0..64)
                    .map(|n| {
                        let appender = appender.clone();
                        tokio::spawn(
                            async move { appender.append(format!("{n}\n").into_bytes()).await },
                        )
                    })
                    .collect();
                for caller in callers {
                    caller.await.unwrap().unwrap();
                }
            })
            .await
            .unwrap();
        });
        let mut numbers = parsed_lines(&path);
        numbers.sort_unstable();
        assert_eq!(numbers, (0..64).collect::<Vec<_>>());
        let commits = file.lock().unwrap().commits;
        assert!(
            commits <= 8,
            "64 lines queued together took {commits} commits"
        );
    }

    #[test]
    fn commits_run_in_place_only_on_a_whole_open_file_that_was_fast() {
        let dir = tempfile::tempdir().unwrap();
        let (files, observed) = observed();
        let mut file = files.file(&dir.path().join("m.jsonl"), FileKind::Messages);
        let now = Instant::now();
        assert!(!file.may_commit_in_place(now), "not open yet");
        file.open().unwrap();
        assert!(file.may_commit_in_place(now));

        // One slow commit alone is counted and stays in place; a second within the window
        // sends the next ones to the blocking pool for the backoff.
        let slow = |took: Duration| Instant::now().checked_sub(took).unwrap();
        file.note_in_place(slow(SLOW_IN_PLACE * 3), || true);
        assert!(file.may_commit_in_place(Instant::now()), "one slow write");
        assert_eq!(*observed.1.lock().unwrap(), [FileKind::Messages]);
        file.note_in_place(slow(SLOW_IN_PLACE * 3), || true);
        let after = Instant::now();
        assert!(!file.may_commit_in_place(after), "two within a second");
        assert_eq!(
            *observed.1.lock().unwrap(),
            [FileKind::Messages, FileKind::Messages],
            "each slow write counted"
        );
        assert!(file.may_commit_in_place(after + SLOW_BACKOFF));
        file.note_in_place(Instant::now(), || true);
        assert!(
            file.may_commit_in_place(Instant::now()),
            "a fast one clears it"
        );
        assert_eq!(
            observed.1.lock().unwrap().len(),
            2,
            "a fast one is not counted"
        );
        // A slow commit that never slept lost its CPU, not its file: not counted, kept in place,
        // whether slow or a stall, however many.
        for took in [SLOW_IN_PLACE * 3, SLOW_IN_PLACE * 3, STALL_IN_PLACE * 2] {
            file.note_in_place(slow(took), || false);
            assert!(
                file.may_commit_in_place(Instant::now()),
                "preempted for {took:?}"
            );
        }
        assert_eq!(
            observed.1.lock().unwrap().len(),
            2,
            "preemptions not counted"
        );
        // Slow writes further apart than the window each stay in place; one stall does not.
        file.last_slow = Instant::now().checked_sub(SLOW_WINDOW * 2);
        file.note_in_place(slow(SLOW_IN_PLACE * 3), || true);
        assert!(
            file.may_commit_in_place(Instant::now()),
            "the last was long ago"
        );
        file.last_slow = None;
        file.note_in_place(slow(STALL_IN_PLACE * 2), || true);
        assert!(!file.may_commit_in_place(Instant::now()), "one stall");
        assert!(file.may_commit_in_place(Instant::now() + SLOW_BACKOFF));
        file.slow_until = None;

        // A reopen asked for (SIGHUP), and a torn tail to repair, go to the blocking pool.
        files.reopen();
        assert!(!file.may_commit_in_place(Instant::now()));
        file.commit(b"1\n", false).unwrap();
        assert!(
            file.may_commit_in_place(Instant::now()),
            "the reopen was done"
        );
        file.suspect = true;
        assert!(!file.may_commit_in_place(Instant::now()));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sleeps_tell_a_wait_from_work() {
        let before = Sleeps::now();
        // Work without a system call or a lock: the thread may be preempted, never asleep.
        let mut sum = 0u64;
        for i in 0..2_000_000u64 {
            sum = std::hint::black_box(sum.wrapping_add(i ^ (sum >> 3)));
        }
        std::hint::black_box(sum);
        assert!(!Sleeps::now().since(before), "work is not a wait");
        let before = Sleeps::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(Sleeps::now().since(before), "a sleep is a wait");
        assert!(
            Sleeps::now().since(Sleeps(None)),
            "unknown counts as a wait"
        );
    }

    #[tokio::test]
    async fn a_full_disk_fails_every_line_it_concerns() {
        let tracker = TaskTracker::new();
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        let appender = Appender::open(
            Path::new("/dev/full"),
            FileKind::Messages,
            false,
            &Files::default(),
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
        let appender = Appender::open(
            &path,
            FileKind::Messages,
            false,
            &Files::default(),
            &tracker,
            shutdown.clone(),
        )
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

    #[tokio::test]
    async fn a_torn_last_line_is_moved_aside_at_open_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.dead-letters.jsonl");
        std::fs::write(&path, "1\n2\n{\"sink\":\"bu").unwrap();
        let (files, repairs) = observed();
        let tracker = TaskTracker::new();
        let appender = Appender::open(
            &path,
            FileKind::BusDeadLetters,
            true,
            &files,
            &tracker,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        appender.append(b"3\n".to_vec()).await.unwrap();
        assert_eq!(parsed_lines(&path), [1, 2, 3]);
        let torn = dir.path().join("bus.dead-letters.jsonl.torn");
        assert_eq!(std::fs::read_to_string(&torn).unwrap(), "{\"sink\":\"bu\n");
        assert_eq!(*repairs.0.lock().unwrap(), [(FileKind::BusDeadLetters, 11)]);

        // The next repair appends to the same .torn file, one fragment per line; a file that is
        // only a fragment is cut to nothing.
        drop(appender);
        std::fs::write(&path, "4").unwrap();
        let appender = open(&path, &files, &tracker).await;
        appender.append(b"5\n".to_vec()).await.unwrap();
        assert_eq!(parsed_lines(&path), [5]);
        assert_eq!(
            std::fs::read_to_string(&torn).unwrap(),
            "{\"sink\":\"bu\n4\n"
        );
        assert_eq!(repairs.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_tail_longer_than_the_scan_chunk_is_moved_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let long = "x".repeat(200_000);
        std::fs::write(&path, format!("1\n{long}")).unwrap();
        let mut file = AppendFile::new(&path, FileKind::SinkEvents, None, None);
        file.commit(b"2\n", false).unwrap();
        assert_eq!(parsed_lines(&path), [1, 2]);
        assert_eq!(
            std::fs::read_to_string(torn_path(&path)).unwrap(),
            format!("{long}\n")
        );
    }

    #[test]
    fn whole_files_and_empty_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("whole.jsonl", "1\n2\n"), ("empty.jsonl", "")] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            AppendFile::new(&path, FileKind::Messages, None, None)
                .open()
                .unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
            assert!(!torn_path(&path).exists());
        }
    }

    #[tokio::test]
    async fn a_file_moved_aside_is_replaced_at_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.jsonl");
        let moved = dir.path().join("messages.jsonl.1");
        let tracker = TaskTracker::new();
        let appender = open(&path, &Files::default(), &tracker).await;
        appender.append(b"1\n".to_vec()).await.unwrap();
        std::fs::rename(&path, &moved).unwrap();
        appender.append(b"2\n".to_vec()).await.unwrap();
        assert_eq!(parsed_lines(&moved), [1]);
        assert_eq!(parsed_lines(&path), [2]);
    }

    #[tokio::test]
    async fn the_reopen_signal_reopens_at_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.jsonl");
        let (files, repairs) = observed();
        let tracker = TaskTracker::new();
        let appender = open(&path, &files, &tracker).await;
        appender.append(b"1\n".to_vec()).await.unwrap();
        // Someone else left a fragment in the same file (same inode, so only a reopen notices):
        // reopening repairs it before the next line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"par")
            .unwrap();
        files.reopen();
        appender.append(b"2\n".to_vec()).await.unwrap();
        assert_eq!(parsed_lines(&path), [1, 2]);
        assert_eq!(*repairs.0.lock().unwrap(), [(FileKind::Messages, 5)]);
        // Seen once: the next commit does not reopen again.
        appender.append(b"3\n".to_vec()).await.unwrap();
        assert_eq!(repairs.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_write_that_failed_part_way_is_repaired_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut file = AppendFile::new(&path, FileKind::SinkEvents, None, None);
        file.commit(b"1\n", false).unwrap();
        // What a failed write leaves: part of a line, and the writer told it failed.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"ha")
            .unwrap();
        file.suspect = true;
        file.commit(b"2\n", false).unwrap();
        assert_eq!(parsed_lines(&path), [1, 2]);
        assert_eq!(
            std::fs::read_to_string(torn_path(&path)).unwrap(),
            "{\"ha\n"
        );
    }

    /// Whether another open of `path` could take the lock now.
    #[cfg(unix)]
    fn lockable(path: &Path) -> bool {
        let other = File::open(path).unwrap();
        let free = rustix::fs::flock(&other, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        free.is_ok()
    }

    /// Tries the lock from inside a repair, that is in the middle of a commit.
    #[cfg(unix)]
    struct LockProbe(PathBuf, Mutex<Vec<bool>>);

    #[cfg(unix)]
    impl FileObserver for LockProbe {
        fn torn_tail(&self, _: FileKind, _: u64) {
            self.1.lock().unwrap().push(lockable(&self.0));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_commit_and_move_aside_hold_the_lock_so_a_moved_file_gets_no_more_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.dead-letters.jsonl");
        std::fs::write(&path, "1\n{\"sink\"").unwrap();
        let probe = Arc::new(LockProbe(path.clone(), Mutex::new(Vec::new())));
        let mut writer =
            AppendFile::new(&path, FileKind::BusDeadLetters, Some(probe.clone()), None);
        writer.commit(b"2\n", true).unwrap();
        assert_eq!(
            *probe.1.lock().unwrap(),
            [false],
            "locked during the commit"
        );
        assert!(lockable(&path), "and free after it");

        let (text, moved_to) = move_aside(&path, "republished", |text| {
            assert!(!lockable(&path), "locked while it is read and moved");
            Ok(text.to_owned())
        })
        .unwrap();
        assert_eq!(text, "1\n2\n");
        assert_eq!(
            moved_to,
            dir.path().join("bus.dead-letters.republished.jsonl")
        );
        // The writer's next commit finds the path moved and starts a new file there.
        writer.commit(b"3\n", true).unwrap();
        assert_eq!(parsed_lines(&moved_to), [1, 2]);
        assert_eq!(parsed_lines(&path), [3]);

        // Taken again: the first moved file is kept, the second gets the next name.
        let (_, second) = move_aside(&path, "republished", |_| Ok(())).unwrap();
        assert_eq!(
            second,
            dir.path().join("bus.dead-letters.republished-2.jsonl")
        );
        assert_eq!(parsed_lines(&moved_to), [1, 2]);
        assert_eq!(parsed_lines(&second), [3]);
    }

    #[test]
    fn move_aside_leaves_a_refused_file_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "nope\n").unwrap();
        let refused = move_aside(&path, "republished", |_| Err::<(), _>("bad".to_owned()));
        assert_eq!(refused, Err("bad".to_owned()));
        assert!(path.exists());
        let missing = move_aside(&dir.path().join("none.jsonl"), "x", |_| Ok(()));
        assert!(missing.unwrap_err().starts_with("cannot read"));
    }

    #[test]
    fn remove_if_empty_keeps_a_file_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        std::fs::write(&path, "1\n").unwrap();
        assert!(!remove_if_empty(&path).unwrap());
        std::fs::write(&path, "").unwrap();
        assert!(remove_if_empty(&path).unwrap());
        assert!(!path.exists());
        assert!(!remove_if_empty(&path).unwrap());
    }
}
