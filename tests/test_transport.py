"""EventManager and Pod API without a network: arguments, lifecycle."""

from __future__ import annotations

import pytest

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
