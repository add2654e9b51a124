//! The one error type of the core crate.

/// A payload that is not a well-formed `KVEventBatch`.
///
/// The message names what was wrong and where (event number, field, byte
/// offset), so a user can find the offending bytes in a capture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

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
}
