"""Event streams: engines followed over ZeroMQ on loopback, end to end
(issue "Event streams", item 8).

- Subscriber cost: 8 engines in child processes publish at a rate to one
  EventManager in this process. The subscriber's CPU (this process's CPU
  time: pyzmq and libzmq threads, decode, apply) per block event applied,
  and the highest rate sustained with no loss, found by stepping the rate
  up. Engines are the simulator (``kvsync sim``: a Python block pool per
  request) or ``bench.streampub`` (the simulator's batches generated
  beforehand, so publishing costs a send and the subscriber runs out first).
- Publish -> visible: with 10,000 block events/s of background on 4
  streams, probe batches sent from this process; the time from the send
  until ``Index.match`` sees the probe's block. pytest-benchmark's rounds
  are the probes. ``test_pyzmq_floor`` times the same hop without kvsync.
- Recovery: an engine restart (idle, or followed by traffic) until the
  index equals the engine's ground truth; a subscriber restart with 64
  engines (snapshot, engines publish while it is down, load, replay) until
  every worker is caught up, then checked against each engine's truth,
  with a backlog of 200 and of 1,000 batches per engine (the second makes
  engines drop replay tails at their ROUTER's high-water mark: the stream
  must ask again, not purge).
- Subscriber cost by fleet size: the same traffic from 8 or 64 engines.

Targets are recorded (extra_info, summary, README.md), not asserted; the
tests assert what a user would notice: no lost batch, every batch applied,
the index equal to the engines' caches. Every wait has a deadline and every
child process and socket is closed.
"""

from __future__ import annotations

import itertools
import random
import resource
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import kvsync
from kvsync.sim import BlockPool, SimProcess, Workload, encode_batch

from .engines import (
    MODEL,
    PubProcess,
    at_seq,
    close_all,
    cpu_seconds,
    lagging,
    pod_of,
    rss_bytes,
    seqs,
    start_all,
    truth_mismatch,
    wait_for,
)

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(300)]

Summary = list[tuple[str, str]]


def _pct(values_s: list[float]) -> dict[str, float]:
    us = np.asarray(values_s) * 1e6
    return {
        "n": len(us),
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p90_us": round(float(np.percentile(us, 90)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "max_us": round(float(us.max()), 1),
    }


def _rounds(benchmark: Any) -> list[float] | None:
    """Seconds per round as pytest-benchmark timed them (None when disabled)."""
    if benchmark.stats is None:
        return None
    return list(benchmark.stats.stats.data)


# ---------------------------------------------------------------- 1. cost

ENGINES = 8
SETTLE_S = 0.5  # after a rate change, before the window
WINDOW_S = 2.0
DRAIN_MAX_S = 0.2  # backlog when the engines pause: more means it fell behind
# kind, requests per batch, batches/s per engine (stepped up until not sustained)
LADDERS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "sim-1req": ("sim", 1, (100, 200, 400, 800, 1600, 3200)),
    "sim-8req": ("sim", 8, (25, 50, 100, 200, 400, 800)),
    "pregen-8req": ("pregen", 8, (100, 200, 400, 800, 1600, 3200, 6400)),
}


def _engine(kind: str, batch_requests: int) -> Callable[[int], SimProcess]:
    def make(i: int) -> SimProcess:
        common = ("--seed", str(i), "--batch-requests", str(batch_requests))
        if kind == "sim":
            return SimProcess(*common)
        return PubProcess("--pregenerate", "600", *common)

    return make


def _caught_up(m: kvsync.EventManager, names: list[str], engines: list[SimProcess]) -> bool:
    st = m.status()
    return all(at_seq(st.get(n), w) for n, w in zip(names, seqs(engines), strict=True))


def _wait_caught_up(
    m: kvsync.EventManager, names: list[str], engines: list[SimProcess], what: str, timeout: float
) -> float:
    return wait_for(
        lambda: _caught_up(m, names, engines),
        timeout,
        what,
        poll=0.005,
        detail=lambda: lagging(m.status(), names, seqs(engines)),
    )


def _rusage() -> tuple[float, float, int]:
    """This process's (user CPU s, system CPU s, context switches), all
    threads: the subscriber's cost, end to end."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_nvcsw + r.ru_nivcsw


def _level(
    m: kvsync.EventManager, names: list[str], engines: list[SimProcess], rate: int
) -> dict[str, Any]:
    """Run every engine at ``rate`` batches/s; measure a window; pause and
    time the drain of what the subscriber had not applied yet."""
    for e in engines:
        e.request("run", rate=rate)
    time.sleep(SETTLE_S)
    pids = [e.proc.pid for e in engines]
    s0, q0, w0, r0 = m.status(), seqs(engines), time.monotonic(), _rusage()
    e0 = sum(cpu_seconds(p) for p in pids)
    time.sleep(WINDOW_S)
    s1, q1, w1, r1 = m.status(), seqs(engines), time.monotonic(), _rusage()
    e1 = sum(cpu_seconds(p) for p in pids)
    for e in engines:
        e.request("pause")
    paused = time.monotonic()
    drained = _wait_caught_up(m, names, engines, "drain", 30)
    wall = w1 - w0
    block_events = sum(s1[n].events - s0[n].events for n in names)
    batches = sum(s1[n].batches - s0[n].batches for n in names)
    published = sum(q1) - sum(q0)
    user, system, switches = (b - a for a, b in zip(r0, r1, strict=True))
    cpu = user + system
    lost = sum(s1[n].lost_batches for n in names)
    r = {
        "rate_per_engine": rate,
        "requested_batches_per_s": rate * len(engines),
        "published_batches_per_s": round(published / wall),
        "applied_batches_per_s": round(batches / wall),
        "block_events_per_s": round(block_events / wall),
        "block_events_per_batch": round(block_events / max(batches, 1), 1),
        "subscriber_cpu_pct": round(cpu / wall * 100, 1),
        "subscriber_cpu_us_per_block_event": round(cpu / max(block_events, 1) * 1e6, 2),
        "subscriber_cpu_us_per_batch": round(cpu / max(batches, 1) * 1e6, 1),
        "subscriber_system_cpu_pct_of_cpu": round(system / max(cpu, 1e-9) * 100),
        "subscriber_context_switches_per_batch": round(switches / max(batches, 1), 2),
        "engines_cpu_pct": round((e1 - e0) / wall * 100, 1),
        "drain_ms": round((drained - paused) * 1000, 1),
        "lost_batches": lost,
        "gaps": sum(s1[n].gaps for n in names),
    }
    publishers_kept_up = published >= 0.95 * rate * len(engines) * wall
    subscriber_kept_up = r["drain_ms"] <= DRAIN_MAX_S * 1000
    r["sustained"] = lost == 0 and publishers_kept_up and subscriber_kept_up
    r["limit"] = (
        None
        if r["sustained"]
        else "loss"
        if lost
        else "subscriber"
        if not subscriber_kept_up
        else "publishers"
    )
    return r


def _subscriber_cost(ladder: str) -> dict[str, Any]:
    kind, batch_requests, rates = LADDERS[ladder]
    t0 = time.monotonic()
    engines = start_all(_engine(kind, batch_requests), ENGINES)
    startup = time.monotonic() - t0
    try:
        names = [f"e{i}" for i in range(ENGINES)]
        index = kvsync.Index()
        m = kvsync.EventManager(index)
        for n, e in zip(names, engines, strict=True):
            m.add_pod(pod_of(n, e))
        m.start()
        try:
            _wait_caught_up(m, names, engines, "subscribed", 20)
            # Fill each engine's 4096-block cache on the live stream (the
            # steady state: stores come with evictions), not as history: the
            # long-replay case is for the recovery benchmarks to show.
            for e in engines:
                e.request("step", n=1000 // batch_requests)
            _wait_caught_up(m, names, engines, "warm-up", 60)
            levels = []
            for rate in rates:
                levels.append(_level(m, names, engines, rate))
                if not levels[-1]["sustained"]:
                    break
            st = m.status()
            truth = None
            if kind == "sim":  # the pregen engines have no truth to offer
                truth = truth_mismatch(index, names[0], engines[0].request("truth"))
        finally:
            m.stop()
    finally:
        close_all(engines)
    return {
        "startup_s": round(startup, 2),
        "levels": levels,
        "status": st,
        "truth_mismatch": truth,
    }


@pytest.mark.parametrize("ladder", LADDERS)
def test_subscriber_cost(benchmark: Any, ladder: str, summary: Summary) -> None:
    benchmark.group = "streams: subscriber cost (8 engines, rate stepped up)"
    r = benchmark.pedantic(_subscriber_cost, args=(ladder,), rounds=1, iterations=1)
    levels = r["levels"]
    # what a user would notice: nothing lost, every batch applied in order
    for n, st in r["status"].items():
        assert (st.lost_batches, st.malformed, st.resets, st.purges) == (0, 0, 0, 0), n
    assert r["truth_mismatch"] is None, r["truth_mismatch"]
    assert levels[0]["sustained"], levels[0]
    best = max((lv for lv in levels if lv["sustained"]), key=lambda lv: lv["block_events_per_s"])
    first_failed = next((lv for lv in levels if not lv["sustained"]), None)
    benchmark.extra_info.update(
        {
            "engines": ENGINES,
            "engine": LADDERS[ladder][0],
            "requests_per_batch": LADDERS[ladder][1],
            "startup_s": r["startup_s"],
            "max_sustained_block_events_per_s": best["block_events_per_s"],
            "cpu_us_per_block_event_at_max": best["subscriber_cpu_us_per_block_event"],
            "limited_by": first_failed["limit"] if first_failed else "ladder end",
            "levels": levels,
        }
    )
    section = "streams: subscriber cost (8 engines -> 1 EventManager)"
    for lv in levels:
        summary.append(
            (
                section,
                f"{ladder:<11} {lv['rate_per_engine']:>5} b/s/engine: "
                f"{lv['block_events_per_s'] / 1e3:7.1f} k block ev/s "
                f"({lv['block_events_per_batch']:4.1f}/batch), subscriber "
                f"{lv['subscriber_cpu_pct']:5.1f}% CPU = "
                f"{lv['subscriber_cpu_us_per_block_event']:5.2f} us/block ev "
                f"{lv['subscriber_cpu_us_per_batch']:6.1f} us/batch "
                f"({lv['subscriber_system_cpu_pct_of_cpu']:2d}% sys, "
                f"{lv['subscriber_context_switches_per_batch']:4.1f} cs/batch), engines "
                f"{lv['engines_cpu_pct']:5.1f}% CPU, drain {lv['drain_ms']:5.0f} ms"
                + ("" if lv["sustained"] else f"  NOT sustained ({lv['limit']})"),
            )
        )
    summary.append(
        (
            section,
            f"{ladder:<11} max sustained {best['block_events_per_s'] / 1e3:.1f} k block events/s "
            f"at {best['subscriber_cpu_us_per_block_event']:.2f} us CPU/block event; "
            f"next step limited by: {benchmark.extra_info['limited_by']}",
        )
    )


# ------------------------------------------------------------- 2. latency

BG_BLOCK_EVENTS_PER_S = 10_000
BG_STREAMS = 4
BLOCK = 16
PROBES = 3000
PROBE_GAP_S = (0.001, 0.003)  # random gap between probes
VISIBLE_DEADLINE_S = 1.0


def _xpub(ctx: zmq.Context[Any]) -> tuple[zmq.Socket[bytes], int]:
    """A publisher that sees its subscribers (XPUB), so nothing is sent
    before the subscription is in place and no replay endpoint is needed."""
    s: zmq.Socket[bytes] = ctx.socket(zmq.XPUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    return s, s.bind_to_random_port("tcp://127.0.0.1")


def _await_subscriber(s: zmq.Socket[bytes]) -> None:
    if not s.poll(10_000):
        raise AssertionError("no subscriber within 10 s")
    s.recv()


def _background_batches(seed: int, n: int = 2000) -> list[tuple[int, bytes]]:
    """(block events, payload): one simulated request per batch (about 6
    block events: the turn's new blocks and the evictions making room),
    then AllBlocksCleared so that the list can be sent in a loop."""
    pool = BlockPool(BLOCK, 4096, seed=seed)
    work = Workload(random.Random(seed), BLOCK)
    out = []
    for _ in range(n):
        events = pool.request(work.next_prompt())
        out.append((sum(len(e["block_hashes"]) for e in events), encode_batch(events, "map", None)))
    out.append((0, encode_batch([{"type": "AllBlocksCleared"}], "map", None)))
    return out


class _Background:
    """Sends the background streams on schedule, from the calling thread."""

    def __init__(self, socks: list[zmq.Socket[bytes]]) -> None:
        self.socks = socks
        self.batches: list[Iterator[tuple[int, bytes]]] = [
            itertools.cycle(_background_batches(seed=i + 1)) for i in range(len(socks))
        ]
        self.seq = [0] * len(socks)
        self.sent_block_events = 0
        self.start = time.perf_counter()
        self._rr = itertools.cycle(range(len(socks)))

    def due(self) -> float:
        return self.start + self.sent_block_events / BG_BLOCK_EVENTS_PER_S

    def send_due(self) -> None:
        while self.due() <= time.perf_counter():
            i = next(self._rr)
            n, payload = next(self.batches[i])
            self.socks[i].send_multipart([b"", self.seq[i].to_bytes(8, "big"), payload])
            self.seq[i] += 1
            self.sent_block_events += n

    def run_until(self, t: float) -> None:
        while True:
            self.send_due()
            now = time.perf_counter()
            if now >= t:
                return
            time.sleep(max(0.0, min(t, self.due()) - now))


def _probe_payload(seq: int, tokens: array[int]) -> bytes:
    ev = {
        "type": "BlockStored",
        "block_hashes": [seq + 1],
        "parent_block_hash": None,
        "token_ids": list(tokens),
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    payload: bytes = msgpack.packb([time.time(), [ev], None])
    return payload


@pytest.mark.parametrize("wait", ["yield", "spin"])
def test_publish_to_visible_latency(benchmark: Any, wait: str, summary: Summary) -> None:
    """``yield``: the prober calls ``match`` with ``time.sleep(0)`` between
    calls. ``spin``: back-to-back calls, as a router thread busy matching
    would: it holds the GIL almost all the time and the I/O thread waits
    for it."""
    benchmark.group = "streams: publish -> visible (10k block events/s background)"
    probes = PROBES if wait == "yield" else 500
    ctx: zmq.Context[Any] = zmq.Context()
    socks = [_xpub(ctx) for _ in range(BG_STREAMS + 1)]
    probe_sock, probe_port = socks.pop()
    index = kvsync.Index()
    m = kvsync.EventManager(index)
    try:
        for i, (_, port) in enumerate(socks):
            m.add_pod(kvsync.Pod(f"bg{i}", MODEL, "127.0.0.1", pub_port=port, replay_port=None))
        m.add_pod(kvsync.Pod("probe", MODEL, "127.0.0.1", pub_port=probe_port, replay_port=None))
        m.start()
        for s, _ in [*socks, (probe_sock, probe_port)]:
            _await_subscriber(s)
        bg = _Background([s for s, _ in socks])
        rng = random.Random(7)
        match = index.match
        pseq = itertools.count()
        mine: list[float] = []

        def between() -> tuple[tuple[bytes, array[int]], dict[str, Any]]:
            bg.run_until(time.perf_counter() + rng.uniform(*PROBE_GAP_S))
            tokens = array("I", [rng.randrange(32_000) for _ in range(BLOCK)])
            return (_probe_payload(next(pseq), tokens), tokens), {}

        def probe(payload: bytes, tokens: array[int]) -> None:
            t0 = time.perf_counter()
            probe_sock.send_multipart([b"", (len(mine)).to_bytes(8, "big"), payload])
            deadline = t0 + VISIBLE_DEADLINE_S
            if wait == "yield":
                while not match(MODEL, tokens)["probe"]:
                    time.sleep(0)
                    if time.perf_counter() > deadline:
                        raise AssertionError("probe not visible within 1 s")
            else:
                while not match(MODEL, tokens)["probe"]:
                    if time.perf_counter() > deadline:
                        raise AssertionError("probe not visible within 1 s")
            mine.append(time.perf_counter() - t0)

        t_run = time.perf_counter()
        benchmark.pedantic(probe, setup=between, rounds=probes, warmup_rounds=100)
        elapsed = time.perf_counter() - bg.start
        bg_rate = bg.sent_block_events / elapsed
        # every background batch and probe applied, in order, nothing lost
        sent = {f"bg{i}": bg.seq[i] - 1 for i in range(BG_STREAMS)} | {"probe": len(mine) - 1}
        wait_for(lambda: all(at_seq(m.status()[w], s) for w, s in sent.items()), 10, "all applied")
        st = m.status()
    finally:
        m.stop()
        for s, _ in socks:
            s.close(linger=0)
        probe_sock.close(linger=0)
        ctx.term()
    for w, s in st.items():
        assert (s.lost_batches, s.malformed, s.gaps) == (0, 0, 0), w
    timed = _rounds(benchmark)
    pct = _pct(timed if timed is not None else mine)
    benchmark.extra_info.update(pct)
    benchmark.extra_info.update(
        {
            "background_block_events_per_s": round(bg_rate),
            "background_streams": BG_STREAMS,
            "prober": wait,
            "run_s": round(time.perf_counter() - t_run, 1),
            "target_p99_us": 100,
        }
    )
    summary.append(
        (
            "streams: publish -> visible (10k block events/s background)",
            f"prober {wait:<5} p50 {pct['p50_us']:7.1f} us  p90 {pct['p90_us']:7.1f} us  "
            f"p99 {pct['p99_us']:7.1f} us  max {pct['max_us']:8.0f} us  ({pct['n']} probes, "
            f"background {bg_rate / 1e3:.1f} k block events/s; target p99 <= 100 us)",
        )
    )


@pytest.mark.parametrize("shape", ["thread", "same-thread"])
def test_pyzmq_floor(benchmark: Any, shape: str, summary: Summary) -> None:
    """The same hop without kvsync: a 3-frame message over TCP on loopback
    to a SUB socket, received by a Python thread polling as the
    EventManager's does (the prober yields as above), or in the sending
    thread itself (no thread hand-off at all)."""
    benchmark.group = "streams: publish -> visible (10k block events/s background)"
    ctx: zmq.Context[Any] = zmq.Context()
    pub, port = _xpub(ctx)
    sub: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 1000)
    seen = [-1]
    stop = threading.Event()

    def receiver() -> None:
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        while not stop.is_set():
            if dict(poller.poll(50)):
                seen[0] = int.from_bytes(sub.recv_multipart(zmq.NOBLOCK)[1], "big")

    thread = threading.Thread(target=receiver, daemon=True)
    rng = random.Random(7)
    count = itertools.count()
    payload = b"x" * 400  # about a one-request batch
    try:
        sub.connect(f"tcp://127.0.0.1:{port}")
        _await_subscriber(pub)
        if shape == "thread":
            thread.start()

        def between() -> tuple[tuple[int], dict[str, Any]]:
            time.sleep(rng.uniform(*PROBE_GAP_S))
            return (next(count),), {}

        def hop(i: int) -> None:
            t0 = time.perf_counter()
            pub.send_multipart([b"", i.to_bytes(8, "big"), payload])
            if shape == "same-thread":
                sub.recv_multipart()
                return
            while seen[0] != i:
                time.sleep(0)
                if time.perf_counter() - t0 > VISIBLE_DEADLINE_S:
                    raise AssertionError("message not received within 1 s")

        benchmark.pedantic(hop, setup=between, rounds=2000, warmup_rounds=100)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(5)
            assert not thread.is_alive(), "receiver thread did not stop"
        sub.close(linger=0)
        pub.close(linger=0)
        ctx.term()
    timed = _rounds(benchmark)
    if timed is None:
        return
    pct = _pct(timed)
    benchmark.extra_info.update(pct)
    summary.append(
        (
            "streams: publish -> visible (10k block events/s background)",
            f"pyzmq floor, {shape:<11} p50 {pct['p50_us']:7.1f} us  p90 {pct['p90_us']:7.1f} us  "
            f"p99 {pct['p99_us']:7.1f} us  max {pct['max_us']:8.0f} us  (no kvsync, no background)",
        )
    )


# ------------------------------------------------------------ 3. recovery

RESTART_HISTORY = 300  # batches before each restart (fills a 1024-block cache)


@pytest.mark.parametrize("after", ["idle", "traffic"])
def test_engine_restart_to_consistent(benchmark: Any, after: str, summary: Summary) -> None:
    """Restart command -> the index equals the restarted engine's cache.
    ``idle``: the engine publishes nothing afterwards (seen through the
    reconnect and a replay probe); ``traffic``: it serves 20 batches right
    away (seen through the sequence regression)."""
    benchmark.group = "streams: recovery"
    times: list[float] = []
    sim = SimProcess("--seed", "3", "--capacity", "1024")
    index = kvsync.Index()
    m = kvsync.EventManager(index)
    try:
        m.add_pod(pod_of("e", sim))
        m.start()

        def prepare() -> tuple[tuple[int], dict[str, Any]]:
            sim.request("step", n=RESTART_HISTORY)
            want = seqs([sim])[0]
            wait_for(lambda: at_seq(m.status()["e"], want), 10, "caught up before the restart")
            assert index.worker_stats("e")["blocks"] > 0
            return (m.status()["e"].resets,), {}

        def restart(resets: int) -> None:
            t0 = time.monotonic()
            sim.request("restart")
            want = -1
            if after == "traffic":
                want = sim.request("step", n=20)["seq"][0]

            def consistent() -> bool:
                st = m.status()["e"]
                return st.resets > resets and at_seq(st, want)

            times.append(wait_for(consistent, 5, "consistent after the restart", 0.001) - t0)

        def verify(resets: int) -> None:
            mismatch = truth_mismatch(index, "e", sim.request("truth"))
            assert mismatch is None, mismatch
            st = m.status()["e"]
            assert (st.lost_batches, st.malformed) == (0, 0)

        benchmark.pedantic(restart, setup=prepare, teardown=verify, rounds=5)
        if benchmark.stats is None:  # disabled: one round ran, without the teardown
            verify(0)
    finally:
        m.stop()
        sim.close()
    benchmark.extra_info.update(
        {
            "restart_to_consistent_s": [round(t, 3) for t in times],
            "max_s": round(max(times), 3),
            "target_s": 1.0,
        }
    )
    summary.append(
        (
            "streams: recovery",
            f"engine restart ({after:<7}) -> index == engine truth: "
            f"median {np.median(times) * 1000:5.0f} ms, max {max(times) * 1000:5.0f} ms "
            f"over {len(times)} restarts (target <= 1 s)",
        )
    )


FLEET = 64
FLEET_HISTORY = 100  # batches per engine before the subscriber first follows it


class Fleet:
    """64 simulators started once for the module (block size 4, 256-block
    caches, so that checking 64 ground truths stays cheap)."""

    def __init__(self) -> None:
        t0 = time.monotonic()
        self.sims = start_all(
            lambda i: SimProcess("--seed", str(i), "--block-size", "4", "--capacity", "256"),
            FLEET,
        )
        self.info = {
            "engines": FLEET,
            "startup_s": round(time.monotonic() - t0, 2),
            "engines_rss_mb": round(sum(rss_bytes(s.proc.pid) for s in self.sims) / 2**20),
        }

    def fresh(self, history: int = FLEET_HISTORY) -> None:
        """Every engine restarted (seq 0, empty cache), then ``history``
        batches each, so that tests do not inherit each other's backlog."""
        for s in self.sims:
            s.request("restart")
            s.request("step", n=history)


@pytest.fixture(scope="module")
def fleet64() -> Iterator[Fleet]:
    fleet = Fleet()
    try:
        yield fleet
    finally:
        close_all(fleet.sims)


class _Current:
    index: kvsync.Index
    manager: kvsync.EventManager


def _settled(st: dict[str, Any], names: list[str], want: list[int]) -> bool:
    """Every worker caught up, or given up on (purged and following the
    live stream again): nothing more will change while the engines idle."""
    return all(
        at_seq(st.get(n), w) or (st[n].purges > 0 and st[n].state in ("live", "degraded"))
        for n, w in zip(names, want, strict=True)
    )


@pytest.mark.parametrize(
    "backlog",
    [200, 1000],
    ids=["backlog-200", "backlog-1000"],
)
def test_subscriber_restart_64_engines(
    benchmark: Any, fleet64: Fleet, backlog: int, tmp_path: Path, summary: Summary
) -> None:
    """Save the index, stop the EventManager, let each of the 64 engines
    publish ``backlog`` more batches, then load the snapshot into a new
    EventManager: time until every worker has replayed what it missed
    (or was given up on). Then every worker must be intact (no purge, no
    loss) and equal to its engine's truth."""
    benchmark.group = "streams: recovery"
    fleet64.fresh()
    sims = fleet64.sims
    names = [f"e{i:02d}" for i in range(FLEET)]
    times: list[float] = []
    outcomes: list[dict[str, Any]] = []
    cur = _Current()

    def follow(index: kvsync.Index) -> None:
        cur.index = index
        cur.manager = kvsync.EventManager(index)
        for n, s in zip(names, sims, strict=True):
            cur.manager.add_pod(pod_of(n, s))
        cur.manager.start()

    t0 = time.monotonic()
    follow(kvsync.Index())
    try:
        want0 = seqs(sims)
        cold = (
            wait_for(
                lambda: all(
                    at_seq(cur.manager.status().get(n), w)
                    for n, w in zip(names, want0, strict=True)
                ),
                30,
                "first catch-up",
                poll=0.01,
            )
            - t0
        )
        rounds = itertools.count()
        last: list[Any] = []

        def prepare() -> tuple[tuple[Path, list[int]], dict[str, Any]]:
            snap = tmp_path / f"index-{next(rounds)}.kvs"
            cur.index.save(snap)
            cur.manager.stop()
            for s in sims:
                s.request("step", n=backlog)
            last[:] = [((snap, seqs(sims)), {})]
            return last[0]

        def resume(snap: Path, want: list[int]) -> None:
            t0 = time.monotonic()
            follow(kvsync.Index.load(snap))
            done = wait_for(lambda: _settled(cur.manager.status(), names, want), 30, "settled")
            times.append(done - t0)

        def record(snap: Path, want: list[int]) -> None:
            st = cur.manager.status()
            mismatches = [
                truth_mismatch(cur.index, n, s.request("truth"))
                for n, s in zip(names, sims, strict=True)
            ]
            outcomes.append(
                {
                    "purged_workers": sum(1 for n in names if st[n].purges),
                    "replay_timeouts": sum(st[n].timeouts for n in names),
                    "lost_batches": sum(st[n].lost_batches for n in names),
                    "resets": sum(st[n].resets for n in names),
                    "batches_applied": sum(st[n].batches for n in names),
                    "workers_not_equal_to_truth": sum(1 for x in mismatches if x),
                    "first_mismatch": next((x for x in mismatches if x), None),
                }
            )

        rounds_n = 3 if backlog <= 200 else 1
        benchmark.pedantic(resume, setup=prepare, teardown=record, rounds=rounds_n)
        if benchmark.stats is None:  # disabled: one round ran, without the teardown
            record(*last[0][0])
    finally:
        cur.manager.stop()
    benchmark.extra_info.update(fleet64.info)
    benchmark.extra_info.update(
        {
            "backlog_batches_per_engine": backlog,
            "cold_follow_s": round(cold, 3),
            "resume_to_settled_s": [round(t, 3) for t in times],
            "max_s": round(max(times), 3),
            "target_s": 2.0,
            "outcomes": outcomes,
        }
    )
    bad = [o for o in outcomes if o["purged_workers"] or o["workers_not_equal_to_truth"]]
    summary.append(
        (
            "streams: recovery",
            f"subscriber restart, {FLEET} engines, snapshot + replay of {backlog:>4} batches "
            f"each: median {np.median(times) * 1000:5.0f} ms, max {max(times) * 1000:5.0f} ms "
            f"over {len(times)} (target <= 2 s)"
            + (
                f"; FAILED: {bad[0]['purged_workers']} workers purged "
                f"({bad[0]['replay_timeouts']} replay timeouts), "
                f"{bad[0]['workers_not_equal_to_truth']} not equal to their engine"
                if bad
                else "; every worker intact and equal to its engine"
            ),
        )
    )
    summary.append(
        (
            "streams: recovery",
            f"  (first follow from scratch {cold:.2f} s; {FLEET} engines started in "
            f"{fleet64.info['startup_s']} s, {fleet64.info['engines_rss_mb']} MB RSS)",
        )
    )
    for o in outcomes:
        assert o["purged_workers"] == 0 and o["lost_batches"] == 0, o
        assert o["batches_applied"] == FLEET * backlog, o
        assert o["workers_not_equal_to_truth"] == 0, o


FLEET_TOTAL_RATE = 1280  # batches/s in all, spread over the engines followed


@pytest.mark.parametrize("engines", [8, 64])
def test_subscriber_cost_by_fleet_size(
    benchmark: Any, fleet64: Fleet, engines: int, summary: Summary
) -> None:
    """The same total traffic (1,280 batches/s) from 8 or from 64 of the
    fleet's engines: what following more engines costs per batch."""
    benchmark.group = "streams: subscriber cost by fleet size (1,280 batches/s in all)"
    fleet64.fresh()
    sims = fleet64.sims[:engines]
    names = [f"e{i:02d}" for i in range(engines)]
    m = kvsync.EventManager(kvsync.Index())
    try:
        for n, s in zip(names, sims, strict=True):
            m.add_pod(pod_of(n, s))
        m.start()
        _wait_caught_up(m, names, sims, "history", 30)
        r0, w0 = _rusage(), time.monotonic()
        time.sleep(1.0)
        r1, w1 = _rusage(), time.monotonic()
        idle_pct = (r1[0] + r1[1] - r0[0] - r0[1]) / (w1 - w0) * 100
        lv = benchmark.pedantic(
            _level, args=(m, names, sims, FLEET_TOTAL_RATE // engines), rounds=1, iterations=1
        )
        st = m.status()
    finally:
        m.stop()
    benchmark.extra_info.update(lv)
    benchmark.extra_info["idle_subscriber_cpu_pct"] = round(idle_pct, 2)
    summary.append(
        (
            "streams: subscriber cost by fleet size (1,280 batches/s in all)",
            f"{engines:>2} engines x {lv['rate_per_engine']:>3} b/s: subscriber "
            f"{lv['subscriber_cpu_pct']:5.1f}% CPU = "
            f"{lv['subscriber_cpu_us_per_batch']:6.1f} us/batch "
            f"({lv['block_events_per_batch']:4.1f} block ev/batch, "
            f"{lv['subscriber_context_switches_per_batch']:4.1f} cs/batch); "
            f"idle {idle_pct:.1f}% CPU"
            + ("" if lv["sustained"] else f"  NOT sustained ({lv['limit']})"),
        )
    )
    for n, s in st.items():
        assert (s.lost_batches, s.malformed, s.resets, s.purges) == (0, 0, 0, 0), n
