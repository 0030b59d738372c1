//! dispatchd: an observability-first message dispatch runtime.
//!
//! Embed the [`engine`] to route and run your own dispatchers, or run the whole service with
//! [`app::App`]. `ARCHITECTURE.md` maps the modules and their invariants.

pub mod app;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod config;
pub mod dispatchers;
pub mod engine;
pub mod health;
pub mod http;
pub mod instrumentation;
pub mod propagation;
pub mod resilience;
pub mod simulate;
pub mod sinks;
pub mod telemetry;
