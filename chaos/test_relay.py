"""The harness's own network: an engine's data address is reached only
through the relay, a partition there stops real TCP traffic (and only
on the data link: the management link still answers), and duplication
and loss act on real frames. Every namespace is gone afterwards; the relay
stops by itself; namespaces of a run that died are cleaned up."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from chaos.engines import PUB_PORT, Engine
from chaos.faults import Faults
from chaos.netns import NETNS_DIR, PREFIX, Topology, ip, remove_stale
from chaos.relay import Relay

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]


@pytest.fixture
def one_engine(namespaces: None) -> Iterator[tuple[Topology, Relay, Engine]]:
    topo = Topology(1).create()
    relay = engine = None
    try:
        ln = topo.links[0]
        relay = Relay(topo.relay_ns, {"e0": (ln.relay_sut_dev, ln.relay_engine_dev)}, seed=7)
        engine = Engine("e0", ln, "--block-size", "4").start()
        yield topo, relay, engine
    finally:
        if engine is not None:
            engine.close()
        if relay is not None:
            relay.close()
        topo.close()
    assert not any(n.startswith(f"kvchaos-{topo.tag}") for n in os.listdir(NETNS_DIR))


def connects(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_partition_blocks_the_data_link_only(one_engine: tuple[Topology, Relay, Engine]) -> None:
    _, relay, engine = one_engine
    assert connects(engine.host, PUB_PORT, 5.0)
    before = relay.stats()["e0"]["forwarded"]
    assert before > 0, "the data link's frames must cross the relay"
    relay.set("e0", Faults(partition=True))
    assert not connects(engine.host, PUB_PORT, 1.0)
    assert relay.stats()["e0"]["dropped"] > 0
    assert engine.request("ping")["ok"]  # management link: never faulted
    relay.heal()
    assert connects(engine.host, PUB_PORT, 5.0)


def test_duplication_and_loss_act_on_real_frames(
    one_engine: tuple[Topology, Relay, Engine],
) -> None:
    _, relay, engine = one_engine
    relay.set("e0", Faults(duplicate=1.0))
    assert connects(engine.host, PUB_PORT, 5.0)  # TCP copes with duplicate segments
    assert relay.stats()["e0"]["duplicated"] > 0
    relay.set("e0", Faults(loss=1.0))
    assert not connects(engine.host, PUB_PORT, 1.0)


def test_relay_refuses_a_bad_command_and_keeps_serving(
    one_engine: tuple[Topology, Relay, Engine],
) -> None:
    _, relay, engine = one_engine
    with pytest.raises(RuntimeError, match="unknown link"):
        relay.set("e9", Faults(loss=0.5))
    with pytest.raises(RuntimeError, match="probability"):
        relay.request({"link": "e0", "faults": {"loss": 2}})
    assert connects(engine.host, PUB_PORT, 5.0)


def test_relay_stops_by_itself_at_its_deadline(namespaces: None) -> None:
    topo = Topology(1).create()
    try:
        ln = topo.links[0]
        relay = Relay(
            topo.relay_ns, {"e0": (ln.relay_sut_dev, ln.relay_engine_dev)}, 1, max_seconds=1.0
        )
        try:
            assert relay.proc.wait(10) == 0  # nobody closed its stdin
        finally:
            relay.close()
    finally:
        topo.close()


def test_namespaces_of_a_dead_run_are_removed(namespaces: None) -> None:
    dead = 2**22 + 1  # above the default pid_max: no such process
    assert not os.path.exists(f"/proc/{dead}")
    name = f"{PREFIX}-{dead}-abcdef-e0"
    ip("netns", "add", name)
    try:
        mine = Topology(1).create()  # a live run's namespaces stay
        try:
            assert name in remove_stale()
            assert name not in os.listdir(NETNS_DIR)
            assert all(ns in os.listdir(NETNS_DIR) for ns in mine.namespaces)
        finally:
            mine.close()
    finally:
        ip("netns", "del", name, check=False)
