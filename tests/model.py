"""A small, plainly correct model of the index, written from SPEC.md sections
1, 2 and 4 and, where SPEC is silent, from docs/choices.md (never from the
Rust code, so a misreading of SPEC there is not copied here).

Prefix keys are tuples ``(model, namespace, blocks)``: ``blocks`` is the whole
token path from the root, one ``(tokens, extra_keys)`` pair per block. Two keys
are equal exactly when model, LoRA, every token and every extra key agree, so
the model needs no hash function: the answers do not depend on hash values.
Per worker it keeps the engine-hash -> prefix-key map of SPEC section 2 and
the holdings prefix-key -> tiers; everything is a dict or a set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Key = tuple[Any, ...]
TIERS = ("gpu", "cpu", "storage")
MASK64 = (1 << 64) - 1


def tier_of(medium: Any) -> str:
    """SPEC 2: GPU (also nil), CPU (CPU, CPU_PINNED), STORAGE (everything else).
    Spelling is compared case-insensitively (docs/choices.md, "Media")."""
    name = "GPU" if medium is None else str(medium).upper()
    if name == "GPU":
        return "gpu"
    if name in ("CPU", "CPU_PINNED"):
        return "cpu"
    return "storage"


def engine_hash(group_idx: int | None, h: int | bytes) -> tuple[int, int | bytes]:
    """SPEC 2: engine hashes are keyed by (group_idx, hash). An int is a 64-bit
    word whatever its msgpack signedness (docs/choices.md, "Engine hashes")."""
    return (group_idx or 0, h & MASK64 if isinstance(h, int) else h)


def canon(v: Any) -> Any:
    """An extra key as a hashable value that keeps msgpack types apart
    (True is not 1, "a" is not b"a", a list is an ordered tuple)."""
    if isinstance(v, list | tuple):
        return ("array", tuple(canon(x) for x in v))
    return (type(v).__name__, v)


def uncanon(c: Any) -> Any:
    return [uncanon(x) for x in c[1]] if c[0] == "array" else c[1]


def namespace(lora_name: Any, lora_id: Any) -> Any:
    """SPEC 2: namespaces by lora_name or lora_id; the name wins when both are
    sent, since queries name adapters (docs/choices.md, "LoRA")."""
    if lora_name is not None:
        return ("name", lora_name)
    if lora_id is not None:
        return ("id", lora_id)
    return None


def effective(ns: Any) -> Any:
    """The namespace a chain continues in: its own, or for a chain that
    crossed namespaces, the last one it was stored under."""
    if isinstance(ns, tuple) and ns and ns[0] == "mixed":
        return ns[2]
    return ns


def query_namespace(lora: Any) -> Any:
    if lora is None:
        return None
    return ("name", lora) if isinstance(lora, str) else ("id", lora)


@dataclass
class Counts:
    """What one apply did, in block events (docs/choices.md, "Counters")."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    orphaned: int = 0
    ignored: int = 0
    unknown_removals: int = 0

    @property
    def skipped(self) -> int:
        return self.orphaned + self.ignored + self.unknown_removals

    def add(self, other: Counts) -> None:
        for name in ("stored", "removed", "cleared", "orphaned", "ignored", "unknown_removals"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Worker:
    model: str
    emap: dict[tuple[int, Any], Key] = field(default_factory=dict)
    hold: dict[Key, set[str]] = field(default_factory=dict)
    last_seq: int | None = None

    def resolve(self, gh: tuple[int, Any]) -> Key | None:
        return self.emap.get(gh)

    def put(self, gh: tuple[int, Any], key: Key, tier: str) -> None:
        old = self.emap.get(gh)
        if old is not None and old != key:
            # The hash now names other content: the old block can no longer be
            # removed through it, so it is dropped (docs/choices.md, "Re-stored
            # hashes"). Other hashes naming it still name it.
            self.hold.pop(old, None)
        self.emap[gh] = key
        self.hold.setdefault(key, set()).add(tier)

    def drop(self, gh: tuple[int, Any], tier: str) -> None:
        key = self.emap[gh]
        tiers = self.hold.get(key, set())
        tiers.discard(tier)
        if not tiers:
            # Held nowhere now: this hash names nothing the worker holds
            # (docs/choices.md, "Forgotten hashes").
            self.hold.pop(key, None)
            del self.emap[gh]

    def purge(self) -> None:
        self.emap.clear()
        self.hold.clear()


class ModelIndex:
    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        # SPEC 2: learnt from the events; forgotten with the model's last
        # worker, re-learnt while the model indexes nothing (docs/choices.md,
        # "Block size").
        self.block_size: dict[str, int] = {}

    # -- workers -----------------------------------------------------------
    def add_worker(self, wid: str, model: str) -> None:
        self.workers.setdefault(wid, Worker(model))

    def remove_worker(self, wid: str) -> bool:
        w = self.workers.pop(wid, None)
        if w is None:
            return False
        if not any(o.model == w.model for o in self.workers.values()):
            self.block_size.pop(w.model, None)
        return True

    def purge_worker(self, wid: str) -> None:
        """Drops everything, the last seq included: the worker's stream starts
        over (docs/choices.md, "Workers")."""
        self.workers[wid].purge()
        self.workers[wid].last_seq = None

    def apply_many(
        self, wid: str, batches: list[list[dict[str, Any]]], first_seq: int | None = None
    ) -> Counts:
        """SPEC 4: each payload in order; with a seq, the last applied one is
        recorded (for snapshots and resuming)."""
        counts = Counts()
        for i, batch in enumerate(batches):
            counts.add(self.apply(wid, batch))
            if first_seq is not None:
                self.workers[wid].last_seq = first_seq + i
        return counts

    # -- events ------------------------------------------------------------
    def apply(self, wid: str, events: list[dict[str, Any]]) -> Counts:
        counts = Counts()
        w = self.workers[wid]
        for ev in events:
            if ev["type"] == "BlockStored":
                self._stored(w, ev, counts)
            elif ev["type"] == "BlockRemoved":
                tier = tier_of(ev.get("medium"))
                for h in ev["block_hashes"]:
                    gh = engine_hash(ev.get("group_idx"), h)
                    if w.resolve(gh) is None:
                        counts.unknown_removals += 1
                    else:
                        w.drop(gh, tier)
                        counts.removed += 1
            elif ev["type"] == "AllBlocksCleared":
                w.purge()
                counts.cleared += 1
        return counts

    def _stored(self, w: Worker, ev: dict[str, Any], counts: Counts) -> None:
        hashes = ev["block_hashes"]
        n = len(hashes)
        group = ev.get("group_idx")
        tier = tier_of(ev.get("medium"))
        if ev.get("kv_cache_spec_kind") not in (None, "full_attention"):
            counts.ignored += n
            return
        tokens = ev.get("token_ids") or []
        if not tokens:
            # An offload of blocks already known (docs/choices.md, "Tokenless stores").
            for h in hashes:
                gh = engine_hash(group, h)
                key = w.resolve(gh)
                if key is None:
                    counts.orphaned += 1
                else:
                    w.put(gh, key, tier)
                    counts.stored += 1
            return
        if ev.get("block_size") == 0:
            # A block size of 0 is no configuration: refused, never learnt.
            counts.ignored += n
            return
        bs = ev.get("block_size") or len(tokens) // n
        if bs * n != len(tokens):
            counts.ignored += n
            return
        known = self.block_size.get(w.model)
        if known is not None and known != bs:
            # Another block size: only while the model indexes nothing may it
            # change (a redeploy); otherwise the store is ignored.
            busy = any(o.hold or o.emap for o in self.workers.values() if o.model == w.model)
            if busy:
                counts.ignored += n
                return
        self.block_size[w.model] = bs
        parent = ev.get("parent_block_hash")
        if parent is None:
            ns = namespace(ev.get("lora_name"), ev.get("lora_id"))
            prefix: Key = (w.model, ns, ())
        else:
            found = w.resolve(engine_hash(group, parent))
            if found is None:
                counts.orphaned += n
                return
            prefix = found
            own = namespace(ev.get("lora_name"), ev.get("lora_id"))
            if effective(prefix[1]) != own:
                # docs/choices.md: a store continues its parent's chain in its
                # own namespace; a parent of another namespace makes a chain
                # no query of either namespace can reach.
                prefix = (prefix[0], ("mixed", prefix[1], own), prefix[2])
        model, ns, blocks = prefix
        extra_keys = ev.get("extra_keys") or []
        for i, h in enumerate(hashes):
            extras = [
                x
                for x in ((extra_keys[i] if i < len(extra_keys) else None) or [])
                if not (isinstance(x, str) and x == ev.get("lora_name"))
            ]
            if i == 0 and parent is None and ev.get("cache_salt") is not None:
                extras.append(ev["cache_salt"])
            block = (tuple(tokens[i * bs : (i + 1) * bs]), tuple(canon(x) for x in extras))
            blocks = (*blocks, block)
            w.put(engine_hash(group, h), (model, ns, blocks), tier)
            counts.stored += 1

    # -- queries -----------------------------------------------------------
    def query_keys(
        self, model: str, tokens: list[int], lora: Any, extra_keys: list[Any] | None
    ) -> list[Key]:
        bs = self.block_size.get(model)
        if bs is None:
            return []
        ns = query_namespace(lora)
        extra_keys = extra_keys or []
        keys: list[Key] = []
        blocks: tuple[Any, ...] = ()
        for i in range(len(tokens) // bs):
            extras = (extra_keys[i] if i < len(extra_keys) else None) or []
            block = (tuple(tokens[i * bs : (i + 1) * bs]), tuple(canon(x) for x in extras))
            blocks = (*blocks, block)
            keys.append((model, ns, blocks))
        return keys

    def match(
        self,
        model: str,
        tokens: list[int],
        lora: Any = None,
        extra_keys: list[Any] | None = None,
        tiers: tuple[str, ...] = TIERS,
    ) -> dict[str, int]:
        """SPEC 2/4: every worker of the model -> leading full blocks held in
        any of ``tiers``."""
        keys = self.query_keys(model, tokens, lora, extra_keys)
        out = {}
        for wid, w in self.workers.items():
            if w.model == model:
                n = 0
                while n < len(keys) and w.hold.get(keys[n], set()) & set(tiers):
                    n += 1
                out[wid] = n
        return out

    def match_detail(
        self, model: str, tokens: list[int], lora: Any = None, extra_keys: list[Any] | None = None
    ) -> dict[str, dict[str, int]]:
        per_tier = {t: self.match(model, tokens, lora, extra_keys, (t,)) for t in TIERS}
        every = self.match(model, tokens, lora, extra_keys)
        return {w: {**{t: per_tier[t][w] for t in TIERS}, "any": every[w]} for w in every}

    def match_scores(
        self,
        model: str,
        tokens: list[int],
        lora: Any = None,
        extra_keys: list[Any] | None = None,
        weights: tuple[float, float, float] = (1.0, 0.75, 0.25),
    ) -> dict[str, tuple[int, float]]:
        """SPEC 7: leading blocks held in any tier, each counting its best
        tier's weight."""
        keys = self.query_keys(model, tokens, lora, extra_keys)
        weight = dict(zip(TIERS, weights, strict=True))
        out = {}
        for wid, w in self.workers.items():
            if w.model == model:
                n, value = 0, 0.0
                while n < len(keys) and w.hold.get(keys[n]):
                    value += max(weight[t] for t in w.hold[keys[n]])
                    n += 1
                out[wid] = (n, value)
        return out

    def blocks(self) -> int:
        """SPEC 4: distinct prefix blocks held by any worker."""
        return len({k for w in self.workers.values() for k in w.hold})

    def holdings(self) -> int:
        """SPEC 4: (block, worker) pairs, whatever the tiers."""
        return sum(len(w.hold) for w in self.workers.values())

    def queries(self) -> list[tuple[str, list[int], Any, list[Any] | None]]:
        """A query for every held block: its whole token path from the root."""
        out = []
        for w in self.workers.values():
            for model, ns, blocks in w.hold:
                tokens = [t for toks, _ in blocks for t in toks]
                extras = [[uncanon(c) for c in ex] or None for _, ex in blocks]
                ns = effective(ns)  # an unreachable chain: asked in its last namespace
                lora = None if ns is None else ns[1]
                out.append((model, tokens, lora, extras if any(extras) else None))
        return out
