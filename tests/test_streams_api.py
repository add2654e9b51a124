"""The stream API the transport drives (``kvsync._core.Streams``), without
sockets: the states a user sees in ``status()``, and the index refusing to
change a worker behind its stream's back."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

import kvsync
from kvsync._core import Streams

BS = 2


def store(seq: int, h: int, parent: int | None) -> bytes:
    """A batch storing block ``h`` (tokens [h, h]) under ``parent``."""
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": [h],
        "parent_block_hash": parent,
        "token_ids": [h, h],
        "block_size": BS,
    }
    payload: bytes = msgpack.packb([float(seq), [ev], None])
    return payload


def chain(seq: int) -> bytes:
    return store(seq, seq + 1, seq if seq > 0 else None)


def be(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def depth(index: kvsync.Index, worker: str = "w") -> int:
    tokens = [t for h in range(1, 30) for t in (h, h)]
    return index.match("m", tokens).get(worker, 0)


@pytest.fixture
def followed() -> tuple[kvsync.Index, Streams]:
    """Worker "w" followed and live with batches 0..2 applied."""
    index = kvsync.Index()
    streams = Streams(index)
    streams.add("w", "m", dead_after=5.0, idle_probe=0.0)
    assert streams.start("w", 0.0) == 0
    for seq in range(3):
        streams.replayed("w", be(seq), chain(seq), 0.1)
    assert streams.replay_end("w", 0.1) is None
    assert streams.status(0.1)["w"].state == "live"
    return index, streams


def test_the_index_refuses_to_change_a_followed_worker(
    followed: tuple[kvsync.Index, Streams],
) -> None:
    index, streams = followed
    for call in (
        lambda: index.remove_worker("w"),
        lambda: index.purge_worker("w"),
        lambda: index.apply("w", chain(3), seq=3),
    ):
        with pytest.raises(kvsync.WorkerBusyError, match="followed"):
            call()
    assert depth(index) == 3
    # the stream keeps working, and removing it through the stream works
    assert streams.live("w", be(3), chain(3), 0.2) is None
    assert depth(index) == 4
    assert streams.remove("w") is True
    assert index.workers() == {} and streams.status(0.3) == {}
    with pytest.raises(KeyError):
        streams.live("w", be(4), chain(4), 0.3)


def test_a_worker_id_is_followed_once(followed: tuple[kvsync.Index, Streams]) -> None:
    _, streams = followed
    with pytest.raises(kvsync.AlreadyFollowedError, match="already followed"):
        streams.add("w", "m")


def test_a_disconnected_worker_is_reported_then_purged_after_dead_after(
    followed: tuple[kvsync.Index, Streams],
) -> None:
    index, streams = followed
    streams.disconnected("w", 1.0)
    st = streams.status(2.0)["w"]
    assert (st.state, st.disconnects, st.seconds_disconnected) == ("disconnected", 1, 1.0)
    assert streams.tick(5.9) == [] and depth(index) == 3
    assert streams.tick(6.0) == []
    assert depth(index) == 0 and index.stats()["holdings"] == 0
    st = streams.status(6.0)["w"]
    assert (st.state, st.purges, st.last_seq) == ("disconnected", 1, None)
    # back: the history is fetched again from the start
    assert streams.reconnected("w", 7.0) == 0
    for seq in range(4):
        streams.replayed("w", be(seq), chain(seq), 7.1)
    streams.replay_end("w", 7.1)
    assert streams.status(7.1)["w"].state == "live" and depth(index) == 4


def test_live_gaps_report_dropped_seqs_and_the_repr_is_python(
    followed: tuple[kvsync.Index, Streams],
) -> None:
    _, streams = followed
    # a gap is asked for from the last applied seq (a probe of continuity)
    assert streams.live("w", be(6), chain(6), 1.0) == 2
    st = streams.status(1.0)["w"]
    assert (st.state, st.gaps, st.dropped, st.buffered) == ("replaying", 1, 3, 1)
    assert "last_seq=2," in repr(st) and "Some(" not in repr(st)


def test_bad_stream_settings_are_refused() -> None:
    streams = Streams(kvsync.Index())
    with pytest.raises(ValueError, match="replay_timeout"):
        streams.add("w", "m", replay_timeout=0.0)
    with pytest.raises(ValueError, match="dead_after"):
        streams.add("w", "m", dead_after=float("nan"))
    with pytest.raises(ValueError, match="max_buffered"):
        streams.add("w", "m", max_buffered=0)
