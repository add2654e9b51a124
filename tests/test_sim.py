"""The simulator's wire output decodes exactly as the real encoders' does,
and its block pool behaves like an engine's prefix cache."""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import msgpack
import pytest
import zmq

import kvsync
from kvsync.sim import SimProcess, Simulator, build_parser
from kvsync.simengine import ARRAY_FIELDS, BlockPool, Workload, encode_batch


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


# A malformed control message gets an error reply naming the problem; the
# simulator keeps serving. (frames, words the error must contain)
BAD_COMMANDS = [
    ([b"not json"], "not JSON"),
    ([b"\xff\xfe\x00"], "not UTF-8"),
    ([b"[1, 2]"], "must be a JSON object"),
    ([b"{}"], "missing field 'op'"),
    ([b'{"op": 5}'], "field 'op' must be a string"),
    ([b'{"op": "fly"}'], "unknown op 'fly'"),
    ([b'{"op": "step", "n": "3"}'], "field 'n'"),
    ([b'{"op": "step", "n": -1}'], "field 'n'"),
    ([b'{"op": "step", "n": true}'], "field 'n'"),
    ([b'{"op": "drop", "n": 1.5}'], "field 'n'"),
    ([b'{"op": "serve"}'], "missing field 'prompt'"),
    ([b'{"op": "serve", "prompt": "abc"}'], "field 'prompt' must be a list"),
    ([b'{"op": "serve", "prompt": [1, "a"]}'], "item 1 is not a token id"),
    ([b'{"op": "serve", "prompt": [-1]}'], "item 0 is not a token id"),
    ([b'{"op": "serve", "prompt": [1, 2], "rank": 5}'], "field 'rank': 5 out of range"),
    ([b'{"op": "run", "rate": "fast"}'], "field 'rate'"),
    ([b'{"op": "ping"}', b"extra"], "expected one frame"),
]
BAD_IDS = [b" ".join(frames).decode(errors="replace") for frames, _ in BAD_COMMANDS]


@pytest.mark.parametrize(("frames", "error"), BAD_COMMANDS, ids=BAD_IDS)
def test_bad_control_message_gets_an_error_reply(frames: list[bytes], error: str) -> None:
    sim = Simulator(build_parser().parse_args(["--block-size", "4"]))
    try:
        reply, stop = sim.handle_raw(frames)
        assert (reply["ok"], stop) == (False, False)
        assert error in reply["error"], reply
        # nothing was published by the bad message; a good one still works
        assert sim.ranks[0].seq == 0
        reply, _ = sim.handle_raw([b'{"op": "step", "n": 2}'])
        assert reply == {"ok": True, "seq": [1]}
    finally:
        sim.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_simulator_process_survives_every_bad_control_message() -> None:
    """Over its real control socket: every bad message is answered, then a
    good one still works (the old simulator died on the first)."""
    with SimProcess("--block-size", "4") as proc:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)  # deadline on every answer
        sock.connect(f"tcp://127.0.0.1:{proc.control_port}")
        try:
            for frames, error in BAD_COMMANDS:
                sock.send_multipart(frames)
                try:
                    reply = json.loads(sock.recv())
                except zmq.Again:
                    pytest.fail(f"no answer to {frames!r}; simulator alive: {proc.proc.poll()}")
                assert reply["ok"] is False and error in reply["error"], (frames, reply)
            assert proc.request("step", n=3)["seq"] == [2]
            assert proc.proc.poll() is None
        finally:
            sock.close(linger=0)
            ctx.term()


def test_replay_port_is_honoured_with_a_random_pub_port() -> None:
    """`kvsync sim --replay-port P` (no --port): the replay ROUTER is on P,
    not on a port picked after the random PUB port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    sim = Simulator(build_parser().parse_args(["--replay-port", str(free)]))
    try:
        assert sim.replay_port == free
        assert sim.pub_port != free
    finally:
        sim.close()
