"""Threads reading and writing at once: no deadlock, no torn answers.

The bindings release the interpreter for their work and before waiting for
a lock (the module declares gil_used = false), so these also exercise true
parallelism on free-threaded builds. Every thread is a daemon joined under a
deadline, so a deadlock fails the test instead of hanging the run; the one
scenario that would freeze the interpreter itself runs in a subprocess with
a timeout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from array import array
from collections.abc import Callable

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


def run_threads(targets: list[Callable[[], None]], seconds: float) -> list[BaseException]:
    """Run every target in a daemon thread; fail if any is still running at
    the deadline (a deadlock), and return what they raised."""
    errors: list[BaseException] = []

    def guarded(f: Callable[[], None]) -> None:
        try:
            f()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(f,), daemon=True) for f in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"deadlocked: {len(stuck)} of {len(threads)} threads still running"
    return errors


@pytest.mark.timeout(120)
def test_streams_add_and_tick_in_parallel_do_not_deadlock() -> None:
    # add used to take the index lock then the streams lock while tick took
    # them in the other order.
    index = kvsync.Index()
    streams = kvsync._core.Streams(index)
    stop = threading.Event()

    def adder() -> None:
        try:
            for i in range(3000):
                streams.add(f"w{i % 16}", "m", replay=False)
                streams.remove(f"w{(i + 8) % 16}")
        finally:
            stop.set()

    def ticker() -> None:
        now = 0.0
        while not stop.is_set():
            now += 0.01
            streams.tick(now)
            streams.status(now)

    errors = run_threads([adder, ticker, ticker], seconds=60)
    assert not errors, errors[0]
    index.check()
    assert set(streams.workers()) == set(index.workers())


@pytest.mark.timeout(120)
def test_mixed_readers_and_writers_answer_consistently() -> None:
    prompt = list(range(BLOCKS * BS))
    index = kvsync.Index()
    streams = kvsync._core.Streams(index)
    for w in range(4):
        index.add_worker(f"w{w}", model="m")
    full = store(list(range(1, BLOCKS + 1)), None, prompt)
    clear: bytes = msgpack.packb([0.0, [{"type": "AllBlocksCleared"}], None])
    stop = threading.Event()
    seen = {"detail": 0}

    def writer(w: int) -> None:
        for _ in range(ROUNDS):
            index.apply(f"w{w}", full)
            index.apply(f"w{w}", clear)
        index.apply(f"w{w}", full)

    def churn() -> None:
        # workers come and go in the index and in the streams
        for i in range(ROUNDS):
            index.add_worker(f"tmp{i % 4}", model="m")
            streams.add(f"s{i % 4}", "m", replay=False)
            streams.start(f"s{i % 4}", float(i))
            streams.live(f"s{i % 4}", (i + 1).to_bytes(8, "big"), full, float(i))
            streams.tick(float(i))
            index.remove_worker(f"tmp{(i + 2) % 4}")
            streams.remove(f"s{(i + 2) % 4}")

    def detail_reader() -> None:
        query = array("I", prompt)
        while not stop.is_set():
            for w, tiers in index.match_detail("m", query).items():
                assert set(tiers) == {"gpu", "cpu", "storage", "any"}, (w, tiers)
                # one consistent view: nothing is held in a tier and not at all
                assert max(tiers["gpu"], tiers["cpu"], tiers["storage"]) <= tiers["any"], (
                    w,
                    tiers,
                )
                assert tiers["any"] in (0, BLOCKS), (w, tiers)
            seen["detail"] += 1

    def other_reader() -> None:
        while not stop.is_set():
            got = index.match("m", prompt)
            assert all(v in (0, BLOCKS) for v in got.values()), got
            assert index.stats()["workers"] >= 4
            streams.status(0.0)
            index.workers()

    def writers_then_stop() -> None:
        try:
            errors = run_threads([lambda w=w: writer(w) for w in range(4)] + [churn], 90)
            assert not errors, errors[0]
        finally:
            stop.set()

    errors = run_threads([writers_then_stop, detail_reader, detail_reader, other_reader], 100)
    assert not errors, errors[0]
    assert seen["detail"] > 0
    assert index.match("m", prompt)["w0"] == BLOCKS
    index.check()


BLOCKED_READER = textwrap.dedent(
    """
    import threading, time
    import msgpack, kvsync

    n = 20000
    ix = kvsync.Index()
    ix.add_worker("w", "m")
    ev = {"type": "BlockStored", "block_hashes": list(range(1, n + 1)),
          "parent_block_hash": None, "token_ids": list(range(4 * n)), "block_size": 4,
          "lora_id": None, "medium": "GPU", "lora_name": None}
    clear = {"type": "AllBlocksCleared"}
    # one long write: store and clear 20,000 blocks, many times, under one lock
    payloads = [msgpack.packb([float(i), [ev, clear], None]) for i in range(150)]
    writing = threading.Event()

    def writer():
        writing.set()
        ix.apply_many("w", payloads)

    # the longest stretch the counter thread went without running, since
    # the last reset
    gap = [0.0]
    stop = threading.Event()

    def counter():
        prev = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            gap[0] = max(gap[0], now - prev)
            prev = now

    w = threading.Thread(target=writer, daemon=True)
    c = threading.Thread(target=counter, daemon=True)
    w.start()
    writing.wait(30)
    time.sleep(0.01)
    c.start()
    waited = []
    for _ in range(200):
        if not w.is_alive():
            break
        gap[0] = 0.0
        t0 = time.monotonic()
        ix.stats()  # waits for the writer: must not hold the interpreter
        took = time.monotonic() - t0
        if took > 0.2:
            # other threads ran while this one waited for the lock
            waited.append((took, gap[0]))
    stop.set()
    w.join(60)
    assert not w.is_alive()
    assert waited, "stats() never had to wait: the test proved nothing"
    for took, longest in waited:
        assert longest < took / 2, f"other threads froze {longest:.3f} s of a {took:.3f} s wait"
    print("ok")
    """
)


@pytest.mark.timeout(120)
def test_waiting_for_the_index_lock_does_not_freeze_other_threads() -> None:
    # A call that waited for the lock while attached to the interpreter kept
    # every other Python thread from running: here the thread that would
    # release the lock, so the process hung.
    try:
        done = subprocess.run(
            [sys.executable, "-c", BLOCKED_READER], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process froze: a lock wait held the interpreter")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
