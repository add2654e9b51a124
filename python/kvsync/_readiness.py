"""Which of many zmq sockets have messages, at a cost that follows the busy
sockets rather than all of them.

``zmq.Poller`` hands every registered socket to ``zmq_poll`` on every call:
~6 us per socket, so 25 ms per wake-up with 2,000 pods and a stalled I/O
thread with 10,000. Here each socket's ``ZMQ_FD`` sits in an epoll set
instead. That descriptor is edge-triggered: it signals when the socket's
state changes, not while messages wait, so a socket is readable only if
``ZMQ_EVENTS`` says so, and it must be checked again after each use
(draining it may stop early; sending may swallow the signal).
"""

from __future__ import annotations

import selectors

import zmq

Sock = zmq.Socket[bytes]


class Readiness:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._fds: dict[Sock, int] = {}
        self._pending: set[Sock] = set()

    def add(self, sock: Sock) -> None:
        fd = int(sock.getsockopt(zmq.FD))
        self._sel.register(fd, selectors.EVENT_READ, sock)
        self._fds[sock] = fd
        self._pending.add(sock)  # it may hold messages already

    def discard(self, sock: Sock) -> None:
        """Forget ``sock``; call before closing it (its descriptor number
        may come back for another socket)."""
        fd = self._fds.pop(sock, None)
        self._pending.discard(sock)
        if fd is not None:
            self._sel.unregister(fd)

    def recheck(self, sock: Sock) -> None:
        """Look at ``sock`` again on the next wait (after receiving from or
        sending on it)."""
        if sock in self._fds:
            self._pending.add(sock)

    def wait(self, timeout: float) -> list[Sock]:
        """Sockets with a message to receive, waiting up to ``timeout`` s
        (not at all while some socket is due a recheck)."""
        for key, _ in self._sel.select(0 if self._pending else timeout):
            self._pending.add(key.data)
        due, self._pending = self._pending, set()
        ready = []
        for sock in due:
            if sock not in self._fds:
                continue
            try:
                events = int(sock.getsockopt(zmq.EVENTS))
            except zmq.ZMQError:
                continue
            if events & zmq.POLLIN:
                ready.append(sock)
        return ready

    def close(self) -> None:
        self._sel.close()
        self._fds.clear()
        self._pending.clear()
