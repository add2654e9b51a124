"""A small Kubernetes API server for pods, on loopback, that speaks the
real list/watch wire protocol, so that tests drive the official client
without a cluster.

- ``GET /api/v1/namespaces/{ns}/pods`` and ``GET /api/v1/pods``, with
  ``labelSelector`` (equality, inequality, existence), as a ``PodList``
  carrying the store's resourceVersion;
- the same with ``watch=true``: a chunked stream of JSON lines
  ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`` from
  ``resourceVersion``; an object that stops (starts) matching the selector
  comes as DELETED (ADDED), as from a real server's watch cache; a version
  older than the compaction horizon gets an ERROR event with a ``Status``
  of code 410; the stream ends after ``timeoutSeconds`` (or the server's
  own ``max_watch_seconds``); bookmarks carry only a resourceVersion and go
  to watches that asked for them (``allowWatchBookmarks``).

The test side changes the store (``put``, ``patch``, ``delete``), sends
bookmarks, compacts the history, drops open watches abruptly and switches
an outage on (every connection is closed without an answer) and off.
Every request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import copy
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]


def pod(
    name: str,
    *,
    namespace: str = "default",
    ip: str | None = "10.1.0.1",
    phase: str = "Running",
    ready: bool = True,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    restarts: int = 0,
    node: str | None = "node-1",
) -> Obj:
    """A pod object as the API server stores it (JSON form)."""
    if labels is None:
        labels = {"kvsync.io/kv-events": "true", "kvsync.io/model": "llama"}
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [
            {
                "name": "engine",
                "image": "engine:1",
                "imageID": "engine@sha256:0",
                "restartCount": restarts,
                "ready": ready,
            }
        ],
    }
    if ip is not None:
        status["podIP"] = ip
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "labels": dict(labels),
            "annotations": dict(annotations or {}),
        },
        "spec": {"containers": [{"name": "engine", "image": "engine"}], "nodeName": node},
        "status": status,
    }


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``,
    ``!k``, comma-separated (all must hold)."""
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            k, v = (x.strip() for x in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class Change:
    version: int
    old: Obj | None
    new: Obj | None  # None: deleted


@dataclass
class Request:
    path: str
    query: dict[str, str]


class FakeApiServer:
    """The store, its history and the HTTP server (see the module doc)."""

    def __init__(self, token: str = "fake-token") -> None:
        self.token = token
        self.max_watch_seconds: float | None = None
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._pods: dict[tuple[str, str], Obj] = {}
        self._history: list[Change] = []
        self._version = 100
        self._horizon = 100  # watches from before this version get 410
        self._bookmarks = 0  # bookmark generation
        self._drops = 0  # drop generation
        self._outage = False
        self._closing = False
        self._open_watches = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
        assert not self._thread.is_alive(), "fake API server did not stop"

    def kubeconfig(self, path: Path, namespace: str | None = None) -> Path:
        """Write a kubeconfig file pointing at this server."""
        context: Obj = {"cluster": "fake", "user": "fake"}
        if namespace is not None:
            context["namespace"] = namespace
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": self.token}}],
                    "contexts": [{"name": "fake", "context": context}],
                    "current-context": "fake",
                }
            )
        )
        return path

    # ------------------------------------------------------------- the store

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def put(self, obj: Obj) -> Obj:
        """Create or replace a pod (ADDED or MODIFIED)."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._cond:
            self._commit(key, copy.deepcopy(obj))
            return copy.deepcopy(self._pods[key])

    def patch(self, name: str, change: Callable[[Obj], None], namespace: str = "default") -> Obj:
        """Change a pod in place (MODIFIED)."""
        with self._cond:
            obj = copy.deepcopy(self._pods[(namespace, name)])
            change(obj)
            self._commit((namespace, name), obj)
            return copy.deepcopy(obj)

    def delete(self, name: str, namespace: str = "default", *, graceful: bool = True) -> None:
        """Delete a pod as a real server does: a graceful delete of a pod
        bound to a node only sets its deletionTimestamp (MODIFIED); the
        kubelet's final delete (``graceful=False``) removes it (DELETED)."""
        with self._cond:
            obj = copy.deepcopy(self._pods[(namespace, name)])
            if graceful and obj["spec"].get("nodeName"):
                obj["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
                obj["metadata"]["deletionGracePeriodSeconds"] = 30
                self._commit((namespace, name), obj)
            else:
                self._commit((namespace, name), None)

    def _commit(self, key: tuple[str, str], new: Obj | None) -> None:
        self._version += 1
        old = self._pods.get(key)
        if new is None:
            assert old is not None
            gone = copy.deepcopy(self._pods.pop(key))
            gone["metadata"]["resourceVersion"] = str(self._version)
            self._history.append(Change(self._version, gone, None))
        else:
            new["metadata"]["resourceVersion"] = str(self._version)
            new["metadata"].setdefault("creationTimestamp", "2026-12-01T00:00:00Z")
            self._pods[key] = new
            self._history.append(Change(self._version, old, copy.deepcopy(new)))
        self._cond.notify_all()

    # -------------------------------------------------------- the switches

    def compact(self) -> None:
        """Forget the history: a watch from any earlier version gets 410."""
        with self._cond:
            self._horizon = self._version
            self._history.clear()

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current version to every open watch
        that allows bookmarks."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch abruptly (no end of the chunked stream)."""
        with self._cond:
            self._drops += 1
            self._cond.notify_all()

    def set_outage(self, on: bool) -> None:
        """While on, every connection is closed without an answer and the
        open watches are cut."""
        with self._cond:
            self._outage = on
            if on:
                self._drops += 1
            self._cond.notify_all()

    @contextmanager
    def outage(self) -> Iterator[None]:
        self.set_outage(True)
        try:
            yield
        finally:
            self.set_outage(False)

    def watches(self, **match: str) -> list[Request]:
        """The watch requests received, with query parameters ``match``."""
        with self._cond:
            return [
                r
                for r in self.requests
                if r.query.get("watch") == "true"
                and all(r.query.get(k) == v for k, v in match.items())
            ]

    @property
    def open_watches(self) -> int:
        with self._cond:
            return self._open_watches

    # ------------------------------------------------------------ serving

    def _selected(self, namespace: str | None, selector: str, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if namespace is not None and meta["namespace"] != namespace:
            return False
        return selector_matches(selector, meta.get("labels") or {})

    def _list(self, namespace: str | None, selector: str) -> Obj:
        with self._cond:
            items = [
                copy.deepcopy(o)
                for k, o in sorted(self._pods.items())
                if self._selected(namespace, selector, o)
            ]
            return {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._version)},
                "items": items,
            }

    def _events_after(self, cursor: int, namespace: str | None, selector: str) -> list[Obj]:
        """Watch events of the changes after version ``cursor`` (lock held)."""
        out: list[Obj] = []
        for ch in self._history:
            if ch.version <= cursor:
                continue
            was = self._selected(namespace, selector, ch.old)
            now = self._selected(namespace, selector, ch.new)
            if ch.new is None:
                if was:
                    out.append({"type": "DELETED", "object": copy.deepcopy(ch.old)})
            elif now:
                kind = "MODIFIED" if was else "ADDED"
                out.append({"type": kind, "object": copy.deepcopy(ch.new)})
            elif was:
                # No longer selected: a real watch reports it gone.
                out.append({"type": "DELETED", "object": copy.deepcopy(ch.new)})
        return out

    def _serve_watch(
        self, h: BaseHTTPRequestHandler, namespace: str | None, q: dict[str, str]
    ) -> None:
        selector = q.get("labelSelector", "")
        bookmarks = q.get("allowWatchBookmarks") == "true"
        timeout = float(q.get("timeoutSeconds") or 1800)
        if self.max_watch_seconds is not None:
            timeout = min(timeout, self.max_watch_seconds)
        deadline = time.monotonic() + timeout
        rv = q.get("resourceVersion", "")
        _start_chunked(h)
        with self._cond:
            drops, marks = self._drops, self._bookmarks
            self._open_watches += 1
            if rv in ("", "0"):
                cursor = self._version
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for _, o in sorted(self._pods.items())
                    if self._selected(namespace, selector, o)
                ]
            elif int(rv) < self._horizon:
                initial = [_gone(int(rv), self._horizon)]
                deadline = 0  # the stream ends after the error
                cursor = self._version
            else:
                cursor = int(rv)
                initial = []
        try:
            _send_events(h, initial)
            while True:
                if _client_gone(h):
                    return
                with self._cond:
                    now = time.monotonic()
                    events = self._events_after(cursor, namespace, selector)
                    cursor = self._version
                    if (
                        not events
                        and self._drops == drops
                        and self._bookmarks == marks
                        and not self._closing
                        and now < deadline
                    ):
                        self._cond.wait(min(deadline - now, 0.5))
                        continue
                    dropped = self._drops != drops or self._closing
                    bookmark = bookmarks and self._bookmarks != marks
                    marks = self._bookmarks
                    version = self._version
                if dropped:
                    # Abruptly: the client sees the stream cut, not ended.
                    h.connection.shutdown(socket.SHUT_RDWR)
                    h.close_connection = True
                    return
                if bookmark:
                    events.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": "Pod",
                                "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(version)},
                            },
                        }
                    )
                _send_events(h, events)
                if time.monotonic() >= deadline:
                    h.wfile.write(b"0\r\n\r\n")
                    h.wfile.flush()
                    return
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._open_watches -= 1


def _client_gone(h: BaseHTTPRequestHandler) -> bool:
    """The client closed its end (a stopped watch): nothing to read but EOF."""
    ready, _, _ = select.select([h.connection], [], [], 0)
    if not ready:
        return False
    try:
        return h.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _gone(asked: int, horizon: int) -> Obj:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {asked} ({horizon})",
            "reason": "Expired",
            "code": 410,
        },
    }


def _start_chunked(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.flush()


def _send_events(h: BaseHTTPRequestHandler, events: list[Obj]) -> None:
    for ev in events:
        data = json.dumps(ev).encode() + b"\n"
        h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    if events:
        h.wfile.flush()


def _handler(server: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows the test's own output

        def do_GET(self) -> None:
            with server._cond:
                outage = server._outage
            if outage:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            url = urlsplit(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            for flag in ("watch", "allowWatchBookmarks"):
                if flag in q:  # Go's ParseBool: older clients send "True"
                    q[flag] = q[flag].lower()
            with server._cond:
                server.requests.append(Request(url.path, q))
            if self.headers.get("Authorization") != f"Bearer {server.token}":
                return self._status(401, "Unauthorized", "no or wrong bearer token")
            parts = url.path.strip("/").split("/")
            if parts == ["api", "v1", "pods"]:
                namespace = None
            elif (
                len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods"
            ):
                namespace = parts[3]
            else:
                return self._status(404, "NotFound", f"the fake serves pods only, not {url.path}")
            if q.get("watch") == "true":
                return server._serve_watch(self, namespace, q)
            body = json.dumps(server._list(namespace, q.get("labelSelector", ""))).encode()
            self._send(200, body)

        def _status(self, code: int, reason: str, message: str) -> None:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            }
            self._send(code, json.dumps(status).encode())

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
