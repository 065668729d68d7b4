"""deploy/kubernetes/ is valid for Kubernetes and for epolld, and keeps its promises.

The schemas are kubernetes-validate's bundled copies of Kubernetes' OpenAPI schemas (the
"-local" variants, whose references are all within the package): the check runs offline.
Strict mode refuses any field the schema does not know, so a misspelt key fails here rather
than being silently dropped by the API server. tests/image/test_kube.py runs them.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from epolld.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.36"  # the schemas checked against; kubernetes-validate bundles them
IMAGE_USER = 10001  # packaging/image/build-image's uid


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _resources() -> dict[str, dict[str, Any]]:
    """Every resource kustomization.yaml lists, by kind."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for document in _documents(MANIFESTS / name):
            found[document["kind"]] = document
    return found


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, f"expected a duration in seconds, got {text!r}"
    return float(match.group(1))


def test_kustomization_lists_every_manifest() -> None:
    """kubectl apply -k applies every file of the directory, and the four kinds are there."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert set(_resources()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


@pytest.mark.parametrize("name", sorted(p.name for p in MANIFESTS.glob("*.yaml")))
def test_manifest_is_valid_for_kubernetes(name: str) -> None:
    """Each resource validates against Kubernetes' schema, strictly (no unknown field)."""
    if name == "kustomization.yaml":  # kustomize's own file, not an API resource
        return
    for document in _documents(MANIFESTS / name):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_schema_check_refuses_an_unknown_field() -> None:
    """Strict validation is in force: a misspelt field in the pod template is an error."""
    deployment = _resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_configmap_holds_a_valid_epolld_configuration(tmp_path: Path) -> None:
    """The ConfigMap's epolld.yaml loads (as epolld --check-config would), serves on the
    port the Deployment names, and exposes the probes' endpoint on its metrics port."""
    resources = _resources()
    path = tmp_path / "epolld.yaml"
    path.write_text(resources["ConfigMap"]["data"]["epolld.yaml"])
    config = load_config(path)
    (container,) = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = yaml.safe_load(path.read_text())
    assert settings["listen"] == [f"0.0.0.0:{ports['echo']}"]
    assert settings["metrics"]["listen"] == f"0.0.0.0:{ports['metrics']}"
    assert config.shutdown_timeout_s == _duration_s(settings["shutdown_timeout"])
    for probe, path_ in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path_, "port": "metrics"}


def test_deployment_outlasts_the_drain_and_runs_confined() -> None:
    """The grace period exceeds shutdown_timeout; the pod runs as the image's non-root user
    with a read-only root, no capabilities, no privilege escalation and seccomp's default."""
    resources = _resources()
    settings = yaml.safe_load(resources["ConfigMap"]["data"]["epolld.yaml"])
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > _duration_s(settings["shutdown_timeout"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert f"uid={IMAGE_USER}" in (ROOT / "packaging" / "image" / "build-image").read_text()


def test_deployment_names_this_release_and_the_image_command() -> None:
    """The image tag is pyproject.toml's version; args are the image's own command."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (container,) = _resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"localhost/epolld:{version}"
    assert container["args"] == ["epolld", "--config", "/etc/epolld/epolld.yaml"]


def test_pdb_and_service_select_the_deployments_pods() -> None:
    """The Service and the PodDisruptionBudget select exactly the pods the Deployment makes,
    and the budget leaves a replica serving while another is evicted."""
    resources = _resources()
    deployment = resources["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert resources["Service"]["spec"]["selector"] == labels
    pdb = resources["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"] == labels
    assert pdb["minAvailable"] < deployment["spec"]["replicas"]
