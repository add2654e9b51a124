"""Renders the subset of kustomize that deploy/ uses, so that CI checks the
manifests without the kustomize binary: a ``kustomization.yaml`` with
``resources`` (YAML files, possibly multi-document, and directories holding
a kustomization). Anything else in a kustomization is refused by name, so a
manifest change that needs more of kustomize fails here instead of being
rendered wrong; ``test_manifests.py`` compares the result with
``kubectl kustomize`` where kubectl is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources"}
NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render; names the file."""


def kustomization_file(directory: Path) -> Path:
    for name in NAMES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def render(directory: Path, _seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The objects of the kustomization in ``directory``, in order."""
    directory = directory.resolve()
    if directory in _seen:
        raise KustomizeError(f"{directory}: includes itself through {_seen[-1]}")
    path = kustomization_file(directory)
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = sorted(set(spec) - SUPPORTED)
    if unknown:
        raise KustomizeError(f"{path}: unsupported field(s) {', '.join(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind {spec['kind']!r} is not Kustomization")
    out: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        target = (directory / str(entry)).resolve()
        if target.is_dir():
            out.extend(render(target, (*_seen, directory)))
        elif target.is_file():
            for doc in yaml.safe_load_all(target.read_text()):
                if doc is None:
                    continue
                if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                    raise KustomizeError(f"{target}: a document is not a Kubernetes object")
                out.append(doc)
        else:
            raise KustomizeError(f"{path}: resource {entry!r} not found")
    ids = [identity(o) for o in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KustomizeError(f"{path}: objects defined twice: {dupes}")
    return out


def identity(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj["apiVersion"], obj["kind"], meta.get("namespace") or "", meta.get("name") or "")
