//! Leaving the interpreter while Rust work runs.

use pyo3::prelude::*;

/// Run `f` with the GIL released (the single place the bindings do so).
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl Send + FnOnce() -> T) -> T {
    py.detach(f)
}
