"""The nightly regression detector (bench.compare) and the baseline rule
(bench.baseline): a planted 2x regression of any guarded metric fails the
run; the recorded real runs of this machine (tests/data/nightly/, quick
runs of ``python -m bench.nightly`` on the shared 2-core VM) do not;
direction, missing metrics and malformed files are handled as documented.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import compare
from bench.baseline import CAP, derive
from bench.nightly import peers_metrics, read_serve_load
from bench.results import FormatError, load_baseline, load_results

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "baseline_metrics.json"
RECORDED = sorted((REPO / "tests" / "data" / "nightly").glob("*.json"))


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _results(metrics: dict[str, tuple[float, str]], **extra: Any) -> dict[str, Any]:
    return {
        "commit": "abc",
        "date": "2026-12-01T03:00:00+00:00",
        "metrics": {
            n: {"value": v, "unit": "us", "better": b, "runs": [v, v, v]}
            for n, (v, b) in metrics.items()
        },
        **extra,
    }


def _baseline(metrics: dict[str, tuple[float, float, str]]) -> dict[str, Any]:
    return {
        "comment": "test",
        "metrics": {
            n: {"value": v, "tolerance": t, "better": b} for n, (v, t, b) in metrics.items()
        },
    }


def _run(tmp_path: Path, baseline: Any, results: Any, capsys: Any) -> tuple[int, str]:
    b = _write(tmp_path / "baseline.json", baseline)
    r = _write(tmp_path / "results.json", results)
    code = compare.main([str(b), str(r)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _worse(doc: dict[str, Any], name: str, factor: float) -> dict[str, Any]:
    """``doc`` with metric ``name`` made ``factor`` times worse."""
    doc = copy.deepcopy(doc)
    m = doc["metrics"][name]
    scale = factor if m["better"] == "lower" else 1 / factor
    m["value"] *= scale
    m["runs"] = [r * scale for r in m["runs"]]
    return doc


# ------------------------------------------------------- with real runs


def test_recorded_runs_exist() -> None:
    assert len(RECORDED) >= 4, "tests/data/nightly should hold the recorded real runs"
    for path in RECORDED:
        load_results(path)


# read at collection; a missing baseline fails test_most_metrics_are_guarded
GUARDED = (
    sorted(n for n, m in load_baseline(BASELINE).metrics.items() if m.guard)
    if BASELINE.exists()
    else []
)


def test_most_metrics_are_guarded() -> None:
    assert BASELINE.exists(), f"{BASELINE} is missing"
    assert len(GUARDED) >= 8, GUARDED


@pytest.mark.parametrize("name", GUARDED)
def test_a_planted_2x_regression_of_any_metric_fails(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = json.loads(RECORDED[0].read_text())
    if name not in run["metrics"]:
        pytest.skip(f"{name} not in the recorded run {RECORDED[0].name}")
    code, out = _run(tmp_path, json.loads(BASELINE.read_text()), _worse(run, name, 2.0), capsys)
    assert code == 1, out
    line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
    assert "REGRESSION" in line
    assert "FAIL: 1 metric(s)" in out


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_recorded_run_to_run_noise_is_not_flagged(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(
        tmp_path, json.loads(BASELINE.read_text()), json.loads(path.read_text()), capsys
    )
    assert code == 0, out
    assert "REGRESSION" not in out


def test_the_baseline_rule_holds_out_of_sample() -> None:
    """Leave one recorded run out, derive the baseline from the others: the
    left-out run must pass it on every metric the committed baseline
    guards (the committed baseline is derived the same way from all)."""
    runs = [load_results(p) for p in RECORDED]
    for i, held in enumerate(runs):
        doc, _ = derive(runs[:i] + runs[i + 1 :])
        rows = compare.compare(load_baseline_doc(doc), held)
        failed = [r for r in rows if r.failed and r.name in GUARDED]
        assert not failed, (held.path.name, failed)


def load_baseline_doc(doc: dict[str, Any]) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return load_baseline(_write(Path(d) / "b.json", doc))


def test_every_guarded_tolerance_catches_2x() -> None:
    for name, m in load_baseline(BASELINE).metrics.items():
        assert m.tolerance <= CAP < 1.0, name


def test_an_unguarded_metric_is_shown_but_never_fails(tmp_path: Path, capsys: Any) -> None:
    base = _baseline({"m": (100.0, 0.3, "lower")})
    base["metrics"]["m"]["guard"] = False
    code, out = _run(tmp_path, base, _results({"m": (1000.0, "lower")}), capsys)
    assert code == 0
    row = next(ln for ln in out.splitlines() if ln.startswith("m "))
    assert "unguarded" in row and "10.00x" in row


# ---------------------------------------------------------- direction


@pytest.mark.parametrize(
    ("better", "value", "status"),
    [
        ("lower", 100.0, "ok"),
        ("lower", 129.0, "ok"),
        ("lower", 131.0, "REGRESSION"),
        ("lower", 50.0, "better"),
        ("higher", 100.0, "ok"),
        ("higher", 78.0, "ok"),  # 100/78 = 1.28x worse
        ("higher", 76.0, "REGRESSION"),  # 1.32x worse
        ("higher", 200.0, "better"),
    ],
)
def test_direction(better: str, value: float, status: str, tmp_path: Path, capsys: Any) -> None:
    code, out = _run(
        tmp_path,
        _baseline({"m": (100.0, 0.3, better)}),
        _results({"m": (value, better)}),
        capsys,
    )
    row = next(ln for ln in out.splitlines() if ln.startswith("m "))
    assert status in row.split()
    assert code == (1 if status == "REGRESSION" else 0)


def test_a_metric_whose_direction_changed_is_not_compared(tmp_path: Path, capsys: Any) -> None:
    code, out = _run(
        tmp_path, _baseline({"m": (1.0, 0.1, "lower")}), _results({"m": (5.0, "higher")}), capsys
    )
    assert code == 0
    assert "direction?" in out and "not compared" in out


def test_worse_factor_is_symmetric_in_direction() -> None:
    assert compare.worse_factor(200, 100, "lower") == 2.0
    assert compare.worse_factor(50, 100, "higher") == 2.0
    assert compare.worse_factor(0, 0, "lower") == 1.0


# ------------------------------------------------------------ missing


def test_missing_metrics_are_reported_and_do_not_fail(tmp_path: Path, capsys: Any) -> None:
    results = _results({"a": (1.0, "lower")}, skipped={"b": "bench/peers is not on this branch"})
    code, out = _run(
        tmp_path,
        _baseline({"a": (1.0, 0.2, "lower"), "b": (2.0, 0.2, "higher"), "c": (3.0, 0.2, "lower")}),
        results,
        capsys,
    )
    assert code == 0, out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln[:2] in ("a ", "b ", "c ")}
    assert "missing" in rows["b"] and "bench/peers is not on this branch" in rows["b"]
    assert "missing" in rows["c"] and "not in the results" in rows["c"]
    assert "not a failure" in rows["b"]
    assert "missing (reported, not failed): b, c" in out


def test_a_new_metric_without_baseline_is_listed(tmp_path: Path, capsys: Any) -> None:
    code, out = _run(tmp_path, _baseline({}), _results({"fresh": (1.0, "lower")}), capsys)
    assert code == 0
    assert "no baseline" in out


# ---------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("which", "content", "expect"),
    [
        ("results", "{not json", "not JSON"),
        ("results", "[1, 2]", "expected a JSON object"),
        ("results", '{"commit": "x"}', "missing 'metrics' object"),
        ("results", '{"metrics": {"m": {"value": "fast", "better": "lower"}}}', "'value'"),
        ("results", '{"metrics": {"m": {"value": 1, "better": "up"}}}', "'better'"),
        ("results", '{"metrics": {"m": {"value": 1, "better": "lower", "runs": 3}}}', "'runs'"),
        ("baseline", '{"metrics": {"m": {"value": 1, "better": "lower"}}}', "'tolerance'"),
        (
            "baseline",
            '{"metrics": {"m": {"value": 1, "tolerance": -1, "better": "lower"}}}',
            ">= 0",
        ),
        ("baseline", '{"metrics": {"m": 5}}', "is not an object"),
        (
            "baseline",
            '{"metrics": {"m": {"value": 1, "tolerance": 1, "better": "lower", "guard": 1}}}',
            "'guard'",
        ),
    ],
)
def test_malformed_files_give_a_clear_error(
    which: str, content: str, expect: str, tmp_path: Path, capsys: Any
) -> None:
    good_b = tmp_path / "good_b.json"
    good_r = tmp_path / "good_r.json"
    _write(good_b, _baseline({"m": (1.0, 0.2, "lower")}))
    _write(good_r, _results({"m": (1.0, "lower")}))
    bad = tmp_path / f"bad_{which}.json"
    bad.write_text(content)
    args = [str(bad), str(good_r)] if which == "baseline" else [str(good_b), str(bad)]
    assert compare.main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expect in err
    assert f"{which} file" in err


def test_a_missing_file_is_named(tmp_path: Path, capsys: Any) -> None:
    assert compare.main([str(tmp_path / "nope.json"), str(tmp_path / "r.json")]) == 2
    assert "nope.json: cannot read it" in capsys.readouterr().err


def test_load_errors_are_format_errors(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="metric 'm'"):
        load_results(_write(tmp_path / "r.json", {"metrics": {"m": {"value": None}}}))


# --------------------------------------------- other benches' JSON


def test_peers_json_becomes_kvsync_advantage_ratios() -> None:
    # as bench/peers writes it (its --json output)
    got = peers_metrics(
        {
            "config": {"workers": 256, "block_size": 16},
            "metric": {
                "ingest_msgpack_mevents_s": {"kvsync": 4.0, "dynamo_radix": 1.0, "smg_chain": None},
                "match_hot_p50_us": {"kvsync": 8.0, "dynamo_radix": 16.0},
                "bytes_per_holding_shared": {"kvsync": 40.0, "smg_radix": 30.0},
            },
            "ratios": {"match_hot_p50_us": {"dynamo_radix": 2.0}},
            "agreement": {"queries": 401},
        }
    )
    assert got == {
        "vs_peers_ingest_msgpack_mevents_s_dynamo_radix": [4.0],
        "vs_peers_match_hot_p50_us_dynamo_radix": [2.0],
        "vs_peers_bytes_per_holding_shared_smg_radix": [0.75],
    }
    # a flat table (older layout) reads the same way
    got = peers_metrics(
        {
            "match_p50_us": {"kvsync": 10.0, "dynamo_radix": 30.0},
            "ingest_block_events_per_s": {"kvsync": 4e6, "dynamo_radix": 1e6},
            "ratios": {"match_p50_us": {"dynamo_radix": 3.0}},
        }
    )
    assert got == {
        "vs_peers_match_p50_us_dynamo_radix": [3.0],
        "vs_peers_ingest_block_events_per_s_dynamo_radix": [4.0],
    }


def test_serve_load_json_in_either_shape() -> None:
    flat = {"event_processing_latency_p99_us": 120.0, "other": 1}
    nested = {"metrics": {"routing_decision_latency_p99_us": {"value": 900, "runs": [800, 900]}}}
    assert read_serve_load(flat) == {"event_processing_latency_p99_us": [120.0]}
    assert read_serve_load(nested) == {"routing_decision_latency_p99_us": [800.0, 900.0]}
    with pytest.raises(ValueError, match="not a JSON object"):
        read_serve_load([1])
