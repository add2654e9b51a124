"""``kvsync.service.process.ServeProcess``: a service that cannot start is
reported with its own words, and leaves no process behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsync.service.process import ServeProcess


def test_a_service_that_exits_before_listening_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with pytest.raises(
        RuntimeError, match=r"(?s)exited with 2: .*unrecognized arguments: --no-such-flag"
    ):
        ServeProcess(log, "--no-such-flag", start_timeout=30)
    assert "--no-such-flag" in log.read_text()


def test_a_config_error_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as err:
        ServeProcess(tmp_path / "serve.log", env={"KVSYNC_POLICY": "fastest"}, start_timeout=30)
    assert "policy" in str(err.value).lower()
