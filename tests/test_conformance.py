"""Every case of ../shared/testdata/wire decodes to exactly the expected events.

The vectors were produced by the released vLLM (0.9 -> 0.33) and SGLang
encoders; manifest.json holds the normalized decoding of each payload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

import kvsync

from .conftest import MISSING_SHARED, WIRE, load_manifest

_MANIFEST = load_manifest()
CASES = _MANIFEST["cases"] if _MANIFEST else []
FRAME_FILES = _MANIFEST["frames"] if _MANIFEST else []
# The protocol's field names, spelled out here on purpose, independently of
# the implementation (kvsync._core.EVENT_FIELDS, defined once in the core's
# decoder): test_the_core_exposes_exactly_the_protocols_fields checks the two.
ALL_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
    "lookahead_token_ids",
    "cache_salt",
    "metadata",
)


def test_the_core_exposes_exactly_the_protocols_fields() -> None:
    from kvsync import _core

    assert _core.EVENT_FIELDS == ALL_FIELDS
    assert _core.EVENT_TYPES == ("BlockStored", "BlockRemoved", "AllBlocksCleared")
    stored = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
    }
    (ev,) = kvsync.decode(msgpack.packb([0.0, [stored], None])).events
    assert all(hasattr(ev, f) for f in _core.EVENT_FIELDS)


pytestmark = pytest.mark.skipif(_MANIFEST is None, reason=MISSING_SHARED)


def norm_hash(h: Any) -> str | None:
    if h is None:
        return None
    if isinstance(h, bytes):
        return "b:" + h.hex()
    assert isinstance(h, int), f"hash of type {type(h).__name__}"
    return f"i:{h}"


def norm_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"bin": v.hex()}
    if isinstance(v, list | tuple):
        return [norm_value(x) for x in v]
    if isinstance(v, dict):
        return {k: norm_value(x) for k, x in v.items()}
    return v


def normalize(ev: kvsync.Event, fields: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": ev.type}
    for f in fields:
        v = getattr(ev, f)
        if f == "block_hashes":
            out[f] = [norm_hash(h) for h in v]
        elif f == "parent_block_hash":
            out[f] = norm_hash(v)
        else:
            out[f] = norm_value(v)
    return out


def check_batch(payload: bytes, expect: dict[str, Any], strict: bool = True) -> None:
    """`strict`: fields a release does not have must come out None. Array-form
    events with extra trailing elements cannot be told apart from a newer
    release's longer layout, so those cases are checked on the listed fields."""
    batch = kvsync.decode(payload)
    assert batch.ts == expect["ts"]
    assert batch.dp_rank == expect["dp_rank"]
    fields_of = {e["type"]: [k for k in e if k != "type"] for e in expect["events"]}
    got = []
    for ev in batch.events:
        assert ev.type in fields_of, f"unexpected event {ev!r}"
        want_fields = fields_of[ev.type]
        got.append(normalize(ev, want_fields))
        # Fields the release does not have must not be invented.
        for f in ALL_FIELDS:
            if strict and f not in want_fields:
                assert getattr(ev, f) is None, f"{ev.type}.{f} = {getattr(ev, f)!r}"
    assert got == expect["events"]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case_decodes_as_expected(case: dict[str, Any]) -> None:
    payload = (WIRE / case["payload"]).read_bytes()
    expect = case["expect"]
    index = kvsync.Index()
    index.add_worker("w", model="m")
    if expect.get("error"):
        with pytest.raises(kvsync.DecodeError) as info:
            kvsync.decode(payload)
        assert str(info.value), "the error must say what was wrong"
        with pytest.raises(kvsync.DecodeError):
            index.apply("w", payload)
        assert index.stats()["holdings"] == 0
        return
    check_batch(payload, expect, strict=case["id"] != "malformed/unknown_fields_array")
    # The index takes every valid payload, and accounts for every block event.
    stats = index.apply("w", payload)
    block_events = sum(
        len(e["block_hashes"]) for e in expect["events"] if e["type"] != "AllBlocksCleared"
    )
    assert stats.stored + stats.removed + stats.skipped == block_events
    assert stats.cleared == sum(e["type"] == "AllBlocksCleared" for e in expect["events"])
    index.check()


@pytest.mark.parametrize("path", FRAME_FILES)
def test_captured_live_and_replay_payloads_decode(path: str) -> None:
    cap = json.loads((WIRE / path).read_text())
    expect = {e["seq"]: e for e in cap["expect"]}
    seen = 0
    for msg in cap["live"]:
        topic, seq, payload = (bytes.fromhex(f) for f in msg)
        assert topic == cap["topic"].encode()
        check_batch(payload, expect[int.from_bytes(seq, "big")])
        seen += 1
    for msg in cap["replay_response"]:
        frames = [bytes.fromhex(f) for f in msg]
        seq, payload = frames[-2], frames[-1]
        if seq == b"\xff" * 8:
            assert payload == b""
            continue
        check_batch(payload, expect[int.from_bytes(seq, "big")])
        seen += 1
    assert seen == len(cap["live"]) + len(cap["replay_response"]) - 1


def test_manifest_is_complete() -> None:
    """No case is silently dropped: every payload file is in the manifest."""
    listed = {c["payload"] for c in CASES}
    on_disk = {str(p.relative_to(WIRE)) for p in Path(WIRE).rglob("*.bin")}
    assert listed == on_disk
    assert len(CASES) >= 74
