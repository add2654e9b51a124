"""Event lag: ``batch_ts`` reads a batch's ts straight from its msgpack bytes
(the ``kvsync_event_lag_seconds`` histogram), and the ``EventManager.on_live``
hook hands every live batch to it."""

from __future__ import annotations

import struct

import msgpack
import pytest

import kvsync
from kvsync.cli import sample_paths
from kvsync.service.metrics import Metrics, batch_ts


def test_ts_of_the_shipped_samples_equals_the_decoders() -> None:
    for path in sample_paths():
        payload = path.read_bytes()
        assert batch_ts(payload) == kvsync.decode(payload).ts


@pytest.mark.parametrize(
    "ts", [0.0, 1.5, 1_733_000_000.123, 7, 2**31, 2**40], ids=lambda t: type(t).__name__ + str(t)
)
def test_ts_in_every_msgpack_number_form(ts: float) -> None:
    payload = msgpack.packb([ts, [], None])
    assert batch_ts(payload) == float(ts) == kvsync.decode(payload).ts


def test_float32_and_long_arrays() -> None:
    assert batch_ts(b"\x93\xca" + struct.pack(">f", 2.5) + b"\x90\xc0") == 2.5
    big = msgpack.packb([3.25, [], None] + [0] * 20)  # array16 header
    assert big[0] == 0xDC and batch_ts(big) == 3.25


@pytest.mark.parametrize(
    "payload", [b"", b"\x93", b"\x93\xcb\x00", b"\xa3abc", msgpack.packb(["x", [], None])]
)
def test_unreadable_ts_is_none(payload: bytes) -> None:
    assert batch_ts(payload) is None


def test_observe_live_counts_one_sample_per_readable_batch() -> None:
    m = Metrics()
    good = msgpack.packb([1.0, [], None])
    m.observe_live("w", [(b"\x00" * 8, good), (b"\x00" * 8, b"junk"), (b"\x00" * 8, good)])
    count = m.registry.get_sample_value("kvsync_event_lag_seconds_count")
    assert count == 2.0
    # ts 1.0 is decades ago: both land above the last finite bucket
    assert m.registry.get_sample_value("kvsync_event_lag_seconds_bucket", {"le": "60.0"}) == 0.0


def test_rates_never_go_negative() -> None:
    m = Metrics()
    assert m.rates() == {"batches_per_second": 0.0, "events_per_second": 0.0}
    m._samples.extend([(0.0, 100, 1000), (2.0, 50, 500)])  # a worker was removed
    assert m.rates() == {"batches_per_second": 0.0, "events_per_second": 0.0}
    m._samples.append((4.0, 90, 900))
    assert m.rates() == {"batches_per_second": 0.0, "events_per_second": 0.0}
    m._samples.clear()
    m._samples.extend([(0.0, 0, 0), (2.0, 20, 60)])
    assert m.rates() == {"batches_per_second": 10.0, "events_per_second": 30.0}
