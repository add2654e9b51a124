"""``kvsync serve`` in a child process for the integration tests: started
on a free port (read from its "listening on" line), driven with
``kvsync.Client``, always stopped by the test that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kvsync
from kvsync.sim import SimProcess

START_TIMEOUT = 30.0


class Serve:
    def __init__(self, log: Path, *args: str, token: str | None = None) -> None:
        self.log = log
        self.token = token
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSYNC_")}
        if token is not None:
            env["KVSYNC_TOKEN"] = token
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvsync", "serve", "--port", "0", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        try:
            self.url = self._wait_for_url()
        except BaseException:
            self.kill()
            raise
        self.client = kvsync.Client(self.url, token=token, timeout=10.0)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].strip()
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"kvsync serve exited with {self.proc.returncode}: {self.output()}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"kvsync serve did not listen within {START_TIMEOUT} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM; the exit status (killed and an error past ``timeout``)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"kvsync serve did not exit within {timeout} s after SIGTERM"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if hasattr(self, "client"):
            self.client.close()


def pods_file(path: Path, pods: dict[str, tuple[SimProcess, int]], model: str) -> Path:
    """A static pods file following ``{name: (simulator, dp_size)}``."""
    entries: list[dict[str, Any]] = [
        {
            "name": name,
            "model": model,
            "host": "127.0.0.1",
            "pub_port": sim.pub_port,
            "replay_port": sim.replay_port,
            "dp_size": dp,
        }
        for name, (sim, dp) in pods.items()
    ]
    path.write_text(json.dumps({"pods": entries}))
    return path
