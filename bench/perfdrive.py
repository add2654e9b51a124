"""Drive one hot path under ``perf record`` (the profiles in README.md).

``python -m bench.perfdrive ingest|match [--seconds S] [--out FILE]`` builds
the benchmark's workload first (the steady ingest stream, or the
10,000,128-holding match fleet), then attaches ``perf record -e cpu-clock``
to itself for ``S`` seconds while it runs the hot loop:

- ``ingest``: the steady stream applied with one ``Index.apply`` per payload,
  a fresh index per round, as ``test_ingest_kvsync[steady]``;
- ``match``: ``Index.match`` of the hot prompt as ``array('I')``, as
  ``test_match_latency[array-hot]``.

Workload generation is not recorded. Build the package with
``CARGO_PROFILE_RELEASE_DEBUG=true`` for symbols (see README.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from array import array

import kvsync

from .workloads import MODEL, build_holdings, ingest_workload, worker_ids


def _fresh(workers: list[str]) -> kvsync.Index:
    ix = kvsync.Index()
    for wid in workers:
        ix.add_worker(wid, MODEL)
    return ix


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.perfdrive")
    ap.add_argument("what", choices=["ingest", "match"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", default=None, help="perf data file (default perf.<what>)")
    args = ap.parse_args()
    print(f"kvsync from {kvsync.__file__}", file=sys.stderr)

    if args.what == "ingest":
        # the parameters of the `ingest` fixture in conftest.py
        w = ingest_workload(
            workers=64, target_block_events=1_500_000, capacity_blocks=4096, concurrency=32
        )

        def step() -> str:
            ix = _fresh(w.workers)
            apply = ix.apply
            t0 = time.perf_counter()
            for wid, p in w.payloads:
                apply(wid, p)
            return f"{w.block_events / (time.perf_counter() - t0) / 1e6:.2f} M block events/s"

    else:
        ix = _fresh(worker_ids(256))
        wl = build_holdings(ix.apply)
        q = array("I", wl.prompt(wl.chains["hot"][0]).tobytes())
        match = ix.match

        def step() -> str:
            t0 = time.perf_counter()
            for _ in range(20_000):
                match(MODEL, q)
            return f"{(time.perf_counter() - t0) / 20_000 * 1e6:.2f} us per match"

    step()  # warm up
    out = args.out or f"perf.{args.what}"
    cmd = ["perf", "record", "-e", "cpu-clock", "-p", str(os.getpid()), "-o", out]
    perf = subprocess.Popen([*cmd, "--", "sleep", str(args.seconds)])
    time.sleep(0.5)  # let perf attach
    while perf.poll() is None:
        print(step(), file=sys.stderr)
    print(f"wrote {out}: perf report -i {out} --no-children --sort dso,sym", file=sys.stderr)


if __name__ == "__main__":
    main()
