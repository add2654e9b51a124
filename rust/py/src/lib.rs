//! `kvsync._core`: the Python face of kvsync-core.
//!
//! Inputs are turned into owned Rust values or borrowed immutable bytes
//! first; the work then runs with the GIL released through [`detached`].
//! The index sits behind a reader-writer lock, so matches from many threads
//! run in parallel while `apply` takes the lock briefly per payload.

// PyO3 extracts arguments by value (PyBackedBytes, PathBuf, Vec).
#![allow(clippy::needless_pass_by_value)]

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use kvsync_core::wire::{self, EngineHash, Event as CoreEvent, Mode, Value};
use kvsync_core::{IndexError, Lora, Query, Tier};
use parking_lot::RwLock;
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};

create_exception!(
    _core,
    DecodeError,
    PyValueError,
    "A payload that is not a well-formed KVEventBatch; the message says what and where."
);
create_exception!(_core, SnapshotError, PyValueError, "An index snapshot that cannot be read.");

/// The one conversion from core errors to Python exceptions.
fn to_py(e: IndexError) -> PyErr {
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

/// Run `f` with the GIL released (the single place the bindings do so).
fn detached<T: Send>(py: Python<'_>, f: impl Send + FnOnce() -> T) -> T {
    py.detach(f)
}

/// What one `Index.apply` did, counted in block events.
#[pyclass(frozen, get_all, module = "kvsync._core")]
#[derive(Clone, Copy)]
struct ApplyStats {
    stored: u64,
    removed: u64,
    cleared: u64,
    skipped: u64,
    orphaned: u64,
    ignored: u64,
    unknown_removals: u64,
    unknown_events: u64,
}

#[pymethods]
impl ApplyStats {
    fn __repr__(&self) -> String {
        format!(
            "ApplyStats(stored={}, removed={}, cleared={}, skipped={}, orphaned={}, ignored={}, unknown_removals={}, unknown_events={})",
            self.stored,
            self.removed,
            self.cleared,
            self.skipped,
            self.orphaned,
            self.ignored,
            self.unknown_removals,
            self.unknown_events
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<ApplyStats>().is_ok_and(|o| {
            let o = o.get();
            (
                self.stored,
                self.removed,
                self.cleared,
                self.skipped,
                self.orphaned,
                self.ignored,
                self.unknown_removals,
                self.unknown_events,
            ) == (
                o.stored,
                o.removed,
                o.cleared,
                o.skipped,
                o.orphaned,
                o.ignored,
                o.unknown_removals,
                o.unknown_events,
            )
        })
    }

    #[allow(clippy::wrong_self_convention)] // Python's naming, not Rust's
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("stored", self.stored)?;
        d.set_item("removed", self.removed)?;
        d.set_item("cleared", self.cleared)?;
        d.set_item("skipped", self.skipped)?;
        d.set_item("orphaned", self.orphaned)?;
        d.set_item("ignored", self.ignored)?;
        d.set_item("unknown_removals", self.unknown_removals)?;
        d.set_item("unknown_events", self.unknown_events)?;
        Ok(d)
    }
}

impl From<kvsync_core::ApplyStats> for ApplyStats {
    fn from(s: kvsync_core::ApplyStats) -> Self {
        ApplyStats {
            stored: s.stored,
            removed: s.removed,
            cleared: s.cleared,
            skipped: s.skipped,
            orphaned: s.orphaned,
            ignored: s.ignored,
            unknown_removals: s.unknown_removals,
            unknown_events: s.unknown_events,
        }
    }
}

/// Token ids of a query, owned (one memcpy from a uint32 buffer, or one
/// conversion pass over a sequence of ints).
fn tokens_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
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
enum Owned {
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
    fn of(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Owned> {
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

    fn view(&self) -> Value<'_> {
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

fn extra_keys_of(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<Option<Vec<Owned>>>>> {
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

enum LoraArg {
    Base,
    Name(String),
    Id(i64),
}

impl LoraArg {
    fn of(obj: Option<&Bound<'_, PyAny>>) -> PyResult<LoraArg> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(LoraArg::Base) };
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(LoraArg::Name(s.to_str()?.to_owned()));
        }
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(LoraArg::Id(i));
        }
        Err(PyTypeError::new_err("lora must be None, an adapter name (str) or an adapter id (int)"))
    }

    fn lora(&self) -> Lora<'_> {
        match self {
            LoraArg::Base => Lora::Base,
            LoraArg::Name(n) => Lora::Name(n),
            LoraArg::Id(i) => Lora::Id(*i),
        }
    }
}

fn tiers_of(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u8> {
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

struct QueryArgs {
    tokens: Vec<u32>,
    lora: LoraArg,
    extras: Option<Vec<Option<Vec<Owned>>>>,
}

impl QueryArgs {
    fn parse(
        token_ids: &Bound<'_, PyAny>,
        lora: Option<&Bound<'_, PyAny>>,
        extra_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        Ok(QueryArgs { tokens: tokens_of(token_ids)?, lora: LoraArg::of(lora)?, extras: extra_keys_of(extra_keys)? })
    }

    /// Run `f` on the core query built from these arguments.
    fn with_query<T>(&self, model: &str, tiers: u8, f: impl FnOnce(&Query<'_, '_>) -> T) -> T {
        let views: Option<Vec<Option<Vec<Value<'_>>>>> = self
            .extras
            .as_ref()
            .map(|e| e.iter().map(|b| b.as_ref().map(|keys| keys.iter().map(Owned::view).collect())).collect());
        let q = Query { model, tokens: &self.tokens, lora: self.lora.lora(), extra_keys: views.as_deref(), tiers };
        f(&q)
    }
}

/// Worker ids as Python strings by slot, and per model a template answer
/// `{worker: 0}` in slot order: an answer is a copy of the template with the
/// non-zero depths written in, so no string is created and the dict never
/// resizes during a match.
struct Names {
    epoch: u64,
    by_slot: Vec<Option<Py<PyString>>>,
    templates: std::collections::HashMap<String, Py<PyDict>>,
}

impl Names {
    fn of(py: Python<'_>, ix: &kvsync_core::Index) -> PyResult<Names> {
        let mut by_slot: Vec<Option<Py<PyString>>> = (0..ix.slot_count()).map(|_| None).collect();
        let mut templates: std::collections::HashMap<String, Py<PyDict>> = std::collections::HashMap::new();
        let zero = 0u32.into_pyobject(py)?;
        for (slot, id, model) in ix.worker_slots() {
            let name = PyString::new(py, id);
            let t = templates.entry(model.to_owned()).or_insert_with(|| PyDict::new(py).unbind());
            t.bind(py).set_item(&name, &zero)?;
            by_slot[slot as usize] = Some(name.unbind());
        }
        Ok(Names { epoch: ix.worker_epoch(), by_slot, templates })
    }
}

/// Python ints for match depths, made once (CPython caches only -5..=256).
static DEPTHS: pyo3::sync::PyOnceLock<Vec<Py<PyAny>>> = pyo3::sync::PyOnceLock::new();
const CACHED_DEPTHS: u32 = 8192;

fn depth_cache(py: Python<'_>) -> &[Py<PyAny>] {
    DEPTHS.get_or_init(py, || {
        (0..=CACHED_DEPTHS).map(|i| i.into_pyobject(py).expect("int").into_any().unbind()).collect()
    })
}

thread_local! {
    /// Decoding vectors reused by `Index.apply` on this thread.
    static DECODE_BUFFERS: std::cell::RefCell<wire::Buffers> = std::cell::RefCell::new(wire::Buffers::default());
}

/// The exact prefix index (see SPEC section 2).
///
/// Locking rule: no thread ever waits for the GIL while holding `inner`
/// (work under the lock runs detached or is plain Rust), so taking `inner`
/// while attached cannot deadlock.
#[pyclass(frozen, module = "kvsync._core")]
struct Index {
    inner: RwLock<kvsync_core::Index>,
    names: parking_lot::Mutex<Arc<Names>>,
}

impl Index {
    fn wrap(ix: kvsync_core::Index) -> Index {
        Index {
            inner: RwLock::new(ix),
            names: parking_lot::Mutex::new(Arc::new(Names {
                epoch: u64::MAX,
                by_slot: Vec::new(),
                templates: std::collections::HashMap::new(),
            })),
        }
    }

    /// Match `args` and turn the answer into `{worker: blocks}`.
    fn answer<'py>(&self, py: Python<'py>, model: &str, args: &QueryArgs, mask: u8) -> PyResult<Bound<'py, PyDict>> {
        let (mut found, epoch) = detached(py, || {
            let ix = self.inner.read();
            let mut out = Vec::new();
            args.with_query(model, mask, |q| ix.match_slots(q, &mut out));
            (out, ix.worker_epoch())
        });
        // Clone the cache handle and let go of the mutex at once: building
        // Python objects may run arbitrary code.
        let mut names = self.names.lock().clone();
        if names.epoch != epoch {
            // Workers changed: rebuild the names, and if they changed again
            // since the match, match again under the same read lock.
            let ix = self.inner.read();
            let fresh = Arc::new(Names::of(py, &ix)?);
            if fresh.epoch != epoch {
                args.with_query(model, mask, |q| ix.match_slots(q, &mut found));
            }
            drop(ix);
            names = fresh.clone();
            *self.names.lock() = fresh;
        }
        let Some(template) = names.templates.get(model) else { return Ok(PyDict::new(py)) };
        let d = template.bind(py).copy()?;
        let depths = depth_cache(py);
        for (slot, n) in found {
            if n == 0 {
                continue;
            }
            let Some(Some(name)) = names.by_slot.get(slot as usize) else { continue };
            let big;
            let value = match depths.get(n as usize) {
                Some(v) => v.as_ptr(),
                None => {
                    big = n.into_pyobject(py)?;
                    big.as_ptr()
                }
            };
            // Safety: attached to the interpreter; `d` is a dict we own and
            // `name`/`value` are live objects (held by `names`, the depth
            // cache or `big`) for the whole call. PyDict_SetItem borrows its
            // arguments (no reference is stolen). This is the hot loop of
            // every match, so it skips PyO3's per-call conversions.
            let rc = unsafe { pyo3::ffi::PyDict_SetItem(d.as_ptr(), name.as_ptr(), value) };
            if rc != 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(d)
    }
}

#[pymethods]
impl Index {
    #[new]
    #[pyo3(signature = (capacity_blocks=None))]
    fn new(capacity_blocks: Option<usize>) -> PyResult<Self> {
        Ok(Index::wrap(kvsync_core::Index::new(capacity_blocks).map_err(to_py)?))
    }

    /// Register a worker (one engine event stream) of `model`.
    fn add_worker(&self, worker_id: &str, model: &str) -> PyResult<()> {
        self.inner.write().add_worker(worker_id, model).map_err(to_py)
    }

    /// Remove a worker and purge everything it holds; False if unknown.
    fn remove_worker(&self, py: Python<'_>, worker_id: &str) -> bool {
        detached(py, || self.inner.write().remove_worker(worker_id))
    }

    /// Drop everything a worker holds; it stays registered.
    fn purge_worker(&self, py: Python<'_>, worker_id: &str) -> PyResult<()> {
        detached(py, || self.inner.write().purge_worker(worker_id)).map_err(to_py)
    }

    /// Apply one KVEventBatch payload from `worker_id`'s stream.
    #[pyo3(signature = (worker_id, payload, seq=None))]
    fn apply(&self, py: Python<'_>, worker_id: &str, payload: PyBackedBytes, seq: Option<u64>) -> PyResult<ApplyStats> {
        let data: &[u8] = &payload;
        detached(py, || {
            DECODE_BUFFERS.with(|cell| {
                let mut bufs = cell.take();
                // Decode outside the lock: readers only wait for the apply itself.
                let result =
                    wire::decode_with(data, Mode::Index, &mut bufs).map_err(IndexError::from).and_then(|batch| {
                        let st = self.inner.write().apply_decoded(worker_id, &batch, seq);
                        bufs.recycle(batch);
                        st
                    });
                cell.replace(bufs);
                result
            })
        })
        .map(ApplyStats::from)
        .map_err(to_py)
    }

    /// Apply many payloads of one worker in order under one lock; stops at
    /// the first malformed payload (raising DecodeError naming its position).
    #[pyo3(signature = (worker_id, payloads, first_seq=None))]
    fn apply_many(
        &self,
        py: Python<'_>,
        worker_id: &str,
        payloads: Vec<PyBackedBytes>,
        first_seq: Option<u64>,
    ) -> PyResult<ApplyStats> {
        let slices: Vec<&[u8]> = payloads.iter().map(|p| &**p).collect();
        detached(py, || {
            let mut total = kvsync_core::ApplyStats::default();
            let mut ix = self.inner.write();
            for (i, p) in slices.iter().enumerate() {
                let batch = wire::decode(p, Mode::Index).map_err(|e| IndexError::Decode(e.in_payload(i)))?;
                let seq = first_seq.map(|s| s + i as u64);
                total.add(&ix.apply_decoded(worker_id, &batch, seq)?);
            }
            Ok(total)
        })
        .map(ApplyStats::from)
        .map_err(to_py)
    }

    /// For every worker of `model`: leading full blocks of the prompt it
    /// holds (in any tier, or in `tiers`).
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None, tiers=None))]
    fn r#match<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        token_ids: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        extra_keys: Option<&Bound<'py, PyAny>>,
        tiers: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let args = QueryArgs::parse(token_ids, lora, extra_keys)?;
        let mask = tiers_of(tiers)?;
        self.answer(py, model, &args, mask)
    }

    /// Like `match`, per tier: {worker: {"gpu": n, "cpu": n, "storage": n, "any": n}}.
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None))]
    fn match_detail<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        token_ids: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        extra_keys: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let args = QueryArgs::parse(token_ids, lora, extra_keys)?;
        let d = PyDict::new(py);
        for (name, mask) in
            [("gpu", Tier::Gpu.bit()), ("cpu", Tier::Cpu.bit()), ("storage", Tier::Storage.bit()), ("any", 7)]
        {
            for (w, n) in self.answer(py, model, &args, mask)?.iter() {
                let inner = match d.get_item(&w)? {
                    Some(x) => x.cast_into::<PyDict>()?,
                    None => {
                        let x = PyDict::new(py);
                        d.set_item(&w, &x)?;
                        x
                    }
                };
                inner.set_item(name, n)?;
            }
        }
        Ok(d)
    }

    /// kvsync's prefix keys for the prompt's full blocks (for tools and
    /// debugging); empty until the model's block size is known.
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None))]
    fn prefix_keys(
        &self,
        model: &str,
        token_ids: &Bound<'_, PyAny>,
        lora: Option<&Bound<'_, PyAny>>,
        extra_keys: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<u64>> {
        let args = QueryArgs::parse(token_ids, lora, extra_keys)?;
        let ix = self.inner.read();
        Ok(args.with_query(model, 7, |q| ix.query_keys(q)))
    }

    /// Size of the index: workers, models, blocks, holdings, dormant,
    /// engine_hashes, evictions, capacity_blocks, memory_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.read().stats();
        let d = PyDict::new(py);
        d.set_item("workers", s.workers)?;
        d.set_item("models", s.models)?;
        d.set_item("blocks", s.blocks)?;
        d.set_item("holdings", s.holdings)?;
        d.set_item("dormant", s.dormant)?;
        d.set_item("engine_hashes", s.engine_hashes)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("capacity_blocks", s.capacity_blocks)?;
        d.set_item("memory_bytes", s.memory_bytes)?;
        Ok(d)
    }

    /// Per-worker counters and sizes.
    fn worker_stats<'py>(&self, py: Python<'py>, worker_id: &str) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.read().worker_stats(worker_id).map_err(to_py)?;
        let d = PyDict::new(py);
        d.set_item("model", s.model)?;
        d.set_item("blocks", s.blocks)?;
        d.set_item("engine_hashes", s.engine_hashes)?;
        d.set_item("last_seq", s.last_seq)?;
        let c = s.counters;
        d.set_item("batches", c.batches)?;
        d.set_item("stored", c.stored)?;
        d.set_item("removed", c.removed)?;
        d.set_item("cleared", c.cleared)?;
        d.set_item("skipped", c.skipped)?;
        d.set_item("orphaned", c.orphaned)?;
        d.set_item("unknown_removals", c.unknown_removals)?;
        d.set_item("unknown_events", c.unknown_events)?;
        d.set_item("purges", c.purges)?;
        Ok(d)
    }

    /// {worker_id: model} for every registered worker.
    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (w, m) in self.inner.read().workers() {
            d.set_item(w, m)?;
        }
        Ok(d)
    }

    /// The block size learned from `model`'s events (None until known).
    fn block_size(&self, model: &str) -> Option<u32> {
        self.inner.read().block_size(model)
    }

    /// The last seq applied for the worker (None if never given).
    fn last_seq(&self, worker_id: &str) -> PyResult<Option<u64>> {
        self.inner.read().last_seq(worker_id).map_err(to_py)
    }

    /// Check every internal invariant (O(size); for tests).
    fn check(&self) -> PyResult<()> {
        self.inner.read().check_invariants().map_err(pyo3::exceptions::PyAssertionError::new_err)
    }

    /// Write a snapshot (holdings + last seq per worker) to `path`
    /// atomically (temp file + rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || {
            let tmp = path.with_extension("tmp");
            let file = File::create(&tmp)?;
            let mut w = BufWriter::new(file);
            self.inner.read().save(&mut w).map_err(|e| std::io::Error::other(e.to_string()))?;
            w.flush()?;
            w.get_ref().sync_all()?;
            std::fs::rename(&tmp, &path)
        })
        .map_err(|e| PyOSError::new_err(format!("cannot save index to {}: {e}", path.display())))
    }

    /// Read a snapshot written by `save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Index> {
        let file = File::open(&path)
            .map_err(|e| PyOSError::new_err(format!("cannot open index snapshot {}: {e}", path.display())))?;
        let ix = detached(py, || kvsync_core::Index::load(&mut BufReader::new(file)));
        match ix {
            Ok(ix) => Ok(Index::wrap(ix)),
            Err(IndexError::Snapshot(m)) => Err(SnapshotError::new_err(format!("{}: {m}", path.display()))),
            Err(e) => Err(to_py(e)),
        }
    }

    fn __repr__(&self) -> String {
        let s = self.inner.read().stats();
        format!(
            "Index(workers={}, blocks={}, holdings={}, memory_bytes={})",
            s.workers, s.blocks, s.holdings, s.memory_bytes
        )
    }
}

// ------------------------------------------------------------------ decode

/// One decoded event. Fields a release does not send are None.
#[pyclass(frozen, get_all, module = "kvsync._core")]
struct Event {
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

const EVENT_FIELDS: [&str; 17] = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
    "cache_salt",
    "metadata",
];

#[pymethods]
impl Event {
    /// `{"type": ..., field: value}` with the fields that are not None.
    fn to_dict<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(slf.py());
        d.set_item("type", &slf.get().r#type)?;
        for f in EVENT_FIELDS {
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
struct Batch {
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

fn hash_obj<'py>(py: Python<'py>, h: EngineHash<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match h {
        EngineHash::Unsigned(v) => v.into_pyobject(py)?.into_any(),
        EngineHash::Negative(v) => v.into_pyobject(py)?.into_any(),
        EngineHash::Bytes(b) => PyBytes::new(py, b).into_any(),
    })
}

fn value_obj<'py>(py: Python<'py>, v: &Value<'_>) -> PyResult<Bound<'py, PyAny>> {
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

fn opt_str(s: Option<&str>) -> Option<String> {
    s.map(str::to_owned)
}

/// Decode one payload into a `Batch` (for tools and tests; the index
/// decodes internally without building Python objects).
#[pyfunction]
fn decode(py: Python<'_>, payload: PyBackedBytes) -> PyResult<Batch> {
    let b = wire::decode(&payload, Mode::Full).map_err(|e| DecodeError::new_err(e.to_string()))?;
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

// ---------------------------------------------------------------- streams

/// Status of one worker's event stream.
#[pyclass(frozen, get_all, module = "kvsync._core")]
struct WorkerStatus {
    worker: String,
    state: &'static str,
    last_seq: Option<u64>,
    batches: u64,
    events: u64,
    gaps: u64,
    replays: u64,
    lost_batches: u64,
    resets: u64,
    malformed: u64,
    duplicates: u64,
    purges: u64,
    timeouts: u64,
    buffered: usize,
    /// Seconds since the last applied batch (None before the first).
    seconds_since_last_event: Option<f64>,
}

#[pymethods]
impl WorkerStatus {
    fn __repr__(&self) -> String {
        format!(
            "WorkerStatus({:?}, state={:?}, last_seq={:?}, batches={}, gaps={}, replays={}, lost_batches={}, resets={}, malformed={})",
            self.worker,
            self.state,
            self.last_seq,
            self.batches,
            self.gaps,
            self.replays,
            self.lost_batches,
            self.resets,
            self.malformed
        )
    }
}

fn seq_of(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// The stream state machines of a set of workers, applying into one index
/// (the transport in `kvsync.transport` feeds it what the sockets receive).
/// Each input returns the seq to request a replay from (on a fresh DEALER),
/// or None.
#[pyclass(frozen, module = "kvsync._core")]
struct Streams {
    index: Py<Index>,
    streams: parking_lot::Mutex<std::collections::HashMap<String, kvsync_core::Stream>>,
}

impl Streams {
    /// Run `f` on a worker's stream and the index, detached.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        worker: &str,
        f: impl Send + FnOnce(&mut kvsync_core::Stream, &mut kvsync_core::Index) -> Result<T, IndexError>,
    ) -> PyResult<T> {
        let index = self.index.get();
        detached(py, || {
            let mut streams = self.streams.lock();
            let s = streams.get_mut(worker).ok_or_else(|| IndexError::UnknownWorker(worker.to_owned()))?;
            let mut ix = index.inner.write();
            f(s, &mut ix)
        })
        .map_err(to_py)
    }
}

type OnMessage = fn(
    &mut kvsync_core::Stream,
    &mut kvsync_core::Index,
    &str,
    u64,
    &[u8],
    f64,
) -> Result<kvsync_core::Todo, IndexError>;

impl Streams {
    /// A message with a seq frame: a seq frame that is not 8 bytes is
    /// counted as malformed.
    fn message(
        &self,
        py: Python<'_>,
        worker_id: &str,
        seq: &[u8],
        data: &[u8],
        now: f64,
        on: OnMessage,
    ) -> PyResult<Option<u64>> {
        let seq = seq_of(seq);
        self.with(py, worker_id, |s, ix| match seq {
            Some(seq) => on(s, ix, worker_id, seq, data, now).map(|t| t.replay_from),
            None => {
                s.malformed_frame();
                Ok(None)
            }
        })
    }
}

#[pymethods]
impl Streams {
    #[new]
    fn new(index: Py<Index>) -> Self {
        Streams { index, streams: parking_lot::Mutex::new(std::collections::HashMap::new()) }
    }

    /// Follow worker `worker_id` of `model` (registering it in the index if
    /// needed; a worker already in the index, e.g. from a snapshot, resumes
    /// from its saved position). Call `start` once its publisher is
    /// connected.
    #[pyo3(signature = (worker_id, model, replay=true, replay_timeout=2.0, clean_secs=10.0, max_buffered=100_000))]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        py: Python<'_>,
        worker_id: &str,
        model: &str,
        replay: bool,
        replay_timeout: f64,
        clean_secs: f64,
        max_buffered: usize,
    ) -> PyResult<()> {
        let index = self.index.get();
        detached(py, || {
            let mut ix = index.inner.write();
            ix.add_worker(worker_id, model)?;
            let (last, digest) = ix.position(worker_id)?;
            let cfg = kvsync_core::StreamConfig { replay, replay_timeout, clean_secs, max_buffered };
            let s = kvsync_core::Stream::new(cfg, last, Some(digest));
            self.streams.lock().insert(worker_id.to_owned(), s);
            Ok(())
        })
        .map_err(to_py)
    }

    /// The worker's publisher is connected: begin (replay from the start, or
    /// verify a resumed position). Returns the replay start to request.
    fn start(&self, py: Python<'_>, worker_id: &str, now: f64) -> PyResult<Option<u64>> {
        self.with(py, worker_id, |s, ix| s.start(ix, worker_id, now).map(|t| t.replay_from))
    }

    /// Stop following a worker and purge it from the index.
    fn remove(&self, py: Python<'_>, worker_id: &str) -> bool {
        let index = self.index.get();
        detached(py, || {
            let known = self.streams.lock().remove(worker_id).is_some();
            index.inner.write().remove_worker(worker_id) || known
        })
    }

    fn workers(&self) -> Vec<String> {
        self.streams.lock().keys().cloned().collect()
    }

    /// A live message `[topic, seq, payload]`.
    fn live(
        &self,
        py: Python<'_>,
        worker_id: &str,
        seq: &[u8],
        payload: PyBackedBytes,
        now: f64,
    ) -> PyResult<Option<u64>> {
        self.message(py, worker_id, seq, &payload, now, kvsync_core::Stream::live)
    }

    /// Several live messages of one worker, in arrival order, under one lock
    /// (what the transport drained from the worker's SUB socket at once).
    /// Returns the replay to request, if any.
    fn live_many(
        &self,
        py: Python<'_>,
        worker_id: &str,
        messages: Vec<(Vec<u8>, PyBackedBytes)>,
        now: f64,
    ) -> PyResult<Option<u64>> {
        let msgs: Vec<(Option<u64>, &[u8])> = messages.iter().map(|(seq, p)| (seq_of(seq), &**p)).collect();
        self.with(py, worker_id, |s, ix| {
            let mut replay = None;
            for (seq, data) in msgs {
                match seq {
                    Some(seq) => {
                        if let Some(from) = s.live(ix, worker_id, seq, data, now)?.replay_from {
                            replay = Some(from);
                        }
                    }
                    None => s.malformed_frame(),
                }
            }
            Ok(replay)
        })
    }

    /// A replay reply `(seq, payload)`; the end marker is passed to
    /// `replay_end` instead.
    fn replayed(
        &self,
        py: Python<'_>,
        worker_id: &str,
        seq: &[u8],
        payload: PyBackedBytes,
        now: f64,
    ) -> PyResult<Option<u64>> {
        self.message(py, worker_id, seq, &payload, now, kvsync_core::Stream::replayed)
    }

    fn replay_end(&self, py: Python<'_>, worker_id: &str, now: f64) -> PyResult<Option<u64>> {
        self.with(py, worker_id, |s, ix| s.replay_end(ix, worker_id, now).map(|t| t.replay_from))
    }

    /// The SUB socket reconnected to the publisher.
    fn reconnected(&self, py: Python<'_>, worker_id: &str, now: f64) -> PyResult<Option<u64>> {
        self.with(py, worker_id, |s, ix| s.reconnected(ix, worker_id, now).map(|t| t.replay_from))
    }

    /// Replay deadlines and clean periods: `[(worker_id, replay_from)]` to request.
    fn tick(&self, py: Python<'_>, now: f64) -> PyResult<Vec<(String, u64)>> {
        let index = self.index.get();
        detached(py, || {
            let mut streams = self.streams.lock();
            let mut ix = index.inner.write();
            let mut out = Vec::new();
            for (w, s) in streams.iter_mut() {
                if let Some(from) = s.tick(&mut ix, w, now)?.replay_from {
                    out.push((w.clone(), from));
                }
            }
            Ok(out)
        })
        .map_err(to_py)
    }

    /// Mark a worker's stream stopped (its holdings stay until `remove`).
    fn stop(&self, worker_id: &str) {
        if let Some(s) = self.streams.lock().get_mut(worker_id) {
            s.stop();
        }
    }

    /// `{worker_id: WorkerStatus}`.
    fn status(&self, now: f64) -> std::collections::BTreeMap<String, WorkerStatus> {
        self.streams
            .lock()
            .iter()
            .map(|(w, s)| {
                let c = s.counters();
                let st = WorkerStatus {
                    worker: w.clone(),
                    state: s.state().name(),
                    last_seq: s.last_seq(),
                    batches: c.batches,
                    events: c.events,
                    gaps: c.gaps,
                    replays: c.replays,
                    lost_batches: c.lost,
                    resets: c.resets,
                    malformed: c.malformed,
                    duplicates: c.duplicates,
                    purges: c.purges,
                    timeouts: c.timeouts,
                    buffered: s.buffered(),
                    seconds_since_last_event: s.last_event().map(|t| (now - t).max(0.0)),
                };
                (w.clone(), st)
            })
            .collect()
    }
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DecodeError", m.py().get_type::<DecodeError>())?;
    m.add("SnapshotError", m.py().get_type::<SnapshotError>())?;
    m.add_class::<Index>()?;
    m.add_class::<ApplyStats>()?;
    m.add_class::<Batch>()?;
    m.add_class::<Event>()?;
    m.add_class::<Streams>()?;
    m.add_class::<WorkerStatus>()?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    Ok(())
}
