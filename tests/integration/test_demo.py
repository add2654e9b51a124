"""`kvsync demo` end to end: prefix routing beats random and the index
ends equal to the engines' caches; piped output is a short summary, a
terminal gets a live table; Ctrl-C stops every engine and exits 130."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_demo_routes_better_than_random_and_stays_exact() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvsync.cli",
            "demo",
            "--engines",
            "3",
            "--requests",
            "600",
            "--rate",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    # a pipe gets the final summary only: a few plain lines, no redraws
    assert len(out.splitlines()) <= 8, out
    assert "\x1b" not in out
    assert "index equals the engines' caches: yes" in out
    rates = {
        name: float(rate)
        for name, rate in re.findall(r"^\s+(kvsync|random|oracle)\s+([\d.]+)%", out, re.M)
    }
    assert set(rates) == {"kvsync", "random", "oracle"}
    assert rates["kvsync"] > rates["random"]
    # kvsync's index is exact, so it routes like the oracle (up to event lag)
    assert rates["kvsync"] >= rates["oracle"] - 2.0


def demo(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvsync", "demo", *argv],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        **kw,  # type: ignore[call-overload]
    )


def test_demo_with_no_requests_reports_a_consistent_index() -> None:
    proc = demo("--engines", "1", "--requests", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "index equals the engines' caches: yes" in proc.stdout


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids a test started; any still running at the end are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
def test_ctrl_c_stops_every_engine_and_exits_130(reaper: list[int]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvsync", "demo", "--engines", "3", "--requests", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    reaper.append(proc.pid)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "routing" not in seen:  # engines are up and requests are flowing
            assert time.monotonic() < deadline, f"demo did not start routing: {seen!r}"
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                seen += proc.stderr.readline()
        engines = _children(proc.pid)
        reaper.extend(engines)
        assert len(engines) == 3
        time.sleep(0.5)  # let a few requests through; then Ctrl-C
        # A terminal's Ctrl-C signals the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err, err
    assert "kvsync demo: interrupted after" in out and "all 3 engines stopped" in out
    assert len(out.splitlines()) <= 8, out
    assert [pid for pid in engines if _alive(pid)] == []


def test_terminal_gets_a_live_table_that_fits(reaper: list[int]) -> None:
    """Under a pseudo-terminal of 24 x 80 with 12 engines: every frame fits
    the terminal, with column headers and engines in natural order."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvsync", "demo", "--engines", "12", "--requests", "300"],
        stdin=secondary,
        stdout=secondary,
        stderr=subprocess.PIPE,
        env=env,
    )
    reaper.append(proc.pid)
    os.close(secondary)
    raw = b""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # the terminal closed: the demo exited
                    break
                if not chunk:
                    break
                raw += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, raw[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        os.close(primary)
        if proc.stderr is not None:
            proc.stderr.close()
    text = raw.decode(errors="replace")
    # the last frame drawn before the final summary, without terminal codes
    last = text[text.rindex("kvsync demo  300/300") : text.rindex("kvsync demo: 300 requests")]
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in last.split("\r\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, lines
    header = next(line for line in lines if line.startswith("engine "))
    assert all(c in header for c in ("state", "seq", "batches", "events/s", "gaps", "lost"))
    rows = [line.split()[0] for line in lines if line.startswith("engine-")]
    assert rows == [f"engine-{i}" for i in range(12)]
    assert "index equals the engines' caches: yes" in text
