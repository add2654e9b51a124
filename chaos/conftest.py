"""Fixtures of the chaos layer: the check that namespaces can be made (or a
skip naming why not), stale namespaces of crashed runs removed, and the
reports written once the session's scenarios have run."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `chaos` is a top-level package of the repo
    sys.path.insert(0, str(ROOT))

from chaos import netns, report  # noqa: E402

_results: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def namespaces() -> Iterator[None]:
    """Skip unless this process can create network namespaces."""
    why = netns.why_not_available()
    if why is not None:
        pytest.skip(why)
    netns.remove_stale()
    yield
    netns.remove_stale()


@pytest.fixture(scope="session")
def chaos_report() -> Iterator[list[dict[str, Any]]]:
    """Collects every scenario's result; writes chaos-report.json and .md at
    the end of the session (into $KVSYNC_CHAOS_REPORT_DIR, default: cwd)."""
    started = time.time()
    yield _results
    if _results:
        out = Path(os.environ.get("KVSYNC_CHAOS_REPORT_DIR", "."))
        js, md = report.write(_results, out, started)
        print(f"\nchaos reports: {js} {md}")
