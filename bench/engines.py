"""Engines for the stream benchmarks (test_streams.py): simulators in child
processes started and stopped in parallel, a faster stand-in that publishes
pre-generated simulator batches (``python -m bench.streampub``), per-process
CPU and memory readings, and checks of the index against an engine's ground
truth. Nothing here runs at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

import kvsync
from kvsync.sim import SimProcess

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim-model"
_TICK = os.sysconf("SC_CLK_TCK")


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    poll: float = 0.002,
    detail: Callable[[], object] | None = None,
) -> float:
    """Poll ``cond`` until it holds; returns the monotonic time it first held.
    Fails loudly at the deadline, with ``detail()`` in the message."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if cond():
            return now
        if now > deadline:
            extra = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(poll)


def lagging(status: dict[str, Any], names: Sequence[str], want: Sequence[int]) -> dict[str, Any]:
    """The workers not at their engine's seq, with what their stream says."""
    out = {}
    for n, w in zip(names, want, strict=True):
        st = status.get(n)
        if not at_seq(st, w):
            out[n] = (
                st
                if st is None
                else {
                    "want": w,
                    "state": st.state,
                    "last_seq": st.last_seq,
                    "batches": st.batches,
                    "replays": st.replays,
                    "timeouts": st.timeouts,
                    "lost": st.lost_batches,
                    "purges": st.purges,
                    "gaps": st.gaps,
                    "duplicates": st.duplicates,
                }
            )
    return out


class PubProcess(SimProcess):
    """``python -m bench.streampub``: the simulator's sockets and control
    protocol, publishing batches generated before it starts (see
    streampub.py), so that publishing costs a send, not a simulated request."""

    def __init__(self, *args: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.streampub", *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        info = json.loads(self._readline(timeout))
        self.pub_port = info["pub_port"]
        self.replay_port = info["replay_port"]
        self.control_port = info["control_port"]
        self.ctx = zmq.Context()
        self.sock = self._connect()


def start_all(make: Callable[[int], SimProcess], n: int, threads: int = 8) -> list[SimProcess]:
    """``[make(i) for i in range(n)]``, several at a time (each waits for its
    child's first line); if any fails, the ones started are stopped."""
    slots: list[SimProcess | None] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            slots[i] = make(i)
        except BaseException as e:
            errors.append(e)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, range(n)))
    started = [s for s in slots if s is not None]
    if errors:
        close_all(started)
        raise errors[0]
    return started


def close_all(sims: Iterable[SimProcess], threads: int = 8) -> None:
    """Stop every simulator (each has its own deadline), several at a time."""
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda s: s.close(), list(sims)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pod_of(name: str, sim: SimProcess) -> kvsync.Pod:
    return kvsync.Pod(
        name=name,
        model=MODEL,
        host="127.0.0.1",
        pub_port=sim.pub_port,
        replay_port=sim.replay_port,
    )


def seqs(sims: Sequence[SimProcess]) -> list[int]:
    """Each simulator's last published seq (-1: nothing yet)."""
    return [int(s.request("stats")["seq"][0]) for s in sims]


def at_seq(st: Any, want: int) -> bool:
    """The worker applied up to ``want`` and is following the live stream
    (``want`` -1: nothing published, so nothing applied)."""
    return (
        st is not None
        and st.state in ("live", "degraded")
        and st.last_seq == (want if want >= 0 else None)
    )


def truth_mismatch(index: kvsync.Index, worker: str, truth: dict[str, Any]) -> str | None:
    """None when the index holds for ``worker`` exactly what the engine
    holds (``truth`` is the simulator's ``truth`` answer, one rank): every
    block matched to its depth and nothing else; else what differs. The same
    check as tests/integration/conftest.py's ``assert_index_is_truth``."""
    bs = truth["block_size"]
    paths = truth["ranks"][0]
    held = {tuple(p) for p in paths}
    blocks = index.worker_stats(worker)["blocks"]
    if blocks != len(held):
        return f"{worker}: index holds {blocks} blocks, engine {len(held)}"
    for p in paths:
        want = 0
        while want < len(p) // bs and tuple(p[: (want + 1) * bs]) in held:
            want += 1
        got = index.match(MODEL, p)[worker]
        if got != want:
            return f"{worker}: prefix of {len(p) // bs} blocks matched {got}, engine holds {want}"
    return None
