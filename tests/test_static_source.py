"""The static discovery source (SPEC section 6): a pods file in JSON or
YAML, re-read when it changes, a broken file reported with the previous
set kept, and errors that name the entry and the field."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kvsync
from kvsync.discovery import Publisher, Reconciler, StaticFileError, StaticSource
from kvsync.discovery.static import parse_pods

POD_A = {"name": "pod-a", "model": "llama", "host": "10.0.0.7"}
POD_B = {
    "name": "pod-b",
    "model": "llama",
    "host": "10.0.0.8",
    "pub_port": 6000,
    "replay_port": None,
    "dp_size": 2,
    "topic": "kv",
}

YAML_FILE = """\
# the fleet
pods:
  - name: pod-a
    model: llama
    host: 10.0.0.7
  - {name: pod-b, model: llama, host: 10.0.0.8, pub_port: 6000,
     replay_port: null, dp_size: 2, topic: kv}
"""


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def manager() -> Iterator[kvsync.EventManager]:
    m = kvsync.EventManager(kvsync.Index())
    yield m
    m.stop()


@pytest.fixture
def rec(manager: kvsync.EventManager) -> Reconciler:
    return Reconciler(manager)


def write(path: Path, doc: Any) -> None:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


def expected_pods() -> dict[str, kvsync.Pod]:
    return {
        "pod-a": kvsync.Pod(name="pod-a", model="llama", host="10.0.0.7"),
        "pod-b": kvsync.Pod(
            name="pod-b",
            model="llama",
            host="10.0.0.8",
            pub_port=6000,
            replay_port=None,
            dp_size=2,
            topic="kv",
        ),
    }


@pytest.mark.parametrize("name", ["pods.json", "pods.yaml", "pods.yml", "pods"])
def test_json_and_yaml_files_are_followed(
    tmp_path: Path, rec: Reconciler, manager: kvsync.EventManager, name: str
) -> None:
    path = tmp_path / name
    write(path, YAML_FILE if name != "pods.json" else {"pods": [POD_A, POD_B]})
    src = StaticSource(path, rec)
    assert not rec.synced  # the static source must deliver first
    assert src.load_once()
    assert rec.synced
    assert manager.pods() == expected_pods()
    assert (src.pods, src.errors, src.last_error) == (2, 0, None)
    pubs = rec.publishers()
    assert {p.source for p in pubs.values()} == {"static"}
    assert pubs["pod-b"].instance == "pod-b"
    assert sorted(rec.workers()) == ["pod-a", "pod-b/dp0", "pod-b/dp1"]


def test_a_changed_file_is_applied_and_an_unchanged_one_is_not_reread(
    tmp_path: Path, rec: Reconciler, manager: kvsync.EventManager
) -> None:
    path = tmp_path / "pods.json"
    write(path, {"pods": [POD_A]})
    src = StaticSource(path, rec)
    assert src.poll()  # the first poll loads
    # A rewrite within the clock's granularity keeps the whole stat (same
    # inode, size and mtime): the contents are compared while it is fresh.
    st = path.stat()
    write(path, {"pods": [{**POD_A, "host": "10.0.0.9"}]})
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    assert src.poll()
    assert manager.pods()["pod-a"].host == "10.0.0.9"
    assert not src.poll()  # same contents
    old = time.time() - 60
    os.utime(path, (old, old))
    assert not src.poll()  # a stat change alone re-reads nothing new
    write(path, {"pods": [POD_B]})
    os.utime(path, (old, old + 1))  # an old mtime: only the stat says it changed
    assert src.poll()
    assert list(manager.pods()) == ["pod-b"]


@pytest.mark.parametrize(
    "broken",
    ["", "{not json", '{"pods": [{"name": "pod-a"}]}', b"\xff\xfe".decode("latin-1"), None],
    ids=["empty", "syntax", "missing-field", "not-utf8", "deleted"],
)
def test_a_broken_file_is_reported_and_the_previous_set_kept(
    tmp_path: Path,
    rec: Reconciler,
    manager: kvsync.EventManager,
    broken: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "pods.json"
    write(path, {"pods": [POD_A, POD_B]})
    src = StaticSource(path, rec)
    assert src.load_once()
    if broken is None:
        path.unlink()
    elif broken.startswith("\xff"):
        path.write_bytes(b'{"pods": [\xff]}')
    else:
        write(path, broken)
    with caplog.at_level(logging.ERROR, logger="kvsync.discovery.static"):
        assert not src.poll()
    assert manager.pods() == expected_pods()
    assert src.errors == 1 and src.pods == 2
    assert src.last_error is not None and str(path) in src.last_error
    assert src.last_error in caplog.text and "keeping the 2 static pods" in caplog.text
    assert not src.poll()  # the same broken file is reported once
    assert src.errors == 1
    write(path, {"pods": [POD_A]})
    assert src.poll()
    assert list(manager.pods()) == ["pod-a"]
    assert (src.errors, src.last_error, src.pods) == (1, None, 1)


def test_a_file_broken_from_the_start_delivers_nothing(tmp_path: Path, rec: Reconciler) -> None:
    src = StaticSource(tmp_path / "missing.yaml", rec)
    assert not src.load_once()
    assert "missing.yaml: cannot read the pods file" in (src.last_error or "")
    assert not rec.synced


def test_a_name_another_source_claims_is_a_reported_error(
    tmp_path: Path, rec: Reconciler, manager: kvsync.EventManager
) -> None:
    reg = kvsync.Pod(name="pod-a", model="llama", host="10.0.0.1")
    rec.upsert(Publisher(pod=reg, source="register", instance="pod-a"))
    path = tmp_path / "pods.json"
    write(path, {"pods": [POD_A, POD_B]})
    src = StaticSource(path, rec)
    assert not src.load_once()
    assert "claimed by source 'static' and by source 'register'" in (src.last_error or "")
    assert list(manager.pods()) == ["pod-a"]


def test_the_background_poller_follows_changes_and_stops(
    tmp_path: Path, rec: Reconciler, manager: kvsync.EventManager
) -> None:
    path = tmp_path / "pods.yaml"
    write(path, YAML_FILE)
    src = StaticSource(path, rec, interval=0.02)
    src.start()
    try:
        wait_for(lambda: manager.pods() == expected_pods(), what="the first load")
        with pytest.raises(RuntimeError, match="already started"):
            src.start()
        write(path, "pods: []\n")
        wait_for(lambda: manager.pods() == {}, what="the emptied file")
    finally:
        src.stop()
    src.stop()  # idempotent
    assert src.errors == 0


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ([], "expected a mapping with a 'pods' list, got list"),
        ({"pod": []}, "unknown top-level key 'pod'"),
        ({}, "missing the 'pods' list"),
        ({"pods": {}}, "'pods' must be a list, got dict"),
        ({"pods": ["pod-a"]}, r"pods\[0\]: expected a mapping of pod fields, got 'pod-a'"),
        ({"pods": [{**POD_A, "replay-port": 1}]}, r"\('pod-a'\): unknown field 'replay-port'"),
        ({"pods": [{"name": "x", "host": "h"}]}, r"pods\[0\] \('x'\): field 'model' is required"),
        ({"pods": [{**POD_A, "host": ""}]}, "field 'host' must be a non-empty string, got ''"),
        ({"pods": [{**POD_A, "name": 7}]}, r"pods\[0\]: field 'name' must be a non-empty string"),
        ({"pods": [POD_A, {**POD_A, "pub_port": "x"}]}, r"pods\[1\] \('pod-a'\): field 'pub_port'"),
        ({"pods": [{**POD_A, "pub_port": True}]}, "field 'pub_port' must be a port 1..65535, got"),
        ({"pods": [{**POD_A, "replay_port": 0}]}, "'replay_port' must be a port 1..65535 or null"),
        ({"pods": [{**POD_A, "dp_size": 0}]}, "field 'dp_size' must be an integer >= 1, got 0"),
        ({"pods": [{**POD_A, "pub_port": 65535, "dp_size": 2}]}, "ports 65535..65536, past"),
        ({"pods": [{**POD_A, "topic": 5}]}, "field 'topic' must be a string or null, got 5"),
        ({"pods": [POD_A, POD_A]}, r"pods\[1\] \('pod-a'\): name already used by pods\[0\]"),
    ],
)
def test_every_bad_entry_names_the_entry_and_the_field(doc: Any, error: str) -> None:
    with pytest.raises(StaticFileError, match=error):
        parse_pods(doc, "fleet.yaml")


def test_replay_port_none_in_words_means_no_replay() -> None:
    (pub,) = parse_pods({"pods": [{**POD_A, "replay_port": "none"}]})
    assert pub.pod.replay_port is None


def test_a_bad_interval_is_refused(tmp_path: Path, rec: Reconciler) -> None:
    with pytest.raises(ValueError, match="interval must be > 0 s, got 0"):
        StaticSource(tmp_path / "p.json", rec, interval=0)
