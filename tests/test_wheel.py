"""The wheel ``make wheel`` builds (dist/kvsync-*-manylinux*.whl),
installed into a fresh virtual environment: the installed package is the
wheel's (not this checkout), ``kvsync demo --requests 200`` completes, and
the unit layer passes against it.

Marked ``integration`` (part of the default run, which installs from
source): it runs where a wheel was built, in the release workflow's smoke
job and after ``make wheel`` here, and skips with a message otherwise. The
venv sees the system site-packages so that dependencies already there need
no download; the wheel itself goes into the venv and shadows any other
kvsync.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
DIST = Path(os.environ.get("KVSYNC_WHEEL_DIR", REPO / "dist"))


def _wheel() -> Path:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(
        (
            p
            for p in DIST.glob("kvsync-*manylinux*.whl")
            if f"-{tag}-" in p.name or "-abi3-" in p.name
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not wheels:
        pytest.skip(f"no manylinux wheel for {tag} in {DIST}: run `make wheel` first")
    return wheels[-1]


def _run(cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    # no PYTHONPATH/VIRTUAL_ENV of this run, and no coverage of it: `make
    # coverage` patches subprocesses, which would count the wheel's copy
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith(("COVERAGE_", "COV_"))
    }
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload, no-any-return]


def test_the_wheel_installs_runs_the_demo_and_passes_the_unit_layer(tmp_path: Path) -> None:
    wheel = _wheel()
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # the wheel and what it and the unit layer need (from the index when the
    # system site-packages lack it): its declared dependencies are checked too
    # (the wheel alone first: a kvsync in the system site-packages would
    # otherwise "already satisfy" it)
    pip = [py, "-m", "pip", "install", "--no-input"]
    for args in (["--no-deps", "--force-reinstall", str(wheel)], [f"{wheel}[test]"]):
        inst = _run([*pip, *args], 600)
        assert inst.returncode == 0, inst.stdout + inst.stderr
    where = _run(
        [py, "-c", "import kvsync, kvsync._core as c; print(kvsync.__file__); print(c.__file__)"],
        60,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert line.startswith(str(env_dir)), f"kvsync imported from outside the venv: {line}"
    demo = _run(
        [
            str(env_dir / "bin" / "kvsync"),
            "demo",
            "--requests",
            "200",
            "--rate",
            "0",
            "--engines",
            "2",
        ],
        300,
        cwd=tmp_path,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "hit" in (demo.stdout + demo.stderr).lower()
    unit = _run(
        [py, "-m", "pytest", "-m", "unit", "-q", "-x", "-p", "no:cacheprovider", "tests"],
        900,
        cwd=REPO,
    )
    assert unit.returncode == 0, unit.stdout[-3000:] + unit.stderr[-2000:]
