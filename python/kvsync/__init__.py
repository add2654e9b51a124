"""kvsync: exact KV-cache event synchronization for vLLM and SGLang fleets.

The index and the wire decoder are in Rust (``kvsync._core``); this package
re-exports them and adds the command line (``kvsync``).

Every error kvsync raises is a ``kvsync.Error`` and also the builtin
exception callers already catch (``DecodeError`` is a ``ValueError``,
``UnknownWorkerError`` a ``KeyError``, ``FileError`` an ``OSError``, ...).
"""

from kvsync._core import (
    AlreadyFollowedError,
    ApplyStats,
    Batch,
    DecodeError,
    Error,
    Event,
    FileError,
    Index,
    InvalidArgumentError,
    InvariantError,
    SnapshotError,
    UnknownWorkerError,
    WorkerBusyError,
    WorkerStatus,
    __version__,
    decode,
    seq_hashes,
)
from kvsync.transport import EventManager, Pod

__all__ = [
    "AlreadyFollowedError",
    "ApplyStats",
    "Batch",
    "DecodeError",
    "Error",
    "Event",
    "EventManager",
    "FileError",
    "Index",
    "InvalidArgumentError",
    "InvariantError",
    "Pod",
    "SnapshotError",
    "UnknownWorkerError",
    "WorkerBusyError",
    "WorkerStatus",
    "__version__",
    "decode",
    "seq_hashes",
]
