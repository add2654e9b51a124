"""A careful plain-Python prefix index: the baseline kvsync is measured against.

It is what a competent Python engineer would write (and what routers in
this space ship): msgspec's typed decoder with the engines' own struct
layout, dicts and sets, the prefix key of a block being Python's
``hash((parent_key, tokens_of_block))``. Same semantics as SPEC.md section 2
for everything the benchmark workloads contain; simplifications (all
mediums collapse into one tier, no capacity bound) only make it faster, so
the measured ratio is conservative.
"""

from __future__ import annotations

from typing import Any

import msgspec


class BlockStored(msgspec.Struct, tag=True, tag_field="type", omit_defaults=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    # a tuple so that each block's slice is already hashable
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, tag_field="type", omit_defaults=True):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, tag_field="type"):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    dp_rank: int | None = None


def _frozen(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((_frozen(k), _frozen(x)) for k, x in v.items()))
    return v


class _Worker:
    __slots__ = ("emap", "model")

    def __init__(self, model: str) -> None:
        self.model = model
        self.emap: dict[Any, int] = {}  # engine hash (or (group, hash)) -> prefix key


class PlainIndex:
    def __init__(self) -> None:
        self._decode = msgspec.msgpack.Decoder(KVEventBatch).decode
        self._workers: dict[str, _Worker] = {}
        self._holders: dict[int, set[str]] = {}  # prefix key -> workers
        self._block_size: dict[str, int] = {}
        self._members: dict[str, list[str]] = {}

    def add_worker(self, worker_id: str, model: str) -> None:
        self._workers[worker_id] = _Worker(model)
        self._members.setdefault(model, []).append(worker_id)

    @staticmethod
    def _root(model: str, lora: str | int | None) -> int:
        return hash(("kvsync-plain", model, lora))

    def apply(self, worker_id: str, payload: bytes) -> tuple[int, int, int]:
        """Returns (stored, removed, skipped) block events."""
        w = self._workers[worker_id]
        emap = w.emap
        holders = self._holders
        stored = removed = skipped = 0
        for ev in self._decode(payload).events:
            if type(ev) is BlockStored:
                hashes = ev.block_hashes
                n = len(hashes)
                toks = ev.token_ids
                kind = ev.kv_cache_spec_kind
                if (kind is not None and kind != "full_attention") or not toks:
                    # other attention groups, offload-only stores: not in
                    # the benchmark workloads
                    skipped += n
                    continue
                bs = ev.block_size or len(toks) // n
                known = self._block_size.setdefault(w.model, bs)
                if bs * n != len(toks) or known != bs:
                    skipped += n
                    continue
                group = ev.group_idx or 0
                parent = ev.parent_block_hash
                if parent is None:
                    key = self._root(w.model, ev.lora_name or ev.lora_id)
                else:
                    pkey = emap.get(parent if not group else (group, parent))
                    if pkey is None:  # unknown parent: unplaceable
                        skipped += n
                        continue
                    key = pkey
                extra = ev.extra_keys
                for i, h in enumerate(hashes):
                    block = toks[i * bs : (i + 1) * bs]
                    ek = ()
                    if extra and extra[i]:
                        ek = tuple(_frozen(x) for x in extra[i] if x != ev.lora_name)
                    key = hash((key, block, ek) if ek else (key, block))
                    if group:
                        h = (group, h)
                    old = emap.get(h)
                    if old is not None and old != key:
                        self._drop(old, worker_id)
                    emap[h] = key
                    s = holders.get(key)
                    if s is None:
                        holders[key] = {worker_id}
                    else:
                        s.add(worker_id)
                stored += n
            elif type(ev) is BlockRemoved:
                group = ev.group_idx or 0
                for h in ev.block_hashes:
                    key = emap.pop(h if not group else (group, h), None)
                    if key is None:
                        skipped += 1
                        continue
                    self._drop(key, worker_id)
                    removed += 1
            else:
                for key in emap.values():
                    self._drop(key, worker_id)
                emap.clear()
        return stored, removed, skipped

    def _drop(self, key: int, worker_id: str) -> None:
        s = self._holders.get(key)
        if s is not None:
            s.discard(worker_id)
            if not s:
                del self._holders[key]

    def match(self, model: str, token_ids: Any) -> dict[str, int]:
        members = self._members.get(model, [])
        out = dict.fromkeys(members, 0)
        bs = self._block_size.get(model)
        if bs is None:
            return out
        toks = tuple(token_ids)
        alive = set(members)
        key = self._root(model, None)
        holders = self._holders
        n = len(toks) // bs
        i = 0
        while i < n and alive:
            key = hash((key, toks[i * bs : (i + 1) * bs]))
            s = holders.get(key)
            if s is None:
                break
            still = alive & s
            for gone in alive - still:
                out[gone] = i
            alive = still
            i += 1
        for wid in alive:
            out[wid] = i
        return out

    def holdings(self) -> int:
        return sum(len(s) for s in self._holders.values())

    def blocks(self) -> int:
        return len(self._holders)
