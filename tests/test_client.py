"""``kvsync.Client`` errors: what a caller catches when the server cannot
be reached, and that the error keeps its status across pickling (the
answers themselves are checked against a live server in
tests/integration/test_serve.py)."""

from __future__ import annotations

import pickle
import socket

import pytest

import kvsync


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens once the socket is closed


def test_an_unreachable_server_raises_service_error_without_status() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with kvsync.Client(url, timeout=2.0) as c, pytest.raises(kvsync.ServiceError) as e:
        c.healthz()
    assert e.value.status is None and "/healthz" in e.value.message
    assert isinstance(e.value, kvsync.Error)


def test_service_error_pickles_with_its_status() -> None:
    err = kvsync.ServiceError(404, "no worker serves model 'x'")
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.message, str(back)) == (404, err.message, str(err))
