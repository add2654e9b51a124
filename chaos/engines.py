"""Simulated engines (``kvsync sim``) each in its own network namespace.

An ``Engine`` is a simulator process started with ``ip netns exec`` in its
namespace, bound on all of the namespace's addresses: kvsync follows it
over its data address (through the relay), the test drives it over its
management address (never faulted) with the simulator's JSON control
protocol, and asks it for its ground truth there. Process faults are
signals to its pid (``ip netns exec`` execs, so the pid is the
simulator's own).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import zmq

from chaos.netns import Link

REPO = Path(__file__).resolve().parent.parent
PUB_PORT = 5557
START_TIMEOUT = 60.0
REPLAY_PORT = 5558


class Engine:
    """One simulator in ``link.netns``; ``args`` are extra ``kvsync sim``
    options. ``start``/``kill``/``restart`` manage the process; ``request``
    sends a control command with a deadline."""

    def __init__(
        self, name: str, link: Link, *args: str, sndhwm: int | None = None, timeout: float = 10.0
    ) -> None:
        self.name = name
        self.sndhwm = sndhwm
        self.link = link
        self.args = args
        self.timeout = timeout
        self.replay = "--no-replay" not in args
        self.proc: subprocess.Popen[str] | None = None
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock: zmq.Socket[bytes] | None = None
        self.control_port = 0

    @property
    def host(self) -> str:
        return self.link.data_ip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, seed: int = 0) -> Engine:
        """Start the simulator (again, after ``kill``: a restarted engine,
        seq from 0, with ``seed``'s workload and engine hashes)."""
        module = (
            ["kvsync.sim"]
            if self.sndhwm is None
            else ["chaos.simwrap", "--sndhwm", str(self.sndhwm)]
        )
        cmd = [sys.executable, "-m", *module, "--host", "0.0.0.0", "--port", str(PUB_PORT)]
        if self.replay:
            cmd += ["--replay-port", str(REPLAY_PORT)]
        cmd += ["--parent-pid", str(os.getpid()), "--seed", str(seed), *self.args]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.link.netns, *cmd],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=REPO,
        )
        try:
            assert self.proc.stdout is not None
            # Starting a Python process is slow on a loaded machine: a
            # generous bound of its own, not the per-request one.
            ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
            if not ready:
                raise TimeoutError(f"engine {self.name} did not start within {START_TIMEOUT} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"engine {self.name} exited with {self.proc.wait(5)}")
            self.control_port = json.loads(line)["control_port"]
        except BaseException:
            self.kill()
            raise
        self._connect()
        return self

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        s: zmq.Socket[bytes] = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, int(self.timeout * 1000))
        s.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
        s.setsockopt(zmq.REQ_RELAXED, 1)
        s.setsockopt(zmq.REQ_CORRELATE, 1)
        s.connect(f"tcp://{self.link.mgmt_ip}:{self.control_port}")
        self.sock = s

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        if self.sock is None:
            raise RuntimeError(f"engine {self.name} is not running")
        try:
            self.sock.send(json.dumps({"op": op, **kw}).encode())
            reply: dict[str, Any] = json.loads(self.sock.recv())
        except zmq.Again:
            raise TimeoutError(
                f"engine {self.name} did not answer {op!r} within {self.timeout} s"
            ) from None
        if not reply.get("ok"):
            raise RuntimeError(f"engine {self.name}: {op}: {reply.get('error')}")
        return reply

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the engine vanishes without closing its sockets."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # a stopped process must be continued for its parent to reap it promptly
            os.kill(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def close(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.kill()
        self.ctx.term()
