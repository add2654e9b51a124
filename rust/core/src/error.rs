//! The error types of the core crate.

use std::fmt;

/// A payload that is not a well-formed `KVEventBatch`.
///
/// Structured so that callers (the Python bindings, logs) can say what was
/// wrong and where without parsing a message: `reason` is the what; `event`
/// (index in the batch's event array), `field` (event field name) and
/// `offset` (byte offset into the payload) are the where, when known.
/// `payload` is the position of the payload in a multi-payload call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub reason: String,
    pub event: Option<usize>,
    pub field: Option<String>,
    pub offset: Option<usize>,
    pub payload: Option<usize>,
}

impl DecodeError {
    /// An error with only a reason; add the where with the `at_*` builders.
    pub fn new(reason: impl Into<String>) -> Self {
        DecodeError { reason: reason.into(), event: None, field: None, offset: None, payload: None }
    }

    #[must_use]
    pub fn at_event(mut self, event: usize) -> Self {
        self.event = Some(event);
        self
    }

    #[must_use]
    pub fn at_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    #[must_use]
    pub fn at_offset(mut self, offset: usize) -> Self {
        self.offset = Some(offset);
        self
    }

    #[must_use]
    pub fn in_payload(mut self, payload: usize) -> Self {
        self.payload = Some(payload);
        self
    }

    /// [`DecodeError::at_event`] unless an inner step already said which
    /// event (for adding context while an error travels outwards).
    #[must_use]
    pub fn within_event(mut self, event: usize) -> Self {
        self.event.get_or_insert(event);
        self
    }

    /// [`DecodeError::at_field`] unless an inner step already named one.
    #[must_use]
    pub fn within_field(mut self, field: &str) -> Self {
        if self.field.is_none() {
            self.field = Some(field.to_owned());
        }
        self
    }
}

impl fmt::Display for DecodeError {
    /// `payload 2: event 3 field token_ids: expected array, got str (byte 41)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.payload {
            write!(f, "payload {p}: ")?;
        }
        match (self.event, &self.field) {
            (Some(e), Some(name)) => write!(f, "event {e} field {name}: ")?,
            (Some(e), None) => write!(f, "event {e}: ")?,
            (None, Some(name)) => write!(f, "{name}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.reason)?;
        if let Some(o) = self.offset {
            write!(f, " (byte {o})")?;
        }
        Ok(())
    }
}

impl std::error::Error for DecodeError {}

/// Errors of index operations other than decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("unknown worker {0:?}")]
    UnknownWorker(String),
    #[error("worker {worker:?} is registered for model {existing:?}, not {requested:?}")]
    ModelMismatch { worker: String, existing: String, requested: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A file operation failed (saving or reading a snapshot); `path` names
    /// the file, `errno` is the OS error code when there is one.
    #[error("{path}: {message}")]
    Io { path: String, message: String, errno: Option<i32> },
    /// The worker's stream is followed (by an `EventManager`): it cannot be
    /// removed or purged behind the stream's back.
    #[error("worker {0:?} is followed by an event stream; remove it through the stream (EventManager.remove_pod)")]
    Followed(String),
    /// A worker id that is already followed (e.g. pod `a` with dp_size 2
    /// and a pod named `a/dp0`).
    #[error("worker {0:?} is already followed")]
    AlreadyFollowed(String),
}
