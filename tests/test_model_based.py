"""Model-based test: random multi-worker event streams and API calls drive the
real index and the pure-Python model (tests/model.py, written from SPEC.md and
docs/choices.md) side by side; after every step every answer, every size and
every counter must agree, and ``Index.check()`` must pass.

Operations (tests/model_strategies.py): apply and apply_many of random
batches in both wire forms, add/remove/purge workers, and save + load round
trips (the loaded index replaces the live one, so every later answer is the
loaded index's). Examples per run come from the Hypothesis profile
(tests/__init__.py): 1,000 by default (CI), more with HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event as label
from hypothesis import given, note
from hypothesis import strategies as st

import kvsync

from . import standard_hash
from .model import TIERS, Counts, ModelIndex
from .model_strategies import WORKERS, encode, op

Query = tuple[str, list[int], Any, list[Any] | None]


def fresh() -> tuple[kvsync.Index, ModelIndex]:
    index = kvsync.Index()
    model = ModelIndex()
    for wid, m in WORKERS.items():
        index.add_worker(wid, model=m)
        model.add_worker(wid, m)
    return index, model


def same_counts(got: kvsync.ApplyStats, want: Counts) -> None:
    names = ("stored", "removed", "cleared", "skipped", "orphaned", "ignored", "unknown_removals")
    assert {n: getattr(got, n) for n in names} == {n: getattr(want, n) for n in names}


def round_trip(index: kvsync.Index) -> kvsync.Index:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.snap"
        index.save(path)
        return kvsync.Index.load(path)


def queries(model: ModelIndex) -> list[Query]:
    """Every held path, plus queries nobody holds, one block longer than held
    paths, and without their extra keys or LoRA (which must not match)."""
    held = model.queries()
    out = [
        *held,
        ("m", [0, 1, 2, 0], None, None),
        ("n", [2, 2], "lora-a", None),
        ("unknown-model", [0, 0], None, None),
    ]
    for m, t, lo, ex in held[:6]:
        out.append((m, [*t, 0, 1], lo, ex))
        if ex is not None:
            out.append((m, t, lo, None))
        if lo is not None:
            out.append((m, t, None, ex))
    unique = {repr(q): q for q in out}
    return list(unique.values())


def check_same(index: kvsync.Index, model: ModelIndex) -> int:
    """Compare sizes and every answer; returns the deepest match seen."""
    index.check()
    stats = index.stats()
    assert stats["workers"] == len(model.workers)
    assert index.workers() == {w: v.model for w, v in model.workers.items()}
    assert {w: index.last_seq(w) for w in model.workers} == {
        w: v.last_seq for w, v in model.workers.items()
    }
    assert stats["holdings"] == model.holdings()
    assert stats["blocks"] == model.blocks()
    for name in {*WORKERS.values(), "unknown-model"}:
        assert index.block_size(name) == model.block_size.get(name)
    deepest = 0
    for i, (name, tokens, lora, extras) in enumerate(queries(model)):
        want = model.match_detail(name, tokens, lora, extras)
        got = index.match_detail(name, tokens, lora=lora, extra_keys=extras)
        assert got == want, (name, tokens, lora, extras)
        any_tier = {w: d["any"] for w, d in want.items()}
        deepest = max([deepest, *any_tier.values()])
        if i < 4:
            # match itself, tier filters as a caller passes them, and a
            # trailing partial block, which never counts.
            assert index.match(name, tokens, lora=lora, extra_keys=extras) == any_tier
            tiers = ("cpu", "storage")
            two = model.match(name, tokens, lora, extras, tiers)
            assert index.match(name, tokens, lora=lora, extra_keys=extras, tiers=tiers) == two
            gpu = {w: d["gpu"] for w, d in want.items()}
            assert index.match(name, tokens, lora=lora, extra_keys=extras, tiers="gpu") == gpu
            scores = index.match_scores(name, tokens, lora=lora, extra_keys=extras)
            assert scores == model.match_scores(name, tokens, lora, extras)
            bs = model.block_size.get(name)
            # the router's one-call form: the same scores, and the keys of
            # the prompt's full blocks (standard seq hashes XOR namespace)
            both, keys = index.scores_and_keys(name, tokens, lora=lora, extra_keys=extras)
            assert both == scores
            assert keys == index.prefix_keys(name, tokens, lora=lora, extra_keys=extras)
            assert len(keys) == (0 if bs is None else len(tokens) // bs)
            if bs is not None and not extras:
                # The same prompt as standard seq hashes (computed by an
                # independent implementation) finds the same blocks.
                hashes = standard_hash.seq_hashes(tokens, bs)
                assert index.match_hashes(name, hashes, lora=lora) == any_tier
                assert index.match_detail_hashes(name, hashes, lora=lora) == want
            if bs is not None and bs > 1:
                partial = [*tokens[: len(tokens) // bs * bs], *[1] * (bs - 1)]
                got_p = index.match(name, partial, lora=lora, extra_keys=extras)
                assert got_p == any_tier
    return deepest


def step(index: kvsync.Index, model: ModelIndex, o: Any) -> kvsync.Index:
    """Perform one operation on both; returns the index to use from now on."""
    kind, args = o[0], o[1:]
    if kind in ("apply", "apply_many"):
        wid, batches, array_form, seq = args
        batches = [batches] if kind == "apply" else batches
        payloads = [encode(b, array_form) for b in batches]

        def call() -> kvsync.ApplyStats:
            if kind == "apply":
                return index.apply(wid, payloads[0], seq=seq)
            return index.apply_many(wid, payloads, first_seq=seq)

        if wid not in model.workers:
            with pytest.raises(KeyError):
                call()
            return index
        got = call()
        same_counts(got, model.apply_many(wid, batches, seq))
    elif kind == "remove":
        assert index.remove_worker(args[0]) == model.remove_worker(args[0])
    elif kind == "add":
        index.add_worker(args[0], model=WORKERS[args[0]])
        model.add_worker(args[0], WORKERS[args[0]])
    elif kind == "purge":
        if args[0] not in model.workers:
            assert index.purge_worker(args[0]) is False  # unknown: nothing to purge
        else:
            assert index.purge_worker(args[0]) is True
            model.purge_worker(args[0])
    else:
        index = round_trip(index)
    return index


@given(ops=st.lists(op, min_size=3, max_size=30))
def test_index_matches_the_model(ops: list[Any]) -> None:
    index, model = fresh()
    deepest = 0
    for o in ops:
        note(repr(o))
        index = step(index, model, o)
        deepest = max(deepest, check_same(index, model))
    # Coverage report (--hypothesis-show-statistics). No target(): its Pareto
    # front costs more than the test and makes a failure slow to shrink.
    label(f"deepest match {min(deepest, 4)}{'+' if deepest >= 4 else ''}")
    label(f"save/load round trips: {min(sum(o[0] == 'save_load' for o in ops), 2)}")


@given(ops=st.lists(op, max_size=30), capacity=st.integers(1, 6))
def test_capacity_bound_never_gives_false_positives(ops: list[Any], capacity: int) -> None:
    """With a capacity, answers may fall short of the model but never exceed
    it, and held blocks never exceed the bound (SPEC 2, capacity)."""
    index = kvsync.Index(capacity_blocks=capacity)
    model = ModelIndex()
    for wid, m in WORKERS.items():
        index.add_worker(wid, model=m)
        model.add_worker(wid, m)
    for o in ops:
        note(repr(o))
        kind = o[0]
        if kind in ("apply", "apply_many") and o[1] in model.workers:
            batches = [o[2]] if kind == "apply" else o[2]
            index.apply_many(o[1], [encode(b, o[3]) for b in batches])
            model.apply_many(o[1], batches)
        elif kind not in ("apply", "apply_many"):
            index = step(index, model, o)
        index.check()
        assert index.stats()["blocks"] <= capacity
        assert index.stats()["capacity_blocks"] == capacity
        for name, tokens, lora, extras in queries(model):
            want = model.match_detail(name, tokens, lora, extras)
            got = index.match_detail(name, tokens, lora=lora, extra_keys=extras)
            assert got.keys() == want.keys()
            for w in got:
                for tier in (*TIERS, "any"):
                    assert got[w][tier] <= want[w][tier], (name, tokens, w, tier, got, want)


def test_the_model_reads_spec_examples() -> None:
    """The model itself on SPEC's rules, by hand: a wrong model would make the
    property tests compare two wrong answers."""
    model = ModelIndex()
    model.add_worker("a", "m")
    stored = {"type": "BlockStored", "block_size": 2, "medium": None}
    model.apply(
        "a",
        [
            {
                **stored,
                "block_hashes": [1, 2],
                "parent_block_hash": None,
                "token_ids": [1, 2, 3, 4],
            },
            {**stored, "block_hashes": [3], "parent_block_hash": 9, "token_ids": [5, 6]},
            {
                **stored,
                "block_hashes": [4],
                "parent_block_hash": None,
                "token_ids": [7, 8],
                "cache_salt": "s",
            },
        ],
    )
    assert model.match("m", [1, 2, 3, 4, 5]) == {"a": 2}  # partial block never counts
    assert model.match("m", [1, 2, 3, 4, 5, 6]) == {"a": 2}  # unknown parent: dropped
    assert model.match("m", [7, 8]) == {"a": 0}  # salted block needs the salt
    assert model.match("m", [7, 8], extra_keys=[["s"]]) == {"a": 1}
    model.apply("a", [{"type": "BlockStored", "block_hashes": [2], "medium": "CPU_PINNED"}])
    model.apply("a", [{"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"}])
    assert model.match_detail("m", [1, 2, 3, 4]) == {
        "a": {"gpu": 1, "cpu": 0, "storage": 0, "any": 2}
    }
    assert model.match("m", [1, 2, 3, 4], lora="x") == {"a": 0}
