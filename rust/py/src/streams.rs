//! `Streams`: the stream state machines of a set of workers applying into
//! one index (their status records are `results::WorkerStatus`).
//!
//! Lock order: the streams lock, then the index lock (`Index.inner`), in
//! every method; both are taken detached (`lock.rs`).

use std::collections::{BTreeMap, HashMap};

use kvsync_core::IndexError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::errors::Result;
use crate::index::Index;
use crate::lock::{detached, DetachedMutex};
use crate::results::WorkerStatus;

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
    streams: DetachedMutex<HashMap<String, kvsync_core::Stream>>,
}

impl Streams {
    /// Run `f` on a worker's stream and the index, detached.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        worker: &str,
        f: impl Send + FnOnce(&mut kvsync_core::Stream, &mut kvsync_core::Index) -> std::result::Result<T, IndexError>,
    ) -> Result<T> {
        let index = self.index.get();
        Ok(detached(py, || {
            let mut streams = self.streams.lock_detached();
            let s = streams.get_mut(worker).ok_or_else(|| IndexError::UnknownWorker(worker.to_owned()))?;
            let mut ix = index.inner.write_detached();
            f(s, &mut ix)
        })?)
    }
}

pub(crate) type OnMessage = fn(
    &mut kvsync_core::Stream,
    &mut kvsync_core::Index,
    &str,
    u64,
    &[u8],
    f64,
) -> std::result::Result<kvsync_core::Todo, IndexError>;

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
    ) -> Result<Option<u64>> {
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
        Streams { index, streams: DetachedMutex::new(HashMap::new()) }
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
    ) -> Result<()> {
        let index = self.index.get();
        detached(py, || {
            let mut streams = self.streams.lock_detached();
            let mut ix = index.inner.write_detached();
            ix.add_worker(worker_id, model)?;
            let (last, digest) = ix.position(worker_id)?;
            let cfg = kvsync_core::StreamConfig { replay, replay_timeout, clean_secs, max_buffered };
            streams.insert(worker_id.to_owned(), kvsync_core::Stream::new(cfg, last, Some(digest)));
            Ok::<_, IndexError>(())
        })?;
        Ok(())
    }

    /// The worker's publisher is connected: begin (replay from the start, or
    /// verify a resumed position). Returns the replay start to request.
    fn start(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<Option<u64>> {
        self.with(py, worker_id, |s, ix| s.start(ix, worker_id, now).map(|t| t.replay_from))
    }

    /// Stop following a worker and purge it from the index.
    fn remove(&self, py: Python<'_>, worker_id: &str) -> bool {
        let index = self.index.get();
        detached(py, || {
            let mut streams = self.streams.lock_detached();
            let known = streams.remove(worker_id).is_some();
            index.inner.write_detached().remove_worker(worker_id) || known
        })
    }

    fn workers(&self, py: Python<'_>) -> Vec<String> {
        detached(py, || self.streams.lock_detached().keys().cloned().collect())
    }

    /// A live message `[topic, seq, payload]`.
    fn live(
        &self,
        py: Python<'_>,
        worker_id: &str,
        seq: &[u8],
        payload: PyBackedBytes,
        now: f64,
    ) -> Result<Option<u64>> {
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
    ) -> Result<Option<u64>> {
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
    ) -> Result<Option<u64>> {
        self.message(py, worker_id, seq, &payload, now, kvsync_core::Stream::replayed)
    }

    fn replay_end(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<Option<u64>> {
        self.with(py, worker_id, |s, ix| s.replay_end(ix, worker_id, now).map(|t| t.replay_from))
    }

    /// The SUB socket reconnected to the publisher.
    fn reconnected(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<Option<u64>> {
        self.with(py, worker_id, |s, ix| s.reconnected(ix, worker_id, now).map(|t| t.replay_from))
    }

    /// Replay deadlines and clean periods: `[(worker_id, replay_from)]` to request.
    fn tick(&self, py: Python<'_>, now: f64) -> Result<Vec<(String, u64)>> {
        let index = self.index.get();
        Ok(detached(py, || {
            let mut streams = self.streams.lock_detached();
            let mut ix = index.inner.write_detached();
            let mut out = Vec::new();
            for (w, s) in streams.iter_mut() {
                if let Some(from) = s.tick(&mut ix, w, now)?.replay_from {
                    out.push((w.clone(), from));
                }
            }
            Ok::<_, IndexError>(out)
        })?)
    }

    /// Mark a worker's stream stopped (its holdings stay until `remove`).
    fn stop(&self, py: Python<'_>, worker_id: &str) {
        detached(py, || {
            if let Some(s) = self.streams.lock_detached().get_mut(worker_id) {
                s.stop();
            }
        });
    }

    /// `{worker_id: WorkerStatus}`.
    fn status(&self, py: Python<'_>, now: f64) -> BTreeMap<String, WorkerStatus> {
        detached(py, || {
            let streams = self.streams.lock_detached();
            streams.iter().map(|(w, s)| (w.clone(), WorkerStatus::of(w, s, now))).collect()
        })
    }
}
