"""``kvsync serve`` with a ``[kubernetes]`` source against the protocol-level
fake API server: pods the cluster lists are followed (source
``kubernetes``), answered in ``/query`` under tenant ``default``, dropped
when deleted, and a container restart reaches the stream as a probe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsync.sim import SimProcess

from ..integration.serving import Serve
from .conftest import wait_for
from .fake_apiserver import FakeApiServer
from .test_through_reconciler import MODEL, engine_pod, held_by

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


Rows = dict[str, dict[str, object]]


def caught_up_rows(server: Serve, worker: str, sim: SimProcess) -> Rows | None:
    rows = server.client.workers()
    row = rows.get(worker)
    want = sim.request("stats")["seq"][0]
    return rows if row is not None and row["state"] == "live" and row["last_seq"] == want else None


@pytest.fixture
def engine() -> Iterator[SimProcess]:
    sim = SimProcess("--block-size", "4", "--capacity", "256")
    try:
        yield sim
    finally:
        sim.close()


def test_serve_follows_the_pods_the_cluster_lists(
    apiserver: FakeApiServer, kubeconfig: Path, engine: SimProcess, tmp_path: Path
) -> None:
    engine.request("step", n=6)
    apiserver.put(engine_pod("p", engine))
    flags = ("--kubernetes", "--kubernetes-kubeconfig", str(kubeconfig))
    server = Serve(tmp_path / "serve.log", *flags, "--kubernetes-namespace", "default")
    try:
        rows = wait_for("p followed and live", lambda: caught_up_rows(server, "p", engine))
        assert rows["p"]["source"] == "kubernetes" and rows["p"]["ready"] is True
        truth = engine.request("truth")["ranks"][0]
        prompt = max(truth, key=len)
        answer = server.client.query(MODEL, prompt)
        assert answer["default"]["p"]["longest_matched"] == len(prompt) // 4 * 4 > 0
        assert server.client.workers()["p"]["holdings"] == held_by(engine)
        metrics = server.client.metrics()
        assert 'kvsync_discovery_pods{source="kubernetes"} 1.0' in metrics
        assert 'kvsync_discovery_errors_total{source="kubernetes"} 0.0' in metrics
        # deleted from the cluster: unfollowed and purged
        apiserver.delete("p")
        wait_for("p unfollowed", lambda: "p" not in server.client.workers())
        assert server.client.stats()["holdings"] == 0
    finally:
        server.close()


def test_a_bad_kubernetes_table_stops_start_up_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "kvsync.toml"
    config.write_text('[kubernetes]\nkubeconfig = "/nonexistent/kubeconfig"\n')
    with pytest.raises(RuntimeError, match=r"exited with 2: .*\[kubernetes\]"):
        Serve(tmp_path / "serve.log", "--config", str(config))
