"""The library as a system under test: ``kvsync.EventManager`` and
``kvsync.Index`` in a child process (``python -m chaos.library_sut``),
answering the same two questions as ``kvsync serve`` over HTTP on
loopback, so that every scenario can run against the library alone.

- ``POST /query`` ``{model, token_ids}``: the Mooncake shape
  ``{"default": {pod: {"longest_matched": tokens}}}`` for every worker of
  the model (tokens = matched blocks x block size);
- ``GET /v1/workers``: ``{worker_id: {state, last_seq, holdings, ...}}``;
- ``POST /debug/stop-following``: stop the manager but keep the index, a
  deliberately broken kvsync for the test that proves the oracle catches
  a stale index.

Configuration is one JSON argument: ``{"pods": [{name, model, host,
pub_port, replay_port}], "manager": {EventManager keyword arguments},
"block_size": n}``. On start it prints ``{"port": n}``; it stops when its
stdin closes (the test ended) or its parent is gone.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kvsync


def _answer(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def make_handler(
    index: kvsync.Index, manager: kvsync.EventManager, block_size: int
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test reads stdout; requests are not news

        def do_GET(self) -> None:
            if self.path != "/v1/workers":
                _answer(self, 404, {"error": f"no route {self.path}"})
                return
            out = {}
            for wid, st in manager.status().items():
                d = st.to_dict()
                try:
                    d["holdings"] = index.worker_stats(wid)["blocks"]
                except KeyError:
                    d["holdings"] = 0
                out[wid] = d
            _answer(self, 200, out)

        def do_POST(self) -> None:
            if self.path == "/debug/stop-following":
                # For the harness's own check that a stale index is caught:
                # stop() keeps every holding, and nothing purges them again.
                manager.stop()
                _answer(self, 200, {"stopped": True})
                return
            if self.path != "/query":
                _answer(self, 404, {"error": f"no route {self.path}"})
                return
            n = int(self.headers.get("Content-Length", "0"))
            try:
                req = json.loads(self.rfile.read(n))
                matched = index.match(req["model"], req["token_ids"])
            except (ValueError, KeyError, TypeError) as e:
                _answer(self, 400, {"error": str(e)})
                return
            _answer(
                self,
                200,
                {"default": {w: {"longest_matched": b * block_size} for w, b in matched.items()}},
            )

    return Handler


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    # kvsync's log goes to stderr (the runner keeps it in the scenario's
    # work directory); KVSYNC_CHAOS_LOG_LEVEL=DEBUG shows every replay
    logging.basicConfig(
        level=os.environ.get("KVSYNC_CHAOS_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    parent = os.getppid()
    index = kvsync.Index()
    manager = kvsync.EventManager(index, **cfg.get("manager", {}))
    for p in cfg["pods"]:
        manager.add_pod(kvsync.Pod(**p))
    manager.start()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(index, manager, cfg["block_size"]))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"port": server.server_address[1]}), flush=True)

    done = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the test closed our stdin or died
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not done.wait(0.5):
        if os.getppid() != parent:
            break
    server.shutdown()
    manager.stop()
    time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
