"""The standard prefix keys (SPEC sections 2 and 4): ``kvsync.seq_hashes``,
``Index.match_hashes`` / ``match_detail_hashes``, ``hash_seed``, and the
cached value of ``Index.match_scores`` (section 7)."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvsync

from . import standard_hash
from .test_index import batch, removed, stored

PROMPT = list(range(100, 116))  # 4 blocks of 4


def test_seq_hashes_are_the_pinned_standard_values() -> None:
    # Computed with the Python ``xxhash`` package from SPEC's formula.
    assert kvsync.seq_hashes(list(range(32)), 16) == [0xD47A8F41C833328A, 0xBF15DFFB16447F38]
    assert kvsync.seq_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == [
        0xCB38E4D7FB2DCA5C,
        0x44A2B2379D6D3C3D,
    ]
    assert kvsync.seq_hashes([1, 2, 3], 4) == []  # a partial block has no hash
    assert kvsync._core.DEFAULT_HASH_SEED == 1337


@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=40),
    st.integers(1, 9),
    st.integers(0, 2**64 - 1),
)
def test_seq_hashes_equal_an_independent_implementation(
    tokens: list[int], block_size: int, seed: int
) -> None:
    want = standard_hash.seq_hashes(tokens, block_size, seed)
    assert kvsync.seq_hashes(tokens, block_size, seed=seed) == want
    assert kvsync.seq_hashes(np.array(tokens, dtype=np.uint32), block_size, seed) == want


def test_seq_hashes_reject_bad_arguments() -> None:
    with pytest.raises(kvsync.InvalidArgumentError, match="block_size must be >= 1, got 0"):
        kvsync.seq_hashes([1, 2], 0)
    with pytest.raises(kvsync.InvalidArgumentError, match="got -3"):
        kvsync.seq_hashes([1, 2], -3)
    with pytest.raises(TypeError, match="not str/bytes"):
        kvsync.seq_hashes("abc", 1)
    with pytest.raises(OverflowError):
        kvsync.seq_hashes([1], 1, seed=-1)


@pytest.fixture
def index() -> kvsync.Index:
    ix = kvsync.Index()
    ix.add_worker("pod-a", model="llama")
    ix.add_worker("pod-b", model="llama")
    ix.add_worker("pod-c", model="qwen")
    ix.apply("pod-a", batch(stored([1, 2, 3], None, PROMPT[:12])))
    ix.apply("pod-b", batch(stored([1], None, PROMPT[:4], lora_name="sql")))
    ix.apply("pod-c", batch(stored([1, 2], None, PROMPT[:8])))
    return ix


def test_a_prompt_as_seq_hashes_matches_like_its_tokens(index: kvsync.Index) -> None:
    hashes = standard_hash.seq_hashes(PROMPT, 4)
    assert index.match_hashes("llama", hashes) == {"pod-a": 3, "pod-b": 0}
    assert index.match_hashes("llama", hashes) == index.match("llama", PROMPT)
    # the adapter's namespace is apart, yet found by the same hashes
    assert index.match_hashes("llama", hashes, lora="sql") == {"pod-a": 0, "pod-b": 1}
    # another model's equal prompt is another namespace
    assert index.match_hashes("qwen", hashes) == {"pod-c": 2}
    assert index.match_hashes("nobody", hashes) == {}
    assert index.match_hashes("llama", hashes, tiers="cpu") == {"pod-a": 0, "pod-b": 0}
    detail = index.match_detail_hashes("llama", hashes)
    assert detail == index.match_detail("llama", PROMPT)
    assert detail["pod-a"] == {"gpu": 3, "cpu": 0, "storage": 0, "any": 3}
    # a wrong hash stops the walk there
    bent = [hashes[0], hashes[1] ^ 1, *hashes[2:]]
    assert index.match_hashes("llama", bent)["pod-a"] == 1


def test_seq_hashes_come_as_ints_or_64_bit_buffers(index: kvsync.Index) -> None:
    hashes = standard_hash.seq_hashes(PROMPT, 4)
    assert index.match_hashes("llama", np.array(hashes, dtype=np.uint64))["pod-a"] == 3
    # signed-integer languages print the same 64 bits as negative numbers
    signed = [h - 2**64 if h >= 2**63 else h for h in hashes]
    assert index.match_hashes("llama", signed)["pod-a"] == 3
    assert index.match_hashes("llama", np.array(signed, dtype=np.int64))["pod-a"] == 3
    assert index.match_hashes("llama", tuple(hashes))["pod-a"] == 3
    with pytest.raises(kvsync.InvalidArgumentError, match=r"seq_hashes\[1\] must be an int"):
        index.match_hashes("llama", [hashes[0], "x"])
    with pytest.raises(kvsync.InvalidArgumentError, match=r"seq_hashes\[0\] must be an int"):
        index.match_hashes("llama", [2**64])
    with pytest.raises(TypeError, match="sequence of ints"):
        index.match_hashes("llama", 5)  # type: ignore[arg-type]


def test_the_hash_seed_is_the_indexs_and_survives_a_snapshot(tmp_path: Path) -> None:
    ix = kvsync.Index(hash_seed=42)
    ix.add_worker("a", model="m")
    ix.apply("a", batch(stored([1, 2], None, PROMPT[:8])))
    assert ix.match("m", PROMPT) == {"a": 2}
    assert ix.match_hashes("m", standard_hash.seq_hashes(PROMPT, 4, seed=42)) == {"a": 2}
    assert ix.match_hashes("m", standard_hash.seq_hashes(PROMPT, 4)) == {"a": 0}
    assert ix.prefix_keys("m", PROMPT) != kvsync.Index().prefix_keys("m", PROMPT)
    path = tmp_path / "seed42.kvs"
    ix.save(path)
    back = kvsync.Index.load(path)
    assert (ix.hash_seed, back.hash_seed, kvsync.Index().hash_seed) == (42, 42, 1337)
    assert back.match_hashes("m", standard_hash.seq_hashes(PROMPT, 4, seed=42)) == {"a": 2}
    with pytest.raises(OverflowError):
        kvsync.Index(hash_seed=2**64)


def test_a_snapshot_of_the_old_key_scheme_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "old.kvs"
    kvsync.Index().save(path)
    data = bytearray(path.read_bytes())
    assert data[:8] == b"KVSYNC\x00\x04"
    data[7] = 3
    path.write_bytes(bytes(data))
    with pytest.raises(kvsync.SnapshotError, match="snapshot format version 3 is not supported"):
        kvsync.Index.load(path)


def test_match_scores_weigh_each_block_by_its_best_tier() -> None:
    ix = kvsync.Index()
    for w in ("a", "b", "c"):
        ix.add_worker(w, model="m")
    ix.apply("a", batch(stored([1, 2, 3], None, PROMPT[:12], medium="CPU")))
    ix.apply("a", batch(stored([1], None, PROMPT[:4], medium="GPU")))
    ix.apply("b", batch(stored([1, 2, 3, 4], None, PROMPT, medium="DISK")))
    ix.apply("b", batch(removed([3], medium="DISK")))
    assert ix.match_scores("m", PROMPT) == {"a": (3, 2.5), "b": (2, 0.5), "c": (0, 0.0)}
    got = ix.match_scores("m", PROMPT, weights=(2.0, 1.0, 0.5))
    assert got == {"a": (3, 4.0), "b": (2, 1.0), "c": (0, 0.0)}
    assert ix.match_scores("other", PROMPT) == {}
    with pytest.raises(kvsync.InvalidArgumentError, match="weights must be finite and >= 0"):
        ix.match_scores("m", PROMPT, weights=(1.0, -1.0, 0.0))


def test_match_into_writes_depths_in_the_cached_worker_order(index: kvsync.Index) -> None:
    generation, names = index.worker_order("llama")
    assert names == ["pod-a", "pod-b"]
    out = np.full(len(names), 99, dtype=np.uint32)
    assert index.match_into("llama", PROMPT, out, generation) == 2
    assert dict(zip(names, out.tolist(), strict=True)) == index.match("llama", PROMPT)
    assert index.match_into("llama", PROMPT, out, generation, lora="sql") == 2
    assert out.tolist() == [0, 1]
    arr = array("I", [7, 7])
    index.match_into("llama", PROMPT, arr, generation, tiers="cpu")
    assert arr.tolist() == [0, 0]
    assert index.worker_order("nobody") == (generation, [])
    assert index.match_into("nobody", PROMPT, np.empty(0, np.uint32), generation) == 0


def test_match_into_refuses_a_stale_order_or_a_wrong_buffer(index: kvsync.Index) -> None:
    generation, names = index.worker_order("llama")
    out = np.zeros(len(names), dtype=np.uint32)
    index.add_worker("pod-d", model="llama")
    # positions would now name other workers: refused, nothing written
    with pytest.raises(kvsync.InvalidArgumentError, match="the workers changed since worker_order"):
        index.match_into("llama", PROMPT, out, generation)
    assert out.tolist() == [0, 0]
    generation, names = index.worker_order("llama")
    assert names == ["pod-a", "pod-b", "pod-d"]
    wrong_size = 'out has 2 entries but model "llama" has 3 workers'
    with pytest.raises(kvsync.InvalidArgumentError, match=wrong_size):
        index.match_into("llama", PROMPT, out, generation)
    with pytest.raises(kvsync.InvalidArgumentError, match="uint32 buffer"):
        index.match_into("llama", PROMPT, np.zeros(3, np.int64), generation)
    frozen = np.zeros(3, np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(kvsync.InvalidArgumentError, match="uint32 buffer"):
        index.match_into("llama", PROMPT, frozen, generation)
    with pytest.raises(kvsync.InvalidArgumentError, match="1-D contiguous"):
        index.match_into("llama", PROMPT, np.zeros(6, np.uint32)[::2], generation)
