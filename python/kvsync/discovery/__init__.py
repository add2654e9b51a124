"""Discovery: which engine pods to follow (SPEC section 6).

Sources (the static pods file, registration, Kubernetes) each hand their
whole desired set of ``Publisher``s to one ``Reconciler``, which turns the
differences into ``EventManager.add_pod`` / ``remove_pod`` calls and tells
routing about every worker (``WorkerInfo``).
"""

from kvsync.discovery.kubernetes import KubernetesConfigError, KubernetesSource
from kvsync.discovery.reconciler import SOURCES, Changes, Publisher, Reconciler, Source, WorkerInfo
from kvsync.discovery.static import StaticFileError, StaticSource

__all__ = [
    "SOURCES",
    "Changes",
    "KubernetesConfigError",
    "KubernetesSource",
    "Publisher",
    "Reconciler",
    "Source",
    "StaticFileError",
    "StaticSource",
    "WorkerInfo",
]
