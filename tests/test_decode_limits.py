"""Payloads whose msgpack length headers lie are rejected, not fatal.

A five-byte array header can claim 2^32-1 elements. If the decoder reserved
memory for what a header claims, an 8 MB payload would need gigabytes and the
allocation failure would abort the whole process (SIGABRT), taking every
other worker's stream with it. Each case runs in a child process limited to
1 GiB of address space, so an abort shows up as exit status -6 instead of
taking the test run down.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import resource
    import struct
    import sys

    import kvsync

    size = int(sys.argv[1])
    limit = 1 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    HUGE = b"\\xdd\\xff\\xff\\xff\\xff"  # array32 claiming 2^32-1 elements


    def s(text):
        raw = text.encode()
        return bytes([0xA0 | len(raw)]) + raw


    def envelope(n_events):
        return b"\\x93\\xcb" + struct.pack(">d", 1.0) + n_events


    def map_store(field):
        head = b"\\xde\\x00\\x10" + s("type") + s("BlockStored")
        if field != "block_hashes":
            head += s("block_hashes") + b"\\x91\\x07"
        return head + s(field)


    ARRAY_STORE_PREFIX = (
        b"\\x9c" + s("BlockStored") + b"\\x91\\x07" + b"\\xc0" + b"\\x90" + b"\\x04"
        + b"\\xc0" + s("GPU") + b"\\xc0"
    )
    # name -> (head, filler unit). 0xc1 is never valid msgpack: decoding
    # stops at the first element. The other fillers are valid elements, so
    # the decoder really holds one element per few bytes until the payload
    # ends short of the claim (or memory runs out, which must be an error
    # too: a 1-byte hash becomes a 24-byte entry).
    BAD = b"\\xc1"
    CASES = {
        "events": (envelope(HUGE), BAD),
        "block_hashes": (envelope(b"\\x91") + map_store("block_hashes") + HUGE, BAD),
        "token_ids": (envelope(b"\\x91") + map_store("token_ids") + HUGE, BAD),
        "extra_keys per block": (envelope(b"\\x91") + map_store("extra_keys") + HUGE, BAD),
        "extra_keys nested": (envelope(HUGE) + map_store("extra_keys") + HUGE * 30, BAD),
        "array-form extra_keys": (envelope(b"\\x91") + ARRAY_STORE_PREFIX + HUGE * 30, BAD),
        "lookahead_token_ids": (
            envelope(b"\\x91") + map_store("lookahead_token_ids") + HUGE * 30,
            BAD,
        ),
        "real events": (envelope(HUGE), b"\\x91" + s("AllBlocksCleared")),
        "real block_hashes": (envelope(b"\\x91") + map_store("block_hashes") + HUGE, b"\\x00"),
        "real extra_keys": (envelope(b"\\x91") + map_store("extra_keys") + HUGE, b"\\xc0"),
    }

    index = kvsync.Index()
    index.add_worker("w", model="m")
    for name, (head, unit) in CASES.items():
        body = unit * ((size - len(head)) // len(unit))
        payload = head + body + BAD * (size - len(head) - len(body))
        del body
        for call in (kvsync.decode, lambda p: index.apply("w", p)):
            try:
                call(payload)
            except kvsync.DecodeError as e:
                assert str(e), name
            else:
                raise AssertionError(f"{name}: a lying payload was accepted")
        del payload
    assert index.stats()["holdings"] == 0
    print("ok", len(CASES))
    """
)


@pytest.mark.parametrize("size", [8 << 20, 120 << 20], ids=["8MB", "120MB"])
def test_lying_lengths_raise_decode_error_under_1gib(size: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (-6 is SIGABRT: an allocation failed)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    )
    assert proc.stdout.split() == ["ok", "10"]
