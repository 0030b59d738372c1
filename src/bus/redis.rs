//! Redis Streams: a durable, shared events stream.
//!
//! A stream is an append-only log of entries, each with an id (`<ms>-<seq>`) and fields; this bus
//! writes one field, `data`, holding the event's JSON. A consumer group is a named cursor over a
//! stream shared by several consumers: `XREADGROUP … >` hands each new entry to exactly one
//! consumer of the group and records it in the group's pending entries list (PEL) under that
//! consumer's name until the consumer `XACK`s it.
//!
//! The delivery guarantee is at-least-once, and it holds because of three rules:
//! - An entry is acknowledged only after the sink driver settled it (the backend accepted it,
//!   or it was written to the dead-letter file). A consumer that dies before that leaves the
//!   entry pending.
//! - Consumer names are stable (configured, by default the host name, never a PID), so a
//!   restarted consumer first reads its own pending entries (`XREADGROUP … 0`) before new ones.
//! - Entries pending with another consumer longer than the idle timeout are taken over with
//!   `XAUTOCLAIM`, periodically and under steady traffic too, so a consumer that never comes back
//!   does not strand them.
//!
//! Duplicates are possible (an entry sent, then its consumer killed before the `XACK`): at most
//! the batches in flight. The loop that applies these rules, and the trimming of what every group
//! acknowledged, are [`crate::bus::consume`]'s. `XADD` can also trim the stream with an
//! approximate `MAXLEN`; that trimming can drop entries no group has read yet, so it is off
//! unless configured.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use thiserror::Error;

use crate::appender::{Appender, FileKind, Files};
use crate::bus::BusObserver;
use crate::resilience::{BreakerConfig, BreakerState, CircuitBreaker, RetryPolicy, Trip};

#[derive(Debug, Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A connection that reconnects by itself, with exponential backoff, when Redis goes away.
pub async fn connect(url: &str, response_timeout: Duration) -> Result<ConnectionManager, BusError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

/// Publishes events on a stream.
///
/// As an [`EventBus`](crate::bus::EventBus), an event Redis cannot take is never only a log
/// line: each `XADD` is bounded in time and retried twice (a Redis restart or failover), then the
/// event goes to the dead-letter file. After such a failure a breaker sends the events of the
/// next second straight to the dead-letter file, so ingest keeps its latency while Redis is down,
/// and lets one event through as a probe after it; publishing resumes with the first that
/// succeeds. Events already trying when Redis goes away each wait out their attempts (up to about
/// 1.8 s), so the first seconds of an outage are slow. Each outcome is counted
/// (`bus_redis_events_total{outcome}`). Delivery stays at-least-once: an `XADD` that timed out may
/// still have been applied, and the event may then be in the stream and in the dead-letter file.
#[derive(Clone)]
pub struct RedisPublisher {
    connection: ConnectionManager,
    stream: String,
    max_len: Option<usize>,
    dead_letter: Option<Appender>,
    observer: Option<Arc<dyn BusObserver>>,
    breaker: Arc<CircuitBreaker>,
}

/// Retries of an `XADD` that failed before the event is dead-lettered, and the waits before
/// them (their ceilings, 100 then 200 ms: time for the connection to be re-established).
const PUBLISH_RETRY: RetryPolicy = RetryPolicy {
    attempts: 2,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_millis(400),
};

/// How long one `XADD` may take before it counts as failed. The connection's own reconnection
/// (several attempts with backoff) would otherwise hold ingest for many seconds.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// One event that could not be published (after its retries) opens the breaker for a second.
const PUBLISH_BREAKER: BreakerConfig = BreakerConfig {
    trip: Trip::ConsecutiveFailures(1),
    cool_down: Duration::from_secs(1),
    half_open_successes: 1,
};

impl RedisPublisher {
    pub async fn connect(
        url: &str,
        stream: &str,
        max_len: Option<usize>,
    ) -> Result<RedisPublisher, BusError> {
        Ok(RedisPublisher {
            connection: connect(url, Duration::from_secs(5)).await?,
            stream: stream.to_owned(),
            max_len,
            dead_letter: None,
            observer: None,
            breaker: Arc::new(CircuitBreaker::new(
                Arc::from(format!("bus:{stream}")),
                PUBLISH_BREAKER,
                None,
            )),
        })
    }

    /// `XADD` with the bounded retries of [`PUBLISH_RETRY`], each within [`PUBLISH_TIMEOUT`].
    async fn publish_with_retries(&self, data: &str) -> Result<(), String> {
        let mut retry = 0;
        loop {
            let error = match tokio::time::timeout(PUBLISH_TIMEOUT, self.publish(data)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("redis: no answer within {PUBLISH_TIMEOUT:?}"),
            };
            if retry >= PUBLISH_RETRY.attempts {
                return Err(error);
            }
            retry += 1;
            tokio::time::sleep(PUBLISH_RETRY.ceiling(retry)).await;
        }
    }

    /// Where events go that Redis could not take, as dead letters (synced, committed in groups,
    /// so an outage costs one `fsync` per group of events). Without one they are counted as
    /// dropped.
    pub fn with_dead_letter(mut self, file: Appender) -> RedisPublisher {
        self.dead_letter = Some(file);
        self
    }

    pub fn with_observer(mut self, observer: Option<Arc<dyn BusObserver>>) -> RedisPublisher {
        self.observer = observer;
        self
    }

    fn count(&self, outcome: &'static str) {
        if let Some(observer) = &self.observer {
            observer.published(&self.stream, outcome);
        }
    }

    /// `XADD`: appends one entry and answers its id.
    pub async fn publish(&self, data: &str) -> Result<String, BusError> {
        let mut command = redis::cmd("XADD");
        command.arg(&self.stream);
        if let Some(max_len) = self.max_len {
            command.arg("MAXLEN").arg("~").arg(max_len);
        }
        command.arg("*").arg("data").arg(data);
        let mut connection = self.connection.clone();
        Ok(command.query_async(&mut connection).await?)
    }
}

/// One entry read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// The `data` field; `None` when the entry has none (written by someone else).
    pub data: Option<String>,
}

/// How a consumer reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    pub stream: String,
    pub group: String,
    /// Stable across restarts: it owns its pending entries by this name.
    pub consumer: String,
    /// Entries per read.
    pub count: usize,
    /// How long a read waits for new entries.
    pub block: Duration,
    /// Entries pending with a consumer for longer are claimed. A live consumer keeps what it is
    /// still working on by resetting those entries' idle time well within this (see
    /// [`crate::bus::consume`]).
    pub claim_idle: Duration,
    /// Consumers of the group idle this long and holding no pending entry are removed from it.
    pub retention: Duration,
    /// How often the stream is trimmed of what every group acknowledged; `None`: never.
    pub trim_every: Option<Duration>,
}

/// A stream entry id, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(id: &str) -> Option<EntryId> {
        let (ms, seq) = id.split_once('-')?;
        Some(EntryId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// A member of a consumer group.
///
/// When Redis answers `NOGROUP` (it restarted without its data, or someone deleted the group or
/// the stream), the consumer creates the group again (`XGROUP CREATE … MKSTREAM`) and goes on
/// reading, instead of failing every read from then on. The new group starts after the newest
/// entry this consumer has read (from `0` if it has read none):
/// - after an empty restart, the stream holds only entries written since, and their ids are later
///   (ids are Redis's clock in milliseconds), so every one of them is delivered, including those
///   published before the consumer noticed;
/// - after the group was deleted on a live stream, what this consumer already read is not
///   delivered a second time, which re-reading from `0` would do for the whole stream (a flood
///   of duplicates to every backend when the stream is not trimmed).
///
/// What Redis lost with the group (entries still pending with other consumers, unread entries of
/// a stream that was lost too) cannot be delivered: each recreation is counted
/// ([`BusObserver::group_recreated`], `bus_redis_group_recreated_total`) and logged once.
pub struct StreamConsumer {
    config: ConsumerConfig,
    /// Reads block, so they get a connection of their own; acknowledgements use the other.
    reads: ConnectionManager,
    acks: ConnectionManager,
    /// Re-reading our own pending entries first, from this id.
    pending_from: Option<String>,
    /// The newest entry read so far: where a recreated group starts.
    newest_read: Option<EntryId>,
    observer: Option<Arc<dyn BusObserver>>,
}

fn entries(ids: Vec<StreamId>) -> Vec<Entry> {
    ids.into_iter()
        .map(|entry| Entry {
            data: entry.get::<String>("data"),
            id: entry.id,
        })
        .collect()
}

/// `NOGROUP`: the group, or the stream itself, does not exist.
fn is_no_group(error: &BusError) -> bool {
    match error {
        BusError::Redis(error) => error.code() == Some("NOGROUP"),
    }
}

/// How often a consumer's backlog (pending entries and lag) is read for the metrics, and how
/// long one reading may take: the gauges are at most about this old when scraped.
pub const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// `XGROUP CREATE <stream> <group> <from> MKSTREAM`; `Ok(false)` when it exists already.
async fn create_group(
    connection: &mut ConnectionManager,
    config: &ConsumerConfig,
    from: &str,
) -> Result<bool, BusError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&config.stream)
        .arg(&config.group)
        .arg(from)
        .arg("MKSTREAM")
        .query_async(connection)
        .await;
    match created {
        Ok(()) => Ok(true),
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(false),
        Err(error) => Err(error.into()),
    }
}

impl StreamConsumer {
    /// Connects and creates the group if it does not exist (reading the stream from its start,
    /// so events published before the group existed are delivered too).
    pub async fn connect(url: &str, config: ConsumerConfig) -> Result<StreamConsumer, BusError> {
        let reads = connect(url, config.block + Duration::from_secs(5)).await?;
        let mut acks = connect(url, Duration::from_secs(5)).await?;
        create_group(&mut acks, &config, "0").await?;
        Ok(StreamConsumer {
            config,
            reads,
            acks,
            pending_from: Some("0".to_owned()),
            newest_read: None,
            observer: None,
        })
    }

    /// Reports failed reads and recreated groups to `observer` (their counters start at 0 now,
    /// so the first increase is seen).
    pub fn with_observer(mut self, observer: Option<Arc<dyn BusObserver>>) -> StreamConsumer {
        if let Some(observer) = &observer {
            observer.consumer_started(&self.config.stream, &self.config.group);
        }
        self.observer = observer;
        self
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// The connection acknowledgements and claims use (multiplexed: clones share it).
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.acks.clone()
    }

    /// The next entries: first this consumer's own pending ones (after a restart), then new
    /// ones, waiting up to `block` for them. A missing group is created again (see
    /// [`StreamConsumer`]) and the read answers no entries; any other failure is counted.
    pub async fn read(&mut self) -> Result<Vec<Entry>, BusError> {
        let read = self.read_once().await;
        let read = self.settle(read).await?;
        if let Some(newest) = read.iter().filter_map(|e| EntryId::parse(&e.id)).max() {
            self.newest_read = self.newest_read.max(Some(newest));
        }
        Ok(read)
    }

    /// A failed read or claim: `NOGROUP` recreates the group (and answers no entries); anything
    /// else is counted and returned.
    async fn settle(
        &mut self,
        result: Result<Vec<Entry>, BusError>,
    ) -> Result<Vec<Entry>, BusError> {
        let error = match result {
            Ok(entries) => return Ok(entries),
            Err(error) => error,
        };
        let recreated = if is_no_group(&error) {
            self.recreate_group().await
        } else {
            Err(error)
        };
        match recreated {
            Ok(()) => Ok(Vec::new()),
            Err(error) => {
                if let Some(observer) = &self.observer {
                    observer.read_failed(&self.config.stream, &self.config.group);
                }
                Err(error)
            }
        }
    }

    /// Creates the group again after `NOGROUP`, after the newest entry read.
    async fn recreate_group(&mut self) -> Result<(), BusError> {
        let from = self
            .newest_read
            .map_or_else(|| "0".to_owned(), |id| id.to_string());
        let created = create_group(&mut self.acks, &self.config, &from).await?;
        // Whatever was pending went with the old group.
        self.pending_from = None;
        let (stream, group) = (&self.config.stream, &self.config.group);
        if created {
            if let Some(observer) = &self.observer {
                observer.group_recreated(stream, group);
            }
            tracing::error!(%stream, %group, %from, "The consumer group was gone (Redis lost its data, or the group or stream was deleted); created it again after the newest entry this consumer had read. Entries Redis lost with it are not delivered.");
        } else {
            tracing::info!(%stream, %group, "The consumer group was gone and another consumer created it again.");
        }
        Ok(())
    }

    async fn read_once(&mut self) -> Result<Vec<Entry>, BusError> {
        let config = &self.config;
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&config.group)
            .arg(&config.consumer)
            .arg("COUNT")
            .arg(config.count);
        match &self.pending_from {
            Some(from) => {
                command.arg("STREAMS").arg(&config.stream).arg(from);
            }
            None => {
                command
                    .arg("BLOCK")
                    .arg(config.block.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&config.stream)
                    .arg(">");
            }
        }
        let reply: Option<StreamReadReply> = command.query_async(&mut self.reads).await?;
        let read: Vec<Entry> = reply
            .map(|reply| {
                reply
                    .keys
                    .into_iter()
                    .flat_map(|key| entries(key.ids))
                    .collect()
            })
            .unwrap_or_default();
        if self.pending_from.is_some() {
            match read.last() {
                Some(last) => self.pending_from = Some(last.id.clone()),
                None => self.pending_from = None,
            }
        }
        Ok(read)
    }

    /// `XAUTOCLAIM`: takes over entries other consumers left pending longer than `claim_idle`.
    /// A missing group is created again, as by [`StreamConsumer::read`].
    pub async fn reclaim(&mut self) -> Result<Vec<Entry>, BusError> {
        let claimed = self.reclaim_once().await;
        self.settle(claimed).await
    }

    async fn reclaim_once(&mut self) -> Result<Vec<Entry>, BusError> {
        let config = &self.config;
        let mut claimed = Vec::new();
        let mut cursor = "0-0".to_owned();
        // Bounded: at most ten pages of `count` per call.
        for _ in 0..10 {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&config.stream)
                .arg(&config.group)
                .arg(&config.consumer)
                .arg(config.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(config.count)
                .query_async(&mut self.acks)
                .await?;
            claimed.extend(entries(reply.claimed));
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        Ok(claimed)
    }

    /// `XACK`s the ids in one command.
    pub async fn ack(&mut self, ids: &[String]) -> Result<u64, BusError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut command = redis::cmd("XACK");
        command.arg(&self.config.stream).arg(&self.config.group);
        for id in ids {
            command.arg(id);
        }
        Ok(command.query_async(&mut self.acks).await?)
    }

    /// The group's pending entries and lag (entries not yet delivered to any consumer), from
    /// `XINFO GROUPS`; `None` when the group does not exist.
    pub async fn backlog(&mut self) -> Result<Option<Backlog>, BusError> {
        read_backlog(&mut self.acks, &self.config).await
    }

    /// Reads the backlog every [`BACKLOG_EVERY`] on a connection of its own task, and reports it
    /// to `observer` until `stop`, so the gauges are fresh whatever the reading loop is doing
    /// (waiting for a full sink, backing off while Redis is away). A backlog that cannot be read
    /// (Redis does not answer in time, the group is gone) is reported unknown rather than kept
    /// at its last value; so is every backlog once the task stops.
    pub fn watch_backlog(
        &self,
        observer: Arc<dyn BusObserver>,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut connection = self.acks.clone();
        let config = self.config.clone();
        tokio::spawn(async move {
            let (stream, group) = (config.stream.as_str(), config.group.as_str());
            let mut every = tokio::time::interval(BACKLOG_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = every.tick() => {}
                }
                let read =
                    tokio::time::timeout(BACKLOG_EVERY, read_backlog(&mut connection, &config))
                        .await;
                observer.backlog(stream, group, read.ok().and_then(Result::ok).flatten());
            }
            observer.backlog(stream, group, None);
        })
    }
}

/// A consumer group's backlog, as `XINFO GROUPS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Entries delivered to a consumer of the group and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (a group created
    /// at an id in the middle of the stream, until it caught up).
    pub lag: Option<u64>,
    /// How long the oldest entry not yet delivered to the group has been in the stream, on
    /// Redis' clock (an entry's id is the millisecond it was added); zero when none waits.
    /// `None` when it could not be read.
    pub undelivered_age: Option<Duration>,
}

async fn read_backlog(
    connection: &mut ConnectionManager,
    config: &ConsumerConfig,
) -> Result<Option<Backlog>, BusError> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&config.stream)
        .query_async(connection)
        .await?;
    let Some(group) = groups.into_iter().find(|g| {
        g.get("name")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            .as_deref()
            == Some(config.group.as_str())
    }) else {
        return Ok(None);
    };
    let field = |name: &str| {
        group
            .get(name)
            .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
    };
    let lag = field("lag");
    let undelivered_age = if lag == Some(0) {
        Some(Duration::ZERO)
    } else {
        let last_delivered = group
            .get("last-delivered-id")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
        match last_delivered {
            Some(last) => undelivered_age(connection, &config.stream, &last).await?,
            None => None,
        }
    };
    Ok(Some(Backlog {
        pending: field("pending").unwrap_or(0),
        lag,
        undelivered_age,
    }))
}

/// The age of the first entry of `stream` after `last_delivered` (the group's
/// `last-delivered-id`): Redis' `TIME` minus the millisecond in its id; zero when there is none.
async fn undelivered_age(
    connection: &mut ConnectionManager,
    stream: &str,
    last_delivered: &str,
) -> Result<Option<Duration>, BusError> {
    let (next, time): (redis::streams::StreamRangeReply, (u64, u64)) = redis::pipe()
        .cmd("XRANGE")
        .arg(stream)
        .arg(format!("({last_delivered}"))
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .cmd("TIME")
        .query_async(connection)
        .await?;
    let Some(entry) = next.ids.first() else {
        return Ok(Some(Duration::ZERO));
    };
    Ok(entry_age(&entry.id, time.0 * 1000 + time.1 / 1000))
}

/// Before 2000-01-01 in Unix milliseconds: an id whose first part is smaller was not made by
/// Redis' clock (`XADD … *`) but given by a producer (`1-1`, a sequence).
const EARLIEST_CLOCK_ID_MS: u64 = 946_684_800_000;

/// How long ago Redis added the entry `id` (`<milliseconds>-<sequence>`), at `now_ms`; `None`
/// when the id does not carry the time it was added (a producer's own numbering), so that such a
/// stream shows no age rather than one of decades.
fn entry_age(id: &str, now_ms: u64) -> Option<Duration> {
    let added_ms = id.split_once('-')?.0.parse::<u64>().ok()?;
    (added_ms >= EARLIEST_CLOCK_ID_MS)
        .then(|| Duration::from_millis(now_ms.saturating_sub(added_ms)))
}

/// What [`republish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Republished {
    /// Events appended to the stream.
    pub published: usize,
    /// Events Redis refused again, appended back to the dead-letter file.
    pub returned: usize,
    /// Where the file was moved before republishing.
    pub moved_to: std::path::PathBuf,
}

/// Puts the events of a dead-letter file (the bus's after a Redis outage, or a sink's) back on
/// `stream`, so that every consumer group reading it receives them. The file is moved aside
/// first (to `<name>.republished.jsonl`, or `<name>.republished-2.jsonl` and so on when that is
/// taken), so a crash midway leaves every event in one of the two files; an event Redis refuses
/// again goes back to the original path. Safe while serve runs: the file is taken under the lock
/// serve's writer holds for each commit, so serve's next dead letters go to a new file at the
/// path (see [`crate::bus::dead_letter::take`]). Delivery is at-least-once: an interrupted run
/// repeated from the moved file can publish some events twice.
pub async fn republish(
    url: &str,
    stream: &str,
    file: &std::path::Path,
) -> Result<Republished, String> {
    let publisher = RedisPublisher::connect(url, stream, None)
        .await
        .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
    let path = file.to_owned();
    let (events, moved_to) =
        tokio::task::spawn_blocking(move || crate::bus::dead_letter::take(&path, "republished"))
            .await
            .map_err(|e| e.to_string())??;
    let writers = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let returned_to = Appender::open(
        file,
        FileKind::BusDeadLetters,
        true,
        &Files::default(),
        &writers,
        stop.clone(),
    )
    .await
    .map_err(|e| format!("cannot open {}: {e}", file.display()))?;
    let publisher = publisher.with_dead_letter(returned_to);
    let total = events.len();
    let mut published = 0;
    for event in events {
        published += crate::bus::EventBus::publish(&publisher, event).await;
    }
    drop(publisher);
    stop.cancel();
    writers.close();
    writers.wait().await;
    // Opening it for refused events created the file again; leave none behind if it stayed
    // empty (a serve that appended meanwhile made it non-empty; one about to append holds the
    // lock, and keeps it).
    if published == total {
        let path = file.to_owned();
        let _ = tokio::task::spawn_blocking(move || crate::appender::remove_if_empty(&path)).await;
    }
    Ok(Republished {
        published,
        returned: total - published,
        moved_to,
    })
}

/// Reads a `[[sources]]` entry's `data` as the message it carries (`{"topic": …, "envelope":
/// …}`), or says why it cannot: what a source dispatches, and what it keeps in
/// `<stream>:unreadable` instead.
pub fn source_message(data: Option<&str>) -> Result<crate::engine::OutputMessage, String> {
    match data {
        Some(data) => serde_json::from_str(data).map_err(|e| e.to_string()),
        None => Err("the entry has no `data` field".to_owned()),
    }
}

/// What [`requeue_unreadable`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// Entries moved back onto the stream.
    pub moved: usize,
    /// Entries left in `<stream>:unreadable`: this version cannot read them either.
    pub left: usize,
    /// The first of those, and why.
    pub first_left: Option<(String, String)>,
}

/// KEYS: the stream, `<stream>:unreadable`. ARGV: the kept entry's id, its data. Deletes the kept
/// entry and appends its data to the stream, in one step: a crash or a second run at the same
/// time neither loses it nor posts it twice (the one that deleted it posts it).
const REQUEUE: &str = "
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[1], '*', 'data', ARGV[2])
";

/// Moves the entries a source kept in `<stream>:unreadable` back onto `stream`, oldest first,
/// each one that this version reads as a message; the others stay where they are (posted again
/// they would only be kept again). For after an upgrade: the sources of the new version dispatch
/// what the old one could not read. Only the entries kept when it starts are looked at, so it
/// ends even while an older consumer keeps again what it moves.
pub async fn requeue_unreadable(url: &str, stream: &str) -> Result<Requeued, String> {
    let kept = format!("{stream}:unreadable");
    let mut connection = connect(url, Duration::from_secs(5))
        .await
        .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
    let mut done = Requeued {
        moved: 0,
        left: 0,
        first_left: None,
    };
    // Only what was kept when it started: a consumer of an older version, still running, keeps
    // again what this one moves, and would otherwise be handed it back forever.
    let newest: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&kept)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut connection)
        .await
        .map_err(|e| format!("cannot read {kept}: {e}"))?;
    let Some(end) = newest.ids.first().map(|entry| entry.id.clone()) else {
        return Ok(done);
    };
    let mut after = "-".to_owned();
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&kept)
            .arg(&after)
            .arg(&end)
            .arg("COUNT")
            .arg(100)
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("cannot read {kept}: {e}"))?;
        let Some(last) = page.ids.last() else {
            return Ok(done);
        };
        after = format!("({}", last.id);
        for entry in &page.ids {
            let data = entry.get::<String>("data");
            if let Err(error) = source_message(data.as_deref()) {
                done.left += 1;
                done.first_left.get_or_insert((entry.id.clone(), error));
                continue;
            }
            let Some(data) = data else { continue };
            let posted: Option<String> = redis::cmd("EVAL")
                .arg(REQUEUE)
                .arg(2)
                .arg(stream)
                .arg(&kept)
                .arg(&entry.id)
                .arg(&data)
                .query_async(&mut connection)
                .await
                .map_err(|e| format!("cannot move {} of {kept} to {stream}: {e}", entry.id))?;
            if posted.is_some() {
                done.moved += 1;
            }
        }
    }
}

/// Publishes handler outputs on the bus: an output of topic `t` goes to stream
/// `<prefix>t` as `{"topic": t, "envelope": …}`; a failure makes the dispatch `publish_failed`.
pub struct RedisOutputs {
    connection: ConnectionManager,
    prefix: String,
}

impl RedisOutputs {
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisOutputs, BusError> {
        Ok(RedisOutputs {
            connection: connect(url, Duration::from_secs(5)).await?,
            prefix: prefix.to_owned(),
        })
    }
}

#[async_trait::async_trait]
impl crate::engine::OutputPublisher for RedisOutputs {
    async fn publish(
        &self,
        outputs: &[crate::engine::OutputMessage],
    ) -> Result<(), crate::engine::PublishError> {
        let mut pipeline = redis::pipe();
        for output in outputs {
            let data = serde_json::to_string(output)
                .map_err(|e| crate::engine::PublishError(e.to_string()))?;
            pipeline
                .cmd("XADD")
                .arg(format!("{}{}", self.prefix, output.topic))
                .arg("*")
                .arg("data")
                .arg(data)
                .ignore();
        }
        let mut connection = self.connection.clone();
        // Bounded: while Redis is away the connection's reconnection would hold the dispatch
        // (and its HTTP request) for many seconds; `publish_failed` tells the caller to retry.
        match tokio::time::timeout(OUTPUTS_TIMEOUT, pipeline.query_async::<()>(&mut connection))
            .await
        {
            Ok(answer) => answer.map_err(|e| crate::engine::PublishError(format!("redis: {e}"))),
            Err(_) => Err(crate::engine::PublishError(format!(
                "redis: no answer within {OUTPUTS_TIMEOUT:?}"
            ))),
        }
    }
}

/// How long publishing a dispatch's outputs may take before the dispatch is `publish_failed`.
const OUTPUTS_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait::async_trait]
impl crate::bus::EventBus for RedisPublisher {
    async fn publish(&self, event: crate::bus::DispatchEvent) -> usize {
        let mut bytes = Vec::with_capacity(1024);
        event.write_json(&mut bytes);
        // Always UTF-8: it is made of `str`s and ASCII.
        let data = match String::from_utf8(bytes) {
            Ok(data) => data,
            Err(error) => {
                tracing::error!(%error, "A dispatch event could not be serialized.");
                return 0;
            }
        };
        let (error, attempts, tried) = match self.breaker.try_acquire() {
            Ok(ticket) => match self.publish_with_retries(&data).await {
                Ok(()) => {
                    self.breaker.record(ticket, true);
                    self.count("published");
                    return 1;
                }
                Err(error) => {
                    self.breaker.record(ticket, false);
                    (error, PUBLISH_RETRY.attempts + 1, true)
                }
            },
            Err(_) => (
                "redis: not tried, a publish failed less than a second ago".to_owned(),
                0,
                false,
            ),
        };
        let kept = match &self.dead_letter {
            Some(file) => {
                let mut line = Vec::with_capacity(data.len() + 256);
                match crate::bus::dead_letter::write_line(
                    &mut line,
                    "bus",
                    "publish_failed",
                    attempts,
                    &error,
                    &event,
                ) {
                    Ok(()) => file.append(line).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
            None => Err("no dead-letter file".to_owned()),
        };
        match kept {
            Ok(()) => {
                self.count("dead_lettered");
                // Loud once per try at Redis (at most about once a second), not once per event.
                if tried {
                    tracing::error!(%error, stream = %self.stream, "Redis cannot take dispatch events; they go to the bus dead-letter file until it can.");
                } else {
                    tracing::debug!(run_id = %event.run_id, "A dispatch event went to the bus dead-letter file.");
                }
            }
            Err(dead_letter_error) => {
                self.count("dropped");
                tracing::error!(%error, %dead_letter_error, run_id = %event.run_id, stream = %self.stream, "A dispatch event was dropped: neither Redis nor the bus dead-letter file could take it.");
            }
        }
        0
    }

    fn status(&self) -> crate::bus::BusStatus {
        crate::bus::BusStatus {
            kind: "redis",
            publishing: match self.breaker.state() {
                BreakerState::Closed => crate::bus::Publishing::Ok,
                BreakerState::Open | BreakerState::HalfOpen => crate::bus::Publishing::Failing,
            },
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_entrys_age_is_read_from_a_clock_made_id_only() {
        let now = 1_764_800_000_000;
        assert_eq!(
            entry_age("1764799999000-3", now),
            Some(Duration::from_secs(1))
        );
        // Added "later" than now (another clock's id): no negative age.
        assert_eq!(entry_age("1764800000500-0", now), Some(Duration::ZERO));
        // A producer's own numbering, and ids that are not ids: unknown, not decades old.
        assert_eq!(entry_age("1-1", now), None);
        assert_eq!(entry_age("42", now), None);
        assert_eq!(entry_age("x-1", now), None);
    }

    use super::*;

    #[test]
    fn entry_ids_order_as_redis_orders_them() {
        let id = |text: &str| EntryId::parse(text).unwrap();
        // Numerically, not as text: where a recreated group starts depends on it.
        assert!(id("1700000000000-9") < id("1700000000000-10"));
        assert!(id("999-5") < id("1000-0"));
        assert_eq!(id("1700000000000-10").to_string(), "1700000000000-10");
        for bad in ["", "12", "a-1", "1-b", "1-2-3", "-1"] {
            assert_eq!(EntryId::parse(bad), None, "{bad}");
        }
    }
}
