"""KubernetesSource against a fake API server through the official client
(a kubeconfig pointing at the fake): what the reconciler is told on every
pod transition, and that resyncs, watch timeouts, bookmarks and outages
neither lose changes nor drop pods."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsync.discovery.kubernetes import KubernetesConfigError, KubernetesSource

from .conftest import Recorder, wait_for
from .fake_apiserver import FakeApiServer, Obj, pod

pytestmark = pytest.mark.integration


@pytest.fixture
def source_of(kubeconfig: Path, recorder: Recorder) -> Iterator[Any]:
    started: list[KubernetesSource] = []

    def make(**kwargs: Any) -> KubernetesSource:
        kwargs.setdefault("kubeconfig", kubeconfig)
        kwargs.setdefault("namespace", "default")
        kwargs.setdefault("watch_timeout", 2)
        kwargs.setdefault("backoff_initial", 0.05)
        kwargs.setdefault("backoff_max", 0.2)
        src = KubernetesSource(kwargs.pop("reconciler", recorder), **kwargs)
        src.start()
        started.append(src)
        wait_for("the first list", lambda: src.synced)
        return src

    yield make
    for src in started:
        src.stop()
        assert src._thread is not None and not src._thread.is_alive(), "source did not stop"


def annotate(**notes: str) -> Any:
    def change(obj: Obj) -> None:
        obj["metadata"]["annotations"].update(notes)

    return change


def test_a_running_pod_is_followed_with_the_address_of_its_annotations(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("plain", ip="10.1.0.1"))
    apiserver.put(
        pod(
            "tuned",
            ip="10.1.0.2",
            annotations={
                "kvsync.io/kv-events-port": "6000",
                "kvsync.io/kv-replay-port": "none",
                "kvsync.io/dp-size": "2",
                "kvsync.io/kv-events-topic": "kv@llama",
            },
        )
    )
    src = source_of()
    pubs = recorder.wait("both pods", lambda c: len(c) == 2)
    plain, tuned = pubs["plain"], pubs["tuned"]
    assert (plain.pod.host, plain.pod.pub_port, plain.pod.replay_port) == ("10.1.0.1", 5557, 5558)
    assert (plain.pod.dp_size, plain.pod.topic, plain.pod.model) == (1, None, "llama")
    assert (plain.source, plain.instance, plain.tenant, plain.ready) == (
        "kubernetes",
        "plain",
        "default",
        True,
    )
    assert (tuned.pod.pub_port, tuned.pod.replay_port, tuned.pod.dp_size) == (6000, None, 2)
    assert tuned.pod.topic == "kv@llama"
    assert recorder.expected == ["kubernetes"]
    assert (src.pods, src.errors, src.last_error, src.lists) == (2, 0, None, 1)
    # The list and the watch carry the selector; the watch starts from the
    # list's version and asks for bookmarks.
    list_rv = str(apiserver.version)
    watch = wait_for("a watch", lambda: apiserver.watches())[0]
    assert watch.path == "/api/v1/namespaces/default/pods"
    assert watch.query["labelSelector"] == "kvsync.io/kv-events=true"
    assert (watch.query["resourceVersion"], watch.query["allowWatchBookmarks"]) == (list_rv, "true")


def test_only_running_pods_with_an_ip_are_followed(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("p", phase="Pending", ip=None, ready=False))
    src = source_of()
    assert recorder.current == {} and recorder.sets == [{}]  # the first list is delivered, empty
    apiserver.patch("p", lambda o: o["status"].update(phase="Running"))  # no IP yet
    apiserver.put(pod("q", ip="10.1.0.9"))  # a later event shows the one before was applied
    recorder.wait("q", lambda c: "q" in c)
    assert "p" not in recorder.current
    apiserver.patch("p", lambda o: o["status"].update(podIP="10.1.0.5"))
    assert recorder.wait("p", lambda c: "p" in c)["p"].pod.host == "10.1.0.5"
    apiserver.patch("p", lambda o: o["status"].update(phase="Failed"))
    recorder.wait("p gone", lambda c: "p" not in c)
    assert src.pods == 1 and src.errors == 0


def test_a_pod_that_is_not_ready_stays_followed_as_not_ready(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("p", ready=False))
    source_of()
    assert recorder.wait("p", lambda c: "p" in c)["p"].ready is False

    def ready(flag: bool) -> Any:
        def change(o: Obj) -> None:
            o["status"]["conditions"][0]["status"] = "True" if flag else "False"

        return change

    apiserver.patch("p", ready(True))
    recorder.wait("p ready", lambda c: c["p"].ready)
    apiserver.patch("p", ready(False))
    pub = recorder.wait("p not ready", lambda c: not c["p"].ready)["p"]
    assert pub.pod.host == "10.1.0.1"  # same address: followed throughout


def test_an_ip_or_port_change_gives_a_new_address_under_the_same_name(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("p", ip="10.1.0.1"))
    source_of()
    first = recorder.wait("p", lambda c: "p" in c)["p"]
    apiserver.patch("p", lambda o: o["status"].update(podIP="10.1.0.7"))
    moved = recorder.wait("new ip", lambda c: c["p"].pod.host == "10.1.0.7")["p"]
    assert moved.pod.name == first.pod.name and moved.pod != first.pod
    apiserver.patch("p", annotate(**{"kvsync.io/kv-events-port": "7000"}))
    ported = recorder.wait("new port", lambda c: c["p"].pod.pub_port == 7000)["p"]
    assert (ported.pod.host, ported.pod.replay_port) == ("10.1.0.7", 5558)


def test_a_graceful_delete_unfollows_at_the_deletion_timestamp(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("p"))
    apiserver.put(pod("q", ip="10.1.0.2"))
    src = source_of()
    recorder.wait("both", lambda c: len(c) == 2)
    apiserver.delete("p")  # bound to a node: only MODIFIED with a deletionTimestamp
    recorder.wait("p unfollowed while terminating", lambda c: set(c) == {"q"})
    sets = len(recorder.sets)
    apiserver.delete("p", graceful=False)  # DELETED later: nothing more to do
    apiserver.put(pod("r", ip="10.1.0.3"))
    recorder.wait("r", lambda c: set(c) == {"q", "r"})
    assert len(recorder.sets) == sets + 1  # only r's arrival changed the set
    assert src.errors == 0


def test_deleted_without_a_prior_modification_unfollows(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("p", node=None))  # not bound: a delete is immediate
    source_of()
    recorder.wait("p", lambda c: "p" in c)
    apiserver.delete("p")
    recorder.wait("p gone", lambda c: c == {})


def test_container_restarts_grow_the_publishers_restart_count(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    obj = pod("p", restarts=1)
    obj["status"]["containerStatuses"].append(
        {"name": "sidecar", "image": "s", "imageID": "s@1", "ready": True, "restartCount": 2}
    )
    apiserver.put(obj)
    source_of()
    assert recorder.wait("p", lambda c: "p" in c)["p"].restarts == 3

    def restart(o: Obj) -> None:
        o["status"]["containerStatuses"][0]["restartCount"] += 1

    apiserver.patch("p", restart)
    pub = recorder.wait("restart seen", lambda c: c["p"].restarts == 4)["p"]
    assert pub.pod.host == "10.1.0.1"


def test_a_pod_without_a_model_label_is_reported_once_and_not_followed(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any, caplog: Any
) -> None:
    caplog.set_level(logging.ERROR, logger="kvsync.discovery.kubernetes")
    apiserver.put(pod("nomodel", labels={"kvsync.io/kv-events": "true"}))
    apiserver.put(
        pod(
            "aibrix",
            ip="10.1.0.2",
            labels={"kvsync.io/kv-events": "true", "model.aibrix.ai/name": "qwen"},
        )
    )
    src = source_of()
    pubs = recorder.wait("aibrix", lambda c: "aibrix" in c)
    assert pubs["aibrix"].pod.model == "qwen" and "nomodel" not in pubs
    assert src.errors == 1
    assert src.last_error is not None and "nomodel" in src.last_error
    assert "kvsync.io/model" in src.last_error
    # Neither its own changes nor a re-list report it again; a model label
    # makes it followed.
    apiserver.patch("nomodel", annotate(note="x"))
    with apiserver.outage():
        apiserver.patch("aibrix", annotate(note="y"))
        apiserver.compact()
        wait_for("a failed request", lambda: src.errors > 1)
    recorder.wait("the re-list", lambda c: src.lists == 2)
    reports = [r for r in caplog.records if "nomodel" in r.getMessage()]
    assert len(reports) == 1
    apiserver.patch("nomodel", lambda o: o["metadata"]["labels"].update({"kvsync.io/model": "m"}))
    assert recorder.wait("nomodel", lambda c: "nomodel" in c)["nomodel"].pod.model == "m"
    wait_for("the error to clear", lambda: src.last_error is None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kvsync.io/kv-events-port", "http"),
        ("kvsync.io/kv-events-port", "70000"),
        ("kvsync.io/kv-replay-port", "off"),
        ("kvsync.io/dp-size", "0"),
    ],
)
def test_a_bad_annotation_is_reported_and_the_pod_not_followed(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any, key: str, value: str
) -> None:
    apiserver.put(pod("bad", annotations={key: value}))
    apiserver.put(pod("good", ip="10.1.0.2"))
    src = source_of()
    assert set(recorder.wait("good", lambda c: "good" in c)) == {"good"}
    assert src.errors == 1 and src.pods == 1
    assert src.last_error is not None
    assert "bad" in src.last_error and key in src.last_error and repr(value) in src.last_error


def test_410_gone_relists_and_reconciles_a_deletion_missed_meanwhile(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("a"))
    apiserver.put(pod("b", ip="10.1.0.2"))
    src = source_of()
    recorder.wait("a and b", lambda c: set(c) == {"a", "b"})
    with apiserver.outage():
        apiserver.delete("b", graceful=False)
        apiserver.put(pod("c", ip="10.1.0.3"))
        apiserver.compact()  # the changes above are no longer in the history
        wait_for("a failed request", lambda: src.errors)
        assert set(recorder.current) == {"a", "b"}  # an outage deletes nothing
    recorder.wait("the re-list", lambda c: set(c) == {"a", "c"})
    assert src.lists == 2


def test_watch_timeouts_resume_from_the_last_version_without_a_relist(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.max_watch_seconds = 0.3  # the server ends every watch quickly
    src = source_of()
    for i in range(4):
        watches = len(apiserver.watches())
        apiserver.put(pod(f"p{i}", ip=f"10.1.0.{i + 1}"))
        recorder.wait(f"p{i}", lambda c, i=i: f"p{i}" in c)
        version = str(apiserver.version)
        # The next watch resumes exactly where this one stopped.
        wait_for(
            "a watch from the last version",
            lambda w=watches, v=version: any(
                r.query["resourceVersion"] == v for r in apiserver.watches()[w:]
            ),
        )
    assert set(recorder.current) == {"p0", "p1", "p2", "p3"}
    assert src.lists == 1 and src.errors == 0


def test_a_bookmark_moves_the_resume_version_past_unselected_changes(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("p"))
    src = source_of()
    recorder.wait("p", lambda c: "p" in c)
    wait_for("a watch", lambda: apiserver.open_watches)
    for i in range(3):  # not selected: the watch sends nothing for them
        apiserver.put(pod(f"other{i}", labels={"app": "web"}))
    bookmarked = str(apiserver.version)
    apiserver.bookmark()
    wait_for("the bookmark", lambda: src.resource_version == bookmarked)
    apiserver.compact()  # only a client that kept the bookmark avoids a 410
    apiserver.drop_watches()
    wait_for(
        "a watch from the bookmark",
        lambda: len(apiserver.watches(resourceVersion=bookmarked)) >= 1,
    )
    apiserver.put(pod("q", ip="10.1.0.2"))
    recorder.wait("q", lambda c: "q" in c)
    assert src.lists == 1


def test_an_api_outage_keeps_the_pods_and_the_source_recovers(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("a"))
    apiserver.put(pod("b", ip="10.1.0.2"))
    src = source_of()
    recorder.wait("a and b", lambda c: set(c) == {"a", "b"})
    sets = len(recorder.sets)
    with apiserver.outage():
        wait_for("several failed requests", lambda: src.errors >= 2)
        assert src.last_error is not None and "kubernetes API" in src.last_error
        assert len(recorder.sets) == sets  # nothing was unfollowed
        assert src.pods == 2
        apiserver.delete("b", graceful=False)
    recorder.wait("the deletion made during the outage", lambda c: set(c) == {"a"})
    apiserver.put(pod("c", ip="10.1.0.3"))
    recorder.wait("c", lambda c: set(c) == {"a", "c"})
    wait_for("the error to clear", lambda: src.last_error is None)


def test_a_dropped_watch_loses_no_change(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    src = source_of(watch_timeout=300)
    wait_for("a watch", lambda: apiserver.open_watches)
    apiserver.drop_watches()
    apiserver.put(pod("p"))  # possibly while no watch is open
    recorder.wait("p", lambda c: "p" in c)
    assert src.lists == 1


def test_all_namespaces_name_pods_namespace_slash_name(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("engine", namespace="team-a", ip="10.1.0.1"))
    apiserver.put(pod("engine", namespace="team-b", ip="10.1.0.2"))
    source_of(namespace="*")
    pubs = recorder.wait("both", lambda c: len(c) == 2)
    assert set(pubs) == {"team-a/engine", "team-b/engine"}
    assert pubs["team-b/engine"].instance == "team-b/engine"
    assert pubs["team-b/engine"].pod.host == "10.1.0.2"
    # the watch starts after the list is delivered: wait for it, do not race it
    wait_for("the all-namespaces watch", lambda: apiserver.watches())
    assert {r.path for r in apiserver.watches()} == {"/api/v1/pods"}
    apiserver.delete("engine", namespace="team-a", graceful=False)
    recorder.wait("team-a gone", lambda c: set(c) == {"team-b/engine"})


def test_one_namespace_and_the_selector_bound_what_is_followed(
    apiserver: FakeApiServer, recorder: Recorder, source_of: Any
) -> None:
    apiserver.put(pod("mine", namespace="ml"))
    apiserver.put(pod("theirs", namespace="default", ip="10.1.0.2"))
    apiserver.put(pod("web", namespace="ml", ip="10.1.0.3", labels={"kvsync.io/model": "x"}))
    source_of(namespace="ml")
    assert set(recorder.wait("mine", lambda c: "mine" in c)) == {"mine"}
    # Losing the selector label is a deletion for a watch.
    apiserver.patch("mine", lambda o: o["metadata"]["labels"].pop("kvsync.io/kv-events"), "ml")
    recorder.wait("mine gone", lambda c: c == {})


def test_the_namespace_defaults_to_the_kubeconfig_context(
    apiserver: FakeApiServer, recorder: Recorder, tmp_path: Path
) -> None:
    path = apiserver.kubeconfig(tmp_path / "kc", namespace="inference")
    src = KubernetesSource(recorder, kubeconfig=path)
    assert src.namespace == "inference"
    bare = apiserver.kubeconfig(tmp_path / "bare")
    assert KubernetesSource(recorder, kubeconfig=bare).namespace == "default"


def test_the_kubeconfig_comes_from_the_environment(
    apiserver: FakeApiServer, recorder: Recorder, tmp_path: Path, monkeypatch: Any
) -> None:
    path = apiserver.kubeconfig(tmp_path / "env-kc", namespace="from-env")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert KubernetesSource(recorder).namespace == "from-env"


def test_no_usable_configuration_is_a_clear_error(
    recorder: Recorder, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(KubernetesConfigError, match="nope"):
        KubernetesSource(recorder, kubeconfig=missing)
    broken = tmp_path / "broken"
    broken.write_text(json.dumps({"apiVersion": "v1", "kind": "Config"}))
    with pytest.raises(KubernetesConfigError, match="broken"):
        KubernetesSource(recorder, kubeconfig=broken)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_labels": ()}, "model_labels"),
        ({"model_labels": "kvsync.io/model"}, "model_labels"),
        ({"watch_timeout": 0}, "watch_timeout"),
        ({"backoff_initial": 5, "backoff_max": 1}, "backoff"),
        ({"namespace": ""}, "namespace"),
    ],
)
def test_bad_arguments_are_refused_by_name(
    kubeconfig: Path, recorder: Recorder, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        KubernetesSource(recorder, kubeconfig=kubeconfig, **kwargs)


def test_a_set_the_reconciler_refuses_is_reported(apiserver: FakeApiServer, source_of: Any) -> None:
    class Refusing(Recorder):
        def replace(self, source: str, publishers: Any) -> None:
            raise ValueError("pod 'p' is claimed by source 'kubernetes' and by source 'static'")

    apiserver.put(pod("p"))
    src = source_of(reconciler=Refusing())
    assert src.errors == 1 and src.pods == 0
    assert src.last_error is not None and "claimed" in src.last_error


def test_stop_ends_a_long_watch(
    apiserver: FakeApiServer, recorder: Recorder, kubeconfig: Path
) -> None:
    src = KubernetesSource(recorder, kubeconfig=kubeconfig, namespace="default", watch_timeout=300)
    src.start()
    wait_for("an open watch", lambda: apiserver.open_watches)
    src.stop(timeout=10)
    assert src._thread is not None and not src._thread.is_alive()
    wait_for("the watch to close", lambda: apiserver.open_watches == 0)


def test_in_a_cluster_without_a_service_account_the_error_says_so(
    recorder: Recorder, monkeypatch: Any
) -> None:
    if Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        pytest.skip("this machine runs in a cluster")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    with pytest.raises(KubernetesConfigError, match="in-cluster"):
        KubernetesSource(recorder)


def test_a_given_api_client_is_used(
    apiserver: FakeApiServer, recorder: Recorder, kubeconfig: Path
) -> None:
    from kubernetes import config

    apiserver.put(pod("p"))
    client = config.new_client_from_config(config_file=str(kubeconfig))
    src = KubernetesSource(recorder, api_client=client, watch_timeout=2)
    with src:
        assert src.namespace == "default"
        recorder.wait("p", lambda c: "p" in c)


def test_a_reconciler_failure_is_retried_until_the_set_is_delivered(
    apiserver: FakeApiServer, source_of: Any, caplog: Any
) -> None:
    caplog.set_level(logging.ERROR, logger="kvsync.discovery.kubernetes")

    class FailsOnce(Recorder):
        failed = False

        def replace(self, source: str, publishers: Any) -> None:
            if self.sets and not self.failed:  # after the first list
                self.failed = True
                raise RuntimeError("the event manager is busy")
            super().replace(source, publishers)

    recorder = FailsOnce()
    src = source_of(reconciler=recorder)
    apiserver.put(pod("p"))
    recorder.wait("p, after the failure", lambda c: "p" in c)
    assert recorder.failed and src.errors == 1
    assert any("busy" in r.getMessage() for r in caplog.records)
    wait_for("the error to clear", lambda: src.last_error is None)


def test_wait_synced_returns_once_the_first_list_is_delivered(
    apiserver: FakeApiServer, recorder: Recorder, kubeconfig: Path
) -> None:
    apiserver.put(pod("p"))
    src = KubernetesSource(recorder, kubeconfig=kubeconfig, namespace="default", watch_timeout=2)
    assert src.wait_synced(0) is False  # not started: nothing listed
    apiserver.set_outage(True)
    src.start()
    try:
        assert src.wait_synced(0.3) is False  # the API server cannot be reached
        assert recorder.sets == []
        apiserver.set_outage(False)
        assert src.wait_synced(15)
        assert "p" in recorder.current
    finally:
        src.stop()
