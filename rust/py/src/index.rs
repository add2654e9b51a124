//! The `Index` pyclass and the cache of worker names its answers are
//! built from.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use kvsync_core::wire::{self, Mode};
use kvsync_core::{IndexError, Tier};
use parking_lot::RwLock;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyDict, PyString};

use crate::convert::{tiers_of, QueryArgs};
use crate::errors::{to_py, SnapshotError};
use crate::lock::detached;
use crate::results::ApplyStats;

/// Worker ids as Python strings by slot, and per model a template answer
/// `{worker: 0}` in slot order: an answer is a copy of the template with the
/// non-zero depths written in, so no string is created and the dict never
/// resizes during a match.
pub(crate) struct Names {
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
pub(crate) static DEPTHS: pyo3::sync::PyOnceLock<Vec<Py<PyAny>>> = pyo3::sync::PyOnceLock::new();
pub(crate) const CACHED_DEPTHS: u32 = 8192;

pub(crate) fn depth_cache(py: Python<'_>) -> &[Py<PyAny>] {
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
pub(crate) struct Index {
    pub(crate) inner: RwLock<kvsync_core::Index>,
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
    fn remove_worker(&self, py: Python<'_>, worker_id: &str) -> PyResult<bool> {
        detached(py, || self.inner.write().remove_worker(worker_id)).map_err(to_py)
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
                        let mut ix = self.inner.write();
                        let st = ix.apply_decoded(worker_id, &batch, seq);
                        if let (Ok(_), Some(seq)) = (&st, seq) {
                            // The position a resumed stream checks: seq and payload digest.
                            ix.set_position(worker_id, Some(seq), kvsync_core::payload_digest(data))?;
                        }
                        drop(ix);
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
                if let Some(seq) = seq {
                    ix.set_position(worker_id, Some(seq), kvsync_core::payload_digest(p))?;
                }
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
