"""The oracle: what the engines really hold, and the verdict on what
kvsync claims.

Ground truth comes from each simulator's control socket (``truth``: every
block each rank holds, as the token prefix ending in it). The oracle keeps
every prefix it has ever seen an engine hold (``record``), so that the
prompts it asks kvsync about include caches that are gone: an engine that
restarted, died or evicted them. A dead engine holds nothing.

For every (prompt, worker) pair, kvsync's claim (matched tokens / block
size) is compared with the engine's true depth (its leading blocks of the
prompt that it holds):

- claim > truth: a **false positive**, never allowed;
- claim < truth: a false negative, allowed only where history was lost;
- equal: exact.

``verdict`` is ``FALSE POSITIVE`` if any pair was, else ``safe`` if any
pair was a false negative, else ``exact``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

EXACT = "exact"
SAFE = "safe"
FALSE_POSITIVE = "FALSE POSITIVE"

Held = set[tuple[int, ...]]


def depth(prompt: list[int], held: Held, block_size: int) -> int:
    """Leading full blocks of ``prompt`` an engine holding ``held`` has."""
    n = 0
    while n < len(prompt) // block_size and tuple(prompt[: (n + 1) * block_size]) in held:
        n += 1
    return n


@dataclass
class Check:
    """One comparison of kvsync's answers with the truth."""

    pairs: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    examples: list[str] = field(default_factory=list)
    # false negatives per worker: a `safe` verdict must name only workers
    # whose history kvsync itself reports lost
    fn_workers: dict[str, int] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.false_positives:
            return FALSE_POSITIVE
        if self.false_negatives:
            return SAFE
        return EXACT


def classify(
    prompts: Iterable[list[int]],
    truth: dict[str, Held],
    answer: Callable[[list[int]], dict[str, int]],
    block_size: int,
    max_examples: int = 5,
) -> Check:
    """Compare ``answer(prompt)`` (matched tokens per worker) with ``truth``
    (what each worker's engine holds) for every prompt. A worker kvsync
    reports that the oracle does not know (a rogue publisher) holds
    nothing; a worker the oracle knows that kvsync does not report is
    taken as claiming 0 (a false negative at worst)."""
    check = Check()
    for prompt in prompts:
        claims = answer(prompt)
        for worker in set(claims) | set(truth):
            claimed = claims.get(worker, 0) // block_size
            true = depth(prompt, truth.get(worker, set()), block_size)
            check.pairs += 1
            if claimed > true:
                check.false_positives += 1
                if len(check.examples) < max_examples:
                    check.examples.append(
                        f"{worker}: claims {claimed} blocks of a {len(prompt) // block_size}-block"
                        f" prompt, engine holds {true}"
                    )
            elif claimed < true:
                check.false_negatives += 1
                check.fn_workers[worker] = check.fn_workers.get(worker, 0) + 1
    return check


class Oracle:
    """Prefixes seen held by each engine over a scenario, and the prompts
    built from them."""

    def __init__(self, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.rng = random.Random(seed)
        self.history: dict[str, Held] = {}

    def record(self, truth: dict[str, Held]) -> None:
        for worker, held in truth.items():
            self.history.setdefault(worker, set()).update(held)

    def prompts(self, truth: dict[str, Held], limit: int = 400) -> list[list[int]]:
        """Prompts to ask about: held now, held once (gone now), those
        extended by a random tail, and never-seen ones; at most ``limit``,
        drawn evenly from those kinds."""
        bs = self.block_size
        now = sorted({p for held in truth.values() for p in held})
        gone = sorted({p for held in self.history.values() for p in held} - set(now))
        self.rng.shuffle(now)
        self.rng.shuffle(gone)
        quarter = max(1, limit // 4)
        out = [list(p) for p in now[: quarter * 2]]
        out += [list(p) for p in gone[:quarter]]
        base = now + gone
        for _ in range(quarter // 2):
            if base:
                p = list(self.rng.choice(base))
                out.append(p + [self.rng.randrange(32_000) for _ in range(bs * 2)])
        for _ in range(quarter // 2):
            out.append([self.rng.randrange(32_000) for _ in range(bs * self.rng.randint(1, 8))])
        return out[:limit] if len(out) > limit else out
