"""``kvsync serve`` under load, short configuration (issue 9's targets;
the full run is ``python -m bench.serve_load``, see README.md).

8 engines (``bench.fleetpub``, one process) publish 20,000 block events/s
to a ``kvsync serve`` child process while ``/v1/route`` and then
``/query`` get 200 requests/s each for 5 s, open loop, with 8,192-token
prompts the engines hold; publish -> visible probes run throughout. The
numbers go to extra_info and the summary, never into assertions; the test
asserts what a user would notice: every worker live, no HTTP error, every
checked answer right (the prompt matched in full), no lost batch, every
probe seen (with and without the HTTP load)."""

from __future__ import annotations

from typing import Any

import pytest

from . import serve_load

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(300)]

Summary = list[tuple[str, str]]

SHORT = ["--engines", "8", "--events-per-s", "20000", "--seconds", "5", "--rate", "200"]
SHORT += ["--probes", "40", "--quiet-probes", "40", "--check-every", "5"]


def test_serve_under_load(benchmark: Any, summary: Summary) -> None:
    benchmark.group = "serve: kvsync serve under load"
    args = serve_load.build_parser().parse_args(SHORT)
    result: dict[str, Any] = benchmark.pedantic(
        serve_load.run, args=(args,), rounds=1, iterations=1
    )
    result["targets_met"] = serve_load.targets(result)
    benchmark.extra_info.update(result)

    section = "serve: kvsync serve under load (8 engines, 20k block events/s, 200 req/s)"
    for ep in ("/v1/route", "/query"):
        r = result[ep]
        summary.append(
            (
                section,
                f"{ep:<9} p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                f"p99.9 {r['p999_ms']:7.2f} ms  {r['achieved_per_s']:6.0f} req/s "
                f"(asked {r['requested_per_s']:.0f}, {r['client_timeouts']} timed out); "
                f"server {r['server_cpu_pct']:.0f}% CPU, "
                f"load average {r['loadavg_after']}",
            )
        )
    for key, what in [
        ("publish_to_visible_no_http_load", "no HTTP load"),
        ("publish_to_visible", "under the HTTP load"),
    ]:
        v = result[key]
        summary.append(
            (
                section,
                f"publish -> visible ({what}) p50 {v.get('p50_ms', float('nan')):.2f} ms  "
                f"p99 {v.get('p99_ms', float('nan')):.2f} ms over {v['n']} probes "
                f"(poll interval {v['poll_interval_s'] * 1000:.1f} ms)",
            )
        )
        assert v["n"] > 0 and not v["errors"], (key, v)

    w = result["workers"]
    assert w["count"] == w["live"] == 8, w
    assert (w["lost_batches"], w["malformed"], w["resets"]) == (0, 0, 0), w
    for ep in ("/v1/route", "/query"):
        r = result[ep]
        assert r["n"] > 0 and r["http_errors"] == 0, (ep, r["first_errors"])
        assert r["answers_checked"] > 0 and r["bad_answers"] == 0, (ep, r)
        assert r["mean_matched_tokens"] == 8192, (ep, r)
        assert r["applied_block_events_per_s"] > 0, (ep, r)
