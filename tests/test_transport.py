"""EventManager and Pod API without engines: arguments, lifecycle, pod
bookkeeping, descriptor limits (sockets connect only to closed loopback
ports)."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import kvsync


def test_pod_workers_and_endpoints() -> None:
    pod = kvsync.Pod(name="p", model="m", host="10.0.0.7", pub_port=5557, replay_port=5558)
    assert pod.workers() == [("p", 0)]
    wide = kvsync.Pod(name="p", model="m", host="::1", pub_port=6000, replay_port=None, dp_size=3)
    assert [w for w, _ in wide.workers()] == ["p/dp0", "p/dp1", "p/dp2"]
    assert wide.endpoint(6000, 2) == "tcp://[::1]:6002"
    with pytest.raises(ValueError, match="dp_size"):
        kvsync.Pod(name="p", model="m", host="h", dp_size=0)
    with pytest.raises(ValueError, match="port"):
        kvsync.Pod(name="p", model="m", host="h", pub_port=70000)
    with pytest.raises(ValueError, match="name"):
        kvsync.Pod(name="", model="m", host="h")


def test_pods_can_be_managed_before_start_and_removal_purges() -> None:
    index = kvsync.Index()
    m = kvsync.EventManager(index)
    pod = kvsync.Pod(name="p", model="m", host="127.0.0.1", pub_port=1, replay_port=2)
    m.add_pod(pod)
    assert set(m.status()) == {"p"}
    assert m.status()["p"].state == "connecting"
    assert index.workers() == {"p": "m"}
    m.add_pod(pod)  # the same pod again changes nothing
    m.remove_pod("p")
    assert m.status() == {} and index.workers() == {}
    with pytest.raises(KeyError, match="unknown pod"):
        m.remove_pod("p")
    m.stop()  # never started: nothing to do


def test_start_stop_context_manager() -> None:
    index = kvsync.Index()
    pod = kvsync.Pod(name="p", model="m", host="127.0.0.1", pub_port=1, replay_port=None)
    with kvsync.EventManager(index) as m:
        m.add_pod(pod)
        assert m.status()["p"].state == "connecting"
        with pytest.raises(RuntimeError, match="already started"):
            m.start()
    assert m.status()["p"].state == "stopped"


# ------------------------------------------------------------------ helpers


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def nowhere(name: str, dp_size: int = 1, port: int | None = None) -> kvsync.Pod:
    p = port or closed_port()
    return kvsync.Pod(
        name=name, model="m", host="127.0.0.1", pub_port=p, replay_port=p, dp_size=dp_size
    )


@contextlib.contextmanager
def nofile_soft_limit(soft: int) -> Iterator[None]:
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


# -------------------------------------------------- worker-id collisions (5)


@pytest.mark.parametrize("started", [False, True], ids=["before-start", "running"])
def test_pods_whose_worker_ids_collide_are_refused(started: bool) -> None:
    index = kvsync.Index()
    m = kvsync.EventManager(index)
    if started:
        m.start()
    try:
        m.add_pod(nowhere("a", dp_size=2))
        with pytest.raises(ValueError, match=r"pod 'a/dp0'.*'a/dp0'.*pod 'a'"):
            m.add_pod(nowhere("a/dp0"))
        assert set(m.pods()) == {"a"}
        assert set(m.status()) == {"a/dp0", "a/dp1"}
        # and the other way round
        m.add_pod(nowhere("b/dp1"))
        with pytest.raises(ValueError, match=r"pod 'b'.*'b/dp1'.*pod 'b/dp1'"):
            m.add_pod(nowhere("b", dp_size=2))
        assert set(m.pods()) == {"a", "b/dp1"}
        # removing one pod leaves the other followed, nothing orphaned
        m.remove_pod("a")
        assert set(m.status()) == {"b/dp1"} and set(index.workers()) == {"b/dp1"}
        m.remove_pod("b/dp1")
        assert m.status() == {} and index.workers() == {}
    finally:
        m.stop()


# ------------------------------------------------ failed add_pod rolls back (12)


def test_add_pod_with_a_model_clash_leaves_nothing_behind() -> None:
    index = kvsync.Index()
    index.add_worker("p", "other-model")
    m = kvsync.EventManager(index)
    for _ in range(2):  # a retry fails the same way, it is no silent no-op
        with pytest.raises(ValueError, match=r"'p'.*other-model"):
            m.add_pod(nowhere("p"))
        assert m.pods() == {} and m.status() == {}
    assert index.workers() == {"p": "other-model"}


def test_add_pod_that_cannot_connect_leaves_nothing_behind() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    index = kvsync.Index()
    m = kvsync.EventManager(index, context=ctx)
    m.start()
    bad = kvsync.Pod(name="p", model="m", host="no such host", pub_port=1, replay_port=None)
    try:
        for _ in range(2):
            with pytest.raises(ValueError, match=r"'p'.*no such host"):
                m.add_pod(bad)
            assert m.pods() == {} and m.status() == {} and index.workers() == {}
        m.add_pod(nowhere("q"))  # the manager is still usable
        assert set(m.status()) == {"q"}
    finally:
        m.stop()
    # no socket was leaked: terminating the caller's context returns
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "zmq context did not terminate: a socket leaked"


# ---------------------------------------- each command gets its own error (13)


def test_concurrent_commands_get_their_own_errors() -> None:
    port = closed_port()
    m = kvsync.EventManager(kvsync.Index())
    m.start()
    outcomes: dict[str, list[str]] = {"remove": [], "add": []}

    def remove_unknown() -> None:
        for _ in range(150):
            try:
                m.remove_pod("ghost")
                outcomes["remove"].append("returned")
            except KeyError:
                outcomes["remove"].append("KeyError")
            except Exception as e:
                outcomes["remove"].append(type(e).__name__)

    def add_known() -> None:
        for i in range(150):
            try:
                m.add_pod(nowhere(f"p{i}", port=port))
                outcomes["add"].append("ok")
            except Exception as e:
                outcomes["add"].append(type(e).__name__)

    try:
        threads = [threading.Thread(target=f) for f in (remove_unknown, add_known)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        m.stop()
    assert outcomes["remove"] == ["KeyError"] * 150
    assert outcomes["add"] == ["ok"] * 150
    assert len(m.pods()) == 150


# ------------------------------------------------------ start/stop cycles (15, 16)


def test_a_stopped_manager_can_be_started_again() -> None:
    index = kvsync.Index()
    m = kvsync.EventManager(index)
    m.add_pod(nowhere("p"))
    m.start()
    m.stop()
    assert m.status()["p"].state == "stopped"
    with m:  # starts again, with its pods
        done = threading.Event()

        def add() -> None:
            m.add_pod(nowhere("q"))
            done.set()

        threading.Thread(target=add, daemon=True).start()
        assert done.wait(10), "add_pod on a restarted manager did not return"
        assert m.status()["q"].state == "connecting"
        # (p resumes when its engine connects: tests/integration/test_transport_faults.py)
    with pytest.raises(KeyError, match="unknown pod"):
        m.remove_pod("ghost")
    m.remove_pod("p")
    assert set(index.workers()) == {"q"}


def test_many_start_stop_cycles_on_a_shared_context() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    names = set()
    try:
        for _ in range(100):
            m = kvsync.EventManager(kvsync.Index(), context=ctx)
            m.start()
            names.add(m._commands.address)
            m.stop()
            del m  # lets CPython reuse the id for the next manager
            gc.collect()
    finally:
        ctx.term()
    assert len(names) == 100, "wake socket names were reused"


def test_start_raises_the_io_threads_error() -> None:
    m = kvsync.EventManager(kvsync.Index())
    m.add_pod(kvsync.Pod(name="p", model="m", host="no such host", pub_port=1, replay_port=None))
    with pytest.raises(ValueError, match=r"'p'.*no such host"):
        m.start()
    # the failed start left nothing running: fix the pod, start again
    m.remove_pod("p")
    m.add_pod(nowhere("p"))
    with m:
        assert m.status()["p"].state == "connecting"


# -------------------------------------------------------- descriptors (11)


def test_the_fleet_size_is_checked_against_the_descriptor_limit() -> None:
    open_now = len(os.listdir("/proc/self/fd"))
    limit = open_now + 200
    with nofile_soft_limit(limit):
        m = kvsync.EventManager(kvsync.Index())
        m.add_pod(nowhere("small", dp_size=5))
        with pytest.raises(OSError, match=rf"RLIMIT_NOFILE is {limit}\b") as err:
            m.add_pod(nowhere("big", dp_size=100))
        assert "105 workers needs about" in str(err.value)
        assert set(m.pods()) == {"small"}  # nothing half-added
        with m:
            assert set(m.status()) == {
                "small/dp0",
                "small/dp1",
                "small/dp2",
                "small/dp3",
                "small/dp4",
            }


def test_more_pods_than_zmqs_default_socket_limit() -> None:
    # libzmq's default of 1023 sockets stopped a fleet at ~340 pods.
    port = closed_port()
    with kvsync.EventManager(kvsync.Index()) as m:
        for i in range(400):
            m.add_pod(nowhere(f"p{i}", port=port))
        assert len(m.status()) == 400


def test_a_context_too_small_for_the_fleet_is_named() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 40)
    try:
        with kvsync.EventManager(kvsync.Index(), context=ctx) as m:
            m.add_pod(nowhere("a", dp_size=5))
            with pytest.raises(OSError, match=r"MAX_SOCKETS"):
                m.add_pod(nowhere("b", dp_size=20))
            assert set(m.pods()) == {"a"}
    finally:
        ctx.term()


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="rcvhwm"):
        kvsync.EventManager(kvsync.Index(), rcvhwm=0)
    with pytest.raises(ValueError, match="heartbeat"):
        kvsync.EventManager(kvsync.Index(), heartbeat_timeout=0)
