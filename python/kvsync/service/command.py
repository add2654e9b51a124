"""Run kvsync as a service: follow a fleet's KV event streams and answer
routing and cache queries over HTTP (docs/service.md).

Every option is also a key of the --config TOML file and a KVSYNC_<KEY>
environment variable (KVSYNC_PORT=9000); a flag wins over the environment,
which wins over the file. An invalid value stops start-up with exit status
2 and a message naming the key. Binding an address other than loopback
needs a `token` (or --insecure).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

__all__ = ["build_parser", "run"]

# (flag, key, help): every flag takes a string that the configuration validates,
# so that a bad value gets the same message, naming the key, from any source.
FLAGS = (
    ("--host", "host", "address to listen on (default 127.0.0.1)"),
    ("--port", "port", "TCP port (default 8080; 0: a free one)"),
    ("--token", "token", "bearer token every endpoint but /healthz and /readyz requires"),
    ("--pods", "pods", "static pods file (JSON or YAML), re-read when it changes"),
    ("--snapshot", "snapshot", "index snapshot file: loaded at start, saved periodically"),
    ("--snapshot-interval", "snapshot_interval", "seconds between snapshots (default 60)"),
    ("--capacity-blocks", "capacity_blocks", "bound on distinct blocks held by the index"),
    ("--hash-seed", "hash_seed", "seed of the standard prefix hashes (default 1337)"),
    ("--policy", "policy", "routing policy: prefix, prefix-load (default), least-load, random"),
    ("--peer", "peer", "URL of another kvsync to warm-start from when there is no snapshot"),
    ("--max-body-bytes", "max_body_bytes", "largest request body (default 8 MiB)"),
    (
        "--ready-grace",
        "ready_grace",
        "seconds a worker may take to catch up before /readyz stops waiting for it (default 10)",
    ),
    ("--speculative-ttl", "speculative_ttl", "seconds a route counts as a cache holding (2)"),
    ("--load-ttl", "load_ttl", "seconds after which an unreleased route stops counting (300)"),
    ("--load-weight", "load_weight", "weight of load in prefix-load, in blocks per request (1)"),
    ("--tier-weights", "tier_weights", "gpu=1,cpu=0.75,storage=0.25"),
    ("--topic", "topic", "ZMQ topic to subscribe to (default: all)"),
    ("--log-format", "log_format", "text (default) or json"),
    ("--log-level", "log_level", "debug, info (default), warning, error"),
)
K8S_FLAGS = (
    ("--kubernetes-namespace", "namespace", "namespace to watch (* for all)"),
    ("--kubernetes-selector", "selector", "label selector of engine pods"),
    ("--kubernetes-kubeconfig", "kubeconfig", "kubeconfig file outside a cluster"),
    ("--kubernetes-model-labels", "model_labels", "labels naming the model, comma-separated"),
)


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow listening on a non-loopback address without a token",
    )
    for flag, key, text in FLAGS:
        p.add_argument(flag, dest=f"cfg_{key}", metavar=key.upper(), help=text)
    p.add_argument(
        "--kubernetes", action="store_true", default=None, help="discover engine pods in Kubernetes"
    )
    for flag, key, text in K8S_FLAGS:
        p.add_argument(flag, dest=f"k8s_{key}", metavar=key.upper(), help=text)


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration keys given as flags (and only those)."""
    flags: dict[str, Any] = {}
    for _, key, _ in FLAGS:
        value = getattr(args, f"cfg_{key}", None)
        if value is not None:
            flags[key] = value
    if args.insecure:
        flags["insecure"] = True
    k8s = {key: getattr(args, f"k8s_{key}") for _, key, _ in K8S_FLAGS}
    k8s = {k: v for k, v in k8s.items() if v is not None}
    if args.kubernetes or k8s:
        flags["kubernetes"] = k8s
    return flags


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is off; its server errors stay visible.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from kvsync.service import server
    from kvsync.service.config import ConfigError, is_loopback, load

    try:
        settings = load(args.config, flags_of(args))
    except ConfigError as e:
        print(f"kvsync serve: {e}", file=sys.stderr)
        return 2
    if not is_loopback(settings.host) and settings.token is None and not settings.insecure:
        print(
            f"kvsync serve: refusing to listen on {settings.host} without a `token`: anyone "
            "who can reach it could change what it follows. Set `token` (KVSYNC_TOKEN) or "
            "pass --insecure.",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_format, settings.log_level)
    return server.main(settings)
