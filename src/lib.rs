//! dispatchd: an observability-first message dispatch runtime.
//!
//! Embed the [`engine`] to route and run your own dispatchers, or run the whole service with
//! [`app::App`]. See `ARCHITECTURE.md` for the map of the modules.

pub mod engine;
pub mod instrumentation;
pub mod config;
