//! Sinks: where dispatch events are forwarded, in batches, with retries, and never dropped
//! silently.
//!
//! Owns: the [`Sink`] plugin trait and its error classification, the plugins (`file`, `http`,
//! `lunary`, `helicone`) and their registry ([`build`]), the [`Transform`] from dispatch events
//! to each service's payload, the one shared [`driver`] (batching, retries with jitter and
//! `Retry-After`, dead letters, shutdown flush, accounting), and [`dead_letter`] files.
//!
//! The delivery rule: every event a driver receives ends in exactly one of `sent`,
//! `dead_lettered` or `dropped` (only by an explicit full-queue policy), or is still queued;
//! `sink_events_total` counts each, and a test holds the sum. A plugin only says what happened to
//! a batch and whether the failure is worth retrying; batching, retrying and counting are the
//! driver's, written once.
//!
//! Must not: retry a permanent failure (HTTP 4xx other than 408 and 429, an unserializable
//! payload), re-send events a service already accepted, or block the dispatch path.

pub mod driver;
mod plugins;
pub mod service;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

/// The dead-letter file format and files (the bus writes the same format).
pub use crate::bus::dead_letter;
pub use crate::bus::{DispatchEvent, EventInput, EventMetadata, EventOutput};
pub use driver::{
    DriverConfig, FullPolicy, Outcome, SEND_TIMEOUT_MARGIN, SinkDriver, SinkHandle, SinkObserver,
};
pub use plugins::{
    FileSink, HELICONE_MAX_BODY, HeliconeSink, HeliconeTransform, HttpSink, LUNARY_MAX_BODY,
    LunarySink, LunaryTransform, SERVICES, SinkConfig, build, build_with, check_lunary_key,
};

/// Whether trying again could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A passing condition: a 5xx, a 408 or 429, a connection or timeout error.
    Transient,
    /// The request itself is wrong: another 4xx, a payload the service cannot take.
    Permanent,
}

/// A failed send, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkError {
    pub retry: Retry,
    /// What the service asked for (`Retry-After`), honoured as the minimum wait.
    pub retry_after: Option<Duration>,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    pub message: String,
}

impl SinkError {
    pub fn transient(message: impl Into<String>) -> SinkError {
        SinkError {
            retry: Retry::Transient,
            retry_after: None,
            status: None,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> SinkError {
        SinkError {
            retry: Retry::Permanent,
            retry_after: None,
            status: None,
            message: message.into(),
        }
    }

    /// The one classification of HTTP statuses every HTTP plugin uses: 408, 429 and 5xx are
    /// transient, any other non-2xx permanent.
    pub fn from_status(status: u16, retry_after: Option<Duration>, body: &str) -> SinkError {
        let retry = match status {
            408 | 429 | 500..=599 => Retry::Transient,
            _ => Retry::Permanent,
        };
        let body: String = body.chars().take(200).collect();
        SinkError {
            retry,
            retry_after,
            status: Some(status),
            message: format!("HTTP {status}: {body}"),
        }
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a service did with a batch it answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Events the service refused one by one (index in the batch, reason), permanently;
    /// dead-lettered as `refused_by_service`.
    pub refused: Vec<(usize, String)>,
    /// Events the plugin did not send because the service cannot take them however often they
    /// are tried (index in the batch, reason), such as one alone over the service's body limit;
    /// dead-lettered as `permanent`. Every event in neither list was accepted.
    pub unsendable: Vec<(usize, String)>,
}

/// A send that failed part way: the first `accepted` events of the batch were accepted and must
/// not be sent again; the error is about the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub accepted: usize,
    pub error: SinkError,
}

impl From<SinkError> for SendError {
    fn from(error: SinkError) -> SendError {
        SendError { accepted: 0, error }
    }
}

/// A backend plugin. Implement `send_events`; the driver does the rest.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The `sink` label: the configured name.
    fn name(&self) -> &str;

    /// Prepares the sink (opens a file, checks a configuration) before the first batch.
    async fn init(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Sends one batch. `Ok` when the service answered for every event (some may be refused,
    /// see [`Delivery`]); `Err` with how many were accepted before the failure.
    async fn send_events(&self, batch: &[DispatchEvent]) -> Result<Delivery, SendError>;

    /// Flushes and releases what the sink holds. Called once, after the last batch.
    async fn close(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Maps dispatch events to a service's payload.
pub trait Transform: Send + Sync + 'static {
    fn transform(&self, event: &DispatchEvent) -> serde_json::Value;
}

/// The events as they are (the `file` and `http` sinks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Identity;

impl Transform for Identity {
    fn transform(&self, event: &DispatchEvent) -> serde_json::Value {
        serde_json::to_value(event).unwrap_or(serde_json::Value::Null)
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_once_for_every_plugin() {
        for transient in [408, 429, 500, 502, 503, 504] {
            assert_eq!(
                SinkError::from_status(transient, None, "").retry,
                Retry::Transient,
                "{transient}"
            );
        }
        for permanent in [400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(
                SinkError::from_status(permanent, None, "").retry,
                Retry::Permanent,
                "{permanent}"
            );
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}

#[cfg(test)]
pub(crate) mod driver_tests;

/// Writes that fail must say so. tokio's `File` hands a write to a blocking thread and answers
/// `Ok` at once; the error only shows on a later call, so a batch written to a full disk would be
/// counted as delivered unless the write is flushed and its result awaited.
#[cfg(test)]
mod full_disk_tests {
    use super::Sink;
    use super::dead_letter::DeadLetterFile;
    use super::driver_tests::event;
    use super::plugins::FileSink;

    #[tokio::test]
    async fn the_file_sink_reports_a_full_disk_on_the_batch_that_hit_it() {
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        let mut sink = FileSink::new("file", "/dev/full", false);
        sink.init().await.unwrap();
        let error = sink.send_events(&[event(1)]).await.unwrap_err();
        assert!(error.error.message.contains("space"), "{error:?}");
        // And the next one too: no error is swallowed between batches.
        assert!(sink.send_events(&[event(1)]).await.is_err());
    }

    #[tokio::test]
    async fn a_dead_letter_on_a_full_disk_is_an_error_not_a_record() {
        let file = DeadLetterFile::new("/dev/full");
        let error = file
            .append("file", "retries_exhausted", 3, "boom", &[event(1)])
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::StorageFull, "{error}");
    }
}
