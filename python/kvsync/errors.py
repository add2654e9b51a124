"""Errors raised by kvsync's Python layers (routing). The core's errors are
defined in Rust (``kvsync._core``); these derive from the same
``kvsync.Error`` and from the builtin exception callers already catch."""

from __future__ import annotations

from kvsync._core import Error

__all__ = ["NoEligibleWorkerError", "NoWorkersError"]


class NoWorkersError(Error, LookupError):
    """No worker serves the requested model (HTTP 404 in the service)."""


class NoEligibleWorkerError(Error, RuntimeError):
    """Workers serve the model but none may be chosen now (not ready,
    disconnected or stopped, or not among the candidates); the message says
    why for each (HTTP 503 in the service)."""
