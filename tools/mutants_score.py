"""Mutation score of a ``cargo mutants`` run, per module and overall.

    python tools/mutants_score.py mutants.out [--fail-under 85]
        [--equivalent docs/mutants-equivalent.txt]

Reads the run's lists (``caught.txt``, ``timeout.txt``, ``missed.txt``,
``unviable.txt``, and ``previously_caught.txt`` of an ``--iterate`` run).
Score = (caught + timeouts) / (caught + timeouts + missed): a mutant that
makes the tests hang is caught by the time-out. Survivors named in the
equivalent list (one ``path:line:col: description`` per line, ``#``
comments) are reported apart: the list says why each cannot be told from
the original, and the score is given with and without them. Exits 1 when
the score without them is under ``--fail-under``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

KINDS = ("caught", "previously_caught", "timeout", "missed", "unviable")


def module(name: str) -> str:
    """``rust/core/src/index/query.rs:12:5: ...`` -> ``index``."""
    path = name.split(":", 1)[0]
    parts = path.split("/")
    top = parts[parts.index("src") + 1] if "src" in parts else parts[0]
    return top.removesuffix(".rs")


def read(out: Path) -> dict[str, list[str]]:
    if not (out / "missed.txt").exists():
        raise SystemExit(f"{out}: no missed.txt (not a cargo-mutants output directory?)")
    lists: dict[str, list[str]] = {}
    for kind in KINDS:
        f = out / f"{kind}.txt"
        lists[kind] = (
            [ln.strip() for ln in f.read_text().splitlines() if ln.strip()] if f.exists() else []
        )
    return lists


def equivalents(path: Path | None) -> set[str]:
    if path is None:
        return set()
    return {
        ln.split("#", 1)[0].strip()
        for ln in path.read_text().splitlines()
        if ln.split("#", 1)[0].strip()
    }


def score(caught: int, missed: int) -> float:
    return 100.0 * caught / (caught + missed) if caught + missed else 100.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="cargo-mutants output directory (mutants.out)")
    ap.add_argument("--fail-under", type=float, default=None, metavar="PCT")
    ap.add_argument("--equivalent", type=Path, default=None, metavar="FILE")
    args = ap.parse_args(argv)
    lists = read(args.out)
    equiv = equivalents(args.equivalent)
    caught, missed, known, unviable = Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    for kind in ("caught", "previously_caught", "timeout"):
        for name in lists[kind]:
            caught[module(name)] += 1
    for name in lists["missed"]:
        (known if name in equiv else missed)[module(name)] += 1
    for name in lists["unviable"]:
        unviable[module(name)] += 1
    mods = sorted(set(caught) | set(missed) | set(known))
    heads = ("caught", "missed", "equiv.", "unviable", "score", "excl. equiv.")
    print(
        f"{'module':<10} "
        + " ".join(f"{h:>{w}}" for h, w in zip(heads, (7, 7, 7, 9, 7, 13), strict=True))
    )
    for m in [*mods, "total"]:
        c = sum(caught.values()) if m == "total" else caught[m]
        x = sum(missed.values()) if m == "total" else missed[m]
        e = sum(known.values()) if m == "total" else known[m]
        u = sum(unviable.values()) if m == "total" else unviable[m]
        pct = f"{score(c, x + e):>6.1f}% {score(c, x):>12.1f}%"
        print(f"{m:<10} {c:>7} {x + e:>7} {e:>7} {u:>9} {pct}")
    left = [n for n in lists["missed"] if n not in equiv]
    if left:
        print(f"\n{len(left)} survivors not in the equivalent list:")
        for n in left:
            print(f"  {n}")
    total = score(sum(caught.values()), sum(missed.values()) + sum(known.values()))
    if args.fail_under is not None and total < args.fail_under:
        print(f"\nmutation score {total:.1f}% is under {args.fail_under}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
