"""Integration: the transport's fault paths on loopback. Engines that die,
freeze or restart (simulators in child processes), and an in-process fake
engine that misbehaves on the wire in ways a simulator does not: malformed
frames on the live and replay sockets, replay tails that never come, IPv6,
floods faster than ingest."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

import kvsync
from kvsync._core import Streams
from kvsync.sim import SimProcess
from kvsync.simengine import encode_batch

from .conftest import MODEL, assert_index_is_truth, caught_up, pod_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Sims = Callable[..., SimProcess]
# Fast liveness for tests: a silent engine is noticed within ~0.6 s.
FAST = {"heartbeat_ivl": 0.2, "heartbeat_timeout": 0.6, "replay_timeout": 1.0, "clean_secs": 2.0}


def stored(n: int) -> bytes:
    """A batch storing one root block of its own (block size 4)."""
    ev = {
        "type": "BlockStored",
        "block_hashes": [n + 1],
        "parent_block_hash": None,
        "token_ids": [n, n, n, n],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    return encode_batch([ev], "map", None)


Reply = list[list[bytes]]


class FakeEngine:
    """A PUB and a replay ROUTER in this process. ``history[i]`` is the
    payload of seq i; ``on_replay(start)`` says what to answer (by default
    every batch from ``start`` and the end marker). The ROUTER is served by
    a thread; the PUB is used by the test's thread only."""

    def __init__(self, host: str = "127.0.0.1", sndhwm: int = 1000) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.history: list[bytes] = []
        self.requests: list[int] = []
        self.on_replay: Callable[[int], Reply] = self.full_replay
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        for s in (self.pub, self.router):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IPV6, 1)
        self.pub.setsockopt(zmq.SNDHWM, sndhwm)
        addr = f"tcp://[{host}]" if ":" in host else f"tcp://{host}"
        self.pub_port = self.pub.bind_to_random_port(addr)
        self.replay_port = self.router.bind_to_random_port(addr)
        self.host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def pod(self, name: str, replay: bool = True) -> kvsync.Pod:
        return kvsync.Pod(
            name=name,
            model=MODEL,
            host=self.host,
            pub_port=self.pub_port,
            replay_port=self.replay_port if replay else None,
        )

    def full_replay(self, start: int) -> Reply:
        return [
            [b"", b"", seq.to_bytes(8, "big"), p]
            for seq, p in enumerate(self.history)
            if seq >= start
        ] + [[b"", b"", b"\xff" * 8, b""]]

    def publish(self, payload: bytes | None = None, frames: list[bytes] | None = None) -> int:
        """Publish the next batch (recorded for replay); or, with
        ``frames``, send exactly those frames."""
        if frames is not None:
            self.pub.send_multipart(frames)
            return -1
        seq = len(self.history)
        self.history.append(payload if payload is not None else stored(seq))
        self.pub.send_multipart([b"", seq.to_bytes(8, "big"), self.history[seq]])
        return seq

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(50):
                continue
            ident, *req = self.router.recv_multipart()
            if len(req) != 2 or len(req[1]) != 8:
                continue
            start = int.from_bytes(req[1], "big")
            self.requests.append(start)
            for frames in self.on_replay(start):
                self.router.send_multipart([ident, *frames])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.pub.close(linger=0)
        self.router.close(linger=0)
        self.ctx.term()


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeEngine]]:
    made: list[FakeEngine] = []

    def make(**kw: Any) -> FakeEngine:
        e = FakeEngine(**kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


@contextlib.contextmanager
def following(index: kvsync.Index, **kw: Any) -> Iterator[kvsync.EventManager]:
    m = kvsync.EventManager(index, **{**FAST, **kw})
    m.start()
    try:
        yield m
    finally:
        m.stop()


def live_through(m: kvsync.EventManager, wid: str, engine: FakeEngine) -> None:
    """Publish until the worker is live and has applied the last batch (the
    first live messages may be lost before the subscription lands).

    One batch at a time, the next only when the last one is overdue: a
    batch published during a replay can reach us by the replay first and
    live afterwards, which the stream takes for an engine restart."""
    last_publish = [0.0]
    # Without replay, the stream only goes live on a live message.
    may_publish = {"live", "degraded"} | (
        set() if m.pods()[wid].replay_port is not None else {"connecting"}
    )

    def step() -> bool:
        st = m.status()[wid]
        if st.state in ("live", "degraded") and st.last_seq == len(engine.history) - 1:
            return True
        if st.state in may_publish and time.monotonic() - last_publish[0] > 0.3:
            engine.publish()
            last_publish[0] = time.monotonic()
        return False

    wait_for(step, what=f"{wid} live at the engine's last seq")


class Recorder:
    """Wraps Streams to record the connection events the transport reports."""

    def __init__(self, inner: Streams) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def disconnected(self, wid: str, now: float) -> None:
        self.calls.append(("disconnected", wid))
        self.inner.disconnected(wid, now)

    def reconnected(self, wid: str, now: float) -> int | None:
        self.calls.append(("reconnected", wid))
        return self.inner.reconnected(wid, now)


def recording(m: kvsync.EventManager) -> Recorder:
    rec = Recorder(m._streams)
    m._streams = rec  # type: ignore[assignment]
    return rec


# ------------------------------------------------- dead and frozen engines (2)


def test_killed_engine_is_reported_disconnected(sims: Sims, index: kvsync.Index) -> None:
    a, b = sims("--seed", "1"), sims("--seed", "2")
    m = kvsync.EventManager(index, **FAST)
    rec = recording(m)
    with m:
        m.add_pod(pod_of("a", a))
        m.add_pod(pod_of("b", b))
        a.request("step", n=5)
        b.request("step", n=5)
        wait_for(lambda: caught_up(m, "a", a) and caught_up(m, "b", b), what="both caught up")
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        wait_for(lambda: ("disconnected", "a") in rec.calls, what="a reported disconnected")
        # the other engine is not affected
        b.request("step", n=5)
        wait_for(lambda: caught_up(m, "b", b), what="b still followed")
        assert ("disconnected", "b") not in rec.calls
        assert_index_is_truth(index, "b", b)


def test_frozen_engine_is_noticed_by_heartbeats_and_resumes(
    sims: Sims, index: kvsync.Index
) -> None:
    sim = sims()
    m = kvsync.EventManager(index, **FAST)
    rec = recording(m)
    with m:
        m.add_pod(pod_of("p", sim))
        sim.request("step", n=5)
        wait_for(lambda: caught_up(m, "p", sim), what="caught up")
        os.kill(sim.proc.pid, signal.SIGSTOP)  # the TCP connection stays open
        try:
            wait_for(lambda: ("disconnected", "p") in rec.calls, what="heartbeat timeout")
        finally:
            os.kill(sim.proc.pid, signal.SIGCONT)
        wait_for(lambda: ("reconnected", "p") in rec.calls, what="reconnect after SIGCONT")
        sim.request("step", n=5)
        wait_for(lambda: caught_up(m, "p", sim), what="caught up after the freeze")
        assert m.status()["p"].state == "live"
        assert_index_is_truth(index, "p", sim)


def test_every_reconnect_is_reported(sims: Sims, index: kvsync.Index) -> None:
    sim = sims()
    m = kvsync.EventManager(index, **FAST)
    rec = recording(m)
    with m:
        m.add_pod(pod_of("p", sim))
        for n in range(1, 4):
            sim.request("step", n=3)
            wait_for(lambda: caught_up(m, "p", sim), what="caught up")
            sim.request("restart")
            wait_for(lambda n=n: rec.calls.count(("reconnected", "p")) == n, what=f"reconnect {n}")
        sim.request("step", n=3)
        wait_for(lambda: caught_up(m, "p", sim), what="caught up after the restarts")
        assert_index_is_truth(index, "p", sim)
        assert rec.calls.count(("disconnected", "p")) == 3


def test_dead_engine_is_purged_after_dead_after(sims: Sims, index: kvsync.Index) -> None:
    sim = sims()
    with following(index, dead_after=1.0) as m:
        m.add_pod(pod_of("p", sim))
        sim.request("step", n=5)
        wait_for(lambda: caught_up(m, "p", sim), what="caught up")
        assert index.worker_stats("p")["blocks"] > 0
        sim.proc.send_signal(signal.SIGKILL)
        sim.proc.wait(10)
        wait_for(lambda: m.status()["p"].state == "disconnected", what="disconnected")
        wait_for(lambda: index.worker_stats("p")["blocks"] == 0, what="purged after dead_after")
        # still registered (the pod was not removed), holding nothing
        assert index.match(MODEL, list(range(64))) == {"p": 0}


# ------------------------------------------------------------ restart (15)


def test_restarted_manager_resumes_from_where_it_stopped(sims: Sims, index: kvsync.Index) -> None:
    sim = sims()
    m = kvsync.EventManager(index, **FAST)
    with m:
        m.add_pod(pod_of("p", sim))
        # (not while the first replay is under way: see live_through)
        wait_for(lambda: m.status()["p"].state == "live", what="live")
        sim.request("step", n=10)
        wait_for(lambda: caught_up(m, "p", sim), what="caught up")
        purges = m.status()["p"].purges
    sim.request("step", n=10)  # published while the manager is stopped
    with m:
        wait_for(lambda: caught_up(m, "p", sim), what="caught up after restart")
        st = m.status()["p"]
        # resumed by replay, without purging what it held
        assert (st.state, st.lost_batches, st.purges) == ("live", 0, purges)
        assert_index_is_truth(index, "p", sim)


# -------------------------------------------------------------- IPv6 (14)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_engine_is_followed(fakes: Callable[..., FakeEngine], index: kvsync.Index) -> None:
    engine = fakes(host="::1")
    for _ in range(5):
        engine.publish()  # history, fetched by replay
    with following(index) as m:
        m.add_pod(engine.pod("v6"))
        live_through(m, "v6", engine)
        assert index.worker_stats("v6")["blocks"] == len(engine.history)


# ------------------------------------------------------ bounded queues (10)


def test_a_flood_faster_than_ingest_is_bounded_and_reported(
    fakes: Callable[..., FakeEngine], index: kvsync.Index
) -> None:
    # The engine queues 1,000 messages per subscriber (vLLM: 100,000) and
    # drops beyond that; a subscriber without a receive limit takes in all
    # it is sent, however slowly it ingests.
    engine = fakes(sndhwm=1000)
    flood = 6000
    with following(index, rcvhwm=50) as m:
        m.add_pod(engine.pod("p", replay=False))
        live_through(m, "p", engine)
        before = m.status()["p"].batches
        # Hold the I/O thread (as a slow ingest would) while the engine
        # publishes 6,000 batches of ~16 KiB.
        gate, held = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            gate.wait(30)

        t = threading.Thread(target=m._commands.call, args=(hold,), daemon=True)
        t.start()
        assert held.wait(10)
        pad = b"x" * 16384
        try:
            for _ in range(flood):
                seq = len(engine.history)
                engine.history.append(stored(seq))
                engine.pub.send_multipart([pad, seq.to_bytes(8, "big"), engine.history[seq]])
        finally:
            gate.set()
            t.join(10)
        live_through(m, "p", engine)
        st = m.status()["p"]
        arrived = st.batches - before
        # zmq queued at most rcvhwm + what the kernel's socket buffers held
        # and the engine's own high-water mark; the rest never reached us
        assert arrived < flood // 2, f"{arrived} of {flood} batches were queued"
        assert st.gaps >= 1 and st.lost_batches >= flood // 2
        assert st.dropped >= flood // 2
        assert st.state in ("live", "degraded")


def big_batch(n: int, blocks: int = 600) -> bytes:
    """A well-formed batch storing a chain of ``blocks`` blocks (> 4 KiB)."""
    ev = {
        "type": "BlockStored",
        "block_hashes": [n * 10_000 + i + 1 for i in range(blocks)],
        "parent_block_hash": None,
        "token_ids": [n] * (4 * blocks),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    return encode_batch([ev], "map", None)


def test_oversized_message_is_refused(
    fakes: Callable[..., FakeEngine], index: kvsync.Index
) -> None:
    engine = fakes()
    with following(index, max_message_bytes=4096) as m:
        m.add_pod(engine.pod("p"))
        live_through(m, "p", engine)
        big = engine.publish(big_batch(len(engine.history)))
        assert len(engine.history[big]) > 4096
        # libzmq drops a connection that carries it (live, then replay) and
        # does not reconnect by itself; the transport connects again, and
        # the stream gives the batch up and goes on with the next ones
        live_through(m, "p", engine)
        assert index.match(MODEL, [big] * 8)["p"] == 0
        st = m.status()["p"]
        assert st.lost_batches + st.purges >= 1, st  # the loss is reported
        last = len(engine.history) - 1
        assert index.match(MODEL, [last] * 4)["p"] == 1


# ------------------------------------- recovery paths: replay, malformed frames


def test_replay_that_goes_silent_is_asked_again_from_the_last_applied(
    fakes: Callable[..., FakeEngine], index: kvsync.Index
) -> None:
    engine = fakes()
    for _ in range(30):
        engine.publish()
    first = True

    def tail_dropped_once(start: int) -> Reply:
        nonlocal first
        if first:
            first = False
            return engine.full_replay(start)[:10]  # seqs 0..9, then nothing
        return engine.full_replay(start)

    engine.on_replay = tail_dropped_once
    with following(index, replay_timeout=0.5) as m:
        m.add_pod(engine.pod("p"))
        wait_for(lambda: m.status()["p"].last_seq == 29, what="history complete")
        # asked again from the last applied seq (9), which also proves that
        # the engine answering is the one whose history is held
        assert engine.requests[:2] == [0, 9]
        st = m.status()["p"]
        assert (st.lost_batches, st.purges) == (0, 0) and st.timeouts >= 1
        assert index.worker_stats("p")["blocks"] == 30
        live_through(m, "p", engine)


def test_malformed_frames_are_counted_and_one_worker_does_not_disturb_another(
    sims: Sims, fakes: Callable[..., FakeEngine], index: kvsync.Index
) -> None:
    healthy = sims()
    engine = fakes()
    for _ in range(3):
        engine.publish()

    def junk_then_history(start: int) -> Reply:
        return [
            [b"", b"only-two"],  # wrong frame count
            [b"", b"a", b"b", b"c", b"d"],  # five frames
            [b"", b"", b"\x00\x01", stored(99)],  # short seq frame
            *engine.full_replay(start),
        ]

    engine.on_replay = junk_then_history
    with following(index) as m:
        m.add_pod(pod_of("healthy", healthy))
        m.add_pod(engine.pod("bad"))
        live_through(m, "bad", engine)
        assert m.status()["bad"].malformed >= 3  # the replay's junk
        before = m.status()["bad"].malformed
        engine.publish(frames=[b"", b"\x00" * 8])  # two frames
        engine.publish(frames=[b"", b"\x00" * 8, b"x", b"y"])  # four frames
        engine.publish(frames=[b"", b"\x00\x00\x01", stored(98)])  # short seq
        healthy.request("step", n=10)
        live_through(m, "bad", engine)
        wait_for(lambda: m.status()["bad"].malformed == before + 3, what="3 malformed counted")
        st = m.status()["bad"]
        assert (st.state, st.resets, st.purges) == ("live", 0, 0)
        assert index.worker_stats("bad")["blocks"] == len(engine.history)
        wait_for(lambda: caught_up(m, "healthy", healthy), what="healthy caught up")
        hs = m.status()["healthy"]
        assert (hs.malformed, hs.lost_batches, hs.state) == (0, 0, "live")
        assert_index_is_truth(index, "healthy", healthy)


def test_worker_removed_from_the_index_behind_the_managers_back(
    sims: Sims, index: kvsync.Index, caplog: pytest.LogCaptureFixture
) -> None:
    sim, other = sims("--seed", "1"), sims("--seed", "2")
    caplog.set_level(logging.INFO, logger="kvsync.transport")
    with following(index) as m:
        m.add_pod(pod_of("p", sim))
        m.add_pod(pod_of("q", other))
        sim.request("step", n=5)
        wait_for(lambda: caught_up(m, "p", sim), what="caught up")
        try:
            index.remove_worker("p")
        except RuntimeError:
            # The core refuses to drop a followed worker; lose it at the
            # core level instead, which is what the transport must survive.
            m._streams.remove("p")
        for _ in range(5):
            sim.request("step", n=5)
            other.request("step", n=2)
        wait_for(lambda: caught_up(m, "q", other), what="q still followed")
        wait_for(lambda: any(r.levelno >= logging.ERROR for r in caplog.records), what="logged")
        sim.request("step", n=5)
        other.request("step", n=2)
        wait_for(lambda: caught_up(m, "q", other), what="q still followed")
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "no longer has this worker" in errors[0].getMessage()
        if "p" in m.status():
            assert m.status()["p"].state == "stopped"
        # removing and adding the pod again follows it again
        m.remove_pod("p")
        m.add_pod(pod_of("p", sim))
        wait_for(lambda: caught_up(m, "p", sim), what="followed again")
        assert_index_is_truth(index, "p", sim)
        assert_index_is_truth(index, "q", other)
