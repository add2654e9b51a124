"""kvsync: exact KV-cache event synchronization for vLLM and SGLang fleets.

The index and the wire decoder are in Rust (``kvsync._core``); this package
re-exports them and adds the command line (``kvsync``).
"""

from kvsync._core import (
    ApplyStats,
    Batch,
    DecodeError,
    Event,
    Index,
    SnapshotError,
    WorkerStatus,
    __version__,
    decode,
)
from kvsync.transport import EventManager, Pod

__all__ = [
    "ApplyStats",
    "Batch",
    "DecodeError",
    "Event",
    "EventManager",
    "Index",
    "Pod",
    "SnapshotError",
    "WorkerStatus",
    "__version__",
    "decode",
]
