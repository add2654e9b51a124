"""A fast engine stand-in for the subscriber-cost benchmark.

``python -m bench.streampub --pregenerate N [kvsync sim options]`` is the
engine simulator (same sockets, control protocol and wire format) except
that it generates its traffic before it starts: N batches of
``--batch-requests`` simulated requests each, from its block pool and
workload, then AllBlocksCleared. While running it publishes them in a loop
(the pool starts empty again after the clear, so every cycle is a valid
stream), so a batch costs a send instead of simulated requests in Python,
and the subscriber, not the publisher, is what runs out of CPU first.

``truth`` and ``restart`` are not meaningful here: the benchmark that uses
it checks sequence continuity and loss only.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from kvsync import sim
from kvsync.simengine import encode_batch


def _pregenerate(rank: sim.Rank, batches: int) -> list[bytes]:
    args = rank.sim.args
    out = []
    for _ in range(batches):
        events: list[dict[str, Any]] = []
        for _ in range(args.batch_requests):
            events.extend(rank.pool.request(rank.workload.next_prompt()))
        out.append(encode_batch(events, args.form, rank.rank))
    out.append(encode_batch([{"type": "AllBlocksCleared"}], args.form, rank.rank))
    return out


def _publish_next(rank: sim.Rank, payloads: Iterator[bytes]) -> None:
    rank.publish(next(payloads))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.streampub", add_help=False)
    ap.add_argument("--pregenerate", type=int, default=500, help="batches per cycle")
    own, rest = ap.parse_known_args(argv)
    args = sim.build_parser().parse_args(rest)
    s = sim.Simulator(args)
    for r in s.ranks:
        payloads = itertools.cycle(_pregenerate(r, own.pregenerate))
        r.step = lambda r=r, p=payloads: _publish_next(r, p)  # type: ignore[method-assign]
    s.rate = args.rate
    try:
        s.serve()
    except KeyboardInterrupt:
        pass
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
