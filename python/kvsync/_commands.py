"""Calls from any thread, run on the transport's I/O thread: the thread
owns every zmq socket, so ``add_pod``/``remove_pod`` queue a callable,
wake the thread through an inproc PUSH/PULL pair, and wait for its result.
When the thread is not running, a call runs in the caller's thread."""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

__all__ = ["Commands"]

_names = itertools.count()

_Command = tuple[Callable[[], None], "Future[None]"]


class Commands:
    """The queue of calls for one I/O thread and the socket that wakes it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[_Command] = queue.Queue()
        self.address = ""
        self._ctx: zmq.Context[Any] | None = None
        self._send: zmq.Socket[bytes] | None = None
        self._send_lock = threading.Lock()
        # Serializes the choice "queue for the I/O thread or run here" with
        # the thread starting and ending, so no call is left unanswered.
        self.lock = threading.RLock()
        self.accepting = False  # the I/O thread takes calls

    def open(self, ctx: zmq.Context[Any]) -> None:
        """Before the I/O thread starts: a wake address unique per start
        (inproc names live as long as the context, and CPython reuses the
        id()s of collected objects)."""
        with self._send_lock:
            self._ctx = ctx
            self.address = f"inproc://kvsync-wake-{next(_names)}-{uuid.uuid4().hex}"

    def bind(self) -> zmq.Socket[bytes]:
        """On the I/O thread: the socket that becomes readable on a wake."""
        assert self._ctx is not None
        wake: zmq.Socket[bytes] = self._ctx.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.bind(self.address)
        return wake

    def close(self) -> None:
        """After the I/O thread ended: the sending side is closed."""
        with self._send_lock:
            if self._send is not None:
                self._send.close(linger=0)
                self._send = None
            self._ctx = None

    def call(self, fn: Callable[[], None], timeout: float = 30.0) -> None:
        """Run ``fn`` on the I/O thread (or here when it is not running);
        its own exception, and no other call's, is raised here."""
        fut: Future[None] = Future()
        with self.lock:
            if not self.accepting:
                fn()  # not running: sockets are created on start
                return
            self._queue.put((fn, fut))
        self.wake()
        try:
            fut.result(timeout)
        except TimeoutError:
            if fut.done():
                raise  # the call itself raised TimeoutError
            raise TimeoutError(f"kvsync I/O thread did not answer within {timeout} s") from None

    def wake(self) -> None:
        with self._send_lock:
            if self._ctx is None:
                return
            if self._send is None:
                self._send = self._ctx.socket(zmq.PUSH)
                self._send.setsockopt(zmq.LINGER, 0)
                self._send.connect(self.address)
            with contextlib.suppress(zmq.Again):
                self._send.send(b"", zmq.NOBLOCK)

    def on_wake(self, wake: zmq.Socket[bytes]) -> None:
        """On the I/O thread, when ``wake`` is readable: run what is queued."""
        with contextlib.suppress(zmq.Again):
            while True:
                wake.recv(zmq.NOBLOCK)
        self.run_pending()

    def run_pending(self) -> None:
        while True:
            try:
                fn, fut = self._queue.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fn()
            except BaseException as e:
                fut.set_exception(e)
            else:
                fut.set_result(None)
