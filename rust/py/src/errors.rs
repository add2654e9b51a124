//! The exceptions of `kvsync._core` and the one conversion into them.
//!
//! Every error the bindings raise goes through [`Error`]: core errors
//! convert into it with `?` (`From<IndexError>`), and it converts into the
//! Python exception with `?` (`From<Error> for PyErr`). The classes
//! themselves are defined in `errors.py` (each has two bases, see there).

use std::ffi::CString;

use kvsync_core::{DecodeError as CoreDecodeError, IndexError};
use pyo3::call::PyCallArgs;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyType};

/// The exception classes, created once by [`add_to_module`].
struct Classes {
    error: Py<PyType>,
    decode: Py<PyType>,
    snapshot: Py<PyType>,
    unknown_worker: Py<PyType>,
    invalid_argument: Py<PyType>,
    file: Py<PyType>,
    worker_busy: Py<PyType>,
    already_followed: Py<PyType>,
    invariant: Py<PyType>,
}

/// Python names of the classes, in the order of [`Classes`].
const NAMES: [&str; 9] = [
    "Error",
    "DecodeError",
    "SnapshotError",
    "UnknownWorkerError",
    "InvalidArgumentError",
    "FileError",
    "WorkerBusyError",
    "AlreadyFollowedError",
    "InvariantError",
];

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || {
        let source = CString::new(include_str!("errors.py")).expect("errors.py has no NUL");
        let globals = PyDict::new(py);
        globals.set_item("__name__", "kvsync._core")?;
        py.run(&source, Some(&globals), None)?;
        let class = |name: &str| -> PyResult<Py<PyType>> {
            Ok(globals.get_item(name)?.expect("defined in errors.py").cast_into::<PyType>()?.unbind())
        };
        Ok(Classes {
            error: class(NAMES[0])?,
            decode: class(NAMES[1])?,
            snapshot: class(NAMES[2])?,
            unknown_worker: class(NAMES[3])?,
            invalid_argument: class(NAMES[4])?,
            file: class(NAMES[5])?,
            worker_busy: class(NAMES[6])?,
            already_followed: class(NAMES[7])?,
            invariant: class(NAMES[8])?,
        })
    })
}

/// Add every exception class to the module.
pub(crate) fn add_to_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let c = classes(m.py())?;
    let all = [
        &c.error,
        &c.decode,
        &c.snapshot,
        &c.unknown_worker,
        &c.invalid_argument,
        &c.file,
        &c.worker_busy,
        &c.already_followed,
        &c.invariant,
    ];
    for (name, class) in NAMES.iter().zip(all) {
        m.add(*name, class.bind(m.py()))?;
    }
    Ok(())
}

/// Every error the bindings raise.
#[derive(Debug)]
pub(crate) enum Error {
    /// From the core (decode, unknown worker, snapshot, ...).
    Core(IndexError),
    /// `Index.check` found a broken invariant.
    Invariant(String),
    /// Already a Python exception (argument conversion).
    Python(PyErr),
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An argument that is out of range: `InvalidArgumentError`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::Core(IndexError::Invalid(message.into()))
    }
}

impl From<IndexError> for Error {
    fn from(e: IndexError) -> Self {
        Error::Core(e)
    }
}

impl From<CoreDecodeError> for Error {
    fn from(e: CoreDecodeError) -> Self {
        Error::Core(IndexError::Decode(e))
    }
}

impl From<PyErr> for Error {
    fn from(e: PyErr) -> Self {
        Error::Python(e)
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| e.into_py_err(py))
    }
}

impl Error {
    fn into_py_err(self, py: Python<'_>) -> PyErr {
        let c = match classes(py) {
            Ok(c) => c,
            Err(e) => return e,
        };
        match self {
            Error::Python(e) => e,
            Error::Invariant(m) => raise(c.invariant.bind(py), (format!("index invariant broken: {m}"),)),
            Error::Core(core) => match core {
                IndexError::Decode(d) => {
                    raise(c.decode.bind(py), (d.to_string(), d.reason, d.event, d.field, d.offset, d.payload))
                }
                // KeyError's message: Python quoting, as `d[k]` would show it.
                IndexError::UnknownWorker(w) => match PyString::new(py, &w).repr() {
                    Ok(w) => raise(c.unknown_worker.bind(py), (format!("unknown worker {w}"),)),
                    Err(e) => e,
                },
                IndexError::ModelMismatch { .. } | IndexError::Invalid(_) => {
                    raise(c.invalid_argument.bind(py), (core.to_string(),))
                }
                IndexError::Snapshot(_) => raise(c.snapshot.bind(py), (core.to_string(),)),
                IndexError::Io { path, message, errno } => raise(c.file.bind(py), (errno, message, path)),
                IndexError::Followed(_) => raise(c.worker_busy.bind(py), (core.to_string(),)),
                IndexError::AlreadyFollowed(_) => raise(c.already_followed.bind(py), (core.to_string(),)),
            },
        }
    }
}

/// An instance of `class` made from `args` (made now, not lazily, so the
/// class's `__init__` sees every argument), as the error to raise.
fn raise<'py>(class: &Bound<'py, PyType>, args: impl PyCallArgs<'py>) -> PyErr {
    match class.call1(args) {
        Ok(instance) => PyErr::from_value(instance),
        Err(e) => e,
    }
}
