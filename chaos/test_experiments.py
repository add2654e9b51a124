"""The Chaos Mesh experiments (``chaos/experiments/*.yaml``) parse, and
carry the fields Chaos Mesh's CRDs (chaos-mesh.org/v1alpha1) require for
their kind and action, with values of the right form; and they target
the labels kvsync's deploy manifests use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

EXPERIMENTS = sorted((Path(__file__).parent / "experiments").glob("*.yaml"))
ENGINE_LABEL = {"kvsync.io/kv-events": "true"}
KVSYNC_LABEL = {"app.kubernetes.io/name": "kvsync"}
MODES = {"one", "all", "fixed", "fixed-percent", "random-max-percent"}
# Go's time.ParseDuration, which Chaos Mesh uses for `duration` and latencies.
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
PERCENT = re.compile(r"^(100|[1-9]?\d)(\.\d+)?$")
NETWORK_ACTIONS = {"netem", "delay", "loss", "duplicate", "corrupt", "partition", "bandwidth"}
POD_ACTIONS = {"pod-kill", "pod-failure", "container-kill"}


def load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one object per file, found {len(docs)}"
    doc: dict[str, Any] = docs[0]
    return doc


def check_selector(where: str, sel: dict[str, Any]) -> dict[str, str]:
    assert isinstance(sel, dict), f"{where}: selector must be a map"
    labels = sel.get("labelSelectors")
    assert isinstance(labels, dict) and labels, f"{where}: selector needs labelSelectors"
    assert all(isinstance(v, str) for v in labels.values()), f"{where}: label values are strings"
    return labels


def check_mode(where: str, spec: dict[str, Any]) -> None:
    assert spec.get("mode") in MODES, f"{where}: mode {spec.get('mode')!r} not in {MODES}"
    if spec["mode"] not in ("one", "all"):
        assert "value" in spec, f"{where}: mode {spec['mode']} needs value"


def test_there_are_experiments_of_every_kind() -> None:
    kinds = {load(p)["kind"] for p in EXPERIMENTS}
    assert kinds == {"NetworkChaos", "PodChaos", "StressChaos"}
    actions = {load(p)["spec"].get("action") for p in EXPERIMENTS}
    assert {"partition", "loss", "delay", "pod-kill", "pod-failure"} <= actions


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_has_the_fields_its_crd_requires(path: Path) -> None:
    doc = load(path)
    where = path.name
    assert doc["apiVersion"] == "chaos-mesh.org/v1alpha1", where
    meta = doc["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), where
    assert meta.get("namespace"), f"{where}: chaos objects are namespaced"
    spec = doc["spec"]
    check_mode(where, spec)
    labels = check_selector(where, spec["selector"])
    assert labels in (ENGINE_LABEL, KVSYNC_LABEL), f"{where}: targets {labels}"
    if "duration" in spec:
        assert DURATION.match(spec["duration"]), f"{where}: duration {spec['duration']!r}"
    kind = doc["kind"]
    if kind == "NetworkChaos":
        action = spec["action"]
        assert action in NETWORK_ACTIONS, where
        assert spec.get("direction", "to") in ("to", "from", "both"), where
        if "target" in spec:
            check_mode(f"{where} target", spec["target"])
            assert check_selector(where, spec["target"]["selector"]) == KVSYNC_LABEL, where
        if action == "delay":
            d = spec["delay"]
            assert DURATION.match(d["latency"]), where
            assert DURATION.match(d.get("jitter", "0ms")), where
            if "reorder" in d:
                assert PERCENT.match(d["reorder"]["reorder"]), where
        if action == "loss":
            assert PERCENT.match(spec["loss"]["loss"]), where
        if action == "duplicate":
            assert PERCENT.match(spec["duplicate"]["duplicate"]), where
        assert "duration" in spec, f"{where}: a network fault needs a duration to end"
    elif kind == "PodChaos":
        assert spec["action"] in POD_ACTIONS, where
        if spec["action"] == "container-kill":
            assert spec.get("containerNames"), f"{where}: container-kill needs containerNames"
        if spec["action"] == "pod-failure":
            assert "duration" in spec, f"{where}: pod-failure needs a duration"
    elif kind == "StressChaos":
        stressors = spec["stressors"]
        assert stressors, where
        if "memory" in stressors:
            assert stressors["memory"]["workers"] >= 1, where
            assert re.fullmatch(r"\d+(B|KB|MB|GB|%)", stressors["memory"]["size"]), where
        if "cpu" in stressors:
            assert stressors["cpu"]["workers"] >= 1, where
            assert 0 <= stressors["cpu"]["load"] <= 100, where
        assert "duration" in spec, where
    else:
        pytest.fail(f"{where}: unexpected kind {kind}")


def test_a_broken_experiment_is_caught(tmp_path: Path) -> None:
    """The checks above can fail: an experiment without its loss value."""
    bad = tmp_path / "bad.yaml"
    doc = load(Path(__file__).parent / "experiments" / "network-loss.yaml")
    del doc["spec"]["loss"]
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(KeyError):
        test_experiment_has_the_fields_its_crd_requires(bad)
