"""The chaos scenarios: each injects one fault into a running cluster
(``chaos.runner.Cluster``), heals it, and says which verdicts are
acceptable. ``exact`` alone where the engine's replay buffer covers the
fault; ``safe`` too where history was really lost (or could not be
reached); ``FALSE POSITIVE`` never.

Timings assume the library SUT's short liveness settings
(``runner.LIBRARY_MANAGER``: heartbeat timeout 1 s, ``dead_after`` 3 s);
``kvsync serve`` runs with its defaults (3 s, 10 s), so its scenarios
wait longer.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos.faults import Faults
from chaos.oracle import EXACT, SAFE
from chaos.runner import Cluster, Result, run

REPLAY_PORT = 5558


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    inject: Callable[[Cluster], None]
    allowed: tuple[str, ...] = (EXACT,)
    sut: str = "library"
    engines: int = 2
    engine_args: dict[int, tuple[str, ...]] = field(default_factory=dict)
    rogues: int = 0
    sndhwm: dict[int, int] = field(default_factory=dict)
    manager: dict[str, Any] = field(default_factory=dict)
    settle: float = 12.0
    lite: bool = False
    # A kvsync defect this scenario exposes (not a false positive): the test
    # reports it as xfail when, and only when, the run shows it.
    known_defect: str | None = None

    def run(self, seed: int = 1) -> Result:
        return run(
            self.name,
            self.fault,
            self.inject,
            self.allowed,
            sut_kind=self.sut,
            engines=self.engines,
            engine_args=self.engine_args,
            rogues=self.rogues,
            sndhwm=self.sndhwm,
            manager=self.manager,
            settle=self.settle,
            seed=seed,
        )


def _faulted_traffic(c: Cluster, link: str, faults: Faults, seconds: float, rate: float) -> None:
    """Traffic on every engine while ``link`` has ``faults``; heal, then a
    moment of clean traffic, then silence."""
    c.traffic(rate)
    time.sleep(0.3)
    c.relay.set(link, faults)
    time.sleep(seconds)
    c.heal()
    time.sleep(0.5)
    c.traffic(0)


def partition_short(c: Cluster) -> None:
    _faulted_traffic(c, "e0", Faults(partition=True), 2.5, 20)


def partition_past_buffer(c: Cluster) -> None:
    _faulted_traffic(c, "e0", Faults(partition=True), 3.0, 30)


def partition_tail(c: Cluster) -> None:
    e0 = c.engine("e0")
    e0.request("step", n=5)
    time.sleep(0.3)
    c.relay.set("e0", Faults(partition=True))
    e0.request("step", n=5)  # the tail of the burst, into the partition
    time.sleep(2.0)  # past the heartbeat timeout: the connection holding it is dropped
    c.heal()


def loss(c: Cluster) -> None:
    _faulted_traffic(c, "*", Faults(loss=0.3), 4.0, 20)


def delay_reorder(c: Cluster) -> None:
    _faulted_traffic(c, "*", Faults(delay=0.1, jitter=0.05), 4.0, 20)


def duplicate(c: Cluster) -> None:
    _faulted_traffic(c, "*", Faults(duplicate=0.3), 4.0, 20)


def kill_restart_traffic(c: Cluster) -> None:
    e0 = c.engine("e0")
    c.traffic(20)
    time.sleep(1.0)
    e0.kill()
    time.sleep(0.5)
    e0.start(seed=4242)
    c.heal()
    e0.request("step", n=20)
    c.traffic(0)


def restart_idle(c: Cluster) -> None:
    e0 = c.engine("e0")
    e0.kill()
    time.sleep(0.3)
    e0.start(seed=4343)  # a new engine, empty cache, and then nothing
    c.heal()


def sigstop_past_dead_after(c: Cluster) -> None:
    c.stop_engine("e0")
    time.sleep(c.manager["dead_after"] + c.manager["heartbeat_timeout"] + 1.0)
    c.cont_engine("e0")
    c.heal()


def dead_for_good(c: Cluster) -> None:
    c.engine("e0").kill()
    c.heal()


def replay_unreachable(c: Cluster) -> None:
    e0 = c.engine("e0")
    c.relay.set("e0", Faults(partition=True, ports=(REPLAY_PORT,)))
    e0.request("drop", n=5)  # a gap on the live stream...
    e0.request("step", n=10)  # ...noticed now, but the replay cannot be reached
    time.sleep(c.manager["replay_timeout"] * 2 + 1.0)
    c.heal()


def burst_past_hwm(c: Cluster) -> None:
    e0 = c.engine("e0")
    # A stalled link (shorter than the heartbeat timeout and the idle probe,
    # so neither fires) backs the burst up into e0's PUB queue, which drops
    # everything past its hwm of 100, as a real engine's does.
    c.relay.set("e0", Faults(partition=True))
    for _ in range(6):
        e0.request("step", n=500)  # 3000 batches, 30x the engine's send hwm
    c.heal()
    e0.request("step", n=5)  # the next live batches reveal the gap
    c.notes["engine_seq"] = e0.request("stats")["seq"][0]


def malformed(c: Cluster) -> None:
    e1 = c.engine("e1")
    for _ in range(3):
        e1.request("step", n=5)
        e1.request("malformed")
    e1.request("step", n=5)
    time.sleep(2.0)  # the rogue keeps publishing garbage meanwhile
    c.heal()


def flood(c: Cluster) -> None:
    """One engine publishes big batches as fast as it can while kvsync is
    frozen for 3 s of it (so the flood piles up at kvsync's door, not in
    its index); kvsync's resident memory is sampled throughout."""
    base = c.sut.rss_bytes()
    peak = base
    c.engine("e0").request("run", rate=5000)
    start = time.monotonic()
    stopped = False
    while time.monotonic() - start < 7.0:
        t = time.monotonic() - start
        if 1.0 <= t < 4.0 and not stopped:
            c.sut.signal(signal.SIGSTOP)
            stopped = True
        elif t >= 4.0 and stopped:
            c.sut.signal(signal.SIGCONT)
            stopped = False
        time.sleep(0.2)
        peak = max(peak, c.sut.rss_bytes())
    if stopped:
        c.sut.signal(signal.SIGCONT)
    c.traffic(0)
    c.heal()
    c.notes["rss_start_mib"] = round(base / 2**20, 1)
    c.notes["rss_peak_mib"] = round(peak / 2**20, 1)
    c.notes["flood_batches"] = c.engine("e0").request("stats")["seq"][0] + 1


def sut_sigstop(c: Cluster) -> None:
    c.traffic(20)
    c.sut.signal(signal.SIGSTOP)
    time.sleep(3.0)
    c.sut.signal(signal.SIGCONT)
    c.heal()
    time.sleep(0.5)
    c.traffic(0)


def serve_kill_restart(c: Cluster) -> None:
    time.sleep(2.5)  # at least one periodic snapshot (interval 1 s)
    snapshot = getattr(c.sut, "snapshot", None)
    c.notes["snapshot_bytes"] = snapshot.stat().st_size if snapshot and snapshot.exists() else 0
    c.sut.kill()
    for e in c.engines:
        e.request("step", n=20)  # published while kvsync is down
    c.sut.start()  # loads the snapshot and resumes each worker with a replay
    c.heal()


def kube_watch_drops(c: Cluster) -> None:
    """The API server drops kvsync's pod watch again and again during
    traffic (the source must resume from its resourceVersion, lose no pod
    and never take a drop for a deletion)."""
    api = c.sut.apiserver  # type: ignore[attr-defined]
    c.traffic(20)
    for _ in range(6):
        time.sleep(0.5)
        api.drop_watches()
    c.traffic(0)
    c.notes["watch_requests"] = len(api.watches())


def kube_api_outage(c: Cluster) -> None:
    """The API server is unreachable for 4 s during traffic: the known pods
    stay followed (an outage is not a deletion), then the watch resumes."""
    api = c.sut.apiserver  # type: ignore[attr-defined]
    c.traffic(20)
    time.sleep(0.5)
    with api.outage():
        time.sleep(4.0)
    time.sleep(0.5)
    c.traffic(0)


SCENARIOS: list[Scenario] = [
    Scenario(
        "partition-short",
        "data link of e0 partitioned 2.5 s during traffic (replay buffer covers it)",
        partition_short,
        lite=True,
    ),
    Scenario(
        "partition-past-buffer",
        "data link of e0 partitioned 3 s during traffic; replay buffer only 8 batches",
        partition_past_buffer,
        allowed=(EXACT, SAFE),
        engine_args={0: ("--buffer", "8")},
    ),
    Scenario(
        "partition-drops-tail",
        "partition drops the last 5 batches of a burst, then e0 stays idle",
        partition_tail,
        lite=True,
    ),
    Scenario(
        "loss-30pct",
        "30% frame loss on every data link, traffic 4 s (safe allowed: a gap replay whose "
        "fresh connection stalls in TCP back-off past replay_timeout is given up and the "
        "worker purged, SPEC 3)",
        loss,
        allowed=(EXACT, SAFE),
        lite=True,
    ),
    Scenario(
        "delay-reorder",
        "100 ms ± 50 ms delay (reordering) on every data link, traffic 4 s",
        delay_reorder,
        lite=True,
    ),
    Scenario("duplication", "30% frame duplication on every data link, traffic 4 s", duplicate),
    Scenario(
        "engine-kill-restart",
        "e0 SIGKILLed during traffic, restarted (seq 0, new cache) with new traffic",
        kill_restart_traffic,
        lite=True,
    ),
    Scenario(
        "engine-restart-idle",
        "e0 SIGKILLed and restarted with an empty cache, then idle",
        restart_idle,
        lite=True,
    ),
    Scenario(
        "engine-sigstop",
        "e0 SIGSTOPped past dead_after, then SIGCONT",
        sigstop_past_dead_after,
    ),
    Scenario("engine-dead", "e0 SIGKILLed for good", dead_for_good, lite=True),
    Scenario(
        "replay-unreachable",
        "gap on e0's live stream while its replay port is partitioned",
        replay_unreachable,
        allowed=(EXACT, SAFE),
    ),
    Scenario(
        "burst-past-hwm",
        "burst of 3000 batches from e0 into a stalled link, 30x its send hwm (100): "
        "most are dropped by the engine; 5 more after the heal show the gap",
        burst_past_hwm,
        sndhwm={0: 100},
        manager={"rcvhwm": 50, "heartbeat_timeout": 5.0, "idle_probe": 5.0},
        # A gap replay longer than the engine ROUTER's hwm (1000) arrives with
        # holes; kvsync asks again from each hole (it used to purge: found here).
    ),
    Scenario(
        "malformed-rogue",
        "e1 interleaves malformed payloads; a rogue publisher (e2) sends only garbage",
        malformed,
        rogues=1,
        lite=True,
    ),
    Scenario(
        "sut-sigstop",
        "kvsync itself SIGSTOPped 3 s during traffic",
        sut_sigstop,
    ),
    Scenario(
        "flood-library",
        "e0 floods batches of 8 requests for 7 s, the library SUT frozen for 3 s of it "
        "(memory sampled)",
        flood,
        engine_args={0: ("--batch-requests", "8")},
        allowed=(EXACT, SAFE),
        settle=20.0,
    ),
    Scenario(
        "serve-kill-restart",
        "kvsync serve SIGKILLed, engines publish 20 batches while it is down, restart; "
        "replay buffers of 25 cover the gap from the snapshot, not from seq 0",
        serve_kill_restart,
        sut="serve",
        lite=True,
        engine_args={0: ("--buffer", "25"), 1: ("--buffer", "25")},
        settle=30.0,
    ),
    Scenario(
        "kube-watch-drop",
        "kvsync serve discovers the engines as pods of a fake API server that drops "
        "its watch six times during traffic",
        kube_watch_drops,
        sut="serve-kube",
        settle=30.0,
    ),
    Scenario(
        "kube-api-outage",
        "kvsync serve discovers the engines as pods; the API server is unreachable "
        "for 4 s during traffic",
        kube_api_outage,
        sut="serve-kube",
        settle=30.0,
    ),
    Scenario(
        "flood-serve",
        "e0 floods batches of 8 requests for 7 s, kvsync serve frozen for 3 s of it "
        "(memory sampled)",
        flood,
        engine_args={0: ("--batch-requests", "8")},
        allowed=(EXACT, SAFE),
        sut="serve",
        settle=30.0,
    ),
]

BY_NAME = {s.name: s for s in SCENARIOS}
