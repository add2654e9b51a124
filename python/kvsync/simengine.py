"""The simulated engine's cache and wire encoding: a synthetic multi-tenant
workload, a vLLM-like prefix block pool with LRU eviction, and the
KVEventBatch encoder (array- or map-form events). ``kvsync.sim`` runs
these behind real sockets; the demo uses the pool as its ground truth."""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = ["ARRAY_FIELDS", "BlockPool", "Workload", "encode_batch"]

MASK64 = (1 << 64) - 1


@dataclass
class Workload:
    """Synthetic multi-tenant traffic: each tenant has a system prompt; a
    conversation is the system prompt plus its turns so far."""

    rng: random.Random
    block_size: int
    tenants: int = 4
    system_blocks: tuple[int, int] = (4, 16)
    turn_tokens: tuple[int, int] = (8, 96)
    vocab: int = 32_000
    conversations: list[list[int]] = field(default_factory=list)
    systems: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for _ in range(self.tenants):
            n = self.rng.randint(*self.system_blocks) * self.block_size
            self.systems.append([self.rng.randrange(self.vocab) for _ in range(n)])

    def next_prompt(self) -> list[int]:
        """A new conversation (30%) or the next turn of an existing one."""
        if not self.conversations or self.rng.random() < 0.3 or len(self.conversations) < 2:
            conv = list(self.rng.choice(self.systems))
            self.conversations.append(conv)
            if len(self.conversations) > 64:
                self.conversations.pop(0)
        else:
            conv = self.rng.choice(self.conversations)
        conv.extend(
            self.rng.randrange(self.vocab) for _ in range(self.rng.randint(*self.turn_tokens))
        )
        if len(conv) > 64 * self.block_size:
            del conv[len(self.systems[0]) :]
        return list(conv)


class BlockPool:
    """A prefix cache of fixed-size blocks with LRU eviction, as in vLLM:
    a block is named by a chained hash of its tokens (seeded per engine
    process), and the events say what was stored and evicted."""

    def __init__(self, block_size: int, capacity: int, seed: int) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self.seed = seed
        # engine hash -> (token prefix of the whole chain up to this block)
        self.blocks: collections.OrderedDict[int, tuple[int, ...]] = collections.OrderedDict()
        self.last_hit = 0

    def _hash(self, parent: int | None, tokens: Sequence[int]) -> int:
        return hash((self.seed, parent, tuple(tokens))) & MASK64

    def _hashes(self, prompt: Sequence[int]) -> list[int]:
        bs = self.block_size
        parent: int | None = None
        hashes: list[int] = []
        for i in range(len(prompt) // bs):
            h = self._hash(parent, prompt[i * bs : (i + 1) * bs])
            hashes.append(h)
            parent = h
        return hashes

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        """Leading full blocks of `prompt` in the cache (the ground truth)."""
        n = 0
        for h in self._hashes(prompt):
            if h not in self.blocks:
                break
            n += 1
        return n

    def request(self, prompt: Sequence[int]) -> list[dict[str, Any]]:
        """Serve a prompt: reuse its cached prefix, store the rest; returns
        the events (removals first, then the store). `last_hit` is the
        number of blocks that were cached."""
        bs = self.block_size
        events: list[dict[str, Any]] = []
        hashes = self._hashes(prompt)
        cached = 0
        while cached < len(hashes) and hashes[cached] in self.blocks:
            cached += 1
        self.last_hit = cached
        new = hashes[cached:]
        # Make room: evict least recently used blocks not in this prompt.
        keep = set(hashes[:cached])
        evicted = []
        while len(self.blocks) + len(new) > self.capacity and self.blocks:
            victim = next((h for h in self.blocks if h not in keep), None)
            if victim is None:
                break
            del self.blocks[victim]
            evicted.append(victim)
        for h in evicted:
            events.append({"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"})
        room = max(0, self.capacity - len(self.blocks))
        new = new[:room]
        if new:
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": new,
                    "parent_block_hash": hashes[cached - 1] if cached else None,
                    "token_ids": list(prompt[cached * bs : (cached + len(new)) * bs]),
                    "block_size": bs,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                }
            )
        for i in range(cached + len(new)):
            self.blocks[hashes[i]] = tuple(prompt[: (i + 1) * bs])
        # Touch tail first so that, later, the tail is evicted before its prefix.
        for i in reversed(range(cached + len(new))):
            self.blocks.move_to_end(hashes[i])
        return events

    def truth(self) -> list[list[int]]:
        return [list(t) for t in self.blocks.values()]


# The engine's side of the protocol, spelled out as vLLM's encoder writes it
# (positional order of the array form), independently of kvsync's decoder on
# purpose: the simulator is a second implementation the decoder is tested
# against.
ARRAY_FIELDS = {
    "BlockStored": [
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}


def encode_batch(events: list[dict[str, Any]], form: str, rank: int | None) -> bytes:
    """A KVEventBatch as the engines encode it: envelope array, events as
    arrays (vLLM <= 0.23) or maps (>= 0.24)."""
    out: list[Any] = []
    for ev in events:
        if form == "array":
            out.append([ev["type"], *(ev.get(f) for f in ARRAY_FIELDS[ev["type"]])])
        else:
            out.append(ev)
    payload: bytes = msgpack.packb([time.time(), out, rank])
    return payload
