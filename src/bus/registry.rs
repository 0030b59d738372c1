//! The dispatcher registry shared through Redis (`[registry] kind = "redis"`): the
//! [`WorkerStore`] every instance on one Redis uses, so a worker may register through one
//! instance, heartbeat through another and be listed by a third.
//!
//! Layout, under the configured prefix `p`:
//! - `p:worker:<id>`: a hash per worker: `record` (the [`WorkerRecord`] as JSON, whole, so fields
//!   added later travel unchanged), `registered_ms`, `heartbeat_ms` and `stale_ms`. Its TTL
//!   (`PEXPIRE`) is the stale threshold plus the retention, renewed by every heartbeat: a worker
//!   gone for the retention disappears by itself and frees its `max_workers` slot.
//! - `p:workers`: the set of ids, to list them without `SCAN`; ids whose hash expired are removed
//!   from it when met.
//!
//! Every operation is one Lua script, so it is atomic, and takes its time from Redis (`TIME`):
//! heartbeat ages never depend on the clocks of the instances. Each call is bounded by
//! [`CALL_TIMEOUT`]; past it, or on any Redis error, the store answers
//! [`StoreError::Unavailable`]. The scripts touch keys they compute from the prefix, so the
//! registry needs one Redis (or a primary), not a Redis Cluster.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::redis::BusError;
use super::redis::connect;
use crate::health::{Registered, Snapshot, StoreError, StoredWorker, WorkerRecord, WorkerStore};

/// The longest one registry call may take before the registry counts as unavailable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// `now` in milliseconds of the Redis clock, as an integer string.
const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function ms(n) return string.format('%d', n) end
";

/// KEYS: set, worker hash. ARGV: id, record, stale_ms, retention_ms, max_workers, hash prefix.
/// Answers {outcome, now}: 0 new, 1 renewed (it was not stale), 2 restarted (it was stale),
/// -1 refused (max_workers live workers; `now` is then their count).
const REGISTER: &str = "
local outcome = 0
local hb = redis.call('HGET', KEYS[2], 'heartbeat_ms')
if hb then
  local stale = tonumber(redis.call('HGET', KEYS[2], 'stale_ms') or '0')
  if now - tonumber(hb) <= stale then outcome = 1 else outcome = 2 end
else
  local live = 0
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if redis.call('EXISTS', ARGV[6] .. member) == 1 then
      live = live + 1
    else
      redis.call('SREM', KEYS[1], member)
    end
  end
  if live >= tonumber(ARGV[5]) then return {-1, live, false} end
end
if outcome ~= 1 then redis.call('HSET', KEYS[2], 'registered_ms', ms(now)) end
redis.call('HSET', KEYS[2], 'record', ARGV[2], 'heartbeat_ms', ms(now), 'stale_ms', ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]))
redis.call('SADD', KEYS[1], ARGV[1])
local v = redis.call('HMGET', KEYS[2], 'registered_ms')
return {outcome, now, v[1]}
";

/// KEYS: worker hash. ARGV: retention_ms. Answers {now, record, registered_ms}, or {} when the
/// worker is not registered.
const HEARTBEAT: &str = "
local st = redis.call('HGET', KEYS[1], 'stale_ms')
if not st then return {} end
redis.call('HSET', KEYS[1], 'heartbeat_ms', ms(now))
redis.call('PEXPIRE', KEYS[1], tonumber(st) + tonumber(ARGV[1]))
local v = redis.call('HMGET', KEYS[1], 'record', 'registered_ms')
return {ms(now), v[1], v[2] or '0'}
";

/// KEYS: set, worker hash. ARGV: id. Answers how many hashes were deleted.
const UNREGISTER: &str = "
local n = redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
return n
";

/// KEYS: set. ARGV: hash prefix. Answers {now, id, record, registered_ms, heartbeat_ms, ...}.
const SNAPSHOT: &str = "
local out = {ms(now)}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. member, 'record', 'registered_ms', 'heartbeat_ms')
  if v[1] then
    table.insert(out, member)
    table.insert(out, v[1])
    table.insert(out, v[2] or '0')
    table.insert(out, v[3] or '0')
  else
    redis.call('SREM', KEYS[1], member)
  end
end
return out
";

/// The Redis-backed [`WorkerStore`].
pub struct RedisWorkers {
    connection: ConnectionManager,
    set: String,
    hash_prefix: String,
    retention: Duration,
    register: String,
    heartbeat: String,
    unregister: String,
    snapshot: String,
}

impl RedisWorkers {
    /// Connects to `url`; the registry's keys start with `prefix`, and a worker's record stays
    /// `retention` past its stale threshold after its last heartbeat.
    pub async fn connect(
        url: &str,
        prefix: &str,
        retention: Duration,
    ) -> Result<RedisWorkers, BusError> {
        let script = |body: &str| format!("{NOW}{body}");
        Ok(RedisWorkers {
            connection: connect(url, CALL_TIMEOUT).await?,
            set: format!("{prefix}:workers"),
            hash_prefix: format!("{prefix}:worker:"),
            retention,
            register: script(REGISTER),
            heartbeat: script(HEARTBEAT),
            unregister: script(UNREGISTER),
            snapshot: script(SNAPSHOT),
        })
    }

    fn hash(&self, id: &str) -> String {
        format!("{}{id}", self.hash_prefix)
    }

    /// `EVAL`s `script` (the `script` feature of the redis crate, for `EVALSHA`, is not worth a
    /// dependency for scripts of a few hundred bytes on an admin path).
    fn eval(script: &str, keys: &[&str]) -> redis::Cmd {
        let mut command = redis::cmd("EVAL");
        command.arg(script).arg(keys.len()).arg(keys);
        command
    }

    async fn call<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        match tokio::time::timeout(CALL_TIMEOUT, command.query_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(StoreError::Unavailable(error.to_string())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "Redis did not answer within {} ms",
                CALL_TIMEOUT.as_millis()
            ))),
        }
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX / 4)
    }
}

fn parse_record(id: &str, text: &str) -> Result<WorkerRecord, StoreError> {
    serde_json::from_str(text).map_err(|error| {
        StoreError::Unavailable(format!("the record of `{id}` cannot be read: {error}"))
    })
}

fn number(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

#[async_trait]
impl WorkerStore for RedisWorkers {
    async fn register(
        &self,
        id: &str,
        record: &WorkerRecord,
        max_workers: usize,
    ) -> Result<(Registered, StoredWorker, u64), StoreError> {
        let json = serde_json::to_string(record)
            .map_err(|error| StoreError::Unavailable(error.to_string()))?;
        let stale_ms = u64::try_from(record.stale_threshold().as_millis()).unwrap_or(u64::MAX / 4);
        let mut command = Self::eval(&self.register, &[&self.set, &self.hash(id)]);
        command
            .arg(id)
            .arg(&json)
            .arg(stale_ms)
            .arg(self.retention_ms())
            .arg(max_workers)
            .arg(&self.hash_prefix);
        let (outcome, now, registered): (i64, u64, Option<String>) = self.call(&command).await?;
        let registered_as = match outcome {
            0 => Registered::New,
            1 => Registered::Renewed,
            2 => Registered::Restarted,
            _ => {
                return Err(StoreError::LimitReached(
                    usize::try_from(now).unwrap_or(max_workers),
                ));
            }
        };
        let stored = StoredWorker {
            id: id.to_owned(),
            record: record.clone(),
            registered_ms: registered.as_deref().map_or(now, number),
            heartbeat_ms: now,
        };
        Ok((registered_as, stored, now))
    }

    async fn heartbeat(&self, id: &str) -> Result<Option<(StoredWorker, u64)>, StoreError> {
        let mut command = Self::eval(&self.heartbeat, &[&self.hash(id)]);
        command.arg(self.retention_ms());
        let answer: Vec<String> = self.call(&command).await?;
        let [now, record, registered] = answer.as_slice() else {
            return Ok(None);
        };
        let now = number(now);
        Ok(Some((
            StoredWorker {
                id: id.to_owned(),
                record: parse_record(id, record)?,
                registered_ms: number(registered),
                heartbeat_ms: now,
            },
            now,
        )))
    }

    async fn unregister(&self, id: &str) -> Result<bool, StoreError> {
        let mut command = Self::eval(&self.unregister, &[&self.set, &self.hash(id)]);
        command.arg(id);
        let deleted: u64 = self.call(&command).await?;
        Ok(deleted > 0)
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut command = Self::eval(&self.snapshot, &[&self.set]);
        command.arg(&self.hash_prefix);
        let answer: Vec<String> = self.call(&command).await?;
        let Some((now, rest)) = answer.split_first() else {
            return Err(StoreError::Unavailable("an empty answer from Redis".into()));
        };
        let mut workers = Vec::with_capacity(rest.len() / 4);
        for chunk in rest.chunks_exact(4) {
            let id = chunk[0].clone();
            // One unreadable record must not hide the others: it is skipped and logged.
            match parse_record(&id, &chunk[1]) {
                Ok(record) => workers.push(StoredWorker {
                    record,
                    registered_ms: number(&chunk[2]),
                    heartbeat_ms: number(&chunk[3]),
                    id,
                }),
                Err(error) => tracing::warn!(%error, "A worker record was skipped."),
            }
        }
        Ok(Snapshot {
            now_ms: number(now),
            workers,
        })
    }
}
