"""Trend report of the nightly runs: ``python -m bench.report HISTORY_DIR
--out DIR [--baseline bench/baseline_metrics.json]``.

Reads every ``results.json`` under HISTORY_DIR (at any depth, as the
nightly job's downloaded artifacts nest them), and writes one PNG per
metric (the median of each night, its runs as dots, the baseline as a line
and its tolerance band shaded: outside the band on the bad side is what
``bench.compare`` fails) and ``DIR/index.html`` showing them all with the
latest values. Files that are not valid results are listed in the page
(and on stderr), not fatal: one broken artifact must not hide the trend.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI runners

import matplotlib.pyplot as plt

from .results import Baseline, FormatError, Results, load_baseline, load_results

__all__ = ["collect", "main", "write_report"]

DEFAULT_BASELINE = Path(__file__).resolve().parent / "baseline_metrics.json"


def collect(history: Path) -> tuple[list[Results], list[str]]:
    """Every readable results.json under ``history``, oldest first, and a
    message per file that could not be read."""
    runs: list[Results] = []
    problems: list[str] = []
    for path in sorted(history.rglob("results.json")):
        try:
            runs.append(load_results(path))
        except FormatError as e:
            problems.append(str(e))
    runs.sort(key=lambda r: (_when(r), str(r.path)))
    return runs, problems


def _when(r: Results) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(r.date)
    except ValueError:
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _plot(name: str, runs: list[Results], baseline: Baseline | None, out: Path) -> None:
    points = [(r, r.metrics[name]) for r in runs if name in r.metrics]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    xs = list(range(len(points)))
    ax.plot(xs, [m.value for _, m in points], "o-", color="tab:blue", label="median")
    for x, (_, m) in zip(xs, points, strict=True):
        if m.runs:
            ax.plot([x] * len(m.runs), m.runs, ".", color="tab:blue", alpha=0.35)
    b = baseline.metrics.get(name) if baseline else None
    if b is not None:
        lo, hi = b.value / (1 + b.tolerance), b.value * (1 + b.tolerance)
        ax.axhline(b.value, color="tab:green", label="baseline")
        ax.axhspan(lo, hi, color="tab:green", alpha=0.12, label=f"tolerance ±{b.tolerance:.0%}")
        bad = hi if b.better == "lower" else lo
        ax.axhline(bad, color="tab:red", linestyle="--", linewidth=1, label="regression limit")
    unit = points[0][1].unit if points else (b.unit if b else "")
    better = points[0][1].better if points else (b.better if b else "")
    ax.set_title(f"{name} ({better} is better)")
    ax.set_ylabel(unit)
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [f"{r.date[:10]}\n{r.commit[:8]}" for r, _ in points], fontsize=7, rotation=0
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_report(
    runs: list[Results], out: Path, baseline: Baseline | None, problems: Sequence[str] = ()
) -> list[Path]:
    """Write the PNGs and index.html; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted({n for r in runs for n in r.metrics} | set(baseline.metrics if baseline else ()))
    pngs: list[Path] = []
    rows: list[str] = []
    latest = runs[-1] if runs else None
    for name in names:
        png = out / f"{_slug(name)}.png"
        _plot(name, runs, baseline, png)
        pngs.append(png)
        m = latest.metrics.get(name) if latest else None
        now = f"{m.value:.4g} {html.escape(m.unit)}" if m else "missing in the latest run"
        rows.append(
            f'<section><h2 id="{html.escape(_slug(name))}">{html.escape(name)}</h2>'
            f"<p>latest: {now}</p>"
            f'<img src="{html.escape(png.name)}" alt="{html.escape(name)} trend"></section>'
        )
    head = (
        f"{len(runs)} runs, {html.escape(runs[0].date)} to {html.escape(runs[-1].date)}, "
        f"latest commit {html.escape(runs[-1].commit)}"
        if runs
        else "no results found"
    )
    bad = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>kvsync nightly benchmarks</title>"
        "<style>body{font-family:sans-serif;max-width:900px;margin:auto}img{max-width:100%}"
        "</style></head><body><h1>kvsync nightly benchmarks</h1>"
        f"<p>{head}; baseline {html.escape(str(baseline.path)) if baseline else 'none'}</p>"
        + (f"<h2>Unreadable files</h2><ul>{bad}</ul>" if bad else "")
        + "".join(rows)
        + "</body></html>\n"
    )
    (out / "index.html").write_text(page)
    return pngs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("history", type=Path, help="folder of results.json files (any depth)")
    p.add_argument("--out", type=Path, required=True, help="where index.html and the PNGs go")
    p.add_argument(
        "--baseline", type=Path, default=None, help="baseline (default bench/baseline_metrics.json)"
    )
    args = p.parse_args(argv)
    if not args.history.is_dir():
        print(f"bench.report: {args.history} is not a directory", file=sys.stderr)
        return 2
    baseline = None
    path = args.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE.exists() else None)
    if path is not None:
        try:
            baseline = load_baseline(path)
        except FormatError as e:
            print(f"bench.report: {e}", file=sys.stderr)
            return 2
    runs, problems = collect(args.history)
    for msg in problems:
        print(f"bench.report: skipped {msg}", file=sys.stderr)
    pngs = write_report(runs, args.out, baseline, problems)
    print(f"wrote {args.out / 'index.html'} and {len(pngs)} PNGs from {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
