//! Python arguments to owned Rust values: token ids, extra keys, lora,
//! tiers, and the query arguments built from them.

use kvsync_core::wire::Value;
use kvsync_core::{Lora, Query, Tier};
use pyo3::buffer::{Element, ElementType, PyBuffer, PyUntypedBuffer};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMemoryView, PyString, PyTuple};

use crate::errors::{Error, Result};

/// Token ids of a query, owned.
///
/// A 1-D native-endian integer buffer of any width (array('I'), numpy
/// uint32, or the int64 arrays tokenizers return) is read through the
/// buffer protocol with no per-element Python conversion: uint32 with one
/// memcpy, other widths with one copy and a range check. Reading it in
/// place after detaching would race with writers in other threads; doing
/// that soundly (relaxed atomic loads) was measured 3 us slower per 8,192
/// tokens than this copy.
pub(crate) fn tokens_of(obj: &Bound<'_, PyAny>) -> Result<Vec<u32>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
        return Err(
            PyTypeError::new_err("token_ids must be a sequence of ints or an integer buffer, not str/bytes").into()
        );
    }
    if let Ok(list) = obj.cast::<PyList>() {
        return tokens_of_items(list.len(), list.iter());
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        return tokens_of_items(tuple.len(), tuple.iter());
    }
    if let Ok(buf) = PyUntypedBuffer::get(obj) {
        return tokens_of_buffer(obj.py(), &buf);
    }
    // Any other iterable of ints.
    let Ok(items) = obj.try_iter() else {
        // A buffer PyO3 cannot describe (a 0-D numpy array has no shape).
        if let Ok(view) = PyMemoryView::from(obj) {
            let ndim: usize = view.getattr("ndim")?.extract()?;
            return Err(Error::invalid(format!("token_ids must be 1-D, got a {ndim}-D buffer")));
        }
        return Err(not_tokens());
    };
    let items = items.collect::<PyResult<Vec<_>>>()?;
    tokens_of_items(items.len(), items.into_iter())
}

/// Token ids from Python ints, naming the first item that is not one.
fn tokens_of_items<'py>(len: usize, items: impl Iterator<Item = Bound<'py, PyAny>>) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(len);
    for (i, item) in items.enumerate() {
        match item.extract::<u32>() {
            Ok(t) => out.push(t),
            Err(_) if item.is_instance_of::<PyInt>() && !item.is_instance_of::<PyBool>() => {
                return Err(out_of_range(i, &item.str()?.to_string_lossy()));
            }
            Err(_) => {
                return Err(PyTypeError::new_err(format!(
                    "token_ids must hold ints: position {i} is {}",
                    item.get_type().name()?
                ))
                .into());
            }
        }
    }
    Ok(out)
}

fn not_tokens() -> Error {
    PyTypeError::new_err("token_ids must be a sequence of ints in 0..2**32 or a 1-D integer buffer (array('I'), numpy)")
        .into()
}

fn out_of_range(position: usize, value: &str) -> Error {
    Error::invalid(format!("token_ids: position {position} holds {value}, outside 0..2**32"))
}

/// Whether a struct-module format string has native byte order.
fn native_order(format: &[u8]) -> bool {
    match format.first() {
        Some(b'<') => cfg!(target_endian = "little"),
        Some(b'>' | b'!') => cfg!(target_endian = "big"),
        _ => true, // '@', '=' or none: native
    }
}

fn tokens_of_buffer(py: Python<'_>, buf: &PyUntypedBuffer) -> Result<Vec<u32>> {
    let format = buf.format().to_bytes();
    if !native_order(format) {
        let order = if cfg!(target_endian = "little") { "big-endian" } else { "little-endian" };
        return Err(Error::invalid(format!(
            "token_ids is a {order} buffer (format {:?}); convert it to native byte order, e.g. numpy's .astype(np.uint32)",
            String::from_utf8_lossy(format)
        )));
    }
    if buf.dimensions() != 1 {
        return Err(Error::invalid(format!(
            "token_ids must be 1-D, got a buffer of shape ({})",
            buf.shape().iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )));
    }
    match ElementType::from_format(buf.format()) {
        ElementType::UnsignedInteger { bytes: 4 } => Ok(buf.as_typed::<u32>()?.to_vec(py)?),
        ElementType::UnsignedInteger { bytes: 1 } => widen(py, buf.as_typed::<u8>()?),
        ElementType::UnsignedInteger { bytes: 2 } => widen(py, buf.as_typed::<u16>()?),
        ElementType::UnsignedInteger { bytes: 8 } => widen(py, buf.as_typed::<u64>()?),
        ElementType::SignedInteger { bytes: 1 } => widen(py, buf.as_typed::<i8>()?),
        ElementType::SignedInteger { bytes: 2 } => widen(py, buf.as_typed::<i16>()?),
        ElementType::SignedInteger { bytes: 4 } => widen(py, buf.as_typed::<i32>()?),
        ElementType::SignedInteger { bytes: 8 } => widen(py, buf.as_typed::<i64>()?),
        _ => Err(PyTypeError::new_err(format!(
            "token_ids must be a buffer of integers, got format {:?}",
            String::from_utf8_lossy(format)
        ))
        .into()),
    }
}

/// Copy a buffer of another integer width out and narrow it to u32,
/// naming the first value that does not fit.
fn widen<T>(py: Python<'_>, buf: &PyBuffer<T>) -> Result<Vec<u32>>
where
    T: Element + Copy + std::fmt::Display,
    u32: TryFrom<T>,
{
    let raw = buf.to_vec(py)?;
    let mut out = Vec::with_capacity(raw.len());
    for (i, &v) in raw.iter().enumerate() {
        match u32::try_from(v) {
            Ok(t) => out.push(t),
            Err(_) => return Err(out_of_range(i, &v.to_string())),
        }
    }
    Ok(out)
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
    pub(crate) fn of(obj: &Bound<'_, PyAny>, depth: usize) -> Result<Owned> {
        if depth > 32 {
            return Err(Error::invalid("extra keys nest too deeply"));
        }
        if obj.is_none() {
            return Ok(Owned::Nil);
        }
        if let Ok(b) = obj.cast::<PyBool>() {
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
        ))
        .into())
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

pub(crate) fn extra_keys_of(obj: Option<&Bound<'_, PyAny>>) -> Result<Option<Vec<Option<Vec<Owned>>>>> {
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
            )
            .into());
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
    pub(crate) fn of(obj: Option<&Bound<'_, PyAny>>) -> Result<LoraArg> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(LoraArg::Base) };
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(LoraArg::Name(s.to_str()?.to_owned()));
        }
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(LoraArg::Id(i));
        }
        Err(PyTypeError::new_err("lora must be None, an adapter name (str) or an adapter id (int)").into())
    }

    pub(crate) fn lora(&self) -> Lora<'_> {
        match self {
            LoraArg::Base => Lora::Base,
            LoraArg::Name(n) => Lora::Name(n),
            LoraArg::Id(i) => Lora::Id(*i),
        }
    }
}

pub(crate) fn tiers_of(obj: Option<&Bound<'_, PyAny>>) -> Result<u8> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(7) };
    let names: Vec<String> =
        if let Ok(s) = obj.cast::<PyString>() { vec![s.to_str()?.to_owned()] } else { obj.extract()? };
    let mut mask = 0;
    for n in names {
        mask |= match n.to_ascii_lowercase().as_str() {
            "gpu" => Tier::Gpu.bit(),
            "cpu" => Tier::Cpu.bit(),
            "storage" => Tier::Storage.bit(),
            other => return Err(Error::invalid(format!("unknown tier {other:?} (use 'gpu', 'cpu', 'storage')"))),
        };
    }
    if mask == 0 {
        return Err(Error::invalid("tiers must name at least one tier"));
    }
    Ok(mask)
}

pub(crate) struct QueryArgs {
    tokens: Vec<u32>,
    /// The prompt as standard `seq` hashes (then `tokens` is empty).
    hashes: Option<Vec<u64>>,
    lora: LoraArg,
    extras: Option<Vec<Option<Vec<Owned>>>>,
}

impl QueryArgs {
    pub(crate) fn parse(
        token_ids: &Bound<'_, PyAny>,
        lora: Option<&Bound<'_, PyAny>>,
        extra_keys: Option<&Bound<'_, PyAny>>,
    ) -> Result<Self> {
        Ok(QueryArgs {
            tokens: tokens_of(token_ids)?,
            hashes: None,
            lora: LoraArg::of(lora)?,
            extras: extra_keys_of(extra_keys)?,
        })
    }

    /// A prompt given as standard `seq` hashes.
    pub(crate) fn of_hashes(seq_hashes: &Bound<'_, PyAny>, lora: Option<&Bound<'_, PyAny>>) -> Result<Self> {
        let hashes = crate::hashes::hashes_of(seq_hashes)?;
        Ok(QueryArgs { tokens: Vec::new(), hashes: Some(hashes), lora: LoraArg::of(lora)?, extras: None })
    }

    /// Run `f` on the core query built from these arguments.
    pub(crate) fn with_query<T>(&self, model: &str, tiers: u8, f: impl FnOnce(&Query<'_, '_>) -> T) -> T {
        let views: Option<Vec<Option<Vec<Value<'_>>>>> = self
            .extras
            .as_ref()
            .map(|e| e.iter().map(|b| b.as_ref().map(|keys| keys.iter().map(Owned::view).collect())).collect());
        let q = Query {
            model,
            tokens: &self.tokens,
            lora: self.lora.lora(),
            extra_keys: views.as_deref(),
            tiers,
            hashes: self.hashes.as_deref(),
        };
        f(&q)
    }
}
