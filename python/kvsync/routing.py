"""The router: which worker should serve a prompt (SPEC section 7).

A worker's cached value for a prompt walks the prompt's full blocks from
the first: each block the worker holds counts the weight of its best tier
(GPU 1.0, CPU 0.75, storage 0.25 by default), and the walk stops at the
first block it holds in no tier. Its load is the number of requests routed
to it and neither released nor older than ``load_ttl``. Policies:

- ``prefix``: highest cached value; ties -> lowest load -> random;
- ``prefix-load`` (default): lowest cost = prompt blocks - cached value
  + ``load_weight`` * load (blocks of queued work); ties -> random;
- ``least-load``: lowest load; ties -> random;
- ``random``.

A route to W makes W count as holding the prompt's blocks in GPU for
``speculative_ttl`` seconds, so a burst of one prefix lands together
before the engine's events arrive. These speculative holdings live here
only: the index, its matches and its snapshots never see them.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvsync._core import Index
from kvsync.discovery.reconciler import WorkerInfo
from kvsync.errors import NoEligibleWorkerError, NoWorkersError

__all__ = ["DEFAULT_TIER_WEIGHTS", "POLICIES", "Route", "Router", "Score"]

POLICIES = ("prefix", "prefix-load", "least-load", "random")
TIERS = ("gpu", "cpu", "storage")
DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"gpu": 1.0, "cpu": 0.75, "storage": 0.25}
# Worker states a route must avoid: the engine is gone or no longer followed.
UNROUTABLE_STATES = frozenset({"disconnected", "stopped"})
# Costs this close are equal: sums of the same weights in another order.
_EPS = 1e-9


@dataclass(frozen=True)
class Score:
    """One eligible worker as the policy saw it. ``score`` is what the
    policy ranks by: the cached value (``prefix``, higher wins), the cost
    (``prefix-load``, lower wins), the load (``least-load``), 0 (``random``)."""

    instance: str
    worker: str
    matched_tokens: int
    load: int
    score: float


@dataclass(frozen=True)
class Route:
    """The chosen worker; ``scores`` lists every eligible worker, best first."""

    instance: str
    worker: str
    host: str
    matched_tokens: int
    blocks: int
    policy: str
    scores: list[Score]

    def to_dict(self) -> dict[str, Any]:
        """The ``/v1/route`` answer."""
        return asdict(self)


@dataclass
class _Candidate:
    info: WorkerInfo
    matched: int  # leading blocks held in any tier, real or speculative
    value: float
    load: int
    cost: float = 0.0


class Router:
    """Chooses a worker for each prompt among the ones ``workers()`` lists
    for the model (``Reconciler.workers``), using what ``index`` holds.

    ``states()`` maps worker ids to their stream state
    (``EventManager.status``); workers ``disconnected`` or ``stopped``, and
    workers whose ``ready`` is False, are never chosen. ``clock`` is the
    time source of the TTLs (seconds). Thread-safe."""

    def __init__(
        self,
        index: Index,
        workers: Callable[[], Mapping[str, WorkerInfo]],
        *,
        states: Callable[[], Mapping[str, str]] | None = None,
        policy: str = "prefix-load",
        tier_weights: Mapping[str, float] | None = None,
        load_weight: float = 1.0,
        load_ttl: float = 300.0,
        speculative_ttl: float = 2.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_policy(policy)
        weights = dict(DEFAULT_TIER_WEIGHTS)
        for tier, w in (tier_weights or {}).items():
            if tier not in TIERS:
                raise ValueError(f"tier_weights: unknown tier {tier!r} (one of {TIERS})")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"tier_weights[{tier!r}] must be a finite number >= 0, got {w!r}")
            weights[tier] = float(w)
        for name, v in (
            ("load_weight", load_weight),
            ("load_ttl", load_ttl),
            ("speculative_ttl", speculative_ttl),
        ):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        self.index = index
        self.policy = policy
        self.tier_weights = weights
        self.load_weight = float(load_weight)
        self.load_ttl = float(load_ttl)
        self.speculative_ttl = float(speculative_ttl)
        self._workers = workers
        self._states = states
        self._clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._routes = dict.fromkeys(POLICIES, 0)
        # request id -> (worker, expiry); one TTL, so insertion order is expiry order
        self._inflight: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._load: Counter[str] = Counter()
        self._anonymous = itertools.count()
        # Speculative holdings: routes in expiry order, and per model the
        # prompt keys routed to each worker (key -> {worker: routes}).
        self._spec_log: deque[tuple[float, str, str, tuple[int, ...]]] = deque()
        self._spec: dict[str, dict[int, Counter[str]]] = {}

    # ------------------------------------------------------------- public

    @property
    def routes(self) -> dict[str, int]:
        """Routes answered per policy (``kvsync_routes_total``)."""
        with self._lock:
            return dict(self._routes)

    def loads(self) -> dict[str, int]:
        """Requests routed and not released or expired, per worker."""
        with self._lock:
            self._expire(self._clock())
            return dict(self._load)

    def release(self, request_id: str) -> bool:
        """The request finished; False if it was unknown, released or expired."""
        with self._lock:
            self._expire(self._clock())
            entry = self._inflight.pop(request_id, None)
            if entry is None:
                return False
            self._unload(entry[0])
            return True

    def route(
        self,
        model: str,
        token_ids: Any,
        *,
        lora: str | int | None = None,
        extra_keys: Sequence[Sequence[Any] | None] | None = None,
        candidates: Iterable[str] | None = None,
        policy: str | None = None,
        request_id: str | None = None,
    ) -> Route:
        """Choose a worker of ``model`` for the prompt ``token_ids``.

        ``candidates`` (instance or worker ids) narrows the choice. Without
        a ``request_id`` the route counts as load until ``load_ttl``; with
        one, until ``release(request_id)`` (or the TTL).

        Raises ``NoWorkersError`` when no worker serves ``model``,
        ``NoEligibleWorkerError`` naming why none may be chosen, and
        ``ValueError`` for an unknown policy."""
        policy = self.policy if policy is None else policy
        _check_policy(policy)
        infos = [i for i in self._workers().values() if i.model == model]
        if not infos:
            raise NoWorkersError(f"no worker serves model {model!r}")
        eligible = self._eligible(model, infos, candidates)
        g, c, s = (self.tier_weights[t] for t in TIERS)
        real, keys = self.index.scores_and_keys(
            model, token_ids, lora, extra_keys, weights=(g, c, s)
        )
        with self._lock:
            now = self._clock()
            self._expire(now)
            spec = self._speculative(model, keys)
            scored = []
            for info in eligible:
                n, value = real.get(info.worker, (0, 0.0))
                held = spec.get(info.worker, 0)
                if held and held >= n:
                    n, value = held, held * g
                elif held:
                    # The first `held` blocks count as GPU, the rest as they are.
                    head = self._head_value(model, token_ids, lora, extra_keys, held, info.worker)
                    value = value - head + held * g
                scored.append(_Candidate(info, n, value, self._load[info.worker]))
            chosen, ranked = self._choose(policy, scored, len(keys))
            self._record(model, chosen.info.worker, keys, request_id, now)
            self._routes[policy] += 1
        bs = self.index.block_size(model) or 0
        return Route(
            instance=chosen.info.instance,
            worker=chosen.info.worker,
            host=chosen.info.host,
            matched_tokens=chosen.matched * bs,
            blocks=len(keys),
            policy=policy,
            scores=[
                Score(
                    instance=x.info.instance,
                    worker=x.info.worker,
                    matched_tokens=x.matched * bs,
                    load=x.load,
                    score=_score(policy, x),
                )
                for x in ranked
            ],
        )

    # ---------------------------------------------------------- internals

    def _eligible(
        self, model: str, infos: list[WorkerInfo], candidates: Iterable[str] | None
    ) -> list[WorkerInfo]:
        states = self._states() if self._states is not None else {}
        wanted = None if candidates is None else set(candidates)
        eligible: list[WorkerInfo] = []
        why: list[str] = []
        for info in sorted(infos, key=lambda i: i.worker):
            state = states.get(info.worker)
            if wanted is not None and info.worker not in wanted and info.instance not in wanted:
                why.append(f"{info.worker} not in candidates")
            elif not info.ready:
                why.append(f"{info.worker} not ready")
            elif state in UNROUTABLE_STATES:
                why.append(f"{info.worker} {state}")
            else:
                eligible.append(info)
        if not eligible:
            raise NoEligibleWorkerError(f"no eligible worker for model {model!r}: {', '.join(why)}")
        return eligible

    def _choose(
        self, policy: str, scored: list[_Candidate], blocks: int
    ) -> tuple[_Candidate, list[_Candidate]]:
        """The chosen candidate and all of them best first."""
        self._rng.shuffle(scored)  # ties go to a random one of the best
        if policy == "random":
            return scored[0], scored
        for x in scored:
            x.cost = blocks - x.value + self.load_weight * x.load
        ranks = [(_rank(policy, x), x) for x in scored]
        best = min(r for r, _ in ranks)
        ties = [x for r, x in ranks if _close(r, best)]
        rest = sorted((rx for rx in ranks if not _close(rx[0], best)), key=lambda rx: rx[0])
        return ties[0], ties + [x for _, x in rest]

    def _head_value(
        self,
        model: str,
        token_ids: Any,
        lora: str | int | None,
        extra_keys: Sequence[Sequence[Any] | None] | None,
        blocks: int,
        worker: str,
    ) -> float:
        """The cached value of the prompt's first ``blocks`` blocks alone."""
        n = blocks * (self.index.block_size(model) or 0)
        try:
            head = token_ids[:n]
        except TypeError:  # a buffer without slicing
            head = memoryview(token_ids)[:n]
        keys = None if extra_keys is None else extra_keys[:blocks]
        weights = (self.tier_weights["gpu"], self.tier_weights["cpu"], self.tier_weights["storage"])
        scores = self.index.match_scores(model, head, lora, keys, weights=weights)
        return scores.get(worker, (0, 0.0))[1]

    def _record(
        self, model: str, worker: str, keys: list[int], request_id: str | None, now: float
    ) -> None:
        if request_id is None:
            request_id = f"\0anonymous-{next(self._anonymous)}"
        old = self._inflight.pop(request_id, None)
        if old is not None:  # routed again: its load moves
            self._unload(old[0])
        self._inflight[request_id] = (worker, now + self.load_ttl)
        self._load[worker] += 1
        if self.speculative_ttl > 0 and keys:
            held = tuple(keys[i] for i in _sampled(len(keys)))
            self._spec_log.append((now + self.speculative_ttl, model, worker, held))
            table = self._spec.setdefault(model, {})
            for k in held:
                table.setdefault(k, Counter())[worker] += 1

    def _expire(self, now: float) -> None:
        while self._inflight:
            rid, (worker, expiry) = next(iter(self._inflight.items()))
            if expiry > now:
                break
            del self._inflight[rid]
            self._unload(worker)
        while self._spec_log and self._spec_log[0][0] <= now:
            _, model, worker, keys = self._spec_log.popleft()
            table = self._spec[model]
            for k in keys:
                holders = table[k]
                holders[worker] -= 1
                if holders[worker] <= 0:
                    del holders[worker]
                    if not holders:
                        del table[k]
            if not table:
                del self._spec[model]

    def _unload(self, worker: str) -> None:
        self._load[worker] -= 1
        if self._load[worker] <= 0:
            del self._load[worker]  # workers come and go: keep no zeros

    def _speculative(self, model: str, keys: list[int]) -> dict[str, int]:
        """Leading blocks of the prompt each worker holds speculatively: the
        longest recorded prefix of it among the worker's recent routes."""
        table = self._spec.get(model)
        held: dict[str, int] = {}
        if not table:
            return held
        for i in reversed(_sampled(len(keys))):
            holders = table.get(keys[i])
            if holders:
                for w in holders:
                    held.setdefault(w, i + 1)
        return held


# Positions of a prompt's keys that speculative holdings record: each of the
# first SPEC_HEAD blocks, every SPEC_STRIDE-th after, and the last. A key
# names its whole prefix (it chains every block before it), so key i in a
# worker's routes means the worker holds the first i + 1 blocks: a sample is
# a sound lower bound that bounds the work of a route (47 keys for 512
# blocks instead of 512), rounding a long shared prefix down to a recorded
# position (for routing only; the index is exact).
SPEC_HEAD = 16
SPEC_STRIDE = 16


@functools.lru_cache(maxsize=4096)
def _sampled(n: int) -> tuple[int, ...]:
    positions = [*range(min(n, SPEC_HEAD)), *range(SPEC_HEAD + SPEC_STRIDE - 1, n, SPEC_STRIDE)]
    if n and positions[-1] != n - 1:
        positions.append(n - 1)
    return tuple(positions)


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown routing policy {policy!r} (one of {', '.join(POLICIES)})")


def _rank(policy: str, x: _Candidate) -> tuple[float, ...]:
    """Lower ranks first."""
    if policy == "prefix":
        return (-x.value, x.load)
    if policy == "least-load":
        return (x.load,)
    return (x.cost,)


def _score(policy: str, x: _Candidate) -> float:
    if policy == "prefix":
        return x.value
    if policy == "least-load":
        return float(x.load)
    if policy == "random":
        return 0.0
    return x.cost


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(abs(p - q) <= _EPS * max(1.0, abs(p), abs(q)) for p, q in zip(a, b, strict=True))
