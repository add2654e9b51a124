"""Property-based requests against a live ``kvsync serve`` from its own
``/openapi.json`` (schemathesis, bounded: a few examples per operation):
no answer is a 5xx, every status and body is one the description declares,
and the process is still serving at the end. ``/register`` is left out: a
generated endpoint could name a host off this machine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsync.sim import SimProcess

from .conftest import MODEL
from .serving import Serve, pods_file

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOKEN = "schema-token"


@pytest.fixture
def server(sims: Callable[..., SimProcess], tmp_path: Path) -> Iterator[Serve]:
    sim = sims()
    sim.request("step", n=5)
    pods = pods_file(tmp_path / "pods.json", {"pod-a": (sim, 1)}, MODEL)
    s = Serve(tmp_path / "serve.log", "--pods", str(pods), token=TOKEN)
    yield s
    s.close()


def test_generated_requests_get_declared_answers_and_no_5xx(server: Serve) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import checks

    auth = {"Authorization": f"Bearer {TOKEN}"}
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=auth, timeout=10)
    wanted = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
    ]

    def exercise(op: Any) -> None:
        @settings(
            max_examples=8,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            case = data.draw(op.as_strategy())
            response = case.call(base_url=server.url, headers=auth, timeout=10)
            case.validate_response(response, checks=wanted)

        run()

    tested = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/register":
            continue
        exercise(op)
        tested += 1
    assert tested >= 12
    assert server.proc.poll() is None
    assert server.client.healthz() == {"status": "ok"}
