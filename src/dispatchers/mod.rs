//! The built-in dispatchers a config file can name: `log` and `jsonl`.
//!
//! Owns: their I/O (a log line, an append-only file with group commit). Each is an ordinary
//! [`crate::engine::Handler`]; the engine knows nothing special about them.

mod jsonl;
mod log;

pub use jsonl::{JsonlFile, JsonlLine};
pub use log::LogDispatcher;
