"""Prometheus metrics of ``kvsync serve`` (SPEC 5, ``/metrics``).

Counters and states of workers, the index's size and discovery's counts are
read from their owners at scrape time by a custom collector, so they can
never drift from ``/v1/workers`` and ``/v1/stats``. Only what has no owner
is kept here: the request-duration and event-lag histograms and the event
rates behind ``/v1/stats``."""

from __future__ import annotations

import collections
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvsync.service.state import Service

__all__ = ["STATES", "Metrics", "batch_ts"]

STATES = ("connecting", "replaying", "live", "degraded", "disconnected", "stopped")
SOURCES = ("static", "kubernetes", "register")
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_WINDOW = 10.0  # seconds of history behind the event rates of /v1/stats


def batch_ts(payload: bytes) -> float | None:
    """The ``ts`` of a KVEventBatch (its first element) read straight from
    the msgpack bytes, without decoding the events; None when it is not a
    plain number."""
    if len(payload) < 2:
        return None
    head = payload[0]
    if 0x90 <= head <= 0x9F:
        at = 1
    elif head == 0xDC:
        at = 3
    elif head == 0xDD:
        at = 5
    else:
        return None
    if len(payload) <= at:
        return None
    tag = payload[at]
    try:
        if tag == 0xCB:
            return float(struct.unpack_from(">d", payload, at + 1)[0])
        if tag == 0xCA:
            return float(struct.unpack_from(">f", payload, at + 1)[0])
        if tag <= 0x7F:
            return float(tag)
        if tag in (0xCE, 0xCF):
            return float(struct.unpack_from(">I" if tag == 0xCE else ">Q", payload, at + 1)[0])
    except struct.error:
        return None
    return None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            "kvsync_request_duration_seconds",
            "Time to answer an HTTP request, by endpoint (route pattern).",
            ["endpoint"],
            registry=self.registry,
        )
        self.event_lag = Histogram(
            "kvsync_event_lag_seconds",
            "Arrival time of a live batch minus its ts (engine clock): delivery delay "
            "plus clock skew.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.register_errors = 0
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self._service: Service | None = None

    def bind(self, service: Service) -> None:
        """Start reading ``service`` at scrape time."""
        self._service = service
        self.registry.register(_Collector(service))

    def observe_request(self, endpoint: str, seconds: float) -> None:
        self.request_duration.labels(endpoint).observe(seconds)

    def observe_live(self, worker: str, batch: list[tuple[bytes, bytes]]) -> None:
        """The transport's ``on_live`` hook (I/O thread): one lag sample per
        batch with a readable ts."""
        now = time.time()
        for _, payload in batch:
            ts = batch_ts(payload)
            if ts is not None:
                self.event_lag.observe(now - ts)

    def sample(self, now: float | None = None) -> None:
        """Record the event totals (called about once a second)."""
        if self._service is None:
            return
        now = time.monotonic() if now is None else now
        status = self._service.manager.status().values()
        self._samples.append((now, sum(s.batches for s in status), sum(s.events for s in status)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()

    def rates(self) -> dict[str, float]:
        """Batches and events per second over the last ~10 s."""
        if len(self._samples) < 2:
            return {"batches_per_second": 0.0, "events_per_second": 0.0}
        t0, b0, e0 = self._samples[0]
        t1, b1, e1 = self._samples[-1]
        span = max(t1 - t0, 1e-9)
        # Totals drop when a worker is removed: never report a negative rate.
        return {
            "batches_per_second": max(0, b1 - b0) / span,
            "events_per_second": max(0, e1 - e0) / span,
        }

    def exposition(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _Collector(Collector):
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        status = s.manager.status()
        per_worker = {
            "batches": "Batches applied from the worker's stream.",
            "gaps": "Seq gaps seen on the live stream.",
            "replays": "Replay requests sent.",
            "lost_batches": "Batches lost for good (gap not replayable).",
            "resets": "Engine restarts detected (seq went back).",
            "malformed": "Payloads that could not be decoded (skipped).",
        }
        for name, doc in per_worker.items():
            fam = CounterMetricFamily(f"kvsync_{name}", doc, labels=["worker"])
            for wid, st in sorted(status.items()):
                fam.add_metric([wid], getattr(st, name))
            yield fam
        events = CounterMetricFamily(
            "kvsync_block_events", "Block events applied, by kind.", labels=["worker", "kind"]
        )
        for wid in sorted(status):
            try:
                ws = s.index.worker_stats(wid)
            except KeyError:
                continue
            events.add_metric([wid, "stored"], ws["stored"])
            events.add_metric([wid, "removed"], ws["removed"])
        yield events
        state = GaugeMetricFamily(
            "kvsync_worker_state",
            "1 for the worker's current stream state.",
            labels=["worker", "state"],
        )
        for wid, st in sorted(status.items()):
            for name in STATES:
                state.add_metric([wid, name], 1.0 if st.state == name else 0.0)
        yield state
        stats = s.index.stats()
        for key, doc in (
            ("workers", "Workers in the index."),
            ("blocks", "Distinct prefix blocks held by any worker."),
            ("holdings", "(block, worker) pairs held."),
            ("memory_bytes", "Memory the index uses."),
        ):
            yield GaugeMetricFamily(f"kvsync_index_{key}", doc, value=stats[key])  # type: ignore[literal-required]
        routes = CounterMetricFamily(
            "kvsync_routes", "Routing decisions, by policy.", labels=["policy"]
        )
        for policy, n in sorted(s.router.routes.items()):
            routes.add_metric([policy], n)
        yield routes
        pods = GaugeMetricFamily(
            "kvsync_discovery_pods", "Pods followed, by source.", labels=["source"]
        )
        counts = dict.fromkeys(SOURCES, 0)
        for pub in s.reconciler.publishers().values():
            counts[pub.source] = counts.get(pub.source, 0) + 1
        for source, n in counts.items():
            pods.add_metric([source], n)
        yield pods
        errors = CounterMetricFamily(
            "kvsync_discovery_errors", "Discovery problems, by source.", labels=["source"]
        )
        errors.add_metric(["static"], s.static.errors if s.static is not None else 0)
        errors.add_metric(["kubernetes"], s.kube.errors if s.kube is not None else 0)
        errors.add_metric(["register"], s.metrics.register_errors)
        yield errors
        age = s.snapshots.age()
        if age is not None:
            yield GaugeMetricFamily(
                "kvsync_snapshot_age_seconds",
                "Seconds since the last snapshot was saved.",
                value=age,
            )
