"""Fixtures for the integration layer: simulators in child processes, an
EventManager on loopback, and the check that the index equals the
simulators' ground truth."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import kvsync
from kvsync.sim import SimProcess

MODEL = "sim-model"


def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `cond` until it holds; fail loudly at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def sims() -> Iterator[Callable[..., SimProcess]]:
    """Start simulators; every one is stopped at the end of the test."""
    started: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        s = SimProcess("--block-size", "4", "--capacity", "256", *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture
def index() -> kvsync.Index:
    return kvsync.Index()


@pytest.fixture
def manager(index: kvsync.Index) -> Iterator[kvsync.EventManager]:
    m = kvsync.EventManager(index, replay_timeout=1.0, clean_secs=2.0)
    m.start()
    yield m
    m.stop()


def pod_of(name: str, sim: SimProcess, dp_size: int = 1) -> kvsync.Pod:
    return kvsync.Pod(
        name=name,
        model=MODEL,
        host="127.0.0.1",
        pub_port=sim.pub_port,
        replay_port=sim.replay_port,
        dp_size=dp_size,
    )


def caught_up(manager: kvsync.EventManager, worker: str, sim: SimProcess, rank: int = 0) -> bool:
    st = manager.status().get(worker)
    want = sim.request("stats")["seq"][rank]
    return st is not None and st.state in ("live", "degraded") and st.last_seq == want


def expected_depth(path: list[int], held: set[tuple[int, ...]], bs: int) -> int:
    n = 0
    while n < len(path) // bs and tuple(path[: (n + 1) * bs]) in held:
        n += 1
    return n


def assert_index_is_truth(
    index: kvsync.Index, worker: str, sim: SimProcess, rank: int = 0, exact: bool = True
) -> None:
    """Every block the engine holds is matched to exactly its depth, and the
    index holds nothing else for the worker. With `exact=False` (history
    lost), the index may hold less but never more."""
    truth: dict[str, Any] = sim.request("truth")
    bs = truth["block_size"]
    paths = truth["ranks"][rank]
    held = {tuple(p) for p in paths}
    blocks = index.worker_stats(worker)["blocks"]
    if exact:
        assert blocks == len(held), f"{worker}: index holds {blocks} blocks, engine {len(held)}"
    else:
        assert blocks <= len(held)
    for p in paths:
        want = expected_depth(p, held, bs)
        got = index.match(MODEL, p)[worker]
        if exact:
            assert got == want, (
                f"{worker}: prefix of {len(p) // bs} blocks matched {got}, engine holds {want}"
            )
        else:
            assert got <= want, f"{worker}: false positive ({got} > {want})"
