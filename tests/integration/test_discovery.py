"""Integration: discovery drives real simulators. A pod's own topic is what
its SUB socket subscribes with, and the static pods file, through the
reconciler, follows, moves (purging) and drops engines."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import kvsync
from kvsync.discovery import Reconciler, StaticSource
from kvsync.sim import SimProcess

from .conftest import MODEL, assert_index_is_truth, caught_up, pod_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Sims = Callable[..., SimProcess]


def test_a_pods_topic_overrides_the_managers(sims: Sims, index: kvsync.Index) -> None:
    engines = {"a": sims("--topic", "kv.a", "--seed", "1"), "b": sims("--seed", "2")}
    # Without its own topic a pod gets the manager's, which matches neither
    # engine's live messages. No idle probe: only live messages can catch up.
    manager = kvsync.EventManager(index, topic="other", idle_probe=3600.0, replay_timeout=1.0)
    pods = {
        "a": kvsync.Pod(
            name="a",
            model=MODEL,
            host="127.0.0.1",
            pub_port=engines["a"].pub_port,
            replay_port=engines["a"].replay_port,
            topic="kv.a",
        ),
        "b": pod_of("b", engines["b"]),
    }
    with manager:
        for pod in pods.values():
            manager.add_pod(pod)
        for name in pods:
            wait_for(lambda n=name: manager.status()[n].state == "live", what=f"{name} live")
        for sim in engines.values():
            sim.request("step", n=15)
        wait_for(lambda: caught_up(manager, "a", engines["a"]), what="live batches on kv.a")
        assert_index_is_truth(index, "a", engines["a"])
        assert manager.status()["a"].replays == 1  # the first one: the rest came live
        # "b" subscribed with "other": its live batches never arrived
        assert manager.status()["b"].last_seq is None
        assert index.worker_stats("b")["blocks"] == 0


def test_the_static_file_follows_moves_and_drops_engines(
    sims: Sims, index: kvsync.Index, manager: kvsync.EventManager, tmp_path: Path
) -> None:
    first, second = sims("--seed", "3"), sims("--seed", "4")
    path = tmp_path / "pods.json"

    def point_at(sim: SimProcess | None) -> None:
        pods = [] if sim is None else [pod_of("p", sim).__dict__]
        path.write_text(json.dumps({"pods": pods}))

    rec = Reconciler(manager)
    src = StaticSource(path, rec)
    point_at(first)
    assert src.load_once()
    first.request("step", n=20)
    wait_for(lambda: caught_up(manager, "p", first), what="the first engine")
    assert_index_is_truth(index, "p", first)
    assert index.worker_stats("p")["blocks"] > 0
    # The same pod name at another address: what the first engine held is
    # purged, so the index ends up equal to the second engine alone.
    point_at(second)
    assert src.load_once()
    second.request("step", n=5)
    wait_for(lambda: caught_up(manager, "p", second), what="the second engine")
    assert_index_is_truth(index, "p", second)
    point_at(None)
    assert src.load_once()
    assert "p" not in index.workers() and manager.pods() == {}
    assert src.errors == 0
