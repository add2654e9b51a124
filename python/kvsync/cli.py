"""The ``kvsync`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from kvsync._core import DecodeError, Event, Index, decode
from kvsync.argtypes import non_empty

SAMPLES_PACKAGE = "kvsync.samples"


def sample_paths() -> list[Path]:
    """The sample payloads shipped with the package, in stream order."""
    root = resources.files(SAMPLES_PACKAGE)
    paths = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".bin"))
    if not paths:
        raise FileNotFoundError("no sample payloads found in the installed package")
    return paths


def _hash(h: object) -> str:
    if isinstance(h, bytes):
        return "0x" + h.hex()[:16] + ("…" if len(h) > 8 else "")
    return str(h)


def describe(ev: Event, verbose: bool) -> str:
    """One line per event: what a user needs to see what the engine said."""
    if ev.type == "AllBlocksCleared":
        return "AllBlocksCleared"
    hashes = ev.block_hashes or []
    parts = [f"{ev.type:<12} {len(hashes)} block(s)"]
    if ev.type == "BlockStored":
        parent = "none" if ev.parent_block_hash is None else _hash(ev.parent_block_hash)
        parts.append(f"parent={parent}")
        parts.append(f"tokens={len(ev.token_ids or [])}")
        if ev.block_size is not None:
            parts.append(f"block_size={ev.block_size}")
        if ev.lora_name is not None or ev.lora_id is not None:
            parts.append(f"lora={ev.lora_name if ev.lora_name is not None else ev.lora_id}")
        if ev.kv_cache_spec_kind is not None:
            parts.append(f"kind={ev.kv_cache_spec_kind}")
    if ev.medium is not None:
        parts.append(f"medium={ev.medium}")
    if ev.group_idx:
        parts.append(f"group={ev.group_idx}")
    line = "  ".join(parts)
    if verbose:
        line += "\n      " + repr(ev.to_dict())
    return line


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cmd_inspect(args: argparse.Namespace) -> int:
    paths: list[Path] = list(args.files)
    if args.samples:
        paths = sample_paths() + paths
    if not paths:
        print("kvsync inspect: give payload files or --samples", file=sys.stderr)
        return 2
    index = Index()
    failures = 0
    for n, path in enumerate(paths):
        worker = f"{args.worker}-{n}" if args.per_file else args.worker
        if not index.workers().get(worker):
            index.add_worker(worker, args.model)
        try:
            payload = path.read_bytes()
        except OSError as e:
            print(f"{path}: cannot read: {e.strerror}", file=sys.stderr)
            failures += 1
            continue
        try:
            batch = decode(payload)
        except DecodeError as e:
            print(f"{path}: not a KV event batch ({len(payload)} bytes): {e}", file=sys.stderr)
            failures += 1
            continue
        rank = "none" if batch.dp_rank is None else batch.dp_rank
        print(f"{path}  ts={batch.ts:.3f}  dp_rank={rank}  events={len(batch.events)}", end="")
        print(f"  (skipped {batch.unknown_events} of unknown type)" if batch.unknown_events else "")
        for ev in batch.events:
            print("    " + describe(ev, args.verbose))
        applied = index.apply(worker, payload)
        if applied.skipped:
            print(
                f"    note: {applied.skipped} block event(s) not indexed "
                f"(orphaned {applied.orphaned}, ignored {applied.ignored}, "
                f"unknown removals {applied.unknown_removals})"
            )
    s = index.stats()
    print()
    print("index summary")
    print(f"  workers      {s['workers']}")
    print(f"  blocks       {s['blocks']}")
    print(f"  holdings     {s['holdings']}")
    print(f"  memory       {_human(s['memory_bytes'])}")
    for worker, model in sorted(index.workers().items()):
        ws = index.worker_stats(worker)
        print(
            f"  {worker} ({model}): {ws['blocks']} blocks held, stored {ws['stored']}, "
            f"removed {ws['removed']}, cleared {ws['cleared']}, skipped {ws['skipped']}"
        )
    if failures:
        print(f"\n{failures} of {len(paths)} file(s) could not be decoded", file=sys.stderr)
        return 1
    return 0


def build_parser(prog: str = "kvsync") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="kvsync: an exact index of which engine holds which prompt prefix "
        "in its KV cache.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser(
        "inspect",
        help="decode KV event payload files, print their events and the resulting index",
        description="Decode raw KVEventBatch payloads (the 3rd frame of a live ZMQ message), "
        "print their events, apply them in order to an index and print its summary.",
    )
    p.add_argument("files", nargs="*", type=Path, help="payload files, applied in the order given")
    p.add_argument(
        "--samples", action="store_true", help="inspect the sample payloads shipped with kvsync"
    )
    p.add_argument(
        "--model",
        type=non_empty,
        default="model",
        help="model name the worker is registered with",
    )
    p.add_argument(
        "--worker", type=non_empty, default="worker", help="worker id the payloads are applied to"
    )
    p.add_argument("--per-file", action="store_true", help="apply each file as its own worker")
    p.add_argument("-v", "--verbose", action="store_true", help="print every field of every event")
    p.set_defaults(func=cmd_inspect)
    from kvsync import sim

    ps = sub.add_parser(
        "sim",
        help="run an engine simulator (PUB + replay ROUTER + JSON control socket)",
        description=sim.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.build_parser(ps)
    ps.set_defaults(func=sim.run, parser=ps)
    from kvsync import demo

    pd = sub.add_parser(
        "demo",
        help="route a synthetic workload over simulated engines: kvsync vs random vs oracle",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.build_parser(pd)
    pd.set_defaults(func=demo.run, parser=pd)
    from kvsync.service import command as serve

    pv = sub.add_parser(
        "serve",
        help="run kvsync as an HTTP service (routing, Mooncake indexer API, metrics)",
        description=serve.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.build_parser(pv)
    pv.set_defaults(func=serve.run, parser=pv)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "kvsync") -> int:
    """Run the command line; the exit status."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.version:
        from kvsync import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    check = getattr(args, "check", None)
    if check is not None:
        problem = check(args)
        if problem:
            args.parser.error(problem)  # exits with status 2
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print(f"kvsync {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
