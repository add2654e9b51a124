"""Unit tests of the chaos layer's pure parts: the relay's fault model, the
oracle's classification and prompts, and the reports. They need no
privileges and run in the default ``pytest`` run."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from chaos import report
from chaos.faults import Faults, fate, tcp_ports
from chaos.oracle import EXACT, FALSE_POSITIVE, SAFE, Oracle, classify, depth

pytestmark = pytest.mark.unit

BS = 4


def tcp_frame(sport: int, dport: int) -> bytes:
    eth = b"\x00" * 12 + b"\x08\x00"
    ip = bytes([0x45, 0]) + b"\x00" * 7 + bytes([6]) + b"\x00" * 10
    tcp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + b"\x00" * 16
    return eth + ip + tcp


def test_partition_and_full_loss_drop_every_frame() -> None:
    rng = random.Random(0)
    assert all(fate(Faults(partition=True), rng) == [] for _ in range(100))
    assert all(fate(Faults(loss=1.0), rng) == [] for _ in range(100))


def test_healthy_link_forwards_each_frame_once_at_once() -> None:
    rng = random.Random(0)
    assert all(fate(Faults(), rng) == [0.0] for _ in range(100))


def test_loss_drops_about_its_share() -> None:
    rng = random.Random(1)
    dropped = sum(fate(Faults(loss=0.3), rng) == [] for _ in range(10_000))
    assert 2_500 < dropped < 3_500


def test_duplication_sends_two_copies() -> None:
    rng = random.Random(0)
    assert all(len(fate(Faults(duplicate=1.0), rng)) == 2 for _ in range(100))


def test_jitter_stays_within_its_bounds_and_reorders() -> None:
    rng = random.Random(2)
    delays = [fate(Faults(delay=0.1, jitter=0.05), rng)[0] for _ in range(1000)]
    assert all(0.05 <= d <= 0.15 for d in delays)
    # consecutive frames overtake each other: the relay reorders
    assert any(b < a for a, b in itertools.pairwise(delays))


def test_port_filter_faults_only_that_port() -> None:
    rng = random.Random(0)
    only_replay = Faults(partition=True, ports=(5558,))
    assert fate(only_replay, rng, tcp_frame(40000, 5558)) == []
    assert fate(only_replay, rng, tcp_frame(5558, 40000)) == []
    assert fate(only_replay, rng, tcp_frame(40000, 5557)) == [0.0]
    assert fate(only_replay, rng, b"\x00" * 60) == [0.0]  # not TCP (e.g. ARP)
    assert tcp_ports(tcp_frame(1, 2)) == (1, 2)


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"loss": 1.5}, "loss"),
        ({"duplicate": -0.1}, "duplicate"),
        ({"delay": 0.1, "jitter": 0.2}, "jitter"),
    ],
)
def test_bad_faults_are_refused_naming_the_field(kw: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Faults(**kw)


def test_faults_round_trip_json_and_refuse_unknown_fields() -> None:
    f = Faults(loss=0.3, delay=0.1, jitter=0.05, ports=(5558,))
    assert Faults.from_json(json.loads(json.dumps(f.to_json()))) == f
    with pytest.raises(ValueError, match="lossy"):
        Faults.from_json({"lossy": 1})
    assert "30% loss" in f.describe() and "5558" in f.describe()


def held(*prefixes: list[int]) -> set[tuple[int, ...]]:
    return {tuple(p) for p in prefixes}


A = list(range(12))  # three blocks of 4


def test_depth_counts_leading_held_blocks_only() -> None:
    h = held(A[:4], A[:8], A[:12])
    assert depth(A, h, BS) == 3
    assert depth(A, held(A[:4], A[:12]), BS) == 1  # block 2 missing: stop there
    assert depth([*A, 99], h, BS) == 3  # a trailing partial block never counts
    assert depth(A, set(), BS) == 0


def answer_with(claims: dict[str, int]) -> Any:
    return lambda prompt: {w: b * BS for w, b in claims.items()}


def test_claim_beyond_the_truth_is_a_false_positive() -> None:
    truth = {"e0": held(A[:4])}
    chk = classify([A], truth, answer_with({"e0": 2}), BS)
    assert (chk.verdict, chk.false_positives, chk.false_negatives) == (FALSE_POSITIVE, 1, 0)
    assert "e0" in chk.examples[0]


def test_claim_short_of_the_truth_is_safe_and_equal_is_exact() -> None:
    truth = {"e0": held(A[:4], A[:8])}
    safe = classify([A], truth, answer_with({"e0": 1}), BS)
    assert (safe.verdict, safe.fn_workers) == (SAFE, {"e0": 1})
    assert classify([A], truth, answer_with({"e0": 2}), BS).verdict == EXACT


def test_workers_missing_on_either_side_count() -> None:
    # a dead engine (truth: nothing) that kvsync still answers for
    chk = classify([A], {"e0": set()}, answer_with({"e0": 1}), BS)
    assert chk.false_positives == 1
    # a rogue publisher the oracle does not know holds nothing
    chk = classify([A], {}, answer_with({"rogue": 1}), BS)
    assert chk.false_positives == 1
    # a worker kvsync does not report at all claims nothing
    chk = classify([A], {"e0": held(A[:4])}, answer_with({}), BS)
    assert (chk.verdict, chk.false_negatives) == (SAFE, 1)


def test_prompts_include_caches_that_are_gone() -> None:
    o = Oracle(BS, seed=3)
    old = held(A[:4], A[:8])
    o.record({"e0": old})
    now = {"e0": held([7] * 4)}
    prompts = {tuple(p) for p in o.prompts(now, limit=100)}
    assert tuple(A[:8]) in prompts and tuple([7] * 4) in prompts
    assert len(o.prompts(now, limit=3)) <= 3


def result(name: str, verdict: str, passed: bool, fp: int = 0) -> dict[str, Any]:
    return {
        "scenario": name,
        "sut": "library",
        "fault": "a fault",
        "verdict": verdict,
        "allowed": [EXACT],
        "passed": passed,
        "false_positives": fp,
        "false_negatives": 0,
        "pairs": 10,
        "recovery_seconds": 1.5 if passed else None,
        "total_seconds": 5.0,
        "examples": ["e0: claims 2 blocks"] if fp else [],
        "workers": {"e0": {"state": "live", "gaps": 0, "lost_batches": 0, "resets": 0}},
        "notes": {},
    }


def test_reports_carry_every_scenario_and_flag_failures(tmp_path: Path) -> None:
    results = [result("ok-one", EXACT, True), result("bad-one", FALSE_POSITIVE, False, fp=2)]
    js, md = report.write(results, tmp_path, started=0.0)
    data = json.loads(js.read_text())
    assert [r["scenario"] for r in data["results"]] == ["ok-one", "bad-one"]
    assert data["meta"]["failed"] == ["bad-one"]
    assert data["meta"]["false_positive_scenarios"] == 1
    text = md.read_text()
    assert "| ok-one | library | a fault | exact | exact | 0 | 0 | 10 | 1.5 | - | 5.0 |" in text
    assert "**FALSE POSITIVE** (FAIL)" in text
    assert "claims 2 blocks" in text
