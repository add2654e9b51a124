"""``Readiness``: a socket closed without being discarded first (a bug in a
caller, or a race with a command) is skipped, not a crash of the poller."""

from __future__ import annotations

from typing import Any

import zmq

from kvsync._readiness import Readiness


def test_a_socket_closed_without_discard_is_skipped() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    ready = Readiness()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    gone = ctx.socket(zmq.PULL)
    try:
        for s in (pull, push, gone):
            s.setsockopt(zmq.LINGER, 0)
        pull.bind("inproc://readiness-test")
        push.connect("inproc://readiness-test")
        ready.add(pull)
        ready.add(gone)
        gone.close(linger=0)
        push.send(b"x")
        # The closed socket is due a check (just added) but cannot be asked.
        assert ready.wait(5) == [pull]
        ready.recheck(pull)
        assert ready.wait(0) == [pull]  # not received yet: still readable
    finally:
        ready.close()
        for s in (pull, push):
            s.close(linger=0)
        ctx.term()
