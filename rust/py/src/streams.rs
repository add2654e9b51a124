//! `Streams`: the Python face of the event streams the core index follows
//! (one per worker; their status records are `results::WorkerStatus`). The
//! stream state lives in the core index, so every call takes the index's
//! one lock (`Index.inner`), detached (`lock.rs`).

use std::collections::BTreeMap;

use kvsync_core::{IndexError, StreamConfig, Todo};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::errors::Result;
use crate::index::Index;
use crate::results::WorkerStatus;

pub(crate) fn seq_of(frame: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(frame).ok().map(u64::from_be_bytes)
}

/// The event streams of a set of workers, applying into one index (the
/// transport in `kvsync.transport` feeds it what the sockets receive). Each
/// input returns the seq to request a replay from (on a fresh DEALER), or
/// None. Unknown (or no longer followed) workers raise KeyError.
#[pyclass(frozen, module = "kvsync._core")]
pub(crate) struct Streams {
    index: Py<Index>,
}

impl Streams {
    /// Run `f` on the core index under its write lock, detached.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl Send + FnOnce(&mut kvsync_core::Index) -> std::result::Result<T, IndexError>,
    ) -> Result<T> {
        Ok(self.index.get().inner.with_write(py, f)?)
    }
}

fn from(t: Todo) -> Option<u64> {
    t.replay_from
}

#[pymethods]
impl Streams {
    #[new]
    fn new(index: Py<Index>) -> Self {
        Streams { index }
    }

    /// Follow worker `worker_id` of `model` (registering it in the index if
    /// needed; a worker already in the index, e.g. from a snapshot, resumes
    /// from its saved position). Call `start` once its publisher is
    /// connected. Raises ValueError if the worker is already followed.
    #[pyo3(signature = (
        worker_id, model, replay=true, replay_timeout=2.0, clean_secs=10.0, max_buffered=100_000,
        max_buffered_bytes=268_435_456, dead_after=10.0, idle_probe=3.0, replay_max=30.0
    ))]
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
        max_buffered_bytes: usize,
        dead_after: f64,
        idle_probe: f64,
        replay_max: f64,
    ) -> Result<()> {
        let config = StreamConfig {
            replay,
            replay_timeout,
            replay_max,
            clean_secs,
            max_buffered,
            max_buffered_bytes,
            dead_after,
            idle_probe,
        };
        self.with(py, |ix| ix.follow(worker_id, model, config))
    }

    /// The worker's publisher is connected: begin (replay from the start, or
    /// verify a resumed position). Returns the replay start to request.
    fn start(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<Option<u64>> {
        self.with(py, |ix| ix.stream_start(worker_id, now).map(from))
    }

    /// Stop following a worker and remove it (with its holdings) from the
    /// index. False if it was not there.
    fn remove(&self, py: Python<'_>, worker_id: &str) -> Result<bool> {
        self.with(py, |ix| Ok(ix.unfollow(worker_id)))
    }

    /// The followed workers.
    fn workers(&self, py: Python<'_>) -> Result<Vec<String>> {
        self.with(py, |ix| Ok(ix.streams().map(|(w, _)| w.to_owned()).collect()))
    }

    /// A live message `[topic, seq, payload]` (a seq frame that is not 8
    /// bytes is counted as malformed).
    fn live(
        &self,
        py: Python<'_>,
        worker_id: &str,
        seq: &[u8],
        payload: PyBackedBytes,
        now: f64,
    ) -> Result<Option<u64>> {
        let seq = seq_of(seq);
        self.with(py, |ix| ix.stream_live(worker_id, seq, &payload, now).map(from))
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
        self.with(py, |ix| ix.stream_live_many(worker_id, msgs, now).map(from))
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
        let seq = seq_of(seq);
        self.with(py, |ix| ix.stream_replayed(worker_id, seq, &payload, now).map(from))
    }

    fn replay_end(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<Option<u64>> {
        self.with(py, |ix| ix.stream_replay_end(worker_id, now).map(from))
    }

    /// The SUB socket (re)connected to the publisher: call on every
    /// reconnect, also while a replay runs.
    fn reconnected(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<Option<u64>> {
        self.with(py, |ix| ix.stream_reconnected(worker_id, now).map(from))
    }

    /// The publisher connection dropped (state `disconnected`; purged after
    /// `dead_after` seconds unless it reconnects).
    fn disconnected(&self, py: Python<'_>, worker_id: &str, now: f64) -> Result<()> {
        self.with(py, |ix| ix.stream_disconnected(worker_id, now))
    }

    /// Replay deadlines, dead workers, idle probes and clean periods:
    /// `[(worker_id, replay_from)]` to request.
    fn tick(&self, py: Python<'_>, now: f64) -> Result<Vec<(String, u64)>> {
        self.with(py, |ix| ix.stream_tick(now))
    }

    /// Mark a worker's stream stopped (its holdings stay until `remove`).
    fn stop(&self, py: Python<'_>, worker_id: &str) -> Result<()> {
        self.with(py, |ix| match ix.stream_stop(worker_id) {
            Err(IndexError::UnknownWorker(_)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        })
    }

    /// `{worker_id: WorkerStatus}`.
    fn status(&self, py: Python<'_>, now: f64) -> Result<BTreeMap<String, WorkerStatus>> {
        self.with(py, |ix| Ok(ix.streams().map(|(w, s)| (w.to_owned(), WorkerStatus::of(w, s, now))).collect()))
    }
}
