"""Fixtures of the Kubernetes discovery tests: a fake API server on
loopback (started and stopped here), a kubeconfig pointing at it, and a
recording stand-in for the reconciler."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .fake_apiserver import FakeApiServer

pytest.importorskip("kubernetes", reason="the kubernetes client is in the test extra")

DEADLINE = 15.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Recorder:
    """Stands in for the Reconciler: records every set the source hands
    over (the contract's ``replace`` and ``expect``)."""

    def __init__(self) -> None:
        self.sets: list[dict[str, Any]] = []
        self.expected: list[str] = []
        self._lock = threading.Lock()

    def expect(self, source: str) -> None:
        self.expected.append(source)

    def replace(self, source: str, publishers: Iterable[Any]) -> None:
        assert source == "kubernetes"
        with self._lock:
            self.sets.append({p.pod.name: p for p in publishers})

    @property
    def current(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.sets[-1]) if self.sets else {}

    def wait(self, what: str, check: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """The current set once ``check`` holds for it."""
        wait_for(what, lambda: self.sets and check(self.current))
        return self.current


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    return apiserver.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
