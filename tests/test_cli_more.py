"""More of what a user of the ``kvsync`` command sees: no subcommand, a
Ctrl-C, ``inspect -v``, and the demo reporting an engine that fails."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from kvsync import demo, sim
from kvsync.cli import main


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: kvsync")
    for command in ("inspect", "sim", "demo"):
        assert command in out


def test_ctrl_c_in_a_command_exits_130_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "run", interrupted)
    assert main(["sim"]) == 130
    assert capsys.readouterr().err == "kvsync sim: interrupted\n"


def test_inspect_verbose_prints_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--samples"]) == 0
    terse = capsys.readouterr().out
    assert main(["inspect", "--samples", "-v"]) == 0
    verbose = capsys.readouterr().out
    assert "'token_ids': [" not in terse
    # one dict line under every event line
    assert verbose.count("'type': 'BlockStored'") == terse.count("BlockStored")
    assert "'token_ids': [" in verbose and "'parent_block_hash':" in verbose


def test_demo_reports_an_engine_that_fails_to_start_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(*args: str, timeout: float = 20.0) -> sim.SimProcess:
        raise RuntimeError("simulator exited with 1")

    monkeypatch.setattr(demo, "SimProcess", failing)
    assert main(["demo", "--engines", "2", "--requests", "5"]) == 1
    err = capsys.readouterr().err
    assert "kvsync demo: simulator exited with 1" in err


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_python_dash_m_kvsync_demo_checks_its_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvsync.demo", "--engines", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "kvsync demo: error: argument --engines" in done.stderr
