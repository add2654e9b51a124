"""Engine simulator: a stand-in for a vLLM/SGLang engine's KV event publisher.

Runs as its own process (``kvsync sim`` or ``python -m kvsync.sim``). Each
data-parallel rank has a real block pool (block size, capacity, LRU
eviction of unreferenced blocks, prefix sharing across requests) fed by a
synthetic multi-tenant workload: tenants with shared system prompts and
multi-turn conversations. It publishes exactly what the engines put on the
wire (SPEC section 1): live ``[topic, seq, payload]`` on a PUB socket, a
replay ROUTER answering ``[b"", start]`` with 3- or 4-frame replies and the
end marker, array-form or map-form events.

A REP control socket takes JSON commands, answered with JSON:

- ``{"op": "step", "n": k}``: run k workload steps (one batch each), per rank;
- ``{"op": "serve", "prompt": [...], "rank": r}``: serve one request (the
  demo's router sends these); answers how many of its blocks were cached;
- ``{"op": "truth"}``: the blocks each rank holds now, as token prefixes;
- ``{"op": "drop", "n": k}``: do not send the next k live batches (they stay
  in the replay buffer, as when a subscriber misses them);
- ``{"op": "restart"}``: like an engine restart: sockets closed and bound
  again, seq back to 0, cache emptied, new engine hash seed;
- ``{"op": "reset"}``: a restart the connection survives (as behind a
  proxy): seq back to 0, cache and replay buffer emptied, new engine hash
  seed, sockets kept, so only a probe can notice it while it stays idle;
- ``{"op": "clear"}``: publish AllBlocksCleared and empty the cache;
- ``{"op": "malformed"}``: publish a payload that is not a KVEventBatch;
- ``{"op": "run", "rate": r}`` / ``{"op": "pause"}``: publish continuously at
  r batches/s per rank, or stop doing so;
- ``{"op": "stats"}``, ``{"op": "ping"}``, ``{"op": "stop"}``.

Replies carry ``"ok": true``. A command that cannot be run (not JSON, not
an object, an unknown op, a missing or mistyped field) is answered with
``{"ok": false, "error": "..."}`` naming the problem; the simulator keeps
serving.

When started it prints one JSON line with its ports to stdout. It stops
on the ``stop`` op, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import zmq

from kvsync.argtypes import (
    MAX_PORT,
    int_at_least,
    non_empty,
    non_negative_float,
    port,
    positive_int,
)
from kvsync.simengine import BlockPool, Workload, encode_batch
from kvsync.simproc import SimProcess as SimProcess  # re-exported: its home for users

END_SEQ = b"\xff" * 8


class Rank:
    """One data-parallel rank: a block pool and its two sockets."""

    def __init__(self, sim: Simulator, rank: int) -> None:
        self.sim = sim
        self.rank = rank
        self.seq = 0
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=sim.args.buffer
        )
        self.pool = BlockPool(sim.args.block_size, sim.args.capacity, sim.rng.getrandbits(63))
        self.workload = Workload(random.Random(sim.args.seed * 1000 + rank), sim.args.block_size)
        self.pub: zmq.Socket[bytes] | None = None
        self.router: zmq.Socket[bytes] | None = None

    def bind(self) -> None:
        ctx = self.sim.ctx
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(f"tcp://{self.sim.args.host}:{self.sim.pub_port + self.rank}")
        if self.sim.replay_port is not None:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(f"tcp://{self.sim.args.host}:{self.sim.replay_port + self.rank}")

    def close(self) -> None:
        for s in (self.pub, self.router):
            if s is not None:
                s.close(linger=0)
        self.pub = self.router = None

    def publish(self, payload: bytes) -> None:
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        if self.sim.drop > 0:
            self.sim.drop -= 1
            return
        assert self.pub is not None
        self.pub.send_multipart([self.sim.topic, seq.to_bytes(8, "big"), payload])

    def step(self) -> None:
        """One engine step: serve ``--batch-requests`` requests, publish
        their events as one batch (as an engine publishes one per step)."""
        events: list[dict[str, Any]] = []
        for _ in range(self.sim.args.batch_requests):
            events.extend(self.pool.request(self.workload.next_prompt()))
        self.publish(encode_batch(events, self.sim.args.form, self.rank))

    def answer_replay(self) -> None:
        assert self.router is not None
        frames = self.router.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            return  # the engines ignore malformed requests
        ident, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self.buffer):
            if seq >= start:
                self.router.send_multipart(self._reply(ident, seq.to_bytes(8, "big"), payload))
        self.router.send_multipart(self._reply(ident, END_SEQ, b""))

    def _reply(self, ident: bytes, seq: bytes, payload: bytes) -> list[bytes]:
        if self.sim.args.replay_frames == 4:
            return [ident, b"", self.sim.topic, seq, payload]
        return [ident, b"", seq, payload]


OPS = frozenset(
    {"ping", "step", "serve", "truth", "drop", "restart", "reset", "clear", "malformed"}
    | {"run", "pause", "stats", "stop"}
)
# Bounds a control message cannot exceed: a typo must not wedge the simulator.
MAX_COUNT = 1_000_000
MAX_TOKEN = (1 << 32) - 1


class BadCommand(ValueError):
    """A control message that cannot be run; the reply carries its text."""


def parse_command(frames: list[bytes]) -> dict[str, Any]:
    """The JSON object of a one-frame control message, with a known ``op``."""
    if len(frames) != 1:
        raise BadCommand(f"expected one frame of JSON, got {len(frames)} frames")
    try:
        cmd = json.loads(frames[0])
    except UnicodeDecodeError:
        raise BadCommand("message is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadCommand(f"message is not JSON: {e}") from None
    if not isinstance(cmd, dict):
        raise BadCommand(f"message must be a JSON object, got {type(cmd).__name__}")
    op = cmd.get("op")
    if op is None:
        raise BadCommand("missing field 'op'")
    if not isinstance(op, str):
        raise BadCommand(f"field 'op' must be a string, got {op!r}")
    if op not in OPS:
        raise BadCommand(f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")
    return cmd


def _is_int(x: object) -> bool:
    # JSON true/false decode to bool, which Python counts as int.
    return isinstance(x, int) and not isinstance(x, bool)


def _count(cmd: dict[str, Any], name: str, default: int = 1) -> int:
    n = cmd.get(name, default)
    if not _is_int(n) or not 0 <= n <= MAX_COUNT:
        raise BadCommand(f"field {name!r} must be an integer from 0 to {MAX_COUNT}, got {n!r}")
    return int(n)


def _token_ids(cmd: dict[str, Any]) -> list[int]:
    if "prompt" not in cmd:
        raise BadCommand("missing field 'prompt' (a list of token ids)")
    prompt = cmd["prompt"]
    if not isinstance(prompt, list):
        raise BadCommand(f"field 'prompt' must be a list of token ids, got {type(prompt).__name__}")
    for i, t in enumerate(prompt):
        if not _is_int(t) or not 0 <= t <= MAX_TOKEN:
            raise BadCommand(f"field 'prompt': item {i} is not a token id (0..2^32-1): {t!r}")
    return prompt


def _rate(cmd: dict[str, Any]) -> float:
    rate = cmd.get("rate", 100.0)
    ok = isinstance(rate, (int, float)) and not isinstance(rate, bool)
    if not ok or not math.isfinite(rate) or not 0 <= rate <= MAX_COUNT:
        raise BadCommand(f"field 'rate' must be a number from 0 to {MAX_COUNT}, got {rate!r}")
    return float(rate)


class Simulator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.topic = args.topic.encode()
        self.drop = 0
        self.rate = 0.0
        self.pub_port = args.port
        # With a fixed PUB port and no replay port, replay ports follow the
        # PUB ports of all ranks.
        self.replay_port: int | None = args.replay_port or (
            args.port + args.dp_size if args.port else 0
        )
        if args.no_replay:
            self.replay_port = None
        self.ranks = [Rank(self, r) for r in range(args.dp_size)]
        self.control = self.ctx.socket(zmq.REP)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control_port = self.control.bind_to_random_port(f"tcp://{args.host}")
        try:
            self._bind_all()
        except BaseException:
            # Nothing is returned to close: the control socket and the
            # context would be left to the garbage collector (ResourceWarning).
            self.control.close(linger=0)
            self.ctx.term()
            raise

    def _try_bind(self) -> bool:
        """Bind every rank; on failure close what was bound."""
        try:
            for r in self.ranks:
                r.bind()
            return True
        except zmq.ZMQError:
            for r in self.ranks:
                r.close()
            return False

    def _bind_all(self) -> None:
        """Bind every rank on consecutive ports; with port 0, pick a free
        random base."""
        if self.args.port != 0:
            if not self._try_bind():
                raise RuntimeError(f"cannot bind the simulator's ports at {self.args.port}")
            return
        for _ in range(100):
            base = random.randrange(20_000, 60_000, 2 * len(self.ranks) + 2)
            self.pub_port = base
            if self.replay_port is not None and not self.args.replay_port:
                self.replay_port = base + len(self.ranks)
            if self._try_bind():
                return
        raise RuntimeError("no free ports for the simulator")

    def restart(self) -> None:
        for r in self.ranks:
            r.close()
        self.ranks = [Rank(self, r) for r in range(self.args.dp_size)]
        # zmq closes sockets asynchronously: the ports may stay busy briefly.
        deadline = time.monotonic() + 5.0
        while not self._try_bind():
            if time.monotonic() > deadline:
                raise RuntimeError("ports still busy 5 s after the restart")
            time.sleep(0.01)

    def handle_raw(self, data: list[bytes]) -> tuple[dict[str, Any], bool]:
        """Answer one control message (its frames): the reply, and whether
        the simulator should stop. A malformed message gets an error reply
        naming what was wrong; it never stops the simulator."""
        try:
            cmd = parse_command(data)
            if cmd["op"] == "stop":
                return {"ok": True}, True
            return self.handle(cmd), False
        except BadCommand as e:
            return {"ok": False, "error": str(e)}, False
        except (RuntimeError, zmq.ZMQError) as e:  # e.g. ports still busy after a restart
            return {"ok": False, "error": f"{cmd['op']} failed: {e}"}, False

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one parsed command (raises ``BadCommand`` for bad fields)."""
        op = cmd["op"]
        if op == "ping":
            return {"ok": True}
        if op == "step":
            for _ in range(_count(cmd, "n")):
                for r in self.ranks:
                    r.step()
            return {"ok": True, "seq": [r.seq - 1 for r in self.ranks]}
        if op == "serve":
            rank = _count(cmd, "rank", default=0)
            if rank >= len(self.ranks):
                raise BadCommand(f"field 'rank': {rank} out of range (dp size {len(self.ranks)})")
            r = self.ranks[rank]
            prompt = _token_ids(cmd)
            r.publish(encode_batch(r.pool.request(prompt), self.args.form, r.rank))
            return {
                "ok": True,
                "hit": r.pool.last_hit,
                "blocks": len(prompt) // self.args.block_size,
            }
        if op == "truth":
            return {
                "ok": True,
                "block_size": self.args.block_size,
                "ranks": [r.pool.truth() for r in self.ranks],
                "seq": [r.seq - 1 for r in self.ranks],
            }
        if op == "drop":
            self.drop += _count(cmd, "n")
            return {"ok": True}
        if op == "restart":
            self.restart()
            return {"ok": True}
        if op == "reset":
            for r in self.ranks:
                r.seq = 0
                r.buffer.clear()
                seed = self.rng.getrandbits(63)
                r.pool = BlockPool(self.args.block_size, self.args.capacity, seed)
            return {"ok": True}
        if op == "clear":
            for r in self.ranks:
                r.pool.blocks.clear()
                r.publish(encode_batch([{"type": "AllBlocksCleared"}], self.args.form, r.rank))
            return {"ok": True}
        if op == "malformed":
            for r in self.ranks:
                r.publish(b"\x93\xcb\x00not msgpack")
            return {"ok": True}
        if op == "run":
            self.rate = _rate(cmd)
            return {"ok": True}
        if op == "pause":
            self.rate = 0.0
            return {"ok": True}
        if op == "stats":
            return {
                "ok": True,
                "seq": [r.seq - 1 for r in self.ranks],
                "blocks": [len(r.pool.blocks) for r in self.ranks],
            }
        raise BadCommand(f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")

    def serve(self) -> None:
        print(
            json.dumps(
                {
                    "pub_port": self.pub_port,
                    "replay_port": self.replay_port,
                    "control_port": self.control_port,
                    "pid": os.getpid(),
                }
            ),
            flush=True,
        )
        next_step = time.monotonic()
        while True:
            poller = zmq.Poller()
            poller.register(self.control, zmq.POLLIN)
            for r in self.ranks:
                if r.router is not None:
                    poller.register(r.router, zmq.POLLIN)
            timeout = 100
            if self.rate > 0:
                # Round up: int() would turn the last millisecond before
                # each step into a busy loop of poll(0).
                timeout = max(0, math.ceil((next_step - time.monotonic()) * 1000))
            if self.args.parent_pid is not None and os.getppid() != self.args.parent_pid:
                return  # whoever started us is gone: do not outlive it
            for sock, _ in poller.poll(timeout):
                if sock is self.control:
                    reply, stop = self.handle_raw(self.control.recv_multipart())
                    self.control.send(json.dumps(reply).encode())
                    if stop:
                        return
                else:
                    for r in self.ranks:
                        if sock is r.router:
                            r.answer_replay()
            if self.rate > 0 and time.monotonic() >= next_step:
                for r in self.ranks:
                    r.step()
                next_step = max(next_step + 1.0 / self.rate, time.monotonic() - 1.0)

    def close(self) -> None:
        for r in self.ranks:
            r.close()
        self.control.close(linger=0)
        self.ctx.term()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="kvsync sim", description=__doc__)
    p.add_argument("--host", type=non_empty, default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=port, default=0, help="PUB port of rank 0 (0: a free random one)")
    p.add_argument(
        "--replay-port", type=port, default=0, help="replay port of rank 0 (0: after the PUB ports)"
    )
    p.add_argument("--no-replay", action="store_true", help="no replay endpoint")
    p.add_argument(
        "--dp-size",
        type=int_at_least(1, 256),
        default=1,
        help="data-parallel ranks (consecutive ports)",
    )
    p.add_argument("--topic", default="", help="topic frame of every message")
    p.add_argument("--form", choices=["map", "array"], default="map", help="event encoding")
    p.add_argument(
        "--replay-frames", type=int, choices=[3, 4], default=4, help="replay reply layout"
    )
    p.add_argument("--buffer", type=positive_int, default=10_000, help="batches kept for replay")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    p.add_argument(
        "--capacity", type=positive_int, default=4096, help="KV cache capacity in blocks"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the workload")
    p.add_argument(
        "--rate", type=non_negative_float, default=0.0, help="batches/s per rank from the start"
    )
    p.add_argument(
        "--batch-requests",
        type=positive_int,
        default=1,
        help="requests served per published batch (step)",
    )
    p.add_argument(
        "--parent-pid",
        type=positive_int,
        default=None,
        help=argparse.SUPPRESS,  # set by SimProcess: exit when this parent is gone
    )
    p.set_defaults(check=check_args)
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """What argparse cannot check option by option: that the ports of all
    ranks fit, and that options do not contradict each other."""
    if args.no_replay and args.replay_port:
        return "--replay-port and --no-replay contradict each other"
    last = args.dp_size - 1
    if args.port and args.port + last > MAX_PORT:
        return (
            f"--port {args.port} with --dp-size {args.dp_size} needs ports up to "
            f"{args.port + last} (at most {MAX_PORT})"
        )
    replay = args.replay_port or (args.port + args.dp_size if args.port else 0)
    if replay and not args.no_replay and replay + last > MAX_PORT:
        return (
            f"replay ports of --dp-size {args.dp_size} ranks from {replay} go past {MAX_PORT} "
            "(set --replay-port)"
        )
    return None


def run(args: argparse.Namespace) -> int:
    """Serve until stopped (the ``stop`` op, Ctrl-C or SIGTERM)."""
    try:
        sim = Simulator(args)
    except (RuntimeError, zmq.ZMQError) as e:
        print(f"kvsync sim: {e}", file=sys.stderr)
        return 1
    sim.rate = args.rate
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        sim.serve()
    except KeyboardInterrupt:
        pass
    finally:
        sim.close()
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
