"""The fault-injecting relay: a userspace Ethernet bridge between the two
halves of each data link (``chaos.netns``), run as its own process inside
the relay namespace (``python -m chaos.relay``; ``Relay`` starts and drives
it).

Per link it holds an ``AF_PACKET`` socket on each of its two veth ends and
forwards every frame that arrives on one to the other, after asking
``chaos.faults.fate`` what to do with it (drop, delay with jitter, which
reorders, or duplicate). Everything, ARP included, crosses it: a partition
is a real one, in which TCP retransmits into the void and ZeroMQ's
heartbeats time out.

Control: one JSON object per line on stdin, one JSON reply per line on
stdout: ``{"link": "e0" | "*", "faults": {...}}`` sets a link's faults,
``{"op": "stats"}`` answers the frame counters. The process stops by itself
when stdin closes, when its parent is gone, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from chaos.faults import Faults, fate

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_MAX_QUEUED = 50_000  # frames held for delay; past it new frames are dropped


@dataclass
class _Port:
    link: str
    sock: socket.socket
    peer: socket.socket | None = None


@dataclass
class _LinkState:
    faults: Faults = field(default_factory=Faults)
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0


def _packet_socket(dev: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((dev, 0))
    s.setblocking(False)
    return s


def serve(
    links: dict[str, tuple[str, str]],
    seed: int,
    max_seconds: float,
    parent_pid: int | None,
    control: IO[str],
    out: IO[str],
) -> None:
    rng = random.Random(seed)
    state = {name: _LinkState() for name in links}
    ports: dict[int, _Port] = {}
    for name, (a, b) in links.items():
        pa, pb = _Port(name, _packet_socket(a)), _Port(name, _packet_socket(b))
        pa.peer, pb.peer = pb.sock, pa.sock
        ports[pa.sock.fileno()] = pa
        ports[pb.sock.fileno()] = pb
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    counter = itertools.count()
    deadline = time.monotonic() + max_seconds
    control_fd = control.fileno()
    print(json.dumps({"ok": True, "ready": sorted(links)}), file=out, flush=True)
    while time.monotonic() < deadline:
        if parent_pid is not None and os.getppid() != parent_pid:
            return
        now = time.monotonic()
        wait = 0.2 if not queue else max(0.0, min(0.2, queue[0][0] - now))
        readable, _, _ = select.select([control_fd, *ports], [], [], wait)
        for fd in readable:
            if fd == control_fd:
                line = control.readline()
                if not line:
                    return  # the controller is gone
                print(json.dumps(_command(line, state)), file=out, flush=True)
                continue
            port = ports[fd]
            for _ in range(256):  # bounded: the other sockets get their turn
                try:
                    data, addr = port.sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] == _PACKET_OUTGOING:
                    continue  # our own transmission, seen by our own socket
                st = state[port.link]
                delays = fate(st.faults, rng, data)
                if not delays or len(queue) >= _MAX_QUEUED:
                    st.dropped += 1
                    continue
                st.forwarded += 1
                st.duplicated += len(delays) - 1
                assert port.peer is not None
                t = time.monotonic()
                for d in delays:
                    if d <= 0:
                        _send(port.peer, data)
                    else:
                        heapq.heappush(queue, (t + d, next(counter), port.peer, data))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, sock, data = heapq.heappop(queue)
            _send(sock, data)


def _send(sock: socket.socket, data: bytes) -> None:
    # a full device queue is one more lost frame, as on a real link
    with contextlib.suppress(OSError):
        sock.send(data)


def _command(line: str, state: dict[str, _LinkState]) -> dict[str, Any]:
    try:
        cmd = json.loads(line)
        if not isinstance(cmd, dict):
            raise ValueError("a command must be a JSON object")
        if cmd.get("op") == "stats":
            return {
                "ok": True,
                "links": {
                    name: {
                        "forwarded": st.forwarded,
                        "dropped": st.dropped,
                        "duplicated": st.duplicated,
                        "faults": st.faults.to_json(),
                    }
                    for name, st in state.items()
                },
            }
        link = cmd.get("link")
        faults = Faults.from_json(cmd.get("faults", {}))
        names = list(state) if link == "*" else [link]
        for name in names:
            if name not in state:
                raise ValueError(f"unknown link {name!r} (links: {', '.join(state)})")
            state[name].faults = faults
        return {"ok": True}
    except (ValueError, TypeError) as e:
        return {"ok": False, "error": str(e)}


class Relay:
    """The relay process in namespace ``netns`` for ``links`` (name ->
    (device, device)), driven over its stdin/stdout. Every request has a
    deadline; ``close`` ends the process (it also ends by itself)."""

    def __init__(
        self,
        netns: str,
        links: dict[str, tuple[str, str]],
        seed: int,
        max_seconds: float = 600.0,
        timeout: float = 10.0,
    ) -> None:
        self.timeout = timeout
        args = [f"{name}:{a}:{b}" for name, (a, b) in links.items()]
        cmd = [sys.executable, "-m", "chaos.relay", "--seed", str(seed)]
        cmd += ["--max-seconds", str(max_seconds), "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *cmd, *(x for a in args for x in ("--link", a))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        try:
            self._reply(timeout=60.0)  # start-up: slow on a loaded machine
        except BaseException:
            self.close()
            raise

    def _reply(self, timeout: float | None = None) -> dict[str, Any]:
        assert self.proc.stdout is not None
        wait = self.timeout if timeout is None else timeout
        ready, _, _ = select.select([self.proc.stdout], [], [], wait)
        if not ready:
            raise TimeoutError(f"relay did not answer within {wait} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"relay exited (status {self.proc.wait(5)})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"relay: {reply.get('error')}")
        return reply

    def request(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def set(self, link: str, faults: Faults) -> None:
        """Apply ``faults`` to ``link`` ("*": every link) from now on."""
        self.request({"link": link, "faults": faults.to_json()})

    def heal(self) -> None:
        self.set("*", Faults())

    def stats(self) -> dict[str, Any]:
        links: dict[str, Any] = self.request({"op": "stats"})["links"]
        return links

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.relay", description=__doc__)
    p.add_argument("--link", action="append", default=[], help="NAME:DEV_A:DEV_B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    links: dict[str, tuple[str, str]] = {}
    for spec in args.link:
        parts = spec.split(":")
        if len(parts) != 3:
            p.error(f"--link must be NAME:DEV_A:DEV_B, got {spec!r}")
        links[parts[0]] = (parts[1], parts[2])
    serve(links, args.seed, args.max_seconds, args.parent_pid, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
