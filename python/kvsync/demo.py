"""``kvsync demo``: route a synthetic workload by cached prefix.

Starts N simulated engines (separate processes, real ZMQ event streams),
follows them with an EventManager, and sends a multi-tenant workload
(shared system prompts, multi-turn conversations) to them, routed by the
longest prefix kvsync says each engine holds (ties to the less loaded
engine). Side by side, two in-process fleets of the same engines serve the
same requests: one routed at random, one by an oracle that reads each
engine's cache directly. The summary compares their prefix-cache hit rates.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from rich.console import Console

import kvsync
from kvsync.argtypes import int_at_least, non_negative_float, non_negative_int, positive_int
from kvsync.demo_view import Fleet, LiveView, Snapshot, print_summary
from kvsync.simengine import BlockPool, Workload
from kvsync.simproc import SimProcess

MODEL = "demo-model"
MAX_ENGINES = 128
VIEW_EVERY = 0.5  # seconds between redraws of the live view


class DemoError(Exception):
    """The demo cannot go on (an engine failed); the text says why."""


@dataclass
class Run:
    """What a run has started (to stop it) and counted (to report it)."""

    args: argparse.Namespace
    sims: list[SimProcess] = field(default_factory=list)
    manager: kvsync.EventManager | None = None
    index: kvsync.Index = field(default_factory=kvsync.Index)
    fleets: list[Fleet] = field(default_factory=list)
    done: int = 0
    started: float = 0.0

    def snapshot(self) -> Snapshot:
        elapsed = time.monotonic() - self.started if self.started else 0.0
        status = self.manager.status() if self.manager is not None else {}
        return Snapshot(
            self.done, self.args.requests, elapsed, self.index.stats(), status, self.fleets
        )

    def stop(self) -> None:
        """Stop following and stop every engine (each within a second)."""
        if self.manager is not None:
            self.manager.stop()
        for s in self.sims:
            s.close(timeout=1.0)


def _least_loaded(candidates: Sequence[int], load: Sequence[int], rng: random.Random) -> int:
    low = min(load[i] for i in candidates)
    return rng.choice([i for i in candidates if load[i] == low])


def _progress(text: str) -> None:
    # Progress goes to stderr so that a pipe on stdout gets only the summary.
    print(text, file=sys.stderr, flush=True)


def _start(run: Run, names: list[str]) -> None:
    args = run.args
    for i in range(args.engines):
        run.sims.append(
            SimProcess(
                "--block-size",
                str(args.block_size),
                "--capacity",
                str(args.capacity),
                "--seed",
                str(args.seed + 100 + i),
            )
        )
    run.manager = kvsync.EventManager(run.index).start()
    for name, sim in zip(names, run.sims, strict=True):
        run.manager.add_pod(
            kvsync.Pod(
                name=name,
                model=MODEL,
                host="127.0.0.1",
                pub_port=sim.pub_port,
                replay_port=sim.replay_port,
            )
        )
    wait = 15.0 + 0.5 * args.engines
    deadline = time.monotonic() + wait
    while any(st.state != "live" for st in run.manager.status().values()):
        if time.monotonic() > deadline:
            late = sorted(n for n, st in run.manager.status().items() if st.state != "live")
            raise DemoError(f"engines not live after {wait:.0f} s: {', '.join(late)}")
        time.sleep(0.05)


def _route(run: Run, names: list[str], view: LiveView | None) -> None:
    """Send every request to the three fleets; redraw the view now and then."""
    args = run.args
    assert run.manager is not None
    rng = random.Random(args.seed)
    workload = Workload(
        random.Random(args.seed + 1), args.block_size, tenants=args.tenants, system_blocks=(8, 32)
    )
    random_pools = [BlockPool(args.block_size, args.capacity, rng.getrandbits(63)) for _ in names]
    oracle_pools = [BlockPool(args.block_size, args.capacity, rng.getrandbits(63)) for _ in names]
    ours, rand, oracle = run.fleets
    run.started = time.monotonic()
    last_view = 0.0
    for i in range(args.requests):
        prompt = workload.next_prompt()
        # kvsync: longest cached prefix per the index, ties to the less loaded
        held = run.index.match(MODEL, array("I", prompt))
        depths = [held.get(n, 0) for n in names]
        k = _least_loaded([j for j, d in enumerate(depths) if d == max(depths)], ours.load, rng)
        ours.hit += run.sims[k].request("serve", prompt=prompt)["hit"]
        ours.load[k] += 1
        r = rng.randrange(len(names))
        random_pools[r].request(prompt)
        rand.hit += random_pools[r].last_hit
        rand.load[r] += 1
        # oracle: reads every engine's cache
        cached = [p.cached_prefix(prompt) for p in oracle_pools]
        o = _least_loaded([j for j, d in enumerate(cached) if d == max(cached)], oracle.load, rng)
        oracle_pools[o].request(prompt)
        oracle.hit += oracle_pools[o].last_hit
        oracle.load[o] += 1
        for f in run.fleets:
            f.blocks += len(prompt) // args.block_size
        run.done = i + 1
        if args.rate > 0:
            time.sleep(max(0.0, run.started + (i + 1) / args.rate - time.monotonic()))
        now = time.monotonic()
        if view is not None and (now - last_view >= VIEW_EVERY or i == args.requests - 1):
            last_view = now
            view.update(run.snapshot())


def _consistent(run: Run, names: list[str]) -> bool:
    """Every engine's cached blocks, and nothing else, are in the index
    (waits up to 10 s for the last events to arrive)."""
    assert run.manager is not None
    deadline = time.monotonic() + 10
    while True:
        ok = all(_engine_matches(run, name, sim) for name, sim in zip(names, run.sims, strict=True))
        if ok or time.monotonic() > deadline:
            return ok
        time.sleep(0.05)


def _engine_matches(run: Run, name: str, sim: SimProcess) -> bool:
    assert run.manager is not None
    truth = sim.request("truth")
    engine_seq = truth["seq"][0]
    # An engine that never published has seq -1; kvsync then has applied nothing.
    if run.manager.status()[name].last_seq != (engine_seq if engine_seq >= 0 else None):
        return False
    paths = truth["ranks"][0]
    if run.index.worker_stats(name)["blocks"] != len(paths):
        return False
    bs = truth["block_size"]
    held = {tuple(p) for p in paths}
    for p in paths[:100]:
        want = 0
        while want < len(p) // bs and tuple(p[: (want + 1) * bs]) in held:
            want += 1
        if run.index.match(MODEL, p)[name] != want:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the index ends equal to the engines' caches,
    1 when not (or an engine failed), 130 when interrupted (Ctrl-C)."""
    out = sys.stdout
    console = Console(file=out) if out.isatty() else None
    names = [f"engine-{i}" for i in range(args.engines)]
    fleets = [Fleet(n, load=[0] * args.engines) for n in ("kvsync", "random", "oracle")]
    state = Run(args, fleets=fleets)
    restore = _SigintGuard()
    interrupted = False
    consistent: bool | None = None
    snapshot: Snapshot | None = None
    try:
        try:
            plural = "s" if args.engines > 1 else ""
            _progress(f"starting {args.engines} simulated engine{plural} ...")
            _start(state, names)
            _progress(f"routing {args.requests} requests over {args.engines} engine{plural} ...")
            if console is not None:
                with LiveView(console) as view:
                    _route(state, names, view)
            else:
                _route(state, names, None)
            consistent = _consistent(state, names)
        except KeyboardInterrupt:
            interrupted = True
        except (DemoError, RuntimeError, TimeoutError, zmq.ZMQError) as e:
            print(f"kvsync demo: {e}", file=sys.stderr)
            return 1
        finally:
            restore.arm()  # from here on a Ctrl-C must not cut the clean-up short
            snapshot = state.snapshot()
            state.stop()
        print_summary(out, console, snapshot, consistent, interrupted)
    finally:
        restore.restore()
    if interrupted:
        return 130
    return 0 if consistent else 1


class _SigintGuard:
    """Ignores SIGINT while the demo stops its engines, then puts back the
    previous handler. Only in the main thread, where signals are delivered."""

    def __init__(self) -> None:
        self.previous: Any = None
        self.armed = False
        self.active = threading.current_thread() is threading.main_thread()

    def arm(self) -> None:
        if self.active and not self.armed:
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.armed = True

    def restore(self) -> None:
        if self.armed:
            signal.signal(signal.SIGINT, self.previous)
            self.armed = False


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="kvsync demo", description=__doc__)
    p.add_argument(
        "--engines",
        type=int_at_least(1, MAX_ENGINES),
        default=4,
        help="simulated engines, each its own process (default: 4)",
    )
    p.add_argument(
        "--requests", type=non_negative_int, default=3000, help="requests to route (default: 3000)"
    )
    p.add_argument(
        "--rate",
        type=non_negative_float,
        default=150.0,
        help="requests/s (0: as fast as possible; default: 150)",
    )
    p.add_argument(
        "--tenants", type=positive_int, default=16, help="tenants, each with its system prompt"
    )
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    p.add_argument("--capacity", type=positive_int, default=512, help="KV cache blocks per engine")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
