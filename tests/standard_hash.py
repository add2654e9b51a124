"""The standard rolling hash of SPEC section 2 (Mooncake KV Indexer API),
written from SPEC with the ``xxhash`` package: an implementation independent
of kvsync's Rust one, for tests to compare against."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

SEED = 1337


def local(tokens: Sequence[int], seed: int = SEED) -> int:
    """``local(i)``: XXH3-64 of the block's tokens as little-endian u32."""
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(tokens)}I", *tokens), seed=seed)


def seq_hashes(tokens: Sequence[int], block_size: int, seed: int = SEED) -> list[int]:
    """``seq(i)`` of every full block: ``seq(0) = local(0)``,
    ``seq(i) = XXH3-64(seq(i-1) LE64 || local(i) LE64)``."""
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = local(tokens[start : start + block_size], seed)
        if out:
            h = xxhash.xxh3_64_intdigest(struct.pack("<QQ", out[-1], h), seed=seed)
        out.append(h)
    return out
