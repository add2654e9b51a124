"""deploy/ without a cluster: every rendered manifest is valid against the
Kubernetes schemas (kubernetes-validate, strict: no unknown field), and the
manifests hold what docs/kubernetes.md promises (probes, RBAC verbs, ports,
labels, the token from a Secret, a non-root image)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvsync.discovery.kubernetes import DEFAULT_MODEL_LABELS, DEFAULT_SELECTOR, publisher_of

from ..conftest import REPO
from .kustomize_lite import KustomizeError, identity, render

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

DEPLOY = REPO / "deploy"
TREES = {
    "base": DEPLOY / "base",
    "monitoring": DEPLOY / "overlays" / "monitoring",
    "sim": DEPLOY / "overlays" / "sim",
}
Obj = dict[str, Any]


def objects(tree: str) -> list[Obj]:
    return render(TREES[tree])


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Obj, name: str) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


# ------------------------------------------------------------ schemas


def schema_versions() -> list[str]:
    from kubernetes_validate import utils

    versions = [v for v in utils.all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 28)]
    return sorted({versions[0], versions[-1]})


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(tree: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objs = objects(tree)
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked field by field below
        for version in schema_versions():
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{tree}: {identity(obj)} invalid for Kubernetes {version}: {e}")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("tree", sorted(TREES))
def test_the_small_renderer_agrees_with_kubectl_kustomize(tree: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(TREES[tree])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = {identity(o): o for o in yaml.safe_load_all(out) if o}
    ours = {identity(o): o for o in objects(tree)}
    assert ours == theirs


# ----------------------------------------------------- the renderer itself


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_renderer_follows_files_and_directories(tmp_path: Path) -> None:
    write(tmp_path / "base/kustomization.yaml", "resources: [a.yaml]\n")
    write(
        tmp_path / "base/a.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n",
    )
    write(tmp_path / "top/kustomization.yaml", "resources: [../base, c.yaml]\n")
    write(tmp_path / "top/c.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: c}\n")
    names = [o["metadata"]["name"] for o in render(tmp_path / "top")]
    assert names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        ("resources: [a.yaml]\nnamePrefix: x-\n", "unsupported field.*namePrefix"),
        ("resources: [missing.yaml]\n", "missing.yaml.*not found"),
        ("resources: [a.yaml, a.yaml]\n", "defined twice"),
        ("resources: [.]\n", "includes itself"),
    ],
)
def test_the_renderer_refuses_what_it_cannot_render(
    tmp_path: Path, kustomization: str, message: str
) -> None:
    write(tmp_path / "kustomization.yaml", kustomization)
    write(tmp_path / "a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path)


# ------------------------------------------------- what the docs promise


def test_the_deployment_serves_with_probes_the_token_and_no_root() -> None:
    objs = objects("base")
    dep = one(objs, "Deployment", "kvsync")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep, "kvsync")
    assert c["args"][:1] == ["serve"]
    config_path = c["args"][c["args"].index("--config") + 1]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = {e["name"]: e for e in c["env"]}
    token = env["KVSYNC_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "kvsync-token", "key": "token"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # The config file is the ConfigMap's key, mounted where --config points.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = one(objs, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert config_path == f"{mounts['config']}/config.toml"
    assert "config.toml" in config_map["data"]
    # Kubernetes would set KVSYNC_PORT=tcp://... for the kvsync Service:
    # KVSYNC_* is the configuration.
    assert pod["enableServiceLinks"] is False
    # Pods run as the service account the Role is bound to.
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


def test_rbac_grants_get_list_watch_on_pods_to_the_service_account() -> None:
    objs = objects("base")
    role = one(objs, "Role")
    binding = one(objs, "RoleBinding")
    account = one(objs, "ServiceAccount")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert role["metadata"]["namespace"] == account["metadata"]["namespace"]


def test_the_service_and_the_disruption_budget_select_the_kvsync_pods() -> None:
    objs = objects("base")
    dep = one(objs, "Deployment", "kvsync")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    service = one(objs, "Service", "kvsync")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def config_toml() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads(one(objects("base"), "ConfigMap")["data"]["config.toml"])
    return data


def test_the_config_listens_on_all_addresses_with_kubernetes_discovery() -> None:
    conf = config_toml()
    assert (conf["host"], conf["port"]) == ("0.0.0.0", 8080)
    assert "token" not in conf  # from the Secret, through KVSYNC_TOKEN
    assert conf["kubernetes"]["selector"] == DEFAULT_SELECTOR
    assert tuple(conf["kubernetes"]["model_labels"]) == DEFAULT_MODEL_LABELS
    assert conf["peer"] == "http://kvsync:8080"  # the Service of the base


def test_the_config_is_accepted_by_kvsync_serve(tmp_path: Path, monkeypatch: Any) -> None:
    config = pytest.importorskip("kvsync.service.config", reason="kvsync serve not merged yet")
    for key in [k for k in __import__("os").environ if k.startswith("KVSYNC_")]:
        monkeypatch.delenv(key)
    path = tmp_path / "config.toml"
    path.write_text(one(objects("base"), "ConfigMap")["data"]["config.toml"])
    monkeypatch.setenv("KVSYNC_TOKEN", "t")
    settings = config.load(path)
    assert settings.port == 8080 and settings.kubernetes is not None


def test_the_service_monitor_scrapes_metrics_with_the_token() -> None:
    objs = objects("monitoring")
    monitor = one(objs, "ServiceMonitor")
    service = one(objs, "Service", "kvsync")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "kvsync-token", "key": "token"},
    }


def test_the_simulated_engines_are_found_by_discovery_at_their_ports() -> None:
    from kvsync.sim import build_parser, check_args

    objs = objects("sim")
    engines = one(objs, "Deployment", "sim-engine")
    template = engines["spec"]["template"]
    conf = config_toml()["kubernetes"]
    key, value = conf["selector"].split("=")
    assert template["metadata"]["labels"][key] == value
    # What discovery makes of such a pod once it runs.
    running = {
        "metadata": {**template["metadata"], "name": "sim-engine-0", "namespace": "kvsync"},
        "status": {"phase": "Running", "podIP": "10.244.0.9"},
    }
    pub = publisher_of(running, model_labels=conf["model_labels"], all_namespaces=False)
    assert pub is not None and pub.pod.model == "sim-model"
    c = container(engines, "engine")
    assert c["args"][0] == "sim"
    args = build_parser().parse_args(c["args"][1:])
    assert check_args(args) is None
    assert (args.host, args.port, args.replay_port) == ("0.0.0.0", pub.pod.pub_port, 5558)
    assert pub.pod.replay_port == args.replay_port
    ports = {p["containerPort"] for p in c["ports"]}
    assert ports == {pub.pod.pub_port, pub.pod.replay_port}
    secret = one(objs, "Secret", "kvsync-token")
    assert secret["stringData"]["token"]
    assert c["image"] == container(one(objs, "Deployment", "kvsync"), "kvsync")["image"]


def test_the_dockerfile_builds_the_wheel_and_runs_it_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2 and " AS " in stages[0]
    assert "maturin build" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["kvsync"]' in text
    image = container(one(objects("base"), "Deployment", "kvsync"), "kvsync")["image"]
    assert image in (REPO / "Makefile").read_text()  # what `make e2e` builds and loads
