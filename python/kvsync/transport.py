"""ZeroMQ transport: follow every engine of a fleet into one index.

One I/O thread serves all pods with a single poller. Per worker (a pod, or
one data-parallel rank of it) it keeps a SUB socket on the engine's PUB port
and, when the engine has one, a DEALER on its replay port. What arrives goes
to the stream state machines in Rust (``kvsync._core.Streams``), which apply
payloads to the index as received bytes and answer with the replay to
request, if any. Each replay request goes out on a fresh DEALER, so late
replies to an abandoned request can never be mistaken for new ones.

Connections carry ZMTP heartbeats, so an engine that dies without closing
its sockets (SIGKILL of a host, SIGSTOP, a network partition) is noticed
within ``heartbeat_timeout``; its worker is then ``disconnected`` and purged
after ``dead_after`` unless it comes back. Each SUB socket queues at most
``rcvhwm`` messages of at most ``max_message_bytes`` each: an engine that
publishes faster than the index ingests loses messages (reported as seq
gaps, then replayed or purged) instead of growing this process's memory.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvsync import _limits
from kvsync._commands import Commands
from kvsync._core import Index, Streams, WorkerStatus
from kvsync._limits import DescriptorLimitError
from kvsync._pod import Pod
from kvsync._readiness import Readiness
from kvsync._worker import SocketOptions, Worker

__all__ = ["END_SEQ", "DescriptorLimitError", "EventManager", "Pod"]

log = logging.getLogger("kvsync.transport")

END_SEQ = b"\xff" * 8
_ORDER = {"monitor": 0, "sub": 1, "dealer": 2}


class EventManager:
    """Follows engines' KV event streams into ``index`` (SPEC section 3).

    ``add_pod``/``remove_pod`` may be called from any thread, before or
    after ``start``; ``remove_pod`` returns once the pod's holdings are
    purged. Use as a context manager, or call ``start()`` and ``stop()``;
    a stopped manager may be started again.

    Liveness: ``heartbeat_ivl``/``heartbeat_timeout`` (seconds) are the ZMTP
    heartbeat period and the silence after which a connection is dropped;
    a worker whose publisher stays gone ``dead_after`` s is purged. A worker
    silent for ``idle_probe`` s is probed (then at doubling intervals) so a
    lost tail of a burst is found; a replay may last ``replay_max`` s in all.
    While a replay runs, live messages wait in a buffer of at most
    ``max_buffered`` messages and ``max_buffered_bytes`` bytes.

    Memory: each worker's SUB socket queues at most ``rcvhwm`` messages and
    refuses messages larger than ``max_message_bytes`` (the connection is
    dropped and made again), so the bytes queued for one worker stay below
    ``rcvhwm * max_message_bytes`` (in practice ``rcvhwm`` times the size of
    a typical batch, a few KiB). What does not fit is dropped by zmq and
    shows up as seq gaps (``dropped`` in ``status()``), which replay fills.

    Descriptors: unless ``context`` is given, the manager owns a zmq
    context whose socket limit follows ``RLIMIT_NOFILE``; ``start`` and
    ``add_pod`` fail with ``DescriptorLimitError`` (an ``OSError``) naming
    the limit when the fleet does not fit (about 6 descriptors per worker).
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
        heartbeat_ivl: float = 1.0,
        heartbeat_timeout: float = 3.0,
        dead_after: float = 10.0,
        idle_probe: float = 3.0,
        replay_max: float = 30.0,
        max_buffered_bytes: int = 256 << 20,
        rcvhwm: int = 10_000,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        if heartbeat_ivl <= 0 or heartbeat_timeout <= 0:
            raise ValueError(
                f"heartbeat_ivl and heartbeat_timeout must be > 0, got "
                f"{heartbeat_ivl} and {heartbeat_timeout}"
            )
        if rcvhwm < 1:
            raise ValueError(f"rcvhwm must be >= 1 (0 would mean unbounded), got {rcvhwm}")
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
        self.index = index
        self.topic = topic.encode()
        self.replay_timeout = replay_timeout
        self.clean_secs = clean_secs
        self.max_buffered = max_buffered
        self.poll_ms = poll_ms
        self.heartbeat_ivl = heartbeat_ivl
        self.heartbeat_timeout = heartbeat_timeout
        self.dead_after = dead_after
        self.idle_probe = idle_probe
        self.replay_max = replay_max
        self.max_buffered_bytes = max_buffered_bytes
        self.rcvhwm = rcvhwm
        self.max_message_bytes = max_message_bytes
        self._options = SocketOptions(
            topic=self.topic,
            heartbeat_ivl=heartbeat_ivl,
            heartbeat_timeout=heartbeat_timeout,
            rcvhwm=rcvhwm,
            max_message_bytes=max_message_bytes,
        )
        self._own_ctx = context is None
        self._ctx: zmq.Context[Any] | None = context
        self._streams = Streams(index)
        self._pods: dict[str, Pod] = {}
        self._workers: dict[str, Worker] = {}
        self._by_socket: dict[zmq.Socket[bytes], tuple[str, Worker]] = {}
        self._commands = Commands()
        self._lock = self._commands.lock
        self._io_running = False  # the I/O thread owns sockets (its side only)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = Readiness()
        # Workers whose publisher connection is down:
        # {worker_id: (when to connect again from scratch, the wait after that)}.
        self._down: dict[str, tuple[float, float]] = {}
        self._next_watch = 0.0
        # Called on the I/O thread with (worker, [(seq, payload), ...]) after each live
        # read is applied (kvsync serve measures event lag here); must be quick.
        self.on_live: Callable[[str, list[tuple[bytes, bytes]]], None] | None = None

    # ------------------------------------------------------------ public

    def add_pod(self, pod: Pod) -> None:
        """Follow ``pod``. Adding a pod again with another host or ports
        purges it and follows the new address. Raises ``ValueError`` if one
        of its worker ids is another pod's (``a`` with dp_size 2 and
        ``a/dp0``), and leaves nothing behind when it fails."""
        self._commands.call(lambda: self._add_pod(pod))

    def remove_pod(self, name: str) -> None:
        """Stop following pod ``name``; returns once its holdings are purged.
        Raises ``KeyError`` for an unknown pod."""
        self._commands.call(lambda: self._remove_pod(name))

    def probe_restart(self, name: str) -> None:
        """Pod ``name``'s engine may have restarted (its container restart
        count grew): ask each of its workers for a replay probe now, as on a
        reconnect, so a restart that stays idle is found too. KeyError for an
        unknown pod."""
        self._commands.call(lambda: self._probe_restart(name))

    def status(self) -> dict[str, WorkerStatus]:
        """``{worker_id: WorkerStatus}`` (state, last_seq, batches, events,
        gaps, replays, lost_batches, resets, malformed, dropped, seconds
        since the last event, ...)."""
        return dict(self._streams.status(time.monotonic()))

    def pods(self) -> dict[str, Pod]:
        with self._lock:
            return dict(self._pods)

    def start(self) -> EventManager:
        """Start the I/O thread; raises what stopped it from starting."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("EventManager already started")
            if self._ctx is None:
                self._ctx = _limits.new_context()
            _limits.check(len(self._workers), "EventManager.start", self._ctx)
            self._commands.open(self._ctx)
            self._stopping.clear()
            ready: Future[None] = Future()
            self._thread = threading.Thread(
                target=self._run, args=(ready,), name="kvsync-io", daemon=True
            )
            self._thread.start()
        try:
            ready.result(10)
        except BaseException as e:
            with contextlib.suppress(RuntimeError):
                self.stop()
            if isinstance(e, TimeoutError):
                raise RuntimeError("kvsync I/O thread did not start within 10 s") from e
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the I/O thread and close every socket. Holdings stay in the
        index (save it, or remove pods first to purge them)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._commands.wake()
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"kvsync I/O thread did not stop within {timeout} s")
        with self._lock:
            self._thread = None
            self._commands.close()
            if self._own_ctx and self._ctx is not None:
                # Every socket is closed by now; destroy() rather than term()
                # so that a leak could never hang stop().
                self._ctx.destroy(linger=0)
                self._ctx = None
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

    def _probe_restart(self, name: str) -> None:
        now = time.monotonic()
        for wid, _ in self._pods[name].workers():
            w = self._workers[wid]
            if w.connected_once:  # before the first connect, the start replays anyway
                self._follow(w, self._streams.reconnected(wid, now))

    # ---------------------------------------------------- pods (either side)

    def _add_pod(self, pod: Pod) -> None:
        old = self._pods.get(pod.name)
        if old == pod:
            return
        wids = pod.workers()
        for wid, _ in wids:
            other = self._workers.get(wid)
            if other is not None and other.pod.name != pod.name:
                raise ValueError(
                    f"pod {pod.name!r} would follow worker {wid!r}, which pod "
                    f"{other.pod.name!r} already follows; give one of them another name"
                )
        for wid, _ in wids:
            model = self._indexed_model(wid)
            followed_by_old = old is not None and any(wid == w for w, _ in old.workers())
            if model is not None and model != pod.model and not followed_by_old:
                raise ValueError(
                    f"pod {pod.name!r}: worker {wid!r} is in the index for model "
                    f"{model!r}, not {pod.model!r}"
                )
        total = len(self._workers) + len(wids) - (len(old.workers()) if old else 0)
        _limits.check(total, f"add_pod({pod.name!r})", self._ctx)
        if old is not None:
            self._remove_pod(pod.name)
        workers = [Worker(wid, pod, rank) for wid, rank in wids]
        added: list[Worker] = []
        try:
            if self._io_running:
                for w in workers:
                    added.append(w)
                    self._open(w)
            for w in workers:
                self._streams.add(w.wid, pod.model, **self._stream_options(pod))
                self._workers[w.wid] = w
            self._pods[pod.name] = pod
        except BaseException:
            # Leave nothing behind: no socket, no stream, no listed pod.
            for w in added:
                self._close(w)
            for w in workers:
                if self._workers.pop(w.wid, None) is not None:
                    self._streams.remove(w.wid)
            raise

    def _indexed_model(self, wid: str) -> str | None:
        """The model ``wid`` is registered for in the index, if it is (one
        lookup: ``Index.workers()`` would make adding N pods O(N**2))."""
        try:
            model: str = self.index.worker_stats(wid)["model"]
        except KeyError:
            return None
        return model

    def _stream_options(self, pod: Pod) -> dict[str, Any]:
        return {
            "replay": pod.replay_port is not None,
            "replay_timeout": self.replay_timeout,
            "clean_secs": self.clean_secs,
            "max_buffered": self.max_buffered,
            "max_buffered_bytes": self.max_buffered_bytes,
            "dead_after": self.dead_after,
            "idle_probe": self.idle_probe,
            "replay_max": self.replay_max,
        }

    def _remove_pod(self, name: str) -> None:
        pod = self._pods.pop(name, None)
        if pod is None:
            raise KeyError(f"unknown pod {name!r}")
        for wid, _ in pod.workers():
            w = self._workers.pop(wid, None)
            if w is not None:
                self._close(w)
            self._streams.remove(wid)

    # ---------------------------------------------------- I/O thread side

    def _open(self, w: Worker) -> None:
        assert self._ctx is not None
        sub = w.open_sub(self._ctx, self._options)
        assert w.monitor is not None
        self._by_socket[sub] = ("sub", w)
        self._by_socket[w.monitor] = ("monitor", w)
        self._ready.add(sub)
        self._ready.add(w.monitor)

    def _close(self, w: Worker) -> None:
        for sock in (w.sub, w.monitor, w.dealer):
            if sock is None:
                continue
            self._ready.discard(sock)
            self._by_socket.pop(sock, None)
        if w.sub is not None and w.monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                w.sub.disable_monitor()
        for sock in (w.monitor, w.sub, w.dealer):
            if sock is not None:
                sock.close(linger=0)
        w.sub = w.monitor = w.dealer = None
        w.connected_once = w.up = False

    def _drop_dealer(self, w: Worker) -> None:
        if w.dealer is not None:
            self._ready.discard(w.dealer)
            self._by_socket.pop(w.dealer, None)
            w.dealer.close(linger=0)
            w.dealer = None

    def _request_replay(self, w: Worker, start: int) -> None:
        if w.pod.replay_port is None or w.lost:
            return
        self._drop_dealer(w)
        assert self._ctx is not None
        dealer = w.open_dealer(self._ctx, self._options, start)
        self._by_socket[dealer] = ("dealer", w)
        self._ready.add(dealer)
        log.debug("%s: replay requested from %d", w.wid, start)

    def _follow(self, w: Worker, start: int | None) -> None:
        if start is not None:
            self._request_replay(w, start)

    def _run(self, ready: Future[None]) -> None:
        assert self._ctx is not None
        wake: zmq.Socket[bytes] | None = None
        try:
            wake = self._commands.bind()
            self._ready = Readiness()
            self._ready.add(wake)
            self._io_running = True
            for w in self._workers.values():
                self._open(w)
            with self._lock:
                self._commands.accepting = True
        except BaseException as e:
            self._shutdown(wake)
            ready.set_exception(e)
            return
        ready.set_result(None)
        try:
            self._loop(wake)
        except BaseException:
            log.exception("kvsync I/O thread failed; pods are no longer followed")
        finally:
            self._shutdown(wake)

    def _shutdown(self, wake: zmq.Socket[bytes] | None) -> None:
        with self._lock:
            # From here on commands run in their caller's thread; answer the
            # ones already queued the same way.
            self._commands.accepting = False
            self._io_running = False
            for w in list(self._workers.values()):
                self._close(w)
            if wake is not None:
                self._ready.discard(wake)
                wake.close(linger=0)
            self._ready.close()
            self._commands.run_pending()

    def _loop(self, wake: zmq.Socket[bytes]) -> None:
        while not self._stopping.is_set():
            ready = self._ready.wait(self.poll_ms / 1000)
            now = time.monotonic()
            if wake in ready:
                self._commands.on_wake(wake)
                self._ready.recheck(wake)
            # Connection events, then live messages, then replay replies: the
            # stream must hear of a (re)connect before what came over it, and
            # a batch zmq already took off the live connection must reach it
            # before a replay reply that may hold it too (a live copy after
            # the replay's end looks like an engine restart).
            ready.sort(key=lambda sock: _ORDER.get(self._by_socket.get(sock, ("",))[0], 3))
            for sock in ready:
                entry = self._by_socket.get(sock)
                if entry is not None:  # (not closed by a command or handler)
                    self._on_readable(entry[0], entry[1], now)
                    self._ready.recheck(sock)
            self._tick(time.monotonic())

    def _watch_reconnects(self, now: float) -> None:
        """libzmq does not reconnect after a protocol error (a message over
        ``max_message_bytes``, a garbled frame): a connection that stays
        down longer than two heartbeat timeouts is made again from scratch,
        then after twice as long each time (up to a minute), so that a fleet
        of engines that are simply gone does not churn sockets."""
        if now < self._next_watch:
            return
        self._next_watch = now + 1.0
        for wid, (due, wait) in list(self._down.items()):
            w = self._workers.get(wid)
            if w is None or w.up or w.lost or w.sub is None:
                self._down.pop(wid, None)
                continue
            if now >= due:
                log.warning(
                    "%s: no reconnect after a disconnect (an engine that is down, or a "
                    "message over max_message_bytes=%d); connecting again",
                    wid,
                    self.max_message_bytes,
                )
                dealer, w.dealer = w.dealer, None  # a replay under way goes on
                self._close(w)
                w.dealer = dealer
                w.connected_once = True  # the next connect is a reconnect
                self._open(w)
                self._down[wid] = (now + wait, min(2 * wait, 60.0))

    def _tick(self, now: float) -> None:
        self._watch_reconnects(now)
        try:
            due = self._streams.tick(now)
        except KeyError:
            # tick() stops at the first worker the index no longer knows.
            known = self.index.workers()
            for w in list(self._workers.values()):
                if w.wid not in known and not w.lost:
                    self._lose(w)
            return
        for wid, start in due:
            worker = self._workers.get(wid)
            if worker is not None:
                try:
                    self._request_replay(worker, start)
                except Exception:
                    log.exception("%s: cannot request a replay", wid)

    def _lose(self, w: Worker) -> None:
        """The index no longer knows a followed worker (someone called
        ``Index.remove_worker``): say so once and stop feeding it, rather
        than failing on every message from now on."""
        log.error(
            "%s: the index no longer has this worker; its sockets are closed "
            "(remove pod %r and add it again to follow it)",
            w.wid,
            w.pod.name,
        )
        self._close(w)
        w.lost = True
        with contextlib.suppress(Exception):
            self._streams.stop(w.wid)

    def _on_readable(self, kind: str, w: Worker, now: float) -> None:
        # One worker's trouble must not stop the others: log and go on.
        try:
            if kind == "sub":
                self._on_sub(w, now)
            elif kind == "dealer":
                self._on_dealer(w, now)
            else:
                self._on_monitor(w, now)
        except KeyError:
            if w.wid not in self.index.workers():
                self._lose(w)
            else:
                log.exception("%s: error while handling %s socket", w.wid, kind)
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

    def _on_sub(self, w: Worker, now: float) -> None:
        if not w.up:
            # Data from a connection whose handshake event is still queued.
            self._on_monitor(w, now)
        if w.sub is None:
            return
        # Everything queued for this worker goes to the index in one call.
        batch: list[tuple[bytes, bytes]] = []
        for frames in self._frames(w.sub):
            if len(frames) == 3:
                batch.append((frames[1], frames[2]))
            else:
                batch.append((b"", b""))  # counted as malformed
        if batch:
            self._follow(w, self._streams.live_many(w.wid, batch, now))
            if self.on_live is not None:  # after: its failure must not lose a replay
                self.on_live(w.wid, batch)

    def _on_dealer(self, w: Worker, now: float) -> None:
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
                    self._drop_dealer(w)
                self._follow(w, start)
                return
            self._follow(w, self._streams.replayed(w.wid, seq, payload, now))

    def _on_monitor(self, w: Worker, now: float) -> None:
        while w.monitor is not None:
            try:
                msg = recv_monitor_message(w.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = msg["event"]
            if event == zmq.EVENT_DISCONNECTED and w.up:
                w.up = False
                wait = max(1.0, 2 * self.heartbeat_timeout)
                self._down[w.wid] = (now + wait, wait)
                log.info("%s: publisher disconnected", w.wid)
                self._streams.disconnected(w.wid, now)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                w.up = True
                self._down.pop(w.wid, None)
                if not w.connected_once:
                    w.connected_once = True
                    # Subscribed and connected: now fetch the history.
                    self._follow(w, self._streams.start(w.wid, now))
                else:
                    # Every reconnect: the engine may have restarted. The
                    # core probes at once, even if a replay is under way.
                    log.info("%s: publisher reconnected, probing for a restart", w.wid)
                    self._follow(w, self._streams.reconnected(w.wid, now))
