"""The user documentation in docs/ ships with the project: the README
links it, it is complete enough to use kvsync without ../shared, and its
links resolve."""

from __future__ import annotations

import re

import pytest

import kvsync
from kvsync.cli import build_parser

from .conftest import REPO

DOCS = REPO / "docs"
PAGES = ["protocol.md", "index.md", "streams.md", "api.md", "service.md", "mutants.md"]


def page(name: str) -> str:
    return (DOCS / name).read_text()


def test_readme_links_every_page_and_keeps_its_set_up_commands() -> None:
    readme = (REPO / "README.md").read_text()
    for name in PAGES:
        assert f"](docs/{name})" in readme, name
    assert "\n    pip install . && kvsync demo\n" in readme
    assert "\n    pip install '.[test]' && pytest\n" in readme


@pytest.mark.parametrize("name", PAGES)
def test_pages_stand_alone_and_their_links_resolve(name: str) -> None:
    text = page(name)
    assert "../shared" not in text and "SPEC.md" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (DOCS / target).is_file(), f"{name} links to missing {target}"


def test_protocol_page_has_the_wire_facts() -> None:
    text = page("protocol.md")
    for fact in ("[topic, seq, payload]", "big-endian", "[ts, events, dp_rank]", "0xff"):
        assert fact in text
    for event in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
        assert f"**`{event}`**" in text
    for field in ("parent_block_hash", "token_ids", "extra_keys", "group_idx", "medium"):
        assert f"`{field}`" in text


def test_index_page_gives_the_exact_key_formula_and_the_semantics() -> None:
    text = page("index.md")
    assert "seq(i)   = XXH3-64(seq(i-1) as 8 little-endian bytes" in text
    assert "seed = 1337" in text
    for section in ("Namespaces", "Extra keys", "Parents", "Block size", "Tiers", "Capacity"):
        assert section in text
    assert "idempotent" in text and "false positive" in text.lower()


def test_streams_page_documents_every_worker_state() -> None:
    text = page("streams.md")
    for state in ("connecting", "replaying", "live", "degraded", "disconnected", "stopped"):
        assert f"**`{state}`**" in text, state
    for setting in ("replay_timeout", "replay_max", "clean_secs", "dead_after", "idle_probe"):
        assert f"`{setting}`" in text


def test_api_page_covers_the_public_names_and_every_cli_option() -> None:
    text = page("api.md")
    for name in ("Index", "decode", "EventManager", "Pod", "DecodeError", "SnapshotError"):
        assert name in kvsync.__all__ and f"`kvsync.{name}`" in text, name
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command, parser in commands.items():
        assert f"**`kvsync {command}" in text, command
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--parent-pid"):
                    assert f"`{flag}" in text, f"kvsync {command} {flag} is not documented"


def test_service_page_documents_every_endpoint_key_and_metric() -> None:
    from kvsync.service.command import FLAGS, K8S_FLAGS
    from kvsync.service.config import Settings
    from kvsync.service.metrics import Metrics
    from kvsync.service.openapi import document

    text = page("service.md")
    for path, ops in document()["paths"].items():
        for method in ops:
            assert f"`{method.upper()} {path}" in text or f"`{path}`" in text, (method, path)
    for key in Settings.model_fields:
        assert f"| `{key}` |" in text, f"config key {key} is not documented"
    for flag, _, _ in FLAGS + K8S_FLAGS:
        assert flag in page("api.md"), flag
    families = {m.name for m in Metrics().registry.collect()}
    spec = {
        "kvsync_batches",
        "kvsync_block_events",
        "kvsync_gaps",
        "kvsync_replays",
        "kvsync_lost_batches",
        "kvsync_resets",
        "kvsync_malformed",
        "kvsync_worker_state",
        "kvsync_index_workers",
        "kvsync_routes",
        "kvsync_discovery_pods",
        "kvsync_discovery_errors",
        "kvsync_snapshot_age_seconds",
    }
    for name in families | spec:
        assert f"`{name}" in text, f"metric {name} is not documented"
