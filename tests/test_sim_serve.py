"""The simulator as a program (``kvsync sim`` / ``python -m kvsync.sim``):
ports it cannot have, options that contradict, the ``stop``/``run``/
``pause`` ops, malformed replay requests, and a parent that is gone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import zmq

from kvsync import sim
from kvsync.cli import main as kvsync_main
from kvsync.sim import END_SEQ, BadCommand, SimProcess, Simulator, build_parser

from .integration.conftest import wait_for


def run_sim(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvsync.sim", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_busy_fixed_port_is_named_and_the_simulator_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_sim("--port", str(port))
    assert done.returncode == 1, done
    assert f"kvsync sim: cannot bind the simulator's ports at {port}" in done.stderr
    assert done.stdout == ""  # no ports announced: nothing is listening


# The PUB ports fit (65300..65499), the replay ports after them do not.
REPLAY_PAST_END = (["--port", "65300", "--dp-size", "200"], "replay ports of --dp-size 200")


@pytest.mark.parametrize("entry", ["python -m kvsync.sim", "kvsync sim"])
def test_replay_ports_past_65535_are_a_usage_error(
    entry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, why = REPLAY_PAST_END
    # Should the check let it through, fail at once rather than serve forever.
    monkeypatch.setattr(sim, "run", lambda args: pytest.fail("the simulator was started"))
    with pytest.raises(SystemExit) as exc:
        if entry == "kvsync sim":
            kvsync_main(["sim", *argv])
        else:
            sim.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert why in err and "go past 65535 (set --replay-port)" in err, err


def test_handle_names_an_unknown_op() -> None:
    s = Simulator(build_parser().parse_args([]))
    try:
        with pytest.raises(BadCommand, match="unknown op 'warp'"):
            s.handle({"op": "warp"})
        assert s.handle({"op": "ping"}) == {"ok": True}
    finally:
        s.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_stop_op_ends_the_simulator_with_status_0() -> None:
    with SimProcess() as proc:
        assert proc.request("stop") == {"ok": True}
        assert proc.proc.wait(10) == 0


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_run_publishes_steadily_until_pause() -> None:
    with SimProcess() as proc:
        assert proc.request("stats")["seq"] == [-1]
        proc.request("run", rate=200)
        wait_for(lambda: proc.request("stats")["seq"][0] >= 5, what="5 steps at rate 200")
        proc.request("pause")
        paused = proc.request("stats")["seq"]
        time.sleep(0.3)
        assert proc.request("stats")["seq"] == paused, "a paused simulator published"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_malformed_replay_request_is_ignored_and_a_good_one_answered() -> None:
    with SimProcess() as proc:
        proc.request("step", n=2)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            dealer.connect(f"tcp://127.0.0.1:{proc.replay_port}")
            dealer.send_multipart([b"", b"short"])  # start seq must be 8 bytes
            assert not dealer.poll(300), "a malformed replay request was answered"
            dealer.send_multipart([b"", (1).to_bytes(8, "big")])
            seqs = []
            while True:
                frames = dealer.recv_multipart()
                assert len(frames) == 4, frames  # [b"", topic, seq, payload]
                if frames[2] == END_SEQ:
                    break
                seqs.append(int.from_bytes(frames[2], "big"))
            assert seqs == [1]
        finally:
            dealer.close(linger=0)
            ctx.term()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_simulator_whose_parent_is_gone_exits_by_itself() -> None:
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait(30)
    child = subprocess.Popen(
        [sys.executable, "-m", "kvsync.sim", "--parent-pid", str(gone.pid)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    assert child.returncode == 0
    assert set(json.loads(out)) >= {"pub_port", "control_port"}


def test_a_fixed_port_puts_the_replay_ports_after_every_ranks_pub_port() -> None:
    for _ in range(5):  # the free port found may be taken again before the bind
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 3 > 65535:
            continue
        try:
            s2 = Simulator(build_parser().parse_args(["--port", str(port), "--dp-size", "2"]))
        except RuntimeError:
            continue
        try:
            assert (s2.pub_port, s2.replay_port) == (port, port + 2)
        finally:
            s2.close()
        return
    pytest.fail("no free run of 4 ports found in 5 tries")


def test_a_simulator_that_cannot_bind_leaves_no_socket_open() -> None:
    import gc

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=str(port)):
            Simulator(build_parser().parse_args(["--port", str(port)]))
    # An unclosed control socket would warn here (an error under -W error).
    gc.collect()
