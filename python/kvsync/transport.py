"""ZeroMQ transport: follow every engine of a fleet into one index.

One I/O thread serves all pods with a single poller. Per worker (a pod, or
one data-parallel rank of it) it keeps a SUB socket on the engine's PUB port
and, when the engine has one, a DEALER on its replay port. What arrives goes
to the stream state machines in Rust (``kvsync._core.Streams``), which apply
payloads to the index as received bytes and answer with the replay to
request, if any. Each replay request goes out on a fresh DEALER, so late
replies to an abandoned request can never be mistaken for new ones.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvsync._core import Index, Streams, WorkerStatus

log = logging.getLogger("kvsync.transport")

END_SEQ = b"\xff" * 8
_MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


@dataclass(frozen=True)
class Pod:
    """An engine pod. Rank ``r`` of ``dp_size`` listens on ``pub_port + r``
    (and ``replay_port + r``); ``replay_port=None`` means no replay endpoint."""

    name: str
    model: str
    host: str
    pub_port: int = 5557
    replay_port: int | None = 5558
    dp_size: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Pod.name must not be empty")
        if not self.model:
            raise ValueError("Pod.model must not be empty")
        if self.dp_size < 1:
            raise ValueError(f"Pod.dp_size must be >= 1, got {self.dp_size}")
        for port in (self.pub_port, self.replay_port):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")

    def workers(self) -> list[tuple[str, int]]:
        """``(worker_id, rank)``: the pod name when dp_size == 1, else
        ``f"{name}/dp{rank}"``."""
        if self.dp_size == 1:
            return [(self.name, 0)]
        return [(f"{self.name}/dp{r}", r) for r in range(self.dp_size)]

    def endpoint(self, port: int, rank: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port + rank}"


class _Worker:
    """Sockets of one worker; touched only by the I/O thread."""

    def __init__(self, wid: str, pod: Pod, rank: int) -> None:
        self.wid = wid
        self.pod = pod
        self.rank = rank
        self.sub: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.dealer: zmq.Socket[bytes] | None = None
        self.connected_once = False
        self.disconnected = False


class EventManager:
    """Follows engines' KV event streams into ``index`` (SPEC section 3).

    ``add_pod``/``remove_pod`` may be called from any thread, before or
    after ``start``; ``remove_pod`` returns once the pod's holdings are
    purged. Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(
        self,
        index: Index,
        topic: str = "",
        *,
        replay_timeout: float = 2.0,
        clean_secs: float = 10.0,
        max_buffered: int = 100_000,
        poll_ms: int = 50,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.index = index
        self.topic = topic.encode()
        self.replay_timeout = replay_timeout
        self.clean_secs = clean_secs
        self.max_buffered = max_buffered
        self.poll_ms = poll_ms
        self._ctx = context or zmq.Context.instance()
        self._streams = Streams(index)
        self._pods: dict[str, Pod] = {}
        self._workers: dict[str, _Worker] = {}
        self._by_socket: dict[zmq.Socket[bytes], tuple[str, _Worker]] = {}
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._wake_addr = f"inproc://kvsync-wake-{id(self)}"
        self._wake_send: zmq.Socket[bytes] | None = None
        self._wake_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._error: BaseException | None = None

    # ------------------------------------------------------------ public

    def add_pod(self, pod: Pod) -> None:
        """Follow ``pod``. Adding a pod again with another host or ports
        purges it and follows the new address."""
        self._call(lambda: self._add_pod(pod))

    def remove_pod(self, name: str) -> None:
        """Stop following pod ``name``; returns once its holdings are purged."""
        self._call(lambda: self._remove_pod(name))

    def status(self) -> dict[str, WorkerStatus]:
        """``{worker_id: WorkerStatus}`` (state, last_seq, batches, events,
        gaps, replays, lost_batches, resets, malformed, seconds since the
        last event, ...)."""
        return dict(self._streams.status(time.monotonic()))

    def pods(self) -> dict[str, Pod]:
        return dict(self._pods)

    def start(self) -> EventManager:
        if self._thread is not None:
            raise RuntimeError("EventManager already started")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="kvsync-io", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("kvsync I/O thread did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the I/O thread and close every socket. Holdings stay in the
        index (save it, or remove pods first to purge them)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"kvsync I/O thread did not stop within {timeout} s")
        self._thread = None
        if self._wake_send is not None:
            self._wake_send.close(linger=0)
            self._wake_send = None
        for wid in self._streams.workers():
            self._streams.stop(wid)

    def __enter__(self) -> EventManager:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------- command plumbing

    def _call(self, fn: Callable[[], None], timeout: float = 30.0) -> None:
        if self._thread is None:
            fn()  # not running: sockets are created on start
            return
        done = threading.Event()
        self._commands.put((fn, done))
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError("kvsync I/O thread did not answer")
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_send is None:
                self._wake_send = self._ctx.socket(zmq.PUSH)
                self._wake_send.connect(self._wake_addr)
            with contextlib.suppress(zmq.Again):
                self._wake_send.send(b"", zmq.NOBLOCK)

    # ---------------------------------------------------- I/O thread side

    def _add_pod(self, pod: Pod) -> None:
        old = self._pods.get(pod.name)
        if old is not None:
            if old == pod:
                return
            self._remove_pod(pod.name)
        self._pods[pod.name] = pod
        for wid, rank in pod.workers():
            w = _Worker(wid, pod, rank)
            self._workers[wid] = w
            self._streams.add(
                wid,
                pod.model,
                replay=pod.replay_port is not None,
                replay_timeout=self.replay_timeout,
                clean_secs=self.clean_secs,
                max_buffered=self.max_buffered,
            )
            if self._thread is not None:
                self._open(w)

    def _remove_pod(self, name: str) -> None:
        pod = self._pods.pop(name, None)
        if pod is None:
            raise KeyError(f"unknown pod {name!r}")
        for wid, _ in pod.workers():
            w = self._workers.pop(wid, None)
            if w is not None:
                self._close(w)
            self._streams.remove(wid)

    def _open(self, w: _Worker) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 0)
        # A steady 100 ms retry (no exponential back-off): a restarted engine
        # is reconnected to, and probed, within ~0.1 s of binding again.
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        w.monitor = sub.get_monitor_socket(_MONITOR_EVENTS)
        sub.connect(w.pod.endpoint(w.pod.pub_port, w.rank))
        w.sub = sub
        self._poller.register(sub, zmq.POLLIN)
        self._poller.register(w.monitor, zmq.POLLIN)
        self._by_socket[sub] = ("sub", w)
        self._by_socket[w.monitor] = ("monitor", w)

    def _close(self, w: _Worker) -> None:
        for sock in (w.sub, w.monitor, w.dealer):
            if sock is None:
                continue
            with contextlib.suppress(KeyError):
                self._poller.unregister(sock)
            self._by_socket.pop(sock, None)
        if w.sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                w.sub.disable_monitor()
        for sock in (w.monitor, w.sub, w.dealer):
            if sock is not None:
                sock.close(linger=0)
        w.sub = w.monitor = w.dealer = None

    def _request_replay(self, w: _Worker, start: int) -> None:
        if w.pod.replay_port is None:
            return
        if w.dealer is not None:
            self._poller.unregister(w.dealer)
            self._by_socket.pop(w.dealer, None)
            w.dealer.close(linger=0)
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 0)
        # No receive limit: a ROUTER drops what does not fit the pipe, and a
        # long replay must arrive whole (the pipe's room is the sum of both
        # sides' high-water marks).
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.connect(w.pod.endpoint(w.pod.replay_port, w.rank))
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        w.dealer = dealer
        self._poller.register(dealer, zmq.POLLIN)
        self._by_socket[dealer] = ("dealer", w)
        log.debug("%s: replay requested from %d", w.wid, start)

    def _follow(self, w: _Worker, start: int | None) -> None:
        if start is not None:
            self._request_replay(w, start)

    def _run(self, ready: threading.Event) -> None:
        wake = self._ctx.socket(zmq.PULL)
        wake.bind(self._wake_addr)
        self._poller = zmq.Poller()
        self._poller.register(wake, zmq.POLLIN)
        try:
            for w in self._workers.values():
                self._open(w)
            ready.set()
            while not self._stopping.is_set():
                events = dict(self._poller.poll(self.poll_ms))
                now = time.monotonic()
                if wake in events:
                    self._drain(wake)
                    self._run_commands()
                for sock in list(events):
                    entry = self._by_socket.get(sock)
                    if entry is not None:
                        self._on_readable(entry[0], entry[1], now)
                for wid, start in self._streams.tick(time.monotonic()):
                    due = self._workers.get(wid)
                    if due is not None:
                        self._request_replay(due, start)
        except BaseException:
            log.exception("kvsync I/O thread failed")
            raise
        finally:
            for w in list(self._workers.values()):
                self._close(w)
            wake.close(linger=0)
            self._run_commands()

    @staticmethod
    def _drain(sock: zmq.Socket[bytes]) -> None:
        with contextlib.suppress(zmq.Again):
            while True:
                sock.recv(zmq.NOBLOCK)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except BaseException as e:
                self._error = e
            finally:
                done.set()

    def _on_readable(self, kind: str, w: _Worker, now: float) -> None:
        # One worker's trouble must not stop the others: log and go on.
        try:
            if kind == "sub":
                self._on_sub(w, now)
            elif kind == "dealer":
                self._on_dealer(w, now)
            else:
                self._on_monitor(w, now)
        except Exception:
            log.exception("%s: error while handling %s socket", w.wid, kind)

    def _frames(self, sock: zmq.Socket[bytes]) -> Iterator[list[bytes]]:
        """Drain what is queued, up to a bound so one busy engine cannot
        starve the others."""
        for _ in range(1024):
            try:
                yield sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _on_sub(self, w: _Worker, now: float) -> None:
        assert w.sub is not None
        # Everything queued for this worker goes to the index in one call.
        batch: list[tuple[bytes, bytes]] = []
        for frames in self._frames(w.sub):
            if len(frames) == 3:
                batch.append((frames[1], frames[2]))
            else:
                batch.append((b"", b""))  # counted as malformed
        if batch:
            self._follow(w, self._streams.live_many(w.wid, batch, now))

    def _on_dealer(self, w: _Worker, now: float) -> None:
        sock = w.dealer
        if sock is None:
            return
        for frames in self._frames(sock):
            if sock is not w.dealer:
                return  # a new request replaced this socket
            # vLLM <= 0.25: [b"", seq, payload]; >= 0.26: [b"", topic, seq, payload]
            if len(frames) == 3:
                seq, payload = frames[1], frames[2]
            elif len(frames) == 4:
                seq, payload = frames[2], frames[3]
            else:
                self._streams.replayed(w.wid, b"", b"", now)  # counted as malformed
                continue
            if seq == END_SEQ and not payload:
                start = self._streams.replay_end(w.wid, now)
                if start is None and w.dealer is sock:
                    self._poller.unregister(sock)
                    self._by_socket.pop(sock, None)
                    sock.close(linger=0)
                    w.dealer = None
                self._follow(w, start)
                return
            self._follow(w, self._streams.replayed(w.wid, seq, payload, now))

    def _on_monitor(self, w: _Worker, now: float) -> None:
        assert w.monitor is not None
        while True:
            try:
                msg = recv_monitor_message(w.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = msg["event"]
            if event == zmq.EVENT_DISCONNECTED:
                w.disconnected = True
                log.info("%s: publisher disconnected", w.wid)
            elif event == zmq.EVENT_CONNECTED:
                if not w.connected_once:
                    # Subscribed and connected: now fetch the history.
                    self._follow(w, self._streams.start(w.wid, now))
                elif w.disconnected:
                    log.info("%s: publisher reconnected, probing for a restart", w.wid)
                    self._follow(w, self._streams.reconnected(w.wid, now))
                w.connected_once = True
                w.disconnected = False
