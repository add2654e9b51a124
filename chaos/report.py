"""The run's reports: ``chaos-report.json`` (every scenario's result, as
``runner.Result.to_json``) and ``chaos-report.md`` (a table to read).
Written by the session fixture of ``chaos/conftest.py`` after the last
scenario, into ``$KVSYNC_CHAOS_REPORT_DIR`` (default: the current
directory)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# kvsync chaos report",
        "",
        f"Run at {meta.get('started', '?')}, {len(results)} scenario(s), "
        f"{meta.get('wall_seconds', '?')} s in all. Verdicts: `exact` (kvsync answers what "
        "the engines hold), `safe` (false negatives only: allowed where history was "
        "really lost), `FALSE POSITIVE` (kvsync claims a cache that is gone: never "
        "allowed). Recovery is the time from the heal until kvsync was first exact "
        "(`-`: never, as where history was lost); FP-free the time until no answer was a "
        "false positive.",
        "",
        "| scenario | SUT | fault | verdict | allowed | FP | FN | pairs | recovery s "
        "| FP-free s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        verdict = r["verdict"] if r["passed"] else f"**{r['verdict']}** (FAIL)"
        lines.append(
            f"| {r['scenario']} | {r['sut']} | {r['fault']} | {verdict} | "
            f"{', '.join(r['allowed'])} | {r['false_positives']} | {r['false_negatives']} | "
            f"{r['pairs']} | {_cell(r['recovery_seconds'])} | "
            f"{_cell(r.get('fp_free_seconds'))} | {r['total_seconds']} |"
        )
    notes = [r for r in results if r.get("notes") or r.get("examples")]
    if notes:
        lines += ["", "## Notes", ""]
        for r in notes:
            if r.get("notes"):
                lines.append(f"- {r['scenario']}: {json.dumps(r['notes'])}")
            for ex in r.get("examples", []):
                lines.append(f"- {r['scenario']}: false positive: {ex}")
    lines += ["", "## Worker states at the end", ""]
    for r in results:
        states = ", ".join(
            f"{w} {v.get('state')} (gaps {v.get('gaps')}, lost {v.get('lost_batches')}, "
            f"resets {v.get('resets')})"
            for w, v in sorted(r["workers"].items())
        )
        lines.append(f"- {r['scenario']}: {states}")
    return "\n".join(lines) + "\n"


def write(results: list[dict[str, Any]], directory: Path, started: float) -> tuple[Path, Path]:
    """Write both reports; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "scenarios": len(results),
        "false_positive_scenarios": sum(r["false_positives"] > 0 for r in results),
        "failed": [r["scenario"] for r in results if not r["passed"]],
    }
    js = directory / "chaos-report.json"
    md = directory / "chaos-report.md"
    js.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md.write_text(markdown(results, meta))
    return js, md
