"""The reconciler: one owner of ``add_pod`` / ``remove_pod`` on an
``EventManager`` for every discovery source (SPEC section 6).

Each source (the static pods file, Kubernetes, registration) hands over the
publishers it wants followed; the reconciler compares that with what the
source had before and turns the difference into ``add_pod`` /
``remove_pod`` calls, keeping each source's pods apart from the others'.
It also says, per worker id, what routing and ``/v1/workers`` need to know
(``WorkerInfo``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from kvsync._pod import Pod
from kvsync.transport import EventManager

__all__ = ["SOURCES", "Changes", "Publisher", "Reconciler", "Source", "WorkerInfo"]

log = logging.getLogger("kvsync.discovery")

Source = Literal["static", "kubernetes", "register"]
SOURCES: tuple[Source, ...] = get_args(Source)


@dataclass(frozen=True)
class Publisher:
    """One engine pod a source wants followed.

    ``instance`` is its Mooncake instance id (the pod name for static and
    Kubernetes pods, ``namespace/name`` with all namespaces, the
    ``instance_id`` of a registered publisher). A registered publisher sets
    ``dp_rank``; its pod then has ``dp_size == 1``. ``ready=False`` keeps it
    followed but never routed to; ``restarts`` is the pod's container
    restart count."""

    pod: Pod
    source: Source
    instance: str
    tenant: str = "default"
    ready: bool = True
    restarts: int = 0
    dp_rank: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pod, Pod):
            raise TypeError(f"Publisher.pod must be a kvsync.Pod, got {self.pod!r}")
        if self.source not in SOURCES:
            raise ValueError(f"Publisher.source must be one of {SOURCES}, got {self.source!r}")
        if not self.instance:
            raise ValueError(f"pod {self.pod.name!r}: Publisher.instance must not be empty")
        if not self.tenant:
            raise ValueError(f"pod {self.pod.name!r}: Publisher.tenant must not be empty")
        if self.restarts < 0:
            raise ValueError(f"pod {self.pod.name!r}: Publisher.restarts must be >= 0")
        if self.dp_rank is not None:
            if self.dp_rank < 0:
                raise ValueError(f"pod {self.pod.name!r}: Publisher.dp_rank must be >= 0")
            if self.pod.dp_size != 1:
                raise ValueError(
                    f"pod {self.pod.name!r}: a publisher with a dp_rank follows one rank "
                    f"(dp_size 1), got dp_size {self.pod.dp_size}"
                )

    def workers(self) -> list[WorkerInfo]:
        """One ``WorkerInfo`` per worker id of the pod."""
        return [
            WorkerInfo(
                worker=wid,
                instance=self.instance,
                tenant=self.tenant,
                model=self.pod.model,
                host=self.pod.host,
                dp_rank=rank if self.dp_rank is None else self.dp_rank,
                ready=self.ready,
                source=self.source,
            )
            for wid, rank in self.pod.workers()
        ]


@dataclass(frozen=True)
class WorkerInfo:
    """What routing and ``/v1/workers`` need about one worker id."""

    worker: str
    instance: str
    tenant: str
    model: str
    host: str
    dp_rank: int
    ready: bool
    source: Source


@dataclass(frozen=True)
class Changes:
    """Pod names a call added, removed, or replaced (removed, purged, then
    added again with a new address, model or topic). ``failed`` maps the
    pods the EventManager refused to why; they are not followed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.replaced or self.failed)


class Reconciler:
    """Owns ``add_pod`` / ``remove_pod`` on one EventManager; thread-safe
    (called from the asyncio loop and from source threads).

    A pod name belongs to the source that first claimed it: another source
    claiming it is refused with ``ValueError`` naming both, and so is a set
    whose pods would share a worker id with another pod. A refused call
    changes nothing."""

    def __init__(self, manager: EventManager) -> None:
        self.manager = manager
        self._lock = threading.RLock()
        self._pubs: dict[str, Publisher] = {}
        self._expected: set[Source] = set()
        self._delivered: set[Source] = set()

    # ------------------------------------------------------------ queries

    def publishers(self) -> dict[str, Publisher]:
        """The followed publishers, by pod name."""
        with self._lock:
            return dict(self._pubs)

    def workers(self) -> dict[str, WorkerInfo]:
        """``WorkerInfo`` of every followed worker, by worker id."""
        with self._lock:
            pubs = list(self._pubs.values())
        return {info.worker: info for pub in pubs for info in pub.workers()}

    def counts(self) -> dict[Source, int]:
        """Followed pods per source (every source listed)."""
        with self._lock:
            out = dict.fromkeys(SOURCES, 0)
            for pub in self._pubs.values():
                out[pub.source] += 1
            return out

    def expect(self, source: Source) -> None:
        """``source`` must deliver its first set before ``synced`` holds."""
        _check_source(source)
        with self._lock:
            self._expected.add(source)

    @property
    def synced(self) -> bool:
        """Every expected source has delivered its first set."""
        with self._lock:
            return self._expected <= self._delivered

    # ------------------------------------------------------------ changes

    def replace(self, source: Source, publishers: Iterable[Publisher]) -> Changes:
        """Make ``publishers`` the whole desired set of ``source``; pods of
        other sources are untouched."""
        _check_source(source)
        desired: dict[str, Publisher] = {}
        for pub in publishers:
            if pub.source != source:
                raise ValueError(
                    f"pod {pub.pod.name!r} comes from source {pub.source!r}, "
                    f"not {source!r} being replaced"
                )
            if pub.pod.name in desired:
                raise ValueError(f"source {source!r} lists pod {pub.pod.name!r} twice")
            desired[pub.pod.name] = pub
        with self._lock:
            self._check(source, desired, replacing=True)
            mine = {n for n, p in self._pubs.items() if p.source == source}
            changes = self._apply(desired, drop=mine - desired.keys())
            self._delivered.add(source)
            return changes

    def upsert(self, publisher: Publisher) -> Changes:
        """Follow one publisher (a registration), or update it."""
        with self._lock:
            self._check(publisher.source, {publisher.pod.name: publisher}, replacing=False)
            return self._apply({publisher.pod.name: publisher}, drop=set())

    def remove(self, source: Source, pod_name: str) -> Changes:
        """Stop following (and purge) ``pod_name`` of ``source``; an unknown
        name changes nothing."""
        _check_source(source)
        with self._lock:
            old = self._pubs.get(pod_name)
            if old is None:
                return Changes()
            if old.source != source:
                raise ValueError(
                    f"pod {pod_name!r} belongs to source {old.source!r}; "
                    f"source {source!r} cannot remove it"
                )
            return self._apply({}, drop={pod_name})

    # ----------------------------------------------------------- internals

    def _check(self, source: Source, desired: dict[str, Publisher], replacing: bool) -> None:
        """Refuse a set that claims another source's pod name or shares a
        worker id with another pod, before anything changes (``replacing``:
        the source's pods not in ``desired`` go away)."""
        for name in desired:
            old = self._pubs.get(name)
            if old is not None and old.source != source:
                raise ValueError(
                    f"pod {name!r} is claimed by source {source!r} and by source "
                    f"{old.source!r}; give one of them another name"
                )
        owner: dict[str, str] = {}
        kept = [
            p
            for n, p in self._pubs.items()
            if n not in desired and not (replacing and p.source == source)
        ]
        for pub in (*kept, *desired.values()):
            for wid, _ in pub.pod.workers():
                other = owner.setdefault(wid, pub.pod.name)
                if other != pub.pod.name:
                    raise ValueError(
                        f"pods {other!r} and {pub.pod.name!r} would both follow worker "
                        f"{wid!r}; give one of them another name"
                    )

    def _apply(self, desired: dict[str, Publisher], drop: set[str]) -> Changes:
        changes = Changes()
        # Removals first: they free worker ids the additions may reuse.
        for name in sorted(drop):
            self._remove_pod(name)
            changes.removed.append(name)
        for name, pub in desired.items():
            old = self._pubs.get(name)
            if old is not None and old.pod == pub.pod:
                self._pubs[name] = pub  # readiness, restarts, tenant: no stream change
                continue
            if old is not None:
                # A new address, model or topic: what the old one held is
                # purged before anything from the new one is applied.
                self._remove_pod(name)
            try:
                self.manager.add_pod(pub.pod)
            except (ValueError, OSError) as e:
                log.error("discovery: cannot follow pod %r from %s: %s", name, pub.source, e)
                changes.failed[name] = str(e)
                if old is not None:
                    changes.removed.append(name)
                continue
            self._pubs[name] = pub
            (changes.replaced if old is not None else changes.added).append(name)
        if changes:
            log.info(
                "discovery: added %s, removed %s, replaced %s",
                changes.added,
                changes.removed,
                changes.replaced,
            )
        return changes

    def _remove_pod(self, name: str) -> None:
        self._pubs.pop(name, None)
        with contextlib.suppress(KeyError):  # already gone from the manager
            self.manager.remove_pod(name)


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown discovery source {source!r} (one of {SOURCES})")
