"""How many pods one EventManager can follow: descriptors and memory per pod.

``python -m bench.podscale [N ...]`` (default 100 1000 10000) measures each
N in a fresh child process: it raises ``RLIMIT_NOFILE`` to what N pods need
(root may raise the hard limit too, up to ``fs.nr_open``), starts an
EventManager, adds N pods whose ports are closed loopback ports (no engines
needed: every SUB socket keeps reconnecting, as for pods whose engines are
down), lets the connection attempts settle, and prints one JSON object per
N: open descriptors and resident memory (``/proc/self/statm``) above the
started, empty manager, per pod, and how long adding the pods took.

Measured on the 2-core dev box (uid 0 but without CAP_SYS_RESOURCE, so
RLIMIT_NOFILE stops at its hard limit of 20,000; load average ~6 from
other jobs, so the times are rough, descriptors and memory are not):

    N        fds/pod  RSS/pod    fds total  RSS total  add_pod, all  status()
    100      3.00     37.7 KiB   312        33 MiB     0.04 s        0.4 ms
    1,000    3.00     36.9 KiB   3,012      65 MiB     0.45 s        10 ms
    3,000    3.01     37.2 KiB   9,044      138 MiB    2.2 s         83 ms
    10,000   skipped: needs RLIMIT_NOFILE >= 60,064 (hard limit 20,000 here)

Three descriptors per idle pod: the SUB socket's mailbox and the monitor's
two PAIR mailboxes; a connected engine adds its TCP connection, a replay in
progress a DEALER mailbox and connection, so the limit check budgets 6 per
worker (and would refuse more than 3,322 workers at 20,000). Memory is
mostly libzmq's per-connection pipe (two 16 KiB message chunks). On a
machine configured for it (RLIMIT_NOFILE >= 61,088), 10,000 pods would
take ~30,000-40,000 descriptors and ~370 MiB by the same per-pod figures;
``python -m bench.podscale 10000`` measures it there.

"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

import kvsync
from kvsync import _limits


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_nofile(need: int) -> int:
    """Raise the soft limit (and the hard limit, which needs root with
    CAP_SYS_RESOURCE) to at least ``need``; returns the soft limit now in
    force, which may stay below ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, min(need, nr_open)))
            hard = min(need, nr_open)
        except (ValueError, OSError):
            pass  # not permitted: go as far as the hard limit allows
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def settled(samples: int = 5) -> tuple[int, int]:
    """Median fds and RSS over a second: failed connects open and close a
    descriptor each, so a single reading wobbles."""
    fds, rss = [], []
    for _ in range(samples):
        time.sleep(0.2)
        fds.append(open_fds())
        rss.append(rss_bytes())
    return int(statistics.median(fds)), int(statistics.median(rss))


def measure(n: int) -> dict[str, float | str]:
    need = _limits.fds_needed(n)
    limit = raise_nofile(need + 1024)
    if limit < need:
        return {
            "pods": n,
            "skipped": f"needs RLIMIT_NOFILE >= {need}; the hard limit is {limit} and "
            "this process may not raise it (no CAP_SYS_RESOURCE)",
        }
    port = closed_port()
    index = kvsync.Index()
    with kvsync.EventManager(index) as m:
        base_fds, base_rss = settled()
        t0 = time.monotonic()
        for i in range(n):
            m.add_pod(
                kvsync.Pod(name=f"pod-{i}", model="m", host="127.0.0.1", pub_port=port,
                           replay_port=port + 1)
            )  # fmt: skip
        add_s = time.monotonic() - t0
        fds, rss = settled()
        t0 = time.monotonic()
        states = {s.state for s in m.status().values()}
        status_s = time.monotonic() - t0
        assert len(m.status()) == n and states == {"connecting"}, states
    return {
        "pods": n,
        "rlimit_nofile": limit,
        "fds_per_pod": round((fds - base_fds) / n, 2),
        "rss_kib_per_pod": round((rss - base_rss) / n / 1024, 2),
        "fds_total": fds,
        "rss_mib_total": round(rss / 2**20, 1),
        "add_pod_total_s": round(add_s, 3),
        "status_s": round(status_s, 4),
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(measure(int(argv[1]))), flush=True)
        return 0
    for n in [int(a) for a in argv] or [100, 1000, 10_000]:
        out = subprocess.run(
            [sys.executable, "-m", "bench.podscale", "--child", str(n)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if out.returncode != 0:
            print(f"N={n} failed:\n{out.stderr}", file=sys.stderr)
            return 1
        print(out.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
