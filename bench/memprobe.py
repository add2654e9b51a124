"""Memory per holding at 10M holdings, measured in a fresh process.

``python -m bench.memprobe shared|worst`` builds the index from
:func:`bench.workloads.memory_payloads` and prints one JSON object: the
index's own ``memory_bytes`` and the growth of the process's resident set
(``/proc/self/statm``) across the build, both per holding. Freed payload
buffers are handed back with ``malloc_trim`` before each reading, so the
RSS growth is what the index keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import time

import kvsync

from .workloads import MODEL, memory_payloads, worker_ids


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # VmHWM, not getrusage: ru_maxrss survives exec and would report the
    # parent pytest process's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _settle() -> None:
    gc.collect()
    # not glibc: no trim, and the reading is a little pessimistic
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(case: str) -> dict[str, float | int | str]:
    payloads = memory_payloads(case)  # token templates are built here
    ix = kvsync.Index()
    for wid in worker_ids(256):
        ix.add_worker(wid, MODEL)
    _settle()
    before = rss_bytes()
    t0 = time.perf_counter()
    blocks = 0
    for wid, p in payloads:
        blocks += ix.apply(wid, p).stored
    build_s = time.perf_counter() - t0
    _settle()
    after = rss_bytes()
    st = ix.stats()
    holdings = int(st["holdings"] or 0)
    assert blocks == holdings, (blocks, st)
    return {
        "case": case,
        "holdings": holdings,
        "blocks": int(st["blocks"] or 0),
        "engine_hashes": int(st["engine_hashes"] or 0),
        "memory_bytes": int(st["memory_bytes"] or 0),
        "stats_bytes_per_holding": round(int(st["memory_bytes"] or 0) / holdings, 2),
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_growth_bytes": after - before,
        "rss_bytes_per_holding": round((after - before) / holdings, 2),
        "peak_rss_bytes": peak_rss_bytes(),
        "build_seconds": round(build_s, 2),
        "build_block_events_per_s": round(holdings / build_s),
    }


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
