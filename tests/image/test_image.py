"""epolld's OCI image under podman, as a container runtime runs it: the image's own command and
user, a read-only root, no capabilities, the configuration mounted at /etc/epolld.

Root only (podman's networks, the image build): skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.image.podman import (
    CACHE_DIR,
    HOST_ARCH,
    Container,
    children_of,
    connect,
    image,
    podman,
    read_to_eof,
    round_trip,
    wait_until,
    zombies_of,
)

# A cold image build (a minute or two, more on a loaded machine) happens in the first test.
pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

IMAGE_UID = 10001
MAX_COMPRESSED_MB = 50
MAX_UNPACKED_MB = 150
IN_FLIGHT = bytes(range(256)) * 1024  # 256 KiB sent just before SIGTERM, echoed in full


@pytest.fixture(scope="module")
def tag(image_prerequisites: None) -> str:
    return image()


@pytest.fixture
def start(tag: str, tmp_path: Path) -> Iterator[object]:
    """start(settings) -> a running Container with settings as /etc/epolld/epolld.yaml."""
    started: list[Container] = []

    def start_container(settings: dict[str, object]) -> Container:
        config_dir = tmp_path / f"config-{len(started)}"
        config_dir.mkdir(mode=0o755)
        config_dir.chmod(0o755)  # the container's user must read it
        (config_dir / "epolld.yaml").write_text(yaml.safe_dump(settings))
        (config_dir / "epolld.yaml").chmod(0o644)
        name = f"epolld-test-{os.getpid()}-{len(started)}"
        container = Container.run(tag, config_dir, name=name)
        started.append(container)
        return container

    yield start_container
    for container in started:
        container.remove()


def _ids(pid: int, field: str) -> list[str]:
    """A line of /proc/PID/status (Uid:, NSpid:, CapEff: ...), split."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_image_is_small_and_runs_epolld_as_its_user(tag: str) -> None:
    """The image is under 50 MB compressed and 150 MB unpacked, runs `epolld --config
    /etc/epolld/epolld.yaml` as uid 10001, and holds no documentation or man pages."""
    (archive,) = CACHE_DIR.glob(f"epolld-{tag.split('-')[1]}-{HOST_ARCH}.oci.tar")
    assert archive.stat().st_size < MAX_COMPRESSED_MB * 1e6
    with tarfile.open(archive) as oci:  # an OCI layout whose layers are gzip-compressed

        def blob(digest: str) -> dict[str, Any]:
            member = oci.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert member is not None
            return dict(json.load(member))

        index_file = oci.extractfile("index.json")
        assert index_file is not None
        (manifest_ref,) = json.load(index_file)["manifests"]
        layers = blob(manifest_ref["digest"])["layers"]
        assert [layer["mediaType"] for layer in layers] == [
            "application/vnd.oci.image.layer.v1.tar+gzip"
        ]
    assert int(podman("image", "inspect", "--format", "{{.Size}}", tag)) < MAX_UNPACKED_MB * 1e6
    config = podman("image", "inspect", "--format", "{{json .Config}}", tag)
    assert '"User":"10001:10001"' in config.replace(" ", "")
    assert '"Cmd":["epolld","--config","/etc/epolld/epolld.yaml"]' in config.replace(" ", "")
    listing = podman(
        "run", "--rm", "--read-only", tag, "sh", "-c",
        "id -u; find /usr/share/man /usr/share/locale -type f 2>/dev/null | wc -l;"
        " find /usr/share/doc -type f ! -name copyright | wc -l; epolld --version",
    ).split()  # fmt: skip
    assert listing[0] == str(IMAGE_UID)
    assert listing[1:3] == ["0", "0"], listing  # no man page, translation or document
    assert listing[-2] == "epolld", listing


def test_container_echoes_reexecs_in_place_and_drains(start: object) -> None:
    """As PID 1 with a read-only root and no capabilities, epolld echoes; SIGUSR2 re-executes
    it in place (same PID 1) and keeps the open connection; it reaps the orphans a `podman
    exec` leaves; SIGTERM drains: what the open client sent is echoed in full, then a FIN,
    and the container exits 0."""
    container = start(  # type: ignore[operator]
        {"listen": ["0.0.0.0:7080"], "shutdown_timeout": "20s", "logging": {"format": "json"}}
    )
    container.wait_for_log("listening")
    pid = container.host_pid
    assert _ids(pid, "NSpid")[-1] == "1"  # PID 1 of the container
    assert _ids(pid, "Uid")[:2] == [str(IMAGE_UID)] * 2
    assert _ids(pid, "CapEff") == ["0000000000000000"]
    client = connect(container.address)
    try:
        assert round_trip(client, b"before") == b"before"

        container.kill("USR2")
        container.wait_for_log("handoff_complete")
        assert container.host_pid == pid
        assert _ids(pid, "NSpid")[-1] == "1"
        assert round_trip(client, b"after the re-exec") == b"after the re-exec"
        with connect(container.address) as fresh:
            assert round_trip(fresh, b"new") == b"new"

        container.exec("sh", "-c", "for i in 1 2 3; do sleep 0.2 & done; exit 0")
        wait_until(lambda: not children_of(pid) and not zombies_of(pid), 10.0, "no zombie")

        client.sendall(IN_FLIGHT)  # not read back before the stop
        container.kill("TERM")
        container.wait_for_log("shutdown_started")
        assert read_to_eof(client) == IN_FLIGHT  # the whole echo, then epolld's FIN
    finally:
        client.close()
    assert container.exit_code() == 0
    assert container.logs()[-1]["event"] == "shutdown_complete"


def test_supervisor_as_pid_1_drains_its_workers_and_reaps(start: object) -> None:
    """With workers: 2, the supervisor is PID 1: both workers echo, orphans are reaped, and
    SIGTERM drains every worker and exits 0 with no process left."""
    container = start(  # type: ignore[operator]
        {"listen": ["0.0.0.0:7080"], "workers": 2, "logging": {"format": "json"}}
    )
    container.wait_for_log("workers_ready")
    pid = container.host_pid
    assert len(children_of(pid)) == 2
    with connect(container.address) as client:
        assert round_trip(client, b"ping") == b"ping"
    container.exec("sh", "-c", "sleep 0.2 & exit 0")
    wait_until(lambda: len(children_of(pid)) == 2 and not zombies_of(pid), 10.0, "no zombie")
    container.kill("TERM")
    assert container.exit_code() == 0
    assert container.logs()[-1]["event"] == "shutdown_complete"
