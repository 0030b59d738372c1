//! Cluster-scoped protections on Redis: the [`DedupStore`] and [`RateLimitStore`] the engine
//! consults when a dispatcher sets `dedup.scope` or `rate_limit.scope` to `"cluster"`.
//!
//! Every instance on one Redis (the bus's) shares the same keys, named per dispatcher:
//!
//! - dedup, `dispatchd:dedup:<dispatcher_id>:<message_id>`: one script round trip claims the id
//!   (`SET … PX <longest call>` when the key is absent, else its value is answered: `done`, or the
//!   claim of the instance running it). Success sets `done` with the dedup TTL; failure deletes
//!   the key if this instance still holds it (a script compares the owner), so a retry may run
//!   anywhere. An instance that dies mid-call leaves a claim that lapses after the longest call.
//! - rate limit, `dispatchd:rate_limit:<dispatcher_id>`: one GCRA script round trip per
//!   admission (the theoretical arrival time in microseconds of Redis' own clock, so host clocks
//!   do not matter); a token within `max_wait` is reserved and the caller waits the answered
//!   delay locally.
//!
//! Failure mode: each call is bounded by [`CALL_TIMEOUT`]; after a failure, Redis is not asked
//! again for [`COOL_DOWN`], so an outage costs a dispatch nothing after the first timeout. The
//! engine then falls back (dedup runs the call, the limiter uses the instance's own) and counts it
//! in `dispatcher_cluster_fallbacks_total`.
//!
//! Must not: be on the dispatch path of a dispatcher without a cluster scope.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::dispatchers::display_url;
use crate::resilience::{DedupClaim, DedupStore, RateLimitConfig, RateLimitStore, StoreError};

/// The longest one Redis call of a cluster protection may take (a round trip is ~0.1 ms).
pub const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How long Redis is left alone after a call failed: the protections decide locally meanwhile.
pub const COOL_DOWN: Duration = Duration::from_secs(1);

/// The connection the cluster protections of one service share, made on first use.
pub struct ClusterRedis {
    url: String,
    connection: OnceCell<ConnectionManager>,
    /// Identifies this process's dedup claims.
    owner: String,
    epoch: Instant,
    /// Milliseconds since `epoch` before which Redis is not asked (after a failure).
    quiet_until: AtomicU64,
    call_timeout: Duration,
}

impl ClusterRedis {
    /// Checks the URL; connects on the first call.
    pub fn new(url: &str) -> Result<Arc<ClusterRedis>, String> {
        redis::Client::open(url)
            .map_err(|e| format!("{} is not a Redis URL: {e}", display_url(url)))?;
        Ok(Arc::new(ClusterRedis {
            url: url.to_owned(),
            connection: OnceCell::new(),
            owner: uuid::Uuid::new_v4().simple().to_string(),
            epoch: Instant::now(),
            quiet_until: AtomicU64::new(0),
            call_timeout: CALL_TIMEOUT,
        }))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `script` (by its SHA1; by its text when Redis lost it) within the call timeout.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Lua,
        key: &str,
        args: &[String],
    ) -> Result<T, StoreError> {
        self.guarded(async |mut connection| {
            let sha = script
                .sha
                .get_or_try_init(|| async {
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(script.code)
                        .query_async::<String>(&mut connection.clone())
                        .await
                })
                .await?;
            let by_sha = redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(key)
                .arg(args)
                .query_async(&mut connection)
                .await;
            match by_sha {
                Err(error) if error.code() == Some("NOSCRIPT") => {
                    redis::cmd("EVAL")
                        .arg(script.code)
                        .arg(1)
                        .arg(key)
                        .arg(args)
                        .query_async(&mut connection)
                        .await
                }
                answer => answer,
            }
        })
        .await
    }

    async fn cmd<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        self.guarded(async |mut connection| command.query_async(&mut connection).await)
            .await
    }

    async fn guarded<T>(
        &self,
        call: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        if self.now_ms() < self.quiet_until.load(Ordering::Relaxed) {
            return Err(StoreError(format!(
                "redis failed less than {COOL_DOWN:?} ago; not asked"
            )));
        }
        let timeout = self.call_timeout;
        let answer = tokio::time::timeout(timeout, async {
            let connection = self
                .connection
                .get_or_try_init(|| crate::bus::redis::connect(&self.url, timeout))
                .await
                .map_err(|e| e.to_string())?
                .clone();
            call(connection).await.map_err(|e| e.to_string())
        })
        .await;
        let error = match answer {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(error)) => format!("redis at {}: {error}", display_url(&self.url)),
            Err(_) => format!(
                "redis at {} did not answer within {timeout:?}",
                display_url(&self.url)
            ),
        };
        let cool_down = u64::try_from(COOL_DOWN.as_millis()).unwrap_or(u64::MAX);
        self.quiet_until
            .store(self.now_ms().saturating_add(cool_down), Ordering::Relaxed);
        Err(StoreError(error))
    }
}

/// A Lua script run with `EVALSHA`: its SHA1 is what `SCRIPT LOAD` answered the first time (so
/// no SHA1 crate is needed), and a Redis that lost its script cache gets the text with `EVAL`.
struct Lua {
    code: &'static str,
    sha: OnceCell<String>,
}

impl Lua {
    fn new(code: &'static str) -> Lua {
        Lua {
            code,
            sha: OnceCell::new(),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Claims an absent key for a run, else answers what it holds.
const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Deletes the key only while it holds this instance's claim.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// GCRA: ARGV = emission interval (µs), burst, max wait (µs). Answers the wait in µs, or -1 when
/// the token is further than the max wait away (nothing taken). Times are printed with `%.0f`:
/// Lua 5.1 would print a 16-digit number in exponent form.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local wait = next_tat - burst * interval - now
if wait < 0 then wait = 0 end
if wait > max_wait then return -1 end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.floor((next_tat - now) / 1000) + 1)
return wait
";

/// One dispatcher's message ids, shared by every instance.
pub struct RedisDedup {
    redis: Arc<ClusterRedis>,
    prefix: String,
    claim: Lua,
    release: Lua,
    running: u64,
    ttl: u64,
    claim_value: String,
}

impl RedisDedup {
    /// `running` bounds a claim (the longest call); `ttl` is the dedup TTL.
    pub fn new(
        redis: Arc<ClusterRedis>,
        dispatcher_id: &str,
        running: Duration,
        ttl: Duration,
    ) -> RedisDedup {
        RedisDedup {
            prefix: format!("dispatchd:dedup:{dispatcher_id}:"),
            claim: Lua::new(CLAIM),
            release: Lua::new(RELEASE),
            running: millis(running),
            ttl: millis(ttl),
            claim_value: format!("running:{}", redis.owner),
            redis,
        }
    }

    fn key(&self, message_id: &str) -> String {
        format!("{}{message_id}", self.prefix)
    }
}

#[async_trait]
impl DedupStore for RedisDedup {
    async fn claim(&self, message_id: &str) -> Result<DedupClaim, StoreError> {
        let args = [self.claim_value.clone(), self.running.to_string()];
        let held: Option<String> = self
            .redis
            .eval(&self.claim, &self.key(message_id), &args)
            .await?;
        Ok(match held.as_deref() {
            None => DedupClaim::Claimed,
            Some("done") => DedupClaim::Done,
            Some(_) => DedupClaim::Running,
        })
    }

    async fn succeeded(&self, message_id: &str) -> Result<(), StoreError> {
        let mut command = redis::cmd("SET");
        command
            .arg(self.key(message_id))
            .arg("done")
            .arg("PX")
            .arg(self.ttl);
        self.redis.cmd::<()>(&command).await
    }

    async fn failed(&self, message_id: &str) -> Result<(), StoreError> {
        let args = [self.claim_value.clone()];
        self.redis
            .eval::<i64>(&self.release, &self.key(message_id), &args)
            .await
            .map(drop)
    }
}

/// One dispatcher's token bucket, shared by every instance.
pub struct RedisRateLimit {
    redis: Arc<ClusterRedis>,
    key: String,
    script: Lua,
    interval_us: u64,
    burst: u32,
}

impl RedisRateLimit {
    pub fn new(
        redis: Arc<ClusterRedis>,
        dispatcher_id: &str,
        config: &RateLimitConfig,
    ) -> RedisRateLimit {
        RedisRateLimit {
            key: format!("dispatchd:rate_limit:{dispatcher_id}"),
            script: Lua::new(GCRA),
            interval_us: (1_000_000 / u64::from(config.per_second.get())).max(1),
            burst: config.burst.get(),
            redis,
        }
    }
}

#[async_trait]
impl RateLimitStore for RedisRateLimit {
    async fn acquire(&self, max_wait: Duration) -> Result<Option<Duration>, StoreError> {
        let args = [
            self.interval_us.to_string(),
            self.burst.to_string(),
            u64::try_from(max_wait.as_micros())
                .unwrap_or(u64::MAX)
                .to_string(),
        ];
        let wait: i64 = self.redis.eval(&self.script, &self.key, &args).await?;
        Ok(u64::try_from(wait).ok().map(Duration::from_micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Redis that accepts connections and never answers: each protection gets an error within
    /// the call timeout, and for the cool-down after it, an error at once without a round trip.
    #[tokio::test]
    async fn a_silent_redis_is_an_error_within_the_call_timeout_then_left_alone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        });
        let redis = ClusterRedis::new(&format!("redis://127.0.0.1:{port}")).unwrap();
        let dedup = RedisDedup::new(
            redis.clone(),
            "d",
            Duration::from_secs(1),
            Duration::from_secs(60),
        );
        let started = std::time::Instant::now();
        let error = dedup.claim("m").await.unwrap_err();
        assert!(error.0.contains("did not answer within"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded: {:?}",
            started.elapsed()
        );
        let limiter = RedisRateLimit::new(
            redis,
            "d",
            &RateLimitConfig {
                per_second: std::num::NonZeroU32::MIN,
                burst: std::num::NonZeroU32::MIN,
                mode: crate::resilience::RateLimitMode::Reject,
                scope: crate::resilience::Scope::Cluster,
            },
        );
        let error = limiter.acquire(Duration::ZERO).await.unwrap_err();
        assert!(error.0.contains("not asked"), "{error}");
        held.abort();
    }
}
