"""The OpenAPI 3.1 description of ``kvsync serve``, served at
``/openapi.json``. Request schemas are generated from the same msgspec
types the handlers decode with, so the description cannot drift from what
the server accepts."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from kvsync import __version__
from kvsync.service import api, mooncake
from kvsync.service.app import reply

__all__ = ["add_routes", "document"]

_REQUESTS: dict[str, type[msgspec.Struct]] = {
    "/register": mooncake.RegisterRequest,
    "/unregister": mooncake.UnregisterRequest,
    "/query": mooncake.QueryRequest,
    "/query_by_hash": mooncake.QueryByHashRequest,
    "/v1/route": api.RouteRequest,
    "/v1/release": api.ReleaseRequest,
}

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
    "required": ["error", "status"],
}
_TOKENS = {
    "type": "object",
    "properties": {
        "longest_matched": {"type": "integer"},
        "GPU": {"type": "integer"},
        "CPU": {"type": "integer"},
        "DISK": {"type": "integer"},
        "DP": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
    "required": ["longest_matched", "GPU", "CPU", "DISK", "DP"],
}
_QUERY_ANSWER = {
    "description": "{tenant: {instance: tokens matched}}: every instance serving the model",
    "type": "object",
    "additionalProperties": {"type": "object", "additionalProperties": _TOKENS},
}
_SCORE = {
    "type": "object",
    "properties": {
        "instance": {"type": "string"},
        "worker": {"type": "string"},
        "matched_tokens": {"type": "integer"},
        "load": {"type": "integer"},
        "score": {"type": "number"},
    },
}
_ROUTE_ANSWER = {
    "type": "object",
    "properties": {
        "instance": {"type": "string"},
        "worker": {"type": "string"},
        "host": {"type": "string"},
        "matched_tokens": {"type": "integer"},
        "blocks": {"type": "integer"},
        "policy": {"type": "string"},
        "scores": {"type": "array", "items": _SCORE},
    },
    "required": ["instance", "worker", "host", "matched_tokens", "blocks", "policy", "scores"],
}
_OBJECT = {"type": "object"}

# path -> (method, summary, answer schema, other statuses)
_ENDPOINTS: dict[str, list[tuple[str, str, dict[str, Any], tuple[int, ...]]]] = {
    "/register": [("post", "Follow a publisher (Mooncake indexer API)", _OBJECT, (400, 409))],
    "/unregister": [("post", "Stop following and purge an instance", _OBJECT, (400, 404))],
    "/query": [
        ("post", "Cached prefix tokens per tenant, instance, tier, dp rank", _QUERY_ANSWER, (400,))
    ],
    "/query_by_hash": [
        ("post", "Like /query, for a prompt given as standard seq hashes", _QUERY_ANSWER, (400,))
    ],
    "/v1/route": [("post", "Choose the worker for a prompt", _ROUTE_ANSWER, (400, 404, 503))],
    "/v1/release": [("post", "A routed request finished", _OBJECT, (400,))],
    "/v1/workers": [("get", "Every followed worker and its stream's counters", _OBJECT, ())],
    "/v1/stats": [("get", "Index statistics, uptime and event rates", _OBJECT, ())],
    "/v1/snapshot": [
        ("get", "The index snapshot (Index.save format)", {}, ()),
        ("post", "Save the snapshot to the configured path now", _OBJECT, (409, 500)),
    ],
    "/healthz": [("get", "200 while the process serves", _OBJECT, ())],
    "/readyz": [("get", "200 once discovery synced and workers caught up", _OBJECT, (503,))],
    "/metrics": [("get", "Prometheus metrics", {}, ())],
    "/openapi.json": [("get", "This document", _OBJECT, ())],
}
_OPEN = ("/healthz", "/readyz")


def document() -> dict[str, Any]:
    structs = list(_REQUESTS.values())
    refs, components = msgspec.json.schema_components(
        structs, ref_template="#/components/schemas/{name}"
    )
    by_struct = dict(zip(structs, refs, strict=True))
    paths: dict[str, Any] = {}
    for path, ops in _ENDPOINTS.items():
        entry: dict[str, Any] = {}
        for method, summary, answer, others in ops:
            responses: dict[str, Any] = {}
            if path == "/v1/snapshot" and method == "get":
                content = {"application/octet-stream": {"schema": {"type": "string"}}}
            elif path == "/metrics":
                content = {"text/plain": {"schema": {"type": "string"}}}
            else:
                content = {"application/json": {"schema": answer}}
            responses["200"] = {"description": "OK", "content": content}
            statuses = set(others)
            if path not in _OPEN:
                statuses.add(401)
            if method == "post" and path in _REQUESTS:
                statuses |= {400, 413}
            for status in sorted(statuses):
                responses[str(status)] = {
                    "description": _STATUS_TEXT.get(status, "error"),
                    "content": {"application/json": {"schema": _ERROR}},
                }
            op: dict[str, Any] = {"summary": summary, "responses": responses}
            if path in _REQUESTS and method == "post":
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": by_struct[_REQUESTS[path]]}},
                }
            if path in _OPEN:
                op["security"] = []
            entry[method] = op
        paths[path] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvsync",
            "version": __version__,
            "description": "Exact KV-cache index and router (docs/service.md).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


_STATUS_TEXT = {
    400: "malformed JSON or a field of the wrong type (the message names it)",
    401: "missing or wrong bearer token",
    404: "nothing serves the model, or no such instance",
    409: "conflict with what is followed, or no snapshot path configured",
    413: "body over max_body_bytes",
    500: "the snapshot could not be written",
    503: "no eligible worker (the message says why)",
}


async def handle_openapi(request: web.Request) -> web.Response:
    return reply(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", handle_openapi)
