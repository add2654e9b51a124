"""``Pod``: the address of one engine pod and the workers it publishes for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pod:
    """An engine pod. Rank ``r`` of ``dp_size`` listens on ``pub_port + r``
    (and ``replay_port + r``); ``replay_port=None`` means no replay endpoint.
    ``topic`` is the ZMQ topic filter its SUB sockets subscribe with
    (``None``: the ``EventManager``'s topic)."""

    name: str
    model: str
    host: str
    pub_port: int = 5557
    replay_port: int | None = 5558
    dp_size: int = 1
    topic: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Pod.name must not be empty")
        if not self.model:
            raise ValueError("Pod.model must not be empty")
        if self.dp_size < 1:
            raise ValueError(f"Pod.dp_size must be >= 1, got {self.dp_size}")
        for port in (self.pub_port, self.replay_port):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
        if self.topic is not None and not isinstance(self.topic, str):
            raise TypeError(f"Pod.topic must be a str or None, got {self.topic!r}")

    def subscription(self, default: bytes) -> bytes:
        """The topic filter of this pod's SUB sockets (``default`` when unset)."""
        return default if self.topic is None else self.topic.encode()

    def workers(self) -> list[tuple[str, int]]:
        """``(worker_id, rank)``: the pod name when dp_size == 1, else
        ``f"{name}/dp{rank}"``."""
        if self.dp_size == 1:
            return [(self.name, 0)]
        return [(f"{self.name}/dp{r}", r) for r in range(self.dp_size)]

    def endpoint(self, port: int, rank: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port + rank}"
