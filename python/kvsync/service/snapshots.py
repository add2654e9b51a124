"""Snapshots of the index for ``kvsync serve`` (SPEC 5): loaded at start
(else fetched from the ``peer`` replica), saved every ``snapshot_interval``
seconds, on ``POST /v1/snapshot`` and at shutdown. ``Index.save`` writes a
temporary file, fsyncs and renames it, so a crash never leaves a half file
that ``Index.load`` accepts. Registrations (``/register``) are saved beside
the snapshot (``<snapshot>.registrations.json``) so that a restarted
replica follows the registered engines again."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from kvsync._core import Index
from kvsync.service.config import Settings
from kvsync.service.mooncake import Registry

__all__ = ["Snapshots"]

log = logging.getLogger("kvsync.service")


class Snapshots:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.path: Path | None = settings.snapshot
        self.registry = registry
        self.index: Index | None = None
        self.saved_at: float | None = None  # wall clock of the snapshot we hold
        self.origin = "empty"  # where the index came from: empty, snapshot, peer
        self._lock = asyncio.Lock()

    @property
    def registrations_path(self) -> Path | None:
        return (
            None
            if self.path is None
            else self.path.with_name(self.path.name + ".registrations.json")
        )

    def age(self) -> float | None:
        return None if self.saved_at is None else max(0.0, time.time() - self.saved_at)

    # ------------------------------------------------------------ start-up

    def load_initial(self) -> Index:
        """The index to start from: the snapshot file when it loads, else the
        peer's snapshot, else an empty one. A bad file is logged, not fatal:
        the events replay what it would have held."""
        s = self.settings
        if self.path is not None and self.path.exists():
            try:
                index = self._load(self.path)
            except (ValueError, OSError) as e:
                log.warning("snapshot %s not usable, starting without it: %s", self.path, e)
            else:
                self.saved_at = self.path.stat().st_mtime
                self.origin = "snapshot"
                log.info("loaded snapshot %s (%d workers)", self.path, index.stats()["workers"])
                return self._bind(index)
        if s.peer is not None:
            try:
                index = self._from_peer(s.peer)
            except Exception as e:
                log.warning("cannot warm-start from peer %s, starting empty: %s", s.peer, e)
            else:
                self.saved_at = time.time()
                self.origin = "peer"
                log.info("warm start from peer %s (%d workers)", s.peer, index.stats()["workers"])
                return self._bind(index)
        return self._bind(Index(capacity_blocks=s.capacity_blocks, hash_seed=s.hash_seed))

    def _bind(self, index: Index) -> Index:
        self.index = index
        return index

    def _load(self, path: Path) -> Index:
        index = Index.load(path)
        self._check(index, str(path))
        return index

    def _check(self, index: Index, where: str) -> None:
        capacity = index.stats()["capacity_blocks"]
        if capacity != self.settings.capacity_blocks:
            log.warning(
                "%s holds capacity_blocks=%s, the configuration says %s: the snapshot's "
                "bound applies",
                where,
                capacity,
                self.settings.capacity_blocks,
            )
        # The snapshot records its seed; checked when the index exposes it.
        seed = getattr(index, "hash_seed", self.settings.hash_seed)
        if seed != self.settings.hash_seed:
            raise ValueError(
                f"{where} was built with hash_seed {seed}, the configuration says "
                f"{self.settings.hash_seed}"
            )

    def _from_peer(self, peer: str) -> Index:
        from kvsync.client import Client

        with Client(peer, token=self.settings.token_value(), timeout=10.0) as client:
            data = client.snapshot()
        fd, name = tempfile.mkstemp(prefix="kvsync-peer-", suffix=".snapshot")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self._load(Path(name))
        finally:
            os.unlink(name)

    # -------------------------------------------------------------- saving

    def save_sync(self) -> tuple[Path, int, float]:
        assert self.path is not None and self.index is not None
        start = time.perf_counter()
        size = self.index.save(self.path)
        reg = self.registrations_path
        assert reg is not None
        self.registry.dump(reg)
        self.saved_at = time.time()
        return self.path, size, time.perf_counter() - start

    async def save(self) -> tuple[Path, int, float]:
        """Save now (one save at a time); (path, bytes, seconds)."""
        async with self._lock:
            return await asyncio.to_thread(self.save_sync)

    async def dump_bytes(self) -> bytes:
        """The index as ``Index.save`` writes it (for ``GET /v1/snapshot``)."""
        assert self.index is not None
        index = self.index

        def dump() -> bytes:
            with tempfile.TemporaryDirectory(prefix="kvsync-") as d:
                path = Path(d) / "index.snapshot"
                index.save(path)
                return path.read_bytes()

        return await asyncio.to_thread(dump)

    async def run_periodic(self) -> None:
        """Save every ``snapshot_interval`` seconds until cancelled."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            try:
                path, size, seconds = await self.save()
                log.debug("snapshot %s saved: %d bytes in %.3f s", path, size, seconds)
            except Exception:
                log.exception("periodic snapshot to %s failed", self.path)
