"""Generate the sample payloads shipped in python/kvsync/samples/.

They imitate a vLLM 0.33 engine (map-form events, uint64 hashes, block size
16): a prompt stored, a second request sharing its prefix, an offload to CPU,
a LoRA request and an eviction. Deterministic: re-running gives the same
bytes.

    python tools/make_samples.py
"""

from __future__ import annotations

import random
from pathlib import Path

import msgpack

OUT = Path(__file__).resolve().parent.parent / "python" / "kvsync" / "samples"
BS = 16


def stored(hashes, parent, tokens, medium="GPU", lora_name=None):
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": medium,
        "lora_name": lora_name,
    }


def main() -> None:
    rng = random.Random(2026)
    h = [rng.getrandbits(64) for _ in range(12)]
    tok = [rng.randrange(150_000) for _ in range(16 * 12)]
    system = tok[: 4 * BS]
    batches = [
        [stored(h[0:4], None, system)],
        [
            stored(h[4:6], h[3], tok[4 * BS : 6 * BS]),
            stored(h[6:8], h[3], tok[6 * BS : 8 * BS]),
        ],
        [
            stored(h[0:4], None, system, medium="CPU"),
            stored(h[8:10], None, tok[8 * BS : 10 * BS], lora_name="sql-adapter"),
        ],
        [
            {"type": "BlockRemoved", "block_hashes": h[4:6], "medium": "GPU"},
            {"type": "BlockMoved", "block_hashes": h[6:8]},
        ],
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    for i, events in enumerate(batches):
        payload = msgpack.packb([1_764_000_000.0 + i / 8, events, None])
        (OUT / f"{i:03d}.bin").write_bytes(payload)
        print(f"wrote {OUT / f'{i:03d}.bin'} ({len(payload)} bytes)")


if __name__ == "__main__":
    main()
