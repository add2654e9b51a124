"""``kvsync serve`` in a child process, for tests, benchmarks and tools:
started on a free port (``--port 0``; the URL is read from its "listening
on" line), its stderr in a log file, always stopped by its owner. The
service's counterpart of :class:`kvsync.simproc.SimProcess`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["ServeProcess"]


class ServeProcess:
    """``python -m kvsync serve --port 0 *args`` with stderr in ``log``.

    ``KVSYNC_*`` variables of this process are not passed on (settings come
    from ``args`` and ``env``). Raises ``RuntimeError`` with the log when
    the service exits before listening, ``TimeoutError`` when it does not
    listen within ``start_timeout`` seconds; the child is killed either way.
    """

    def __init__(
        self,
        log: Path,
        *args: str,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.log = log
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSYNC_")}
        child_env.update(env or {})
        self.started = time.monotonic()
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvsync", "serve", "--port", "0", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env,
                start_new_session=True,
            )
        try:
            self.url = self._wait_for_url(start_timeout)
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].strip()
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"kvsync serve exited with {self.proc.returncode}: {self.output()[-4000:]}"
                )
            time.sleep(0.01)
        raise TimeoutError(
            f"kvsync serve did not listen within {timeout} s: {self.output()[-4000:]}"
        )

    def output(self) -> str:
        """What the service logged so far."""
        return self.log.read_text()

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM (a clean shutdown: the snapshot is saved); the exit
        status. Killed, and ``TimeoutError`` raised, past ``timeout``."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"kvsync serve did not exit within {timeout} s after SIGTERM"
            ) from None

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is saved), and reap the process."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
