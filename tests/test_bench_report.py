"""bench.report on a synthetic history: nested results.json files become one
PNG per metric (baseline and tolerance band drawn) and an index.html that
shows every PNG; unreadable files are listed, not fatal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="bench.report needs matplotlib (the bench extra)")

from bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _night(day: int, lat: float, tput: float) -> dict[str, object]:
    return {
        "commit": f"{day:040x}",
        "date": f"2026-11-{day:02d}T03:00:00+00:00",
        "mode": "full",
        "metrics": {
            "match_p99_us": {
                "value": lat,
                "unit": "us",
                "better": "lower",
                "runs": [lat, lat * 1.1],
            },
            "throughput_block_events_per_s": {
                "value": tput,
                "unit": "block events/s",
                "better": "higher",
                "runs": [tput],
            },
        },
        "skipped": {},
    }


def test_report_writes_a_png_per_metric_and_an_index(tmp_path: Path) -> None:
    history = tmp_path / "history"
    for day in range(1, 8):  # artifacts nest at different depths
        where = history / f"run-{day}" / ("nested" if day % 2 else "") / "results.json"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(_night(day, 20 + day, 2e6 - day * 1e4)))
    (history / "broken").mkdir()
    (history / "broken" / "results.json").write_text("{truncated")
    baseline = tmp_path / "baseline.json"
    baseline.write_text(
        json.dumps(
            {
                "metrics": {
                    "match_p99_us": {"value": 22, "tolerance": 0.3, "better": "lower"},
                    "memory_bytes_per_holding_shared": {
                        "value": 22.2,
                        "tolerance": 0.05,
                        "better": "lower",
                    },
                }
            }
        )
    )
    out = tmp_path / "out"
    assert report.main([str(history), "--out", str(out), "--baseline", str(baseline)]) == 0
    html = (out / "index.html").read_text()
    pngs = sorted(out.glob("*.png"))
    names = {p.stem for p in pngs}
    # every metric of the history and of the baseline (even one never measured)
    assert names == {
        "match_p99_us",
        "throughput_block_events_per_s",
        "memory_bytes_per_holding_shared",
    }
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert f'src="{p.name}"' in html
    assert set(re.findall(r'src="([^"]+)"', html)) == {p.name for p in pngs}
    assert "7 runs" in html and "2026-11-07" in html
    assert "broken" in html and "not JSON" in html  # the unreadable file is named


def test_collect_orders_by_date_and_skips_bad_files(tmp_path: Path) -> None:
    for day in (5, 2, 9):
        d = tmp_path / str(day)
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_night(day, 1.0, 1.0)))
    (tmp_path / "results.json").write_text('{"metrics": 3}')
    runs, problems = report.collect(tmp_path)
    assert [r.date[:10] for r in runs] == ["2026-11-02", "2026-11-05", "2026-11-09"]
    assert len(problems) == 1 and "missing 'metrics' object" in problems[0]


def test_a_missing_history_folder_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
