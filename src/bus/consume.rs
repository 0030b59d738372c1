//! The one at-least-once consume loop: what the sinks (`dispatchd sink`, serve's sink consumers)
//! and serve's `[[sources]]` read a stream through.
//!
//! A [`Consumer`] reads, in this order: its own pending entries (left by its previous life under
//! the same name), then new ones (`XREADGROUP … >`), and every `claim_idle / 2` it takes over what
//! other consumers left pending longer than `claim_idle` (`XAUTOCLAIM`). Each entry goes to a
//! [`Deliver`], which settles it later: acknowledged through [`Acks`] only once its work is done
//! (sent, dead-lettered, dispatched to a terminal status), or released to be delivered again.
//! A group Redis lost is created again (see [`StreamConsumer`]).
//!
//! Beside the loop, one upkeep task per consumer, on its own schedule so a blocked delivery never
//! delays it:
//! - **Keeping what it works on.** Every `claim_idle / 4` the entries delivered and not yet
//!   settled are claimed again by their owner (`XCLAIM … JUSTID`, which resets their idle time),
//!   so a slow or retrying owner is never robbed by another consumer's `XAUTOCLAIM`; an owner that
//!   died stops doing it and its entries age past `claim_idle`.
//! - **Removing dead consumers.** Every `retention / 4` (at least once a minute) consumers of the
//!   group idle longer than `retention` and holding no pending entry are deleted
//!   (`XGROUP DELCONSUMER`), in one script so a consumer that reads meanwhile is not deleted.
//! - **Trimming.** Every `trim_every` the stream is trimmed (`XTRIM … MINID ~`) below the oldest
//!   entry some group still needs: per group, its oldest pending entry, or the one after its
//!   `last-delivered-id` when nothing is pending; so an entry not yet acknowledged (or not yet
//!   delivered) by some group is never trimmed. One script, so it sees every group at one
//!   instant.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::BusObserver;
use super::redis::{BusError, ConsumerConfig, Entry, StreamConsumer};
use crate::resilience::RetryPolicy;

/// Backoff between attempts while Redis is unreachable.
const RECONNECT: RetryPolicy = RetryPolicy {
    attempts: u32::MAX,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(5),
};

/// How long a stopping consumer keeps trying to acknowledge what it settled. With Redis away the
/// acknowledgements would otherwise be retried for minutes and hold up the shutdown; what is left
/// stays pending and is delivered again by the next consumer: duplicates, not loss.
const FINAL_ACKS: Duration = Duration::from_secs(5);

/// How many times one batch of acknowledgements is tried before it is given up (minutes, with
/// [`RECONNECT`]'s backoff).
const ACK_ATTEMPTS: u32 = 50;

/// The acknowledging task of a consume loop: acknowledges each settled batch in order, retried
/// with backoff, until the channel closes or `give_up` is cancelled (the consumer stops and Redis
/// does not answer). A batch Redis refused [`ACK_ATTEMPTS`] times is given up and told to
/// `observer`; what is left when it stops stays in `working`, for the loop to count.
async fn acknowledge_settled(
    mut acker: StreamConsumer,
    mut settled: mpsc::Receiver<Vec<String>>,
    working: Arc<Working>,
    observer: Option<Arc<dyn BusObserver>>,
    give_up: CancellationToken,
) {
    loop {
        let ids = tokio::select! {
            biased;
            ids = settled.recv() => match ids {
                Some(ids) => ids,
                None => break,
            },
            () = give_up.cancelled() => break,
        };
        let acked = tokio::select! {
            biased;
            () = give_up.cancelled() => break,
            acked = acknowledge(&mut acker, &ids, observer.as_deref()) => acked,
        };
        if !acked {
            // They stay pending and will be delivered again: duplicates, not loss.
            if let Some(observer) = &observer {
                let config = acker.config();
                observer.entries_abandoned(&config.stream, &config.group, ids.len() as u64);
            }
        }
        working.with(|working| {
            for id in &ids {
                working.remove(id);
            }
        });
    }
}

/// `XACK`s `ids`, tried up to [`ACK_ATTEMPTS`] times; `false` when Redis never took them.
async fn acknowledge(
    acker: &mut StreamConsumer,
    ids: &[String],
    observer: Option<&dyn BusObserver>,
) -> bool {
    let (stream, group) = (acker.config().stream.clone(), acker.config().group.clone());
    for attempt in 1..=ACK_ATTEMPTS {
        match acker.ack(ids).await {
            Ok(_) => {
                if attempt > 1 {
                    tracing::info!(stream = %stream, group = %group, attempts = attempt, "Acknowledgements go through again.");
                }
                return true;
            }
            Err(error) => {
                if let Some(observer) = observer {
                    observer.ack_failed(&stream, &group);
                }
                // Once per batch: every failure is counted (`bus_redis_ack_errors_total`), and a
                // line every few seconds while Redis refuses would bury the log.
                if attempt == 1 {
                    tracing::warn!(%error, stream = %stream, group = %group, "Acknowledging entries failed; retrying (each failure is counted in bus_redis_ack_errors_total).");
                } else {
                    tracing::debug!(%error, stream = %stream, group = %group, attempt, "Acknowledging entries failed again.");
                }
                if attempt < ACK_ATTEMPTS {
                    tokio::time::sleep(RECONNECT.ceiling(attempt)).await;
                }
            }
        }
    }
    tracing::error!(stream = %stream, group = %group, entries = ids.len(), "Redis refused these acknowledgements {ACK_ATTEMPTS} times; the entries stay pending and are delivered again.");
    false
}

/// Entries delivered and not yet settled: the owner keeps them (see the module doc).
#[derive(Default)]
struct Working(Mutex<BTreeSet<String>>);

impl Working {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeSet<String>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// How a [`Deliver`] settles entries. Cloned freely; the loop ends its acknowledgements when
/// every clone is dropped.
#[derive(Clone)]
pub struct Acks {
    sender: mpsc::Sender<Vec<String>>,
    working: Arc<Working>,
}

impl Acks {
    /// The channel acknowledgements travel on, for a component that sends them itself (the sink
    /// driver). Every id sent on it is acknowledged, in order, retried while Redis is away.
    pub fn sender(&self) -> mpsc::Sender<Vec<String>> {
        self.sender.clone()
    }

    /// Acknowledges `ids`: their work is settled.
    pub async fn ack(&self, ids: Vec<String>) {
        // Closed only when the loop has stopped acknowledging: the entries stay pending.
        let _ = self.sender.send(ids).await;
    }

    /// Gives `id` up without acknowledging it: it stays pending, ages, and is claimed again
    /// (by any consumer, this one included) after `claim_idle`.
    pub fn release(&self, id: &str) {
        self.working.with(|working| working.remove(id));
    }
}

/// What a consume loop hands its entries to.
#[async_trait]
pub trait Deliver: Send + 'static {
    /// Takes one entry. Its id must end in [`Acks::ack`] (or the channel of [`Acks::sender`])
    /// once its work settled, or in [`Acks::release`]; until then the owner keeps it. May wait
    /// (a full queue): the loop reads no more meanwhile.
    async fn deliver(&mut self, entry: Entry, acks: &Acks);

    /// Reading stopped: settle or abandon what is in flight, and drop every [`Acks`] clone held.
    /// What is abandoned stays pending for the next consumer.
    async fn finish(self);
}

/// A member of a consumer group with its loop, connected and not yet running.
pub struct Consumer {
    reader: StreamConsumer,
    acker: StreamConsumer,
    observer: Option<Arc<dyn BusObserver>>,
}

impl Consumer {
    /// Connects (twice: reads block on a connection of their own) and creates the group if it
    /// does not exist.
    pub async fn connect(
        url: &str,
        config: ConsumerConfig,
        observer: Option<Arc<dyn BusObserver>>,
    ) -> Result<Consumer, BusError> {
        let reader = StreamConsumer::connect(url, config.clone())
            .await?
            .with_observer(observer.clone());
        let acker = StreamConsumer::connect(url, config).await?;
        Ok(Consumer {
            reader,
            acker,
            observer,
        })
    }

    /// Runs until `shutdown`: reads and delivers, acknowledges what was settled, keeps the group
    /// and the stream tidy; then stops reading, lets `deliver` finish, applies the last
    /// acknowledgements, and leaves the rest pending.
    pub async fn run<D: Deliver>(self, make: impl FnOnce(&Acks) -> D, shutdown: CancellationToken) {
        let Consumer {
            mut reader,
            acker,
            observer,
        } = self;
        let config = reader.config().clone();
        let stop_tasks = CancellationToken::new();
        let watching = observer
            .clone()
            .map(|observer| reader.watch_backlog(observer, stop_tasks.clone()));
        let working = Arc::new(Working::default());
        let upkeep = tokio::spawn(upkeep(
            reader.connection(),
            config.clone(),
            working.clone(),
            stop_tasks.clone(),
        ));

        // Bounded to one batch in waiting: a crash re-sends at most what was settled and not yet
        // acknowledged.
        let (sender, settled) = mpsc::channel::<Vec<String>>(1);
        let acks = Acks {
            sender,
            working: working.clone(),
        };
        let mut deliver = make(&acks);

        // Acknowledgements: retried while Redis is away, so nothing settled is acknowledged twice
        // or forgotten; the channel closes when every `Acks` is dropped.
        let give_up = CancellationToken::new();
        let mut acking = tokio::spawn(acknowledge_settled(
            acker,
            settled,
            working.clone(),
            observer.clone(),
            give_up.clone(),
        ));

        let claim_every = (config.claim_idle / 2).max(Duration::from_millis(100));
        let mut next_claim = tokio::time::Instant::now();
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let now = tokio::time::Instant::now();
            let read = if now >= next_claim {
                next_claim = now + claim_every;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    read = reader.reclaim() => read,
                }
            } else {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    read = reader.read() => read,
                }
            };
            let entries = match read {
                Ok(entries) => {
                    if failures > 0 {
                        tracing::info!(stream = %config.stream, "Redis answers again.");
                        if let Some(observer) = &observer {
                            observer.reconnected(&config.stream);
                        }
                    }
                    failures = 0;
                    entries
                }
                Err(error) => {
                    failures += 1;
                    let delay = RECONNECT.ceiling(failures);
                    tracing::warn!(%error, stream = %config.stream, delay_ms = delay.as_millis() as u64, "Reading the stream failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            for entry in entries {
                // An entry this consumer still works on (claimed back while it was slow to keep
                // it) is not delivered twice.
                if !working.with(|working| working.insert(entry.id.clone())) {
                    continue;
                }
                deliver.deliver(entry, &acks).await;
            }
        }

        deliver.finish().await;
        drop(acks);
        if tokio::time::timeout(FINAL_ACKS, &mut acking).await.is_err() {
            // It stops at once (nothing left to wait for) and counts what it abandons.
            give_up.cancel();
            if tokio::time::timeout(Duration::from_secs(1), &mut acking)
                .await
                .is_err()
            {
                acking.abort();
            }
            tracing::warn!(stream = %config.stream, "Redis did not take the last acknowledgements; those entries stay pending and are delivered again.");
        }
        // Taken and neither acknowledged nor released: settled ones whose acknowledgement Redis
        // did not take, and ones the deliverer left unfinished at its deadline.
        let abandoned = working.with(|working| working.len());
        if abandoned > 0 {
            tracing::warn!(stream = %config.stream, group = %config.group, entries = abandoned, "A consumer stopped with entries it did not acknowledge; they stay pending and are delivered again.");
            if let Some(observer) = &observer {
                observer.entries_abandoned(&config.stream, &config.group, abandoned as u64);
            }
        }
        stop_tasks.cancel();
        let _ = upkeep.await;
        if let Some(watching) = watching {
            let _ = watching.await;
        }
    }
}

/// The upkeep task of one consumer (see the module doc); each step's failure is logged and the
/// step tried again on its next turn.
async fn upkeep(
    mut connection: ConnectionManager,
    config: ConsumerConfig,
    working: Arc<Working>,
    stop: CancellationToken,
) {
    let keep_every = (config.claim_idle / 4).max(Duration::from_millis(10));
    let prune_every =
        (config.retention / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
    // Each step first runs one period after the start, not at once.
    let every =
        |period: Duration| tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut keep = every(keep_every);
    let mut prune = every(prune_every);
    // A period no one uses when trimming is off.
    let mut trim = every(config.trim_every.unwrap_or(Duration::from_secs(3600)));
    for timer in [&mut keep, &mut prune, &mut trim] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        let step = tokio::select! {
            () = stop.cancelled() => return,
            _ = keep.tick() => {
                let ids: Vec<String> = working.with(|working| working.iter().cloned().collect());
                keep_working(&mut connection, &config, keep_every, &ids).await.map(|_| ())
            }
            _ = prune.tick() => remove_idle_consumers(&mut connection, &config).await.map(|_| ()),
            _ = trim.tick(), if config.trim_every.is_some() => {
                trim_acknowledged(&mut connection, &config.stream).await.map(|_| ())
            }
        };
        if let Err(error) = step {
            tracing::debug!(%error, stream = %config.stream, "A consumer's upkeep step failed; it is tried again on its next turn.");
        }
    }
}

/// `XCLAIM <stream> <group> <self> <min-idle> <ids…> JUSTID`: resets the idle time of the entries
/// this consumer still works on. Only entries idle at least `min_idle` are claimed, so one another
/// consumer took over a moment ago (while this one was stalled) is not taken back.
async fn keep_working(
    connection: &mut ConnectionManager,
    config: &ConsumerConfig,
    min_idle: Duration,
    ids: &[String],
) -> Result<usize, BusError> {
    let mut kept = 0;
    for chunk in ids.chunks(500) {
        let mut command = redis::cmd("XCLAIM");
        command
            .arg(&config.stream)
            .arg(&config.group)
            .arg(&config.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(chunk)
            .arg("JUSTID");
        let claimed: Vec<String> = command.query_async(connection).await?;
        kept += claimed.len();
    }
    Ok(kept)
}

/// Deletes the consumers of the group (this one excepted) idle longer than the retention and
/// holding no pending entry, atomically with the check; answers how many.
pub async fn remove_idle_consumers(
    connection: &mut impl ConnectionLike,
    config: &ConsumerConfig,
) -> Result<u64, BusError> {
    const SCRIPT: &str = r"
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local field = {}
  for i = 1, #consumer, 2 do field[consumer[i]] = consumer[i + 1] end
  if field['name'] ~= ARGV[2] and field['pending'] == 0 and field['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], field['name'])
    removed = removed + 1
  end
end
return removed
";
    // `EVAL` with the text each time: a few hundred bytes at most once a second, and no
    // `NOSCRIPT` round trip after a Redis restart.
    let removed: u64 = redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(1)
        .arg(&config.stream)
        .arg(&config.group)
        .arg(&config.consumer)
        .arg(config.retention.as_millis() as u64)
        .query_async(connection)
        .await?;
    Ok(removed)
}

/// Trims `stream` below the oldest entry some group still needs (its oldest pending entry, or
/// the one after its last delivered when nothing is pending); answers the entries removed. A
/// stream without groups is left alone: nothing says what was read.
pub async fn trim_acknowledged(
    connection: &mut impl ConnectionLike,
    stream: &str,
) -> Result<u64, BusError> {
    const SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local min_ms, min_seq
for _, group in ipairs(groups) do
  local field = {}
  for i = 1, #group, 2 do field[group[i]] = group[i + 1] end
  local id = field['last-delivered-id']
  local after = 1
  if field['pending'] > 0 then
    id = redis.call('XPENDING', KEYS[1], field['name'])[2]
    after = 0
  end
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq) + after
  if min_ms == nil or ms < min_ms or (ms == min_ms and seq < min_seq) then
    min_ms, min_seq = ms, seq
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d-%d', min_ms, min_seq))
";
    let trimmed: u64 = redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(1)
        .arg(stream)
        .query_async(connection)
        .await?;
    Ok(trimmed)
}
