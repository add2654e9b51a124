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

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from kvsync.client import Client, ServiceError

__all__ = [
    "AlreadyFollowedError",
    "ApplyStats",
    "Batch",
    "Client",
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
    "ServiceError",
    "SnapshotError",
    "UnknownWorkerError",
    "WorkerBusyError",
    "WorkerStatus",
    "__version__",
    "decode",
    "seq_hashes",
]


def __getattr__(name: str) -> Any:
    # The HTTP client (and httpx) is loaded on first use: `import kvsync`
    # stays fast for users of the library alone.
    if name in ("Client", "ServiceError"):
        from kvsync import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvsync' has no attribute {name!r}")
