"""tools/coverage_summary.py (the last step of ``make coverage``): the
table of both reports, and the floor that nightly CI enforces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "coverage_summary.py"


def _reports(d: Path, py: tuple[int, int], rust: list[tuple[int, int]]) -> Path:
    (d / "rust").mkdir(parents=True)
    (d / "python.json").write_text(
        json.dumps({"totals": {"covered_lines": py[0], "num_statements": py[1]}})
    )
    files = [
        {"path": ["", "repo", "rust", "core", "src", f"m{i}.rs"], "covered": c, "coverable": n}
        for i, (c, n) in enumerate(rust)
    ]
    # lines tarpaulin also lists outside the core library do not count
    files.append(
        {"path": ["", "repo", "rust", "py", "src", "index.rs"], "covered": 0, "coverable": 500}
    )
    files.append(
        {"path": ["", "repo", "rust", "core", "tests", "t.rs"], "covered": 0, "coverable": 50}
    )
    (d / "rust" / "tarpaulin-report.json").write_text(json.dumps({"files": files}))
    return d


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60
    )


def test_table_and_floor(tmp_path: Path) -> None:
    d = _reports(tmp_path / "cov", (950, 1000), [(80, 100), (100, 100)])
    ok = _run(str(d), "--fail-under", "90")
    assert ok.returncode == 0, ok.stderr
    assert "950 / 1000 | 95.0%" in ok.stdout and "180 / 200 | 90.0%" in ok.stdout
    low = _run(str(d), "--fail-under", "91")
    assert low.returncode == 1
    assert "Rust core" in low.stderr and "90.0% < 91%" in low.stderr


def test_a_missing_report_fails_the_floor(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    assert _run(str(d)).returncode == 0  # no floor: a table saying what is missing
    r = _run(str(d), "--fail-under", "90")
    assert r.returncode == 1 and "no report" in r.stderr
