//! `kvsync._core`: the Python face of kvsync-core.
//!
//! Inputs are turned into owned Rust values or borrowed immutable bytes
//! first (`convert`); the work then runs detached from the interpreter
//! under locks that are never waited for while attached (`lock`), and
//! Python objects are built only after the locks are released. The index
//! sits behind a reader-writer lock, so matches from many threads run in
//! parallel while `apply` takes the lock briefly per payload. Every error
//! goes through `errors::Error` into one exception hierarchy.
//!
//! Modules: `index` (Index), `streams` (Streams), `decode` (decode, Batch,
//! Event), `results` (ApplyStats, WorkerStatus, stats dicts), `errors`,
//! `convert`, `lock`.

// PyO3 extracts arguments by value (PyBackedBytes, PathBuf, Vec).
#![allow(clippy::needless_pass_by_value)]

mod buffer;
mod convert;
mod decode;
mod errors;
mod hashes;
mod index;
mod lock;
mod results;
mod streams;

use pyo3::prelude::*;

use decode::{Batch, Event};
use index::Index;
use results::{ApplyStats, WorkerStatus};
use streams::Streams;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The protocol's field names, defined once in the core's decoder.
    m.add("EVENT_FIELDS", pyo3::types::PyTuple::new(m.py(), kvsync_core::wire::EVENT_FIELDS)?)?;
    m.add("EVENT_TYPES", pyo3::types::PyTuple::new(m.py(), kvsync_core::wire::EVENT_TYPES)?)?;
    errors::add_to_module(m)?;
    m.add_class::<Index>()?;
    m.add_class::<ApplyStats>()?;
    m.add_class::<Batch>()?;
    m.add_class::<Event>()?;
    m.add_class::<Streams>()?;
    m.add_class::<WorkerStatus>()?;
    m.add_function(wrap_pyfunction!(decode::decode, m)?)?;
    m.add_function(wrap_pyfunction!(hashes::seq_hashes, m)?)?;
    m.add("DEFAULT_HASH_SEED", kvsync_core::prefix::DEFAULT_SEED)?;
    Ok(())
}
