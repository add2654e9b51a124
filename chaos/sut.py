"""The system under test, behind one small adapter: what a scenario needs
from kvsync is to start it on a set of engines, ask it what each worker
holds for a prompt (``POST /query``, Mooncake shape) and in which state
each worker is (``GET /v1/workers``), and to signal its process.

- ``LibrarySUT``: ``kvsync.EventManager`` + ``kvsync.Index`` in a child
  process (``chaos.library_sut``), with the timing knobs a short scenario
  needs. Every scenario runs against it.
- ``ServeSUT``: ``kvsync serve`` itself, from a TOML config with a static
  pods file and a snapshot path; ``serve_available`` says whether this
  checkout has it (scenarios that need it skip with that message).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from chaos.engines import PUB_PORT, REPLAY_PORT

MODEL = "chaos-model"
_PR_SET_PDEATHSIG = 1
REPO = Path(__file__).resolve().parent.parent


def pod_json(name: str, host: str, replay: bool = True) -> dict[str, Any]:
    """A static pod entry (SPEC section 6) for an engine at ``host``."""
    return {
        "name": name,
        "model": MODEL,
        "host": host,
        "pub_port": PUB_PORT,
        "replay_port": REPLAY_PORT if replay else None,
    }


class _HttpSUT:
    """What both adapters share: an HTTP API on loopback in a child process."""

    name = "sut"
    proc: subprocess.Popen[str] | None = None
    port = 0

    def start(self) -> _HttpSUT:
        raise NotImplementedError

    def _http(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def query(self, model: str, token_ids: list[int]) -> dict[str, int]:
        """Matched prefix tokens per instance (``longest_matched``)."""
        ans = self._http("POST", "/query", {"model": model, "token_ids": token_ids})
        out: dict[str, int] = {}
        for instances in ans.values():
            for inst, v in instances.items():
                out[inst] = int(v["longest_matched"])
        return out

    def workers(self) -> dict[str, dict[str, Any]]:
        ans: dict[str, dict[str, Any]] = self._http("GET", "/v1/workers")
        return ans

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def rss_bytes(self) -> int:
        """Resident memory of the process now (0 when it is not running)."""
        if not self.alive:
            return 0
        assert self.proc is not None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) * 1024 if m else 0

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.kill()


def _read_line(stream: Any, timeout: float, what: str, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line: str = stream.readline()
        if not line:
            raise RuntimeError(f"{what} exited with status {proc.wait(5)} before it was ready")
        return line
    raise TimeoutError(f"{what} was not ready within {timeout} s")


class LibrarySUT(_HttpSUT):
    """``EventManager`` + ``Index`` in a child process; ``manager`` are the
    ``EventManager`` keyword arguments (short timings for short scenarios)."""

    name = "library"

    def __init__(
        self,
        pods: list[dict[str, Any]],
        block_size: int,
        manager: dict[str, Any],
        log: Path | None = None,
    ) -> None:
        self.log = log
        self.pods = pods
        self.block_size = block_size
        self.manager = manager

    def start(self) -> LibrarySUT:
        cfg = {
            "pods": self.pods,
            "manager": self.manager,
            "block_size": self.block_size,
        }
        log = open(os.devnull if self.log is None else self.log, "a")  # noqa: SIM115
        with log:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chaos.library_sut", json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
            )
        try:
            line = _read_line(self.proc.stdout, 60.0, "the library SUT", self.proc)
            self.port = json.loads(line)["port"]
        except BaseException:
            self.kill()
            raise
        return self


def serve_available() -> str | None:
    """``None`` when ``kvsync serve`` exists in this checkout, else why not."""
    if importlib.util.find_spec("kvsync.service") is None:
        return "`kvsync serve` is not in this checkout yet (no module kvsync.service)"
    return None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ServeSUT(_HttpSUT):
    """``kvsync serve`` in a child process: a TOML config in ``workdir``
    with a static pods file and a snapshot path (kept across ``kill`` and
    ``start``, so a restart resumes from the snapshot)."""

    name = "serve"

    def __init__(
        self, pods: list[dict[str, Any]], workdir: Path, snapshot_interval: float = 1.0
    ) -> None:
        self.workdir = workdir
        self.snapshot = workdir / "index.snapshot"
        self.config = workdir / "kvsync.toml"
        pods_file = workdir / "pods.json"
        pods_file.write_text(json.dumps({"pods": pods}))
        self.config.write_text(
            f'host = "127.0.0.1"\nport = 0\npods = "{pods_file}"\n'
            f'snapshot = "{self.snapshot}"\nsnapshot_interval = {snapshot_interval}\n'
            'log_level = "warning"\n'
        )
        self.stderr_path = workdir / "serve.stderr"

    def start(self) -> ServeSUT:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvsync", "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.workdir,
            # kvsync serve does not watch its parent: the kernel kills it
            # if the test process dies before its teardown
            preexec_fn=_die_with_parent,
        )
        try:
            deadline = time.monotonic() + 60.0
            while True:
                left = deadline - time.monotonic()
                line = _read_line(self.proc.stderr, max(0.1, left), "kvsync serve", self.proc)
                m = re.search(r"listening on http://[^:]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("kvsync serve did not announce its port within 60 s")
        except BaseException:
            self.kill()
            raise
        # Nobody reads stderr from here on: hand it to a file-less drain so a
        # chatty log can never block the service on a full pipe.
        import threading

        stderr = self.proc.stderr

        def drain() -> None:
            assert stderr is not None
            with open(self.stderr_path, "a") as f:
                for chunk in iter(stderr.readline, ""):
                    f.write(chunk)

        threading.Thread(target=drain, daemon=True).start()
        return self

    def query(self, model: str, token_ids: list[int]) -> dict[str, int]:
        try:
            return super().query(model, token_ids)
        except urllib.error.HTTPError as e:
            if e.code == 404:  # no worker serves the model (yet)
                return {}
            raise


class KubeServeSUT(ServeSUT):
    """``kvsync serve`` finding the engines through its Kubernetes source:
    each engine is a Running, Ready pod on the protocol-level fake API
    server of ``tests/kube`` (list/watch, bookmarks, 410, outages), which
    lives as long as this adapter so that scenarios can drop its watches or
    take it down."""

    name = "serve-kube"

    def __init__(self, pods: list[dict[str, Any]], workdir: Path) -> None:
        from tests.kube.fake_apiserver import FakeApiServer

        super().__init__([], workdir)
        self.apiserver = FakeApiServer().start()
        for p in pods:
            self.apiserver.put(self.pod_object(p))
        kubeconfig = self.apiserver.kubeconfig(workdir / "kubeconfig")
        self.config.write_text(
            f'host = "127.0.0.1"\nport = 0\nsnapshot = "{self.snapshot}"\n'
            'snapshot_interval = 1.0\nlog_level = "warning"\n'
            f'[kubernetes]\nkubeconfig = "{kubeconfig}"\nnamespace = "default"\n'
        )

    @staticmethod
    def pod_object(p: dict[str, Any]) -> dict[str, Any]:
        """The engine's static entry as a labelled, annotated pod."""
        from tests.kube.fake_apiserver import pod

        replay = p.get("replay_port")
        return pod(
            p["name"],
            ip=p["host"],
            labels={"kvsync.io/kv-events": "true", "kvsync.io/model": p["model"]},
            annotations={
                "kvsync.io/kv-events-port": str(p["pub_port"]),
                "kvsync.io/kv-replay-port": "none" if replay is None else str(replay),
            },
        )

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.apiserver.close()
