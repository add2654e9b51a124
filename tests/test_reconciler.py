"""The discovery reconciler (SPEC section 6): desired sets become
add_pod/remove_pod on a real EventManager, an address change purges, each
source's pods are its own, and WorkerInfo per worker id.

The manager is not started: pods are followed on paper (streams and index
workers exist, no sockets), which is where add/remove/purge happen. What
a worker held before is seeded through Index.apply before the manager
follows it, so that a purge shows in Index.match."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

import kvsync
from kvsync.discovery import Changes, Publisher, Reconciler, WorkerInfo

BS = 4
PROMPT = list(range(100, 112))  # 3 blocks


def held_payload() -> bytes:
    event = {
        "type": "BlockStored",
        "block_hashes": [11, 12, 13],
        "parent_block_hash": None,
        "token_ids": PROMPT,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    payload: bytes = msgpack.packb([1.0, [event], None])
    return payload


def pub(
    name: str, source: Any = "static", host: str = "10.0.0.1", model: str = "llama", **kw: Any
) -> Publisher:
    pod_fields = {k: kw.pop(k) for k in ("pub_port", "replay_port", "dp_size", "topic") if k in kw}
    pod = kvsync.Pod(name=name, model=model, host=host, **pod_fields)
    return Publisher(pod=pod, source=source, instance=kw.pop("instance", name), **kw)


@pytest.fixture
def index() -> kvsync.Index:
    ix = kvsync.Index()
    for w in ("a", "b"):
        ix.add_worker(w, model="llama")
        ix.apply(w, held_payload())
    return ix


@pytest.fixture
def manager(index: kvsync.Index) -> Iterator[kvsync.EventManager]:
    m = kvsync.EventManager(index)
    yield m
    m.stop()


@pytest.fixture
def rec(manager: kvsync.EventManager) -> Reconciler:
    return Reconciler(manager)


def test_replace_adds_and_removes_the_difference(
    rec: Reconciler, manager: kvsync.EventManager, index: kvsync.Index
) -> None:
    ch = rec.replace("static", [pub("a"), pub("b")])
    assert (sorted(ch.added), ch.removed, ch.replaced) == (["a", "b"], [], [])
    assert sorted(manager.pods()) == ["a", "b"]
    # the same set again changes nothing
    assert not rec.replace("static", [pub("a"), pub("b")])
    ch = rec.replace("static", [pub("a"), pub("c")])
    assert (ch.added, ch.removed, ch.replaced) == (["c"], ["b"], [])
    assert sorted(manager.pods()) == ["a", "c"]
    # the removed pod's holdings are purged and its worker gone from the index
    assert index.match("llama", PROMPT) == {"a": 3, "c": 0}
    assert sorted(rec.publishers()) == ["a", "c"]


def test_an_address_model_or_topic_change_purges_and_follows_the_new_one(
    rec: Reconciler, manager: kvsync.EventManager, index: kvsync.Index
) -> None:
    rec.replace("static", [pub("a"), pub("b")])
    assert index.match("llama", PROMPT) == {"a": 3, "b": 3}
    ch = rec.replace("static", [pub("a", host="10.0.0.9"), pub("b", topic="kv")])
    assert (ch.added, ch.removed, sorted(ch.replaced)) == ([], [], ["a", "b"])
    assert index.match("llama", PROMPT) == {"a": 0, "b": 0}
    assert manager.pods()["a"].host == "10.0.0.9"
    assert manager.pods()["b"].topic == "kv"
    ch = rec.replace("static", [pub("a", host="10.0.0.9", model="qwen"), pub("b", topic="kv")])
    assert ch.replaced == ["a"]
    assert index.workers() == {"a": "qwen", "b": "llama"}


def test_readiness_and_restarts_update_without_touching_the_stream(
    rec: Reconciler, index: kvsync.Index
) -> None:
    rec.replace("kubernetes", [pub("a", source="kubernetes")])
    ch = rec.replace("kubernetes", [pub("a", source="kubernetes", ready=False, restarts=2)])
    assert not ch
    assert index.match("llama", PROMPT)["a"] == 3  # not purged
    assert rec.publishers()["a"].restarts == 2
    assert rec.workers()["a"].ready is False


def test_sources_are_isolated_and_a_name_claimed_twice_is_refused(
    rec: Reconciler, manager: kvsync.EventManager
) -> None:
    rec.replace("static", [pub("a")])
    rec.replace("kubernetes", [pub("k1", source="kubernetes")])
    rec.upsert(pub("r/dp0", source="register", instance="r", dp_rank=0))
    # an empty static set removes only static pods
    ch = rec.replace("static", [])
    assert ch.removed == ["a"]
    assert sorted(manager.pods()) == ["k1", "r/dp0"]
    with pytest.raises(ValueError, match=r"'k1' is claimed by source 'static' and by source 'kub"):
        rec.replace("static", [pub("s"), pub("k1")])
    assert sorted(manager.pods()) == ["k1", "r/dp0"]  # a refused set changes nothing
    with pytest.raises(ValueError, match=r"'r/dp0' is claimed by source 'kubernetes'.*'register'"):
        rec.replace("kubernetes", [pub("r/dp0", source="kubernetes")])
    with pytest.raises(ValueError, match="belongs to source 'kubernetes'"):
        rec.remove("register", "k1")
    assert rec.counts() == {"static": 0, "kubernetes": 1, "register": 1}


def test_worker_ids_shared_between_pods_are_refused_before_anything_changes(
    rec: Reconciler, manager: kvsync.EventManager
) -> None:
    rec.replace("static", [pub("x", dp_size=2)])
    with pytest.raises(ValueError, match=r"pods 'x' and 'x/dp0' would both follow worker 'x/dp0'"):
        rec.upsert(pub("x/dp0", source="register", instance="x", dp_rank=0))
    with pytest.raises(ValueError, match="lists pod 'y' twice"):
        rec.replace("static", [pub("y"), pub("y")])
    with pytest.raises(ValueError, match="comes from source 'register', not 'static'"):
        rec.replace("static", [pub("z", source="register")])
    assert list(manager.pods()) == ["x"]
    # replacing x by a pod that takes over one of its worker ids is fine
    rec.replace("static", [pub("x/dp0")])
    assert list(manager.pods()) == ["x/dp0"]


def test_a_pod_the_manager_refuses_is_reported_and_not_followed(
    rec: Reconciler, index: kvsync.Index
) -> None:
    # "b" is in the index for llama; following it for another model is refused
    ch = rec.replace("static", [pub("a"), pub("b", model="qwen")])
    assert ch.added == ["a"]
    assert "b" in ch.failed and "llama" in ch.failed["b"]
    assert sorted(rec.publishers()) == ["a"]


def test_remove_purges_and_unknown_names_change_nothing(
    rec: Reconciler, manager: kvsync.EventManager, index: kvsync.Index
) -> None:
    rec.upsert(pub("a", source="register"))
    assert rec.remove("register", "nope") == Changes()
    assert rec.remove("register", "a").removed == ["a"]
    assert manager.pods() == {}
    assert "a" not in index.match("llama", PROMPT)


def test_worker_info_per_worker_id(rec: Reconciler) -> None:
    rec.replace("static", [pub("s", dp_size=2, host="10.0.0.2")])
    rec.upsert(pub("inst/dp3", source="register", instance="inst", dp_rank=3, tenant="t1"))
    workers = rec.workers()
    assert workers == {
        "s/dp0": WorkerInfo("s/dp0", "s", "default", "llama", "10.0.0.2", 0, True, "static"),
        "s/dp1": WorkerInfo("s/dp1", "s", "default", "llama", "10.0.0.2", 1, True, "static"),
        "inst/dp3": WorkerInfo("inst/dp3", "inst", "t1", "llama", "10.0.0.1", 3, True, "register"),
    }


def test_synced_waits_for_every_expected_source(rec: Reconciler) -> None:
    assert rec.synced
    rec.expect("static")
    rec.expect("kubernetes")
    assert not rec.synced
    rec.replace("static", [])
    assert not rec.synced
    with pytest.raises(ValueError, match="claimed"):
        rec.upsert(pub("k", source="register"))
        rec.replace("kubernetes", [pub("k", source="kubernetes")])
    assert not rec.synced  # a refused set is not a delivered one
    rec.replace("kubernetes", [])
    assert rec.synced
    with pytest.raises(ValueError, match="unknown discovery source 'dns'"):
        rec.expect("dns")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"source": "dns"}, "source must be one of"),
        ({"instance": ""}, "instance must not be empty"),
        ({"tenant": ""}, "tenant must not be empty"),
        ({"restarts": -1}, "restarts must be >= 0"),
        ({"dp_rank": -1}, "dp_rank must be >= 0"),
        ({"dp_rank": 0, "pod": kvsync.Pod("p", "m", "h", dp_size=2)}, "dp_size 1"),
    ],
)
def test_a_bad_publisher_is_refused_naming_the_field(fields: dict[str, Any], error: str) -> None:
    args: dict[str, Any] = {"pod": kvsync.Pod("p", "m", "h"), "source": "static", "instance": "p"}
    with pytest.raises(ValueError, match=error):
        Publisher(**{**args, **fields})


def test_concurrent_sources_leave_a_consistent_state(
    rec: Reconciler, manager: kvsync.EventManager
) -> None:
    errors: list[BaseException] = []

    def churn(source: Any, prefix: str) -> None:
        try:
            for i in range(30):
                rec.replace(source, [pub(f"{prefix}{j}", source=source) for j in range(i % 4)])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [
        threading.Thread(target=churn, args=("static", "s")),
        threading.Thread(target=churn, args=("kubernetes", "k")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors
    # 30 rounds end on i == 29: 29 % 4 == 1 pod per source
    assert sorted(manager.pods()) == ["k0", "s0"] == sorted(rec.publishers())


def test_a_pods_topic_is_a_string_or_none() -> None:
    assert kvsync.Pod("p", "m", "h").subscription(b"fleet") == b"fleet"
    assert kvsync.Pod("p", "m", "h", topic="").subscription(b"fleet") == b""
    assert kvsync.Pod("p", "m", "h", topic="kv@p").subscription(b"") == b"kv@p"
    with pytest.raises(TypeError, match=r"Pod\.topic must be a str or None, got b'kv'"):
        kvsync.Pod("p", "m", "h", topic=b"kv")  # type: ignore[arg-type]
