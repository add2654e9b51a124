"""``SimProcess``, the driver of a simulator in a child process: a child that
fails to start, never starts, freezes or refuses an op is reported with an
error that says so, and ``close`` never hangs on it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from kvsync import simproc
from kvsync.sim import SimProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[str]]]:
    """Every child SimProcess starts (also those whose start fails, which the
    test cannot reach through the object); any left running is killed."""
    started: list[subprocess.Popen[str]] = []
    real = subprocess.Popen

    def popen(*args: Any, **kw: Any) -> subprocess.Popen[str]:
        p: subprocess.Popen[str] = real(*args, **kw)
        started.append(p)
        return p

    monkeypatch.setattr(simproc.subprocess, "Popen", popen)
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_a_simulator_that_exits_at_start_is_reported_with_its_status(
    children: list[subprocess.Popen[str]], capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RuntimeError, match="simulator exited with 2"):
        SimProcess("--dp-size", "0")
    assert "--dp-size" in capfd.readouterr().err
    assert len(children) == 1 and children[0].returncode == 2
    assert children[0].stdout is not None and children[0].stdout.closed


def test_a_simulator_that_does_not_start_in_time_is_killed(
    children: list[subprocess.Popen[str]],
) -> None:
    # No interpreter starts within a millisecond: the deadline passes first.
    with pytest.raises(TimeoutError, match=r"simulator did not start within 0\.001 s"):
        SimProcess(timeout=0.001)
    assert len(children) == 1
    assert children[0].returncode == -signal.SIGKILL, "the late child must not be left running"


def test_a_refused_op_raises_with_the_simulators_error() -> None:
    with SimProcess() as sim:
        with pytest.raises(RuntimeError, match=r"simulator: field 'n' must be an integer"):
            sim.request("step", n=-1)
        assert sim.request("ping") == {"ok": True}


def test_a_frozen_simulator_times_out_and_answers_again_once_thawed() -> None:
    with SimProcess() as sim:
        sim.request("step", n=2)
        # A short deadline for the frozen phase only (a slow start must not fail the test).
        sim.timeout = 0.3
        sim.sock.setsockopt(zmq.RCVTIMEO, 300)
        os.kill(sim.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError, match=r"did not answer within 0\.3 s"):
                sim.request("step", n=5)
            with pytest.raises(TimeoutError):
                sim.request("ping")
        finally:
            os.kill(sim.pid, signal.SIGCONT)
        sim.sock.setsockopt(zmq.RCVTIMEO, 20_000)
        # The late replies to the timed-out requests are not taken for this one's.
        truth = sim.request("truth")
        assert truth["block_size"] == 16
        # The timed-out step still ran once the simulator woke up.
        assert truth["seq"] == [6]


def test_close_kills_a_simulator_that_does_not_stop() -> None:
    sim = SimProcess()
    os.kill(sim.pid, signal.SIGSTOP)  # SIGTERM stays pending while stopped
    sim.close(timeout=0.3)
    assert sim.proc.returncode == -signal.SIGKILL
