"""Argument types for the ``kvsync`` command line.

Each is an argparse ``type=`` function: it returns the parsed value or
raises ``argparse.ArgumentTypeError``, which argparse turns into a usage
error (exit status 2) that names the option and the bad value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_PORT = 65_535


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer ``low <= n`` (and ``n <= high`` when given)."""

    def parse(text: str) -> int:
        n = _int(text)
        if n < low or (high is not None and n > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {n}")
        return n

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def non_negative_float(text: str) -> float:
    """A finite float ``>= 0``."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return x


def port(text: str) -> int:
    """A TCP port 1..65535, or 0 for a free random one."""
    n = _int(text)
    if not 0 <= n <= MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"must be a TCP port between 1 and {MAX_PORT} (or 0 for a random one), got {n}"
        )
    return n


def non_empty(text: str) -> str:
    """A string that is not empty or only blanks."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text
