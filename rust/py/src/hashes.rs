//! The standard rolling hash (`kvsync.seq_hashes`) and prompts given as
//! its hashes (`Index.match_hashes`, `Index.match_detail_hashes`).

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use crate::convert::tokens_of;
use crate::errors::{Error, Result};

/// One hash: an int in `-2**63..2**64` (negative ones as their 64-bit two's
/// complement, the form signed-integer languages print).
fn hash_of(i: usize, item: &Bound<'_, PyAny>) -> Result<u64> {
    if let Ok(v) = item.extract::<u64>() {
        return Ok(v);
    }
    if let Ok(v) = item.extract::<i64>() {
        return Ok(v as u64);
    }
    let what = item.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
    Err(Error::invalid(format!("seq_hashes[{i}] must be an int in -2**63..2**64, got {what}")))
}

/// Standard `seq` hashes from a sequence of ints or a 1-D buffer of 64-bit
/// integers (numpy `uint64`/`int64`).
pub(crate) fn hashes_of(obj: &Bound<'_, PyAny>) -> Result<Vec<u64>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
        return Err(PyTypeError::new_err("seq_hashes must be a sequence of ints, not str/bytes").into());
    }
    let py = obj.py();
    if let Ok(buf) = PyBuffer::<u64>::get(obj) {
        return Ok(buf.to_vec(py)?);
    }
    if let Ok(buf) = PyBuffer::<i64>::get(obj) {
        return Ok(buf.to_vec(py)?.into_iter().map(|v| v as u64).collect());
    }
    let items = obj.try_iter().map_err(|_| PyTypeError::new_err("seq_hashes must be a sequence of ints"))?;
    items.enumerate().map(|(i, item)| hash_of(i, &item?)).collect()
}

/// The standard rolling hashes (SPEC section 2) of the prompt's full
/// blocks, without extra keys: what Mooncake's and Dynamo's indexers and
/// `/query_by_hash` callers compute.
#[pyfunction]
#[pyo3(signature = (token_ids, block_size, seed=1337))]
pub(crate) fn seq_hashes(py: Python<'_>, token_ids: &Bound<'_, PyAny>, block_size: i64, seed: u64) -> Result<Vec<u64>> {
    let Ok(block_size) = usize::try_from(block_size) else {
        return Err(Error::invalid(format!("block_size must be >= 1, got {block_size}")));
    };
    if block_size == 0 {
        return Err(Error::invalid("block_size must be >= 1, got 0"));
    }
    let tokens = tokens_of(token_ids)?;
    Ok(crate::lock::detached(py, || kvsync_core::prefix::seq_hashes(&tokens, block_size, seed)))
}
