"""Model-based test: random multi-worker event streams drive the real index
and the pure-Python model (tests/model.py) side by side; every match answer
and every size must agree.

Examples per run come from the Hypothesis profile (tests/__init__.py): 1,000
by default (CI), more with HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import event as label
from hypothesis import given, note, target
from hypothesis import strategies as st

import kvsync

from .model import TIERS, ModelIndex

WORKERS = {"a": "m", "b": "m", "c": "m", "d": "n"}
BS = 2
HASHES = st.one_of(st.integers(0, 9), st.sampled_from([b"\x01" * 32, b"\x02" * 32]))
EXTRA = st.sampled_from(["img-1", "img-2", "lora-a", 7, -3, b"\xaa", ["img-1", 4], True])
LORAS = [(None, None), ("lora-a", None), (None, 3), ("lora-a", 3)]
MEDIA = [None, "GPU", "CPU", "CPU_PINNED", "DISK"]
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


@st.composite
def stored(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    hashes = draw(st.lists(HASHES, min_size=n, max_size=n))
    lora_name, lora_id = draw(st.sampled_from(LORAS))
    offload = draw(st.integers(0, 9)) == 0
    size = draw(st.sampled_from(["exact", "exact", "exact", "nil", "wrong"]))
    tokens = [] if offload else draw(st.lists(st.integers(0, 2), min_size=BS * n, max_size=BS * n))
    if size == "wrong" and tokens:
        tokens = tokens + [1] * n  # block size 3: does not fit the model's 2
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": draw(st.one_of(st.none(), st.none(), HASHES)),
        "token_ids": tokens,
        "block_size": None if size == "nil" else (0 if offload else len(tokens) // n),
        "lora_id": lora_id,
        "medium": draw(st.sampled_from(MEDIA)),
        "lora_name": lora_name,
        "extra_keys": None,
        "group_idx": draw(st.sampled_from([None, 0, 0, 1])),
        "kv_cache_spec_kind": draw(
            st.sampled_from([None, None, "full_attention", "sliding_window"])
        ),
    }
    if draw(st.integers(0, 3)) == 0:
        ev["extra_keys"] = draw(
            st.lists(st.one_of(st.none(), st.lists(EXTRA, max_size=2)), min_size=n, max_size=n)
        )
    if draw(st.integers(0, 5)) == 0:
        ev["cache_salt"] = draw(st.sampled_from(["salt-1", "salt-2"]))
    return ev


removed = st.builds(
    lambda hashes, medium, group: {
        "type": "BlockRemoved",
        "block_hashes": hashes,
        "medium": medium,
        "group_idx": group,
    },
    st.lists(HASHES, min_size=1, max_size=4),
    st.sampled_from(MEDIA),
    st.sampled_from([None, 0, 1]),
)
cleared = st.just({"type": "AllBlocksCleared"})
event = st.one_of(stored(), stored(), stored(), removed, removed, cleared)
apply_op = st.tuples(
    st.just("apply"),
    st.sampled_from(sorted(WORKERS)),
    st.lists(event, min_size=1, max_size=3),
    st.booleans(),  # array-form events
)
op = st.one_of(
    apply_op,
    apply_op,
    apply_op,
    st.tuples(st.just("remove"), st.sampled_from(sorted(WORKERS))),
    st.tuples(st.just("add"), st.sampled_from(sorted(WORKERS))),
)


def encode_event(ev: dict[str, Any], array_form: bool) -> Any:
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


def encode(events: list[dict[str, Any]], array_form: bool) -> bytes:
    body = [encode_event(e, array_form) for e in events]
    packed: bytes = msgpack.packb([1.0, body, None])
    return packed


def check_same(index: kvsync.Index, model: ModelIndex) -> int:
    """Compare sizes and every match answer; returns the deepest match seen."""
    stats = index.stats()
    assert stats["workers"] == len(model.workers)
    assert stats["holdings"] == model.holdings()
    assert stats["blocks"] == model.blocks()
    queries = model.queries()
    # Queries nobody holds, and queries one block longer than held paths.
    queries.append(("m", [0, 1, 2, 0], None, None))
    queries.append(("n", [2, 2], "lora-a", None))
    queries.append(("unknown-model", [0, 0], None, None))
    queries += [(m, [*t, 0, 1], lo, ex) for (m, t, lo, ex) in queries[:5]]
    deepest = 0
    for model_name, tokens, lora, extras in queries:
        want = model.match(model_name, tokens, lora, extras)
        got = index.match(model_name, tokens, lora=lora, extra_keys=extras)
        assert got == want, (model_name, tokens, lora, extras)
        deepest = max([deepest, *want.values()])
        # A trailing partial block never counts.
        bs = index.block_size(model_name)
        assert bs == model.block_size.get(model_name)
        if bs is not None and bs > 1:
            partial = tokens[: len(tokens) // bs * bs] + [1] * (bs - 1)
            assert index.match(model_name, partial, lora=lora, extra_keys=extras) == want
    for model_name, tokens, lora, extras in queries[:8]:
        for tier, bit in TIERS.items():
            want = model.match(model_name, tokens, lora, extras, tiers=bit)
            assert index.match(model_name, tokens, lora=lora, extra_keys=extras, tiers=tier) == want
    return deepest


@given(ops=st.lists(op, max_size=40))
def test_index_matches_the_model(ops: list[Any]) -> None:
    index = kvsync.Index()
    model = ModelIndex()
    for wid, m in WORKERS.items():
        index.add_worker(wid, model=m)
        model.add_worker(wid, m)
    deepest = 0
    for o in ops:
        note(repr(o))
        if o[0] == "apply":
            _, wid, events, array_form = o
            if wid not in model.workers:
                with pytest.raises(KeyError):
                    index.apply(wid, encode(events, array_form))
                continue
            got = index.apply(wid, encode(events, array_form))
            want = model.apply(wid, events)
            assert (got.stored, got.removed, got.cleared, got.skipped) == (
                want.stored,
                want.removed,
                want.cleared,
                want.skipped,
            )
            assert (got.orphaned, got.ignored, got.unknown_removals) == (
                want.orphaned,
                want.ignored,
                want.unknown_removals,
            )
        elif o[0] == "remove":
            assert index.remove_worker(o[1]) == model.remove_worker(o[1])
        else:
            index.add_worker(o[1], model=WORKERS[o[1]])
            model.add_worker(o[1], WORKERS[o[1]])
        deepest = max(deepest, check_same(index, model))
    index.check()
    # Coverage report (--hypothesis-show-statistics) and a nudge to deep chains.
    target(float(deepest), label="deepest match")
    label(f"deepest match {min(deepest, 4)}{'+' if deepest >= 4 else ''}")


@given(ops=st.lists(op, max_size=40), capacity=st.integers(1, 6))
def test_capacity_bound_never_gives_false_positives(ops: list[Any], capacity: int) -> None:
    """With a capacity, answers may fall short of the model but never exceed it."""
    index = kvsync.Index(capacity_blocks=capacity)
    model = ModelIndex()
    for wid, m in WORKERS.items():
        index.add_worker(wid, model=m)
        model.add_worker(wid, m)
    for o in ops:
        if o[0] == "apply":
            _, wid, events, array_form = o
            if wid in model.workers:
                index.apply(wid, encode(events, array_form))
                model.apply(wid, events)
        elif o[0] == "remove":
            index.remove_worker(o[1])
            model.remove_worker(o[1])
        else:
            index.add_worker(o[1], model=WORKERS[o[1]])
            model.add_worker(o[1], WORKERS[o[1]])
        assert index.stats()["blocks"] <= capacity
        for model_name, tokens, lora, extras in model.queries():
            want = model.match(model_name, tokens, lora, extras)
            got = index.match(model_name, tokens, lora=lora, extra_keys=extras)
            assert got.keys() == want.keys()
            assert all(got[w] <= want[w] for w in got), (got, want)
    index.check()
