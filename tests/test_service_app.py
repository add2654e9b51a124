"""The HTTP layer of ``kvsync serve`` in-process: authentication, body
limits, malformed and mistyped JSON (400 naming the field), unknown paths,
and the Mooncake answer shape. Engines are not needed here; the
integration tests (tests/integration/test_serve.py) follow real ones."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvsync.service.app import make_app
from kvsync.service.config import Settings, load
from kvsync.service.mooncake import tokens_by_instance
from kvsync.service.server import build_service
from kvsync.service.state import Service

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("KVSYNC_") and key != "KVSYNC_SHARED":
            monkeypatch.delenv(key)


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"token": TOKEN, "max_body_bytes": 4096}
    base.update(kw)
    return load(None, base)


@pytest.fixture
def service() -> Iterator[Service]:
    svc = build_service(settings())
    yield svc
    svc.manager.stop()


Body = Callable[[TestClient[Any, Any]], Awaitable[None]]


def with_client(service: Service, body: Body) -> None:
    async def main() -> None:
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(service)))
        await client.start_server()
        try:
            await body(client)
        finally:
            await client.close()

    asyncio.run(main())


def test_every_endpoint_but_health_needs_the_token(service: Service) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        for path in ("/healthz", "/readyz"):
            r = await c.get(path)
            assert r.status in (200, 503), path
        for method, path in [
            ("GET", "/v1/workers"),
            ("GET", "/v1/stats"),
            ("GET", "/metrics"),
            ("GET", "/v1/snapshot"),
            ("GET", "/openapi.json"),
            ("POST", "/query"),
            ("POST", "/register"),
            ("POST", "/v1/route"),
            ("GET", "/no/such/path"),
        ]:
            r = await c.request(method, path, json={})
            assert r.status == 401, (method, path)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert "Authorization: Bearer" in (await r.json())["error"]
        r = await c.get("/v1/stats", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401 and "wrong bearer token" in (await r.json())["error"]
        r = await c.get("/v1/stats", headers={"Authorization": TOKEN})  # no scheme
        assert r.status == 401
        r = await c.get("/v1/stats", headers=AUTH)
        assert r.status == 200
        stats = await r.json()
        assert {"workers", "blocks", "holdings", "memory_bytes", "uptime_seconds"} <= set(stats)

    with_client(service, body)


def test_without_a_token_everything_is_open() -> None:
    svc = build_service(settings(token=None))
    try:

        async def body(c: TestClient[Any, Any]) -> None:
            r = await c.get("/v1/workers")
            assert r.status == 200 and await r.json() == {}

        with_client(svc, body)
    finally:
        svc.manager.stop()


def test_a_body_over_the_limit_gets_413(service: Service) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        big = b'{"model": "m", "token_ids": [' + b"1," * 4000 + b"1]}"
        r = await c.post("/query", data=big, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status == 413
        assert "max_body_bytes=4096" in (await r.json())["error"]

        async def chunks() -> Any:  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1000

        r = await c.post("/v1/route", data=chunks(), headers=AUTH)
        assert r.status == 413
        r = await c.get("/healthz")
        assert r.status == 200

    with_client(service, body)


@pytest.mark.parametrize(
    ("path", "payload", "needle"),
    [
        ("/query", b"{not json", "malformed JSON"),
        ("/query", b"", "empty body"),
        ("/query", b"[1, 2]", "invalid request"),
        ("/query", b'{"token_ids": [1]}', "`model`"),
        ("/query", b'{"model": "m", "token_ids": [1, "x"]}', "`token_ids[1]`"),
        ("/query", b'{"model": "m", "token_ids": [-1]}', "`token_ids[0]`"),
        ("/query", b'{"model": "m", "token_ids": [4294967296]}', "`token_ids[0]`"),
        ("/query", b'{"model": "", "token_ids": []}', "`model`"),
        ("/query_by_hash", b'{"model": "m", "seq_hashes": [18446744073709551616]}', "seq_hashes"),
        ("/query_by_hash", b'{"model": "m", "seq_hashes": "abc"}', "`seq_hashes`"),
        (
            "/register",
            b'{"endpoint": "tcp://h:1", "modelname": "m", "instance_id": "i"}',
            "`block_size`",
        ),
        (
            "/register",
            b'{"endpoint": "h", "modelname": "m", "instance_id": "i", "block_size": 16}',
            "`endpoint`",
        ),
        (
            "/register",
            b'{"endpoint": "tcp://h:99999", "modelname": "m", "instance_id": "i", '
            b'"block_size": 16}',
            "`endpoint`",
        ),
        ("/unregister", b'{"dp_rank": 0}', "`instance_id`"),
        ("/v1/route", b'{"model": "m", "token_ids": [1], "candidates": "a"}', "`candidates`"),
        (
            "/v1/route",
            b'{"model": "m", "token_ids": [1], "extra_keys": [{"a": 1}]}',
            "`extra_keys[0]`",
        ),
        ("/v1/release", b"{}", "`request_id`"),
        (
            "/v1/route",
            b'{"model": "m", "token_ids": [1], "extra_keys": [['
            + b"[" * 1500
            + b"]" * 1500
            + b"]]}",
            "nested too deeply",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(
    service: Service, path: str, payload: bytes, needle: str
) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        r = await c.post(path, data=payload, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status == 400, await r.text()
        answer = await r.json()
        assert needle in answer["error"] and answer["status"] == 400
        assert (await c.get("/healthz")).status == 200  # still serving

    with_client(service, body)


def test_unknown_paths_and_methods_get_json_errors(service: Service) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        r = await c.get("/v2/nothing", headers=AUTH)
        assert r.status == 404 and "/v2/nothing" in (await r.json())["error"]
        r = await c.get("/query", headers=AUTH)
        assert r.status == 405 and "GET" in (await r.json())["error"]

    with_client(service, body)


def test_route_for_a_model_nobody_serves_is_404(service: Service) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        r = await c.post("/v1/route", json={"model": "ghost", "token_ids": [1, 2]}, headers=AUTH)
        assert r.status == 404 and "ghost" in (await r.json())["error"]
        r = await c.post("/query", json={"model": "ghost", "token_ids": [1, 2]}, headers=AUTH)
        assert r.status == 200 and await r.json() == {}

    with_client(service, body)


def test_snapshot_post_without_a_path_is_409_and_get_is_loadable(
    service: Service, tmp_path: Path
) -> None:
    import kvsync

    async def body(c: TestClient[Any, Any]) -> None:
        r = await c.post("/v1/snapshot", headers=AUTH)
        assert r.status == 409 and "`snapshot`" in (await r.json())["error"]
        r = await c.get("/v1/snapshot", headers=AUTH)
        assert r.status == 200 and r.content_type == "application/octet-stream"
        (tmp_path / "s").write_bytes(await r.read())

    with_client(service, body)
    assert kvsync.Index.load(tmp_path / "s").stats()["workers"] == 0


def test_openapi_describes_every_route(service: Service) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        doc = await (await c.get("/openapi.json", headers=AUTH)).json()
        app = make_app(service)
        routes = {
            (r.method.lower(), r.resource.canonical)
            for r in app.router.routes()
            if r.resource is not None and r.method != "HEAD"
        }
        described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == described
        assert doc["paths"]["/healthz"]["get"]["security"] == []

    with_client(service, body)


def test_metrics_list_every_family_of_the_spec(service: Service) -> None:
    async def body(c: TestClient[Any, Any]) -> None:
        await c.get("/healthz")
        text = await (await c.get("/metrics", headers=AUTH)).text()
        for name in (
            "kvsync_index_workers",
            "kvsync_index_blocks",
            "kvsync_index_holdings",
            "kvsync_index_memory_bytes",
            "kvsync_request_duration_seconds",
            "kvsync_event_lag_seconds",
            'kvsync_discovery_pods{source="static"}',
            'kvsync_discovery_errors_total{source="static"}',
            'kvsync_request_duration_seconds_count{endpoint="/healthz"}',
        ):
            assert name in text, name

    with_client(service, body)


class _Info:
    def __init__(self, worker: str, instance: str, tenant: str, rank: int) -> None:
        self.worker, self.instance, self.tenant, self.dp_rank = worker, instance, tenant, rank
        self.model = "m"


class _Workers:
    def __init__(self, infos: list[_Info]) -> None:
        self.infos = {i.worker: i for i in infos}

    def workers(self) -> dict[str, _Info]:
        return self.infos


def test_tokens_by_instance_takes_the_max_over_ranks_and_lists_everyone() -> None:
    svc: Any = type("S", (), {})()
    svc.workers_view = None  # read the reconciler directly
    svc.reconciler = _Workers(
        [
            _Info("a/dp0", "a", "default", 0),
            _Info("a/dp1", "a", "default", 1),
            _Info("b", "b", "default", 0),
            _Info("t/dp0", "t", "team", 0),
        ]
    )
    detail = {
        "a/dp0": {"gpu": 2, "cpu": 3, "storage": 0, "any": 3},
        "a/dp1": {"gpu": 4, "cpu": 0, "storage": 1, "any": 4},
    }
    out = tokens_by_instance(svc, "m", detail, 16, None, None)
    assert out == {
        "default": {
            "a": {
                "longest_matched": 64,
                "GPU": 64,
                "CPU": 48,
                "DISK": 16,
                "DP": {"0": 48, "1": 64},
            },
            "b": {"longest_matched": 0, "GPU": 0, "CPU": 0, "DISK": 0, "DP": {"0": 0}},
        },
        "team": {"t": {"longest_matched": 0, "GPU": 0, "CPU": 0, "DISK": 0, "DP": {"0": 0}}},
    }
    assert list(tokens_by_instance(svc, "m", detail, 16, "team", None)) == ["team"]
    assert tokens_by_instance(svc, "m", detail, 16, None, "b") == {
        "default": {"b": out["default"]["b"]}
    }
    assert tokens_by_instance(svc, "other", detail, 16, None, None) == {}


def test_readiness_waits_for_discovery_then_workers_then_grace(tmp_path: Path) -> None:
    import json

    pods = tmp_path / "pods.json"
    pods.write_text(
        json.dumps({"pods": [{"name": "p", "model": "m", "host": "127.0.0.1", "pub_port": 1}]})
    )
    svc = build_service(settings(pods=str(pods), ready_grace=10))
    now = [100.0]
    svc.clock = lambda: now[0]
    try:
        assert svc.not_ready() == ["discovery has not completed its first sync"]
        assert svc.static is not None and svc.static.load_once()
        assert svc.not_ready() == ["worker 'p' has not caught up with its engine yet"]
        now[0] += 9.0
        assert svc.not_ready() != []
        now[0] += 2.0  # past ready_grace: stop waiting for it
        assert svc.not_ready() == []
        svc.first_seen["p"] = now[0]  # a worker that caught up once stays counted
        svc.caught_up.add("p")
        assert svc.not_ready() == []
    finally:
        svc.manager.stop()


def test_readiness_names_a_broken_pods_file(tmp_path: Path) -> None:
    pods = tmp_path / "pods.json"
    pods.write_text('{"pods": [{"name": "p"}]}')  # no model, no host
    svc = build_service(settings(pods=str(pods)))
    try:
        assert svc.static is not None and not svc.static.load_once()
        reasons = svc.not_ready()
        assert reasons[0] == "discovery has not completed its first sync"
        assert reasons[1].startswith("pods file: ") and "pods.json" in reasons[1]
    finally:
        svc.manager.stop()
