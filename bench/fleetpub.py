"""Many engines in one process, for the ``kvsync serve`` load benchmark
(``serve_load.py``).

``python -m bench.fleetpub --engines N [--seed S]`` hosts N engines, each
with the engine's two sockets (SPEC section 1): a PUB socket publishing
``[topic, seq, payload]`` and a replay ROUTER answering ``[b"", start]``
with 4-frame replies and the end marker. Payloads are vLLM map-form
``KVEventBatch``es with token ids (block size 16), so ``kvsync serve``
indexes real prefixes that ``/query`` and ``/v1/route`` find.

Each engine first publishes its resident prompts (``resident_prompts``:
8,192-token prompts, each held in full by 8 engines and as a 4,096-token
prefix by 4 more), one ``BlockStored`` batch each. Then, on ``run``, it
churns: batch k stores transient prompt ``k % T`` (``--batch-blocks``
blocks) and removes transient prompt ``(k - W) % T``, so the stream is
valid forever and the resident prompts are never evicted. Every event's
bytes are packed before the engines start; a batch costs an envelope and
a send, so one process can publish 100,000 block events/s for 64 engines.

A REP control socket takes JSON: ``{"op": "run", "events_per_s": r}``
(r block events/s spread over all engines), ``{"op": "pause"}``,
``{"op": "probe", "engine": i, "tokens": [...]}`` (publish one
``BlockStored`` of those tokens now; answers ``t``, the
``time.monotonic()`` just before the send), ``{"op": "stats"}`` and
``{"op": "stop"}``. It prints one JSON line with its ports when ready and
exits on ``stop``, SIGTERM, or when its parent is gone.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import signal
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

BLOCK = 16
PROMPT_TOKENS = 8192
SHARED_PROMPTS = 16
VOCAB = 32_000
MASK64 = (1 << 64) - 1
END_SEQ = b"\xff" * 8
TOPIC = b""
REPLAY_BUFFER = 256  # batches kept per engine (64 engines x ~4 kB each)


def resident_prompts(seed: int) -> list[list[int]]:
    """The shared 8,192-token prompts (the harness queries these)."""
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(PROMPT_TOKENS)] for _ in range(SHARED_PROMPTS)]


def holdings_of(engine: int) -> list[tuple[int, int]]:
    """(prompt, tokens held) for one engine: two prompts in full, the first
    half of a third. Over 64 engines each prompt is held in full by 8."""
    return [
        (engine % SHARED_PROMPTS, PROMPT_TOKENS),
        ((engine + 5) % SHARED_PROMPTS, PROMPT_TOKENS),
        ((engine + 10) % SHARED_PROMPTS, PROMPT_TOKENS // 2),
    ]


def _hashes(seed: int, tokens: Sequence[int]) -> list[int]:
    parent = seed
    out = []
    for i in range(len(tokens) // BLOCK):
        parent = hash((parent, tuple(tokens[i * BLOCK : (i + 1) * BLOCK]))) & MASK64
        out.append(parent)
    return out


def _stored(hashes: list[int], tokens: Sequence[int]) -> bytes:
    ev = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(tokens),
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    out: bytes = msgpack.packb(ev)
    return out


def _removed(hashes: list[int]) -> bytes:
    out: bytes = msgpack.packb({"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"})
    return out


def envelope(events: Sequence[bytes]) -> bytes:
    """``[ts, events, dp_rank 0]`` around events packed beforehand."""
    n = len(events)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
    return b"\x93\xcb" + struct.pack(">d", time.time()) + head + b"".join(events) + b"\x00"


class Engine:
    """One engine: its sockets, seq, replay buffer and pre-packed events."""

    def __init__(self, ctx: zmq.Context[Any], index: int, seed: int, args: argparse.Namespace):
        self.index = index
        self.seed = seed
        self.seq = 0
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=REPLAY_BUFFER)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        rng = random.Random(seed)
        n = args.batch_blocks * BLOCK
        self.stores: list[bytes] = []
        self.removes: list[bytes] = []
        for _ in range(args.transients):
            tokens = [rng.randrange(VOCAB) for _ in range(n)]
            hashes = _hashes(seed, tokens)
            self.stores.append(_stored(hashes, tokens))
            self.removes.append(_removed(hashes))
        self.window = args.transients // 2
        self.k = 0  # churn batches so far
        self.block_events = 0
        self.batch_blocks = args.batch_blocks

    def publish(self, payload: bytes) -> None:
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        self.pub.send_multipart([TOPIC, seq.to_bytes(8, "big"), payload])

    def publish_resident(self, prompts: list[list[int]]) -> None:
        for p, held in holdings_of(self.index):
            tokens = prompts[p][:held]
            self.publish(envelope([_stored(_hashes(self.seed, tokens), tokens)]))
            self.block_events += held // BLOCK

    def churn(self) -> None:
        t = len(self.stores)
        events = [self.stores[self.k % t]]
        self.block_events += self.batch_blocks
        if self.k >= self.window:
            events.append(self.removes[(self.k - self.window) % t])
            self.block_events += self.batch_blocks
        self.k += 1
        self.publish(envelope(events))

    def probe(self, tokens: list[int]) -> float:
        payload = envelope([_stored(_hashes(self.seed ^ 0x5EED, tokens), tokens)])
        self.block_events += len(tokens) // BLOCK
        t = time.monotonic()
        self.publish(payload)
        return t

    def answer_replay(self) -> None:
        frames = self.router.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            return
        ident, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self.buffer):
            if seq >= start:
                self.router.send_multipart([ident, b"", TOPIC, seq.to_bytes(8, "big"), payload])
        self.router.send_multipart([ident, b"", TOPIC, END_SEQ, b""])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        prompts = resident_prompts(args.seed)
        first = args.first_engine
        self.engines = [
            Engine(self.ctx, first + i, args.seed * 1_000_003 + first + i, args)
            for i in range(args.engines)
        ]
        for e in self.engines:
            e.publish_resident(prompts)
        self.control = self.ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control_port = self.control.bind_to_random_port("tcp://127.0.0.1")
        self.batches_per_s = 0.0
        self.started = time.monotonic()
        self.churn_batches = 0

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "run":
            per_batch = 2 * self.args.batch_blocks
            self.batches_per_s = float(cmd["events_per_s"]) / per_batch
            return {"ok": True, "batches_per_s": self.batches_per_s}
        if op == "pause":
            self.batches_per_s = 0.0
            return {"ok": True}
        if op == "probe":
            e = self.engines[int(cmd["engine"]) - self.args.first_engine]
            return {"ok": True, "t": e.probe([int(x) for x in cmd["tokens"]]), "seq": e.seq - 1}
        if op == "stats":
            return {
                "ok": True,
                "seq": [e.seq - 1 for e in self.engines],
                "block_events": sum(e.block_events for e in self.engines),
                "churn_batches": self.churn_batches,
                "cpu_s": sum(os.times()[:2]),
            }
        if op in ("ping", "stop"):
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def serve(self, parent: int | None) -> None:
        ports = [{"pub_port": e.pub_port, "replay_port": e.replay_port} for e in self.engines]
        print(json.dumps({"control_port": self.control_port, "engines": ports}), flush=True)
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        routers = {e.router: e for e in self.engines}
        for r in routers:
            poller.register(r, zmq.POLLIN)
        rr = 0
        next_batch = time.monotonic()
        while True:
            if parent is not None and os.getppid() != parent:
                return
            now = time.monotonic()
            timeout = 100
            if self.batches_per_s > 0:
                # Rounded up: rounding down would spin on poll(0) in the
                # last millisecond before each batch.
                timeout = max(0, math.ceil((next_batch - now) * 1000))
            for sock, _ in poller.poll(timeout):
                if sock is self.control:
                    cmd = json.loads(self.control.recv())
                    self.control.send(json.dumps(self.handle(cmd)).encode())
                    if cmd.get("op") == "stop":
                        return
                else:
                    routers[sock].answer_replay()
            if self.batches_per_s <= 0:
                next_batch = time.monotonic()
                continue
            now = time.monotonic()
            # Send what is due (round robin over the engines); never more
            # than a second behind, as an engine does not queue its steps.
            next_batch = max(next_batch, now - 1.0)
            while next_batch <= now:
                self.engines[rr].churn()
                rr = (rr + 1) % len(self.engines)
                self.churn_batches += 1
                next_batch += 1.0 / self.batches_per_s

    def close(self) -> None:
        for e in self.engines:
            e.close()
        self.control.close(linger=0)
        self.ctx.term()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.fleetpub", description=__doc__)
    ap.add_argument("--engines", type=int, default=64)
    ap.add_argument("--first-engine", type=int, default=0, help="index of the first engine")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-blocks", type=int, default=64, help="blocks stored per churn batch")
    ap.add_argument("--transients", type=int, default=16, help="transient prompts per engine")
    ap.add_argument("--parent-pid", type=int, default=None)
    return ap


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fleet = Fleet(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        fleet.serve(args.parent_pid)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
