"""What the relay does to each frame: the fault model, kept free of I/O so
that it can be tested on its own.

A ``Faults`` value applies to one link, in both directions. For every frame
``fate`` draws, from the relay's seeded generator, the delays after which
copies of the frame go out: none (dropped), one (forwarded, perhaps late)
or two (duplicated). Delays with jitter reorder frames: a frame drawn a
shorter delay overtakes the one before it.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Faults:
    """``partition``: drop every frame. ``loss``, ``duplicate``: probability
    per frame. ``delay`` ± ``jitter`` seconds (uniform) before a frame goes
    out."""

    partition: bool = False
    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    duplicate: float = 0.0
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Faults.{name} must be a probability in [0, 1], got {p!r}")
        if self.delay < 0 or self.jitter < 0 or self.jitter > self.delay:
            raise ValueError(
                f"Faults needs 0 <= jitter <= delay, got delay={self.delay!r} "
                f"jitter={self.jitter!r}"
            )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        if "ports" in data:
            data = {**data, "ports": tuple(data["ports"])}
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ports"] = list(self.ports)
        return d

    @property
    def healthy(self) -> bool:
        return self == Faults()

    def describe(self) -> str:
        if self.healthy:
            return "none"
        parts = []
        if self.partition:
            parts.append("partition")
        if self.loss:
            parts.append(f"{self.loss:.0%} loss")
        if self.delay:
            parts.append(f"{self.delay * 1000:.0f} ms ± {self.jitter * 1000:.0f} ms delay")
        if self.duplicate:
            parts.append(f"{self.duplicate:.0%} duplication")
        if self.ports:
            parts.append(f"on port(s) {', '.join(map(str, self.ports))} only")
        return ", ".join(parts)


def tcp_ports(frame: bytes) -> tuple[int, int] | None:
    """(source, destination) port of an Ethernet/IPv4/TCP frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    off = 14 + (frame[14] & 0x0F) * 4
    if len(frame) < off + 4:
        return None
    return int.from_bytes(frame[off : off + 2], "big"), int.from_bytes(
        frame[off + 2 : off + 4], "big"
    )


def fate(faults: Faults, rng: random.Random, frame: bytes = b"") -> list[float]:
    """Delays (s) after which copies of ``frame`` are sent; ``[]`` drops it."""
    if faults.ports:
        ports = tcp_ports(frame)
        if ports is None or not (set(ports) & set(faults.ports)):
            return [0.0]
    if faults.partition or (faults.loss and rng.random() < faults.loss):
        return []
    copies = 2 if faults.duplicate and rng.random() < faults.duplicate else 1
    out = []
    for _ in range(copies):
        d = faults.delay
        if faults.jitter:
            d += rng.uniform(-faults.jitter, faults.jitter)
        out.append(d)
    return out
