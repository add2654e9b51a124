//! The exceptions of `kvsync._core` and the conversion from core errors.

use kvsync_core::IndexError;
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    _core,
    DecodeError,
    PyValueError,
    "A payload that is not a well-formed KVEventBatch; the message says what and where."
);
create_exception!(_core, SnapshotError, PyValueError, "An index snapshot that cannot be read.");

/// The one conversion from core errors to Python exceptions.
pub(crate) fn to_py(e: IndexError) -> PyErr {
    match e {
        IndexError::Decode(d) => DecodeError::new_err(d.to_string()),
        IndexError::UnknownWorker(w) => PyKeyError::new_err(format!("unknown worker {w:?}")),
        IndexError::ModelMismatch { .. } | IndexError::Invalid(_) => PyValueError::new_err(e.to_string()),
        IndexError::Snapshot(m) => SnapshotError::new_err(m),
        IndexError::Io { .. } => PyOSError::new_err(e.to_string()),
        IndexError::Followed(_) => pyo3::exceptions::PyRuntimeError::new_err(e.to_string()),
        IndexError::AlreadyFollowed(_) => PyValueError::new_err(e.to_string()),
    }
}
