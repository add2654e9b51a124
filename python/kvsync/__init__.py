"""kvsync: exact KV-cache event synchronization for vLLM and SGLang fleets.

The index and the wire decoder are in Rust (``kvsync._core``); this package
re-exports them and adds the transport (``EventManager``), discovery
(``kvsync.discovery``), routing (``Router``) and the command line
(``kvsync``).

Every error kvsync raises is a ``kvsync.Error`` and also the builtin
exception callers already catch (``DecodeError`` is a ``ValueError``,
``UnknownWorkerError`` a ``KeyError``, ``FileError`` an ``OSError``,
``NoWorkersError`` a ``LookupError``, ...).
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
from kvsync.errors import NoEligibleWorkerError, NoWorkersError
from kvsync.routing import Route, Router, Score
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
    "NoEligibleWorkerError",
    "NoWorkersError",
    "Pod",
    "Route",
    "Router",
    "Score",
    "SnapshotError",
    "UnknownWorkerError",
    "WorkerBusyError",
    "WorkerStatus",
    "__version__",
    "decode",
    "seq_hashes",
]
