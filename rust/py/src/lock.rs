//! Locks that never wait while attached to the interpreter.
//!
//! A thread that blocks on a lock while attached keeps the GIL (or, on
//! free-threaded builds, holds up stop-the-world GC) for as long as it
//! waits: every other Python thread stops with it, and if the lock's holder
//! needs the interpreter to finish, nothing moves again. So every lock of
//! the bindings is one of these: `read`/`write`/`lock` try once, and only
//! if that fails detach from the interpreter to wait.
//!
//! The second half of the discipline is on the callers: while a guard is
//! held, no Python object is created or dropped (that can run the GC and
//! with it arbitrary finalizers, which may call back into the index on this
//! thread). Results are copied out as plain Rust values, the guard is
//! dropped, and only then are Python objects built.
//!
//! Lock order (the only order any code path takes them in):
//! `Index.inner` (which also holds every worker's stream state) before
//! `Index.names`.

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use pyo3::prelude::*;

/// Run `f` detached from the interpreter (the real work of every call).
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl Send + FnOnce() -> T) -> T {
    py.detach(f)
}

/// A reader-writer lock whose waits happen detached from the interpreter.
pub(crate) struct DetachedRwLock<T>(RwLock<T>);

impl<T: Send + Sync> DetachedRwLock<T> {
    pub(crate) fn new(value: T) -> Self {
        DetachedRwLock(RwLock::new(value))
    }

    /// Shared access; waits (if it must) detached.
    pub(crate) fn read(&self, py: Python<'_>) -> RwLockReadGuard<'_, T> {
        match self.0.try_read() {
            Some(g) => g,
            None => py.detach(|| self.0.read()),
        }
    }

    /// Exclusive access; waits (if it must) detached.
    pub(crate) fn write(&self, py: Python<'_>) -> RwLockWriteGuard<'_, T> {
        match self.0.try_write() {
            Some(g) => g,
            None => py.detach(|| self.0.write()),
        }
    }

    /// Run `f` on shared access, all of it detached.
    pub(crate) fn with_read<R: Send>(&self, py: Python<'_>, f: impl Send + FnOnce(&T) -> R) -> R {
        py.detach(|| f(&self.0.read()))
    }

    /// Run `f` on exclusive access, all of it detached.
    pub(crate) fn with_write<R: Send>(&self, py: Python<'_>, f: impl Send + FnOnce(&mut T) -> R) -> R {
        py.detach(|| f(&mut self.0.write()))
    }

    /// Exclusive access for code that is already detached.
    pub(crate) fn write_detached(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write()
    }
}

/// A mutex whose waits happen detached from the interpreter.
pub(crate) struct DetachedMutex<T>(Mutex<T>);

impl<T: Send> DetachedMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        DetachedMutex(Mutex::new(value))
    }

    /// The lock; waits (if it must) detached.
    pub(crate) fn lock(&self, py: Python<'_>) -> MutexGuard<'_, T> {
        match self.0.try_lock() {
            Some(g) => g,
            None => py.detach(|| self.0.lock()),
        }
    }
}
