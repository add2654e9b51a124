"""A simulator (``kvsync sim``) in a child process, driven over its JSON
control socket: what tests, benchmarks and ``kvsync demo`` use to run
engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import zmq


class SimProcess:
    """A simulator in a child process, driven over its control socket (for
    tests, benchmarks and the demo). Every request has a deadline.

    The child runs in its own session, so a Ctrl-C at the terminal reaches
    only the parent, which stops its simulators in order (``close``); the
    child also exits by itself when its parent is gone."""

    def __init__(self, *args: str, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvsync.sim", "--parent-pid", str(os.getpid()), *args],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            info = json.loads(self._readline(timeout))
        except BaseException:
            self._kill()
            raise
        self.pub_port: int = info["pub_port"]
        self.replay_port: int | None = info["replay_port"]
        self.control_port: int = info["control_port"]
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self._connect()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _readline(self, timeout: float) -> str:
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"simulator did not start within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulator exited with {self.proc.wait(5)}")
        return line

    def _connect(self) -> zmq.Socket[bytes]:
        s: zmq.Socket[bytes] = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, int(self.timeout * 1000))
        s.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        # After a timed-out request the next one may still be sent, and a
        # late reply to the old one is dropped rather than taken for it.
        s.setsockopt(zmq.REQ_RELAXED, 1)
        s.setsockopt(zmq.REQ_CORRELATE, 1)
        s.connect(f"tcp://127.0.0.1:{self.control_port}")
        return s

    def send_raw(self, frames: list[bytes]) -> dict[str, Any]:
        """Send any control message (also a malformed one); the reply."""
        try:
            self.sock.send_multipart(frames)
            reply: dict[str, Any] = json.loads(self.sock.recv())
        except zmq.Again:
            raise TimeoutError(f"simulator did not answer within {self.timeout} s") from None
        return reply

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        reply = self.send_raw([json.dumps({"op": op, **kw}).encode()])
        if not reply.get("ok"):
            raise RuntimeError(f"simulator: {reply.get('error')}")
        return reply

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (SIGTERM: it closes its sockets and exits), kill
        it if it has not exited within ``timeout`` s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.sock.close(linger=0)
        self.ctx.term()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
