"""The demo's final check: it says the index is consistent only when every
engine's cached blocks, and nothing else, are in the index at the engine's
last seq. Fakes stand in for the engines and the manager's status."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import pytest

import kvsync
from kvsync import demo
from kvsync.simengine import encode_batch

BLOCK = [1, 2, 3, 4]


class FakeSim:
    def __init__(self, seq: int, paths: list[list[int]]) -> None:
        self.truth = {"ok": True, "block_size": 4, "seq": [seq], "ranks": [paths]}

    def request(self, op: str, **kw: Any) -> dict[str, Any]:
        assert op == "truth"
        return self.truth


class FakeManager:
    """``status()`` reports ``last_seqs`` in turn, then the last one."""

    def __init__(self, *last_seqs: int | None) -> None:
        self.last_seqs = list(last_seqs)

    def status(self) -> dict[str, Any]:
        seq = self.last_seqs.pop(0) if len(self.last_seqs) > 1 else self.last_seqs[0]
        return {"e": SimpleNamespace(last_seq=seq)}


def run_with(manager: FakeManager) -> demo.Run:
    index = kvsync.Index()
    index.add_worker("e", demo.MODEL)
    stored = {
        "type": "BlockStored",
        "block_hashes": [11],
        "parent_block_hash": None,
        "token_ids": BLOCK,
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    index.apply("e", encode_batch([stored], "map", None))
    return demo.Run(argparse.Namespace(requests=0), manager=manager, index=index)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("engine", "last_seq", "consistent"),
    [
        (FakeSim(0, [BLOCK]), 0, True),
        (FakeSim(0, [BLOCK]), None, False),  # kvsync has not applied seq 0
        (FakeSim(1, [BLOCK]), 0, False),  # kvsync is a batch behind
        (FakeSim(0, [BLOCK, [5, 6, 7, 8]]), 0, False),  # a block missing
        (FakeSim(0, [[9, 9, 9, 9]]), 0, False),  # as many blocks, but not the engine's
        (FakeSim(-1, []), None, False),  # the engine holds nothing, the index a block
    ],
    ids=["equal", "nothing-applied", "behind", "missing", "other", "extra"],
)
def test_an_engine_matches_only_when_the_index_holds_exactly_its_blocks(
    engine: FakeSim, last_seq: int | None, consistent: bool
) -> None:
    run = run_with(FakeManager(last_seq))
    assert demo._engine_matches(run, "e", engine) is consistent  # type: ignore[arg-type]


def test_the_check_waits_for_the_last_events_to_arrive() -> None:
    run = run_with(FakeManager(None, None, 0))
    run.sims.append(FakeSim(0, [BLOCK]))  # type: ignore[arg-type]
    assert demo._consistent(run, ["e"]) is True
