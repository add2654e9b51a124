"""bench.nightly's driver without measuring anything: the benches of other
branches (bench/peers, bench.serve_load) are skipped with a recorded reason
when absent or too slow to build, a failing measurement is recorded and
sets the exit status, and results.json has the documented shape."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import nightly
from bench.results import load_results


def test_absent_benches_are_skipped_with_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nightly, "PEERS_MANIFEST", tmp_path / "no-peers" / "Cargo.toml")
    monkeypatch.setattr(nightly.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "out"
    assert nightly.main(["--quick", "--out", str(out), "--only", "serve_load,peers"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert {"commit", "date", "machine", "metrics"} <= set(doc)
    assert {"cpu", "cores", "memory", "python", "rustc"} <= set(doc["machine"])
    assert doc["mode"] == "quick" and doc["metrics"] == {}
    assert (
        "bench/serve_load.py is not on this branch"
        in doc["skipped"]["routing_decision_latency_p99_us"]
    )
    assert "bench/peers" in doc["skipped"]["vs_peers_*"]
    load_results(out / "results.json")  # readable by bench.compare


def test_peers_too_slow_to_build_is_a_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "Cargo.toml"
    manifest.write_text("[package]\n")
    monkeypatch.setattr(nightly, "PEERS_MANIFEST", manifest)

    def slow(cmd: list[str], **kw: Any) -> Any:
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout", 0))

    monkeypatch.setattr(nightly.subprocess, "run", slow)
    with pytest.raises(nightly.Skip, match="could not build bench/peers within 42 s"):
        nightly.peers(nightly.Sizes.quick(), tmp_path, 42)


def test_a_failed_measurement_is_recorded_and_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(sizes: Any) -> Any:
        raise RuntimeError("batches lost: e0")

    monkeypatch.setattr(nightly.probes, "engine_restart", broken)
    out = tmp_path / "out"
    assert nightly.main(["--quick", "--out", str(out), "--only", "engine_restart"]) == 1
    doc = json.loads((out / "results.json").read_text())
    assert "batches lost: e0" in doc["skipped"]["recovery_engine_restart_s"]
    assert "engine_restart" in doc["errors"]


def test_each_metric_is_the_median_of_its_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        nightly.probes, "engine_restart", lambda s: {"recovery_engine_restart_s": [0.3, 0.1, 0.2]}
    )
    out = tmp_path / "out"
    assert nightly.main(["--quick", "--out", str(out), "--only", "engine_restart"]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]["recovery_engine_restart_s"]
    assert m == {"value": 0.2, "unit": "s", "better": "lower", "runs": [0.3, 0.1, 0.2]}
