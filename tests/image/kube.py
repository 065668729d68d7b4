"""deploy/kubernetes/ as podman kube play (4.3, Debian 12's) takes it: the overlay.

kustomize is not in Debian 12, so the overlay is this transform, applied to the manifests as
they are in the repository (what kustomize patches would do, one reason each):

- the Service and the PodDisruptionBudget are left out: kube play ignores Services, and a
  budget concerns evictions, which podman does not make;
- the image is the tests' build of this tree (kustomize's `images:`);
- the containerPorts go: kube play publishes every one on the host at the same port, so two
  replicas would collide; the tests reach each pod at its own address, as a Service would;
- the probes go: httpGet needs curl inside the image, and 4.3 turns only a livenessProbe
  into a healthcheck, run only by systemd timers; the tests ask /healthz and /readyz over
  HTTP from the host instead, as a kubelet does.

Everything else goes as written: the ConfigMap (mounted at /etc/epolld), the replicas, the
user, the read-only root, the dropped capabilities, seccomp and the resources. 4.3 ignores
terminationGracePeriodSeconds: the tests stop a container the way a kubelet does (SIGTERM,
SIGKILL after the grace period) with `podman stop -t`, not `podman pod stop`, which stops
the pod's network at the same moment (shared/NOTES.md).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
LEFT_OUT = {"Service", "PodDisruptionBudget"}


def resources() -> list[dict[str, Any]]:
    """The resources kustomization.yaml lists, in its order."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    found = []
    for name in kustomization["resources"]:
        found += [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    return found


def podman_overlay(image: str) -> str:
    """The manifests for podman kube play, as one multi-document YAML."""
    played = []
    for resource in resources():
        if resource["kind"] in LEFT_OUT:
            continue
        resource = copy.deepcopy(resource)
        if resource["kind"] == "Deployment":
            for container in resource["spec"]["template"]["spec"]["containers"]:
                container["image"] = image
                for key in ("ports", "readinessProbe", "livenessProbe", "startupProbe"):
                    container.pop(key, None)
        played.append(resource)
    return yaml.safe_dump_all(played, sort_keys=False)


def grace_period_s() -> int:
    """The Deployment's terminationGracePeriodSeconds (what a kubelet waits before SIGKILL)."""
    (deployment,) = [r for r in resources() if r["kind"] == "Deployment"]
    return int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])


def settings() -> dict[str, Any]:
    """epolld's settings in the ConfigMap."""
    (configmap,) = [r for r in resources() if r["kind"] == "ConfigMap"]
    return dict(yaml.safe_load(configmap["data"]["epolld.yaml"]))
