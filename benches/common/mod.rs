//! What more than one bench uses (each bench is a crate of its own: included with `mod common;`).

use std::time::{Duration, Instant};

/// Runs `work` `iters` times on each of two threads at once, as the service's two workers
/// record; answers the wall time, which criterion divides by `iters`: each thread's time per
/// iteration while the other does the same.
pub(crate) fn on_two_threads(iters: u64, work: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..iters {
                    work();
                }
            });
        }
    });
    start.elapsed()
}
