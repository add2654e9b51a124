"""What ``/v1/route`` does per request in ``kvsync serve`` (the hot path
that bench/serve_load.py measures): the answer is encoded straight from
the router's ``Route`` (the same JSON as ``Route.to_dict()``, without its
deep copy), the workers' stream states are read at most once per
``STATES_TTL`` however many routes ask, and the workers' infos are built
again only when the followed publishers change. In-process, no engines: the pods
file names a port nothing listens on, so the worker exists but never
catches up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvsync.routing import Route
from kvsync.service.app import make_app
from kvsync.service.config import load
from kvsync.service.mooncake import tokens_by_instance
from kvsync.service.server import build_service
from kvsync.service.state import STATES_TTL, CachedStates, Service


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("KVSYNC_") and key != "KVSYNC_SHARED":
            monkeypatch.delenv(key)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    pods = tmp_path / "pods.json"
    rows = [{"name": n, "model": "m", "host": "127.0.0.1", "pub_port": 1} for n in ("a", "b")]
    pods.write_text(json.dumps({"pods": rows}))
    svc = build_service(load(None, {"pods": str(pods)}))
    assert svc.static is not None and svc.static.load_once()
    yield svc
    svc.manager.stop()


def test_route_answer_is_the_route_as_json_without_to_dict(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    routed: list[Route] = []
    real = service.router.route

    def route(*args: Any, **kw: Any) -> Route:
        routed.append(real(*args, **kw))
        return routed[-1]

    def no_deep_copy(self: Route) -> dict[str, Any]:
        raise AssertionError("the /v1/route answer must not deep-copy the Route")

    monkeypatch.setattr(service.router, "route", route)
    monkeypatch.setattr(Route, "to_dict", no_deep_copy)

    async def main() -> None:
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(service)))
        await client.start_server()
        try:
            r = await client.post("/v1/route", json={"model": "m", "token_ids": list(range(40))})
            assert r.status == 200, await r.text()
            got = await r.json()
        finally:
            await client.close()
        # Exactly what Route.to_dict() answered before, field by field.
        want = json.loads(msgspec.json.encode(asdict(routed[0])))
        assert got == want
        assert got["worker"] in ("a", "b")
        assert [s["worker"] for s in got["scores"]] == [got["worker"]] + [
            w for w in ("a", "b") if w != got["worker"]
        ]

    asyncio.run(main())


def test_routes_read_worker_states_at_most_once_per_ttl(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    real = service.manager.status

    def status() -> Any:
        calls[0] += 1
        return real()

    monkeypatch.setattr(service.manager, "status", status)
    for _ in range(20):
        service.router.route("m", list(range(32)))
    # 20 routes in far less than a second: a handful of reads, not 20.
    assert 1 <= calls[0] <= 5, calls[0]


class _Status:
    def __init__(self, state: str) -> None:
        self.state = state


class _Manager:
    def __init__(self) -> None:
        self.calls = 0
        self.state = "live"

    def status(self) -> dict[str, _Status]:
        self.calls += 1
        return {"w": _Status(self.state)}


def test_cached_states_refresh_after_the_ttl_and_when_the_clock_goes_back() -> None:
    manager = _Manager()
    now = [50.0]
    states = CachedStates(manager, clock=lambda: now[0])  # type: ignore[arg-type]
    assert states() == {"w": "live"} and manager.calls == 1
    manager.state = "disconnected"
    now[0] += STATES_TTL / 2
    assert states() == {"w": "live"} and manager.calls == 1  # within the TTL: cached
    now[0] += STATES_TTL
    assert states() == {"w": "disconnected"} and manager.calls == 2
    manager.state = "live"
    now[0] -= 1.0  # a clock that jumped back must not freeze the cache
    assert states() == {"w": "live"} and manager.calls == 3


def test_worker_infos_are_rebuilt_only_when_the_publishers_change(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvsync.discovery.reconciler import Publisher

    built = [0]
    real = Publisher.workers

    def workers(self: Publisher) -> Any:
        built[0] += 1
        return real(self)

    monkeypatch.setattr(Publisher, "workers", workers)
    for _ in range(10):
        service.router.route("m", list(range(32)))
    # Each of the two publishers was turned into WorkerInfos once at most,
    # not once per route.
    assert built[0] <= 2, built[0]
    # A change (a not-ready pod) is seen by the very next route and query.
    pubs = service.reconciler.publishers()
    service.reconciler.replace("static", [replace(pubs["a"], ready=False), pubs["b"]])
    for _ in range(10):
        assert service.router.route("m", list(range(32))).worker == "b"
    assert service.workers_view is not None
    assert [w for w, _ in service.workers_view.of_model("m")] == ["a", "b"]
    assert service.workers_view.of_model("other") == []
    service.reconciler.remove("static", "a")
    assert [w for w, _ in service.workers_view.of_model("m")] == ["b"]
    assert tokens_by_instance(service, "m", {}, 16, None, None) == {
        "default": {"b": {"longest_matched": 0, "GPU": 0, "CPU": 0, "DISK": 0, "DP": {"0": 0}}}
    }
