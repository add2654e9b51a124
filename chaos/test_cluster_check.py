"""``chaos.cluster_check`` (the oracle against a running deployment) on
loopback: a simulator followed by the library SUT is judged exact; once
the engine has dropped its cache behind kvsync's back, the check run with
the history of the first one finds the false positives and fails."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chaos import cluster_check
from chaos.runner import LIBRARY_MANAGER
from chaos.sut import MODEL, LibrarySUT
from kvsync.simproc import SimProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def followed() -> Iterator[tuple[SimProcess, LibrarySUT]]:
    sim = SimProcess("--block-size", "4", "--capacity", "64")
    sut = None
    try:
        pod = {
            "name": "e0",
            "model": MODEL,
            "host": "127.0.0.1",
            "pub_port": sim.pub_port,
            "replay_port": sim.replay_port,
        }
        # no idle probe within the test: the dropped tail below stays unseen
        sut = LibrarySUT([pod], 4, {**LIBRARY_MANAGER, "idle_probe": 600.0}).start()
        sim.request("step", n=10)
        deadline = time.monotonic() + 20
        while sut.workers().get("e0", {}).get("last_seq") != 9:
            assert time.monotonic() < deadline, "e0 not caught up within 20 s"
            time.sleep(0.05)
        yield sim, sut
    finally:
        if sut is not None:
            sut.close()
        sim.close()


def test_cluster_check_judges_exact_then_catches_a_stale_cache(
    followed: tuple[SimProcess, LibrarySUT], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim, sut = followed
    history = tmp_path / "history.json"
    args = ["--kvsync", f"http://127.0.0.1:{sut.port}", "--model", MODEL]
    args += ["--engine", f"e0=tcp://127.0.0.1:{sim.control_port}", "--history", str(history)]
    assert cluster_check.main(args) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "exact"
    # The engine empties its cache and the AllBlocksCleared batch is lost.
    sim.request("drop", n=1)
    sim.request("clear")
    assert cluster_check.main(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "FALSE POSITIVE" and out["false_positives"] > 0


def test_cluster_check_refuses_a_bad_engine_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cluster_check.main(["--kvsync", "http://x", "--model", "m", "--engine", "e0"])
    assert e.value.code == 2
    assert "INSTANCE=tcp://HOST:PORT" in capsys.readouterr().err
