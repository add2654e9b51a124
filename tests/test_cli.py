"""The `kvsync` command line: what a user sees on the terminal (inspect,
option errors, python -m kvsync, the demo's live view)."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from rich.console import Console

import kvsync
from kvsync import demo, sim
from kvsync.cli import main, sample_paths
from kvsync.demo_view import Fleet, Snapshot, natural_key, render

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


# ------------------------------------------------------------ options


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """Replace what `kvsync demo` and `kvsync sim` run, so that option
    parsing is tested without starting engines; records what would run."""
    ran: list[argparse.Namespace] = []

    def record(args: argparse.Namespace) -> int:
        ran.append(args)
        return 0

    monkeypatch.setattr(demo, "run", record)
    monkeypatch.setattr(sim, "run", record)
    return ran


BAD_OPTIONS = [
    (["demo", "--engines", "0"], "--engines", "between 1 and"),
    (["demo", "--engines", "many"], "--engines", "not an integer"),
    (["demo", "--block-size", "0"], "--block-size", "at least 1"),
    (["demo", "--tenants", "0"], "--tenants", "at least 1"),
    (["demo", "--capacity", "-5"], "--capacity", "at least 1"),
    (["demo", "--rate", "-1"], "--rate", ">= 0"),
    (["demo", "--rate", "nan"], "--rate", ">= 0"),
    (["demo", "--rate", "fast"], "--rate", "not a number"),
    (["demo", "--requests", "-1"], "--requests", "at least 0"),
    (["demo", "--seed", "-3"], "--seed", "at least 0"),
    (["sim", "--port", "70000"], "--port", "between 1 and 65535"),
    (["sim", "--port", "-1"], "--port", "between 1 and 65535"),
    (["sim", "--replay-port", "65536"], "--replay-port", "between 1 and 65535"),
    (["sim", "--dp-size", "0"], "--dp-size", "between 1 and"),
    (["sim", "--buffer", "0"], "--buffer", "at least 1"),
    (["sim", "--block-size", "0"], "--block-size", "at least 1"),
    (["sim", "--capacity", "-5"], "--capacity", "at least 1"),
    (["sim", "--rate", "-1"], "--rate", ">= 0"),
    (["sim", "--batch-requests", "0"], "--batch-requests", "at least 1"),
    (["sim", "--host", ""], "--host", "must not be empty"),
    (["sim", "--replay-frames", "5"], "--replay-frames", "invalid choice"),
    (["sim", "--port", "65535", "--dp-size", "2"], "--port 65535 with --dp-size 2", "65536"),
    (["sim", "--port", "65000", "--dp-size", "300"], "--dp-size", "between 1 and"),
    (["sim", "--replay-port", "6000", "--no-replay"], "--replay-port and --no-replay", ""),
    (["inspect", "--model", ""], "--model", "must not be empty"),
    (["inspect", "--worker", " "], "--worker", "must not be empty"),
]


@pytest.mark.parametrize(
    ("argv", "option", "why"), BAD_OPTIONS, ids=[" ".join(argv) for argv, _, _ in BAD_OPTIONS]
)
def test_bad_option_is_a_usage_error_naming_it(
    argv: list[str],
    option: str,
    why: str,
    no_run: list[argparse.Namespace],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"kvsync {argv[0]}: error:" in err
    assert option in err and why in err, err
    assert no_run == [], "a bad option must stop before anything runs"


def test_good_options_reach_the_command(no_run: list[argparse.Namespace]) -> None:
    assert main(["sim", "--port", "0", "--replay-port", "65535", "--rate", "0"]) == 0
    assert main(["sim", "--port", "65534", "--dp-size", "1", "--no-replay"]) == 0
    assert main(["demo", "--requests", "0", "--rate", "0", "--engines", "1"]) == 0
    assert [a.port for a in no_run[:2]] == [0, 65534]
    assert no_run[1].no_replay and no_run[0].replay_port == 65535
    assert (no_run[2].requests, no_run[2].rate, no_run[2].engines) == (0, 0.0, 1)


def test_python_dash_m_kvsync_is_the_kvsync_command() -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvsync", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    version = run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, kvsync.__version__)
    inspect = run("inspect", "--samples")
    assert inspect.returncode == 0, inspect.stderr
    assert "index summary" in inspect.stdout
    bad = run("demo", "--engines", "0")
    assert bad.returncode == 2
    assert "python -m kvsync demo: error: argument --engines" in bad.stderr


# ---------------------------------------------------- demo live view


@dataclass
class FakeStatus:
    state: str = "live"
    last_seq: int | None = 41
    batches: int = 42
    events: int = 900
    gaps: int = 0
    lost_batches: int = 0


def snapshot(engines: int) -> Snapshot:
    status = {f"engine-{i}": FakeStatus() for i in range(engines)}
    status["engine-3"].state = "degraded"
    stats = kvsync.Index().stats()
    fleets = [Fleet(n, hit=50, blocks=100, load=[1] * engines) for n in ("kvsync", "random")]
    return Snapshot(120, 3000, 4.2, stats, status, fleets)  # type: ignore[arg-type]


def frame(snap: Snapshot, width: int, height: int) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, height=height, color_system=None)
    console.print(render(snap, height))
    return out.getvalue().rstrip("\n").split("\n")


def test_natural_sort_puts_engine_2_before_engine_10() -> None:
    names = ["engine-10", "engine-2", "engine-1", "pod-b/dp10", "pod-b/dp9", "engine-0"]
    assert sorted(names, key=natural_key) == [
        "engine-0",
        "engine-1",
        "engine-2",
        "engine-10",
        "pod-b/dp9",
        "pod-b/dp10",
    ]


def test_live_view_has_column_headers_and_fits_an_80x24_terminal() -> None:
    lines = frame(snapshot(16), width=80, height=24)
    assert len(lines) <= 24, "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith("kvsync demo  120/3000 requests")
    header = next(line for line in lines if line.startswith("engine "))
    for column in ("state", "seq", "batches", "events/s", "gaps", "lost"):
        assert column in header
    rows = [line.split()[0] for line in lines if line.startswith("engine-")]
    assert rows == [f"engine-{i}" for i in range(16)]
    assert "degraded" in next(line for line in lines if line.startswith("engine-3 "))
    assert lines[-1].startswith("hit rate  kvsync  50.0%")


def test_live_view_folds_engines_that_do_not_fit_and_keeps_the_header() -> None:
    lines = frame(snapshot(40), width=50, height=14)
    assert len(lines) <= 14 and max(len(line) for line in lines) <= 50
    assert lines[0].startswith("kvsync demo")
    rows = [line.split()[0] for line in lines if line.startswith("engine-")]
    assert rows == [f"engine-{i}" for i in range(len(rows))] and len(rows) >= 5
    more = next(line for line in lines if line.startswith("+"))
    assert more.split()[:4] == [f"+{40 - len(rows)}", "more", f"{40 - len(rows)}", "live"]
