"""``kvsync serve`` configuration: file < environment < flags, and every
bad value stops start-up with exit status 2 and a message naming the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvsync.cli import main
from kvsync.service import command
from kvsync.service.config import ConfigError, is_loopback, load


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("KVSYNC_") and key != "KVSYNC_SHARED":
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kvsync.toml"
    p.write_text(text)
    return p


def test_defaults_are_those_of_the_spec() -> None:
    s = load()
    assert (s.host, s.port, s.token, s.hash_seed, s.policy) == (
        "127.0.0.1",
        8080,
        None,
        1337,
        "prefix-load",
    )
    assert s.max_body_bytes == 8 << 20 and s.ready_grace == 10 and s.speculative_ttl == 2
    assert s.tier_weights == {"gpu": 1.0, "cpu": 0.75, "storage": 0.25}
    assert s.log_format == "text" and s.kubernetes is None


def test_flag_beats_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, 'port = 1000\nhost = "::1"\npolicy = "random"\nhash_seed = 7\n')
    s = load(cfg)
    assert (s.port, s.host, s.policy, s.hash_seed) == (1000, "::1", "random", 7)
    monkeypatch.setenv("KVSYNC_PORT", "2000")
    monkeypatch.setenv("KVSYNC_POLICY", "least-load")
    s = load(cfg)
    assert (s.port, s.policy, s.host) == (2000, "least-load", "::1")
    s = load(cfg, {"port": "3000"})
    assert (s.port, s.policy) == (3000, "least-load")


def test_tables_merge_key_by_key_across_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write(tmp_path, '[kubernetes]\nnamespace = "llm"\n\n[tier_weights]\ncpu = 0.5\n')
    monkeypatch.setenv("KVSYNC_TIER_WEIGHTS", '{"storage": 0.1}')
    s = load(cfg, {"kubernetes": {"selector": "app=vllm"}})
    assert s.kubernetes is not None
    assert (s.kubernetes.namespace, s.kubernetes.selector) == ("llm", "app=vllm")
    assert s.tier_weights == {"gpu": 1.0, "cpu": 0.5, "storage": 0.1}


def test_relative_paths_in_the_file_are_relative_to_it(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'pods = "pods.json"\nsnapshot = "state/index.snap"\n')
    s = load(cfg)
    assert s.pods == tmp_path / "pods.json"
    assert s.snapshot == tmp_path / "state" / "index.snap"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 70000", "port"),
        ('port = "eighty"', "port"),
        ("hash_seed = -1", "hash_seed"),
        ('policy = "fastest"', "policy"),
        ("capacity_blocks = 0", "capacity_blocks"),
        ('peer = "ftp://x"', "peer"),
        ("snapshot_interval = 0", "snapshot_interval"),
        ("max_body_bytes = 10", "max_body_bytes"),
        ('log_format = "xml"', "log_format"),
        ("[tier_weights]\nssd = 1.0", "tier_weights"),
        ("[tier_weights]\ncpu = -1.0", "tier_weights"),
        ("[kubernetes]\nnamespaces = 'x'", "kubernetes.namespaces"),
        ("speling = 1", "speling"),
        ('token = ""', "token"),
    ],
)
def test_a_bad_value_in_the_file_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load(write(tmp_path, text))


def test_a_bad_environment_value_names_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSYNC_READY_GRACE", "soon")
    with pytest.raises(ConfigError, match="`ready_grace`"):
        load()


def test_the_token_is_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, "token = 12345678"))
    assert "12345678" not in str(e.value) and "`token`" in str(e.value)


def test_unreadable_or_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "port = = 1"))


def test_flags_map_to_keys() -> None:
    p = argparse.ArgumentParser()
    command.build_parser(p)
    args = p.parse_args(
        ["--port", "9", "--insecure", "--kubernetes-namespace", "*", "--tier-weights", "cpu=0.5"]
    )
    flags = command.flags_of(args)
    assert flags == {
        "port": "9",
        "insecure": True,
        "kubernetes": {"namespace": "*"},
        "tier_weights": "cpu=0.5",
    }
    s = load(None, flags)
    assert s.port == 9 and s.insecure and s.tier_weights["cpu"] == 0.5
    assert s.kubernetes is not None and s.kubernetes.namespace == "*"
    assert command.flags_of(p.parse_args([])) == {}


def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


def test_serve_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "99999"]) == 2
    assert "`port`" in capsys.readouterr().err


def test_serve_refuses_a_public_address_without_a_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "`token`" in err and "--insecure" in err


def test_a_kubernetes_service_link_is_not_a_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Service named kvsync injects KVSYNC_PORT=tcp://... into the namespace's pods.
    monkeypatch.setenv("KVSYNC_PORT", "tcp://10.96.0.7:8080")
    assert load().port == 8080
    monkeypatch.setenv("KVSYNC_PORT", "9090")
    assert load().port == 9090
