"""``EventManager.on_live``: every live batch reaches the hook after it is
applied (what ``kvsync serve`` measures event lag with), and a failing hook
does not stop the stream."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

import kvsync
from kvsync.sim import SimProcess

from .conftest import assert_index_is_truth, caught_up, pod_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_every_live_batch_reaches_the_hook(
    sims: Callable[..., SimProcess], index: kvsync.Index, manager: kvsync.EventManager
) -> None:
    seen: list[tuple[str, int, float]] = []
    lock = threading.Lock()

    def hook(worker: str, batch: list[tuple[bytes, bytes]]) -> None:
        with lock:
            for seq, payload in batch:
                seen.append((worker, int.from_bytes(seq, "big"), kvsync.decode(payload).ts))

    manager.on_live = hook
    sim = sims()
    manager.add_pod(pod_of("p", sim))
    wait_for(lambda: manager.status()["p"].state == "live", what="live")
    sim.request("step", n=12)
    wait_for(lambda: caught_up(manager, "p", sim), what="caught up")
    wait_for(lambda: len(seen) >= 12, what="hook calls")
    with lock:
        seqs = [s for w, s, _ in seen if w == "p"]
    last = sim.request("stats")["seq"][0]
    assert seqs[-12:] == list(range(last - 11, last + 1))
    assert all(ts > 0 for _, _, ts in seen)


def test_a_failing_hook_does_not_stop_the_stream(
    sims: Callable[..., SimProcess], index: kvsync.Index, manager: kvsync.EventManager
) -> None:
    calls = []

    def hook(worker: str, batch: list[tuple[bytes, bytes]]) -> None:
        calls.append(worker)
        raise RuntimeError("broken hook")

    manager.on_live = hook
    sim = sims()
    manager.add_pod(pod_of("p", sim))
    wait_for(lambda: manager.status()["p"].state == "live", what="live")
    sim.request("step", n=5)
    sim.request("drop", n=2)  # a gap: the replay must still be requested
    sim.request("step", n=5)
    wait_for(lambda: caught_up(manager, "p", sim), what="gap filled despite the hook")
    assert calls and manager.status()["p"].lost_batches == 0
    assert_index_is_truth(index, "p", sim)
