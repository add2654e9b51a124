"""Fixtures and reporting for the benchmarks.

Run them with ``pytest bench -m benchmark --benchmark-enable`` (see
README.md). A default ``pytest`` run deselects them by marker and only
imports these modules, so nothing heavy happens at import time: every
workload is built inside a module-scoped fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .workloads import IngestWorkload, bulk_workload, ingest_workload

# Lines for the end-of-run summary: (section, text).
_SUMMARY: list[tuple[str, str]] = []


@pytest.fixture(scope="session")
def summary() -> Iterator[list[tuple[str, str]]]:
    """Benchmarks append ``(section, line)``; printed after the run."""
    yield _SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SUMMARY:
        return
    import kvsync

    terminalreporter.section("kvsync benchmark summary")
    terminalreporter.write_line(f"kvsync {kvsync.__version__} from {kvsync.__file__}")
    sections: dict[str, list[str]] = {}
    for section, line in _SUMMARY:
        sections.setdefault(section, []).append(line)
    for section, lines in sections.items():
        terminalreporter.write_line(f"[{section}]")
        for line in lines:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture(scope="module")
def ingest() -> IngestWorkload:
    """~1.5M block events from 64 vLLM engines, generated once per module.

    Each engine has 4096 blocks of KV cache and up to 32 running requests,
    so after the first ~260k block events the fleet is in steady state
    (every store is matched by an eviction).
    """
    return ingest_workload(
        workers=64, target_block_events=1_500_000, capacity_blocks=4096, concurrency=32
    )


@pytest.fixture(scope="module")
def bulk() -> IngestWorkload:
    """~1M block events as 512-block prefill stores (no decode, no evictions)."""
    return bulk_workload()
