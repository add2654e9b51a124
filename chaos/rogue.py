"""A rogue publisher (``python -m chaos.rogue``): binds an engine's PUB and
replay ports and sends nothing but garbage, in every shape a broken or
hostile engine could: wrong frame counts, short and huge seqs, bytes that
are not msgpack, msgpack of the wrong shape, events with wrong field
types, stores without a parent chain, and nonsense answers to replay
requests. It holds no cache, so kvsync must index nothing for it and keep
following every other engine. It stops after ``--seconds``, or when its
parent is gone.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq


def garbage(rng: random.Random, seq: int) -> list[bytes]:
    """One malformed live message."""
    s = seq.to_bytes(8, "big")
    kind = rng.randrange(9)
    if kind == 0:
        return [b""]  # one frame
    if kind == 1:
        return [b"", s]  # no payload
    if kind == 2:
        return [b"", s[:3], b"\x93\x00\x90\xc0"]  # short seq
    if kind == 3:
        return [b"", s, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))]
    if kind == 4:
        return [b"", s, msgpack.packb({"not": "a batch"})]
    if kind == 5:  # right envelope, events of the wrong types
        ev: list[Any] = [["BlockStored", "x", None, "tokens", -1, None, "GPU", None]]
        return [b"", s, msgpack.packb([time.time(), ev, None])]
    if kind == 6:  # a store whose parent nobody knows: must not be placed
        ev = [
            {
                "type": "BlockStored",
                "block_hashes": [rng.getrandbits(63)],
                "parent_block_hash": rng.getrandbits(63),
                "token_ids": [1, 2, 3, 4],
                "block_size": 4,
                "medium": "GPU",
            }
        ]
        return [b"", s, msgpack.packb([time.time(), ev, None])]
    if kind == 7:
        return [b"", s, b"\xdd\xff\xff\xff\xff"]  # array32 claiming 4G elements
    return [b"", s, s, s, b"extra frames"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.rogue", description=__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=5557)
    p.add_argument("--replay-port", type=int, default=5558)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=50.0, help="messages per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    ctx: zmq.Context[Any] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    router = ctx.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://{args.host}:{args.port}")
    router.bind(f"tcp://{args.host}:{args.replay_port}")
    print('{"ready": true}', flush=True)
    deadline = time.monotonic() + args.seconds
    seq = 0
    try:
        while time.monotonic() < deadline:
            if args.parent_pid is not None and os.getppid() != args.parent_pid:
                break
            pub.send_multipart(garbage(rng, seq))
            seq += rng.choice([1, 1, 1, 0, 5, 1 << 40])
            while router.poll(0):
                ident = router.recv_multipart()[0]
                router.send_multipart([ident, b"", b"\x00" * 3, b"junk"])
                router.send_multipart([ident, b"", b"\xff" * 8])  # end marker without payload
            time.sleep(1.0 / args.rate)
    finally:
        pub.close(0)
        router.close(0)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
