"""What `pip install .` and the make targets install covers what the
package and the benchmarks import."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

# import name -> distribution name, where they differ
DISTRIBUTION = {"zmq": "pyzmq", "pytest_benchmark": "pytest-benchmark"}


def third_party_imports(folder: Path) -> set[str]:
    """Top-level modules imported by the .py files of `folder` that are not
    the standard library, kvsync itself or the folder's own modules."""
    own = {p.stem for p in folder.glob("*.py")} | {"kvsync", folder.name}
    found: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in own}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in requirements}


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return data


def test_dependencies_cover_what_the_package_imports() -> None:
    deps = names(project()["dependencies"])  # type: ignore[arg-type]
    imports = third_party_imports(REPO / "python" / "kvsync")
    assert "rich" in imports, "the demo's live view uses rich"
    missing = {DISTRIBUTION.get(m, m) for m in imports} - deps
    assert not missing, f"imported by kvsync but not in dependencies: {missing}"


def test_bench_extra_covers_what_the_benchmarks_import() -> None:
    extras = project()["optional-dependencies"]
    bench = names(extras["bench"]) | names(project()["dependencies"])  # type: ignore[index]
    imports = third_party_imports(REPO / "bench") | {"pytest_benchmark", "pytest_timeout"}
    missing = {DISTRIBUTION.get(m, m).replace("_", "-") for m in imports} - bench
    assert not missing, f"imported by bench/ but not in the bench extra: {missing}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_bench_installs_the_bench_extra_before_running() -> None:
    dry = subprocess.run(
        ["make", "-n", "bench", "PYTHON=python"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    install = next(i for i, line in enumerate(dry) if "pip install '.[bench]'" in line)
    run = next(i for i, line in enumerate(dry) if "pytest bench" in line)
    assert install < run, dry
