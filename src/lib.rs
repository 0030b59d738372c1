//! dispatchd: an observability-first message dispatch runtime.
//!
//! Embed the [`engine`] to route and run your own dispatchers, or run the whole service with
//! [`app::App`]. `ARCHITECTURE.md` maps the modules and their invariants.

pub mod app;
/// The engine crate, re-exported under the names the service has always used.
pub use dispatchd_engine as engine;
pub use dispatchd_engine::{instrumentation, resilience};
pub mod appender;
pub mod auth;
pub mod bus;
#[doc(hidden)] // The binary's, not part of the library's API.
pub mod cli;
pub mod config;
pub mod dispatchers;
pub mod health;
pub mod http;
#[doc(hidden)] // The binary's, not part of the library's API.
pub mod loadtest;
pub mod propagation;
pub mod resilience_redis;
#[doc(hidden)] // The binary's, not part of the library's API.
pub mod simulate;
pub mod sinks;
pub mod telemetry;
pub mod top;

/// Cases per property test: `default`, or `PROPTEST_CASES` when set (CI runs a long pass with
/// it; see `.ci/run`).
#[cfg(test)]
pub(crate) fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default)
}
