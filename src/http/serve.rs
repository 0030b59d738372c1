//! The HTTP server: hyper's connection builder driven by our own accept loop, because
//! `axum::serve` exposes none of the limits a server reachable from other machines needs.
//!
//! A connection is *busy* while a request is in progress on it (from the moment hyper hands the
//! request to the router until its response body has been sent) and *idle* otherwise. Bounds:
//!
//! - Idle time. A connection idle for `header_read_timeout` is closed (`idle`): one that sends
//!   nothing, only part of a request head, only the HTTP/2 preface, or nothing more after its last
//!   response, over HTTP/1 or HTTP/2. hyper's own HTTP/1 head timer is kept too, but it cannot do
//!   this alone: the protocol is detected from the first bytes, so until a byte arrives no hyper
//!   timer runs, and HTTP/2 has no idle timer at all.
//! - Open connections (`max_connections`). When a connection arrives at the limit, the connection
//!   idle the longest is closed to make room (`evicted`): an idle connection holds no work, so a
//!   flood of silent sockets can never lock out `/health` probes or real clients. With none idle,
//!   a connection whose every request is still receiving its body goes instead (the one that has
//!   received the fewest bytes): nothing of it has been dispatched yet, since the guard receives
//!   a body before the handler runs, so a flood of trickling bodies cannot lock anyone out
//!   either. A connection with a request past its body is never evicted; only when every
//!   connection has one does a newcomer wait (one accepted, the rest in the kernel's backlog)
//!   until a connection turns idle or closes.
//! - The request head's size (`max_header_bytes`, larger heads get 431). Bodies are bounded by
//!   the guard (size, minimum rate, deadline).
//!
//! Shutdown: when `stop` is cancelled the listener closes, every connection is asked to close
//! (HTTP/1 after its current response, HTTP/2 with GOAWAY), and the future ends once all have.
//! A closing connection that stays idle for [`CLOSING_WAIT`] (an HTTP/2 client that never
//! acknowledges the GOAWAY) is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::HttpMetrics;

/// How long a closing connection may stay idle before it is dropped: time for an HTTP/2 client
/// to acknowledge the GOAWAY.
const CLOSING_WAIT: Duration = Duration::from_secs(1);

/// The connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// How long a connection may stay idle (no request in progress) before it is closed.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` is cancelled and the connections have closed.
/// Connections the server closes on its own are counted in `metrics`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Option<HttpMetrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor is 8 KiB; the config enforces it too.
        .max_buf_size((limits.max_header_bytes * 2).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let open = Arc::new(OpenConnections::default());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors, say: wait a moment rather than spin.
                    tracing::error!(%error, "Accepting a connection failed.");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        () = stop.cancelled() => break,
                    }
                }
            },
            () = stop.cancelled() => break,
        };
        let Some(slot) = open.room(&slots, &stop, metrics.as_ref()).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let (id, activity, evict) = open.insert();
        let service = Tracked {
            router: TowerToHyperService::new(router.clone()),
            activity: activity.clone(),
        };
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let watch = Watch {
            activity,
            evict,
            stop: stop.clone(),
            idle_timeout: limits.header_read_timeout,
            metrics: metrics.clone(),
        };
        let open = open.clone();
        tasks.spawn(async move {
            watch.drive(connection).await;
            open.remove(id);
            drop(slot);
        });
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Whether a connection is busy, and since when it is idle. Shared by the connection's service
/// (which marks requests), the guard (which marks bodies being received) and its watch (which
/// closes it).
struct Activity {
    opened: Instant,
    requests: AtomicUsize,
    /// Requests still receiving their body (see [`Upload`]).
    uploads: AtomicUsize,
    /// Bytes those requests have received so far.
    uploaded: AtomicU64,
    /// Set when the connection is chosen to make room; an upload that finishes after it must
    /// not go on to its handler.
    evicting: AtomicBool,
    /// Nanoseconds from `opened` to the end of the last request.
    idle_since: AtomicU64,
    /// Told when this connection turns idle.
    turned_idle: Notify,
    /// Told when any connection turns idle (the accept loop may be waiting for one).
    any_turned_idle: Arc<Notify>,
}

impl Activity {
    fn begin(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        let nanos = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(nanos, Ordering::SeqCst);
        if self.requests.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.turned_idle.notify_one();
            self.any_turned_idle.notify_one();
        }
    }

    fn new(any_turned_idle: Arc<Notify>) -> Activity {
        Activity {
            opened: Instant::now(),
            requests: AtomicUsize::new(0),
            uploads: AtomicUsize::new(0),
            uploaded: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            turned_idle: Notify::new(),
            any_turned_idle,
        }
    }

    fn is_idle(&self) -> bool {
        self.requests.load(Ordering::SeqCst) == 0
    }

    /// Busy, but only with requests still receiving their bodies: nothing dispatched yet.
    fn is_only_uploading(&self) -> bool {
        let requests = self.requests.load(Ordering::SeqCst);
        requests > 0 && self.uploads.load(Ordering::SeqCst) == requests
    }

    /// Marks the connection as chosen to make room, and tells whether it can be dropped at once:
    /// idle, or only receiving bodies. Any upload that finishes from now on is refused (see
    /// [`Upload::finish`]), so no request gets to a handler on a connection being dropped.
    fn evict(&self) -> bool {
        self.evicting.store(true, Ordering::SeqCst);
        self.is_idle() || self.is_only_uploading()
    }

    fn idle_since(&self) -> Instant {
        self.opened + Duration::from_nanos(self.idle_since.load(Ordering::SeqCst))
    }

    /// Resolves once the connection has been idle for `period`, counting from `from` at the
    /// earliest.
    async fn idle_for(&self, period: Duration, from: Instant) {
        loop {
            // Registered before the check, so an `end` in between is not missed.
            let turned_idle = self.turned_idle.notified();
            if self.is_idle() {
                let deadline = self.idle_since().max(from) + period;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = turned_idle => {}
                }
            } else {
                turned_idle.await;
            }
        }
    }
}

/// The connection a request arrived on, in the request's extensions: the guard marks the time
/// the request spends receiving its body with it.
#[derive(Clone)]
pub(super) struct ConnectionActivity(Arc<Activity>);

impl ConnectionActivity {
    /// Marks a body being received, until [`Upload::finish`] (or drop).
    pub(super) fn upload(&self) -> Upload {
        self.0.uploads.fetch_add(1, Ordering::SeqCst);
        Upload {
            activity: self.0.clone(),
            bytes: 0,
            open: true,
        }
    }
}

/// A request body being received: while every request of a connection is in this state, the
/// connection may be evicted to make room.
pub(super) struct Upload {
    activity: Arc<Activity>,
    bytes: u64,
    open: bool,
}

impl Upload {
    pub(super) fn received(&mut self, bytes: usize) {
        let bytes = bytes as u64;
        self.bytes += bytes;
        self.activity.uploaded.fetch_add(bytes, Ordering::SeqCst);
    }

    /// The body is in: `false` when the connection is being evicted, and the request must not
    /// go on to its handler.
    pub(super) fn finish(mut self) -> bool {
        self.close();
        !self.activity.evicting.load(Ordering::SeqCst)
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            self.activity
                .uploaded
                .fetch_sub(self.bytes, Ordering::SeqCst);
            self.activity.uploads.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.close();
    }
}

/// Marks a request in progress until dropped, with the response body that carries it.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: Arc<Activity>) -> Busy {
        activity.begin();
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The router as hyper's service, marking each request busy until its response body is sent.
#[derive(Clone)]
struct Tracked {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        // Synchronous with hyper's poll: no request can start unseen by the watch.
        let busy = Busy::begin(self.activity.clone());
        request
            .extensions_mut()
            .insert(ConnectionActivity(self.activity.clone()));
        let response = self.router.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody { body, _busy: busy }))
        })
    }
}

/// A response body that keeps its connection busy until it is sent (or dropped).
struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What decides a connection's end beside the client: idleness, eviction, shutdown.
struct Watch {
    activity: Arc<Activity>,
    evict: CancellationToken,
    stop: CancellationToken,
    idle_timeout: Duration,
    metrics: Option<HttpMetrics>,
}

impl Watch {
    /// Drives `connection` to its end, closing it when it stays idle, when it is evicted, or
    /// at shutdown. Dropping the connection closes the socket.
    async fn drive<C>(self, connection: C)
    where
        C: GracefulConnection<Error = Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut connection = std::pin::pin!(connection);
        let mut closing: Option<Instant> = None;
        loop {
            let (period, from) = match closing {
                None => (self.idle_timeout, self.activity.opened),
                Some(since) => (CLOSING_WAIT, since),
            };
            tokio::select! {
                ended = connection.as_mut() => {
                    // hyper's HTTP/1 head timer may fire before ours: the same limit.
                    if let Err(error) = ended {
                        if closing.is_none() && is_head_timeout(&*error) {
                            self.closed("idle");
                        }
                    }
                    return;
                }
                () = self.activity.idle_for(period, from) => {
                    if closing.is_some() {
                        return;
                    }
                    self.closed("idle");
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                () = self.evict.cancelled() => {
                    // Counted by the accept loop. Busy again since it was chosen (a request
                    // arrived, or a body finished, meanwhile): that request is answered first.
                    if self.activity.evict() {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    closing.get_or_insert_with(Instant::now);
                    // Dropped as soon as it is idle again.
                    let since = Instant::now();
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = self.activity.idle_for(Duration::ZERO, since) => {}
                    }
                    return;
                }
                () = self.stop.cancelled(), if closing.is_none() => {
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
            }
        }
    }

    fn closed(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.connection_closed(reason);
        }
    }
}

/// Whether a connection ended because hyper's HTTP/1 head timer fired.
fn is_head_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// The open connections, so that the one idle the longest can be closed to make room.
#[derive(Default)]
struct OpenConnections {
    next_id: AtomicU64,
    by_id: Mutex<HashMap<u64, (Arc<Activity>, CancellationToken)>>,
    any_turned_idle: Arc<Notify>,
}

impl OpenConnections {
    fn insert(&self) -> (u64, Arc<Activity>, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.any_turned_idle.clone()));
        let evict = CancellationToken::new();
        self.by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, (activity.clone(), evict.clone()));
        (id, activity, evict)
    }

    fn remove(&self, id: u64) {
        self.by_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Tells a connection (not already told) to close to make room: the one idle the longest,
    /// else the one only receiving bodies that has received the fewest bytes. `false` when every
    /// connection has a request past its body.
    fn evict_one(&self) -> bool {
        let by_id = self.by_id.lock().unwrap_or_else(PoisonError::into_inner);
        let candidates = || by_id.values().filter(|(_, evict)| !evict.is_cancelled());
        let victim = candidates()
            .filter(|(activity, _)| activity.is_idle())
            .min_by_key(|(activity, _)| activity.idle_since())
            .or_else(|| {
                candidates()
                    .filter(|(activity, _)| activity.is_only_uploading())
                    .min_by_key(|(activity, _)| {
                        (activity.uploaded.load(Ordering::SeqCst), activity.opened)
                    })
            });
        match victim {
            Some((_, evict)) => {
                evict.cancel();
                true
            }
            None => false,
        }
    }

    /// A slot for a new connection: a free one, or the one an evicted idle connection frees.
    /// `None` when `stop` is cancelled first.
    async fn room(
        &self,
        slots: &Arc<Semaphore>,
        stop: &CancellationToken,
        metrics: Option<&HttpMetrics>,
    ) -> Option<OwnedSemaphorePermit> {
        loop {
            if let Ok(slot) = slots.clone().try_acquire_owned() {
                return Some(slot);
            }
            let turned_idle = self.any_turned_idle.notified();
            let evicted = self.evict_one();
            if evicted {
                if let Some(metrics) = metrics {
                    metrics.connection_closed("evicted");
                }
            }
            tokio::select! {
                slot = slots.clone().acquire_owned() => return slot.ok(),
                // Every connection has a request past its body: wait for one to turn idle.
                () = turned_idle, if !evicted => {}
                () = stop.cancelled() => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity() -> Arc<Activity> {
        Arc::new(Activity::new(Arc::new(Notify::new())))
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_counts_from_the_end_of_the_last_request() {
        let activity = activity();
        let opened = activity.opened;
        let busy = Busy::begin(activity.clone());
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity.idle_for(Duration::from_secs(10), opened).await;
                Instant::now()
            }
        });
        // Busy for a minute: never idle meanwhile.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished());
        drop(busy);
        let idle_at = waiting.await.unwrap();
        assert_eq!(idle_at - opened, Duration::from_secs(70));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_between_restarts_the_idle_period() {
        let activity = activity();
        let opened = activity.opened;
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move {
                activity.idle_for(Duration::from_secs(10), opened).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(Busy::begin(activity.clone()));
        assert_eq!(waiting.await.unwrap() - opened, Duration::from_secs(18));
    }

    #[tokio::test(start_paused = true)]
    async fn only_idle_connections_are_evicted_the_longest_idle_first() {
        let open = OpenConnections::default();
        let (_, first, first_evict) = open.insert();
        let (_, second, second_evict) = open.insert();
        let _busy = Busy::begin(first.clone());
        let second_busy = Busy::begin(second.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, _, third_evict) = open.insert();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The first is busy; the third has been idle since it opened, the second only since its
        // request ended, later.
        drop(second_busy);
        assert!(open.evict_one());
        assert!(third_evict.is_cancelled());
        assert!(!first_evict.is_cancelled() && !second_evict.is_cancelled());
        assert!(open.evict_one());
        assert!(second_evict.is_cancelled());
        assert!(!open.evict_one(), "a busy connection is never evicted");
        assert!(!first_evict.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn with_none_idle_the_connection_receiving_the_least_makes_room() {
        let open = OpenConnections::default();
        let (_, working, working_evict) = open.insert();
        let (_, big, big_evict) = open.insert();
        let (_, trickle, trickle_evict) = open.insert();
        let _busy = [
            Busy::begin(working.clone()),
            Busy::begin(big.clone()),
            Busy::begin(trickle.clone()),
        ];
        // The first has its body and is being handled; the others are still receiving theirs.
        assert!(ConnectionActivity(working.clone()).upload().finish());
        let mut big_upload = ConnectionActivity(big.clone()).upload();
        big_upload.received(50_000);
        let mut trickle_upload = ConnectionActivity(trickle.clone()).upload();
        trickle_upload.received(3);
        assert!(open.evict_one());
        assert!(trickle_evict.is_cancelled());
        assert!(trickle.evict(), "only receiving a body: dropped at once");
        assert!(
            !trickle_upload.finish(),
            "a body finishing on an evicted connection stops"
        );
        assert!(open.evict_one());
        assert!(big_evict.is_cancelled());
        assert!(
            !open.evict_one(),
            "a request past its body is never evicted"
        );
        assert!(!working_evict.is_cancelled());
        drop(big_upload);
    }
}
