//! The buffer form of `match`: depths written into a caller's `uint32`
//! buffer in the order of a separately fetched (and cached) list of worker
//! names, so a query builds no Python object per worker.
//!
//! The order is the model's workers in registration-slot order, valid for
//! one worker generation (`Index.worker_order`); a match under another
//! generation is refused, because positions would name other workers.

use kvsync_core::Query;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::errors::{Error, Result};

/// The model's worker ids in buffer order, and the generation they are of.
pub(crate) fn worker_order(ix: &kvsync_core::Index, model: &str) -> (u64, Vec<String>) {
    let names = ix.worker_slots().filter(|(_, _, m)| *m == model).map(|(_, id, _)| id.to_owned()).collect();
    (ix.worker_epoch(), names)
}

/// A writable, C-contiguous, 1-D `uint32` buffer.
pub(crate) fn out_buffer(out: &Bound<'_, PyAny>) -> Result<PyBuffer<u32>> {
    let buf = PyBuffer::<u32>::get(out).map_err(|e| {
        Error::invalid(format!("out must be a writable 1-D uint32 buffer (numpy.uint32, array('I')): {e}"))
    })?;
    if buf.readonly() {
        return Err(Error::invalid("out must be a writable uint32 buffer, got a read-only one"));
    }
    if buf.dimensions() != 1 || !buf.is_c_contiguous() {
        return Err(Error::invalid("out must be a 1-D contiguous uint32 buffer"));
    }
    Ok(buf)
}

/// Depths of the model's workers in buffer order, with the generation
/// they were computed under.
pub(crate) fn depths(ix: &kvsync_core::Index, q: &Query<'_, '_>) -> (u64, Vec<u32>) {
    let mut found = Vec::new();
    ix.match_slots(q, &mut found);
    (ix.worker_epoch(), found.into_iter().map(|(_, d)| d).collect())
}

/// Write `depths` into `out` after checking the generation and the length.
pub(crate) fn write(
    py: Python<'_>,
    out: &PyBuffer<u32>,
    model: &str,
    generation: u64,
    (now, depths): (u64, Vec<u32>),
) -> Result<usize> {
    if now != generation {
        return Err(Error::invalid(format!(
            "the workers changed since worker_order() (generation {generation}, now {now}): \
             call worker_order({model:?}) again"
        )));
    }
    if out.item_count() != depths.len() {
        return Err(Error::invalid(format!(
            "out has {} entries but model {model:?} has {} workers (see worker_order)",
            out.item_count(),
            depths.len()
        )));
    }
    out.copy_from_slice(py, &depths)?;
    Ok(depths.len())
}
