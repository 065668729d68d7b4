"""deploy/kubernetes/ played by podman kube play (through the overlay in kube.py): two
replicas start with the ConfigMap's settings, each echoes from the host, and a graceful stop
as a kubelet makes it gives an open client its whole echo and a FIN, and exits 0.

Root only (podman's networks, the image build): skipped with the reason otherwise.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image import kube
from tests.image.podman import (
    Container,
    connect,
    finish,
    http_get,
    image,
    podman,
    read_to_eof,
    round_trip,
    wait_until,
)

# A cold image build (a minute or two, more on a loaded machine) may happen in the fixture.
pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

DEPLOYMENT = "epolld"
KUBE_NETWORK = "podman-default-kube-network"
REPLICAS = 2
IN_FLIGHT = bytes(range(256)) * 1024  # 256 KiB sent just before the stop, echoed in full


def _metrics_port() -> int:
    return int(kube.settings()["metrics"]["listen"].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def replicas(
    image_prerequisites: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Container]]:
    """The Deployment's pods, played; torn down (pods, the ConfigMap's volume, the network)."""
    tag = image()
    played = tmp_path_factory.mktemp("kube") / "epolld.yaml"
    played.write_text(kube.podman_overlay(tag))
    podman("kube", "down", str(played), check=False)
    try:
        podman("kube", "play", str(played), timeout=300)
        names = wait_until(lambda: _containers() if len(_containers()) == REPLICAS else None,
                           60.0, f"{REPLICAS} running containers")  # fmt: skip
        containers = [Container(name) for name in names]
        for container in containers:
            container.wait_for_log("metrics_listening")
        yield containers
    finally:
        podman("kube", "down", str(played), check=False)
        podman("volume", "rm", "--force", DEPLOYMENT, check=False)
        podman("network", "rm", "--force", KUBE_NETWORK, check=False)


def _containers() -> list[str]:
    """The Deployment's running containers: kube play names them DEPLOYMENT-pod-N-CONTAINER
    (the pods' infra containers are ID-infra)."""
    names = podman("ps", "--format", "{{.Names}}").split()
    return sorted(n for n in names if re.fullmatch(rf"{DEPLOYMENT}-pod-\d+-epolld", n))


def test_two_replicas_echo_with_the_configmaps_settings(replicas: list[Container]) -> None:
    """Both replicas echo from the host; the ConfigMap's file is the one in force (its
    metrics endpoint answers, which the image's own default does not open); they run as the
    image's user with no capabilities on a read-only root."""
    assert len({c.address for c in replicas}) == REPLICAS
    for container in replicas:
        with connect(container.address) as client:
            assert round_trip(client, b"hello " + container.name.encode()) == (
                b"hello " + container.name.encode()
            )
        status, body = http_get(container.address, _metrics_port(), "/metrics")
        assert status == 200
        assert "epolld_" in body
        listening = container.wait_for_log("listening")
        assert listening["address"] == kube.settings()["listen"][0]
        assert container.exec("id", "-u").strip() == "10001"
        proc_status = Path(f"/proc/{container.host_pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in proc_status
        written = podman("exec", container.name, "sh", "-c", "touch /x 2>&1; echo $?")
        assert "Read-only file system" in written


def test_graceful_stop_gives_the_open_client_its_echo_and_a_fin(
    replicas: list[Container],
) -> None:
    """SIGTERM with the grace period (podman stop -t, as a kubelet does): epolld drains with
    the ConfigMap's shutdown_timeout; what the open client sent is echoed in full,
    then a FIN; the container exits 0, before the grace period's SIGKILL."""
    container = replicas[0]
    client = connect(container.address)
    stopper = threading.Thread(
        target=podman,
        args=("stop", "--time", str(kube.grace_period_s()), container.name),
        kwargs={"timeout": kube.grace_period_s() + 60},
    )
    try:
        assert round_trip(client, b"before the stop ") == b"before the stop "
        client.sendall(IN_FLIGHT)  # not read back before the stop
        stopper.start()
        started = container.wait_for_log("shutdown_started")
        assert started["timeout_s"] == 20.0  # the ConfigMap's shutdown_timeout
        assert started["connections"] == 1
        assert read_to_eof(client) == IN_FLIGHT  # the whole echo, then epolld's FIN
    finally:
        client.close()
        stopper.join(kube.grace_period_s() + 60)
    assert container.exit_code() == 0
    assert container.logs()[-1]["event"] == "shutdown_complete"


def test_health_endpoints_answer_then_readyz_fails_while_draining(
    replicas: list[Container],
) -> None:
    """(Needs the health endpoints.) /healthz and /readyz answer 200 while a replica serves;
    from SIGTERM on, while its open client drains, /readyz answers 503 so that Kubernetes
    takes the pod out of the Service's endpoints; the client still gets its echo and a FIN."""
    container = replicas[1]
    port = _metrics_port()
    assert http_get(container.address, port, "/healthz")[0] == 200
    assert http_get(container.address, port, "/readyz")[0] == 200
    client = connect(container.address)
    # podman stop, as a kubelet stops a pod's container: a bare SIGTERM would let the pod's
    # restartPolicy start it again at once, racing `podman wait`.
    stopper = threading.Thread(
        target=podman,
        args=("stop", "--time", str(kube.grace_period_s()), container.name),
        kwargs={"timeout": kube.grace_period_s() + 60},
    )
    try:
        assert round_trip(client, b"ping") == b"ping"
        stopper.start()
        container.wait_for_log("shutdown_started")
        assert http_get(container.address, port, "/readyz")[0] == 503
        assert finish(client) == b""
    finally:
        client.close()
        stopper.join(kube.grace_period_s() + 60)
    assert container.exit_code() == 0
