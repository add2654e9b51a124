//! Python arguments to owned Rust values: token ids, extra keys, lora,
//! tiers, and the query arguments built from them.

use kvsync_core::wire::Value;
use kvsync_core::{Lora, Query, Tier};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};

/// Token ids of a query, owned (one memcpy from a uint32 buffer, or one
/// conversion pass over a sequence of ints).
pub(crate) fn tokens_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    // A uint32 buffer is copied with one memcpy, no per-element conversion.
    // Reading it in place after releasing the interpreter would race with
    // writers in other threads; doing that soundly (relaxed atomic loads)
    // was measured 3 us slower per 8,192 tokens than this copy.
    if let Ok(buf) = PyBuffer::<u32>::get(obj) {
        return buf.to_vec(obj.py());
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err("token_ids must be a sequence of ints or a uint32 buffer, not str/bytes"));
    }
    obj.extract::<Vec<u32>>().map_err(|_| {
        PyTypeError::new_err(
            "token_ids must be a sequence of ints in 0..2**32 or a buffer of uint32 (array('I'), numpy.uint32)",
        )
    })
}

/// An owned generic value (query extra keys).
#[derive(Clone, Debug)]
pub(crate) enum Owned {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Owned>),
    Map(Vec<(Owned, Owned)>),
}

impl Owned {
    pub(crate) fn of(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Owned> {
        if depth > 32 {
            return Err(PyValueError::new_err("extra keys nest too deeply"));
        }
        if obj.is_none() {
            return Ok(Owned::Nil);
        }
        if let Ok(b) = obj.cast::<pyo3::types::PyBool>() {
            return Ok(Owned::Bool(b.is_true()));
        }
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(Owned::Str(s.to_str()?.to_owned()));
        }
        if let Ok(b) = obj.cast::<PyBytes>() {
            return Ok(Owned::Bin(b.as_bytes().to_vec()));
        }
        if let Ok(f) = obj.cast::<PyFloat>() {
            return Ok(Owned::Float(f.value()));
        }
        if let Ok(i) = obj.extract::<i128>() {
            return Ok(Owned::Int(i));
        }
        if let Ok(d) = obj.cast::<PyDict>() {
            let mut pairs = Vec::with_capacity(d.len());
            for (k, v) in d.iter() {
                pairs.push((Owned::of(&k, depth + 1)?, Owned::of(&v, depth + 1)?));
            }
            return Ok(Owned::Map(pairs));
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            let mut items = Vec::new();
            for it in obj.try_iter()? {
                items.push(Owned::of(&it?, depth + 1)?);
            }
            return Ok(Owned::Array(items));
        }
        Err(PyTypeError::new_err(format!(
            "extra key of type {} is not supported (use None, bool, int, float, str, bytes, list, tuple or dict)",
            obj.get_type().name()?
        )))
    }

    pub(crate) fn view(&self) -> Value<'_> {
        match self {
            Owned::Nil => Value::Nil,
            Owned::Bool(b) => Value::Bool(*b),
            Owned::Int(i) => Value::Int(*i),
            Owned::Float(f) => Value::Float(*f),
            Owned::Str(s) => Value::Str(s),
            Owned::Bin(b) => Value::Bin(b),
            Owned::Array(a) => Value::Array(a.iter().map(Owned::view).collect()),
            Owned::Map(m) => Value::Map(m.iter().map(|(k, v)| (k.view(), v.view())).collect()),
        }
    }
}

pub(crate) fn extra_keys_of(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<Option<Vec<Owned>>>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    let mut out = Vec::new();
    for block in obj.try_iter()? {
        let block = block?;
        if block.is_none() {
            out.push(None);
            continue;
        }
        if block.is_instance_of::<PyString>() || block.is_instance_of::<PyBytes>() {
            return Err(PyTypeError::new_err(
                "extra_keys holds one list of keys per block (or None), e.g. [['image-1'], None]",
            ));
        }
        let mut keys = Vec::new();
        for k in block.try_iter()? {
            keys.push(Owned::of(&k?, 0)?);
        }
        out.push(Some(keys));
    }
    Ok(Some(out))
}

pub(crate) enum LoraArg {
    Base,
    Name(String),
    Id(i64),
}

impl LoraArg {
    pub(crate) fn of(obj: Option<&Bound<'_, PyAny>>) -> PyResult<LoraArg> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(LoraArg::Base) };
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(LoraArg::Name(s.to_str()?.to_owned()));
        }
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(LoraArg::Id(i));
        }
        Err(PyTypeError::new_err("lora must be None, an adapter name (str) or an adapter id (int)"))
    }

    pub(crate) fn lora(&self) -> Lora<'_> {
        match self {
            LoraArg::Base => Lora::Base,
            LoraArg::Name(n) => Lora::Name(n),
            LoraArg::Id(i) => Lora::Id(*i),
        }
    }
}

pub(crate) fn tiers_of(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u8> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(7) };
    let names: Vec<String> =
        if let Ok(s) = obj.cast::<PyString>() { vec![s.to_str()?.to_owned()] } else { obj.extract()? };
    let mut mask = 0;
    for n in names {
        mask |= match n.to_ascii_lowercase().as_str() {
            "gpu" => Tier::Gpu.bit(),
            "cpu" => Tier::Cpu.bit(),
            "storage" => Tier::Storage.bit(),
            other => {
                return Err(PyValueError::new_err(format!("unknown tier {other:?} (use 'gpu', 'cpu', 'storage')")))
            }
        };
    }
    if mask == 0 {
        return Err(PyValueError::new_err("tiers must name at least one tier"));
    }
    Ok(mask)
}

pub(crate) struct QueryArgs {
    tokens: Vec<u32>,
    lora: LoraArg,
    extras: Option<Vec<Option<Vec<Owned>>>>,
}

impl QueryArgs {
    pub(crate) fn parse(
        token_ids: &Bound<'_, PyAny>,
        lora: Option<&Bound<'_, PyAny>>,
        extra_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Ok(QueryArgs { tokens: tokens_of(token_ids)?, lora: LoraArg::of(lora)?, extras: extra_keys_of(extra_keys)? })
    }

    /// Run `f` on the core query built from these arguments.
    pub(crate) fn with_query<T>(&self, model: &str, tiers: u8, f: impl FnOnce(&Query<'_, '_>) -> T) -> T {
        let views: Option<Vec<Option<Vec<Value<'_>>>>> = self
            .extras
            .as_ref()
            .map(|e| e.iter().map(|b| b.as_ref().map(|keys| keys.iter().map(Owned::view).collect())).collect());
        let q = Query { model, tokens: &self.tokens, lora: self.lora.lora(), extra_keys: views.as_deref(), tiers };
        f(&q)
    }
}
