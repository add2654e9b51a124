"""The Kubernetes discovery source: engine pods found through the API
server's list/watch of pods (SPEC section 6).

The selected pods (label ``selector``, in one namespace or in all) are
listed, then watched from the list's resourceVersion with bookmarks; a
watch that ends (the server's timeout) resumes from the last
resourceVersion seen, a ``410 Gone`` re-lists and reconciles the whole
set, and any other error retries with capped exponential back-off. Errors
never change the followed set: an API outage is not a deletion.

A pod is followed while it is ``Running``, has a pod IP and is not
terminating (no ``deletionTimestamp``: a graceful delete first only sets
it). Its model is the first present label of ``model_labels``; its ports,
data-parallel size and topic come from annotations::

    kvsync.io/kv-events-port    PUB port of rank 0 (default 5557)
    kvsync.io/kv-replay-port    replay port of rank 0 (default 5558; "none": no replay)
    kvsync.io/dp-size           data-parallel ranks (default 1)
    kvsync.io/kv-events-topic   ZMQ topic filter (default: the EventManager's, "")

A selected pod without a model label or with a bad annotation is reported
(logged, counted in ``errors``, described in ``last_error``) and not
followed. Every change of the followed set is handed to the
``Reconciler`` as the source's whole desired set of ``Publisher`` s.

The ``kubernetes`` client is imported only when a source is made:
importing its models takes about a second that ``import kvsync`` should
not cost everyone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvsync._pod import Pod
from kvsync.discovery.reconciler import Publisher, Source

__all__ = [
    "ANNOTATION_DP_SIZE",
    "ANNOTATION_EVENTS_PORT",
    "ANNOTATION_REPLAY_PORT",
    "ANNOTATION_TOPIC",
    "DEFAULT_MODEL_LABELS",
    "DEFAULT_SELECTOR",
    "KubernetesConfigError",
    "KubernetesSource",
    "PodProblem",
    "publisher_of",
]

log = logging.getLogger("kvsync.discovery.kubernetes")

DEFAULT_SELECTOR = "kvsync.io/kv-events=true"
DEFAULT_MODEL_LABELS = ("kvsync.io/model", "model.aibrix.ai/name")
ANNOTATION_EVENTS_PORT = "kvsync.io/kv-events-port"
ANNOTATION_REPLAY_PORT = "kvsync.io/kv-replay-port"
ANNOTATION_DP_SIZE = "kvsync.io/dp-size"
ANNOTATION_TOPIC = "kvsync.io/kv-events-topic"
MAX_PORT = 65535
MAX_DP_SIZE = 1024
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Seconds to open a connection to the API server, and to wait for a list.
CONNECT_TIMEOUT = 10.0
LIST_TIMEOUT = 60.0
# A watch whose server says nothing (no event, no bookmark) this long past
# its timeoutSeconds is dead (a silent network partition).
WATCH_GRACE = 30.0


class KubernetesConfigError(ValueError):
    """No usable cluster configuration: the message names what was tried."""


class PodProblem(ValueError):
    """A selected pod that cannot be followed (no model label, a bad
    annotation); the message names the pod, the label or annotation and
    the value."""


class _Reconciler(Protocol):
    """What the source needs of a ``Reconciler`` (tests pass recorders)."""

    def replace(self, source: Source, publishers: Iterable[Publisher]) -> object: ...

    def expect(self, source: Source) -> None: ...


@dataclass(frozen=True)
class _View:
    """What one selected pod means: its publisher while it is followed, or
    the problem that keeps it from being followed."""

    publisher: Publisher | None
    problem: str | None = None


def publisher_of(
    obj: Mapping[str, Any], *, model_labels: Sequence[str], all_namespaces: bool
) -> Publisher | None:
    """The publisher of a pod object (its JSON form), None while it is not
    to be followed (not Running, no IP, terminating). Raises ``PodProblem``
    for a pod that would be followed but is misconfigured."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    name = _name_of(obj, all_namespaces)
    if status.get("phase") != "Running" or not status.get("podIP"):
        return None
    if meta.get("deletionTimestamp"):
        return None
    labels = meta.get("labels") or {}
    model = next((labels[k] for k in model_labels if labels.get(k)), None)
    if model is None:
        raise PodProblem(f"pod {name}: no model label (one of {', '.join(model_labels)})")
    notes = meta.get("annotations") or {}
    pub_port = _int_annotation(name, notes, ANNOTATION_EVENTS_PORT, 5557, 1, MAX_PORT)
    replay: int | None
    if str(notes.get(ANNOTATION_REPLAY_PORT, "")).strip().lower() == "none":
        replay = None
    else:
        replay = _int_annotation(name, notes, ANNOTATION_REPLAY_PORT, 5558, 1, MAX_PORT)
    dp_size = _int_annotation(name, notes, ANNOTATION_DP_SIZE, 1, 1, MAX_DP_SIZE)
    for what, port in ((ANNOTATION_EVENTS_PORT, pub_port), (ANNOTATION_REPLAY_PORT, replay)):
        if port is not None and port + dp_size - 1 > MAX_PORT:
            raise PodProblem(
                f"pod {name}: annotation {what}={port} with {ANNOTATION_DP_SIZE}={dp_size} "
                f"needs ports up to {port + dp_size - 1} (at most {MAX_PORT})"
            )
    topic = notes.get(ANNOTATION_TOPIC)
    if topic is not None and not isinstance(topic, str):
        raise PodProblem(f"pod {name}: annotation {ANNOTATION_TOPIC}={topic!r} is not a string")
    try:
        pod = Pod(
            name=name,
            model=model,
            host=status["podIP"],
            pub_port=pub_port,
            replay_port=replay,
            dp_size=dp_size,
            topic=topic,
        )
        restarts = sum(
            int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or ()
        )
        return Publisher(
            pod=pod,
            source="kubernetes",
            instance=name,
            ready=_is_ready(status),
            restarts=restarts,
        )
    except (TypeError, ValueError) as e:
        raise PodProblem(f"pod {name}: {e}") from e


def _name_of(obj: Mapping[str, Any], all_namespaces: bool) -> str:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    return f"{meta.get('namespace') or ''}/{name}" if all_namespaces else name


def _is_ready(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )


def _int_annotation(
    pod: str, notes: Mapping[str, Any], key: str, default: int, low: int, high: int
) -> int:
    raw = notes.get(key)
    if raw is None:
        return default
    text = str(raw).strip()
    try:
        value = int(text, 10)
    except ValueError:
        raise PodProblem(
            f"pod {pod}: annotation {key}={raw!r} is not an integer"
            + (' (or "none")' if key == ANNOTATION_REPLAY_PORT else "")
        ) from None
    if not low <= value <= high:
        raise PodProblem(f"pod {pod}: annotation {key}={raw!r} is out of range {low}..{high}")
    return value


def _raw_watch_class() -> type[Any]:
    from kubernetes import watch

    class RawWatch(watch.Watch):  # type: ignore[misc, unused-ignore]
        """The client's watch, yielding pods as the server sent them: the
        client's models refuse objects they do not expect (a field a newer
        server leaves out), and one such pod would stop the stream at the
        same event forever; ``publisher_of`` reads only what it needs."""

        def get_return_type(self, func: Any) -> str:
            return ""  # no model: events keep their JSON ``raw_object``

    return RawWatch


class _Gone(Exception):
    """The resourceVersion the watch resumed from is too old: re-list."""


class KubernetesSource:
    """Follows the selected engine pods of a cluster through ``reconciler``
    (source ``"kubernetes"``).

    ``namespace``: None (the pod's own namespace in a cluster, else the
    kubeconfig context's, else ``default``), a name, or ``"*"`` for all
    namespaces (instance ids and pod names are then ``namespace/name``).
    ``api_client`` (a ``kubernetes.client.ApiClient``) overrides the
    configuration: otherwise ``kubeconfig`` when given, else the in-cluster
    service account, else ``$KUBECONFIG``, else ``~/.kube/config``.
    ``watch_timeout`` (s) is the timeoutSeconds of each watch request;
    failed requests are retried after ``backoff_initial`` s, doubling up to
    ``backoff_max`` s.

    For the ``kvsync_discovery_*`` metrics: ``pods`` (followed pods),
    ``errors`` (failed requests, misconfigured pods, refused sets),
    ``last_error``; ``synced`` once the first list was delivered."""

    def __init__(
        self,
        reconciler: _Reconciler,
        *,
        namespace: str | None = None,
        selector: str = DEFAULT_SELECTOR,
        model_labels: Sequence[str] = DEFAULT_MODEL_LABELS,
        kubeconfig: str | os.PathLike[str] | None = None,
        api_client: Any = None,
        watch_timeout: float = 300.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if isinstance(model_labels, str) or not model_labels or not all(model_labels):
            raise ValueError(
                f"kubernetes model_labels must be a non-empty list of labels, got {model_labels!r}"
            )
        if not watch_timeout >= 1:
            raise ValueError(f"kubernetes watch_timeout must be >= 1 s, got {watch_timeout}")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(
                "kubernetes back-off must satisfy 0 < backoff_initial <= backoff_max, got "
                f"{backoff_initial} and {backoff_max}"
            )
        if namespace is not None and not namespace:
            raise ValueError("kubernetes namespace must not be empty (None: the default one)")
        self.reconciler = reconciler
        self.selector = selector
        self.model_labels = tuple(model_labels)
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.api_client, context_namespace = _api_client(api_client, kubeconfig)
        self.namespace = namespace or _own_namespace() or context_namespace or "default"
        self.all_namespaces = self.namespace == "*"
        self.errors = 0
        self.last_error: str | None = None
        self.pods = 0
        self.lists = 0  # successful lists: 1 + the re-lists after 410 Gone
        self.synced = False
        self._synced = threading.Event()
        self.resource_version: str | None = None
        self._views: dict[str, _View] = {}  # by namespace/name, every selected pod
        self._delivered: dict[str, Publisher] | None = None
        self._refused = False  # the reconciler refused the last set (or some of its pods)
        self._stopping = threading.Event()
        self._watch: Any = None
        self._response: Any = None  # the HTTP response of the open watch
        self._thread: threading.Thread | None = None
        reconciler.expect("kubernetes")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """List, then watch, in a background thread until ``stop``."""
        if self._thread is not None:
            raise RuntimeError("KubernetesSource already started")
        self._thread = threading.Thread(target=self._run, name="kvsync-kubernetes", daemon=True)
        self._thread.start()

    def wait_synced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the first list to be delivered; True
        once it is (e.g. before dropping snapshot workers nothing follows)."""
        return self._synced.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching (the followed pods stay with the reconciler)."""
        self._stopping.set()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            watch, response = self._watch, self._response
            if watch is not None:
                watch.stop()
            if response is not None:
                # A watch waits on its socket until the server says something:
                # shut it down (again on every turn, as a request that was on
                # its way the first time has only now got a socket).
                _interrupt(response)
            self._thread.join(0.2)
        if self._thread.is_alive():
            log.warning("kubernetes discovery: the watch thread did not stop in %s s", timeout)

    def __enter__(self) -> KubernetesSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------- the loop

    def _run(self) -> None:
        backoff = self.backoff_initial
        while not self._stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                began = time.monotonic()
                if not self._watch_once() and time.monotonic() - began < 1.0:
                    # A watch that ends at once with nothing in it, again and
                    # again, must not become a busy loop against the server.
                    self._stopping.wait(self.backoff_initial)
                backoff = self.backoff_initial
            except _Gone as e:
                # The server compacted past our resourceVersion: what
                # happened meanwhile is only in a fresh list.
                log.info("kubernetes discovery: %s; listing again", e)
                self.resource_version = None
            except Exception as e:
                if self._stopping.is_set():
                    break
                self._report(f"kubernetes API {self._where()}: {_describe(e)}")
                if self._stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, self.backoff_max)

    def _where(self) -> str:
        return "all namespaces" if self.all_namespaces else f"namespace {self.namespace}"

    def _list_function(self) -> tuple[Callable[..., Any], dict[str, Any]]:
        from kubernetes import client

        api = client.CoreV1Api(self.api_client)
        if self.all_namespaces:
            return api.list_pod_for_all_namespaces, {}
        return api.list_namespaced_pod, {"namespace": self.namespace}

    def _list(self) -> None:
        func, args = self._list_function()
        resp = func(
            **args,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
        )
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        version = (body.get("metadata") or {}).get("resourceVersion")
        if not version:
            raise ValueError("the pod list has no metadata.resourceVersion")
        views: dict[str, _View] = {}
        for obj in items:
            self._update(obj, self._views, views)
        self._views = views
        self.lists += 1
        self.resource_version = str(version)
        self._deliver(force=not self.synced)
        self.synced = True
        self._synced.set()
        self._settle()
        log.info(
            "kubernetes discovery: listed %d selected pods in %s (resourceVersion %s)",
            len(items),
            self._where(),
            version,
        )

    def _watch_once(self) -> bool:
        """One watch request, until it ends; True if it brought any event."""
        from kubernetes.client.exceptions import ApiException

        func, args = self._list_function()
        w = _raw_watch_class()()
        self._watch = w
        if self._stopping.is_set():
            return False
        seen = False
        try:

            def call(**kwargs: Any) -> Any:
                self._response = func(**kwargs)
                return self._response

            events: Iterator[dict[str, Any] | None] = w.stream(
                call,
                **args,
                label_selector=self.selector,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=int(self.watch_timeout),
                _request_timeout=(CONNECT_TIMEOUT, self.watch_timeout + WATCH_GRACE),
            )
            for event in events:
                if self._stopping.is_set():
                    return seen
                if event is not None:
                    seen = True
                    self._event(event)
            return seen
        except ApiException as e:
            if e.status == 410:
                raise _Gone(f"resourceVersion {self.resource_version} is too old") from e
            raise
        finally:
            self._watch = self._response = None

    def _event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or {}
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._update(obj, self._views, self._views)
            self._deliver()
        elif kind == "DELETED":
            self._views.pop(_key(obj), None)
            self._deliver()
        elif kind != "BOOKMARK":
            log.warning("kubernetes discovery: ignoring a watch event of type %r", kind)
        # Only after the event is applied: a failure above resumes from
        # before it, so it is not lost.
        if version:
            self.resource_version = str(version)
        self._settle()

    # ---------------------------------------------------------- the state

    def _update(
        self, obj: Mapping[str, Any], before: Mapping[str, _View], into: dict[str, _View]
    ) -> None:
        """What pod ``obj`` means, into ``into``; ``before`` has what it
        meant (a problem is reported only when it is new)."""
        key = _key(obj)
        try:
            view = _View(
                publisher_of(
                    obj, model_labels=self.model_labels, all_namespaces=self.all_namespaces
                )
            )
        except PodProblem as e:
            view = _View(None, str(e))
            # Reported once per problem, not at every event or re-list.
            old = before.get(key)
            if old is None or old.problem != view.problem:
                self._report(f"kubernetes discovery: {e}; not followed")
        into[key] = view

    def _deliver(self, force: bool = False) -> None:
        desired = {
            v.publisher.pod.name: v.publisher
            for v in self._views.values()
            if v.publisher is not None
        }
        if desired == self._delivered and not force:
            return
        try:
            changes = self.reconciler.replace("kubernetes", list(desired.values()))
        except ValueError as e:
            # Refused as a whole: offered again only once the set changes.
            self._delivered = desired
            self._refused = True
            self._report(f"kubernetes discovery: the reconciler refused the pod set: {e}")
            return
        # (Any other failure propagates with _delivered unchanged: the event
        # is applied again after the back-off, and the set offered again.)
        self._delivered = desired
        failed: Mapping[str, str] = getattr(changes, "failed", None) or {}
        self._refused = bool(failed)
        for name, why in failed.items():
            self._report(f"kubernetes discovery: cannot follow pod {name}: {why}")
        self.pods = len(desired) - len(failed)

    def _settle(self) -> None:
        """The API answered: ``last_error`` goes once nothing is wrong."""
        if self.last_error is None or self._refused:
            return
        if not any(v.problem for v in self._views.values()):
            self.last_error = None

    def _report(self, message: str) -> None:
        log.error("%s", message)
        self.errors += 1
        self.last_error = message


def _interrupt(response: Any) -> None:
    """Unblock a read of a streaming urllib3 response from another thread."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        elif callable(getattr(response, "shutdown", None)):  # urllib3 >= 2.3
            response.shutdown()
    except (OSError, ValueError):
        pass  # already closed or released: nothing to unblock


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status and reason:
        return f"HTTP {status} {reason}"
    return f"{type(e).__name__}: {e}"


def _own_namespace() -> str | None:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def _api_client(
    api_client: Any, kubeconfig: str | os.PathLike[str] | None
) -> tuple[Any, str | None]:
    """The API client and the namespace of the kubeconfig context it came
    from (None in a cluster or when given a client)."""
    from kubernetes import config as typed_config
    from kubernetes.client import ApiClient, Configuration

    config: Any = typed_config  # partly annotated: its loaders are untyped

    if api_client is not None:
        return api_client, None
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        conf = Configuration()
        try:
            config.load_incluster_config(client_configuration=conf)
        except config.ConfigException as e:
            raise KubernetesConfigError(f"kubernetes in-cluster configuration: {e}") from e
        return ApiClient(conf), None
    path = str(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG")
    if not path:
        path = str(Path("~/.kube/config").expanduser())
    try:
        client = config.new_client_from_config(config_file=path)
        _, active = config.list_kube_config_contexts(config_file=path)
    except (config.ConfigException, OSError, ValueError, TypeError) as e:
        raise KubernetesConfigError(
            f"kubernetes: no usable configuration (not in a cluster; kubeconfig {path}): {e}"
        ) from e
    namespace = ((active or {}).get("context") or {}).get("namespace")
    return client, namespace
