"""The nightly benchmark files: ``results.json`` (one run of
``bench.nightly``) and ``baseline_metrics.json`` (what ``bench.compare``
holds a run to), read and checked here so that a malformed file is a clear
error naming the file and the field, not a KeyError deep in a comparison.

results.json::

    {"commit": str, "date": ISO-8601 str, "mode": "quick" | "full",
     "machine": {...}, "metrics": {NAME: {"value": float, "unit": str,
     "better": "lower" | "higher", "runs": [float, ...]}},
     "skipped": {NAME: reason}}

baseline_metrics.json::

    {"comment": str, "metrics": {NAME: {"value": float, "tolerance": float,
     "better": "lower" | "higher", "unit": str, "comment": str,
     "guard": bool}}}

``tolerance`` is relative: 0.25 lets a lower-is-better metric grow to 1.25x
its baseline value before it counts as a regression. ``"guard": false``
(default true) keeps a metric in the table without failing on it: for the
measurements whose run-to-run spread on the reference machine is beyond
what a 2x regression could be told from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DIRECTIONS",
    "Baseline",
    "BaselineMetric",
    "FormatError",
    "Metric",
    "Results",
    "load_baseline",
    "load_results",
]

DIRECTIONS = ("lower", "higher")


class FormatError(ValueError):
    """A results or baseline file that cannot be used, with the reason."""


@dataclass(frozen=True)
class Metric:
    value: float
    unit: str
    better: str
    runs: list[float]


@dataclass(frozen=True)
class Results:
    path: Path
    commit: str
    date: str
    metrics: dict[str, Metric]
    skipped: dict[str, str] = field(default_factory=dict)
    mode: str = "full"
    machine: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BaselineMetric:
    value: float
    tolerance: float
    better: str
    unit: str = ""
    comment: str = ""
    guard: bool = True


@dataclass(frozen=True)
class Baseline:
    path: Path
    metrics: dict[str, BaselineMetric]
    comment: str = ""


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FormatError(f"{what} {path}: cannot read it: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{what} {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise FormatError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _better(v: Any, where: str) -> str:
    if v not in DIRECTIONS:
        raise FormatError(f"{where}: 'better' must be 'lower' or 'higher', got {v!r}")
    return str(v)


def _guard(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise FormatError(f"{where}: 'guard' must be true or false, got {v!r}")
    return v


def _metrics_object(data: dict[str, Any], where: str) -> dict[str, Any]:
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise FormatError(f"{where}: missing 'metrics' object")
    for name, m in metrics.items():
        if not isinstance(m, dict):
            raise FormatError(f"{where}: metric {name!r} is not an object")
    return metrics


def load_results(path: Path | str) -> Results:
    path = Path(path)
    data = _read(path, "results file")
    where = f"results file {path}"
    metrics: dict[str, Metric] = {}
    for name, m in _metrics_object(data, where).items():
        at = f"{where}: metric {name!r}"
        runs = m.get("runs", [])
        if not isinstance(runs, list):
            raise FormatError(f"{at}: 'runs' must be a list")
        metrics[name] = Metric(
            value=_number(m.get("value"), f"{at} 'value'"),
            unit=str(m.get("unit", "")),
            better=_better(m.get("better"), at),
            runs=[_number(r, f"{at} 'runs'") for r in runs],
        )
    skipped = data.get("skipped", {})
    if not isinstance(skipped, dict):
        raise FormatError(f"{where}: 'skipped' must be an object of reasons")
    machine = data.get("machine", {})
    return Results(
        path=path,
        commit=str(data.get("commit", "?")),
        date=str(data.get("date", "")),
        metrics=metrics,
        skipped={str(k): str(v) for k, v in skipped.items()},
        mode=str(data.get("mode", "full")),
        machine=machine if isinstance(machine, dict) else {},
    )


def load_baseline(path: Path | str) -> Baseline:
    path = Path(path)
    data = _read(path, "baseline file")
    where = f"baseline file {path}"
    metrics: dict[str, BaselineMetric] = {}
    for name, m in _metrics_object(data, where).items():
        at = f"{where}: metric {name!r}"
        tol = _number(m.get("tolerance"), f"{at} 'tolerance'")
        if tol < 0:
            raise FormatError(f"{at}: 'tolerance' must be >= 0, got {tol}")
        metrics[name] = BaselineMetric(
            value=_number(m.get("value"), f"{at} 'value'"),
            tolerance=tol,
            better=_better(m.get("better"), at),
            unit=str(m.get("unit", "")),
            comment=str(m.get("comment", "")),
            guard=_guard(m.get("guard", True), at),
        )
    return Baseline(path=path, metrics=metrics, comment=str(data.get("comment", "")))
