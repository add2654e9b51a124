"""Shared fixtures: where the wire test vectors live."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
