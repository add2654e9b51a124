"""Regression check of one nightly run against the baseline.

``python -m bench.compare BASELINE RESULTS`` prints one row per metric and
exits 1 when any metric is worse than its baseline by more than its
tolerance, 0 otherwise, 2 when a file cannot be used (the message names the
file and the field).

"Worse by" is a factor, the same in both directions: ``value / baseline``
for a lower-is-better metric, ``baseline / value`` for a higher-is-better
one, so a 2x slowdown is 2.0 either way and a tolerance of 0.3 allows up to
1.3. A metric of the baseline that the run does not have (skipped, or not
measured on this branch) is reported as missing and does not fail the run:
the nightly job cannot hold a run to a measurement it could not make. A
metric the baseline marks ``"guard": false`` is shown with its factor but
never fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .results import (
    Baseline,
    BaselineMetric,
    FormatError,
    Metric,
    Results,
    load_baseline,
    load_results,
)

__all__ = ["Row", "compare", "main", "worse_factor"]


@dataclass(frozen=True)
class Row:
    name: str
    status: str  # ok, better, REGRESSION, unguarded, missing, new, direction?
    baseline: float | None
    value: float | None
    factor: float | None  # how much worse than the baseline (1.0 = same)
    tolerance: float | None
    unit: str
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "REGRESSION"


def worse_factor(value: float, base: float, better: str) -> float:
    """How many times worse ``value`` is than ``base`` (below 1: better)."""
    if better == "lower":
        num, den = value, base
    else:
        num, den = base, value
    if den == 0:
        return 1.0 if num == 0 else float("inf")
    return num / den


def _row(name: str, b: BaselineMetric, m: Metric) -> Row:
    if m.better != b.better:
        # the metric changed meaning: comparing would be a guess either way
        return Row(
            name,
            "direction?",
            b.value,
            m.value,
            None,
            b.tolerance,
            b.unit or m.unit,
            f"baseline says {b.better} is better, the run says {m.better}: not compared",
        )
    factor = worse_factor(m.value, b.value, b.better)
    if not b.guard:
        status = "unguarded"
    elif factor > 1.0 + b.tolerance:
        status = "REGRESSION"
    elif factor < 1.0 / (1.0 + b.tolerance):
        status = "better"
    else:
        status = "ok"
    note = f"{len(m.runs)} runs" if m.runs else ""
    if not b.guard:
        note += "; not guarded (too noisy here: see the baseline's comment)"
    return Row(name, status, b.value, m.value, factor, b.tolerance, b.unit or m.unit, note)


def compare(baseline: Baseline, results: Results) -> list[Row]:
    rows: list[Row] = []
    for name, b in sorted(baseline.metrics.items()):
        m = results.metrics.get(name)
        if m is None:
            reason = results.skipped.get(name, "not in the results")
            rows.append(
                Row(
                    name,
                    "missing",
                    b.value,
                    None,
                    None,
                    b.tolerance,
                    b.unit,
                    f"{reason} (not a failure)",
                )
            )
        else:
            rows.append(_row(name, b, m))
    for name in sorted(set(results.metrics) - set(baseline.metrics)):
        m = results.metrics[name]
        rows.append(Row(name, "new", None, m.value, None, None, m.unit, "no baseline"))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0 or 0.01 <= abs(v) < 1e6:
        return f"{v:.4g}"
    return f"{v:.3e}"


def render(rows: Sequence[Row]) -> str:
    header = ("metric", "baseline", "result", "unit", "worse by", "allowed", "status", "note")
    body = [
        (
            r.name,
            _fmt(r.baseline),
            _fmt(r.value),
            r.unit,
            "-" if r.factor is None else f"{r.factor:.2f}x",
            "-" if r.tolerance is None else f"{1 + r.tolerance:.2f}x",
            r.status,
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("baseline", help="bench/baseline_metrics.json")
    p.add_argument("results", help="results.json written by python -m bench.nightly")
    args = p.parse_args(argv)
    try:
        baseline = load_baseline(args.baseline)
        results = load_results(args.results)
    except FormatError as e:
        print(f"bench.compare: {e}", file=sys.stderr)
        return 2
    rows = compare(baseline, results)
    print(
        f"baseline {baseline.path}; results {results.path} (commit {results.commit}, "
        f"{results.date}, {results.mode} run)"
    )
    print(render(rows))
    failed = [r.name for r in rows if r.failed]
    missing = [r.name for r in rows if r.status == "missing"]
    if missing:
        print(f"missing (reported, not failed): {', '.join(missing)}")
    if failed:
        print(
            f"FAIL: {len(failed)} metric(s) worse than baseline beyond tolerance: "
            f"{', '.join(failed)}"
        )
        return 1
    print(f"OK: no metric worse than its baseline beyond its tolerance ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
