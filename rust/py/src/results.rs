//! Result objects handed back to Python (`ApplyStats`).

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// What one `Index.apply` did, counted in block events.
#[pyclass(frozen, get_all, module = "kvsync._core")]
#[derive(Clone, Copy)]
pub(crate) struct ApplyStats {
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
