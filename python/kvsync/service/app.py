"""The aiohttp application of ``kvsync serve`` and what every request goes
through: bearer-token authentication (``/healthz`` and ``/readyz`` stay
open), the body limit (413), JSON decoding into typed requests (400 naming
the field), JSON errors for every failure, and the request-duration
histogram. Nothing a client sends may take the process down: an unexpected
exception becomes a logged 500."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from kvsync.service.state import Service

__all__ = ["SERVICE", "HTTPError", "make_app", "read_json", "reply"]

log = logging.getLogger("kvsync.service")

SERVICE = web.AppKey("service", Service)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HTTPError(Exception):
    """An answer other than 2xx, with a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


_encoder = msgspec.json.Encoder()


def reply(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status, content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = reply({"error": message, "status": status}, status)
    resp.headers.update(headers or {})
    return resp


async def read_json(request: web.Request, kind: type[T]) -> T:
    """The request body decoded as ``kind`` (a msgspec Struct): 413 past
    ``max_body_bytes``, 400 naming the field for malformed JSON or a wrong
    type."""
    limit = request.app[SERVICE].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise HTTPError(
            413, f"body of {request.content_length} bytes is over max_body_bytes={limit}"
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HTTPError(413, f"body is over max_body_bytes={limit}") from None
    if not raw.strip():
        raise HTTPError(400, "empty body: expected a JSON object")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise HTTPError(400, f"invalid request: {_field_message(e)}") from None
    except msgspec.DecodeError as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON: nested too deeply") from None


def _field_message(e: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.token_ids[3]`"; name the field plainly.
    text = str(e)
    head, sep, where = text.rpartition(" - at `")
    if not sep:
        return text
    path = where.rstrip("`").removeprefix("$.").removeprefix("$")
    return f"field `{path}`: {head}" if path else head


def _endpoint(request: web.Request) -> str:
    """A bounded label: the route's path pattern, never the raw path."""
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _errors_and_timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    try:
        resp = await handler(request)
    except HTTPError as e:
        resp = _error(e.status, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(str(e.status)) else e.reason
        if e.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        elif e.status == 404:
            message = f"no endpoint {request.path} (see /openapi.json)"
        elif e.status == 413:
            limit = request.app[SERVICE].settings.max_body_bytes
            message = f"body is over max_body_bytes={limit}"
        resp = _error(e.status, message)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        resp = _error(500, "internal error (logged by the server)")
    request.app[SERVICE].metrics.observe_request(_endpoint(request), time.perf_counter() - start)
    return resp


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[SERVICE].settings.token_value()
    if token is None or request.path in OPEN_PATHS:
        return await handler(request)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        why = "missing Authorization header" if not given else "wrong bearer token"
        raise HTTPError(
            401, f"{why}: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )
    return await handler(request)


def make_app(service: Service) -> web.Application:
    """The application with every endpoint of SPEC section 5."""
    from kvsync.service import api, mooncake, openapi

    app = web.Application(
        middlewares=[_errors_and_timing, _auth],
        client_max_size=service.settings.max_body_bytes,
    )
    app[SERVICE] = service
    mooncake.add_routes(app)
    api.add_routes(app)
    openapi.add_routes(app)
    return app
