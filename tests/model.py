"""A small, plainly correct pure-Python model of SPEC section 2.

Prefix keys are nested tuples ``(parent_key, tokens, extras)`` rooted at
``("ns", model, lora)``: no hashing, so two keys are equal exactly when the
model, LoRA, token prefix and extra keys agree. The rules are the ones
written at the top of ``rust/core/src/index.rs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Key = tuple[Any, ...]
TIERS = {"gpu": 1, "cpu": 2, "storage": 4}


def tier_of(medium: str | None) -> int:
    if medium is None or medium.upper() == "GPU":
        return 1
    if medium.upper() in ("CPU", "CPU_PINNED"):
        return 2
    return 4


def canon(v: Any) -> Any:
    """A hashable, reversible form of an extra key."""
    if v is None:
        return ("nil",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return ("f", v)
    if isinstance(v, str):
        return ("s", v)
    if isinstance(v, bytes):
        return ("b", v)
    if isinstance(v, list | tuple):
        return ("a", tuple(canon(x) for x in v))
    raise TypeError(type(v))


def decanon(c: Any) -> Any:
    if c[0] == "nil":
        return None
    if c[0] == "a":
        return [decanon(x) for x in c[1]]
    return c[1]


def lora_ns(lora_name: str | None, lora_id: int | None) -> Any:
    if lora_name is not None:
        return ("name", lora_name)
    if lora_id is not None:
        return ("id", lora_id)
    return None


@dataclass
class Worker:
    model: str
    emap: dict[tuple[int, Any], Key] = field(default_factory=dict)
    hold: dict[Key, int] = field(default_factory=dict)


@dataclass
class Stats:
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    orphaned: int = 0
    ignored: int = 0
    unknown_removals: int = 0

    @property
    def skipped(self) -> int:
        return self.orphaned + self.ignored + self.unknown_removals


class ModelIndex:
    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.models: set[str] = set()
        self.block_size: dict[str, int] = {}

    def add_worker(self, wid: str, model: str) -> None:
        if wid not in self.workers:
            self.workers[wid] = Worker(model)
            self.models.add(model)

    def remove_worker(self, wid: str) -> bool:
        w = self.workers.pop(wid, None)
        if w is None:
            return False
        if not any(o.model == w.model for o in self.workers.values()):
            # the model is forgotten with its last worker (and its block size)
            self.models.discard(w.model)
            self.block_size.pop(w.model, None)
        return True

    def apply(self, wid: str, events: list[dict[str, Any]]) -> Stats:
        st = Stats()
        w = self.workers[wid]
        for ev in events:
            if ev["type"] == "BlockStored":
                self._stored(w, ev, st)
            elif ev["type"] == "BlockRemoved":
                tier = tier_of(ev.get("medium"))
                g = ev.get("group_idx") or 0
                for h in ev["block_hashes"]:
                    ek = (g, h)
                    if ek not in w.emap:
                        st.unknown_removals += 1
                        continue
                    k = w.emap[ek]
                    left = w.hold.get(k, 0) & ~tier
                    if left:
                        w.hold[k] = left
                    else:
                        w.hold.pop(k, None)
                        del w.emap[ek]
                    st.removed += 1
            elif ev["type"] == "AllBlocksCleared":
                w.emap.clear()
                w.hold.clear()
                st.cleared += 1
        return st

    def _stored(self, w: Worker, ev: dict[str, Any], st: Stats) -> None:
        hashes = ev["block_hashes"]
        n = len(hashes)
        if n == 0:
            return
        if ev.get("kv_cache_spec_kind") not in (None, "full_attention"):
            st.ignored += n
            return
        tier = tier_of(ev.get("medium"))
        g = ev.get("group_idx") or 0
        tokens = ev.get("token_ids") or []
        if not tokens:
            for h in hashes:
                if (g, h) in w.emap:
                    k = w.emap[(g, h)]
                    w.hold[k] = w.hold.get(k, 0) | tier
                    st.stored += 1
                else:
                    st.orphaned += 1
            return
        if ev.get("block_size") == 0:
            # an explicit block size 0 is refused, never learned
            st.ignored += n
            return
        bs = ev.get("block_size") or len(tokens) // n
        if bs == 0 or bs * n != len(tokens):
            st.ignored += n
            return
        known = self.block_size.get(w.model)
        # the block size may change only while the model's workers hold and
        # name nothing
        busy = any(o.hold or o.emap for o in self.workers.values() if o.model == w.model)
        if known is not None and known != bs and busy:
            st.ignored += n
            return
        self.block_size[w.model] = bs
        parent = ev.get("parent_block_hash")
        lora_name = ev.get("lora_name")
        if parent is not None:
            if (g, parent) not in w.emap:
                st.orphaned += n
                return
            prev: Key = w.emap[(g, parent)]
        else:
            prev = ("ns", w.model, lora_ns(lora_name, ev.get("lora_id")))
        extra_keys = ev.get("extra_keys")
        for i, h in enumerate(hashes):
            extras = []
            if extra_keys is not None and extra_keys[i] is not None:
                extras = [v for v in extra_keys[i] if not (isinstance(v, str) and v == lora_name)]
            if i == 0 and parent is None and ev.get("cache_salt") is not None:
                extras.append(ev["cache_salt"])
            key = (prev, tuple(tokens[i * bs : (i + 1) * bs]), tuple(canon(x) for x in extras))
            prev = key
            old = w.emap.get((g, h))
            if old is not None and old != key:
                w.hold.pop(old, None)
            w.emap[(g, h)] = key
            w.hold[key] = w.hold.get(key, 0) | tier
            st.stored += 1

    def query_keys(
        self, model: str, tokens: list[int], lora: Any, extra_keys: list[Any] | None
    ) -> list[Key]:
        bs = self.block_size.get(model)
        if bs is None:
            return []
        if isinstance(lora, str):
            ns = ("name", lora)
        elif isinstance(lora, int):
            ns = ("id", lora)
        else:
            ns = None
        prev: Key = ("ns", model, ns)
        keys = []
        for i in range(len(tokens) // bs):
            ex: list[Any] = []
            if extra_keys is not None and i < len(extra_keys) and extra_keys[i] is not None:
                ex = list(extra_keys[i])
            prev = (prev, tuple(tokens[i * bs : (i + 1) * bs]), tuple(canon(x) for x in ex))
            keys.append(prev)
        return keys

    def match(
        self,
        model: str,
        tokens: list[int],
        lora: Any = None,
        extra_keys: list[Any] | None = None,
        tiers: int = 7,
    ) -> dict[str, int]:
        if model not in self.models:
            return {}
        keys = self.query_keys(model, tokens, lora, extra_keys)
        out = {}
        for wid, w in self.workers.items():
            if w.model != model:
                continue
            n = 0
            for k in keys:
                if w.hold.get(k, 0) & tiers:
                    n += 1
                else:
                    break
            out[wid] = n
        return out

    def blocks(self) -> int:
        return len({k for w in self.workers.values() for k in w.hold})

    def holdings(self) -> int:
        return sum(len(w.hold) for w in self.workers.values())

    def queries(self) -> list[tuple[str, list[int], Any, list[Any] | None]]:
        """A query for every held block: its whole token path from the root."""
        out = []
        for w in self.workers.values():
            for key in w.hold:
                tokens: list[int] = []
                extras: list[Any] = []
                k = key
                while k[0] != "ns":
                    tokens[:0] = list(k[1])
                    extras[:0] = [[decanon(c) for c in k[2]] or None]
                    k = k[0]
                ns = k[2]
                lora = None if ns is None else ns[1]
                out.append(
                    (w.model, tokens, lora, extras if any(e is not None for e in extras) else None)
                )
        return out
