"""``kvsync sim`` with a bounded send high-water mark on its PUB sockets
(``python -m chaos.simwrap --sndhwm N SIM_ARGS...``).

The simulator's PUB queues without bound (``SNDHWM`` 0), so a burst is
never dropped on the engine's side; real engines use ZeroMQ's default
bound, past which a PUB silently drops messages for a slow subscriber.
This wrapper sets that bound (and a 16 KiB kernel send buffer) on every
PUB the simulator binds (also after a restart), so a burst past it into a
stalled connection loses live messages for real.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import zmq

from kvsync import sim


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--sndhwm" or not args[1].isdigit():
        print("usage: python -m chaos.simwrap --sndhwm N [kvsync sim options]", file=sys.stderr)
        return 2
    hwm = int(args[1])

    def bind_with_hwm(self: sim.Rank) -> None:
        # Rank.bind's sockets, with the bounds set before bind: a listener
        # copies the socket's options when it binds, so setting them after
        # would not reach the connections it accepts.
        host, ctx = self.sim.args.host, self.sim.ctx
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, hwm)
        # a small kernel send buffer, so that a stalled subscriber backs the
        # queue up after a few batches rather than a few megabytes
        self.pub.setsockopt(zmq.SNDBUF, 16 << 10)
        self.pub.bind(f"tcp://{host}:{self.sim.pub_port + self.rank}")
        if self.sim.replay_port is not None:
            self.router = ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(f"tcp://{host}:{self.sim.replay_port + self.rank}")

    sim.Rank.bind = bind_with_hwm  # type: ignore[method-assign]
    return sim.main(args[2:])


if __name__ == "__main__":
    sys.exit(main())
