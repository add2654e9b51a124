"""Threads applying and matching at once: no crash, no torn answers.

`Index.apply` and `Index.match` release the GIL (the module declares
gil_used = false), so this also exercises true parallelism on free-threaded
builds. Every wait is bounded by the timeout marker and by join timeouts.
"""

from __future__ import annotations

import threading
import time
from array import array

import msgpack
import pytest

import kvsync

BS = 16
BLOCKS = 32
WORKERS = 8
ROUNDS = 200


def store(hashes: list[int], parent: int | None, tokens: list[int]) -> bytes:
    ev = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    payload: bytes = msgpack.packb([0.0, [ev], None])
    return payload


def remove(hashes: list[int]) -> bytes:
    payload: bytes = msgpack.packb(
        [0.0, [{"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}], None]
    )
    return payload


@pytest.mark.timeout(120)
def test_concurrent_apply_and_match_stay_consistent() -> None:
    prompt = list(range(BLOCKS * BS))
    index = kvsync.Index()
    for w in range(WORKERS):
        index.add_worker(f"w{w}", model="m")
    # Each worker alternates between holding the whole prompt and holding
    # only its first half, so every answer must be one of two values.
    full = store(list(range(1, BLOCKS + 1)), None, prompt)
    tail = remove(list(range(BLOCKS // 2 + 1, BLOCKS + 1)))
    back = store(list(range(BLOCKS // 2 + 1, BLOCKS + 1)), BLOCKS // 2, prompt[BLOCKS // 2 * BS :])
    errors: list[BaseException] = []
    stop = threading.Event()
    answers = {"n": 0}

    def writer(w: int) -> None:
        try:
            index.apply(f"w{w}", full)
            for _ in range(ROUNDS):
                index.apply(f"w{w}", tail)
                index.apply(f"w{w}", back)
        except BaseException as e:
            errors.append(e)

    def reader() -> None:
        query = array("I", prompt)
        try:
            while not stop.is_set():
                got = index.match("m", query)
                assert set(got) == {f"w{w}" for w in range(WORKERS)}
                assert all(v in (0, BLOCKS // 2, BLOCKS) for v in got.values()), got
                index.stats()
                answers["n"] += 1
        except BaseException as e:
            errors.append(e)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(WORKERS)]
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers + writers:
        t.start()
    deadline = time.monotonic() + 90
    for t in writers:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stop.set()
    for t in readers:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in writers + readers), "threads did not finish"
    assert not errors, errors[0]
    assert answers["n"] > 0
    assert index.match("m", prompt) == {f"w{w}": BLOCKS for w in range(WORKERS)}
    index.check()
