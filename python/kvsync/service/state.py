"""The parts of a running ``kvsync serve`` that HTTP handlers, metrics and
snapshots share: settings, the index and its event manager, discovery, the
router, and what readiness remembers about each worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvsync._core import Index
from kvsync.service.config import Settings
from kvsync.transport import EventManager

if TYPE_CHECKING:
    from kvsync.discovery import KubernetesSource, Reconciler, StaticSource
    from kvsync.discovery.reconciler import Publisher, WorkerInfo
    from kvsync.routing import Router
    from kvsync.service.metrics import Metrics
    from kvsync.service.mooncake import Registry
    from kvsync.service.snapshots import Snapshots

# States that show a worker has caught up with its engine (SPEC 5, /readyz).
CAUGHT_UP = ("live", "degraded")
# How old the worker states a route sees may be. Reading them builds a
# status object per worker (64 workers: ~0.1 ms, every route); states
# change over heartbeats and reconnects (seconds), so 10 ms is nothing.
STATES_TTL = 0.01


class CachedStates:
    """``{worker: state}`` of ``manager``, read again at most every ``ttl``
    seconds (the router asks on every route)."""

    def __init__(
        self,
        manager: EventManager,
        ttl: float = STATES_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.ttl = ttl
        self.clock = clock
        self._at = -float("inf")
        self._states: dict[str, str] = {}

    def __call__(self) -> dict[str, str]:
        now = self.clock()
        if now - self._at >= self.ttl or now < self._at:
            self._states = {w: s.state for w, s in self.manager.status().items()}
            self._at = now
        return self._states


class WorkersView:
    """``reconciler.workers()``, rebuilt only when the followed publishers
    change. Every route and query needs it; building it makes a
    ``WorkerInfo`` per worker (64 workers: ~0.1 ms). ``Publisher`` is
    frozen and every change replaces it, so comparing the publishers by
    identity is exact. Callers must not modify what it returns."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self._pubs: dict[str, Publisher] = {}
        self._infos: dict[str, WorkerInfo] = {}
        self._by_model: dict[str, list[tuple[str, WorkerInfo]]] = {}

    def __call__(self) -> dict[str, WorkerInfo]:
        pubs = self.reconciler.publishers()
        last = self._pubs
        if len(pubs) != len(last) or any(last.get(k) is not v for k, v in pubs.items()):
            # Assigned whole, so that a reader on another thread sees either
            # the old set or the new one.
            self._infos = {i.worker: i for pub in pubs.values() for i in pub.workers()}
            self._by_model = {}
            self._pubs = pubs
        return self._infos

    def of_model(self, model: str) -> list[tuple[str, WorkerInfo]]:
        """``(worker id, info)`` of the workers serving ``model``, by id."""
        infos = self()
        rows = self._by_model.get(model)
        if rows is None:
            rows = sorted((w, i) for w, i in infos.items() if i.model == model)
            self._by_model[model] = rows
        return rows


@dataclass
class Service:
    settings: Settings
    index: Index
    manager: EventManager
    reconciler: Reconciler
    router: Router
    registry: Registry
    snapshots: Snapshots
    metrics: Metrics
    static: StaticSource | None = None
    kube: KubernetesSource | None = None
    # None in a Service assembled by hand: readers then ask the reconciler.
    workers_view: WorkersView | None = None
    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    # Readiness: workers that reached live/degraded once, and when each
    # worker was first seen (for ready_grace).
    caught_up: set[str] = field(default_factory=set)
    first_seen: dict[str, float] = field(default_factory=dict)

    def states(self) -> dict[str, str]:
        return {w: s.state for w, s in self.manager.status().items()}

    def refresh(self) -> None:
        """Remember which workers have caught up (called often, so that a
        worker that was live for a moment counts)."""
        now = self.clock()
        current = self.manager.status()
        for wid, st in current.items():
            self.first_seen.setdefault(wid, now)
            if st.state in CAUGHT_UP:
                self.caught_up.add(wid)
        for wid in list(self.first_seen):
            if wid not in current:
                self.first_seen.pop(wid, None)
                self.caught_up.discard(wid)

    def not_ready(self) -> list[str]:
        """Why the service is not ready yet (empty when it is)."""
        self.refresh()
        reasons: list[str] = []
        if not self.reconciler.synced:
            reasons.append("discovery has not completed its first sync")
        if self.static is not None and self.static.last_error is not None:
            reasons.append(f"pods file: {self.static.last_error}")
        if self.kube is not None and self.kube.last_error is not None:
            reasons.append(f"kubernetes: {self.kube.last_error}")
        now = self.clock()
        grace = self.settings.ready_grace
        for wid, since in sorted(self.first_seen.items()):
            if wid in self.caught_up or now - since > grace:
                continue
            reasons.append(f"worker {wid!r} has not caught up with its engine yet")
        return reasons

    def uptime(self) -> float:
        return self.clock() - self.started

    def worker_rows(self) -> dict[str, dict[str, Any]]:
        """The ``/v1/workers`` answer (SPEC 5)."""
        infos = self.reconciler.workers()
        status = self.manager.status()
        rows: dict[str, dict[str, Any]] = {}
        for wid in sorted(set(infos) | set(status)):
            info = infos.get(wid)
            st = status.get(wid)
            try:
                holdings = self.index.worker_stats(wid)["blocks"]
            except KeyError:
                holdings = 0
            rows[wid] = {
                "instance": info.instance if info else wid,
                "model": info.model if info else self.index.workers().get(wid),
                "host": info.host if info else None,
                "ready": info.ready if info else False,
                "state": st.state if st else "stopped",
                "last_seq": st.last_seq if st else None,
                "batches": st.batches if st else 0,
                "events": st.events if st else 0,
                "gaps": st.gaps if st else 0,
                "replays": st.replays if st else 0,
                "lost_batches": st.lost_batches if st else 0,
                "resets": st.resets if st else 0,
                "malformed": st.malformed if st else 0,
                "idle_seconds": st.seconds_since_last_event if st else None,
                "holdings": holdings,
                "source": info.source if info else None,
                "tenant": info.tenant if info else None,
                "dp_rank": info.dp_rank if info else None,
            }
        return rows
