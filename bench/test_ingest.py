"""Ingest: decode + apply of vLLM 0.33 map-form payloads, one core.

kvsync and the plain-Python reference (plain.py) are measured on the same
pre-generated payload list in the same run, so the ratio is side by side.
Throughput is in block events (block hashes of BlockStored + BlockRemoved)
per second of the median round; each round applies the whole list to a
fresh index. No timing is asserted: the numbers are recorded.

Two streams:
- ``steady``: 64 engines serving chat traffic with full caches (prefill
  stores chained from shared system prompts, one-block decode stores,
  one-hash evictions). This is the headline number.
- ``bulk``: 512-block prefill stores only, the friendliest shape there is.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from typing import Any

import pytest

import kvsync

from .plain import PlainIndex
from .workloads import MODEL, IngestWorkload

pytestmark = pytest.mark.benchmark

STREAMS = {"steady": "ingest", "bulk": "bulk"}  # stream name -> fixture

# median seconds per round, by (stream, implementation), for the ratio
_MEDIANS: dict[tuple[str, str], float] = {}


def _stream(request: pytest.FixtureRequest, name: str) -> IngestWorkload:
    w: IngestWorkload = request.getfixturevalue(STREAMS[name])
    return w


def _kvsync_index(w: IngestWorkload) -> kvsync.Index:
    ix = kvsync.Index()
    for wid in w.workers:
        ix.add_worker(wid, MODEL)
    return ix


def _plain_index(w: IngestWorkload) -> PlainIndex:
    ix = PlainIndex()
    for wid in w.workers:
        ix.add_worker(wid, MODEL)
    return ix


def _record(
    benchmark: Any, summary: list[tuple[str, str]], stream: str, impl: str, w: IngestWorkload
) -> None:
    benchmark.extra_info.update(w.describe())
    if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
        return
    median = float(benchmark.stats.stats.median)
    rate = w.block_events / median
    _MEDIANS[stream, impl] = median
    benchmark.extra_info["block_events_per_s"] = round(rate)
    benchmark.extra_info["ns_per_block_event"] = round(median / w.block_events * 1e9, 1)
    summary.append(
        (
            f"ingest: {stream}",
            f"{impl:<18} {rate / 1e6:6.2f} M block events/s  (median {median:.3f} s/round)",
        )
    )
    base = _MEDIANS.get((stream, "kvsync apply"))
    if impl == "plain python" and base:
        ratio = median / base
        benchmark.extra_info["kvsync_apply_speedup"] = round(ratio, 2)
        summary.append((f"ingest: {stream}", f"kvsync apply vs plain python: {ratio:.1f}x"))


@pytest.mark.parametrize("stream", STREAMS)
def test_plain_reference_agrees_with_kvsync(
    request: pytest.FixtureRequest, stream: str, summary: list[tuple[str, str]]
) -> None:
    """The baseline is only a baseline if it computes the same index."""
    w = _stream(request, stream)
    summary.append((f"ingest: {stream}", ", ".join(f"{k}={v}" for k, v in w.describe().items())))
    if stream == "steady":  # the engines evict about as much as they store
        assert w.removed_blocks > 0.3 * w.block_events
    ix, plain = _kvsync_index(w), _plain_index(w)
    totals = [0, 0, 0]
    for wid, p in w.payloads:
        st = ix.apply(wid, p)
        assert st.skipped == 0, st
        for i, n in enumerate(plain.apply(wid, p)):
            totals[i] += n
    assert totals == [w.stored_blocks, w.removed_blocks, 0]
    stats = ix.stats()
    assert (stats["holdings"], stats["blocks"]) == (plain.holdings(), plain.blocks())
    depths: dict[bool, int] = defaultdict(int)
    for prompt in w.probes:
        for cut in (len(prompt), len(prompt) // 2 + 7, 40):
            q = prompt[:cut]
            got = ix.match(MODEL, array("I", q))
            assert got == plain.match(MODEL, q)
            for d in got.values():
                depths[d > 0] += 1
    # the probes exercise both hits and misses
    assert depths[True] > 100 and depths[False] > 100


@pytest.mark.parametrize("stream", STREAMS)
def test_ingest_kvsync(
    benchmark: Any, request: pytest.FixtureRequest, stream: str, summary: Any
) -> None:
    benchmark.group = f"ingest-{stream}"
    w = _stream(request, stream)
    payloads = w.payloads

    def run(ix: kvsync.Index) -> None:
        apply = ix.apply
        for wid, p in payloads:
            apply(wid, p)

    benchmark.pedantic(run, setup=lambda: ((_kvsync_index(w),), {}), rounds=7, warmup_rounds=1)
    _record(benchmark, summary, stream, "kvsync apply", w)


@pytest.mark.parametrize("stream", STREAMS)
def test_ingest_kvsync_apply_many(
    benchmark: Any, request: pytest.FixtureRequest, stream: str, summary: Any
) -> None:
    """The same payloads, one ``apply_many`` call per worker (streams are
    independent, so per-worker order is all that matters): what the Python
    call per payload costs."""
    benchmark.group = f"ingest-{stream}"
    w = _stream(request, stream)
    by_worker: dict[str, list[bytes]] = defaultdict(list)
    for wid, p in w.payloads:
        by_worker[wid].append(p)

    def run(ix: kvsync.Index) -> None:
        for wid, ps in by_worker.items():
            ix.apply_many(wid, ps)

    benchmark.pedantic(run, setup=lambda: ((_kvsync_index(w),), {}), rounds=7, warmup_rounds=1)
    _record(benchmark, summary, stream, "kvsync apply_many", w)


@pytest.mark.parametrize("stream", STREAMS)
def test_ingest_plain_python(
    benchmark: Any, request: pytest.FixtureRequest, stream: str, summary: Any
) -> None:
    benchmark.group = f"ingest-{stream}"
    w = _stream(request, stream)
    payloads = w.payloads

    def run(ix: PlainIndex) -> None:
        apply = ix.apply
        for wid, p in payloads:
            apply(wid, p)

    benchmark.pedantic(run, setup=lambda: ((_plain_index(w),), {}), rounds=3)
    _record(benchmark, summary, stream, "plain python", w)
