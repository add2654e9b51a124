"""Summary of ``make coverage``: line coverage of the Python package
(coverage.py's JSON report) and of the Rust core (cargo-tarpaulin's JSON
report), as a Markdown table on stdout.

``python tools/coverage_summary.py coverage [--fail-under 90]``: reads
``coverage/python.json`` and ``coverage/rust/tarpaulin-report.json``; with
``--fail-under`` the exit status is 1 when either is below the floor (or
missing), naming which.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def python_lines(path: Path) -> tuple[int, int]:
    """(covered, total) statements from coverage.py's JSON report."""
    data: dict[str, Any] = json.loads(path.read_text())
    totals = data["totals"]
    return int(totals["covered_lines"]), int(totals["num_statements"])


def _parts(f: dict[str, Any]) -> list[str]:
    p = f.get("path", [])
    return [str(x) for x in p] if isinstance(p, list) else str(p).split("/")


def rust_lines(path: Path) -> tuple[int, int]:
    """(covered, coverable) lines of the core library (rust/core/src)
    summed over tarpaulin's files; the tests, benches, the bindings and the
    peer bench it may also list are not the core."""
    data: dict[str, Any] = json.loads(path.read_text())
    files = [f for f in data.get("files", []) if "/rust/core/src/" in "/".join(_parts(f))]
    covered = sum(int(f.get("covered", 0)) for f in files)
    coverable = sum(int(f.get("coverable", 0)) for f in files)
    return covered, coverable


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path, help="the coverage/ directory of make coverage")
    p.add_argument("--fail-under", type=float, default=None, help="percent of lines")
    args = p.parse_args(argv)
    sources = {
        "Python (python/kvsync, coverage.py)": (args.dir / "python.json", python_lines),
        "Rust core (rust/core, cargo-tarpaulin)": (
            args.dir / "rust" / "tarpaulin-report.json",
            rust_lines,
        ),
    }
    print("| code | lines covered | percent |")
    print("|---|---|---|")
    failed: list[str] = []
    for name, (path, read) in sources.items():
        try:
            covered, total = read(path)
        except (OSError, KeyError, ValueError) as e:
            print(f"| {name} | report missing or unreadable: {path} ({e}) | - |")
            failed.append(f"{name}: no report")
            continue
        pct = 100.0 * covered / total if total else 0.0
        print(f"| {name} | {covered} / {total} | {pct:.1f}% |")
        if args.fail_under is not None and pct < args.fail_under:
            failed.append(f"{name}: {pct:.1f}% < {args.fail_under:.0f}%")
    if args.fail_under is not None and failed:
        print(f"coverage below the floor: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
