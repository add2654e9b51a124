"""The Mooncake KV Indexer API (RFC kvcache-ai/Mooncake#1403, SPEC 5):
``/register`` and ``/unregister`` follow and drop publishers; ``/query``
and ``/query_by_hash`` report, per tenant and instance of a model, how many
prompt tokens are cached in each tier and on each data-parallel rank."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
from aiohttp import web

from kvsync._pod import Pod
from kvsync.service.app import SERVICE, HTTPError, read_json, reply
from kvsync.service.state import Service

__all__ = ["Registry", "add_routes", "tokens_by_instance"]

log = logging.getLogger("kvsync.service")

TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 32)]
# Standard seq hashes are u64; clients in languages without unsigned ints
# send the same 64 bits as a signed number (msgspec bounds stop at int64,
# so the range is checked in the handler).
SeqHash = int
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
MASK64 = (1 << 64) - 1
TIERS = (("GPU", "gpu"), ("CPU", "cpu"), ("DISK", "storage"))
ZERO = {"gpu": 0, "cpu": 0, "storage": 0, "any": 0}


class RegisterRequest(msgspec.Struct):
    endpoint: NonEmpty
    modelname: NonEmpty
    instance_id: NonEmpty
    block_size: Annotated[int, msgspec.Meta(ge=1)]
    type: str = "vLLM"
    dp_rank: Annotated[int, msgspec.Meta(ge=0)] = 0
    replay_endpoint: str | None = None
    lora_name: str | None = None
    tenant_id: str | None = None


class UnregisterRequest(msgspec.Struct):
    instance_id: NonEmpty
    tenant_id: str | None = None
    dp_rank: Annotated[int, msgspec.Meta(ge=0)] | None = None


class QueryRequest(msgspec.Struct):
    model: NonEmpty
    token_ids: list[TokenId]
    lora_name: str | None = None
    tenant_id: str | None = None
    instance_id: str | None = None
    block_size: Annotated[int, msgspec.Meta(ge=1)] | None = None
    cache_salt: str | None = None


class QueryByHashRequest(msgspec.Struct):
    model: NonEmpty
    seq_hashes: list[SeqHash]
    lora_name: str | None = None
    tenant_id: str | None = None
    instance_id: str | None = None
    block_size: Annotated[int, msgspec.Meta(ge=1)] | None = None


def parse_endpoint(text: str, field: str, peer: str | None) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port). A wildcard host (an engine that
    registers its bind address) means the address the registration came from."""
    rest = text.removeprefix("tcp://")
    host, sep, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HTTPError(400, f"field `{field}`: expected tcp://host:port, got {text!r}")
    if host in ("*", "0.0.0.0", "::"):
        if peer is None:
            raise HTTPError(400, f"field `{field}`: {text!r} does not name the engine's address")
        host = peer
    return host, int(port_text)


class Registry:
    """Registrations by worker id, kept so that a restart from a snapshot
    follows the registered engines again (saved beside the snapshot)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def dump(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries, sort_keys=True))
        tmp.replace(path)

    def load(self, path: Path) -> list[RegisterRequest]:
        try:
            raw = json.loads(path.read_text())
            return [msgspec.convert(v, RegisterRequest) for v in raw.values()]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, msgspec.ValidationError, AttributeError) as e:
            log.warning("ignoring registrations file %s: %s", path, e)
            return []


def publisher_of(req: RegisterRequest, peer: str | None) -> Any:
    from kvsync.discovery import Publisher

    host, pub_port = parse_endpoint(req.endpoint, "endpoint", peer)
    replay_port = None
    if req.replay_endpoint:
        replay_host, replay_port = parse_endpoint(req.replay_endpoint, "replay_endpoint", peer)
        if replay_host != host:
            raise HTTPError(
                400,
                f"field `replay_endpoint`: host {replay_host!r} differs from the endpoint's "
                f"{host!r} (one engine publishes both)",
            )
    wid = f"{req.instance_id}/dp{req.dp_rank}"
    pod = Pod(name=wid, model=req.modelname, host=host, pub_port=pub_port, replay_port=replay_port)
    return Publisher(
        pod=pod,
        source="register",
        instance=req.instance_id,
        tenant=req.tenant_id or "default",
        dp_rank=req.dp_rank,
    )


def register(service: Service, req: RegisterRequest, peer: str | None) -> str:
    """Follow the publisher (again, if its address changed); its worker id."""
    pub = publisher_of(req, peer)
    wid: str = pub.pod.name
    for other in service.reconciler.workers().values():
        if other.worker == wid and (other.source != "register" or other.tenant != pub.tenant):
            raise HTTPError(
                409, f"worker {wid!r} is already followed ({other.source}, tenant {other.tenant!r})"
            )
    try:
        service.reconciler.upsert(pub)
    except ValueError as e:
        raise HTTPError(409, f"cannot follow {wid!r}: {e}") from None
    service.registry.entries[wid] = msgspec.to_builtins(req)
    return wid


def unregister(service: Service, req: UnregisterRequest) -> list[str]:
    removed = []
    for name, pub in sorted(service.reconciler.publishers().items()):
        if pub.source != "register" or pub.instance != req.instance_id:
            continue
        if req.tenant_id is not None and pub.tenant != req.tenant_id:
            continue
        if req.dp_rank is not None and pub.dp_rank != req.dp_rank:
            continue
        service.reconciler.remove("register", name)
        service.registry.entries.pop(name, None)
        removed.append(name)
    return removed


def tokens_by_instance(
    service: Service,
    model: str,
    detail: Mapping[str, Mapping[str, int]],
    block_size: int,
    tenant: str | None,
    instance: str | None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{tenant: {instance: {longest_matched, GPU, CPU, DISK, DP}}}`` in
    tokens; every (selected) instance of ``model`` appears, 0 when nothing
    matches. An instance's tiers are the maximum over its ranks."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    view = service.workers_view
    if view is not None:
        rows = view.of_model(model)
    else:
        rows = sorted((w, i) for w, i in service.reconciler.workers().items() if i.model == model)
    for wid, info in rows:
        if (tenant is not None and info.tenant != tenant) or (
            instance is not None and info.instance != instance
        ):
            continue
        d = detail.get(wid, ZERO)
        row = out.setdefault(info.tenant, {}).setdefault(
            info.instance, {"longest_matched": 0, "GPU": 0, "CPU": 0, "DISK": 0, "DP": {}}
        )
        row["longest_matched"] = max(row["longest_matched"], d["any"] * block_size)
        for name, key in TIERS:
            row[name] = max(row[name], d[key] * block_size)
        row["DP"][str(info.dp_rank)] = d["any"] * block_size
    return out


def _block_size(service: Service, model: str, asked: int | None) -> int:
    known = service.index.block_size(model)
    if asked is not None and known is not None and asked != known:
        raise HTTPError(
            400,
            f"field `block_size`: {asked} differs from model {model!r}'s block size {known} "
            "(learned from its engines' events)",
        )
    return known or asked or 0


def _peer(request: web.Request) -> str | None:
    return request.remote


async def handle_register(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        req = await read_json(request, RegisterRequest)
        await asyncio.to_thread(register, service, req, _peer(request))
    except HTTPError:
        service.metrics.register_errors += 1  # kvsync_discovery_errors_total{source="register"}
        raise
    return reply({"status": "registered successfully", "instance_id": req.instance_id})


async def handle_unregister(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    req = await read_json(request, UnregisterRequest)
    removed = await asyncio.to_thread(unregister, service, req)
    if not removed:
        raise HTTPError(404, f"instance {req.instance_id!r} is not registered")
    return reply({"status": "unregistered successfully", "removed_instances": removed})


async def handle_query(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    req = await read_json(request, QueryRequest)
    bs = _block_size(service, req.model, req.block_size)
    extra = [[req.cache_salt]] if req.cache_salt is not None else None
    try:
        detail = service.index.match_detail(req.model, req.token_ids, req.lora_name, extra)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None
    return reply(tokens_by_instance(service, req.model, detail, bs, req.tenant_id, req.instance_id))


async def handle_query_by_hash(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    req = await read_json(request, QueryByHashRequest)
    bs = _block_size(service, req.model, req.block_size)
    for i, h in enumerate(req.seq_hashes):
        if not -(1 << 63) <= h <= MASK64:
            raise HTTPError(400, f"field `seq_hashes[{i}]`: {h} is not a 64-bit hash")
    hashes = [h & MASK64 for h in req.seq_hashes]
    try:
        detail = service.index.match_detail_hashes(req.model, hashes, req.lora_name)
    except ValueError as e:
        raise HTTPError(400, str(e)) from None
    return reply(tokens_by_instance(service, req.model, detail, bs, req.tenant_id, req.instance_id))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/register", handle_register)
    app.router.add_post("/unregister", handle_unregister)
    app.router.add_post("/query", handle_query)
    app.router.add_post("/query_by_hash", handle_query_by_hash)
