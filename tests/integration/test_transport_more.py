"""Integration: how the EventManager reports its own trouble. A handler that
fails for one worker is logged and the others go on; an I/O thread that
dies is logged and commands still return; a stuck I/O thread makes ``stop``
and commands fail at their deadline instead of hanging."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

import kvsync
from kvsync._core import Streams
from kvsync.sim import SimProcess

from .conftest import caught_up, pod_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Sims = Callable[..., SimProcess]


class Faulty:
    """Wraps Streams: ``live_many`` for ``wid`` raises ``exc``; ``tick``
    raises ``tick_exc`` or blocks on ``hold`` once set."""

    def __init__(self, inner: Streams) -> None:
        self.inner = inner
        self.wid = ""
        self.exc: BaseException | None = None
        self.tick_exc: BaseException | None = None
        self.hold: threading.Event | None = None
        self.held = threading.Event()  # the I/O thread is blocked in tick

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def live_many(self, wid: str, batch: Any, now: float) -> int | None:
        if wid == self.wid and self.exc is not None:
            raise self.exc
        return self.inner.live_many(wid, batch, now)

    def tick(self, now: float) -> Any:
        if self.tick_exc is not None:
            raise self.tick_exc
        if self.hold is not None:
            self.held.set()
            self.hold.wait(30)
        return self.inner.tick(now)


def faulty(m: kvsync.EventManager) -> Faulty:
    f = Faulty(m._streams)
    m._streams = f  # type: ignore[assignment]
    return f


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("boom")], ids=["Value", "Key"])
def test_a_failing_handler_is_logged_and_other_workers_go_on(
    exc: BaseException, sims: Sims, index: kvsync.Index, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = sims("--seed", "1"), sims("--seed", "2")
    caplog.set_level(logging.ERROR, logger="kvsync.transport")
    with kvsync.EventManager(index, replay_timeout=1.0, idle_probe=0.5) as m:
        m.add_pod(pod_of("a", a))
        m.add_pod(pod_of("b", b))
        a.request("step", n=2)
        b.request("step", n=2)
        wait_for(lambda: caught_up(m, "a", a) and caught_up(m, "b", b), what="both caught up")
        f = faulty(m)
        f.wid, f.exc = "a", exc
        a.request("step", n=3)
        b.request("step", n=3)
        logged = "a: error while handling sub socket"
        wait_for(
            lambda: any(logged in r.getMessage() for r in caplog.records), what="failure logged"
        )
        wait_for(lambda: caught_up(m, "b", b), what="b still followed")
        # (KeyError: "a" is still in the index, so it is not taken for a lost worker)
        assert not any("no longer has this worker" in r.getMessage() for r in caplog.records)
        # Once the fault is gone, the idle probe finds the batches it missed.
        f.exc = None
        wait_for(lambda: caught_up(m, "a", a), what="a caught up again")


def test_a_dead_io_thread_is_logged_and_commands_still_return(
    sims: Sims, index: kvsync.Index, caplog: pytest.LogCaptureFixture
) -> None:
    a = sims()
    caplog.set_level(logging.ERROR, logger="kvsync.transport")
    m = kvsync.EventManager(index).start()
    try:
        faulty(m).tick_exc = RuntimeError("tick failed")
        wait_for(
            lambda: any("I/O thread failed" in r.getMessage() for r in caplog.records),
            what="the failure logged",
        )
        # The thread is gone: commands run in the caller instead of waiting 30 s.
        m.add_pod(pod_of("a", a))
        assert "a" in m.pods()
        m.remove_pod("a")
        assert m.pods() == {}
    finally:
        m.stop()


def test_a_stuck_io_thread_fails_stop_and_commands_at_their_deadline(
    index: kvsync.Index,
) -> None:
    m = kvsync.EventManager(index, poll_ms=10).start()
    hold = threading.Event()
    f = faulty(m)
    f.hold = hold  # the next tick blocks until the test lets it go
    try:
        assert f.held.wait(10), "the I/O thread never reached its tick"
        with pytest.raises(TimeoutError, match=r"I/O thread did not answer within 0\.3 s"):
            m._commands.call(lambda: None, timeout=0.3)
        with pytest.raises(RuntimeError, match=r"I/O thread did not stop within 0\.3 s"):
            m.stop(timeout=0.3)
    finally:
        hold.set()
        m.stop()
    assert m._thread is None


def test_a_commands_own_timeout_error_is_not_taken_for_a_stuck_thread(
    index: kvsync.Index,
) -> None:
    def times_out() -> None:
        raise TimeoutError("the command's own")

    with kvsync.EventManager(index) as m, pytest.raises(TimeoutError, match="the command's own"):
        m._commands.call(times_out, timeout=10)


def test_max_message_bytes_below_1_is_refused(index: kvsync.Index) -> None:
    with pytest.raises(ValueError, match="max_message_bytes must be >= 1, got 0"):
        kvsync.EventManager(index, max_message_bytes=0)
