"""Workloads for the benchmarks: vLLM 0.33 map-form KV-event payloads.

Two kinds of input are built here, both as plain functions so that the
fixtures in ``conftest.py`` (and the memory probe, which runs in a child
process) can call them; nothing runs at import time.

- :func:`ingest_workload` simulates a fleet of vLLM engines serving chat
  traffic and records what their KV-event publishers would send: prefill
  ``BlockStored`` events chained from cached system prompts, one-block
  decode stores, and one-hash ``BlockRemoved`` events from the engines'
  LRU eviction (vLLM v1's block pool emits one per evicted block). Encoded
  with the ``msgpack`` package, field order and field set as vLLM 0.33's
  msgspec encoder writes them (``omit_defaults``: no ``extra_keys``).
- :func:`build_holdings` fills an index with ~10M holdings fast: one
  512-block ``BlockStored`` per payload, assembled from pre-packed byte
  templates with numpy (tokens as msgpack uint32, hashes as uint64, both
  valid msgpack widths), so only the hash ints change between workers.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

BLOCK_SIZE = 16
MODEL = "llama"
VOCAB = 128_256
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E37_79B9_7F4A_7C15  # odd: counter * _GOLDEN is a bijection mod 2**64


def stored_event(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, Any]:
    """A vLLM 0.33 ``BlockStored`` in map form (what its encoder writes)."""
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BLOCK_SIZE,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


def removed_event(hashes: list[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU", "group_idx": 0}


def worker_ids(n: int) -> list[str]:
    return [f"pod-{i:03d}" for i in range(n)]


# --------------------------------------------------------------------- ingest


@dataclass
class IngestWorkload:
    """A pre-generated stream of payloads from many workers, interleaved."""

    workers: list[str]
    payloads: list[tuple[str, bytes]]
    events: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    payload_bytes: int = 0
    # Full prompts some requests sent (sys prompt + user part), for checks.
    probes: list[list[int]] = field(default_factory=list)

    @property
    def block_events(self) -> int:
        return self.stored_blocks + self.removed_blocks

    def describe(self) -> dict[str, float | int]:
        n = len(self.payloads)
        return {
            "workers": len(self.workers),
            "payloads": n,
            "events": self.events,
            "block_events": self.block_events,
            "stored_blocks": self.stored_blocks,
            "removed_blocks": self.removed_blocks,
            "block_events_per_payload": round(self.block_events / n, 2),
            "events_per_payload": round(self.events / n, 2),
            "mean_payload_bytes": round(self.payload_bytes / n, 1),
        }


class _Request:
    __slots__ = ("blocks", "fill", "finish", "left_blocks", "next_block")

    def __init__(self, blocks: list[int], fill: int, now: int, out_tokens: int) -> None:
        self.blocks = blocks
        self.fill = fill  # tokens already in the partial last block
        self.finish = now + out_tokens
        self.next_block = now + (BLOCK_SIZE - fill)
        # blocks reserved for decode, released at finish
        self.left_blocks = math.ceil((fill + out_tokens) / BLOCK_SIZE)


class _Engine:
    """One vLLM engine's prefix cache, just enough to emit its events.

    Blocks in use by running requests are pinned; finished requests return
    their blocks tail first to a free queue that is evicted from the front
    (vLLM v1's FreeKVCacheBlockQueue). Admission reserves the blocks a
    request can grow to, so an eviction always finds a free block.
    """

    def __init__(
        self,
        rank: int,
        rng: random.Random,
        pool: list[int],
        sys_prompts: list[list[int]],
        sys_weights: list[float],
        capacity: int,
        concurrency: int,
    ) -> None:
        self.rng = rng
        self.pool = pool
        self.sys_prompts = sys_prompts
        self.sys_weights = sys_weights
        self.capacity = capacity
        self.concurrency = concurrency
        self.salt = rng.getrandbits(64)
        self.counter = rank << 40
        self.ref: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict()
        self.sys_cached: list[list[int]] = [[] for _ in sys_prompts]
        self.sys_pos: dict[int, tuple[int, int]] = {}
        self.reserved = 0
        self.running: list[tuple[int, int, _Request]] = []  # heap of (due step, seq, req)
        self.seq = 0
        self.now = 0

    def _hash(self) -> int:
        self.counter += 1
        return (self.counter * _GOLDEN + self.salt) & _MASK64

    def _tokens(self, n: int) -> list[int]:
        off = self.rng.randrange(len(self.pool) - n)
        return self.pool[off : off + n]

    def _acquire(self, h: int) -> None:
        if h in self.free:
            del self.free[h]
            self.ref[h] = 1
        else:
            self.ref[h] += 1

    def _alloc(self, out: list[dict[str, Any]]) -> int:
        if len(self.ref) + len(self.free) >= self.capacity and self.free:
            old, _ = self.free.popitem(last=False)
            out.append(removed_event([old]))
            pos = self.sys_pos.pop(old, None)
            if pos is not None:  # the cached system prompt now ends before it
                sid, i = pos
                for later in self.sys_cached[sid][i + 1 :]:
                    del self.sys_pos[later]
                del self.sys_cached[sid][i:]
        h = self._hash()
        self.ref[h] = 1
        return h

    def _admit(self, out: list[dict[str, Any]], probes: list[list[int]] | None) -> bool:
        rng = self.rng
        sid = rng.choices(range(len(self.sys_prompts)), self.sys_weights)[0]
        sys_tokens = self.sys_prompts[sid]
        n_sys = len(sys_tokens) // BLOCK_SIZE
        user_blocks = int(math.exp(rng.uniform(math.log(4), math.log(257))))
        rem = rng.randrange(BLOCK_SIZE)
        out_tokens = int(math.exp(rng.uniform(math.log(16), math.log(1025))))
        need = n_sys + user_blocks + math.ceil((rem + out_tokens) / BLOCK_SIZE)
        if len(self.ref) + self.reserved + need > self.capacity:
            return False
        cached = list(self.sys_cached[sid])
        for h in cached:
            self._acquire(h)
        j = len(cached)
        user = self._tokens(user_blocks * BLOCK_SIZE + rem)
        tokens = sys_tokens[j * BLOCK_SIZE :] + user[: user_blocks * BLOCK_SIZE]
        hashes = [self._alloc(out) for _ in range(n_sys - j + user_blocks)]
        out.append(stored_event(hashes, cached[-1] if cached else None, tokens))
        for i, h in enumerate(hashes[: n_sys - j]):
            self.sys_pos[h] = (sid, j + i)
        self.sys_cached[sid].extend(hashes[: n_sys - j])
        if probes is not None:
            probes.append(sys_tokens + user)
        req = _Request(cached + hashes, rem, self.now, out_tokens)
        self.reserved += req.left_blocks
        self.seq += 1
        heapq.heappush(self.running, (min(req.next_block, req.finish), self.seq, req))
        return True

    def _release(self, req: _Request) -> None:
        self.reserved -= req.left_blocks
        for h in reversed(req.blocks):  # tail blocks are evicted first
            n = self.ref[h] - 1
            if n:
                self.ref[h] = n
            else:
                del self.ref[h]
                self.free[h] = None

    def step(self, probes: list[list[int]] | None) -> list[dict[str, Any]]:
        """Events of the engine's step ``self.now``; then advance."""
        out: list[dict[str, Any]] = []
        # chunked prefill admits a couple of new requests per step
        for _ in range(2):
            if len(self.running) >= self.concurrency or not self._admit(out, probes):
                break
        while self.running and self.running[0][0] <= self.now:
            _, _, req = heapq.heappop(self.running)
            if req.next_block <= self.now and req.next_block <= req.finish:
                h = self._alloc(out)
                self.reserved -= 1
                req.left_blocks -= 1
                out.append(stored_event([h], req.blocks[-1], self._tokens(BLOCK_SIZE)))
                req.blocks.append(h)
                req.next_block += BLOCK_SIZE
            if req.finish <= self.now:
                self._release(req)
                continue
            self.seq += 1
            heapq.heappush(self.running, (min(req.next_block, req.finish), self.seq, req))
        # jump over steps where nothing completes (they publish nothing)
        if len(self.running) < self.concurrency:
            self.now += 1
        else:
            self.now = max(self.now + 1, self.running[0][0])
        return out


def ingest_workload(
    *,
    workers: int = 64,
    target_block_events: int = 1_000_000,
    capacity_blocks: int = 8192,
    concurrency: int = 48,
    seed: int = 0,
) -> IngestWorkload:
    """Interleaved payloads of ``workers`` engines, ~``target_block_events`` in all.

    Eight shared system prompts (32 to 192 blocks, Zipf-popular), user parts
    of 4 to 256 blocks and outputs of 16 to 1024 tokens (log-uniform), each
    engine with ``capacity_blocks`` of KV cache and up to ``concurrency``
    running requests.
    """
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    pool: list[int] = nprng.integers(0, VOCAB, size=1 << 20).tolist()
    sys_lens = [32, 48, 64, 96, 128, 160, 192, 40]
    sys_prompts = [nprng.integers(0, VOCAB, size=n * BLOCK_SIZE).tolist() for n in sys_lens]
    sys_weights = [1.0 / (k + 1) for k in range(len(sys_lens))]
    ids = worker_ids(workers)
    engines = [
        _Engine(
            rank,
            random.Random(rng.getrandbits(64)),
            pool,
            sys_prompts,
            sys_weights,
            capacity_blocks,
            concurrency,
        )
        for rank in range(workers)
    ]
    w = IngestWorkload(workers=ids, payloads=[])
    # All engines step at the same pace: publish order is (step, worker).
    clock = [(0, rank) for rank in range(workers)]
    packb = msgpack.Packer().pack
    all_probes: list[list[int]] = []
    while w.block_events < target_block_events:
        now, rank = heapq.heappop(clock)
        eng = engines[rank]
        events = eng.step(all_probes if rank % 8 == 0 else None)
        if events:
            payload = packb([1_750_000_000.0 + now * 0.025, events, 0])
            w.payloads.append((ids[rank], payload))
            w.payload_bytes += len(payload)
            w.events += len(events)
            for ev in events:
                if ev["type"] == "BlockStored":
                    w.stored_blocks += len(ev["block_hashes"])
                else:
                    w.removed_blocks += len(ev["block_hashes"])
        heapq.heappush(clock, (eng.now, rank))
    # late prompts are the likeliest to be (partly) still cached
    w.probes = all_probes[-40:] + all_probes[:: max(1, len(all_probes) // 20)]
    return w


def bulk_workload(
    *, workers: int = 64, chains: int = 256, per_chain: int = 8, seed: int = 3
) -> IngestWorkload:
    """The friendliest shape: one 512-block prefill ``BlockStored`` per
    payload, no decode stores, no evictions (a fleet warming up on long
    prompts). ``chains`` 8192-token prompts, each stored by ``per_chain``
    workers; ``chains * per_chain * 512`` block events (1,048,576)."""
    rng = np.random.default_rng(seed)
    ids = worker_ids(workers)
    hs = [HashSource(wk) for wk in range(workers)]
    packb = msgpack.Packer().pack
    w = IngestWorkload(workers=ids, payloads=[])
    for c in range(chains):
        tokens = chain_tokens(c, seed).tolist()
        for wk in rng.permutation(workers)[:per_chain]:
            hashes = hs[int(wk)].take(512).tolist()
            payload = packb([1_750_000_000.0, [stored_event(hashes, None, tokens)], 0])
            w.payloads.append((ids[int(wk)], payload))
            w.payload_bytes += len(payload)
            w.events += 1
            w.stored_blocks += 512
    w.probes = [chain_tokens(c, seed).tolist() for c in range(0, chains, max(1, chains // 20))]
    return w


# ------------------------------------------------------- holdings (10M scale)

# Pre-packed msgpack keys of the protocol, spelled as an engine writes them
# (the bench encodes payloads itself, independently of kvsync's decoder).
_K = {
    k: msgpack.packb(k)
    for k in (
        "type",
        "BlockStored",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "GPU",
        "lora_name",
        "group_idx",
        "kv_cache_spec_kind",
        "full_attention",
    )
}
_STORED_HEAD = b"\x8a" + _K["type"] + _K["BlockStored"] + _K["block_hashes"]
_STORED_TAIL = b"".join(
    [
        _K["block_size"],
        msgpack.packb(BLOCK_SIZE),
        _K["lora_id"],
        b"\xc0",
        _K["medium"],
        _K["GPU"],
        _K["lora_name"],
        b"\xc0",
        _K["group_idx"],
        b"\x00",
        _K["kv_cache_spec_kind"],
        _K["full_attention"],
    ]
)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_hashes(h: np.ndarray) -> bytes:
    """msgpack array of uint64 (marker 0xcf) from a uint64 array."""
    n = len(h)
    buf = np.empty((n, 9), np.uint8)
    buf[:, 0] = 0xCF
    buf[:, 1:] = h.astype(">u8").view(np.uint8).reshape(n, 8)
    return _array_header(n) + buf.tobytes()


def pack_token_body(t: np.ndarray) -> bytes:
    """Tokens as msgpack uint32 (marker 0xce), without the array header;
    block ``i`` is bytes ``[i * 80, (i + 1) * 80)``."""
    n = len(t)
    buf = np.empty((n, 5), np.uint8)
    buf[:, 0] = 0xCE
    buf[:, 1:] = t.astype(">u4").view(np.uint8).reshape(n, 4)
    return buf.tobytes()


TOKEN_BYTES = 5
BLOCK_BYTES = BLOCK_SIZE * TOKEN_BYTES


def stored_payload(hashes: np.ndarray, parent: int | None, body: bytes, ts: float = 0.0) -> bytes:
    """One-event payload: a BlockStored of ``len(hashes)`` blocks whose
    tokens are ``body`` (see :func:`pack_token_body`)."""
    n_tokens = len(body) // TOKEN_BYTES
    assert n_tokens == len(hashes) * BLOCK_SIZE
    return b"".join(
        [
            b"\x93",
            msgpack.packb(ts),
            b"\x91",
            _STORED_HEAD,
            pack_hashes(hashes),
            _K["parent_block_hash"],
            msgpack.packb(parent),
            _K["token_ids"],
            _array_header(n_tokens),
            body,
            _STORED_TAIL,
            b"\x00",
        ]
    )


class HashSource:
    """Distinct 64-bit engine hashes per worker (a counter through a bijection)."""

    def __init__(self, rank: int) -> None:
        self.next = np.uint64(rank) << np.uint64(40)

    def take(self, n: int) -> np.ndarray:
        ids = np.arange(n, dtype=np.uint64) + self.next
        self.next += np.uint64(n)
        return ids * np.uint64(_GOLDEN) + np.uint64(0x5EED)


def chain_tokens(chain: int, seed: int, n_blocks: int = 512) -> np.ndarray:
    return np.random.default_rng([seed, chain]).integers(
        0, VOCAB, size=n_blocks * BLOCK_SIZE, dtype=np.uint32
    )


SYS_CHAIN_BASE = 1_000_000  # chain ids of the shared system prompts


@dataclass
class MatchWorkload:
    workers: list[str]
    holdings: int
    chains: dict[str, list[int]]  # prompt name -> chain ids
    seed: int
    sys_prompts: int
    sys_blocks: int
    # hot chain -> workers that hold it in full
    hot_holders: dict[int, list[str]] = field(default_factory=dict)

    def prompt(self, chain: int) -> np.ndarray:
        """The chain's 8192 tokens: its system prompt, then its own blocks."""
        return np.concatenate(
            [
                chain_tokens(SYS_CHAIN_BASE + chain % self.sys_prompts, self.seed, self.sys_blocks),
                chain_tokens(chain, self.seed, 512 - self.sys_blocks),
            ]
        )


def build_holdings(
    apply: Callable[[str, bytes], Any],
    *,
    workers: int = 256,
    per_worker: int = 39_063,
    hot: int = 8,
    hot_holders: int = 150,
    hot_partial: int = 60,
    warm_chains: int = 4096,
    sys_prompts: int = 8,
    sys_blocks: int = 64,
    seed: int = 1,
) -> MatchWorkload:
    """Give every worker ``per_worker`` holdings (256 x 39,063 = 10,000,128).

    Prompts of 512 blocks, each the ``sys_blocks``-block system prompt
    ``chain % sys_prompts`` followed by blocks of its own, so the index is
    a tree: each system prompt's last block has hundreds of children.
    ``hot`` prompts are held in full by ``hot_holders`` workers each (and
    as a prefix of random length by ``hot_partial`` others); the rest of
    each worker's budget is drawn from ``warm_chains`` prompts (so each is
    held by a few workers), the last one as a prefix. As an engine would, a
    worker stores each system prompt once and its prompts' own blocks as
    continuations (``parent_block_hash`` = its hash of the system prompt's
    last block). Workers must already be registered; ``apply(worker,
    payload)`` feeds one payload.
    """
    rng = np.random.default_rng(seed)
    ids = worker_ids(workers)
    plan: dict[int, list[tuple[int, int]]] = {}  # chain -> [(worker, blocks)]
    budget = [per_worker] * workers
    # blocks of system prompt s that worker w will hold: max over its chains
    cover: dict[tuple[int, int], int] = {}
    out = MatchWorkload(
        workers=ids,
        holdings=workers * per_worker,
        chains={},
        seed=seed,
        sys_prompts=sys_prompts,
        sys_blocks=sys_blocks,
    )

    def add(c: int, wk: int, n: int) -> None:
        key = (wk, c % sys_prompts)
        have = cover.get(key, 0)
        budget[wk] -= max(0, min(n, sys_blocks) - have) + max(0, n - sys_blocks)
        cover[key] = max(have, min(n, sys_blocks))
        plan.setdefault(c, []).append((wk, n))

    for c in range(hot):
        order = rng.permutation(workers)
        full, part = order[:hot_holders], order[hot_holders : hot_holders + hot_partial]
        for w in full:
            add(c, int(w), 512)
        for w in part:
            add(c, int(w), int(rng.integers(1, 512)))
        out.hot_holders[c] = sorted(ids[int(w)] for w in full)
    for wk in range(workers):
        for c in hot + rng.permutation(warm_chains):
            if budget[wk] == 0:
                break
            have = cover.get((wk, int(c) % sys_prompts), 0)
            missing = sys_blocks - have
            if budget[wk] >= missing + 512 - sys_blocks:
                n = 512
            elif budget[wk] <= missing:
                n = have + budget[wk]
            else:
                n = budget[wk] - missing + sys_blocks
            add(int(c), wk, n)
    assert not any(budget), budget
    hashes = [HashSource(wk) for wk in range(workers)]
    stored: dict[tuple[int, int], tuple[int, int]] = {}  # (w, s) -> (blocks, last hash)
    sys_body = [
        pack_token_body(chain_tokens(SYS_CHAIN_BASE + s, seed, sys_blocks))
        for s in range(sys_prompts)
    ]
    for c in sorted(plan):
        s = c % sys_prompts
        body = pack_token_body(chain_tokens(c, seed, 512 - sys_blocks))
        for wk, n in plan[c]:
            have, last = stored.get((wk, s), (0, 0))
            need = min(n, sys_blocks)
            if need > have:
                h = hashes[wk].take(need - have)
                part = sys_body[s][have * BLOCK_BYTES : need * BLOCK_BYTES]
                apply(ids[wk], stored_payload(h, last if have else None, part))
                have, last = need, int(h[-1])
                stored[wk, s] = (have, last)
            if n > sys_blocks:
                own = body[: (n - sys_blocks) * BLOCK_BYTES]
                apply(ids[wk], stored_payload(hashes[wk].take(n - sys_blocks), last, own))
    out.chains = {"hot": list(range(hot)), "warm": sorted(c for c in plan if c >= hot)}
    return out


def memory_payloads(
    case: str, *, workers: int = 256, chains: int = 76, tail: int = 151, seed: int = 2
) -> Iterator[tuple[str, bytes]]:
    """Payloads giving each worker ``chains * 512 + tail`` holdings.

    ``shared``: every worker stores the same ``chains`` 512-block chains,
    then a private ``tail`` continuing the last of them (parent = its own
    engine hash of that chain's last block). ``worst``: the same shapes, but
    every chain's first block is unique to the worker, so no two workers
    share a block. The token templates are built before this returns; the
    payloads are made one at a time as the iterator is consumed.
    """
    if case not in ("shared", "worst"):
        raise ValueError(f"unknown memory case {case!r}")
    ids = worker_ids(workers)
    hs = [HashSource(wk) for wk in range(workers)]
    rng = np.random.default_rng(seed)
    common = [pack_token_body(chain_tokens(c, seed)) for c in range(chains)]

    def gen() -> Iterator[tuple[str, bytes]]:
        if case == "shared":
            for body in common:
                for wk in range(workers):
                    yield ids[wk], stored_payload(hs[wk].take(512), None, body)
        else:
            for wk in range(workers):
                for body in common:
                    first = rng.integers(0, VOCAB, BLOCK_SIZE, dtype=np.uint32)
                    unique = pack_token_body(first) + body[BLOCK_BYTES:]
                    yield ids[wk], stored_payload(hs[wk].take(512), None, unique)
        for wk in range(workers):
            # take() counts up, so the last chain's last hash is computable
            last = (int(hs[wk].next) - 1) * _GOLDEN + 0x5EED
            toks = rng.integers(0, VOCAB, tail * BLOCK_SIZE, dtype=np.uint32)
            yield ids[wk], stored_payload(hs[wk].take(tail), last & _MASK64, pack_token_body(toks))

    return gen()
