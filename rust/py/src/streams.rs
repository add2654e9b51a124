//! `Streams`: the stream state machines of a set of workers applying into
//! one index, and `WorkerStatus`.

use kvsync_core::IndexError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::errors::to_py;
use crate::index::Index;
use crate::lock::detached;

/// Status of one worker's event stream.
#[pyclass(frozen, get_all, module = "kvsync._core")]
pub(crate) struct WorkerStatus {
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

pub(crate) fn seq_of(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// The stream state machines of a set of workers, applying into one index
/// (the transport in `kvsync.transport` feeds it what the sockets receive).
/// Each input returns the seq to request a replay from (on a fresh DEALER),
/// or None.
#[pyclass(frozen, module = "kvsync._core")]
pub(crate) struct Streams {
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

pub(crate) type OnMessage = fn(
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
