"""``kvsync serve`` measurements of the nightly run: ``/v1/route`` latency
over HTTP (8192-token prompt), the service's CPU per ``/v1/route`` (from
/proc: what a request costs the server, which the neighbours on a shared
machine do not change the way they change latency) and the router's
restart from its snapshot.

Two simulators (``kvsync sim``) are the fleet, named in a static pods
file; the service runs in a child process on a free port (read from its
"listening on" line). Restart: the service is killed (SIGKILL, no shutdown
save) after a snapshot was written through ``POST /v1/snapshot``, and a new
one is started on the same snapshot; the time runs from the start of the
new process until ``/readyz`` answers 200.

Used by ``bench.nightly`` when ``bench.serve_load`` (the dedicated load
bench) is not on the branch, or does not report these metrics.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from kvsync.service.process import ServeProcess
from kvsync.sim import SimProcess

from .engines import cpu_seconds

__all__ = ["serve_metrics"]

MODEL = "nightly-model"
START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0


class _Serve(ServeProcess):
    def __init__(self, log: Path, *args: str) -> None:
        super().__init__(log, *args, start_timeout=START_TIMEOUT_S)

    def ready_after(self, http: httpx.Client) -> tuple[float, float]:
        """Seconds from this process's start until /readyz said 200: wall
        time, and the process's own CPU time."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if http.get(f"{self.url}/readyz").status_code == 200:
                return time.monotonic() - self.started, cpu_seconds(self.proc.pid)
            time.sleep(0.005)
        raise TimeoutError(f"kvsync serve not ready within {READY_TIMEOUT_S} s")


@contextmanager
def _fleet(tmp: Path) -> Iterator[Path]:
    sims = [SimProcess("--seed", str(i), "--capacity", "4096") for i in range(2)]
    try:
        for s in sims:
            s.request("step", n=200)
        pods = [
            {
                "name": f"e{i}",
                "model": MODEL,
                "host": "127.0.0.1",
                "pub_port": s.pub_port,
                "replay_port": s.replay_port,
            }
            for i, s in enumerate(sims)
        ]
        path = tmp / "pods.json"
        path.write_text(json.dumps({"pods": pods}))
        yield path
    finally:
        for s in sims:
            s.close()


def serve_metrics(repeats: int, requests: int, restarts: int) -> dict[str, list[float]]:
    route_p99: list[float] = []
    route_cpu: list[float] = []
    restart_s: list[float] = []
    restart_cpu_s: list[float] = []
    rng = random.Random(11)
    with tempfile.TemporaryDirectory(prefix="kvsync-nightly-") as d:
        tmp = Path(d)
        snap = tmp / "index.kvs"
        with _fleet(tmp) as pods, httpx.Client(timeout=10.0) as http:
            args = ("--pods", str(pods), "--snapshot", str(snap), "--log-level", "warning")
            server = _Serve(tmp / "serve-0.log", *args)
            try:
                server.ready_after(http)
                prompts = [[rng.randrange(32_000) for _ in range(8192)] for _ in range(8)]
                bodies = [json.dumps({"model": MODEL, "token_ids": p}).encode() for p in prompts]
                headers = {"Content-Type": "application/json"}
                for run in range(repeats + 1):  # run 0 warms the connection up
                    lat = np.empty(requests if run else 50)
                    cpu0 = cpu_seconds(server.proc.pid)
                    for i in range(len(lat)):
                        t0 = time.perf_counter()
                        r = http.post(
                            f"{server.url}/v1/route", content=bodies[i % 8], headers=headers
                        )
                        lat[i] = time.perf_counter() - t0
                        if r.status_code != 200:
                            raise RuntimeError(f"/v1/route answered {r.status_code}: {r.text}")
                    if run:
                        route_p99.append(float(np.percentile(lat * 1e6, 99)))
                        cpu = cpu_seconds(server.proc.pid) - cpu0
                        route_cpu.append(cpu / len(lat) * 1e6)
                for k in range(restarts):
                    r = http.post(f"{server.url}/v1/snapshot")
                    if r.status_code != 200:
                        raise RuntimeError(f"POST /v1/snapshot answered {r.status_code}: {r.text}")
                    server.kill()
                    server = _Serve(tmp / f"serve-{k + 1}.log", *args)
                    took, cpu = server.ready_after(http)
                    restart_s.append(took)
                    restart_cpu_s.append(cpu)
            finally:
                server.kill()
    return {
        "routing_decision_latency_p99_us": route_p99,
        "routing_decision_server_cpu_us": route_cpu,
        "recovery_router_restart_s": restart_s,
        "recovery_router_restart_cpu_s": restart_cpu_s,
    }
