"""docs/kubernetes.md: the README links it, its links resolve, it names
every label and annotation discovery reads, and its snippets work: the
vLLM Deployment is valid and discovery reads from it the ports its
``--kv-events-config`` publishes on; the RBAC and the configuration are
those of deploy/."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from kvsync.discovery import kubernetes as kube

from ..conftest import REPO
from .test_manifests import config_toml, objects, one, tomllib

PAGE = REPO / "docs" / "kubernetes.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_readme_links_the_page_from_a_deploy_section() -> None:
    readme = (REPO / "README.md").read_text()
    assert "## Deploy on Kubernetes" in readme
    assert "](docs/kubernetes.md)" in readme


def test_the_page_stands_alone_and_its_links_resolve() -> None:
    text = PAGE.read_text()
    assert "../shared" not in text and "SPEC.md" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (PAGE.parent / target).is_file(), f"links to missing {target}"


def test_every_label_and_annotation_discovery_reads_is_documented() -> None:
    text = PAGE.read_text()
    keys = [
        kube.ANNOTATION_EVENTS_PORT,
        kube.ANNOTATION_REPLAY_PORT,
        kube.ANNOTATION_DP_SIZE,
        kube.ANNOTATION_TOPIC,
        *kube.DEFAULT_MODEL_LABELS,
        kube.DEFAULT_SELECTOR.split("=")[0],
    ]
    for key in keys:
        assert f"| `{key}` |" in text, key


def vllm_deployment() -> dict[str, Any]:
    [doc] = [b for b in blocks("yaml") if "vllm" in b]
    obj: dict[str, Any] = yaml.safe_load(doc)
    return obj


def test_the_vllm_deployment_is_valid_and_discovered_at_its_event_ports() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    dep = vllm_deployment()
    kv.validate(dep, "1.30.0", strict=True)
    template = dep["spec"]["template"]
    [engine] = template["spec"]["containers"]
    args = engine["args"]
    events = json.loads(args[args.index("--kv-events-config") + 1])
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    running = {
        "metadata": {**template["metadata"], "name": "llama-vllm-0", "namespace": "llm"},
        "status": {"phase": "Running", "podIP": "10.0.3.4"},
    }
    pub = kube.publisher_of(running, model_labels=kube.DEFAULT_MODEL_LABELS, all_namespaces=False)
    assert pub is not None
    assert events["endpoint"] == f"tcp://*:{pub.pod.pub_port}"
    assert events["replay_endpoint"] == f"tcp://*:{pub.pod.replay_port}"
    assert pub.pod.topic in (None, events["topic"])
    assert pub.pod.model in args[0]
    ports = {p["containerPort"] for p in engine["ports"]}
    assert {pub.pod.pub_port, pub.pod.replay_port} <= ports


def test_the_cluster_wide_rbac_grants_only_reading_pods() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    [doc] = [b for b in blocks("yaml") if "ClusterRole" in b]
    role, binding = list(yaml.safe_load_all(doc))
    for obj in (role, binding):
        kv.validate(obj, "1.30.0", strict=True)
    base_role = one(objects("base"), "Role")
    assert role["rules"] == base_role["rules"]
    assert binding["subjects"] == one(objects("base"), "RoleBinding")["subjects"]


def test_the_documented_configuration_is_the_deployed_one() -> None:
    [doc] = blocks("toml")
    shown = tomllib.loads(doc)
    deployed = config_toml()
    assert shown["kubernetes"] == deployed["kubernetes"]
    assert (shown["host"], shown["port"]) == (deployed["host"], deployed["port"])
