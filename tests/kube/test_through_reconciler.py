"""KubernetesSource through the real Reconciler and EventManager, with
simulated engines as the pods: what the fake cluster says decides which
engines the index follows, and a pod that moves or goes away is purged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvsync
from kvsync.discovery import Reconciler, StaticSource
from kvsync.discovery.kubernetes import KubernetesSource
from kvsync.sim import SimProcess

from .conftest import wait_for
from .fake_apiserver import FakeApiServer, Obj, pod

pytestmark = pytest.mark.integration

MODEL = "sim-model"


@pytest.fixture
def engines() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        sim = SimProcess("--block-size", "4", "--capacity", "256", *args)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.close()


@pytest.fixture
def stack() -> Iterator[tuple[kvsync.Index, kvsync.EventManager, Reconciler]]:
    index = kvsync.Index()
    manager = kvsync.EventManager(index, replay_timeout=1.0, clean_secs=2.0)
    manager.start()
    try:
        yield index, manager, Reconciler(manager)
    finally:
        manager.stop()


def ports_of(sim: SimProcess) -> dict[str, str]:
    return {
        "kvsync.io/kv-events-port": str(sim.pub_port),
        "kvsync.io/kv-replay-port": str(sim.replay_port),
    }


def engine_pod(name: str, sim: SimProcess) -> Obj:
    labels = {"kvsync.io/kv-events": "true", "kvsync.io/model": MODEL}
    return pod(name, ip="127.0.0.1", labels=labels, annotations=ports_of(sim))


def caught_up(manager: kvsync.EventManager, worker: str, sim: SimProcess) -> bool:
    st = manager.status().get(worker)
    want = sim.request("stats")["seq"][0]
    return st is not None and st.state == "live" and st.last_seq == want


def held_by(sim: SimProcess) -> int:
    return len({tuple(p) for p in sim.request("truth")["ranks"][0]})


def test_the_cluster_decides_which_engines_the_index_follows(
    apiserver: FakeApiServer,
    kubeconfig: Path,
    engines: Callable[..., SimProcess],
    stack: tuple[kvsync.Index, kvsync.EventManager, Reconciler],
) -> None:
    index, manager, reconciler = stack
    first = engines()
    first.request("step", n=6)
    apiserver.put(engine_pod("p", first))
    src = KubernetesSource(
        reconciler,
        kubeconfig=kubeconfig,
        namespace="default",
        watch_timeout=2,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    with src:
        wait_for("the reconciler synced", lambda: reconciler.synced)
        wait_for("p caught up", lambda: caught_up(manager, "p", first))
        assert index.worker_stats("p")["blocks"] == held_by(first) > 0
        info = reconciler.workers()["p"]
        assert (info.source, info.instance, info.tenant, info.ready) == (
            "kubernetes",
            "p",
            "default",
            True,
        )

        # Not Ready: still followed (its holdings stay), but not routable.
        apiserver.patch("p", lambda o: o["status"]["conditions"][0].update(status="False"))
        wait_for("p not ready", lambda: not reconciler.workers()["p"].ready)
        assert index.worker_stats("p")["blocks"] == held_by(first)

        # The pod now points at another engine: what the first one held is
        # purged and the new one followed under the same name.
        second = engines("--seed", "7")
        second.request("step", n=2)
        assert held_by(second) != held_by(first)
        apiserver.patch("p", lambda o: o["metadata"]["annotations"].update(ports_of(second)))
        wait_for("p on the second engine", lambda: caught_up(manager, "p", second))
        assert index.worker_stats("p")["blocks"] == held_by(second)

        # Terminating: purged at once.
        apiserver.delete("p")
        wait_for("p unfollowed", lambda: "p" not in manager.status())
        assert index.stats()["holdings"] == 0 and reconciler.workers() == {}
        assert src.errors == 0


def test_a_pod_name_another_source_holds_is_refused_and_reported(
    apiserver: FakeApiServer,
    kubeconfig: Path,
    engines: Callable[..., SimProcess],
    stack: tuple[kvsync.Index, kvsync.EventManager, Reconciler],
    tmp_path: Path,
) -> None:
    _, manager, reconciler = stack
    sim = engines()
    pods_file = tmp_path / "pods.yaml"
    pods_file.write_text(
        f"pods: [{{name: p, model: {MODEL}, host: 127.0.0.1, pub_port: {sim.pub_port}, "
        f"replay_port: {sim.replay_port}}}]\n"
    )
    static = StaticSource(pods_file, reconciler)
    assert static.load_once()
    apiserver.put(engine_pod("p", sim))
    src = KubernetesSource(reconciler, kubeconfig=kubeconfig, namespace="default", watch_timeout=2)
    with src:
        wait_for("the refusal", lambda: src.errors)
    assert src.last_error is not None and "'p'" in src.last_error
    assert reconciler.publishers()["p"].source == "static"  # the static pod is untouched
    assert "p" in manager.status()


def test_restarts_reach_the_reconciler(
    apiserver: FakeApiServer,
    kubeconfig: Path,
    engines: Callable[..., SimProcess],
    stack: tuple[kvsync.Index, kvsync.EventManager, Reconciler],
) -> None:
    _, _, reconciler = stack
    sim = engines()
    apiserver.put(engine_pod("p", sim))

    def restart(o: Obj) -> Any:
        o["status"]["containerStatuses"][0]["restartCount"] += 1

    with KubernetesSource(reconciler, kubeconfig=kubeconfig, namespace="default", watch_timeout=2):
        wait_for("p", lambda: "p" in reconciler.publishers())
        apiserver.patch("p", restart)
        wait_for("the restart", lambda: reconciler.publishers()["p"].restarts == 1)
