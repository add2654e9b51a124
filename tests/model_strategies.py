"""Hypothesis strategies for the model-based tests: random KV events (SPEC
section 1) in both wire forms, and the operations a caller of the Python API
(SPEC section 4) can perform on an index.

Values come from small pools on purpose so that hashes, parents, tokens and
extra keys collide often: collisions are where chaining, re-stores and
removals go wrong.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import strategies as st

WORKERS = {"a": "m", "b": "m", "c": "m", "d": "n"}
BS = 2
# Engine hashes: small ints that collide, wide ints of every msgpack width
# and sign (-1 and 2**64-1 are the same 64-bit word), 32-byte digests, and
# now and then a fresh random one.
HASHES = st.one_of(
    st.integers(0, 9),
    st.integers(0, 9),
    st.sampled_from([2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63), -5]),
    st.sampled_from([b"\x01" * 32, b"\x02" * 32, bytes(range(32))]),
    st.integers(-(2**63), 2**64 - 1),
)
TOKENS = st.sampled_from([0, 1, 2, 0, 1, 2, 2**32 - 1])
# Extra keys: multimodal ids, the LoRA name (ignored when it is the event's),
# ints, bytes, nested arrays, a bool that must not equal 1.
EXTRA = st.sampled_from(["img-1", "img-2", "lora-a", 7, 1, -3, b"\xaa", ["img-1", 4], True])
SALTS = st.sampled_from(["salt-1", "salt-2"])
LORAS = [(None, None), ("lora-a", None), (None, 3), ("lora-a", 3), ("lora-b", None)]
MEDIA = [None, "GPU", "CPU", "CPU_PINNED", "DISK", "STORAGE", "EXTERNAL", "cpu", "NVME"]
# The array form's field order, spelled from SPEC section 1 on purpose (the
# model side must not borrow the decoder's constants it is testing).
ARRAY_ORDER = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
]


# Strategies are built once here: building them inside the composite on every
# draw costs more than the index under test.
_HASH_LISTS = {n: st.lists(HASHES, min_size=n, max_size=n) for n in range(1, 5)}
_TOKEN_LISTS = {n: st.lists(TOKENS, min_size=BS * n, max_size=BS * n) for n in range(1, 5)}
_EXTRA_LISTS = {
    n: st.lists(st.one_of(st.none(), st.lists(EXTRA, max_size=2)), min_size=n, max_size=n)
    for n in range(1, 5)
}
_SHAPES = st.sampled_from(["exact"] * 9 + ["nil", "wrong", "tokenless", "tokenless"])
_NO_TOKENS = st.sampled_from([None, []])
_TOKENLESS_SIZES = st.sampled_from([None, 0, BS])
_PARENTS = st.one_of(st.none(), st.none(), st.integers(0, 9), HASHES)
_LORAS = st.sampled_from(LORAS)
_MEDIA = st.sampled_from(MEDIA)
_GROUPS = st.sampled_from([None, 0, 0, 1])
_KINDS = st.sampled_from([None, None, None, "full_attention", "sliding_window"])
_ONE_IN_FOUR = st.integers(0, 3)


@st.composite
def stored(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    lora_name, lora_id = draw(_LORAS)
    shape = draw(_SHAPES)
    tokens: list[int] | None = draw(_TOKEN_LISTS[n])
    block_size: int | None = BS
    if shape == "nil":
        block_size = None  # older releases: inferred from the token count
    elif shape == "wrong":
        block_size = BS + 1  # a block size the model's workers do not use
        tokens = [*(tokens or []), *[1] * n]
    elif shape == "tokenless":
        tokens = draw(_NO_TOKENS)
        block_size = draw(_TOKENLESS_SIZES)
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": draw(_HASH_LISTS[n]),
        "parent_block_hash": draw(_PARENTS),
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": lora_id,
        "medium": draw(_MEDIA),
        "lora_name": lora_name,
        "extra_keys": draw(_EXTRA_LISTS[n]) if draw(_ONE_IN_FOUR) == 0 else None,
        "group_idx": draw(_GROUPS),
        "kv_cache_spec_kind": draw(_KINDS),
    }
    if draw(_ONE_IN_FOUR) == 0:
        ev["cache_salt"] = draw(SALTS)
    return ev


removed = st.builds(
    lambda hashes, medium, group: {
        "type": "BlockRemoved",
        "block_hashes": hashes,
        "medium": medium,
        "group_idx": group,
    },
    st.lists(HASHES, min_size=1, max_size=4),
    _MEDIA,
    st.sampled_from([None, 0, 1]),
)
cleared = st.just({"type": "AllBlocksCleared"})
event = st.one_of(stored(), stored(), stored(), removed, removed, cleared)


@st.composite
def chain(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A store and its continuation, as an engine sends a long prompt: the
    second's parent is the first's last block, often with the same salt."""
    first, second = draw(stored()), draw(stored())
    second["parent_block_hash"] = first["block_hashes"][-1]
    second["group_idx"] = first["group_idx"]
    if "cache_salt" in first and draw(st.booleans()):
        second["cache_salt"] = first["cache_salt"]
    return [first, second]


events = st.one_of(st.lists(event, min_size=1, max_size=3), chain())
worker = st.sampled_from(sorted(WORKERS))

# The seq a caller passes with a batch (None: not recorded), up to u64 widths.
_SEQS = st.one_of(st.none(), st.integers(0, 100), st.just(2**63))
_apply = st.tuples(st.just("apply"), worker, events, st.booleans(), _SEQS)
_apply_many = st.tuples(
    st.just("apply_many"), worker, st.lists(events, min_size=1, max_size=3), st.booleans(), _SEQS
)
_worker_op = st.tuples(st.sampled_from(["remove", "add", "purge"]), worker)
# One op in ten is a save + load round trip (it writes a file: the slowest step).
op = st.one_of(
    *[_apply] * 5, _apply_many, _worker_op, _worker_op, _worker_op, st.just(("save_load",))
)


def encode_event(ev: dict[str, Any], array_form: bool) -> Any:
    """One event as vLLM/SGLang put it on the wire: a map (vLLM >= 0.24) or
    a positional array in declaration order (older releases)."""
    if not array_form or ev["type"] == "AllBlocksCleared":
        return ev
    if ev["type"] == "BlockRemoved":
        return [ev["type"], ev["block_hashes"], ev["medium"], ev["group_idx"]]
    out = [ev["type"]] + [ev[f] for f in ARRAY_ORDER]
    if ev.get("cache_salt") is not None:
        # Array form carries a salt only as SGLang 0.5.18's metadata map, in
        # the position vLLM uses for lora_name; that layout has no later fields.
        plain = ev["lora_name"] is None and ev["extra_keys"] is None
        if not (plain and not ev["group_idx"] and ev["kv_cache_spec_kind"] is None):
            return ev
        out = [*out[:7], {"cache_salt": ev["cache_salt"]}]
    return out


def encode(evs: list[dict[str, Any]], array_form: bool) -> bytes:
    body = [encode_event(e, array_form) for e in evs]
    packed: bytes = msgpack.packb([1.0, body, None])
    return packed
