"""Unit tests of the Python API of kvsync.Index (SPEC section 4)."""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import kvsync

BS = 4


def stored(
    hashes: list[Any], parent: Any, tokens: list[int], medium: str | None = "GPU", **extra: Any
) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": medium,
        "lora_name": None,
        **extra,
    }


def removed(hashes: list[Any], medium: str | None = "GPU") -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def batch(*events: dict[str, Any], rank: int | None = None) -> bytes:
    payload: bytes = msgpack.packb([1.5, list(events), rank])
    return payload


PROMPT = list(range(100, 116))  # 4 blocks of 4


@pytest.fixture
def index() -> kvsync.Index:
    ix = kvsync.Index()
    ix.add_worker("pod-a", model="llama")
    ix.add_worker("pod-b", model="llama")
    ix.add_worker("pod-c", model="qwen")
    return ix


def test_contract_round_trip(index: kvsync.Index) -> None:
    stats = index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])))
    assert (stats.stored, stats.removed, stats.cleared, stats.skipped) == (2, 0, 0, 0)
    stats = index.apply("pod-a", batch(stored([3], 2, PROMPT[8:12])))
    assert stats.stored == 1
    index.apply("pod-b", batch(stored([77], None, PROMPT[:4])))
    # every worker of the model, leading full blocks; the partial tail never counts
    assert index.match("llama", [*PROMPT, 1, 2]) == {"pod-a": 3, "pod-b": 1}
    assert index.match("qwen", PROMPT) == {"pod-c": 0}
    assert index.match("mistral", PROMPT) == {}
    s = index.stats()
    assert (s["workers"], s["blocks"], s["holdings"]) == (3, 3, 4)
    assert s["memory_bytes"] > 0


@pytest.mark.parametrize(
    "tokens",
    [
        array("I", PROMPT),
        np.array(PROMPT, dtype=np.uint32),
        np.array(PROMPT, dtype=np.int64),  # what tokenizers return: read as a buffer
        tuple(PROMPT),
        PROMPT,
    ],
    ids=["array-I", "numpy-uint32", "numpy-int64", "tuple", "list"],
)
def test_token_ids_in_every_form(index: kvsync.Index, tokens: Any) -> None:
    index.apply("pod-a", batch(stored([1, 2, 3, 4], None, PROMPT)))
    assert index.match("llama", tokens)["pod-a"] == 4


def test_bad_token_ids_say_what_is_wrong(index: kvsync.Index) -> None:
    index.apply("pod-a", batch(stored([1], None, PROMPT[:4])))
    with pytest.raises(ValueError, match=r"position 1 holds -2, outside 0\.\.2\*\*32"):
        index.match("llama", [1, -2, 3, 4])
    with pytest.raises(TypeError, match="not str"):
        index.match("llama", "abcd")
    with pytest.raises(TypeError, match="lora"):
        index.match("llama", PROMPT, lora=1.5)
    with pytest.raises(ValueError, match="unknown tier"):
        index.match("llama", PROMPT, tiers="hbm")


def test_malformed_payload_raises_decode_error_and_changes_nothing(index: kvsync.Index) -> None:
    index.apply("pod-a", batch(stored([1], None, PROMPT[:4])))
    before = index.stats()
    good = batch(stored([2], 1, PROMPT[4:8]))
    with pytest.raises(kvsync.DecodeError, match=r"truncated|end of"):
        index.apply("pod-a", good[:-3])
    with pytest.raises(kvsync.DecodeError, match="token_ids"):
        index.apply("pod-a", batch({**stored([2], 1, []), "token_ids": "oops"}))
    assert issubclass(kvsync.DecodeError, ValueError)
    assert index.stats() == before
    with pytest.raises(KeyError, match="nobody"):
        index.apply("nobody", good)


def test_orphans_are_dropped_and_counted(index: kvsync.Index) -> None:
    stats = index.apply("pod-a", batch(stored([5, 6], 999, PROMPT[4:12])))
    assert (stats.stored, stats.orphaned, stats.skipped) == (0, 2, 2)
    # never chained from the root: the same tokens as a root prompt do not match
    assert index.match("llama", PROMPT[4:12])["pod-a"] == 0
    assert index.worker_stats("pod-a")["orphaned"] == 2


def test_tiers_and_removals(index: kvsync.Index) -> None:
    index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])))
    index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8], medium="CPU")))
    index.apply("pod-a", batch(removed([2], "GPU")))
    detail = index.match_detail("llama", PROMPT[:8])
    assert detail["pod-a"] == {"gpu": 1, "cpu": 2, "storage": 0, "any": 2}
    assert index.match("llama", PROMPT[:8], tiers=["gpu"]) == {"pod-a": 1, "pod-b": 0}
    stats = index.apply("pod-a", batch(removed([2], "CPU_PINNED"), removed([42])))
    assert (stats.removed, stats.unknown_removals, stats.skipped) == (1, 1, 1)
    assert index.match("llama", PROMPT[:8])["pod-a"] == 1
    stats = index.apply("pod-a", batch({"type": "AllBlocksCleared"}))
    assert stats.cleared == 1
    assert index.stats()["holdings"] == 0


def test_lora_and_extra_keys_namespace_blocks(index: kvsync.Index) -> None:
    index.apply(
        "pod-a",
        batch(
            stored(
                [1],
                None,
                PROMPT[:4],
                lora_name="sql",
                extra_keys=[["sql", "img-7"]],  # the adapter name is covered by the namespace
            )
        ),
    )
    assert index.match("llama", PROMPT[:4])["pod-a"] == 0
    assert index.match("llama", PROMPT[:4], lora="sql")["pod-a"] == 0
    assert index.match("llama", PROMPT[:4], lora="sql", extra_keys=[["img-7"]])["pod-a"] == 1
    assert index.match("llama", PROMPT[:4], lora="sql", extra_keys=[["img-8"]])["pod-a"] == 0
    index.apply("pod-b", batch({**stored([9], None, PROMPT[:4]), "lora_id": 12}))
    assert index.match("llama", PROMPT[:4], lora=12)["pod-b"] == 1
    with pytest.raises(TypeError, match="one list of keys per block"):
        index.match("llama", PROMPT[:4], extra_keys=["img-7"])


def test_sglang_cache_salt_is_a_first_block_extra_key(index: kvsync.Index) -> None:
    index.apply("pod-a", batch({**stored([1, 2], None, PROMPT[:8]), "cache_salt": "tenant-1"}))
    assert index.match("llama", PROMPT[:8])["pod-a"] == 0
    assert index.match("llama", PROMPT[:8], extra_keys=[["tenant-1"]])["pod-a"] == 2


def test_non_full_attention_groups_are_ignored(index: kvsync.Index) -> None:
    swa = {**stored([1], None, PROMPT[:4]), "group_idx": 1, "kv_cache_spec_kind": "sliding_window"}
    stats = index.apply("pod-a", batch(swa))
    assert (stats.stored, stats.ignored) == (0, 1)
    full = {**stored([1], None, PROMPT[:4]), "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    index.apply("pod-a", batch(full))
    # the group-1 removal of the same engine hash does not touch group 0
    index.apply("pod-a", batch({**removed([1]), "group_idx": 1}))
    assert index.match("llama", PROMPT[:4])["pod-a"] == 1


def test_block_size_is_learned_and_enforced(index: kvsync.Index) -> None:
    assert index.block_size("llama") is None
    assert index.match("llama", PROMPT) == {"pod-a": 0, "pod-b": 0}
    index.apply("pod-a", batch({**stored([1], None, PROMPT[:4]), "block_size": None}))
    assert index.block_size("llama") == 4
    stats = index.apply("pod-b", batch({**stored([1], None, PROMPT[:8]), "block_size": 8}))
    assert stats.ignored == 1


def test_capacity_bound_evicts_lru(tmp_path: Path) -> None:
    ix = kvsync.Index(capacity_blocks=8)
    ix.add_worker("w", model="m")
    for i in range(20):
        ix.apply("w", batch(stored([i], None, [i, i, i, i])))
        assert ix.stats()["blocks"] <= 8
    held = [i for i in range(20) if ix.match("m", [i, i, i, i])["w"] == 1]
    assert held == list(range(12, 20))
    assert ix.stats()["evictions"] == 12
    with pytest.raises(ValueError, match="at least 1"):
        kvsync.Index(capacity_blocks=0)


def test_remove_worker_purges(index: kvsync.Index) -> None:
    index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])))
    assert index.remove_worker("pod-a") is True
    assert index.remove_worker("pod-a") is False
    assert index.stats()["holdings"] == 0
    assert "pod-a" not in index.match("llama", PROMPT)
    index.add_worker("pod-a", model="llama")
    assert index.match("llama", PROMPT)["pod-a"] == 0
    with pytest.raises(ValueError, match="registered for model"):
        index.add_worker("pod-a", model="qwen")


def test_save_and_load_keep_holdings_and_last_seq(index: kvsync.Index, tmp_path: Path) -> None:
    index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])), seq=17)
    index.apply("pod-b", batch(stored([1], None, PROMPT[:4], medium="CPU")), seq=3)
    path = tmp_path / "index.kvs"
    index.save(path)
    back = kvsync.Index.load(str(path))
    back.check()
    assert back.stats()["holdings"] == index.stats()["holdings"]
    assert back.match_detail("llama", PROMPT) == index.match_detail("llama", PROMPT)
    assert (back.last_seq("pod-a"), back.last_seq("pod-b"), back.last_seq("pod-c")) == (17, 3, None)
    assert back.workers() == {"pod-a": "llama", "pod-b": "llama", "pod-c": "qwen"}
    # the loaded index resolves parents from before the snapshot
    assert back.apply("pod-a", batch(stored([3], 2, PROMPT[8:12]))).stored == 1
    (tmp_path / "junk").write_bytes(b"not a snapshot at all, really not")
    with pytest.raises(kvsync.SnapshotError, match="junk"):
        kvsync.Index.load(tmp_path / "junk")
    with pytest.raises(OSError, match="missing"):
        kvsync.Index.load(tmp_path / "missing")


def test_apply_many_applies_in_order_and_records_seq(index: kvsync.Index) -> None:
    payloads = [batch(stored([1], None, PROMPT[:4])), batch(stored([2], 1, PROMPT[4:8]))]
    stats = index.apply_many("pod-a", payloads, first_seq=10)
    assert stats.stored == 2
    assert index.last_seq("pod-a") == 11
    with pytest.raises(kvsync.DecodeError, match="payload 1"):
        index.apply_many("pod-a", [payloads[0], b"\xc1"])


def test_decode_exposes_fields() -> None:
    b = kvsync.decode(batch(stored([1, b"\x00" * 32], None, PROMPT[:8]), removed([1]), rank=2))
    assert (b.ts, b.dp_rank, len(b.events)) == (1.5, 2, 2)
    ev = b.events[0]
    assert ev.type == "BlockStored"
    assert ev.block_hashes == [1, b"\x00" * 32]
    assert ev.token_ids == PROMPT[:8]
    assert ev.to_dict()["medium"] == "GPU"
    assert b.events[1].type == "BlockRemoved"


def test_purge_and_remove_both_answer_whether_the_worker_was_known(index: kvsync.Index) -> None:
    index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])), seq=5)
    assert index.purge_worker("pod-a") is True
    assert index.match("llama", PROMPT)["pod-a"] == 0
    assert index.last_seq("pod-a") is None
    assert "pod-a" in index.workers()  # purged, still registered
    assert index.purge_worker("nobody") is False
    assert index.remove_worker("nobody") is False


def test_worker_status_repr_is_python_style() -> None:
    ix = kvsync.Index()
    streams = kvsync._core.Streams(ix)
    streams.add("w", "llama", replay=False)
    assert streams.start("w", 0.0) is None
    fresh = streams.status(0.0)["w"]
    assert "last_seq=None" in repr(fresh)
    streams.live("w", (4).to_bytes(8, "big"), batch(stored([1], None, PROMPT[:4])), 1.0)
    st = streams.status(1.0)["w"]
    assert st.last_seq == 4
    assert "last_seq=4" in repr(st)
    assert "Some(" not in repr(st)
    assert repr(st).startswith("WorkerStatus(worker='w', state=")
    assert st == streams.status(1.0)["w"]  # compares by value
    assert st != fresh


def test_apply_stats_compare_print_and_convert_by_value(index: kvsync.Index) -> None:
    st = index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])))
    assert st == index.apply("pod-b", batch(stored([1, 2], None, PROMPT[:8])))
    assert st != index.apply("pod-b", batch(removed([2])))
    assert repr(st).startswith("ApplyStats(stored=2, removed=0, cleared=0, skipped=0")
    assert st.to_dict()["stored"] == 2
    assert list(st.to_dict()) == [
        "stored",
        "removed",
        "cleared",
        "skipped",
        "orphaned",
        "ignored",
        "unknown_removals",
        "unknown_events",
        "block_size_mismatch",
    ]


def test_stats_dicts_have_every_field(index: kvsync.Index) -> None:
    index.apply("pod-a", batch(stored([1, 2], None, PROMPT[:8])), seq=3)
    assert set(index.stats()) == {
        "workers",
        "models",
        "blocks",
        "holdings",
        "dormant",
        "engine_hashes",
        "evictions",
        "capacity_blocks",
        "memory_bytes",
    }
    ws = index.worker_stats("pod-a")
    assert (ws["model"], ws["blocks"], ws["last_seq"], ws["stored"], ws["batches"]) == (
        "llama",
        2,
        3,
        2,
        1,
    )
    assert set(ws) >= {"engine_hashes", "removed", "cleared", "skipped", "orphaned", "purges"}
