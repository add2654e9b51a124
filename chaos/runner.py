"""Runs one scenario: builds its cluster (namespaces, relay, engines, the
system under test), warms it up, lets the scenario inject its fault and
heal it, waits for quiescence and asks the oracle for the verdict.

Quiescence: after the heal, the oracle compares kvsync with the truth
every half second until it is exact (the recovery time is when it first
was) or the scenario's ``settle`` bound passes; the verdict is the last,
fuller comparison's. ``fp_free_seconds`` is when a comparison first found
no false positive (a dead engine's holdings are claimed until
``dead_after``). Every namespace, link and process is removed in a
``finally``, also when the scenario fails.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.engines import Engine
from chaos.netns import Topology
from chaos.oracle import EXACT, Check, Held, Oracle, classify
from chaos.relay import Relay
from chaos.sut import MODEL, KubeServeSUT, LibrarySUT, ServeSUT, _HttpSUT, pod_json

BLOCK_SIZE = 4
# Short liveness timings so a scenario takes seconds: a silent publisher
# is dropped after 1 s, purged after 3 s, a quiet one probed after 1 s.
LIBRARY_MANAGER: dict[str, Any] = {
    "heartbeat_ivl": 0.3,
    "heartbeat_timeout": 1.0,
    "dead_after": 3.0,
    "idle_probe": 1.0,
    # kvsync's default: shorter turns ordinary TCP back-off under loss into
    # abandoned replays
    "replay_timeout": 2.0,
    "clean_secs": 3.0,
    "replay_max": 10.0,
}
ENGINE_ARGS = ("--block-size", str(BLOCK_SIZE), "--capacity", "256")


@dataclass
class Cluster:
    """What a scenario acts on. ``engines`` are the simulators; ``rogues``
    are processes that publish garbage (they hold nothing)."""

    topo: Topology
    relay: Relay
    engines: list[Engine]
    sut: _HttpSUT
    oracle: Oracle
    sut_kind: str
    manager: dict[str, Any]
    rogues: list[subprocess.Popen[str]] = field(default_factory=list)
    stopped: set[str] = field(default_factory=set)
    healed_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def engine(self, name: str) -> Engine:
        return next(e for e in self.engines if e.name == name)

    def heal(self) -> None:
        """Remove every network fault now; recovery is timed from here."""
        self.relay.heal()
        self.healed_at = time.monotonic()

    def stop_engine(self, name: str) -> None:
        self.engine(name).signal(signal.SIGSTOP)
        self.stopped.add(name)

    def cont_engine(self, name: str) -> None:
        self.engine(name).signal(signal.SIGCONT)
        self.stopped.discard(name)

    def truth(self) -> dict[str, Held]:
        """What each engine holds now; a dead engine holds nothing."""
        out: dict[str, Held] = {}
        for e in self.engines:
            if not e.alive:
                out[e.name] = set()
                continue
            if e.name in self.stopped:
                raise RuntimeError(f"engine {e.name} is stopped: its truth is unknown")
            out[e.name] = {tuple(p) for p in e.request("truth")["ranks"][0]}
        return out

    def caught_up(self) -> bool:
        workers = self.sut.workers()
        for e in self.engines:
            if not e.alive:
                continue
            w = workers.get(e.name)
            want = e.request("stats")["seq"][0]
            if w is None or w["state"] not in ("live", "degraded") or w["last_seq"] != want:
                return False
        return True

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def check(self, limit: int) -> Check:
        truth = self.truth()
        self.oracle.record(truth)
        prompts = self.oracle.prompts(truth, limit)
        return classify(prompts, truth, lambda p: self.sut.query(MODEL, p), BLOCK_SIZE)

    def traffic(self, rate: float, names: list[str] | None = None) -> None:
        """Every engine (or ``names``) publishes ``rate`` batches/s from now."""
        for e in self.engines:
            if names is None or e.name in names:
                e.request("run", rate=rate) if rate else e.request("pause")


@dataclass
class Result:
    scenario: str
    sut: str
    fault: str
    verdict: str
    allowed: list[str]
    false_positives: int
    false_negatives: int
    pairs: int
    recovery_seconds: float | None
    fp_free_seconds: float | None
    fault_seconds: float
    settle_seconds: float
    total_seconds: float
    examples: list[str]
    fn_workers: dict[str, int]
    workers: dict[str, dict[str, Any]]
    notes: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.verdict in self.allowed

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["passed"] = self.passed
        return d


def build(
    engines: int,
    sut_kind: str,
    workdir: Path,
    engine_args: dict[int, tuple[str, ...]],
    rogues: int,
    manager: dict[str, Any],
    seed: int,
    sndhwm: dict[int, int],
) -> Cluster:
    topo = Topology(engines + rogues).create()
    relay: Relay | None = None
    started: list[Engine] = []
    rogue_procs: list[subprocess.Popen[str]] = []
    try:
        relay = Relay(
            topo.relay_ns,
            {f"e{ln.index}": (ln.relay_sut_dev, ln.relay_engine_dev) for ln in topo.links},
            seed=seed,
        )
        for ln in topo.links[:engines]:
            args = ENGINE_ARGS + engine_args.get(ln.index, ())
            e = Engine(f"e{ln.index}", ln, *args, sndhwm=sndhwm.get(ln.index))
            started.append(e.start(seed=seed * 100 + ln.index))
        pods = [pod_json(e.name, e.host, e.replay) for e in started]
        for ln in topo.links[engines:]:
            rogue_procs.append(_start_rogue(ln.netns, seed))
            pods.append(pod_json(f"e{ln.index}", ln.data_ip))
        sut: _HttpSUT
        if sut_kind == "serve":
            sut = ServeSUT(pods, workdir)
        elif sut_kind == "serve-kube":
            sut = KubeServeSUT(pods, workdir)
        else:
            sut = LibrarySUT(pods, BLOCK_SIZE, manager, log=workdir / "library.stderr")
        sut.start()
    except BaseException:
        for e in started:
            e.close()
        for r in rogue_procs:
            _stop(r)
        if relay is not None:
            relay.close()
        topo.close()
        raise
    return Cluster(
        topo, relay, started, sut, Oracle(BLOCK_SIZE, seed), sut_kind, manager, rogue_procs
    )


def _start_rogue(netns: str, seed: int) -> subprocess.Popen[str]:
    import os

    cmd = [sys.executable, "-m", "chaos.rogue", "--seconds", "120", "--seed", str(seed)]
    cmd += ["--parent-pid", str(os.getpid())]
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, *cmd],
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


def teardown(c: Cluster) -> None:
    """Stop everything the cluster started; never raises for a part that
    is already gone."""
    for step in (
        c.sut.close,
        *(e.close for e in c.engines),
        *(lambda r=r: _stop(r) for r in c.rogues),
        c.relay.close,
        c.topo.close,
    ):
        try:
            step()
        except Exception as e:  # teardown goes on: the namespaces must go
            print(f"chaos teardown: {e}", file=sys.stderr)


def run(
    name: str,
    fault: str,
    inject: Callable[[Cluster], None],
    allowed: tuple[str, ...],
    *,
    sut_kind: str = "library",
    engines: int = 2,
    engine_args: dict[int, tuple[str, ...]] | None = None,
    rogues: int = 0,
    sndhwm: dict[int, int] | None = None,
    manager: dict[str, Any] | None = None,
    settle: float = 15.0,
    seed: int = 1,
) -> Result:
    """Run one scenario end to end; its ``Result``."""
    t0 = time.monotonic()
    mgr = {**LIBRARY_MANAGER, **(manager or {})}
    with tempfile.TemporaryDirectory(prefix="kvsync-chaos-") as tmp:
        c = build(engines, sut_kind, Path(tmp), engine_args or {}, rogues, mgr, seed, sndhwm or {})
        try:
            for e in c.engines:
                e.request("step", n=10)
            c.wait(c.caught_up, 30.0, "every worker caught up after the warm-up")
            c.oracle.record(c.truth())
            fault_start = time.monotonic()
            inject(c)
            healed = c.healed_at or time.monotonic()
            c.healed_at = healed
            recovery = fp_free = None
            deadline = healed + settle
            while time.monotonic() < deadline:
                chk = c.check(limit=120)
                if fp_free is None and chk.false_positives == 0:
                    fp_free = time.monotonic() - healed
                if chk.verdict == EXACT:
                    recovery = time.monotonic() - healed
                    break
                time.sleep(0.5)
            final = c.check(limit=600)
            if final.verdict != EXACT:
                recovery = None
            workers = c.sut.workers()
            return Result(
                scenario=name,
                sut=sut_kind,
                fault=fault,
                verdict=final.verdict,
                allowed=list(allowed),
                false_positives=final.false_positives,
                false_negatives=final.false_negatives,
                pairs=final.pairs,
                recovery_seconds=None if recovery is None else round(recovery, 2),
                fp_free_seconds=None if fp_free is None else round(fp_free, 2),
                fault_seconds=round(healed - fault_start, 2),
                settle_seconds=round(time.monotonic() - healed, 2),
                total_seconds=round(time.monotonic() - t0, 2),
                examples=final.examples,
                fn_workers=final.fn_workers,
                workers={w: _brief(v) for w, v in workers.items()},
                notes=c.notes,
            )
        finally:
            teardown(c)


def _brief(w: dict[str, Any]) -> dict[str, Any]:
    keys = ("state", "last_seq", "gaps", "dropped", "replays", "lost_batches", "resets")
    more = ("malformed", "purges", "timeouts", "abandoned", "overflows", "holdings")
    return {k: w.get(k) for k in (*keys, *more)}
