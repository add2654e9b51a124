"""The simulator's wire output decodes exactly as the real encoders' does,
and its block pool behaves like an engine's prefix cache."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

import kvsync
from kvsync.sim import ARRAY_FIELDS, BlockPool, Simulator, Workload, build_parser, encode_batch


def normalized(ev: kvsync.Event, fields: list[str]) -> dict[str, Any]:
    return {"type": ev.type, **{f: getattr(ev, f) for f in fields}}


@pytest.mark.parametrize("form", ["map", "array"])
def test_simulated_batches_decode_like_engine_batches(form: str) -> None:
    pool = BlockPool(block_size=4, capacity=32, seed=7)
    work = Workload(random.Random(3), block_size=4, tenants=2, system_blocks=(2, 4))
    seen = set()
    for _ in range(60):
        events = pool.request(work.next_prompt())
        payload = encode_batch(events, form, rank=1)
        raw = msgpack.unpackb(payload)
        assert len(raw) == 3 and raw[2] == 1  # [ts, events, dp_rank]
        batch = kvsync.decode(payload)
        assert batch.dp_rank == 1 and batch.ts == raw[0]
        assert len(batch.events) == len(events)
        for ev, want in zip(batch.events, events, strict=True):
            fields = ARRAY_FIELDS[want["type"]]
            assert normalized(ev, fields) == {"type": want["type"], **want}
            if form == "array":
                assert isinstance(raw[1][0], list)
            seen.add(ev.type)
    assert seen == {"BlockStored", "BlockRemoved"}, "the workload must evict"


def test_pool_shares_prefixes_and_evicts_least_recently_used() -> None:
    pool = BlockPool(block_size=2, capacity=4, seed=1)
    first = pool.request([1, 1, 2, 2, 3, 3])
    assert [e["type"] for e in first] == ["BlockStored"]
    assert first[0]["parent_block_hash"] is None and len(first[0]["block_hashes"]) == 3
    # same first two blocks: cached, only the new block is stored, chained
    second = pool.request([1, 1, 2, 2, 9, 9])
    assert pool.last_hit == 2
    assert second[-1]["parent_block_hash"] == first[0]["block_hashes"][1]
    # full: the least recently used block ([3, 3] tail) is evicted first
    third = pool.request([5, 5])
    assert third[0] == {
        "type": "BlockRemoved",
        "block_hashes": [first[0]["block_hashes"][2]],
        "medium": "GPU",
    }
    assert len(pool.truth()) == 4
    assert pool.cached_prefix([1, 1, 2, 2, 9, 9]) == 3


def test_index_follows_the_pool_exactly() -> None:
    """Applying the simulator's events gives exactly its ground truth."""
    pool = BlockPool(block_size=4, capacity=64, seed=11)
    work = Workload(random.Random(5), block_size=4)
    index = kvsync.Index()
    index.add_worker("w", model="m")
    for _ in range(300):
        index.apply("w", encode_batch(pool.request(work.next_prompt()), "map", None))
    paths = pool.truth()
    assert index.worker_stats("w")["blocks"] == len(paths)
    for p in paths:
        assert index.match("m", p)["w"] == pool.cached_prefix(p)


def test_batch_requests_regroups_the_same_traffic_into_fewer_batches() -> None:
    """--batch-requests N: each step publishes one batch with N requests'
    events, in order; the traffic is the same as N single-request steps."""

    def events_of(batch_requests: int, steps: int) -> tuple[list[Any], int]:
        args = build_parser().parse_args(
            ["--block-size", "4", "--capacity", "64", "--batch-requests", str(batch_requests)]
        )
        sim = Simulator(args)
        try:
            rank = sim.ranks[0]
            for _ in range(steps):
                rank.step()
            payloads = [p for _, p in rank.buffer]
            index = kvsync.Index()
            index.add_worker("w", model="m")
            for p in payloads:
                index.apply("w", p)
            paths = rank.pool.truth()
            assert index.worker_stats("w")["blocks"] == len(paths)
            for p in paths:
                assert index.match("m", p)["w"] == rank.pool.cached_prefix(p)
        finally:
            sim.close()
        return [ev for p in payloads for ev in msgpack.unpackb(p)[1]], len(payloads)

    batched, n_batched = events_of(3, 40)
    single, n_single = events_of(1, 120)
    assert (n_batched, n_single) == (40, 120)
    assert batched == single
