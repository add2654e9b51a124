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
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import kvsync
from kvsync.sim import BlockPool, SimProcess, Workload

MODEL = "demo-model"


@dataclass
class Fleet:
    """Hit accounting of one routing policy."""

    name: str
    hit: int = 0
    blocks: int = 0

    def rate(self) -> float:
        return self.hit / self.blocks if self.blocks else 0.0


def _least_loaded(candidates: Sequence[int], load: Sequence[int], rng: random.Random) -> int:
    low = min(load[i] for i in candidates)
    return rng.choice([i for i in candidates if load[i] == low])


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    workload = Workload(
        random.Random(args.seed + 1),
        args.block_size,
        tenants=args.tenants,
        system_blocks=(8, 32),
    )
    sims: list[SimProcess] = []
    out = sys.stdout
    tty = out.isatty()
    try:
        print(f"starting {args.engines} simulated engines ...", file=out, flush=True)
        for i in range(args.engines):
            sims.append(
                SimProcess(
                    "--block-size",
                    str(args.block_size),
                    "--capacity",
                    str(args.capacity),
                    "--seed",
                    str(args.seed + 100 + i),
                )
            )
        index = kvsync.Index()
        names = [f"engine-{i}" for i in range(args.engines)]
        with kvsync.EventManager(index) as manager:
            for name, sim in zip(names, sims, strict=True):
                manager.add_pod(
                    kvsync.Pod(
                        name=name,
                        model=MODEL,
                        host="127.0.0.1",
                        pub_port=sim.pub_port,
                        replay_port=sim.replay_port,
                    )
                )
            deadline = time.monotonic() + 15
            while any(st.state != "live" for st in manager.status().values()):
                if time.monotonic() > deadline:
                    print("engines did not come up in 15 s", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            random_pools = [
                BlockPool(args.block_size, args.capacity, rng.getrandbits(63))
                for _ in range(args.engines)
            ]
            oracle_pools = [
                BlockPool(args.block_size, args.capacity, rng.getrandbits(63))
                for _ in range(args.engines)
            ]
            fleets = {n: Fleet(n) for n in ("kvsync", "random", "oracle")}
            load = {n: [0] * args.engines for n in fleets}
            started = time.monotonic()
            last_view = 0.0
            for i in range(args.requests):
                prompt = workload.next_prompt()
                nblocks = len(prompt) // args.block_size
                # kvsync: longest cached prefix per the index
                held = index.match(MODEL, array("I", prompt))
                depths = [held.get(n, 0) for n in names]
                best = max(depths)
                k = _least_loaded(
                    [j for j, d in enumerate(depths) if d == best], load["kvsync"], rng
                )
                reply = sims[k].request("serve", prompt=prompt)
                fleets["kvsync"].hit += reply["hit"]
                load["kvsync"][k] += 1
                # random
                r = rng.randrange(args.engines)
                random_pools[r].request(prompt)
                fleets["random"].hit += random_pools[r].last_hit
                load["random"][r] += 1
                # oracle: reads every engine's cache
                cached = [p.cached_prefix(prompt) for p in oracle_pools]
                best = max(cached)
                o = _least_loaded(
                    [j for j, d in enumerate(cached) if d == best], load["oracle"], rng
                )
                oracle_pools[o].request(prompt)
                fleets["oracle"].hit += oracle_pools[o].last_hit
                load["oracle"][o] += 1
                for f in fleets.values():
                    f.blocks += nblocks
                if args.rate > 0:
                    time.sleep(max(0.0, started + (i + 1) / args.rate - time.monotonic()))
                now = time.monotonic()
                if now - last_view >= 0.5 or i == args.requests - 1:
                    last_view = now
                    _view(out, tty, manager, index, fleets, i + 1, args.requests, now - started)
            elapsed = time.monotonic() - started
            # let the last events arrive, then check the index against the engines
            consistent = _consistent(manager, index, names, sims)
            _summary(out, manager, index, fleets, load, elapsed)
            out.write(
                "  index equals the engines' caches: "
                + ("yes" if consistent else "NO (see status above)")
                + "\n"
            )
            return 0 if consistent else 1
    finally:
        for s in sims:
            s.close()


def _consistent(
    manager: kvsync.EventManager, index: kvsync.Index, names: list[str], sims: list[SimProcess]
) -> bool:
    """Every engine's cached blocks, and nothing else, are in the index."""
    deadline = time.monotonic() + 10
    while True:
        ok = True
        for name, sim in zip(names, sims, strict=True):
            truth = sim.request("truth")
            st = manager.status()[name]
            if st.last_seq != truth["seq"][0]:
                ok = False
                break
            paths = truth["ranks"][0]
            if index.worker_stats(name)["blocks"] != len(paths):
                ok = False
                break
            bs = truth["block_size"]
            held = {tuple(p) for p in paths}
            for p in paths[:100]:
                want = 0
                while want < len(p) // bs and tuple(p[: (want + 1) * bs]) in held:
                    want += 1
                if index.match(MODEL, p)[name] != want:
                    ok = False
                    break
        if ok or time.monotonic() > deadline:
            return ok
        time.sleep(0.05)


def _view(
    out: object,
    tty: bool,
    manager: kvsync.EventManager,
    index: kvsync.Index,
    fleets: dict[str, Fleet],
    done: int,
    total: int,
    elapsed: float,
) -> None:
    status = manager.status()
    stats = index.stats()
    lines = [
        f"kvsync demo  {done}/{total} requests  {elapsed:5.1f} s  "
        f"index: {stats['blocks']} blocks, {stats['holdings']} holdings, "
        f"{stats['memory_bytes'] / 1e6:.1f} MB",
    ]
    for wid, st in sorted(status.items()):
        rate = st.events / elapsed if elapsed > 0 else 0.0
        lines.append(
            f"  {wid:<10} {st.state:<9} seq {st.last_seq if st.last_seq is not None else '-':>6}"
            f"  {st.batches:>6} batches  {rate:8.0f} block events/s  gaps {st.gaps}"
        )
    lines.append(
        "  hit rate:  " + "   ".join(f"{f.name} {100 * f.rate():5.1f}%" for f in fleets.values())
    )
    text = "\n".join(lines)
    write = out.write  # type: ignore[attr-defined]
    if tty:
        write("\x1b[H\x1b[J" + text + "\n")
    else:
        write(text + "\n")
    out.flush()  # type: ignore[attr-defined]


def _summary(
    out: object,
    manager: kvsync.EventManager,
    index: kvsync.Index,
    fleets: dict[str, Fleet],
    load: dict[str, list[int]],
    elapsed: float,
) -> None:
    write = out.write  # type: ignore[attr-defined]
    write("\nsummary\n")
    write(f"  {'routing':<8} {'hit rate':>9} {'cached blocks':>14} {'prompt blocks':>14}  load\n")
    for f in fleets.values():
        write(f"  {f.name:<8} {100 * f.rate():8.1f}% {f.hit:>14} {f.blocks:>14}  {load[f.name]}\n")
    st = manager.status()
    events = sum(s.events for s in st.values())
    write(
        f"  {len(st)} engines followed, {events} block events in {elapsed:.1f} s, "
        f"{sum(s.gaps for s in st.values())} gaps, "
        f"{sum(s.lost_batches for s in st.values())} batches lost; "
        f"index {index.stats()['memory_bytes'] / 1e6:.1f} MB\n"
    )
    out.flush()  # type: ignore[attr-defined]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="kvsync demo", description=__doc__)
    p.add_argument("--engines", type=int, default=4, help="simulated engines")
    p.add_argument("--requests", type=int, default=3000, help="requests to route")
    p.add_argument("--rate", type=float, default=150.0, help="requests/s (0: as fast as possible)")
    p.add_argument("--tenants", type=int, default=16, help="tenants (system prompts)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--capacity", type=int, default=512, help="KV cache blocks per engine")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
