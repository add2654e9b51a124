"""`kvsync inspect`: what a user sees on the terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from kvsync.cli import main, sample_paths

from .conftest import WIRE


def test_inspect_samples_prints_events_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--samples"]) == 0
    out = capsys.readouterr().out
    assert out.count("BlockStored") == 5
    assert "BlockRemoved" in out
    assert "skipped 1 of unknown type" in out
    assert "index summary" in out
    # 4 system-prompt blocks + 2 x 2 conversation blocks + 2 LoRA blocks, minus 2 evicted
    assert "blocks       8" in out
    assert "holdings     8" in out
    assert len(sample_paths()) == 4


def test_inspect_reports_bad_files_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x93\xcb")
    good = tmp_path / "good.bin"
    good.write_bytes(msgpack.packb([1.0, [{"type": "AllBlocksCleared"}], None]))
    assert main(["inspect", str(good), str(bad), str(tmp_path / "missing.bin")]) == 1
    captured = capsys.readouterr()
    assert "AllBlocksCleared" in captured.out
    assert f"{bad}: not a KV event batch (2 bytes)" in captured.err
    assert "missing.bin: cannot read" in captured.err
    assert "2 of 3 file(s) could not be decoded" in captured.err


def test_inspect_without_files_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect"]) == 2
    assert "give payload files or --samples" in capsys.readouterr().err


@pytest.mark.skipif(not WIRE.is_dir(), reason="../shared test vectors absent")
def test_console_script_runs_on_real_engine_payloads() -> None:
    files = sorted(str(p) for p in (WIRE / "vllm-0.33.0").glob("*.bin"))
    proc = subprocess.run(
        [sys.executable, "-m", "kvsync.cli", "inspect", "--per-file", *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "index summary" in proc.stdout
    assert f"workers      {len(files)}" in proc.stdout
