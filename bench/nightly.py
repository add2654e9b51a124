"""Nightly benchmark run: ``python -m bench.nightly [--quick] --out DIR``.

Runs the measurements of the benchmark suite (bench/nightly_probes.py,
bench/nightly_serve.py), the peer comparison (bench/peers, a Rust crate,
when it is on the branch) and the service load bench (bench.serve_load,
when it is on the branch), and writes ``DIR/results.json`` (format in
bench/results.py). Each metric keeps its repeated runs; its value is their
median. A measurement that cannot be made here (a module or crate not on
this branch, cargo too slow to build it within the budget) is listed under
``skipped`` with the reason; one that fails (an exception, lost batches) is
listed there too, and makes the exit status 1 after results.json is written.

``--quick`` (67 s on the 2-core machine of bench/README.md when quiet, 88-205 s
at load averages of 5-15) runs fewer repeats and probes on the same
workloads; the full run took 142 s there (quiet), plus the peers' build.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import nightly_probes as probes
from .nightly_probes import Runs, Sizes

__all__ = ["METRICS", "main", "peers_metrics", "read_serve_load"]

REPO = Path(__file__).resolve().parent.parent
PEERS_MANIFEST = REPO / "bench" / "peers" / "Cargo.toml"

# name -> (unit, which direction is better)
METRICS: dict[str, tuple[str, str]] = {
    "event_processing_latency_p99_us": ("us", "lower"),
    "routing_decision_latency_p99_us": ("us", "lower"),
    "routing_decision_server_cpu_us": ("us", "lower"),
    "throughput_block_events_per_s": ("block events/s", "higher"),
    "vs_plain_ingest_speedup": ("x", "higher"),
    "memory_bytes_per_1k_events": ("B", "lower"),
    "memory_bytes_per_holding_shared": ("B", "lower"),
    "memory_bytes_per_holding_unshared": ("B", "lower"),
    "match_p50_us": ("us", "lower"),
    "match_p99_us": ("us", "lower"),
    "match_p99_wall_us": ("us", "lower"),
    "recovery_engine_restart_s": ("s", "lower"),
    "recovery_router_restart_s": ("s", "lower"),
    "recovery_router_restart_cpu_s": ("s", "lower"),
    "subscriber_cpu_us_per_block_event": ("us", "lower"),
}
SERVE_LOAD_METRICS = ("event_processing_latency_p99_us", "routing_decision_latency_p99_us")


class Skip(Exception):
    """A measurement that cannot be made on this branch or machine."""


# ------------------------------------------------------------ other benches


def _runs_of(entry: Any) -> list[float] | None:
    if isinstance(entry, bool):
        return None
    if isinstance(entry, int | float):
        return [float(entry)]
    if isinstance(entry, dict):
        runs = entry.get("runs")
        if isinstance(runs, list) and runs and all(isinstance(r, int | float) for r in runs):
            return [float(r) for r in runs]
        if isinstance(entry.get("value"), int | float):
            return [float(entry["value"])]
    return None


def read_serve_load(data: Any) -> Runs:
    """The metrics of ``bench.serve_load --json``: either ``{"metrics":
    {NAME: {...}}}`` or ``{NAME: ...}``, a metric being a number or an
    object with ``runs`` or ``value``. Only the names of METRICS count."""
    if not isinstance(data, dict):
        raise ValueError(f"bench.serve_load wrote {type(data).__name__}, not a JSON object")
    table = data.get("metrics", data)
    out: Runs = {}
    for name in METRICS:
        runs = _runs_of(table.get(name)) if isinstance(table, dict) else None
        if runs is not None:
            out[name] = runs
    return out


def serve_load(s: Sizes, tmp: Path) -> Runs:
    if importlib.util.find_spec("bench.serve_load") is None:
        raise Skip("bench/serve_load.py is not on this branch")
    out = tmp / "serve_load.json"
    cmd = [sys.executable, "-m", "bench.serve_load", "--json", str(out)]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300 if s.repeats <= 5 else 1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-1000:]}")
    return read_serve_load(json.loads(out.read_text()))


def peers_metrics(data: Any) -> Runs:
    """kvsync's advantage over each peer, one value per (metric, peer), from
    bench/peers' ``{"metric": {METRIC: {"kvsync": v, PEER: v, ...}}, ...}``:
    peer/kvsync for a cost (time, bytes), kvsync/peer for a rate (a name
    ending in ``_s``, such as ``ingest_msgpack_mevents_s``, or with
    ``per_s`` or ``throughput``), so above 1 means kvsync is ahead and
    higher is better for every ``vs_peers_*`` metric. The crate's own
    ``ratios`` are not used: computed here, the direction is known."""
    if not isinstance(data, dict):
        raise ValueError(f"bench/peers wrote {type(data).__name__}, not a JSON object")
    table = data.get("metric", data)
    if not isinstance(table, dict):
        raise ValueError("bench/peers wrote a 'metric' that is not a JSON object")
    out: Runs = {}
    for metric, values in table.items():
        if metric == "ratios" or not isinstance(values, dict):
            continue
        ours = values.get("kvsync")
        if not isinstance(ours, int | float) or ours <= 0:
            continue
        rate = metric.endswith("_s") or "per_s" in metric or "throughput" in metric
        for peer, theirs in values.items():
            if peer == "kvsync" or not isinstance(theirs, int | float) or theirs <= 0:
                continue
            out[f"vs_peers_{metric}_{peer}"] = [ours / theirs if rate else theirs / ours]
    return out


def peers(s: Sizes, tmp: Path, budget_s: float) -> Runs:
    if not PEERS_MANIFEST.exists():
        raise Skip("bench/peers (the peer-comparison crate) is not on this branch")
    manifest = ["--release", "--manifest-path", str(PEERS_MANIFEST)]
    t0 = time.monotonic()
    try:
        build = subprocess.run(
            ["cargo", "build", *manifest],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=budget_s,
        )
    except subprocess.TimeoutExpired:
        raise Skip(f"cargo could not build bench/peers within {budget_s:.0f} s") from None
    except FileNotFoundError:
        raise Skip("cargo is not installed") from None
    if build.returncode != 0:
        raise RuntimeError(f"cargo build of bench/peers failed: {build.stderr[-1500:]}")
    runs: Runs = {}
    for i in range(1 if s.repeats <= 5 else 3):
        out = tmp / f"peers-{i}.json"
        left = max(60.0, budget_s - (time.monotonic() - t0))
        proc = subprocess.run(
            ["cargo", "run", *manifest, "--", "--json", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=left,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bench/peers exited {proc.returncode}: {proc.stderr[-1500:]}")
        for name, vals in peers_metrics(json.loads(out.read_text())).items():
            runs.setdefault(name, []).extend(vals)
    if not runs:
        raise RuntimeError("bench/peers reported no metric with a kvsync value and a peer's")
    return runs


# ------------------------------------------------------------------ driver


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        rustc = subprocess.run(
            ["rustc", "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rustc = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "python": platform.python_version(),
        "rustc": rustc,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def run(
    quick: bool, only: set[str] | None, peers_budget_s: float, log: Callable[[str], None]
) -> dict[str, Any]:
    sizes = Sizes.quick() if quick else Sizes.full()
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    result: dict[str, Any] = {
        "commit": commit,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "machine": machine(),
        "metrics": {},
        "skipped": {},
        "errors": {},
        "step_seconds": {},
    }
    runs: Runs = {}
    with tempfile.TemporaryDirectory(prefix="kvsync-nightly-") as d:
        tmp = Path(d)
        steps: list[tuple[str, tuple[str, ...], Callable[[], Runs]]] = [
            ("serve_load", SERVE_LOAD_METRICS, lambda: serve_load(sizes, tmp)),
            (
                "ingest",
                (
                    "throughput_block_events_per_s",
                    "vs_plain_ingest_speedup",
                    "memory_bytes_per_1k_events",
                ),
                lambda: probes.ingest(sizes),
            ),
            (
                "match",
                ("match_p50_us", "match_p99_us", "match_p99_wall_us"),
                lambda: probes.match_latency(sizes),
            ),
            (
                "memory",
                ("memory_bytes_per_holding_shared", "memory_bytes_per_holding_unshared"),
                lambda: probes.memory(sizes),
            ),
            (
                "publish_to_visible",
                ("event_processing_latency_p99_us",),
                lambda: probes.publish_to_visible(sizes),
            ),
            (
                "engine_restart",
                ("recovery_engine_restart_s",),
                lambda: probes.engine_restart(sizes),
            ),
            (
                "subscriber_cpu",
                ("subscriber_cpu_us_per_block_event",),
                lambda: probes.subscriber_cpu(sizes),
            ),
            (
                "serve",
                (
                    "routing_decision_latency_p99_us",
                    "routing_decision_server_cpu_us",
                    "recovery_router_restart_s",
                    "recovery_router_restart_cpu_s",
                ),
                lambda: _serve(sizes),
            ),
            ("peers", ("vs_peers_*",), lambda: peers(sizes, tmp, peers_budget_s)),
        ]
        for step, names, fn in steps:
            todo = [n for n in names if n not in runs]
            if only is not None and step not in only:
                continue
            if not todo:  # serve_load already gave these
                continue
            log(f"[{step}] {', '.join(todo)} ...")
            t0 = time.monotonic()
            try:
                got = fn()
            except Skip as e:
                for n in todo:
                    result["skipped"].setdefault(n, str(e))
                log(f"[{step}] skipped: {e}")
                continue
            except Exception as e:  # recorded, and the exit status says so
                reason = f"{step} failed: {type(e).__name__}: {e}"
                for n in todo:
                    result["skipped"].setdefault(n, reason)
                result["errors"][step] = traceback.format_exc(limit=5)
                log(f"[{step}] FAILED: {reason}")
                continue
            finally:
                result["step_seconds"][step] = round(time.monotonic() - t0, 1)
            for n, vals in got.items():
                if n not in runs and vals:
                    runs[n] = vals
                    result["skipped"].pop(n, None)
            log(f"[{step}] done in {result['step_seconds'][step]} s")
    for n, vals in runs.items():
        unit, better = METRICS.get(n, ("x", "higher"))  # vs_peers_*: kvsync's advantage
        result["metrics"][n] = {
            "value": statistics.median(vals),
            "unit": unit,
            "better": better,
            "runs": vals,
        }
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


def _serve(s: Sizes) -> Runs:
    from .nightly_serve import serve_metrics

    return serve_metrics(s.repeats, requests=400 if s.repeats <= 5 else 2000, restarts=s.restarts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nightly", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (under 3 minutes)")
    p.add_argument("--out", required=True, type=Path, help="directory for results.json")
    p.add_argument("--only", help="comma-separated steps (ingest,match,memory,...) to run")
    p.add_argument(
        "--peers-budget",
        type=float,
        default=None,
        help="seconds cargo may take to build and run bench/peers (quick 90, full 1200)",
    )
    args = p.parse_args(argv)
    budget = args.peers_budget if args.peers_budget is not None else (90 if args.quick else 1200)
    only = set(args.only.split(",")) if args.only else None
    t0 = time.monotonic()
    result = run(args.quick, only, budget, lambda m: print(m, file=sys.stderr, flush=True))
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for n, m in sorted(result["metrics"].items()):
        print(f"{n:<40} {m['value']:>14.4g} {m['unit']:<16} ({len(m['runs'])} runs)")
    for n, why in sorted(result["skipped"].items()):
        print(f"{n:<40} skipped: {why}")
    print(f"wrote {path} in {result['wall_seconds']} s")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
