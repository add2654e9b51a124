"""One exception hierarchy: every error kvsync raises is a kvsync.Error and
the builtin class callers already catch; errors carry their details as
attributes and survive pickling (so they cross multiprocessing)."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import msgpack
import pytest

import kvsync

BS = 4


def stored(hashes: list[int], tokens: object) -> dict[str, object]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": tokens,
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


def payload(*events: dict[str, object]) -> bytes:
    data: bytes = msgpack.packb([0.0, list(events), None])
    return data


@pytest.fixture
def index() -> kvsync.Index:
    ix = kvsync.Index()
    ix.add_worker("pod-a", model="llama")
    return ix


HIERARCHY = [
    (kvsync.DecodeError, ValueError),
    (kvsync.SnapshotError, ValueError),
    (kvsync.UnknownWorkerError, KeyError),
    (kvsync.InvalidArgumentError, ValueError),
    (kvsync.FileError, OSError),
    (kvsync.WorkerBusyError, RuntimeError),
    (kvsync.AlreadyFollowedError, ValueError),
    (kvsync.InvariantError, AssertionError),
]


@pytest.mark.parametrize(("cls", "builtin"), HIERARCHY, ids=[c.__name__ for c, _ in HIERARCHY])
def test_every_error_is_a_kvsync_error_and_its_builtin(
    cls: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(cls, kvsync.Error)
    assert issubclass(cls, builtin)
    assert issubclass(kvsync.Error, Exception)
    assert cls.__module__ == "kvsync._core"
    assert cls.__name__ in kvsync.__all__


@pytest.mark.parametrize(("cls", "builtin"), HIERARCHY, ids=[c.__name__ for c, _ in HIERARCHY])
def test_every_error_pickles_with_its_message(
    cls: type[Exception], builtin: type[Exception]
) -> None:
    e = cls(2, "cannot open index snapshot", "/x/i.kvs") if cls is kvsync.FileError else cls("m")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    assert str(back) == str(e)
    assert back.args == e.args


def test_decode_error_carries_the_core_error_fields(index: kvsync.Index) -> None:
    with pytest.raises(kvsync.DecodeError) as info:
        index.apply_many("pod-a", [payload(), payload(stored([1], "oops"))])
    e = info.value
    assert e.payload == 1
    assert str(e).startswith("payload 1: ")
    # the reason is the what; where it was is in the other fields and str()
    assert e.reason and e.reason in str(e) and not e.reason.startswith("payload")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is kvsync.DecodeError
    assert str(back) == str(e)
    for attr in ("reason", "event", "field", "offset", "payload"):
        assert getattr(back, attr) == getattr(e, attr), attr


def test_decode_error_says_which_event_and_field(index: kvsync.Index) -> None:
    with pytest.raises(kvsync.DecodeError) as info:
        index.apply("pod-a", payload(stored([1], "oops")))
    e = info.value
    assert (e.event, e.field, e.payload) == (0, "token_ids", None)
    assert isinstance(e.offset, int) and e.offset > 0
    assert str(e).startswith("event 0 field token_ids: ")
    with pytest.raises(kvsync.DecodeError) as decoded:
        kvsync.decode(payload(stored([1], "oops")))
    assert (decoded.value.event, decoded.value.field) == (0, "token_ids")


def test_decode_function_raises_decode_error() -> None:
    with pytest.raises(kvsync.DecodeError, match="token_ids") as info:
        kvsync.decode(payload(stored([1], "oops")))
    assert isinstance(info.value, kvsync.Error)
    assert info.value.payload is None


def test_unknown_worker_is_a_key_error_with_a_readable_message(index: kvsync.Index) -> None:
    with pytest.raises(kvsync.UnknownWorkerError) as info:
        index.apply("nobody", payload())
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "unknown worker 'nobody'"
    with pytest.raises(kvsync.UnknownWorkerError, match="nobody"):
        index.worker_stats("nobody")
    with pytest.raises(kvsync.UnknownWorkerError, match="nobody"):
        index.last_seq("nobody")


def test_model_mismatch_and_invalid_arguments(index: kvsync.Index) -> None:
    with pytest.raises(kvsync.InvalidArgumentError, match='registered for model "llama"'):
        index.add_worker("pod-a", model="qwen")
    with pytest.raises(kvsync.InvalidArgumentError, match="capacity_blocks"):
        kvsync.Index(capacity_blocks=0)


def test_negative_capacity_is_a_value_error_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="capacity_blocks") as info:
        kvsync.Index(capacity_blocks=-1)
    assert isinstance(info.value, kvsync.Error)
    assert "-1" in str(info.value)


def test_unreadable_snapshot_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.kvs"
    junk.write_bytes(b"not a snapshot at all, really not")
    with pytest.raises(kvsync.SnapshotError, match=r"junk\.kvs") as info:
        kvsync.Index.load(junk)
    back = pickle.loads(pickle.dumps(info.value))
    assert str(back) == str(info.value)


def test_file_errors_are_os_errors_naming_the_path(index: kvsync.Index, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "index.kvs"
    with pytest.raises(kvsync.FileError) as saving:
        index.save(target)
    e = saving.value
    assert isinstance(e, OSError)
    assert e.filename == str(target)
    assert e.errno == 2
    assert str(target) in str(e) and "save" in str(e)
    back = pickle.loads(pickle.dumps(e))
    assert (back.errno, back.filename, str(back)) == (e.errno, e.filename, str(e))
    with pytest.raises(kvsync.FileError) as loading:
        kvsync.Index.load(tmp_path / "missing.kvs")
    assert loading.value.filename == str(tmp_path / "missing.kvs")
    assert isinstance(loading.value, FileNotFoundError) or loading.value.errno == 2


def test_check_raises_a_kvsync_error_class(index: kvsync.Index) -> None:
    # a consistent index passes; the class raised on failure is in the hierarchy
    index.check()
    assert issubclass(kvsync.InvariantError, kvsync.Error)


def raise_decode_error(data: bytes) -> None:
    """Runs in a worker process: the error travels back pickled."""
    ix = kvsync.Index()
    ix.add_worker("w", model="m")
    ix.apply_many("w", [payload(), data])


@pytest.mark.timeout(120)
def test_errors_cross_a_process_boundary() -> None:
    bad = payload(stored([1], "oops"))
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        future = pool.submit(raise_decode_error, bad)
        with pytest.raises(kvsync.DecodeError, match="token_ids") as info:
            future.result(timeout=90)
    assert info.value.payload == 1
    assert str(info.value).startswith("payload 1: ")
