"""``kvsync serve`` in a child process for the integration tests: started
on a free port (read from its "listening on" line), driven with
``kvsync.Client``, always stopped by the test that started it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kvsync
from kvsync.service.process import ServeProcess
from kvsync.sim import SimProcess

START_TIMEOUT = 30.0


class Serve(ServeProcess):
    """The service with a ``kvsync.Client`` on it (``token``: the API token
    both are given)."""

    def __init__(self, log: Path, *args: str, token: str | None = None) -> None:
        env = {} if token is None else {"KVSYNC_TOKEN": token}
        super().__init__(log, *args, env=env, start_timeout=START_TIMEOUT)
        self.token = token
        self.client = kvsync.Client(self.url, token=token, timeout=10.0)

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
