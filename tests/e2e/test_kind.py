"""End to end on a real cluster (``make e2e`` makes one with kind): deploys
deploy/overlays/sim (kvsync serve and simulated engines), then checks
through the HTTP API that discovery follows the engines as they run, scale
and go, that their events reach the index, and that routing answers with
them. Takes the cluster from ``KUBECONFIG``; skipped without one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvsync

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "deploy" / "overlays" / "sim"
NAMESPACE = "kvsync"
TOKEN = "sim-only-not-a-secret"  # deploy/overlays/sim/token.yaml
MODEL = "sim-model"
DEADLINE = 240.0

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def cluster_or_skip() -> None:
    config = os.environ.get("KUBECONFIG")
    if not config or not all(Path(p).is_file() for p in config.split(os.pathsep)):
        pytest.skip(
            "no cluster: set KUBECONFIG to a cluster's kubeconfig "
            "(`make e2e` creates a kind cluster, loads the image and sets it)"
        )
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")


def kubectl(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(
        ["kubectl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the service may be restarting: try again
            last = e
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Api:
    """The endpoints these tests use: through ``kvsync.Client`` when the
    package has it, else plain HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        client = getattr(kvsync, "Client", None)
        self.client = client(base, token=TOKEN, timeout=10.0) if client else None

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def workers(self) -> dict[str, dict[str, Any]]:
        if self.client is not None:
            return dict(self.client.workers())
        return dict(self._json("GET", "/v1/workers"))

    def stats(self) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.client.stats())
        return dict(self._json("GET", "/v1/stats"))

    def route(self, tokens: list[int]) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.client.route(MODEL, tokens))
        return dict(self._json("POST", "/v1/route", {"model": MODEL, "token_ids": tokens}))

    def query(self, tokens: list[int]) -> dict[str, Any]:
        if self.client is not None:
            return dict(self.client.query(MODEL, tokens))
        return dict(self._json("POST", "/query", {"model": MODEL, "token_ids": tokens}))


def engine_pods() -> set[str]:
    out = kubectl(
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=sim-engine",
        "--field-selector",
        "status.phase=Running",
        "-o",
        "json",
    )
    return {
        p["metadata"]["name"]
        for p in json.loads(out)["items"]
        if not p["metadata"].get("deletionTimestamp")
    }


@pytest.fixture(scope="module")
def deployed() -> Iterator[None]:
    cluster_or_skip()
    kubectl("apply", "-k", str(OVERLAY))
    try:
        image = os.environ.get("KVSYNC_E2E_IMAGE")
        if image:
            kubectl("-n", NAMESPACE, "set", "image", "deployment/kvsync", f"kvsync={image}")
            kubectl("-n", NAMESPACE, "set", "image", "deployment/sim-engine", f"engine={image}")
        for name in ("sim-engine", "kvsync"):
            kubectl("-n", NAMESPACE, "rollout", "status", f"deployment/{name}", "--timeout=300s")
        yield
    finally:
        kubectl("delete", "-k", str(OVERLAY), "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def api(deployed: None) -> Iterator[Api]:
    proc = subprocess.Popen(
        ["kubectl", "-n", NAMESPACE, "port-forward", "service/kvsync", ":8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl port-forward said {line!r}"
        yield Api(f"http://127.0.0.1:{match.group(1)}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def followed(api: Api) -> set[str]:
    return {w["instance"] for w in api.workers().values() if w["source"] == "kubernetes"}


def test_discovery_follows_the_running_engines_and_their_events_reach_the_index(api: Api) -> None:
    pods = wait_for("two running engines", lambda: len(engine_pods()) == 2 and engine_pods())
    wait_for("kvsync following both", lambda: followed(api) == pods)
    workers = api.workers()
    for w in workers.values():
        assert w["model"] == MODEL and w["ready"] is True
    wait_for("live streams", lambda: all(w["state"] == "live" for w in api.workers().values()))
    wait_for("blocks in the index", lambda: api.stats()["blocks"] > 0)


def test_routing_and_query_answer_with_the_discovered_engines(api: Api) -> None:
    pods = wait_for("kvsync following engines", lambda: followed(api))
    route = api.route(list(range(64)))
    assert route["instance"] in pods
    assert {s["instance"] for s in route["scores"]} == pods
    answer = api.query(list(range(64)))
    assert set(answer["default"]) == pods


def test_scaling_and_deleting_engines_is_followed(api: Api) -> None:
    kubectl("-n", NAMESPACE, "scale", "deployment/sim-engine", "--replicas=3")
    pods = wait_for("three running engines", lambda: len(engine_pods()) == 3 and engine_pods())
    wait_for("kvsync following three", lambda: followed(api) == pods)
    victim = sorted(pods)[0]
    kubectl("-n", NAMESPACE, "delete", "pod", victim, "--wait=false")
    wait_for("the deleted engine unfollowed", lambda: victim not in followed(api))
    kubectl("-n", NAMESPACE, "scale", "deployment/sim-engine", "--replicas=1")
    wait_for(
        "kvsync following the one engine left",
        lambda: len(engine_pods()) == 1 and followed(api) == engine_pods(),
    )
