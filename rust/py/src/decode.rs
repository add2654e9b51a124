//! `decode`: one payload as Python `Batch` and `Event` objects.

use kvsync_core::wire::EVENT_FIELDS;
use kvsync_core::wire::{self, EngineHash, Event as CoreEvent, Mode, Value};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString};

use crate::errors::Result;

/// One decoded event. Fields a release does not send are None.
#[pyclass(frozen, get_all, module = "kvsync._core")]
pub(crate) struct Event {
    r#type: String,
    block_hashes: Option<Py<PyAny>>,
    parent_block_hash: Option<Py<PyAny>>,
    token_ids: Option<Py<PyAny>>,
    block_size: Option<u64>,
    lora_id: Option<i64>,
    medium: Option<String>,
    lora_name: Option<String>,
    extra_keys: Option<Py<PyAny>>,
    group_idx: Option<u32>,
    kv_cache_spec_kind: Option<String>,
    kv_cache_spec_sliding_window: Option<Py<PyAny>>,
    locality: Option<Py<PyAny>>,
    ownership: Option<Py<PyAny>>,
    session_id: Option<Py<PyAny>>,
    lookahead_token_ids: Option<Py<PyAny>>,
    cache_salt: Option<Py<PyAny>>,
    metadata: Option<Py<PyAny>>,
}

#[pymethods]
impl Event {
    /// `{"type": ..., field: value}` with the fields that are not None.
    fn to_dict<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(slf.py());
        d.set_item("type", &slf.get().r#type)?;
        for &f in EVENT_FIELDS {
            let v = slf.getattr(f)?;
            if !v.is_none() {
                d.set_item(f, v)?;
            }
        }
        Ok(d)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        Ok(format!("Event({})", Self::to_dict(slf)?.repr()?))
    }
}

/// One decoded KVEventBatch.
#[pyclass(frozen, get_all, module = "kvsync._core")]
pub(crate) struct Batch {
    ts: f64,
    dp_rank: Option<i64>,
    events: Py<PyList>,
    /// Events of unknown type that were skipped.
    unknown_events: u32,
}

#[pymethods]
impl Batch {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Batch(ts={}, dp_rank={:?}, events={}, unknown_events={})",
            self.ts,
            self.dp_rank,
            self.events.bind(py).len(),
            self.unknown_events
        )
    }
}

pub(crate) fn hash_obj<'py>(py: Python<'py>, h: EngineHash<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match h {
        EngineHash::Unsigned(v) => v.into_pyobject(py)?.into_any(),
        EngineHash::Negative(v) => v.into_pyobject(py)?.into_any(),
        EngineHash::Bytes(b) => PyBytes::new(py, b).into_any(),
    })
}

pub(crate) fn value_obj<'py>(py: Python<'py>, v: &Value<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Nil => py.None().into_bound(py),
        Value::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::Float(f) => PyFloat::new(py, *f).into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::Bin(b) | Value::Ext(_, b) => PyBytes::new(py, b).into_any(),
        Value::Array(a) => {
            let l = PyList::empty(py);
            for it in a {
                l.append(value_obj(py, it)?)?;
            }
            l.into_any()
        }
        Value::Map(m) => {
            let d = PyDict::new(py);
            for (k, it) in m {
                d.set_item(value_obj(py, k)?, value_obj(py, it)?)?;
            }
            d.into_any()
        }
    })
}

pub(crate) fn opt_str(s: Option<&str>) -> Option<String> {
    s.map(str::to_owned)
}

/// Decode one payload into a `Batch` (for tools and tests; the index
/// decodes internally without building Python objects).
#[pyfunction]
pub(crate) fn decode(py: Python<'_>, payload: PyBackedBytes) -> Result<Batch> {
    let b = wire::decode(&payload, Mode::Full)?;
    let events = PyList::empty(py);
    for ev in &b.events {
        let hashes = |r: &std::ops::Range<usize>| -> PyResult<Py<PyAny>> {
            let l = PyList::empty(py);
            for h in &b.hashes[r.clone()] {
                l.append(hash_obj(py, *h)?)?;
            }
            Ok(l.into_any().unbind())
        };
        let mut e = Event {
            r#type: ev.type_name().to_owned(),
            block_hashes: None,
            parent_block_hash: None,
            token_ids: None,
            block_size: None,
            lora_id: None,
            medium: None,
            lora_name: None,
            extra_keys: None,
            group_idx: None,
            kv_cache_spec_kind: None,
            kv_cache_spec_sliding_window: None,
            locality: None,
            ownership: None,
            session_id: None,
            lookahead_token_ids: None,
            cache_salt: None,
            metadata: None,
        };
        let other = match ev {
            CoreEvent::Stored(s) => {
                e.block_hashes = Some(hashes(&s.hashes)?);
                e.parent_block_hash = s.parent.map(|p| hash_obj(py, p).map(Bound::unbind)).transpose()?;
                e.token_ids = Some(PyList::new(py, &b.tokens[s.tokens.clone()])?.into_any().unbind());
                e.block_size = s.block_size;
                e.lora_id = s.lora_id;
                e.medium = opt_str(s.medium);
                e.lora_name = opt_str(s.lora_name);
                e.extra_keys = match &s.extra_keys {
                    None => None,
                    Some(per_block) => {
                        let l = PyList::empty(py);
                        for blk in per_block {
                            match blk {
                                None => l.append(py.None())?,
                                Some(keys) => l.append(value_obj(py, &Value::Array(keys.clone()))?)?,
                            }
                        }
                        Some(l.into_any().unbind())
                    }
                };
                e.group_idx = s.group_idx;
                e.kv_cache_spec_kind = opt_str(s.kv_cache_spec_kind);
                &s.other[..]
            }
            CoreEvent::Removed(r) => {
                e.block_hashes = Some(hashes(&r.hashes)?);
                e.medium = opt_str(r.medium);
                e.group_idx = r.group_idx;
                &r.other[..]
            }
            CoreEvent::Cleared => &[][..],
        };
        for (name, v) in other {
            let obj = if matches!(v, Value::Nil) { None } else { Some(value_obj(py, v)?.unbind()) };
            match *name {
                "kv_cache_spec_sliding_window" => e.kv_cache_spec_sliding_window = obj,
                "locality" => e.locality = obj,
                "ownership" => e.ownership = obj,
                "session_id" => e.session_id = obj,
                "lookahead_token_ids" => e.lookahead_token_ids = obj,
                "cache_salt" => e.cache_salt = obj,
                "metadata" => e.metadata = obj,
                _ => {}
            }
        }
        events.append(Bound::new(py, e)?)?;
    }
    Ok(Batch { ts: b.ts, dp_rank: b.dp_rank, events: events.unbind(), unknown_events: b.unknown_events })
}
