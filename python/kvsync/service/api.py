"""The kvsync API (SPEC 5): routing (``/v1/route``, ``/v1/release``), the
fleet's state (``/v1/workers``, ``/v1/stats``), snapshots
(``/v1/snapshot``), liveness and readiness (``/healthz``, ``/readyz``) and
Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from kvsync._core import Error
from kvsync.service.app import SERVICE, HTTPError, read_json, reply

__all__ = ["add_routes"]

TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# One extra key: what engines put in extra_keys (strings, ints, nested lists).
ExtraKey = str | int | float | bool | list[Any] | None


class RouteRequest(msgspec.Struct):
    model: NonEmpty
    token_ids: list[TokenId]
    lora_name: str | None = None
    extra_keys: list[list[ExtraKey] | None] | None = None
    candidates: list[str] | None = None
    policy: str | None = None
    request_id: NonEmpty | None = None


class ReleaseRequest(msgspec.Struct):
    request_id: NonEmpty


async def handle_route(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    req = await read_json(request, RouteRequest)
    try:
        route = service.router.route(
            req.model,
            req.token_ids,
            lora=req.lora_name,
            extra_keys=req.extra_keys,
            candidates=req.candidates,
            policy=req.policy,
            request_id=req.request_id,
        )
    except LookupError as e:  # NoWorkersError
        raise HTTPError(404, _text(e)) from None
    except Error as e:
        if isinstance(e, ValueError):
            raise HTTPError(400, _text(e)) from None
        raise HTTPError(503, _text(e)) from None  # NoEligibleWorkerError
    except ValueError as e:  # an unknown policy, tokens out of range
        raise HTTPError(400, _text(e)) from None
    # msgspec encodes the Route dataclass as it is: the same JSON as
    # route.to_dict(), without dataclasses.asdict's deep copy (0.8 ms for
    # 64 scores, most of a route's time under load: bench/README.md).
    return reply(route)


def _text(e: BaseException) -> str:
    # KeyError's str() quotes its message.
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


async def handle_release(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    req = await read_json(request, ReleaseRequest)
    return reply({"request_id": req.request_id, "released": service.router.release(req.request_id)})


async def handle_workers(request: web.Request) -> web.Response:
    return reply(request.app[SERVICE].worker_rows())


async def handle_stats(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    stats: dict[str, Any] = dict(service.index.stats())
    stats["uptime_seconds"] = service.uptime()
    stats.update(service.metrics.rates())
    stats["routes"] = dict(service.router.routes)
    stats["snapshot_age_seconds"] = service.snapshots.age()
    stats["started_from"] = service.snapshots.origin
    return reply(stats)


async def handle_snapshot_get(request: web.Request) -> web.Response:
    data = await request.app[SERVICE].snapshots.dump_bytes()
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={"Content-Disposition": 'attachment; filename="kvsync.snapshot"'},
    )


async def handle_snapshot_post(request: web.Request) -> web.Response:
    snapshots = request.app[SERVICE].snapshots
    if snapshots.path is None:
        raise HTTPError(409, "no snapshot path configured (set the `snapshot` key)")
    try:
        path, size, seconds = await snapshots.save()
    except OSError as e:
        raise HTTPError(500, f"cannot write the snapshot: {e}") from None
    return reply({"path": str(path), "bytes": size, "seconds": seconds})


async def handle_healthz(request: web.Request) -> web.Response:
    return reply({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    reasons = request.app[SERVICE].not_ready()
    if reasons:
        return reply({"status": "not ready", "error": "; ".join(reasons), "reasons": reasons}, 503)
    return reply({"status": "ready"})


async def handle_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[SERVICE].metrics.exposition(request.headers.get("Accept", ""))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/route", handle_route)
    app.router.add_post("/v1/release", handle_release)
    app.router.add_get("/v1/workers", handle_workers)
    app.router.add_get("/v1/stats", handle_stats)
    app.router.add_get("/v1/snapshot", handle_snapshot_get)
    app.router.add_post("/v1/snapshot", handle_snapshot_post)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", handle_metrics)
