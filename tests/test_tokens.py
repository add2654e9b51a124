"""Token ids in every form a caller has them: lists, array('I') and numpy
arrays of any native integer dtype (tokenizers return int64), with clear
errors for the forms that cannot be read as token ids."""

from __future__ import annotations

from array import array
from typing import Any

import msgpack
import numpy as np
import pytest

import kvsync

BS = 4
PROMPT = list(range(100, 116))  # 4 blocks of 4


@pytest.fixture
def index() -> kvsync.Index:
    ix = kvsync.Index()
    ix.add_worker("pod-a", model="llama")
    ev = {
        "type": "BlockStored",
        "block_hashes": [1, 2, 3, 4],
        "parent_block_hash": None,
        "token_ids": PROMPT,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    ix.apply("pod-a", msgpack.packb([0.0, [ev], None]))
    return ix


INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_every_native_integer_dtype_matches_like_a_list(index: kvsync.Index, dtype: str) -> None:
    # int8/uint8 cannot hold 100..115 for every dtype, so shift into range
    info = np.iinfo(dtype)
    tokens = [t % (int(info.max) + 1) for t in PROMPT]
    ix = kvsync.Index()
    ix.add_worker("w", model="m")
    ev = {
        "type": "BlockStored",
        "block_hashes": [1, 2, 3, 4],
        "parent_block_hash": None,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    ix.apply("w", msgpack.packb([0.0, [ev], None]))
    arr = np.array(tokens, dtype=dtype)
    assert ix.match("m", arr) == {"w": 4}
    assert ix.match("m", arr[:7]) == {"w": 1}
    assert ix.prefix_keys("m", arr) == ix.prefix_keys("m", tokens)


def test_array_module_buffers_of_other_widths(index: kvsync.Index) -> None:
    for code in "bBhHiIlLqQ":
        assert index.match("llama", array(code, PROMPT)) == {"pod-a": 4}, code


def test_strided_view_is_read_in_order(index: kvsync.Index) -> None:
    doubled = np.repeat(np.array(PROMPT, dtype=np.int64), 2)
    assert index.match("llama", doubled[::2]) == {"pod-a": 4}


def test_big_endian_buffer_is_rejected_not_misread(index: kvsync.Index) -> None:
    for dtype in (">u4", ">i8"):
        with pytest.raises(ValueError, match="big-endian") as info:
            index.match("llama", np.array(PROMPT, dtype=dtype))
        assert isinstance(info.value, kvsync.Error)
    # the little-endian spelling of the same dtype is fine
    assert index.match("llama", np.array(PROMPT, dtype="<u4")) == {"pod-a": 4}


def test_two_dimensional_array_is_rejected_not_flattened(index: kvsync.Index) -> None:
    grid = np.array(PROMPT, dtype=np.uint32).reshape(2, 8)
    with pytest.raises(ValueError, match=r"1-D.*shape \(2, 8\)"):
        index.match("llama", grid)
    with pytest.raises(ValueError, match="1-D"):
        index.match("llama", np.array(PROMPT[0], dtype=np.int64))  # 0-D


@pytest.mark.parametrize(
    ("tokens", "position"),
    [
        (np.array([1, 2, -3, 4], dtype=np.int64), 2),
        (np.array([1, 2**32, 3, 4], dtype=np.uint64), 1),
        (np.array([-1, 0, 0, 0], dtype=np.int8), 0),
        ([5, 6, 7, 2**32], 3),
        ([5, -6, 7, 8], 1),
    ],
    ids=["int64-negative", "uint64-too-big", "int8-negative", "list-too-big", "list-negative"],
)
def test_out_of_range_token_names_its_position(
    index: kvsync.Index, tokens: Any, position: int
) -> None:
    with pytest.raises(ValueError, match=rf"position {position}\b.*0\.\.2\*\*32") as info:
        index.match("llama", tokens)
    assert isinstance(info.value, kvsync.Error)


@pytest.mark.parametrize(
    "tokens",
    [np.array(PROMPT, dtype=np.float32), np.array([True] * 4), [1.0, 2.0, 3.0, 4.0], [1, "2", 3]],
    ids=["float32", "bool", "float-list", "str-item"],
)
def test_non_integer_tokens_are_a_type_error(index: kvsync.Index, tokens: Any) -> None:
    with pytest.raises(TypeError, match="token_ids"):
        index.match("llama", tokens)


def test_str_and_bytes_are_not_token_ids(index: kvsync.Index) -> None:
    for tokens in ("abcd", b"abcd", bytearray(b"abcd")):
        with pytest.raises(TypeError, match="not str/bytes"):
            index.match("llama", tokens)
