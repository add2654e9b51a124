"""Which HTTP server for ``kvsync serve``: latency of a trivial JSON POST
over loopback, aiohttp vs Starlette on uvicorn (docs/choices.md).

Each server runs in a child process; one client thread sends POSTs over one
keep-alive connection (``http.client``) for ``--seconds`` and reports the
median, p99 and requests per second. Run: ``python bench/http_framework.py``
(needs ``pip install orjson starlette uvicorn`` besides kvsync's own aiohttp).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import time

BODY = json.dumps({"model": "m", "token_ids": list(range(256))}).encode()

AIOHTTP = """
import sys, orjson
from aiohttp import web
async def h(request):
    body = orjson.loads(await request.read())
    return web.Response(body=orjson.dumps({"n": len(body["token_ids"])}),
                        content_type="application/json")
app = web.Application()
app.router.add_post("/q", h)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

STARLETTE = """
import sys, orjson, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def h(request):
    body = orjson.loads(await request.body())
    return Response(orjson.dumps({"n": len(body["token_ids"])}), media_type="application/json")
app = Starlette(routes=[Route("/q", h, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(code: str, seconds: float) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not start") from None
                time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        headers = {"Content-Type": "application/json"}
        for _ in range(200):  # warm-up
            conn.request("POST", "/q", BODY, headers)
            conn.getresponse().read()
        lat: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            conn.request("POST", "/q", BODY, headers)
            r = conn.getresponse()
            r.read()
            lat.append(time.perf_counter() - t)
            assert r.status == 200
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
    lat.sort()
    return {
        "requests": len(lat),
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "rps": len(lat) / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    for name, code in (("aiohttp", AIOHTTP), ("starlette+uvicorn", STARLETTE)):
        r = measure(code, args.seconds)
        print(
            f"{name:<18} {r['requests']:>7.0f} requests  p50 {r['p50_us']:7.1f} us  "
            f"p99 {r['p99_us']:7.1f} us  {r['rps']:8.0f} req/s"
        )


if __name__ == "__main__":
    main()
