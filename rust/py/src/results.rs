//! Result records handed back to Python (`ApplyStats`, `WorkerStatus`) and
//! the dicts of `Index.stats()`/`worker_stats()`.
//!
//! Each record is declared once, as a field list: [`record!`] derives the
//! frozen pyclass with its getters, value equality, a Python-style
//! `__repr__` and `to_dict` from it, so adding a field is one line.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A frozen pyclass of plain fields with `__eq__`, `__repr__`, `to_dict`.
macro_rules! record {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[pyclass(frozen, eq, get_all, module = "kvsync._core")]
        #[derive(Clone, Debug, PartialEq)]
        pub(crate) struct $name {
            $($(#[$fdoc])* pub(crate) $field: $ty,)*
        }

        #[pymethods]
        impl $name {
            /// `Name(field=value, ...)` with Python reprs of the values.
            fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
                let fields = [$(
                    format!(concat!(stringify!($field), "={}"), Clone::clone(&self.$field).into_pyobject(py)?.repr()?),
                )*];
                Ok(format!(concat!(stringify!($name), "({})"), fields.join(", ")))
            }

            /// `{field: value}` in declaration order.
            #[allow(clippy::wrong_self_convention)] // Python's naming, not Rust's
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $(d.set_item(stringify!($field), Clone::clone(&self.$field))?;)*
                Ok(d)
            }
        }
    };
}

/// A dict of the named fields of a plain Rust value, in the order given.
macro_rules! fields_dict {
    ($py:expr, $value:expr, [$($field:ident),* $(,)?]) => {{
        let d = PyDict::new($py);
        let v = &$value;
        $(d.set_item(stringify!($field), Clone::clone(&v.$field))?;)*
        d
    }};
}

record! {
    /// What one `Index.apply` did, counted in block events.
    ApplyStats {
        stored: u64,
        removed: u64,
        cleared: u64,
        skipped: u64,
        orphaned: u64,
        ignored: u64,
        unknown_removals: u64,
        unknown_events: u64,
        /// Stored blocks whose block size disagreed with the model's (also
        /// counted in `ignored`).
        block_size_mismatch: u64,
    }
}

impl From<kvsync_core::ApplyStats> for ApplyStats {
    fn from(s: kvsync_core::ApplyStats) -> Self {
        let kvsync_core::ApplyStats {
            stored,
            removed,
            cleared,
            skipped,
            orphaned,
            ignored,
            unknown_removals,
            unknown_events,
            block_size_mismatch,
        } = s;
        ApplyStats {
            stored,
            removed,
            cleared,
            skipped,
            orphaned,
            ignored,
            unknown_removals,
            unknown_events,
            block_size_mismatch,
        }
    }
}

record! {
    /// Status of one worker's event stream.
    WorkerStatus {
        worker: String,
        /// connecting, replaying, live, degraded, disconnected or stopped.
        state: &'static str,
        last_seq: Option<u64>,
        batches: u64,
        events: u64,
        gaps: u64,
        /// Live seqs that never arrived on the live stream.
        dropped: u64,
        replays: u64,
        lost_batches: u64,
        resets: u64,
        malformed: u64,
        duplicates: u64,
        purges: u64,
        timeouts: u64,
        abandoned: u64,
        overflows: u64,
        disconnects: u64,
        buffered: usize,
        buffered_bytes: usize,
        /// Seconds since the last applied batch (None before the first).
        seconds_since_last_event: Option<f64>,
        /// Seconds since the publisher disconnected (None while connected).
        seconds_disconnected: Option<f64>,
    }
}

impl WorkerStatus {
    /// The status of `stream` (worker `worker`) at time `now`.
    pub(crate) fn of(worker: &str, stream: &kvsync_core::Stream, now: f64) -> WorkerStatus {
        let c = stream.counters();
        let (buffered, buffered_bytes) = stream.buffered();
        WorkerStatus {
            worker: worker.to_owned(),
            state: stream.state().name(),
            last_seq: stream.last_seq(),
            batches: c.batches,
            events: c.events,
            gaps: c.gaps,
            dropped: c.dropped,
            replays: c.replays,
            lost_batches: c.lost,
            resets: c.resets,
            malformed: c.malformed,
            duplicates: c.duplicates,
            purges: c.purges,
            timeouts: c.timeouts,
            abandoned: c.abandoned,
            overflows: c.overflows,
            disconnects: c.disconnects,
            buffered,
            buffered_bytes,
            seconds_since_last_event: stream.last_event().map(|t| (now - t).max(0.0)),
            seconds_disconnected: stream.disconnected_at().map(|t| (now - t).max(0.0)),
        }
    }
}

/// `Index.stats()` as a dict.
pub(crate) fn stats_dict<'py>(py: Python<'py>, s: &kvsync_core::Stats) -> PyResult<Bound<'py, PyDict>> {
    Ok(fields_dict!(
        py,
        s,
        [workers, models, blocks, holdings, dormant, engine_hashes, evictions, capacity_blocks, memory_bytes]
    ))
}

/// `Index.worker_stats()` as a dict: the summary, then the counters.
pub(crate) fn worker_stats_dict<'py>(py: Python<'py>, s: &kvsync_core::WorkerStats) -> PyResult<Bound<'py, PyDict>> {
    let d = fields_dict!(py, s, [model, blocks, engine_hashes, last_seq]);
    let counters = fields_dict!(
        py,
        s.counters,
        [
            batches,
            stored,
            removed,
            cleared,
            skipped,
            orphaned,
            unknown_removals,
            unknown_events,
            block_size_mismatch,
            purges
        ]
    );
    d.update(counters.as_mapping())?;
    Ok(d)
}
