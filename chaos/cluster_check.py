"""The oracle against a running deployment (``python -m chaos.cluster_check``):
after a Chaos Mesh experiment has healed, ask a kvsync (``kvsync serve``,
e.g. through ``kubectl port-forward``) about every prefix the simulated
engines hold, and print the verdict.

    python -m chaos.cluster_check --kvsync http://127.0.0.1:8080 --token T \\
        --model sim-model --engine sim-engine-abc=tcp://127.0.0.1:17001 ...

Each ``--engine`` is an instance id (the pod name) and the address of that
simulator's control socket (its port is in the first line of its log).
``--history FILE`` keeps every prefix seen held across runs: run once
before the experiment and once after, so that caches which are gone by
then (a killed pod's, ``--gone``) are asked about too.
Exit status: 0 for ``exact`` or (with ``--allow-safe``) ``safe``, 1
otherwise; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from chaos.oracle import EXACT, SAFE, Held, Oracle, classify


def engine_truth(ctx: zmq.Context[Any], endpoint: str, timeout: float) -> tuple[int, Held]:
    """(block size, held prefixes) of rank 0 of the simulator at ``endpoint``."""
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    s.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        s.connect(endpoint)
        s.send(json.dumps({"op": "truth"}).encode())
        reply = json.loads(s.recv())
    except zmq.Again:
        raise TimeoutError(f"engine at {endpoint} did not answer within {timeout} s") from None
    finally:
        s.close(linger=0)
    if not reply.get("ok"):
        raise RuntimeError(f"engine at {endpoint}: {reply.get('error')}")
    return int(reply["block_size"]), {tuple(p) for p in reply["ranks"][0]}


def query(url: str, token: str | None, model: str, prompt: list[int], timeout: float) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps({"model": model, "token_ids": prompt}).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/query", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def claims(answer: Any, instances: set[str]) -> dict[str, int]:
    """Matched tokens per instance of a Mooncake ``/query`` answer, for the
    instances asked about (other pods of the model are not judged)."""
    out: dict[str, int] = {}
    for per_tenant in answer.values():
        for inst, v in per_tenant.items():
            if inst in instances:
                out[inst] = int(v["longest_matched"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.cluster_check", description=__doc__)
    p.add_argument("--kvsync", required=True, help="base URL of kvsync serve")
    p.add_argument("--token", default=None, help="bearer token of kvsync serve")
    p.add_argument("--model", required=True, help="model the engines serve")
    p.add_argument("--engine", action="append", default=[], help="INSTANCE=tcp://HOST:PORT")
    p.add_argument("--history", default=None, help="JSON file of prefixes seen held (updated)")
    p.add_argument("--block-size", type=int, default=16, help="when no --engine gives it")
    p.add_argument("--gone", action="append", default=[], help="instance of a pod that is gone")
    p.add_argument("--prompts", type=int, default=600, help="prompts to ask about")
    p.add_argument("--allow-safe", action="store_true", help="accept false negatives")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    engines: dict[str, str] = {}
    for spec in args.engine:
        name, sep, endpoint = spec.partition("=")
        if not sep or not name or not endpoint.startswith("tcp://"):
            p.error(f"--engine must be INSTANCE=tcp://HOST:PORT, got {spec!r}")
        engines[name] = endpoint
    if not engines and not args.gone:
        p.error("give at least one --engine or --gone")
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        truth: dict[str, Held] = {name: set() for name in args.gone}
        block_size = args.block_size
        for name, endpoint in engines.items():
            block_size, truth[name] = engine_truth(ctx, endpoint, args.timeout)
    finally:
        ctx.term()
    oracle = Oracle(block_size)
    history = Path(args.history) if args.history else None
    if history is not None and history.exists():
        seen = json.loads(history.read_text())
        oracle.record({w: {tuple(x) for x in ps} for w, ps in seen.items()})
        truth.update({w: set() for w in seen if w not in truth and w in args.gone})
    oracle.record(truth)
    if history is not None:
        history.write_text(
            json.dumps({w: sorted(map(list, ps)) for w, ps in oracle.history.items()})
        )
    instances = set(truth)
    check = classify(
        oracle.prompts(truth, args.prompts),
        truth,
        lambda prompt: claims(
            query(args.kvsync, args.token, args.model, prompt, args.timeout), instances
        ),
        block_size,
    )
    print(
        json.dumps(
            {
                "verdict": check.verdict,
                "pairs": check.pairs,
                "false_positives": check.false_positives,
                "false_negatives": check.false_negatives,
                "examples": check.examples,
            },
            indent=2,
        )
    )
    ok = check.verdict == EXACT or (args.allow_safe and check.verdict == SAFE)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
