"""The sockets of one followed worker and how they are set up: a SUB on the
engine's PUB port with a connection monitor, and a DEALER per replay
request. Liveness (ZMTP heartbeats, handshake deadline, steady reconnects)
and the receive bounds are set here, on every socket the transport makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from kvsync._pod import Pod

# Connected means the ZMTP handshake completed: a TCP connect alone also
# succeeds against a stopped (SIGSTOP) engine, whose kernel still accepts.
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


@dataclass(frozen=True)
class SocketOptions:
    topic: bytes
    heartbeat_ivl: float
    heartbeat_timeout: float
    rcvhwm: int
    max_message_bytes: int

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        ivl = round(self.heartbeat_ivl * 1000)
        timeout = round(self.heartbeat_timeout * 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
        # Ask the engine to drop us too when we go silent (100 ms units).
        sock.setsockopt(zmq.HEARTBEAT_TTL, min(timeout, 6_553_500))
        # A stopped engine's kernel still completes the TCP connect; without a
        # handshake deadline the half-open connection would wait 30 s.
        sock.setsockopt(zmq.HANDSHAKE_IVL, timeout)
        # A steady 100 ms retry (no exponential back-off): a restarted engine
        # is reconnected to, and probed, within ~0.1 s of binding again.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.LINGER, 0)


class Worker:
    """Sockets of one worker; touched only by the I/O thread."""

    def __init__(self, wid: str, pod: Pod, rank: int) -> None:
        self.wid = wid
        self.pod = pod
        self.rank = rank
        self.sub: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.dealer: zmq.Socket[bytes] | None = None
        self.connected_once = False
        self.up = False
        # The core lost the worker (e.g. Index.remove_worker behind our
        # back): its sockets are closed until the pod is added again.
        self.lost = False

    def connect(self, sock: zmq.Socket[bytes], port: int) -> None:
        endpoint = self.pod.endpoint(port, self.rank)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            raise ValueError(f"pod {self.pod.name!r}: cannot connect to {endpoint}: {e}") from e

    def open_sub(self, ctx: zmq.Context[Any], opts: SocketOptions) -> zmq.Socket[bytes]:
        """The SUB socket and its monitor (kept on the worker even if the
        connect fails, so that the caller can close them)."""
        sub: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        self.sub = sub
        opts.apply(sub)
        sub.setsockopt(zmq.RCVHWM, opts.rcvhwm)
        sub.setsockopt(zmq.SUBSCRIBE, self.pod.subscription(opts.topic))
        self.monitor = sub.get_monitor_socket(MONITOR_EVENTS)
        self.connect(sub, self.pod.pub_port)
        return sub

    def open_dealer(
        self, ctx: zmq.Context[Any], opts: SocketOptions, start: int
    ) -> zmq.Socket[bytes]:
        """A fresh DEALER that asks for the replay from ``start``."""
        assert self.pod.replay_port is not None
        dealer: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.dealer = dealer
        opts.apply(dealer)
        # No message-count limit: a ROUTER drops what does not fit the pipe,
        # and a long replay must arrive whole (the pipe's room is the sum of
        # both sides' high-water marks). It is bounded by the engine's
        # buffer (10,000 batches by default) and max_message_bytes.
        dealer.setsockopt(zmq.RCVHWM, 0)
        self.connect(dealer, self.pod.replay_port)
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        return dealer
