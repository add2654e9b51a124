"""Integration: ``kvsync serve`` in a child process follows ``kvsync sim``
engines over loopback (a static pods file, and /register); every endpoint's
answer is compared with the engines' ground truth; restarts from a snapshot
and from a peer converge to it again; SIGTERM exits 0 leaving a loadable
snapshot; bad requests never take the process down."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import kvsync
from kvsync.sim import SimProcess

from .conftest import MODEL, expected_depth, wait_for
from .serving import Serve, pods_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "integration-token"
Sims = Callable[..., SimProcess]
Engines = dict[str, tuple[SimProcess, int]]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str, token: str | None = TOKEN) -> Serve:
        s = Serve(tmp_path / f"serve-{len(started)}.log", *args, token=token)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def worker_ids(name: str, dp: int) -> list[tuple[str, int]]:
    return [(name, 0)] if dp == 1 else [(f"{name}/dp{r}", r) for r in range(dp)]


def caught_up(server: Serve, engines: Engines) -> bool:
    rows = server.client.workers()
    for name, (sim, dp) in engines.items():
        seqs = sim.request("stats")["seq"]
        for wid, rank in worker_ids(name, dp):
            row = rows.get(wid)
            if row is None or row["state"] not in ("live", "degraded"):
                return False
            if row["last_seq"] != seqs[rank]:
                return False
    return True


def truth_of(
    engines: Engines,
) -> tuple[int, dict[str, list[set[tuple[int, ...]]]], list[list[int]]]:
    """(block size, {pod: [held prefixes per rank]}, every held prefix)."""
    held: dict[str, list[set[tuple[int, ...]]]] = {}
    prompts: list[list[int]] = []
    bs = 0
    for name, (sim, _) in engines.items():
        t = sim.request("truth")
        bs = t["block_size"]
        held[name] = [{tuple(p) for p in rank} for rank in t["ranks"]]
        for rank in t["ranks"]:
            prompts.extend(rank)
    return bs, held, prompts


def expected_query(
    bs: int, held: dict[str, list[set[tuple[int, ...]]]], prompt: list[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ranks in held.items():
        depths = [expected_depth(prompt, h, bs) * bs for h in ranks]
        out[name] = {
            "longest_matched": max(depths),
            "GPU": max(depths),  # the simulator keeps everything on GPU
            "CPU": 0,
            "DISK": 0,
            "DP": {str(r): d for r, d in enumerate(depths)},
        }
    return {"default": out}


def assert_answers_match_truth(server: Serve, engines: Engines, limit: int = 40) -> None:
    bs, held, prompts = truth_of(engines)
    assert prompts, "the engines hold nothing: the test would prove nothing"
    for prompt in [*prompts[:limit], prompts[0] + [7] * (bs - 1)]:  # + a partial block
        want = expected_query(bs, held, prompt)
        assert server.client.query(MODEL, prompt) == want
        hashes = kvsync.seq_hashes(prompt, bs)
        assert server.client.query_by_hash(MODEL, hashes) == want


def start_engines(sims: Sims) -> Engines:
    return {"pod-a": (sims("--seed", "1"), 1), "pod-b": (sims("--seed", "2", "--dp-size", "2"), 2)}


def step(engines: Engines, n: int = 15) -> None:
    for sim, _ in engines.values():
        sim.request("step", n=n)


def test_every_endpoint_answers_the_engines_truth(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    engines = start_engines(sims)
    step(engines)
    pods = pods_file(tmp_path / "pods.json", engines, MODEL)
    snap = tmp_path / "index.snapshot"
    server = serve("--pods", str(pods), "--snapshot", str(snap), "--speculative-ttl", "0")
    c = server.client
    assert c.healthz() == {"status": "ok"}
    wait_for(lambda: caught_up(server, engines), what="serve caught up with the engines")
    wait_for(lambda: c.readyz()["status"] == "ready", what="/readyz")
    step(engines, 10)
    wait_for(lambda: caught_up(server, engines), what="live events applied")
    assert_answers_match_truth(server, engines)

    # /v1/workers: every worker with its stream's counters and source
    rows = c.workers()
    assert set(rows) == {"pod-a", "pod-b/dp0", "pod-b/dp1"}
    for wid, row in rows.items():
        assert row["source"] == "static" and row["model"] == MODEL and row["ready"] is True
        assert row["state"] == "live" and row["malformed"] == 0 and row["lost_batches"] == 0
        assert row["instance"] == wid.split("/")[0] and row["host"] == "127.0.0.1"
        assert row["holdings"] > 0 and row["batches"] > 0
    # /v1/stats: the index's own numbers
    stats = c.stats()
    assert stats["workers"] == 3 and stats["holdings"] == sum(r["holdings"] for r in rows.values())
    assert stats["started_from"] == "empty"

    # /v1/route: the longest cached prefix wins under the prefix policy
    bs, held, prompts = truth_of(engines)
    prompt = max(prompts, key=len)
    want = expected_query(bs, held, prompt)["default"]
    best = max(v["longest_matched"] for v in want.values())
    r = c.route(MODEL, prompt, policy="prefix", request_id="req-1")
    assert r["policy"] == "prefix" and r["blocks"] == len(prompt) // bs
    assert r["matched_tokens"] == best
    assert r["instance"] in want and want[r["instance"]]["DP"]
    assert {s["worker"] for s in r["scores"]} == set(rows)
    assert next(s for s in r["scores"] if s["worker"] == r["worker"])["load"] >= 0
    assert c.release("req-1") is True and c.release("req-1") is False
    only_a = c.route(MODEL, prompt, candidates=["pod-a"])
    assert only_a["worker"] == "pod-a"

    # /metrics: per-worker counters equal /v1/workers
    text = c.metrics()
    rows = c.workers()
    assert f'kvsync_batches_total{{worker="pod-a"}} {float(rows["pod-a"]["batches"])}' in text
    assert 'kvsync_worker_state{state="live",worker="pod-b/dp1"} 1.0' in text
    assert 'kvsync_routes_total{policy="prefix"}' in text
    assert 'kvsync_discovery_pods{source="static"} 2.0' in text
    assert (
        "kvsync_event_lag_seconds_count" in text
        and "kvsync_event_lag_seconds_count 0.0" not in text
    )

    # /v1/snapshot: GET is a loadable index equal to the answers; POST saves now
    (tmp_path / "fetched").write_bytes(c.snapshot())
    loaded = kvsync.Index.load(tmp_path / "fetched")
    for p in prompts[:10]:
        d = loaded.match(MODEL, p)
        assert d["pod-a"] * bs == expected_query(bs, held, p)["default"]["pod-a"]["longest_matched"]
    saved = c.save_snapshot()
    assert saved["path"] == str(snap) and saved["bytes"] == snap.stat().st_size > 0
    assert c.openapi()["openapi"].startswith("3.")


def test_restart_from_the_snapshot_resumes_and_converges(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    engines = start_engines(sims)
    step(engines)
    pods = pods_file(tmp_path / "pods.json", engines, MODEL)
    snap = tmp_path / "index.snapshot"
    args = ("--pods", str(pods), "--snapshot", str(snap), "--snapshot-interval", "0.3")
    first = serve(*args)
    wait_for(lambda: caught_up(first, engines), what="first run caught up")
    since = time.time()
    wait_for(lambda: snap.exists() and snap.stat().st_mtime > since, what="a periodic save")
    first.kill()  # a crash: only the periodically saved snapshot survives
    step(engines)  # history the restarted replica has to replay
    second = serve(*args)
    assert second.client.stats()["started_from"] == "snapshot"
    wait_for(lambda: caught_up(second, engines), what="restart caught up")
    assert_answers_match_truth(second, engines)
    rows = second.client.workers()
    assert all(r["resets"] == 0 and r["lost_batches"] == 0 for r in rows.values()), rows


def test_a_replica_warm_starts_from_its_peer(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    engines = start_engines(sims)
    step(engines)
    pods = pods_file(tmp_path / "pods.json", engines, MODEL)
    a = serve("--pods", str(pods))
    wait_for(lambda: caught_up(a, engines), what="replica a caught up")
    b = serve("--pods", str(pods), "--peer", a.url)
    assert b.client.stats()["started_from"] == "peer"
    wait_for(lambda: caught_up(b, engines), what="replica b caught up")
    a.kill()
    step(engines)
    a2 = serve("--pods", str(pods), "--peer", b.url)
    assert a2.client.stats()["started_from"] == "peer"
    for server in (a2, b):
        wait_for(lambda s=server: caught_up(s, engines), what="both replicas converge")
        assert_answers_match_truth(server, engines)


def test_a_peer_that_refuses_the_token_means_an_empty_start(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    engines = start_engines(sims)
    pods = pods_file(tmp_path / "pods.json", engines, MODEL)
    a = serve("--pods", str(pods), token="other-token")
    b = serve("--pods", str(pods), "--peer", a.url)
    assert b.client.stats()["started_from"] == "empty"
    assert "401" in b.output()


def test_sigterm_exits_0_and_leaves_a_loadable_snapshot(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    engines = start_engines(sims)
    step(engines)
    pods = pods_file(tmp_path / "pods.json", engines, MODEL)
    snap = tmp_path / "index.snapshot"
    server = serve("--pods", str(pods), "--snapshot", str(snap), "--snapshot-interval", "3600")
    wait_for(lambda: caught_up(server, engines), what="caught up")
    assert not snap.exists()
    assert server.terminate() == 0
    index = kvsync.Index.load(snap)
    bs, held, prompts = truth_of(engines)
    assert set(index.workers()) == {"pod-a", "pod-b/dp0", "pod-b/dp1"}
    for p in prompts[:20]:
        want = expected_query(bs, held, p)["default"]
        got = index.match(MODEL, p)
        assert got["pod-a"] * bs == want["pod-a"]["longest_matched"]
        assert got["pod-b/dp1"] * bs == want["pod-b"]["DP"]["1"]


def test_registered_publishers_are_followed_and_dropped(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    sim = sims("--seed", "3")
    sim.request("step", n=10)
    server = serve("--snapshot", str(tmp_path / "snap"))
    c = server.client
    answer = c.register(
        f"tcp://127.0.0.1:{sim.pub_port}",
        MODEL,
        "engine-1",
        4,
        replay_endpoint=f"tcp://127.0.0.1:{sim.replay_port}",
        tenant_id="team-a",
    )
    assert answer == {"status": "registered successfully", "instance_id": "engine-1"}
    engines: Engines = {"engine-1/dp0": (sim, 1)}
    wait_for(lambda: caught_up(server, engines), what="registered engine followed")
    row = c.workers()["engine-1/dp0"]
    assert row["source"] == "register" and row["instance"] == "engine-1"
    bs, held, prompts = truth_of({"engine-1": (sim, 1)})
    for p in prompts[:10]:
        want = expected_query(bs, held, p)["default"]
        assert c.query(MODEL, p) == {"team-a": want}
        assert c.query(MODEL, p, tenant_id="default") == {}
    # Registered again at another address: purged and followed there
    other = sims("--seed", "4")
    other.request("step", n=5)
    c.register(
        f"tcp://127.0.0.1:{other.pub_port}",
        MODEL,
        "engine-1",
        4,
        replay_endpoint=f"tcp://127.0.0.1:{other.replay_port}",
        tenant_id="team-a",
    )
    wait_for(lambda: caught_up(server, {"engine-1/dp0": (other, 1)}), what="moved engine")
    bs, held, prompts = truth_of({"engine-1": (other, 1)})
    assert c.query(MODEL, prompts[0]) == {"team-a": expected_query(bs, held, prompts[0])["default"]}
    # A restart follows the saved registration again
    assert server.terminate() == 0
    server2 = serve("--snapshot", str(tmp_path / "snap"))
    wait_for(lambda: caught_up(server2, {"engine-1/dp0": (other, 1)}), what="registration restored")
    removed = server2.client.unregister("engine-1")
    assert removed["removed_instances"] == ["engine-1/dp0"]
    assert server2.client.workers() == {}
    assert server2.client.query(MODEL, prompts[0]) == {}
    with pytest.raises(kvsync.ServiceError) as e:
        server2.client.unregister("engine-1")
    assert e.value.status == 404


def test_bad_requests_never_take_it_down(serve: Callable[..., Serve]) -> None:
    server = serve("--max-body-bytes", "2048")
    url = server.url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as h:
        assert h.get("/v1/workers").status_code == 401
        assert h.get("/v1/workers", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = h.post("/query", content=b"\xff\xfe garbage", headers=auth)
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
        r = h.post("/query", json={"model": "m", "token_ids": "abc"}, headers=auth)
        assert r.status_code == 400 and "`token_ids`" in r.json()["error"]
        r = h.post("/query", content=b"[" + b"1," * 5000 + b"1]", headers=auth)
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
        r = h.post("/v1/route", json={"model": "nobody", "token_ids": [1]}, headers=auth)
        assert r.status_code == 404 and "nobody" in r.json()["error"]
        r = h.post("/v1/route", json={"model": "m", "token_ids": [1], "policy": "x"}, headers=auth)
        assert r.status_code in (400, 404)
        r = h.get("/nowhere", headers=auth)
        assert r.status_code == 404
        r = h.post(
            "/register",
            json={
                "endpoint": "tcp://127.0.0.1:1",
                "modelname": "m",
                "instance_id": "x",
                "block_size": 0,
            },
            headers=auth,
        )
        assert r.status_code == 400 and "`block_size`" in r.json()["error"]
        metrics = h.get("/metrics", headers=auth).text
        assert 'kvsync_discovery_errors_total{source="register"} 1.0' in metrics
        assert h.get("/healthz").json() == {"status": "ok"}
    assert server.proc.poll() is None


def test_the_example_config_starts_without_engines(serve: Callable[..., Serve]) -> None:
    repo = Path(__file__).resolve().parents[2]
    server = serve("--config", str(repo / "example.toml"), token=None)
    c = server.client
    rows = c.workers()
    assert rows and all(r["state"] == "connecting" for r in rows.values()), rows
    with pytest.raises(kvsync.ServiceError) as e:
        c.readyz()
    assert e.value.status == 503 and "caught up" in e.value.message
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(20) == 0


def test_query_by_hash_uses_the_configured_hash_seed(
    sims: Sims, serve: Callable[..., Serve], tmp_path: Path
) -> None:
    engines: Engines = {"pod-a": (sims("--seed", "5"), 1)}
    step(engines)
    pods = pods_file(tmp_path / "pods.json", engines, MODEL)
    server = serve("--pods", str(pods), "--hash-seed", "99")
    wait_for(lambda: caught_up(server, engines), what="caught up")
    bs, held, prompts = truth_of(engines)
    prompt = max(prompts, key=len)
    want = expected_query(bs, held, prompt)
    assert want["default"]["pod-a"]["longest_matched"] > 0
    assert server.client.query_by_hash(MODEL, kvsync.seq_hashes(prompt, bs, seed=99)) == want
    other = server.client.query_by_hash(MODEL, kvsync.seq_hashes(prompt, bs))
    assert other["default"]["pod-a"]["longest_matched"] == 0


def test_query_reports_tiers_and_cache_salt_of_a_raw_publisher(
    serve: Callable[..., Serve],
) -> None:
    """A hand-made publisher (no replay endpoint): blocks stored with an
    SGLang cache_salt, then offloaded to CPU and to disk, as /query reports
    them per tier; the salt must be given to match."""
    import msgpack
    import zmq

    ctx: zmq.Context[Any] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        server = serve()
        c = server.client
        c.register(f"tcp://127.0.0.1:{port}", MODEL, "raw", 4)
        tokens = list(range(100, 112))  # three blocks of 4
        stored = {
            "type": "BlockStored",
            "block_hashes": [1, 2, 3],
            "parent_block_hash": None,
            "token_ids": tokens,
            "block_size": 4,
            "medium": "GPU",
            "cache_salt": "salt-1",
        }
        # Offloads carry only engine hashes: blocks 1-2 to CPU, block 1 to disk.
        cpu = {"type": "BlockStored", "block_hashes": [1, 2], "token_ids": [], "medium": "CPU"}
        disk = {"type": "BlockStored", "block_hashes": [1], "token_ids": [], "medium": "DISK"}
        payload = msgpack.packb([1.0, [stored, cpu, disk], None])
        seq = 0

        def published() -> bool:
            nonlocal seq
            # The subscription may not be up yet (no replay to fetch a missed
            # batch): publish the same idempotent batch until it lands.
            pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
            seq += 1
            row = c.workers().get("raw/dp0")
            return row is not None and row["holdings"] == 3

        wait_for(published, what="the raw publisher's blocks")
        want = {"longest_matched": 12, "GPU": 12, "CPU": 8, "DISK": 4, "DP": {"0": 12}}
        assert c.query(MODEL, [*tokens, 1, 2], cache_salt="salt-1") == {"default": {"raw": want}}
        zero = {"longest_matched": 0, "GPU": 0, "CPU": 0, "DISK": 0, "DP": {"0": 0}}
        assert c.query(MODEL, tokens) == {"default": {"raw": zero}}
        assert c.query(MODEL, tokens, cache_salt="salt-2") == {"default": {"raw": zero}}
        with pytest.raises(kvsync.ServiceError) as e:
            c.query(MODEL, tokens, block_size=16)
        assert e.value.status == 400 and "block_size" in e.value.message
    finally:
        pub.close(linger=0)
        ctx.term()


def test_a_corrupt_snapshot_is_reported_and_replaced(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    snap = tmp_path / "index.snapshot"
    snap.write_bytes(b"not a snapshot at all")
    server = serve("--snapshot", str(snap))
    assert server.client.stats()["started_from"] == "empty"
    assert "not usable" in server.output() and str(snap) in server.output()
    assert server.terminate() == 0
    assert kvsync.Index.load(snap).stats()["workers"] == 0  # the shutdown save replaced it
