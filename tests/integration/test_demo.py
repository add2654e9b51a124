"""`kvsync demo` end to end (short run): prefix routing beats random and
the index ends equal to the engines' caches."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_demo_routes_better_than_random_and_stays_exact() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvsync.cli",
            "demo",
            "--engines",
            "3",
            "--requests",
            "600",
            "--rate",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "index equals the engines' caches: yes" in out
    rates = {
        name: float(rate)
        for name, rate in re.findall(r"^\s+(kvsync|random|oracle)\s+([\d.]+)%", out, re.M)
    }
    assert set(rates) == {"kvsync", "random", "oracle"}
    assert rates["kvsync"] > rates["random"]
    # kvsync's index is exact, so it routes like the oracle (up to event lag)
    assert rates["kvsync"] >= rates["oracle"] - 2.0
