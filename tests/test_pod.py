"""``Pod`` refuses an address it could not follow, naming what is wrong
(the empty name and dp_size 0 are in test_transport)."""

from __future__ import annotations

import pytest

import kvsync


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"model": ""}, "Pod.model must not be empty"),
        ({"pub_port": 70000}, "port 70000 out of range"),
        ({"replay_port": 0}, "port 0 out of range"),
    ],
    ids=["model", "pub_port", "replay_port"],
)
def test_a_bad_pod_is_refused_naming_the_field(fields: dict[str, object], error: str) -> None:
    pod = {"name": "p", "model": "m", "host": "127.0.0.1", **fields}
    with pytest.raises(ValueError, match=error):
        kvsync.Pod(**pod)  # type: ignore[arg-type]
