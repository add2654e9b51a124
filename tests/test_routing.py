"""kvsync.Router (SPEC section 7) on indexes built from real KVEventBatch
payloads: each policy's choice, ties, load accounting and its TTL,
speculative holdings, eligibility, candidates and errors; and a Hypothesis
property that the chosen worker minimises the policy's cost."""

from __future__ import annotations

import math
import threading
from array import array
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvsync
from kvsync.discovery import WorkerInfo
from kvsync.routing import POLICIES

BS = 4
MODEL = "llama"
WEIGHT = {"GPU": 1.0, "CPU": 0.75, "STORAGE": 0.25}
P = list(range(1000, 1016))  # 4 full blocks
Q = list(range(2000, 2018))  # 4 full blocks and a partial one


def block_hash(tokens: Sequence[int], i: int) -> int:
    """An engine hash for block i of a prompt (any distinct value will do)."""
    return hash(tuple(tokens[: (i + 1) * BS])) & (2**63 - 1)


def hold(index: kvsync.Index, worker: str, tokens: Sequence[int], tiers: Sequence[str]) -> None:
    """``worker`` stores the prompt's first len(tiers) blocks, block i in
    tier tiers[i], one BlockStored each (as an engine's offloading does)."""
    if not tiers:
        return
    events = []
    for i, medium in enumerate(tiers):
        events.append(
            {
                "type": "BlockStored",
                "block_hashes": [block_hash(tokens, i)],
                "parent_block_hash": block_hash(tokens, i - 1) if i else None,
                "token_ids": list(tokens[i * BS : (i + 1) * BS]),
                "block_size": BS,
                "lora_id": None,
                "medium": medium,
                "lora_name": None,
            }
        )
    index.apply(worker, msgpack.packb([1.0, events, None]))


def info(worker: str, instance: str | None = None, ready: bool = True, rank: int = 0) -> WorkerInfo:
    return WorkerInfo(
        worker=worker,
        instance=instance or worker,
        tenant="default",
        model=MODEL,
        host=f"host-{worker}",
        dp_rank=rank,
        ready=ready,
        source="static",
    )


class Fleet:
    """An index, the workers discovery reports, their stream states, a clock."""

    def __init__(self, *workers: WorkerInfo | str) -> None:
        self.index = kvsync.Index()
        self.workers: dict[str, WorkerInfo] = {}
        self.states: dict[str, str] = {}
        self.now = 100.0
        for w in workers:
            self.add(w if isinstance(w, WorkerInfo) else info(w))
        # the model's block size is learnt from its first events
        self.index.add_worker("other", MODEL)
        hold(self.index, "other", [7] * BS, ["GPU"])

    def add(self, w: WorkerInfo) -> None:
        self.workers[w.worker] = w
        self.index.add_worker(w.worker, w.model)
        self.states[w.worker] = "live"

    def router(self, **kw: Any) -> kvsync.Router:
        kw.setdefault("seed", 7)
        return kvsync.Router(
            self.index,
            lambda: self.workers,
            states=lambda: self.states,
            clock=lambda: self.now,
            **kw,
        )


def scores(route: kvsync.Route) -> dict[str, tuple[int, int, float]]:
    return {s.worker: (s.matched_tokens, s.load, s.score) for s in route.scores}


# ------------------------------------------------------------------ policies


def test_prefix_takes_the_highest_cached_value_counting_tiers() -> None:
    f = Fleet("a", "b", "c")
    hold(f.index, "a", P, ["GPU", "GPU", "GPU"])  # 3.0
    hold(f.index, "b", P, ["CPU", "CPU", "CPU", "STORAGE"])  # 2.5, but 4 blocks
    hold(f.index, "c", P, ["GPU", "CPU", "GPU", "CPU"])  # 3.5
    r = f.router(policy="prefix", speculative_ttl=0).route(MODEL, P)
    assert (r.worker, r.instance, r.host, r.policy) == ("c", "c", "host-c", "prefix")
    assert (r.matched_tokens, r.blocks) == (4 * BS, 4)
    assert scores(r) == {"c": (16, 0, 3.5), "a": (12, 0, 3.0), "b": (16, 0, 2.5)}
    assert [s.worker for s in r.scores] == ["c", "a", "b"]  # best first


def test_prefix_ties_go_to_the_lowest_load() -> None:
    f = Fleet("a", "b")
    hold(f.index, "a", P, ["GPU", "GPU"])
    hold(f.index, "b", P, ["GPU", "GPU"])
    router = f.router(policy="prefix", speculative_ttl=0)
    first = router.route(MODEL, P, request_id="r1").worker
    other = ({"a", "b"} - {first}).pop()
    for i in range(5):
        assert router.route(MODEL, P, request_id=f"x{i}").worker == other
        router.release(f"x{i}")


def test_prefix_load_weighs_blocks_to_compute_against_queued_work() -> None:
    f = Fleet("a", "b")
    hold(f.index, "a", P, ["GPU", "GPU", "GPU", "GPU"])  # cost 0 + load
    router = f.router(speculative_ttl=0)  # prefix-load is the default
    for i in range(3):
        r = router.route(MODEL, P, request_id=f"r{i}")
        assert r.worker == "a" and r.policy == "prefix-load"
    # a: 4 - 4 + 3 = 3; b: 4 - 0 + 0 = 4 -> still a
    assert router.route(MODEL, P, request_id="r3").worker == "a"
    # one request queued on b: a (0 + 4) now beats b (4 + 1)
    assert scores(router.route(MODEL, P, candidates=["b"]))["b"] == (0, 0, 4.0)
    r = router.route(MODEL, P, request_id="r4")
    assert scores(r) == {"a": (16, 4, 4.0), "b": (0, 1, 5.0)}
    assert r.worker == "a"
    assert router.loads() == {"a": 5, "b": 1}
    # with load_weight 0.5 the queue counts for half
    heavy = f.router(load_weight=0.5, speculative_ttl=0)
    assert scores(heavy.route(MODEL, P))["a"] == (16, 0, 0.0)


def test_least_load_and_random() -> None:
    f = Fleet("a", "b", "c")
    hold(f.index, "a", P, ["GPU"] * 4)
    router = f.router(policy="least-load", speculative_ttl=0)
    chosen = [router.route(MODEL, P, request_id=f"r{i}").worker for i in range(6)]
    assert Counter(chosen) == {"a": 2, "b": 2, "c": 2}  # the cache does not matter
    assert scores(router.route(MODEL, P))["a"][2] == 2.0
    rnd = f.router(policy="random", speculative_ttl=0)
    picks = Counter(rnd.route(MODEL, P).worker for _ in range(60))
    assert set(picks) == {"a", "b", "c"}
    assert router.routes == {"prefix": 0, "prefix-load": 0, "least-load": 7, "random": 0}
    assert rnd.routes["random"] == 60


def test_policy_per_call_and_ties_are_random() -> None:
    f = Fleet("a", "b", "c")
    router = f.router(speculative_ttl=0)
    seen: Counter[str] = Counter()
    for i in range(60):
        r = router.route(MODEL, P, policy="prefix", request_id=f"r{i}")
        router.release(f"r{i}")
        seen[r.worker] += 1
        assert r.policy == "prefix"
    assert set(seen) == {"a", "b", "c"}
    assert router.routes["prefix"] == 60 and router.routes["prefix-load"] == 0


# -------------------------------------------------------------------- load


def test_load_counts_until_release_or_the_ttl() -> None:
    f = Fleet("a", "b")
    router = f.router(load_ttl=10.0, speculative_ttl=0, policy="least-load")
    router.route(MODEL, P, request_id="r1", candidates=["a"])
    router.route(MODEL, P, request_id="r2", candidates=["a"])
    router.route(MODEL, P, candidates=["b"])  # no id: counts until the TTL
    assert router.loads() == {"a": 2, "b": 1}
    assert router.release("r1") and not router.release("r1") and not router.release("zz")
    assert router.loads() == {"a": 1, "b": 1}
    # routing a request again moves its load
    router.route(MODEL, P, request_id="r2", candidates=["b"])
    assert router.loads() == {"b": 2}
    f.now += 5
    router.route(MODEL, P, request_id="r3", candidates=["a"])
    assert router.loads() == {"a": 1, "b": 2}
    f.now += 5  # r2 and the anonymous route are 10 s old
    assert router.loads() == {"a": 1}
    assert not router.release("r2")
    f.now += 5
    assert router.loads() == {}


# ------------------------------------------------------------- speculation


def test_a_burst_of_one_prefix_lands_together_before_events_arrive(tmp_path: Path) -> None:
    f = Fleet("a", "b", "c")
    router = f.router(speculative_ttl=2.0)
    first = router.route(MODEL, P, request_id="r0")
    burst = [router.route(MODEL, P, request_id=f"r{i}").worker for i in range(1, 3)]
    # the second sees cost 0 + 1 on `first` against 4 elsewhere; the third 0 + 2
    assert burst == [first.worker] * 2
    assert scores(router.route(MODEL, P, request_id="r3"))[first.worker][0] == 16
    # a prompt sharing two blocks is steered too; an unrelated one is not
    shared = [*P[:8], 1, 2, 3, 4]
    assert scores(router.route(MODEL, shared, policy="prefix"))[first.worker][:1] == (8,)
    assert all(s.matched_tokens == 0 for s in router.route(MODEL, Q, policy="prefix").scores)
    # the index never sees speculative holdings: match, stats and snapshots
    assert f.index.match(MODEL, P) == {"a": 0, "b": 0, "c": 0, "other": 0}
    assert f.index.stats()["holdings"] == 1
    f.index.save(tmp_path / "snap")
    assert kvsync.Index.load(tmp_path / "snap").match(MODEL, P)[first.worker] == 0
    # after the TTL the holdings are gone
    f.now += 2.0
    r = router.route(MODEL, P, policy="prefix")
    assert all(s.matched_tokens == 0 for s in r.scores)


def test_long_prompts_record_a_sample_of_positions_and_round_down() -> None:
    """A route records the keys of the first 16 blocks, every 16th block and
    the last (each key names its whole prefix): a later prompt sharing 35 of
    40 blocks is credited with 32, never more than it shares."""
    from kvsync.routing import _sampled

    assert _sampled(0) == () and _sampled(3) == (0, 1, 2)
    assert _sampled(40) == (*range(16), 31, 39)
    assert _sampled(512)[-2:] == (495, 511) and len(_sampled(512)) == 16 + 31
    f = Fleet("a", "b")
    router = f.router(speculative_ttl=2.0)
    long = [t + 1000 for t in range(40 * BS)]
    first = router.route(MODEL, long, request_id="r0").worker
    shares = [*long[: 35 * BS], *[9] * (5 * BS)]
    got = scores(router.route(MODEL, shares, policy="prefix"))[first]
    assert got[0] == 32 * BS
    # the whole prompt again: all 40 (its last key is recorded)
    assert scores(router.route(MODEL, long, policy="prefix"))[first][0] == 40 * BS
    # sharing 10 blocks (inside the head): exact
    ten = [*long[: 10 * BS], *[9] * (30 * BS)]
    assert scores(router.route(MODEL, ten, policy="prefix"))[first][0] == 10 * BS


def test_speculation_off_scatters_a_burst() -> None:
    f = Fleet("a", "b")
    router = f.router(speculative_ttl=0)
    picks = {router.route(MODEL, P, request_id=f"r{i}").worker for i in range(2)}
    assert picks == {"a", "b"}


def test_speculative_blocks_count_as_gpu_over_real_ones() -> None:
    f = Fleet("a", "b")
    hold(f.index, "a", P, ["CPU", "CPU", "CPU", "CPU"])  # 3.0
    hold(f.index, "b", P, ["GPU"])  # 1.0
    router = f.router(policy="prefix")
    router.route(MODEL, P[:8], candidates=["a"])  # a: blocks 0-1 also "in GPU"
    router.route(MODEL, P[:12], candidates=["b"])  # b: blocks 0-2 "in GPU"
    s = scores(router.route(MODEL, P))
    assert s["a"] == (16, 1, 2 * 1.0 + 2 * 0.75)
    assert s["b"] == (12, 1, 3.0)


@pytest.mark.parametrize(
    "tokens",
    [np.array(P, dtype=np.uint32), np.array(P, dtype=np.int64), array("I", P), tuple(P)],
    ids=["numpy-uint32", "numpy-int64", "array-I", "tuple"],
)
def test_token_buffers_route_like_lists_through_the_speculative_head(tokens: Any) -> None:
    f = Fleet("a")
    hold(f.index, "a", P, ["CPU"] * 4)
    router = f.router(policy="prefix")
    router.route(MODEL, tokens[: 2 * BS])
    # blocks 0-1 count as GPU (routed just now), 2-3 as the CPU they are in
    assert scores(router.route(MODEL, tokens))["a"] == (16, 1, 3.5)


def test_speculation_keeps_adapters_and_extra_keys_apart() -> None:
    f = Fleet("a", "b")
    router = f.router(policy="prefix", seed=1)
    plain = router.route(MODEL, P).worker
    other = ({"a", "b"} - {plain}).pop()
    # the same tokens under an adapter, or with an image in block 0, are
    # other blocks: nothing is held speculatively for them yet
    assert scores(router.route(MODEL, P, lora="sql", candidates=[other]))[other][0] == 0
    assert scores(router.route(MODEL, P, lora="sql"))[other][0] == 16
    assert scores(router.route(MODEL, P, lora="sql"))[plain][0] == 0
    img = [["img-1"], None, None, None]
    first = router.route(MODEL, P, extra_keys=img)
    assert all(s.matched_tokens == 0 for s in first.scores)
    again = router.route(MODEL, P, extra_keys=img)
    assert again.worker == first.worker and again.matched_tokens == 16


def test_concurrent_routes_and_releases_keep_the_books() -> None:
    f = Fleet("a", "b", "c")
    hold(f.index, "a", P, ["GPU"] * 2)
    router = f.router()
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(200):
                rid = f"{n}-{i}"
                router.route(MODEL, P if i % 2 else Q, request_id=rid)
                assert router.release(rid)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors
    assert router.loads() == {}
    assert router.routes["prefix-load"] == 800


# ----------------------------------------------------------- eligibility


def test_not_ready_disconnected_and_stopped_workers_are_never_chosen() -> None:
    f = Fleet("a", info("b", ready=False), "c", "d", "e")
    for w in "abcde":
        hold(f.index, w, P, ["GPU"] * (4 if w != "e" else 1))
    f.states.update(c="disconnected", d="stopped", e="degraded")
    router = f.router(policy="prefix")
    for _ in range(10):
        r = router.route(MODEL, P)
        assert r.worker in {"a", "e"}
        assert {s.worker for s in r.scores} == {"a", "e"}
    f.states.update(a="connecting", e="stopped")
    assert router.route(MODEL, P).worker == "a"
    f.states["a"] = "disconnected"
    with pytest.raises(kvsync.NoEligibleWorkerError) as e:
        router.route(MODEL, P)
    assert str(e.value) == (
        "no eligible worker for model 'llama': a disconnected, b not ready, c disconnected, "
        "d stopped, e stopped"
    )
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, kvsync.Error)


def test_candidates_are_instance_or_worker_ids() -> None:
    f = Fleet(info("s/dp0", "s"), info("s/dp1", "s", rank=1), "b")
    hold(f.index, "b", P, ["GPU"] * 4)
    router = f.router(policy="prefix", speculative_ttl=0)
    assert router.route(MODEL, P).worker == "b"
    picks = {router.route(MODEL, P, candidates=["s"], request_id=f"r{i}").worker for i in range(4)}
    assert picks == {"s/dp0", "s/dp1"}
    r = router.route(MODEL, P, candidates=("s/dp1", "nobody"))
    assert (r.worker, r.instance, [s.worker for s in r.scores]) == ("s/dp1", "s", ["s/dp1"])
    with pytest.raises(kvsync.NoEligibleWorkerError, match="b not in candidates, s/dp0 not in"):
        router.route(MODEL, P, candidates=["nobody"])


# ------------------------------------------------------------------ errors


def test_errors() -> None:
    f = Fleet("a")
    router = f.router()
    with pytest.raises(kvsync.NoWorkersError, match="no worker serves model 'qwen'") as e:
        router.route("qwen", P)
    assert isinstance(e.value, LookupError) and isinstance(e.value, kvsync.Error)
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        router.route(MODEL, P, policy="fastest")
    with pytest.raises(ValueError, match="unknown routing policy 'x'"):
        f.router(policy="x")
    with pytest.raises(ValueError, match="unknown tier 'hbm'"):
        f.router(tier_weights={"hbm": 1.0})
    with pytest.raises(ValueError, match=r"tier_weights\['cpu'\] must be a finite number >= 0"):
        f.router(tier_weights={"cpu": math.nan})
    for name in ("load_weight", "load_ttl", "speculative_ttl"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got -1"):
            f.router(**{name: -1})
    with pytest.raises(ValueError, match="outside 0"):
        router.route(MODEL, [1, -2, 3, 4])
    assert router.routes["prefix-load"] == 0  # failed routes are not counted


def test_route_to_dict_is_the_v1_route_answer() -> None:
    f = Fleet("a")
    hold(f.index, "a", Q, ["GPU", "STORAGE"])
    d = f.router().route(MODEL, Q).to_dict()
    assert d == {
        "instance": "a",
        "worker": "a",
        "host": "host-a",
        "matched_tokens": 8,
        "blocks": 4,
        "policy": "prefix-load",
        "scores": [{"instance": "a", "worker": "a", "matched_tokens": 8, "load": 0, "score": 2.75}],
    }


def test_custom_tier_weights_and_an_unknown_block_size() -> None:
    f = Fleet("a", "b")
    hold(f.index, "a", P, ["STORAGE", "STORAGE"])
    hold(f.index, "b", P, ["CPU"])
    router = f.router(policy="prefix", tier_weights={"storage": 1.0, "cpu": 0.1})
    assert scores(router.route(MODEL, P)) == {"a": (8, 0, 2.0), "b": (4, 0, pytest.approx(0.1))}
    # a model whose block size nothing has told yet: no blocks, no tokens
    lonely = kvsync.Router(kvsync.Index(), lambda: {"x": info("x")}, speculative_ttl=0)
    lonely.index.add_worker("x", MODEL)
    r = lonely.route(MODEL, P)
    assert (r.worker, r.blocks, r.matched_tokens) == ("x", 0, 0)


# ---------------------------------------------------------------- property

MEDIA = st.sampled_from(["GPU", "CPU", "STORAGE"])
WORKER = st.fixed_dictionaries(
    {
        "tiers": st.lists(MEDIA, max_size=4),
        "speculative": st.integers(0, 4),  # leading blocks of P routed to it just now
        "ready": st.booleans(),
        "state": st.sampled_from(["live", "degraded", "connecting", "disconnected", "stopped"]),
        "load": st.integers(0, 3),
    }
)


@given(
    workers=st.lists(WORKER, min_size=1, max_size=5),
    policy=st.sampled_from(POLICIES),
    load_weight=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
    seed=st.integers(0, 2**32),
)
def test_the_chosen_worker_minimises_the_policys_cost(
    workers: list[dict[str, Any]], policy: str, load_weight: float, seed: int
) -> None:
    f = Fleet(*(f"w{i}" for i in range(len(workers))))
    router = f.router(load_weight=load_weight, seed=seed)
    for i, w in enumerate(workers):
        wid = f"w{i}"
        hold(f.index, wid, P, w["tiers"])
        if w["speculative"]:
            router.route(MODEL, P[: w["speculative"] * BS], candidates=[wid], request_id="s")
            router.release("s")
        for j in range(w["load"]):
            router.route(MODEL, Q, candidates=[wid], request_id=f"{wid}-{j}")
        f.states[wid] = w["state"]
        f.workers[wid] = info(wid, ready=w["ready"])
    eligible = {
        f"w{i}": w
        for i, w in enumerate(workers)
        if w["ready"] and w["state"] not in ("disconnected", "stopped")
    }
    if not eligible:
        with pytest.raises(kvsync.NoEligibleWorkerError):
            router.route(MODEL, P, policy=policy)
        return
    r = router.route(MODEL, P, policy=policy)
    # The model: block i counts GPU while it is speculatively held, else its
    # real tier; the walk ends where neither holds it.
    held = {wid: max(len(w["tiers"]), w["speculative"]) for wid, w in eligible.items()}
    value = {
        wid: sum(1.0 if b < w["speculative"] else WEIGHT[w["tiers"][b]] for b in range(held[wid]))
        for wid, w in eligible.items()
    }
    load = {wid: w["load"] for wid, w in eligible.items()}
    cost = {wid: 4 - value[wid] + load_weight * load[wid] for wid in eligible}
    assert {s.worker for s in r.scores} == set(eligible)
    for s in r.scores:
        assert s.matched_tokens == held[s.worker] * BS
        assert s.load == load[s.worker]
    assert r.worker in eligible
    assert r.matched_tokens == held[r.worker] * BS
    if policy == "prefix-load":
        assert cost[r.worker] == pytest.approx(min(cost.values()))
        assert r.scores[0].score == pytest.approx(cost[r.worker])
    elif policy == "prefix":
        rank = {w: (-value[w], load[w]) for w in eligible}
        best = min(rank.values())
        assert rank[r.worker][1] == best[1]
        assert value[r.worker] == pytest.approx(-best[0])
    elif policy == "least-load":
        assert load[r.worker] == min(load.values())
