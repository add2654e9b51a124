"""The test layers: `pytest -m unit` selects the default layer (every test
without a layer marker) and nothing of the other layers."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO


def collected(*args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_pytest_m_unit_selects_the_unit_tests_and_no_integration_ones() -> None:
    files = ["tests/test_cli.py", "tests/integration/test_demo.py"]
    unit = collected("-m", "unit", *files)
    integration = collected("-m", "integration", *files)
    assert "tests/test_cli.py::test_inspect_without_files_is_a_usage_error" in unit
    assert all(t.startswith("tests/test_cli.py::") for t in unit)
    demo = "tests/integration/test_demo.py::"
    assert demo + "test_demo_with_no_requests_reports_a_consistent_index" in integration
    assert all(t.startswith(demo) for t in integration)
    assert unit.isdisjoint(integration)
    assert unit | integration == collected(*files)
