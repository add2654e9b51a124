"""Shared fixtures (where the wire test vectors live) and the layer
markers: a test without a layer marker is a ``unit`` test."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# CI clones the repo with ../shared beside it; KVSYNC_SHARED overrides.
SHARED = Path(os.environ.get("KVSYNC_SHARED", REPO.parent / "shared"))
WIRE = SHARED / "testdata" / "wire"
MANIFEST = WIRE / "manifest.json"
MISSING_SHARED = (
    f"wire test vectors not found at {WIRE}: clone the shared data beside the repo "
    "(../shared) or set KVSYNC_SHARED"
)


def load_manifest() -> dict[str, Any] | None:
    if not MANIFEST.is_file():
        return None
    data: dict[str, Any] = json.loads(MANIFEST.read_text())
    return data


# Layers other than unit; a test marked with none of them is a unit test,
# so that `pytest -m unit` selects exactly the default layer.
LAYERS = ("integration", "e2e", "chaos", "benchmark")


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(layer) for layer in LAYERS):
            item.add_marker(pytest.mark.unit)
