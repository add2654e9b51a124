"""The static discovery source: a pods file (JSON or YAML) listing the
engine pods to follow, re-read when it changes (SPEC section 6).

```yaml
pods:
  - {name: pod-a, model: llama, host: 10.0.0.7, pub_port: 5557, replay_port: 5558,
     dp_size: 1, topic: ""}
```

Only ``name``, ``model`` and ``host`` are required; the other fields
default as in ``kvsync.Pod``. A file that cannot be read or has a bad entry
is reported (logged, counted in ``errors``, described in ``last_error``)
and the previously applied set stays followed: a half-written file must not
make the fleet disappear.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from kvsync._pod import Pod
from kvsync.discovery.reconciler import Publisher, Reconciler

__all__ = ["StaticFileError", "StaticSource", "parse_file", "parse_pods", "read_pods"]

log = logging.getLogger("kvsync.discovery.static")

FIELDS = ("name", "model", "host", "pub_port", "replay_port", "dp_size", "topic")
REQUIRED = ("name", "model", "host")
MAX_PORT = 65535
# A file modified this recently may change again without its stat changing.
RACY_SECONDS = 2.0


class StaticFileError(ValueError):
    """A pods file that cannot be used; the message names the file, the
    entry and the field."""


class StaticSource:
    """Follows the pods listed in ``path`` through ``reconciler`` (source
    ``"static"``). ``load_once`` reads the file now; ``start`` polls it
    every ``interval`` seconds (inode, size and modification time) from a
    background thread and re-reads it when it changed.

    ``errors`` counts the failed loads, ``last_error`` describes the current
    problem (None once a load succeeds), ``pods`` is the number of static
    pods followed: what the ``kvsync_discovery_*`` metrics report."""

    def __init__(
        self, path: str | os.PathLike[str], reconciler: Reconciler, *, interval: float = 1.0
    ) -> None:
        if not interval > 0:
            raise ValueError(f"StaticSource interval must be > 0 s, got {interval}")
        self.path = Path(path)
        self.reconciler = reconciler
        self.interval = interval
        self.errors = 0
        self.last_error: str | None = None
        self.pods = 0
        self._seen: tuple[int, int, int, int] | None = None
        self._attempted = False
        self._digest: bytes | None = None
        self._lock = threading.Lock()  # one load at a time
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        reconciler.expect("static")

    def load_once(self) -> bool:
        """Read the file and apply its set now; True if the set was applied."""
        with self._lock:
            self._attempted = True
            self._seen = self._signature()
            try:
                data = self.path.read_bytes()
            except OSError as e:
                self._digest = None
                self._fail(f"{self.path}: cannot read the pods file: {e.strerror or e}")
                return False
            self._digest = hashlib.sha256(data).digest()
            try:
                publishers = parse_file(data, self.path)
                changes = self.reconciler.replace("static", publishers)
            except ValueError as e:
                self._fail(str(e) if isinstance(e, StaticFileError) else f"{self.path}: {e}")
                return False
            self.pods = self.reconciler.counts()["static"]
            if changes.failed:
                why = "; ".join(f"pod {n!r}: {e}" for n, e in changes.failed.items())
                self._fail(f"{self.path}: not followed: {why}")
            else:
                self.last_error = None
            return True

    def poll(self) -> bool:
        """Load the file if it changed since the last load; True if a new
        set was applied."""
        sig = self._signature()
        if not self._attempted or sig is None or self._digest is None:
            # Never read, gone, or unreadable last time: load if the stat moved.
            if self._attempted and sig == self._seen:
                return False
            return self.load_once()
        if sig == self._seen and time.time() - sig[3] / 1e9 > RACY_SECONDS:
            return False
        # Changed, or modified so recently that a second write within the
        # clock's granularity would keep the same stat: compare contents.
        try:
            same = hashlib.sha256(self.path.read_bytes()).digest() == self._digest
        except OSError:
            same = False
        if same:
            self._seen = sig
            return False
        return self.load_once()

    def start(self) -> None:
        """Load the file, then poll it from a background thread."""
        if self._thread is not None:
            raise RuntimeError("StaticSource already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="kvsync-static", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"static pods file poller did not stop within {timeout} s")

    # ------------------------------------------------------------ internals

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # a bug must not end the polling
                log.exception("static pods file %s: unexpected error", self.path)
            if self._stopping.wait(self.interval):
                return

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        log.error("%s (keeping the %d static pods followed before)", message, self.pods)


def read_pods(path: str | os.PathLike[str]) -> list[Publisher]:
    """The publishers listed in a pods file."""
    p = Path(path)
    return parse_file(p.read_bytes(), p)


def parse_file(data: bytes, path: Path) -> list[Publisher]:
    """The publishers in the contents of pods file ``path``: JSON when its
    name ends in ``.json``, else YAML (which also reads JSON)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StaticFileError(f"{path}: not UTF-8 text ({e})") from e
    if not text.strip():
        raise StaticFileError(f"{path}: the file is empty (expected a 'pods' list)")
    is_json = path.suffix.lower() == ".json"
    try:
        doc = json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise StaticFileError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {e}") from e
    return parse_pods(doc, str(path))


def parse_pods(data: Any, where: str = "pods file") -> list[Publisher]:
    """Validate the parsed document ``{"pods": [...]}``; errors name
    ``where``, the entry and the field."""
    if not isinstance(data, dict):
        raise StaticFileError(
            f"{where}: expected a mapping with a 'pods' list, got {type(data).__name__}"
        )
    unknown = sorted(str(k) for k in data if k != "pods")
    if unknown:
        raise StaticFileError(f"{where}: unknown top-level key {unknown[0]!r} (only 'pods')")
    if "pods" not in data:
        raise StaticFileError(f"{where}: missing the 'pods' list")
    entries = data["pods"]
    if not isinstance(entries, list):
        raise StaticFileError(f"{where}: 'pods' must be a list, got {type(entries).__name__}")
    seen: dict[str, int] = {}
    out: list[Publisher] = []
    for i, raw in enumerate(entries):
        pod = _pod(i, raw, where)
        if pod.name in seen:
            raise StaticFileError(
                f"{where}: pods[{i}] ({pod.name!r}): name already used by pods[{seen[pod.name]}]"
            )
        seen[pod.name] = i
        out.append(Publisher(pod=pod, source="static", instance=pod.name))
    return out


def _pod(i: int, raw: Any, where: str) -> Pod:
    label = f"{where}: pods[{i}]"
    if not isinstance(raw, dict):
        raise StaticFileError(f"{label}: expected a mapping of pod fields, got {raw!r}")
    if isinstance(raw.get("name"), str):
        label += f" ({raw['name']!r})"
    for key in raw:
        if key not in FIELDS:
            raise StaticFileError(f"{label}: unknown field {key!r} (known: {', '.join(FIELDS)})")
    for key in REQUIRED:
        if key not in raw:
            raise StaticFileError(f"{label}: field {key!r} is required")
        if not isinstance(raw[key], str) or not raw[key]:
            raise StaticFileError(
                f"{label}: field {key!r} must be a non-empty string, got {raw[key]!r}"
            )
    fields: dict[str, Any] = {key: raw[key] for key in REQUIRED}
    dp_size = raw.get("dp_size", 1)
    if not _is_int(dp_size) or dp_size < 1:
        raise StaticFileError(f"{label}: field 'dp_size' must be an integer >= 1, got {dp_size!r}")
    fields["dp_size"] = dp_size
    for key in ("pub_port", "replay_port"):
        if key not in raw:
            continue
        value = raw[key]
        if key == "replay_port" and (value is None or value == "none"):
            fields[key] = None
            continue
        if not _is_int(value) or not 0 < value <= MAX_PORT:
            extra = " or null" if key == "replay_port" else ""
            raise StaticFileError(
                f"{label}: field {key!r} must be a port 1..{MAX_PORT}{extra}, got {value!r}"
            )
        if value + dp_size - 1 > MAX_PORT:
            raise StaticFileError(
                f"{label}: field {key!r}: {dp_size} ranks need ports {value}.."
                f"{value + dp_size - 1}, past {MAX_PORT}"
            )
        fields[key] = value
    if raw.get("topic") is not None:  # null: the EventManager's topic
        if not isinstance(raw["topic"], str):
            raise StaticFileError(
                f"{label}: field 'topic' must be a string or null, got {raw['topic']!r}"
            )
        fields["topic"] = raw["topic"]
    try:
        return Pod(**fields)
    except (TypeError, ValueError) as e:
        raise StaticFileError(f"{label}: {e}") from e


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
