"""``tools/mutants_score.py``: the mutation score that gates ``make mutants``
(caught and time-outs over all but unviable), per module, with the listed
equivalent survivors reported apart but still counted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO

TOOL = REPO / "tools" / "mutants_score.py"


def _run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(TOOL), str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _write(d: Path, **lists: list[str]) -> None:
    d.mkdir()
    for kind in ("caught", "missed", "timeout", "unviable"):
        (d / f"{kind}.txt").write_text("".join(f"{n}\n" for n in lists.get(kind, [])))


def test_scores_per_module_and_gates_on_the_total(tmp_path: Path) -> None:
    h = "rust/core/src/holders/mod.rs:{}:5: replace + with - in f"
    s = "rust/core/src/stream/inputs.rs:{}:5: replace > with < in g"
    out = tmp_path / "mutants.out"
    _write(
        out,
        caught=[h.format(i) for i in range(7)] + [s.format(i) for i in range(9)],
        timeout=[h.format(7)],
        missed=[h.format(8), h.format(9), s.format(9)],
        unviable=[s.format(10)],
    )
    equiv = tmp_path / "equiv.txt"
    equiv.write_text(f"# why\n{h.format(9)}  # bits never overlap\n")
    ok = _run(out, "--fail-under", "80", "--equivalent", str(equiv))
    assert ok.returncode == 0, ok.stderr
    rows = {line.split()[0]: line.split() for line in ok.stdout.splitlines() if line.strip()}
    # holders: 8 caught (a time-out counts), 2 missed of which 1 equivalent
    assert rows["holders"][1:6] == ["8", "2", "1", "0", "80.0%"]
    assert rows["holders"][6] == "88.9%"
    assert rows["stream"][1:6] == ["9", "1", "0", "1", "90.0%"]
    assert rows["total"][5] == "85.0%"
    assert h.format(8) in ok.stdout and f"  {h.format(9)}" not in ok.stdout
    low = _run(out, "--fail-under", "90")
    assert low.returncode == 1 and "85.0% is under 90" in low.stderr


def test_a_directory_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    proc = _run(tmp_path)
    assert proc.returncode != 0 and "not a cargo-mutants output directory" in proc.stderr
