"""A service warm-starts from a peer's snapshot (``peer`` setting) and
starts empty when the peer cannot be reached; ``ServeProcess`` as a
context manager stops the service it started."""

from __future__ import annotations

from pathlib import Path

from kvsync.service.config import Settings
from kvsync.service.mooncake import Registry
from kvsync.service.process import ServeProcess
from kvsync.service.snapshots import Snapshots


def test_a_service_warm_starts_from_a_peer_or_starts_empty(tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "peer.log") as peer:
        assert peer.pid == peer.proc.pid
        snaps = Snapshots(Settings.model_validate({"peer": peer.url}), Registry())
        index = snaps.load_initial()
        assert snaps.origin == "peer"
        assert index.stats()["workers"] == 0
        assert peer.terminate() == 0
    assert peer.proc.poll() == 0
    # the peer is gone: an empty index, said in the log
    snaps = Snapshots(Settings.model_validate({"peer": peer.url}), Registry())
    assert snaps.load_initial().stats()["blocks"] == 0
    assert snaps.origin != "peer"


def test_a_registrations_file_that_cannot_be_read_is_ignored(tmp_path: Path) -> None:
    reg = Registry()
    assert reg.load(tmp_path / "missing.json") == []
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert reg.load(bad) == []
    entry = {"instance_id": "i", "modelname": "m", "endpoint": "tcp://127.0.0.1:5557"}
    reg.entries["w"] = {**entry, "block_size": 16}
    good = tmp_path / "reg.json"
    reg.dump(good)
    assert [r.instance_id for r in Registry().load(good)] == ["i"]
