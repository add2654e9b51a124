"""Type stubs for the Rust extension ``kvsync._core``."""

from collections.abc import Iterable, Sequence
from os import PathLike
from typing import Any, TypedDict, final

from typing_extensions import Buffer

__all__ = [
    "DEFAULT_HASH_SEED",
    "EVENT_FIELDS",
    "EVENT_TYPES",
    "AlreadyFollowedError",
    "ApplyStats",
    "Batch",
    "DecodeError",
    "Error",
    "Event",
    "FileError",
    "Index",
    "InvalidArgumentError",
    "InvariantError",
    "SnapshotError",
    "Streams",
    "UnknownWorkerError",
    "WorkerBusyError",
    "WorkerStatus",
    "__version__",
    "decode",
    "seq_hashes",
]

__version__: str
EVENT_FIELDS: tuple[str, ...]
"""Every field name a decoded ``Event`` exposes (the protocol's, defined once in the core)."""
EVENT_TYPES: tuple[str, ...]
"""The event type tags the decoder knows."""

TokenIds = Sequence[int] | Buffer
ExtraKeys = Sequence[Sequence[Any] | None]
Lora = str | int | None
SeqHashes = Sequence[int] | Buffer

class IndexStats(TypedDict):
    workers: int
    models: int
    blocks: int
    holdings: int
    dormant: int
    engine_hashes: int
    evictions: int
    capacity_blocks: int | None
    memory_bytes: int

class IndexWorkerStats(TypedDict):
    model: str
    blocks: int
    engine_hashes: int
    last_seq: int | None
    batches: int
    stored: int
    removed: int
    cleared: int
    skipped: int
    orphaned: int
    unknown_removals: int
    unknown_events: int
    purges: int

class Error(Exception):
    """Base class of every error kvsync raises."""

class DecodeError(Error, ValueError):
    """A payload that is not a well-formed KVEventBatch.

    ``reason`` says what was wrong; ``event``, ``field``, ``offset`` (byte)
    and ``payload`` (position in a multi-payload call) where, when known.
    """

    reason: str
    event: int | None
    field: str | None
    offset: int | None
    payload: int | None
    def __init__(
        self,
        message: str,
        reason: str | None = None,
        event: int | None = None,
        field: str | None = None,
        offset: int | None = None,
        payload: int | None = None,
    ) -> None: ...

class SnapshotError(Error, ValueError):
    """An index snapshot that cannot be read (the message names the file)."""

class UnknownWorkerError(Error, KeyError):
    """A worker id the index does not know."""

class InvalidArgumentError(Error, ValueError):
    """An argument out of range, or a worker registered for another model."""

class FileError(Error, OSError):
    """A snapshot file that cannot be written or read (``filename`` names it)."""

class WorkerBusyError(Error, RuntimeError):
    """The worker is followed by an event stream; change it through the stream."""

class AlreadyFollowedError(Error, ValueError):
    """The worker id is already followed by an event stream."""

class InvariantError(Error, AssertionError):
    """Index.check() found a broken internal invariant (a bug in kvsync)."""

@final
class ApplyStats:
    """What one ``Index.apply`` did, counted in block events."""

    stored: int
    removed: int
    cleared: int
    skipped: int
    orphaned: int
    ignored: int
    unknown_removals: int
    unknown_events: int
    block_size_mismatch: int
    """Stored blocks whose block size disagreed with the model's (in ``ignored`` too)."""
    def to_dict(self) -> dict[str, int]: ...

@final
class Index:
    """The exact prefix index: which worker holds which prompt prefix."""

    def __new__(cls, capacity_blocks: int | None = None, hash_seed: int = 1337) -> Index:
        """An empty index; ``capacity_blocks`` (>= 1) bounds the distinct blocks held;
        ``hash_seed`` (0..2**64) seeds the standard rolling hash of its prefix keys.

        Raises InvalidArgumentError (a ValueError) for a bound out of range.
        """

    @property
    def hash_seed(self) -> int:
        """The seed of this index's standard prefix hashes (saved in snapshots)."""
    def add_worker(self, worker_id: str, model: str) -> None: ...
    def remove_worker(self, worker_id: str) -> bool:
        """Remove a worker and its holdings; False if unknown. A worker an
        EventManager follows raises WorkerBusyError (remove its pod)."""
    def purge_worker(self, worker_id: str) -> bool:
        """Drop everything the worker holds (it stays registered); False if unknown."""

    def apply(self, worker_id: str, payload: bytes, seq: int | None = None) -> ApplyStats: ...
    def apply_many(
        self, worker_id: str, payloads: Sequence[bytes], first_seq: int | None = None
    ) -> ApplyStats: ...
    def match(
        self,
        model: str,
        token_ids: TokenIds,
        lora: Lora = None,
        extra_keys: ExtraKeys | None = None,
        tiers: str | Iterable[str] | None = None,
    ) -> dict[str, int]:
        """``{worker: leading full blocks held}`` for every worker of ``model``.

        A model no worker serves has no holders: the answer is ``{}``.
        ``token_ids`` is a sequence of ints or a 1-D native-endian integer
        buffer (any width; values in 0..2**32).
        """

    def match_detail(
        self,
        model: str,
        token_ids: TokenIds,
        lora: Lora = None,
        extra_keys: ExtraKeys | None = None,
    ) -> dict[str, dict[str, int]]:
        """``{worker: {"gpu": n, "cpu": n, "storage": n, "any": n}}``, all of one moment."""

    def worker_order(self, model: str) -> tuple[int, list[str]]:
        """``(generation, names)``: the worker ids of ``model`` in the order
        ``match_into`` writes their depths; valid while the workers do not change."""

    def match_into(
        self,
        model: str,
        token_ids: TokenIds,
        out: Buffer,
        generation: int,
        lora: Lora = None,
        extra_keys: ExtraKeys | None = None,
        tiers: str | Iterable[str] | None = None,
    ) -> int:
        """``match`` into a writable uint32 buffer of ``len(names)`` entries: ``out[i]``
        is the depth of ``names[i]`` of ``worker_order(model)``; returns that count.
        Raises InvalidArgumentError if the workers changed since ``generation``."""

    def match_hashes(
        self,
        model: str,
        seq_hashes: SeqHashes,
        lora: Lora = None,
        tiers: str | Iterable[str] | None = None,
    ) -> dict[str, int]:
        """Like ``match``, for a prompt given as standard ``seq`` hashes
        (``seq_hashes``; blocks without extra keys)."""

    def match_detail_hashes(
        self, model: str, seq_hashes: SeqHashes, lora: Lora = None
    ) -> dict[str, dict[str, int]]:
        """Like ``match_detail``, for a prompt given as standard ``seq`` hashes."""

    def match_scores(
        self,
        model: str,
        token_ids: TokenIds,
        lora: Lora = None,
        extra_keys: ExtraKeys | None = None,
        weights: tuple[float, float, float] = (1.0, 0.75, 0.25),
    ) -> dict[str, tuple[int, float]]:
        """``{worker: (blocks, value)}`` for every worker of ``model``: leading full
        blocks held in any tier, and their cached value (each block weighs its best
        tier: ``weights`` = (gpu, cpu, storage))."""

    def scores_and_keys(
        self,
        model: str,
        token_ids: TokenIds,
        lora: Lora = None,
        extra_keys: ExtraKeys | None = None,
        weights: tuple[float, float, float] = (1.0, 0.75, 0.25),
    ) -> tuple[dict[str, tuple[int, float]], list[int]]:
        """``(match_scores(...), prefix_keys(...))`` from one conversion of the prompt."""

    def prefix_keys(
        self,
        model: str,
        token_ids: TokenIds,
        lora: Lora = None,
        extra_keys: ExtraKeys | None = None,
    ) -> list[int]: ...
    def stats(self) -> IndexStats: ...
    def worker_stats(self, worker_id: str) -> IndexWorkerStats: ...
    def workers(self) -> dict[str, str]: ...
    def block_size(self, model: str) -> int | None: ...
    def last_seq(self, worker_id: str) -> int | None: ...
    def check(self) -> None:
        """Check every internal invariant; raises InvariantError if one is broken."""

    def save(self, path: str | PathLike[str]) -> int:
        """Write a snapshot atomically (unique temp file beside it, fsync,
        rename, directory fsync) and return its size in bytes; FileError (an
        OSError) names the path on failure and the old file stays intact."""

    @staticmethod
    def load(path: str | PathLike[str]) -> Index: ...

@final
class Event:
    """One decoded event; fields a release does not send are None."""

    type: str
    block_hashes: list[int | bytes] | None
    parent_block_hash: int | bytes | None
    token_ids: list[int] | None
    block_size: int | None
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[list[Any] | None] | None
    group_idx: int | None
    kv_cache_spec_kind: str | None
    kv_cache_spec_sliding_window: Any
    locality: Any
    ownership: Any
    session_id: Any
    lookahead_token_ids: Any
    cache_salt: Any
    metadata: Any
    def to_dict(self) -> dict[str, Any]: ...

@final
class Batch:
    """One decoded KVEventBatch."""

    ts: float
    dp_rank: int | None
    events: list[Event]
    unknown_events: int

def decode(payload: bytes) -> Batch: ...
def seq_hashes(token_ids: TokenIds, block_size: int, seed: int = 1337) -> list[int]:
    """The standard rolling hashes (Mooncake KV Indexer API) of the prompt's full
    blocks, without extra keys."""

DEFAULT_HASH_SEED: int

@final
class WorkerStatus:
    """State and counters of one worker's event stream."""

    worker: str
    state: str
    """connecting, replaying, live, degraded, disconnected or stopped."""
    last_seq: int | None
    batches: int
    events: int
    gaps: int
    dropped: int
    """Live seqs that never arrived on the live stream."""
    replays: int
    lost_batches: int
    resets: int
    malformed: int
    duplicates: int
    purges: int
    timeouts: int
    abandoned: int
    overflows: int
    disconnects: int
    buffered: int
    buffered_bytes: int
    seconds_since_last_event: float | None
    seconds_disconnected: float | None
    def to_dict(self) -> dict[str, Any]: ...

@final
class Streams:
    """The event streams the index follows, one per worker (the transport
    reports what its sockets receive; each input returns the seq to request
    a replay from, or None). Unknown workers raise UnknownWorkerError."""

    def __new__(cls, index: Index) -> Streams: ...
    def add(
        self,
        worker_id: str,
        model: str,
        replay: bool = True,
        replay_timeout: float = 2.0,
        clean_secs: float = 10.0,
        max_buffered: int = 100_000,
        max_buffered_bytes: int = 268_435_456,
        dead_after: float = 10.0,
        idle_probe: float = 3.0,
        replay_max: float = 30.0,
    ) -> None: ...
    def start(self, worker_id: str, now: float) -> int | None: ...
    def remove(self, worker_id: str) -> bool: ...
    def workers(self) -> list[str]: ...
    def live(self, worker_id: str, seq: bytes, payload: bytes, now: float) -> int | None: ...
    def live_many(
        self, worker_id: str, messages: list[tuple[bytes, bytes]], now: float
    ) -> int | None: ...
    def replayed(self, worker_id: str, seq: bytes, payload: bytes, now: float) -> int | None: ...
    def replay_end(self, worker_id: str, now: float) -> int | None: ...
    def reconnected(self, worker_id: str, now: float) -> int | None: ...
    def disconnected(self, worker_id: str, now: float) -> None: ...
    def tick(self, now: float) -> list[tuple[str, int]]: ...
    def stop(self, worker_id: str) -> None: ...
    def status(self, now: float) -> dict[str, WorkerStatus]: ...
