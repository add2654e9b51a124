//! The `Index` pyclass and the cache of worker names its answers are
//! built from.
//!
//! Every call converts its arguments first, then does the index work
//! detached under one lock acquisition, copies the result out as plain Rust
//! values, releases the lock, and only then builds Python objects (see
//! `lock.rs` for why).

use std::path::PathBuf;
use std::sync::Arc;

use kvsync_core::wire::{self, Mode};
use kvsync_core::{IndexError, Tier};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyDict, PyString};

use crate::convert::{tiers_of, QueryArgs};
use crate::errors::{Error, Result};
use crate::lock::{detached, DetachedMutex, DetachedRwLock};
use crate::results::{stats_dict, worker_stats_dict, ApplyStats};

/// Registered workers as plain Rust values, copied under the read lock.
struct WorkerList {
    epoch: u64,
    slot_count: usize,
    /// (slot, worker id, model)
    workers: Vec<(u32, String, String)>,
}

impl WorkerList {
    fn of(ix: &kvsync_core::Index) -> WorkerList {
        WorkerList {
            epoch: ix.worker_epoch(),
            slot_count: ix.slot_count(),
            workers: ix.worker_slots().map(|(s, id, m)| (s, id.to_owned(), m.to_owned())).collect(),
        }
    }
}

/// Worker ids as Python strings by slot, and per model a template answer
/// `{worker: 0}` in slot order: an answer is a copy of the template with the
/// non-zero depths written in, so no string is created and the dict never
/// resizes during a match.
pub(crate) struct Names {
    /// The index's worker epoch these names are of (None: never built).
    epoch: Option<u64>,
    by_slot: Vec<Option<Py<PyString>>>,
    templates: std::collections::HashMap<String, Py<PyDict>>,
}

impl Names {
    fn empty() -> Names {
        Names { epoch: None, by_slot: Vec::new(), templates: std::collections::HashMap::new() }
    }

    fn of(py: Python<'_>, list: &WorkerList) -> PyResult<Names> {
        let mut by_slot: Vec<Option<Py<PyString>>> = (0..list.slot_count).map(|_| None).collect();
        let mut templates: std::collections::HashMap<String, Py<PyDict>> = std::collections::HashMap::new();
        let zero = 0u32.into_pyobject(py)?;
        for (slot, id, model) in &list.workers {
            let name = PyString::new(py, id);
            let t = templates.entry(model.clone()).or_insert_with(|| PyDict::new(py).unbind());
            t.bind(py).set_item(&name, &zero)?;
            by_slot[*slot as usize] = Some(name.unbind());
        }
        Ok(Names { epoch: Some(list.epoch), by_slot, templates })
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

/// The tiers of `match_detail`, in answer order (None: any tier).
const DETAIL: [(&str, Option<Tier>); 4] =
    [("gpu", Some(Tier::Gpu)), ("cpu", Some(Tier::Cpu)), ("storage", Some(Tier::Storage)), ("any", None)];

/// Depths by worker slot.
type Found = Vec<(u32, u32)>;

/// The exact prefix index (see SPEC section 2).
///
/// Lock order: `inner` before `names`; `Streams` takes its own lock before
/// `inner`. Neither is ever waited for while attached (`lock.rs`).
#[pyclass(frozen, module = "kvsync._core")]
pub(crate) struct Index {
    pub(crate) inner: DetachedRwLock<kvsync_core::Index>,
    names: DetachedMutex<Arc<Names>>,
}

impl Index {
    fn wrap(ix: kvsync_core::Index) -> Index {
        Index { inner: DetachedRwLock::new(ix), names: DetachedMutex::new(Arc::new(Names::empty())) }
    }

    /// `match_scores`, and the prompt's prefix keys when `keys` is set.
    fn scores<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        args: &QueryArgs,
        weights: (f64, f64, f64),
        keys: bool,
    ) -> Result<(Bound<'py, PyDict>, Vec<u64>)> {
        let w = [weights.0, weights.1, weights.2];
        if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(Error::invalid(format!("weights must be finite and >= 0, got {weights:?}")));
        }
        let ((found, prefix), names) = self.find(py, |ix| {
            let mut out = Vec::new();
            let prefix = args.with_query(model, 7, |q| {
                ix.match_scores(q, w, &mut out);
                if keys {
                    ix.query_keys(q)
                } else {
                    Vec::new()
                }
            });
            (out, prefix)
        })?;
        let d = PyDict::new(py);
        for (slot, blocks, value) in found {
            let Some(Some(name)) = names.by_slot.get(slot as usize) else { continue };
            d.set_item(name.bind(py), (blocks, value))?;
        }
        Ok((d, prefix))
    }

    /// Run a query under one read lock (so the answer is of one moment),
    /// with the names of the workers at that moment.
    fn find<T: Send>(
        &self,
        py: Python<'_>,
        query: impl Send + FnOnce(&kvsync_core::Index) -> T,
    ) -> PyResult<(T, Arc<Names>)> {
        let cached = self.names.lock(py).clone();
        let (found, fresh) = self.inner.with_read(py, |ix| {
            let found = query(ix);
            let stale = cached.epoch != Some(ix.worker_epoch());
            (found, stale.then(|| WorkerList::of(ix)))
        });
        let Some(list) = fresh else { return Ok((found, cached)) };
        let names = Arc::new(Names::of(py, &list)?);
        let old = {
            let mut slot = self.names.lock(py);
            // Racing rebuilds: keep the newest (epochs only grow).
            if slot.epoch.is_none_or(|e| e < list.epoch) {
                Some(std::mem::replace(&mut *slot, names.clone()))
            } else {
                None
            }
        };
        drop(old); // outside the mutex: dropping Python objects may run the GC
        Ok((found, names))
    }

    /// `{worker: {"gpu": n, "cpu": n, "storage": n, "any": n}}` for every
    /// worker of `model`, from one walk.
    fn detail<'py>(&self, py: Python<'py>, model: &str, args: &QueryArgs) -> Result<Bound<'py, PyDict>> {
        let (found, names) = self.find(py, |ix| {
            let mut out = Vec::new();
            args.with_query(model, 7, |q| ix.match_tiers(q, &mut out));
            out
        })?;
        let d = PyDict::new(py);
        let Some(template) = names.templates.get(model) else { return Ok(d) };
        for worker in template.bind(py).keys() {
            let per_tier = PyDict::new(py);
            for (tier, _) in DETAIL {
                per_tier.set_item(tier, 0)?;
            }
            d.set_item(worker, per_tier)?;
        }
        for (slot, depths) in found {
            let Some(Some(name)) = names.by_slot.get(slot as usize) else { continue };
            let Some(per_tier) = d.get_item(name.bind(py))? else { continue };
            for ((tier, _), n) in DETAIL.iter().zip(depths) {
                if n != 0 {
                    per_tier.set_item(*tier, n)?;
                }
            }
        }
        Ok(d)
    }

    /// `{worker: leading blocks held in the tiers of mask}` for every worker
    /// of `model`, from one walk.
    fn depths<'py>(&self, py: Python<'py>, model: &str, args: &QueryArgs, mask: u8) -> Result<Bound<'py, PyDict>> {
        let (found, names) = self.find(py, |ix| {
            let mut out = Vec::new();
            args.with_query(model, mask, |q| ix.match_slots(q, &mut out));
            out
        })?;
        Ok(Index::answer(py, &names, model, &found)?)
    }

    /// `{worker: blocks}` for every worker of `model`.
    fn answer<'py>(py: Python<'py>, names: &Names, model: &str, found: &Found) -> PyResult<Bound<'py, PyDict>> {
        let Some(template) = names.templates.get(model) else { return Ok(PyDict::new(py)) };
        let d = template.bind(py).copy()?;
        let depths = depth_cache(py);
        for &(slot, n) in found {
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
    #[pyo3(signature = (capacity_blocks=None, hash_seed=1337))]
    fn new(capacity_blocks: Option<i128>, hash_seed: u64) -> Result<Self> {
        let capacity = capacity_blocks
            .map(|c| {
                usize::try_from(c).map_err(|_| {
                    Error::invalid(format!("capacity_blocks must be a number of blocks >= 1 (or None), got {c}"))
                })
            })
            .transpose()?;
        Ok(Index::wrap(kvsync_core::Index::with_seed(capacity, hash_seed)?))
    }

    /// The seed of this index's standard prefix hashes (saved in snapshots).
    #[getter]
    fn hash_seed(&self, py: Python<'_>) -> u64 {
        self.inner.with_read(py, kvsync_core::Index::hash_seed)
    }

    /// Register a worker (one engine event stream) of `model`.
    fn add_worker(&self, py: Python<'_>, worker_id: &str, model: &str) -> Result<()> {
        Ok(self.inner.write(py).add_worker(worker_id, model)?)
    }

    /// Remove a worker and purge everything it holds; False if unknown.
    /// A worker followed by an EventManager raises WorkerBusyError (remove
    /// its pod from the manager instead).
    fn remove_worker(&self, py: Python<'_>, worker_id: &str) -> Result<bool> {
        Ok(self.inner.with_write(py, |ix| ix.remove_worker(worker_id))?)
    }

    /// Drop everything a worker holds (it stays registered); False if
    /// unknown.
    fn purge_worker(&self, py: Python<'_>, worker_id: &str) -> Result<bool> {
        match self.inner.with_write(py, |ix| ix.purge_worker(worker_id)) {
            Ok(()) => Ok(true),
            Err(IndexError::UnknownWorker(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Apply one KVEventBatch payload from `worker_id`'s stream.
    #[pyo3(signature = (worker_id, payload, seq=None))]
    fn apply(&self, py: Python<'_>, worker_id: &str, payload: PyBackedBytes, seq: Option<u64>) -> Result<ApplyStats> {
        let data: &[u8] = &payload;
        let stats = detached(py, || {
            DECODE_BUFFERS.with(|cell| {
                let mut bufs = cell.take();
                // Decode outside the lock: readers only wait for the apply itself.
                let result =
                    wire::decode_with(data, Mode::Index, &mut bufs).map_err(IndexError::from).and_then(|batch| {
                        let mut ix = self.inner.write_detached();
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
        })?;
        Ok(stats.into())
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
    ) -> Result<ApplyStats> {
        let slices: Vec<&[u8]> = payloads.iter().map(|p| &**p).collect();
        let stats = self.inner.with_write(py, |ix| {
            let mut total = kvsync_core::ApplyStats::default();
            for (i, p) in slices.iter().enumerate() {
                let batch = wire::decode(p, Mode::Index).map_err(|e| IndexError::Decode(e.in_payload(i)))?;
                let seq = first_seq.map(|s| s + i as u64);
                total.add(&ix.apply_decoded(worker_id, &batch, seq)?);
                if let Some(seq) = seq {
                    ix.set_position(worker_id, Some(seq), kvsync_core::payload_digest(p))?;
                }
            }
            Ok::<_, IndexError>(total)
        })?;
        Ok(stats.into())
    }

    /// For every worker of `model`: leading full blocks of the prompt it
    /// holds (in any tier, or in `tiers`). A model no worker serves has no
    /// holders: the answer is `{}`.
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None, tiers=None))]
    fn r#match<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        token_ids: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        extra_keys: Option<&Bound<'py, PyAny>>,
        tiers: Option<&Bound<'py, PyAny>>,
    ) -> Result<Bound<'py, PyDict>> {
        self.depths(py, model, &QueryArgs::parse(token_ids, lora, extra_keys)?, tiers_of(tiers)?)
    }

    /// Like `match`, per tier, all four from one moment:
    /// `{worker: {"gpu": n, "cpu": n, "storage": n, "any": n}}` (`{}` for a
    /// model no worker serves).
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None))]
    fn match_detail<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        token_ids: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        extra_keys: Option<&Bound<'py, PyAny>>,
    ) -> Result<Bound<'py, PyDict>> {
        self.detail(py, model, &QueryArgs::parse(token_ids, lora, extra_keys)?)
    }

    /// Like `match`, for a prompt given as standard `seq` hashes (see
    /// `kvsync.seq_hashes`; blocks without extra keys): the hashes are
    /// looked up in the namespace of `model` and `lora`.
    #[pyo3(signature = (model, seq_hashes, lora=None, tiers=None))]
    fn match_hashes<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        seq_hashes: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        tiers: Option<&Bound<'py, PyAny>>,
    ) -> Result<Bound<'py, PyDict>> {
        self.depths(py, model, &QueryArgs::of_hashes(seq_hashes, lora)?, tiers_of(tiers)?)
    }

    /// `(generation, names)`: the worker ids of `model` in the order
    /// `match_into` writes their depths; valid while `generation` is the
    /// index's worker generation (any worker added or removed changes it).
    fn worker_order(&self, py: Python<'_>, model: &str) -> (u64, Vec<String>) {
        self.inner.with_read(py, |ix| crate::buffer::worker_order(ix, model))
    }

    /// `match` without a dict: writes the depth of `names[i]` (from
    /// `worker_order(model)` of `generation`) into `out[i]`, a writable
    /// uint32 buffer of exactly `len(names)` entries; returns that count.
    /// Raises InvalidArgumentError when the workers changed since.
    #[pyo3(signature = (model, token_ids, out, generation, lora=None, extra_keys=None, tiers=None))]
    #[allow(clippy::too_many_arguments)] // the match arguments plus the buffer and its generation
    fn match_into(
        &self,
        py: Python<'_>,
        model: &str,
        token_ids: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        generation: u64,
        lora: Option<&Bound<'_, PyAny>>,
        extra_keys: Option<&Bound<'_, PyAny>>,
        tiers: Option<&Bound<'_, PyAny>>,
    ) -> Result<usize> {
        let args = QueryArgs::parse(token_ids, lora, extra_keys)?;
        let mask = tiers_of(tiers)?;
        let buf = crate::buffer::out_buffer(out)?;
        let found = self.inner.with_read(py, |ix| args.with_query(model, mask, |q| crate::buffer::depths(ix, q)));
        crate::buffer::write(py, &buf, model, generation, found)
    }

    /// Like `match_detail`, for a prompt given as standard `seq` hashes.
    #[pyo3(signature = (model, seq_hashes, lora=None))]
    fn match_detail_hashes<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        seq_hashes: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
    ) -> Result<Bound<'py, PyDict>> {
        self.detail(py, model, &QueryArgs::of_hashes(seq_hashes, lora)?)
    }

    /// `{worker: (blocks, value)}` for every worker of `model`: the leading
    /// full blocks it holds in any tier and their cached value, each block
    /// counting the weight of the best tier it is held in (`weights` =
    /// `(gpu, cpu, storage)`; SPEC section 7).
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None, weights=(1.0, 0.75, 0.25)), text_signature = "(self, model, token_ids, lora=None, extra_keys=None, weights=(1.0, 0.75, 0.25))")]
    fn match_scores<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        token_ids: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        extra_keys: Option<&Bound<'py, PyAny>>,
        weights: (f64, f64, f64),
    ) -> Result<Bound<'py, PyDict>> {
        Ok(self.scores(py, model, &QueryArgs::parse(token_ids, lora, extra_keys)?, weights, false)?.0)
    }

    /// `(prefix_keys(...), match_scores(...))` from one conversion of the
    /// prompt (a router needs both; an 8k-token list costs more to convert
    /// than to match).
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None, weights=(1.0, 0.75, 0.25)), text_signature = "(self, model, token_ids, lora=None, extra_keys=None, weights=(1.0, 0.75, 0.25))")]
    fn scores_and_keys<'py>(
        &self,
        py: Python<'py>,
        model: &str,
        token_ids: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        extra_keys: Option<&Bound<'py, PyAny>>,
        weights: (f64, f64, f64),
    ) -> Result<(Bound<'py, PyDict>, Vec<u64>)> {
        self.scores(py, model, &QueryArgs::parse(token_ids, lora, extra_keys)?, weights, true)
    }

    /// kvsync's prefix keys for the prompt's full blocks (for tools and
    /// debugging); empty until the model's block size is known.
    #[pyo3(signature = (model, token_ids, lora=None, extra_keys=None))]
    fn prefix_keys(
        &self,
        py: Python<'_>,
        model: &str,
        token_ids: &Bound<'_, PyAny>,
        lora: Option<&Bound<'_, PyAny>>,
        extra_keys: Option<&Bound<'_, PyAny>>,
    ) -> Result<Vec<u64>> {
        let args = QueryArgs::parse(token_ids, lora, extra_keys)?;
        Ok(self.inner.with_read(py, |ix| args.with_query(model, 7, |q| ix.query_keys(q))))
    }

    /// Size of the index: workers, models, blocks, holdings, dormant,
    /// engine_hashes, evictions, capacity_blocks, memory_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.read(py).stats();
        stats_dict(py, &s)
    }

    /// Per-worker counters and sizes.
    fn worker_stats<'py>(&self, py: Python<'py>, worker_id: &str) -> Result<Bound<'py, PyDict>> {
        let s = self.inner.read(py).worker_stats(worker_id)?;
        Ok(worker_stats_dict(py, &s)?)
    }

    /// {worker_id: model} for every registered worker.
    fn workers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let list = self.inner.with_read(py, WorkerList::of);
        let d = PyDict::new(py);
        for (_, w, m) in list.workers {
            d.set_item(w, m)?;
        }
        Ok(d)
    }

    /// The block size learned from `model`'s events (None until known).
    fn block_size(&self, py: Python<'_>, model: &str) -> Option<u32> {
        self.inner.read(py).block_size(model)
    }

    /// The last seq applied for the worker (None if never given).
    fn last_seq(&self, py: Python<'_>, worker_id: &str) -> Result<Option<u64>> {
        Ok(self.inner.read(py).last_seq(worker_id)?)
    }

    /// Check every internal invariant (O(size); for tests); raises
    /// InvariantError naming the first one broken.
    fn check(&self, py: Python<'_>) -> Result<()> {
        self.inner.with_read(py, kvsync_core::Index::check_invariants).map_err(Error::Invariant)
    }

    /// Write a snapshot (holdings + last seq per worker) to `path`
    /// atomically (temp file + rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> Result<u64> {
        Ok(self.inner.with_read(py, |ix| ix.save_to_path(&path))?)
    }

    /// Read a snapshot written by `save`.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> Result<Index> {
        Ok(Index::wrap(detached(py, || kvsync_core::Index::load_from_path(&path))?))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let s = self.inner.read(py).stats();
        format!(
            "Index(workers={}, blocks={}, holdings={}, memory_bytes={})",
            s.workers, s.blocks, s.holdings, s.memory_bytes
        )
    }
}
