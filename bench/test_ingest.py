"""Ingest: decode + apply of realistic vLLM 0.33 payloads, one core.

kvsync and the plain-Python reference (plain.py) are measured on the same
pre-generated payload list in the same run, so the ratio is side by side.
Throughput is in block events (block hashes of BlockStored + BlockRemoved)
per second of the median round; each round applies the whole list to a
fresh index. No timing is asserted: the numbers are recorded.
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

# median seconds per round, by implementation, for the ratio
_MEDIANS: dict[str, float] = {}


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
    benchmark: Any, summary: list[tuple[str, str]], name: str, w: IngestWorkload
) -> float | None:
    benchmark.extra_info.update(w.describe())
    if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
        return None
    median = float(benchmark.stats.stats.median)
    rate = w.block_events / median
    _MEDIANS[name] = median
    benchmark.extra_info["block_events_per_s"] = round(rate)
    benchmark.extra_info["ns_per_block_event"] = round(median / w.block_events * 1e9, 1)
    summary.append(
        ("ingest", f"{name:<22} {rate / 1e6:6.2f} M block events/s  (median {median:.3f} s/round)")
    )
    return rate


def test_workload_shape(ingest: IngestWorkload, summary: list[tuple[str, str]]) -> None:
    d = ingest.describe()
    # steady state: the engines evict about as much as they store
    assert d["removed_blocks"] > 0.3 * d["block_events"]
    summary.append(("ingest", "workload: " + ", ".join(f"{k}={v}" for k, v in d.items())))


def test_plain_reference_agrees_with_kvsync(ingest: IngestWorkload) -> None:
    """The baseline is only a baseline if it computes the same index."""
    ix, plain = _kvsync_index(ingest), _plain_index(ingest)
    totals = [0, 0, 0]
    for wid, p in ingest.payloads:
        st = ix.apply(wid, p)
        assert st.skipped == 0, st
        a, b, c = plain.apply(wid, p)
        totals[0] += a
        totals[1] += b
        totals[2] += c
    assert totals == [ingest.stored_blocks, ingest.removed_blocks, 0]
    stats = ix.stats()
    assert (stats["holdings"], stats["blocks"]) == (plain.holdings(), plain.blocks())
    depths: dict[int, int] = defaultdict(int)
    for prompt in ingest.probes:
        for cut in (len(prompt), len(prompt) // 2 + 7, 40):
            q = prompt[:cut]
            got = ix.match(MODEL, array("I", q))
            assert got == plain.match(MODEL, q)
            for d in got.values():
                depths[d > 0] += 1
    # the probes exercise both hits and misses
    assert depths[True] > 100 and depths[False] > 100


def test_ingest_kvsync(benchmark: Any, ingest: IngestWorkload, summary: Any) -> None:
    benchmark.group = "ingest"
    payloads = ingest.payloads

    def run(ix: kvsync.Index) -> None:
        apply = ix.apply
        for wid, p in payloads:
            apply(wid, p)

    benchmark.pedantic(
        run, setup=lambda: ((_kvsync_index(ingest),), {}), rounds=7, warmup_rounds=1
    )
    _record(benchmark, summary, "kvsync apply", ingest)


def test_ingest_kvsync_apply_many(benchmark: Any, ingest: IngestWorkload, summary: Any) -> None:
    """The same payloads, one ``apply_many`` call per worker (streams are
    independent, so per-worker order is all that matters): what the Python
    call per payload costs."""
    benchmark.group = "ingest"
    by_worker: dict[str, list[bytes]] = defaultdict(list)
    for wid, p in ingest.payloads:
        by_worker[wid].append(p)

    def run(ix: kvsync.Index) -> None:
        for wid, ps in by_worker.items():
            ix.apply_many(wid, ps)

    benchmark.pedantic(
        run, setup=lambda: ((_kvsync_index(ingest),), {}), rounds=7, warmup_rounds=1
    )
    _record(benchmark, summary, "kvsync apply_many", ingest)


def test_ingest_plain_python(benchmark: Any, ingest: IngestWorkload, summary: Any) -> None:
    benchmark.group = "ingest"
    payloads = ingest.payloads

    def run(ix: PlainIndex) -> None:
        apply = ix.apply
        for wid, p in payloads:
            apply(wid, p)

    benchmark.pedantic(run, setup=lambda: ((_plain_index(ingest),), {}), rounds=3)
    _record(benchmark, summary, "plain python", ingest)
    if "plain python" in _MEDIANS and "kvsync apply" in _MEDIANS:
        ratio = _MEDIANS["plain python"] / _MEDIANS["kvsync apply"]
        benchmark.extra_info["kvsync_apply_speedup"] = round(ratio, 2)
        summary.append(("ingest", f"kvsync apply vs plain python: {ratio:.1f}x"))
