"""File-descriptor and socket budgets of the transport.

libzmq gives every socket a mailbox (one eventfd on Linux) and every TCP
connection its own descriptor, and a context refuses sockets beyond its
``MAX_SOCKETS`` (1023 by default). A fleet of thousands of pods therefore
needs both a context sized for it and a process descriptor limit
(``RLIMIT_NOFILE``) that can hold it; this module says how much is needed
and fails early, with the numbers, when it does not fit.
"""

from __future__ import annotations

import resource
from typing import Any

import zmq

# Per worker: the SUB socket's mailbox and TCP connection, the monitor's two
# PAIR sockets (libzmq's end and ours), and during a replay the DEALER's
# mailbox and TCP connection (measured with bench/podscale.py).
FDS_PER_WORKER = 6
SOCKETS_PER_WORKER = 4  # SUB, two monitor PAIRs, replay DEALER
# The context's I/O and reaper threads, the wake sockets, and room for the
# rest of the process (log files, the HTTP server, Python's own files).
FD_RESERVE = 64
SOCKET_RESERVE = 8


class DescriptorLimitError(OSError):
    """The fleet needs more file descriptors or zmq sockets than allowed."""


def nofile_limit() -> int:
    """The process's soft ``RLIMIT_NOFILE`` (a very large number if unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def fds_needed(workers: int) -> int:
    return FD_RESERVE + FDS_PER_WORKER * workers


def sockets_needed(workers: int) -> int:
    return SOCKET_RESERVE + SOCKETS_PER_WORKER * workers


def new_context() -> zmq.Context[Any]:
    """A context whose socket limit follows the descriptor limit rather than
    libzmq's default of 1023 (which stops a fleet at ~250 pods)."""
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, max(1023, min(nofile_limit(), ctx.get(zmq.SOCKET_LIMIT))))
    return ctx


def check(workers: int, what: str, ctx: zmq.Context[Any] | None) -> None:
    """Raise ``DescriptorLimitError`` if following ``workers`` workers does
    not fit the descriptor limit or the context's socket limit. ``what``
    names the operation in the message."""
    limit = nofile_limit()
    need = fds_needed(workers)
    if need > limit:
        raise DescriptorLimitError(
            f"{what}: following {workers} workers needs about {need} file descriptors "
            f"({FDS_PER_WORKER} per worker + {FD_RESERVE}), but RLIMIT_NOFILE is {limit}; "
            f"raise it (ulimit -n, systemd LimitNOFILE, or the container's nofile ulimit) "
            f"or follow fewer pods"
        )
    if ctx is None:
        return
    max_sockets = ctx.get(zmq.MAX_SOCKETS)
    need = sockets_needed(workers)
    if need > max_sockets:
        raise DescriptorLimitError(
            f"{what}: following {workers} workers needs about {need} zmq sockets "
            f"({SOCKETS_PER_WORKER} per worker + {SOCKET_RESERVE}), but the context allows "
            f"{max_sockets} (zmq.MAX_SOCKETS); pass a context with a larger MAX_SOCKETS, "
            f"or none to let EventManager size its own from RLIMIT_NOFILE"
        )
