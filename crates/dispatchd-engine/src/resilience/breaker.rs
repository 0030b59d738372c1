use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{Refusal, ResilienceObserver};

/// When a closed breaker opens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trip {
    /// After this many failed calls in a row.
    ConsecutiveFailures(u32),
    /// When, within a window, at least `minimum_calls` calls were made and at least `ratio` of
    /// them failed. The window restarts when it has passed.
    FailureRatio {
        ratio: f64,
        minimum_calls: u32,
        window: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    pub trip: Trip,
    /// How long it stays open before letting probes through.
    pub cool_down: Duration,
    /// Successful probes that close it again; probes beyond this many at once are refused.
    pub half_open_successes: u32,
}

/// A breaker's state, as `dispatcher_circuit_breaker_state` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// 0 closed, 0.5 half-open, 1 open.
    pub fn gauge_value(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 0.5,
            BreakerState::Open => 1.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// Proof that a call was admitted, and whether it is a half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerTicket {
    probe: bool,
}

#[derive(Debug)]
enum Inner {
    Closed {
        consecutive: u32,
        window_start: Instant,
        calls: u32,
        failures: u32,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
        successes: u32,
    },
}

/// A circuit breaker: closed → open after the trip condition, open → half-open after the
/// cool-down, half-open → closed after enough successful probes or back to open on a failure.
///
/// Its state is a few words behind a `Mutex` held for nanoseconds, never across an await.
pub struct CircuitBreaker {
    dispatcher_id: Arc<str>,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    observer: Option<Arc<dyn ResilienceObserver>>,
}

impl CircuitBreaker {
    pub fn new(
        dispatcher_id: Arc<str>,
        config: BreakerConfig,
        observer: Option<Arc<dyn ResilienceObserver>>,
    ) -> CircuitBreaker {
        if let Some(observer) = &observer {
            observer.breaker_state(&dispatcher_id, BreakerState::Closed);
        }
        CircuitBreaker {
            dispatcher_id,
            config,
            inner: Mutex::new(closed(Instant::now())),
            observer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            // Still reported open past the cool-down until a call turns it half-open.
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Admits a call, or refuses it at once while open (or while half-open with all probes out).
    pub fn try_acquire(&self) -> Result<BreakerTicket, Refusal> {
        let now = Instant::now();
        let mut inner = self.lock();
        match &mut *inner {
            Inner::Closed { .. } => Ok(BreakerTicket { probe: false }),
            Inner::Open { until } if now >= *until => {
                *inner = Inner::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                drop(inner);
                self.changed(BreakerState::HalfOpen);
                Ok(BreakerTicket { probe: true })
            }
            Inner::Open { .. } => Err(Refusal::CircuitOpen),
            Inner::HalfOpen {
                in_flight,
                successes,
            } => {
                if *in_flight + *successes < self.config.half_open_successes {
                    *in_flight += 1;
                    Ok(BreakerTicket { probe: true })
                } else {
                    Err(Refusal::CircuitOpen)
                }
            }
        }
    }

    /// Gives back a ticket whose call never ran (refused further down).
    pub fn release(&self, ticket: BreakerTicket) {
        if ticket.probe {
            if let Inner::HalfOpen { in_flight, .. } = &mut *self.lock() {
                *in_flight = in_flight.saturating_sub(1);
            }
        }
    }

    /// Records a finished call.
    pub fn record(&self, ticket: BreakerTicket, succeeded: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        let next = match &mut *inner {
            Inner::Closed {
                consecutive,
                window_start,
                calls,
                failures,
            } => {
                if let Trip::FailureRatio { window, .. } = self.config.trip {
                    if now.saturating_duration_since(*window_start) >= window {
                        *window_start = now;
                        *calls = 0;
                        *failures = 0;
                    }
                }
                *calls += 1;
                if succeeded {
                    *consecutive = 0;
                } else {
                    *consecutive += 1;
                    *failures += 1;
                }
                let trips = match self.config.trip {
                    Trip::ConsecutiveFailures(limit) => *consecutive >= limit,
                    Trip::FailureRatio {
                        ratio,
                        minimum_calls,
                        ..
                    } => {
                        *calls >= minimum_calls && f64::from(*failures) >= ratio * f64::from(*calls)
                    }
                };
                trips.then_some(BreakerState::Open)
            }
            Inner::HalfOpen {
                in_flight,
                successes,
            } if ticket.probe => {
                *in_flight = in_flight.saturating_sub(1);
                if !succeeded {
                    Some(BreakerState::Open)
                } else {
                    *successes += 1;
                    (*successes >= self.config.half_open_successes).then_some(BreakerState::Closed)
                }
            }
            // A call admitted before the breaker opened, or a non-probe: its outcome is stale.
            _ => None,
        };
        match next {
            Some(BreakerState::Open) => {
                *inner = Inner::Open {
                    until: now + self.config.cool_down,
                };
                drop(inner);
                self.changed(BreakerState::Open);
                if let Some(observer) = &self.observer {
                    observer.breaker_tripped(&self.dispatcher_id);
                }
            }
            Some(BreakerState::Closed) => {
                *inner = closed(now);
                drop(inner);
                self.changed(BreakerState::Closed);
            }
            _ => {}
        }
    }

    fn changed(&self, state: BreakerState) {
        tracing::debug!(dispatcher_id = %self.dispatcher_id, state = state.as_str(), "The circuit breaker changed state.");
        if let Some(observer) = &self.observer {
            observer.breaker_state(&self.dispatcher_id, state);
        }
    }
}

fn closed(now: Instant) -> Inner {
    Inner::Closed {
        consecutive: 0,
        window_start: now,
        calls: 0,
        failures: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(trip: Trip) -> CircuitBreaker {
        let config = BreakerConfig {
            trip,
            cool_down: Duration::from_secs(30),
            half_open_successes: 2,
        };
        CircuitBreaker::new("d".into(), config, None)
    }

    fn call(breaker: &CircuitBreaker, succeeded: bool) -> Result<(), Refusal> {
        let ticket = breaker.try_acquire()?;
        breaker.record(ticket, succeeded);
        Ok(())
    }

    #[derive(Default)]
    struct Gauge(std::sync::Mutex<(Vec<f64>, u32)>);

    impl ResilienceObserver for Gauge {
        fn breaker_state(&self, _: &str, state: BreakerState) {
            self.0.lock().unwrap().0.push(state.gauge_value());
        }
        fn breaker_tripped(&self, _: &str) {
            self.0.lock().unwrap().1 += 1;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_gauge_and_the_trips_follow_every_step() {
        let gauge = Arc::new(Gauge::default());
        let config = BreakerConfig {
            trip: Trip::ConsecutiveFailures(1),
            cool_down: Duration::from_secs(5),
            half_open_successes: 1,
        };
        let b = CircuitBreaker::new("d".into(), config, Some(gauge.clone()));
        call(&b, false).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        call(&b, false).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        call(&b, true).unwrap();
        let (values, trips) = gauge.0.lock().unwrap().clone();
        // closed, open, half-open, open again, half-open, closed.
        assert_eq!(values, [0.0, 1.0, 0.5, 1.0, 0.5, 0.0]);
        assert_eq!(trips, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_whole_cycle() {
        let b = breaker(Trip::ConsecutiveFailures(3));
        call(&b, false).unwrap();
        call(&b, false).unwrap();
        call(&b, true).unwrap();
        call(&b, false).unwrap();
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Closed, "a success reset the run");
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(call(&b, true), Err(Refusal::CircuitOpen));

        tokio::time::advance(Duration::from_secs(30)).await;
        let first = b.try_acquire().unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let second = b.try_acquire().unwrap();
        assert_eq!(
            b.try_acquire(),
            Err(Refusal::CircuitOpen),
            "two probes at most"
        );
        b.record(first, true);
        b.record(second, false);
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "a failed probe opens it again"
        );

        tokio::time::advance(Duration::from_secs(30)).await;
        call(&b, true).unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        call(&b, true).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ratio_over_a_minimum_of_calls_in_a_window() {
        let b = breaker(Trip::FailureRatio {
            ratio: 0.5,
            minimum_calls: 4,
            window: Duration::from_secs(10),
        });
        call(&b, false).unwrap();
        call(&b, false).unwrap();
        call(&b, false).unwrap();
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "fewer calls than the minimum"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        // A new window: the old failures are gone.
        call(&b, true).unwrap();
        call(&b, true).unwrap();
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Closed);
        call(&b, false).unwrap();
        assert_eq!(b.state(), BreakerState::Open, "2 of 4 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_probe_frees_its_place() {
        let b = breaker(Trip::ConsecutiveFailures(1));
        call(&b, false).unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let one = b.try_acquire().unwrap();
        let two = b.try_acquire().unwrap();
        b.release(two);
        let three = b.try_acquire().unwrap();
        b.record(one, true);
        b.record(three, true);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
