"""The arm64 image (`make image ARCH=arm64`) under qemu-user-static emulation: it starts,
echoes, and exits 0 on SIGTERM. The emulation is on for this module only.

Root only (binfmt_misc, podman's networks, the image build): skipped with the reason
otherwise. A cold build installs every package under emulation (several minutes); the archive
is cached in .cache/image/ like the host's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.image.podman import Container, connect, emulation, finish, image, round_trip

pytestmark = [pytest.mark.system, pytest.mark.timeout(2400)]

ARCH = "arm64"
EMULATED_START_S = 180.0  # python under qemu on a loaded 2-core machine


@pytest.fixture(scope="module")
def arm64_tag(image_prerequisites: None) -> Iterator[str]:
    tag = image(ARCH)  # a build turns the emulation on and off again by itself
    with emulation(ARCH):
        yield tag


def test_arm64_image_starts_echoes_and_stops_on_sigterm(arm64_tag: str, tmp_path: Path) -> None:
    """The arm64 image's epolld (its own arm64 python) echoes and exits 0 on SIGTERM."""
    architecture = Container(arm64_tag).inspect("{{.Architecture}}")
    assert architecture == ARCH
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config_dir.chmod(0o755)
    (config_dir / "epolld.yaml").write_text(
        yaml.safe_dump({"listen": ["0.0.0.0:7080"], "logging": {"format": "json"}})
    )
    (config_dir / "epolld.yaml").chmod(0o644)
    container = Container.run(
        arm64_tag, config_dir, "--arch", ARCH, name=f"epolld-test-arm64-{os.getpid()}"
    )
    try:
        container.wait_for_log("listening", timeout=EMULATED_START_S)
        machine = container.exec("uname", "-m").strip()
        assert machine == "aarch64"
        with connect(container.address) as client:
            assert round_trip(client, b"arm64 ") == b"arm64 "
            assert finish(client) == b""
        container.kill("TERM")
        assert container.exit_code(timeout=EMULATED_START_S) == 0
        assert container.logs()[-1]["event"] == "shutdown_complete"
    finally:
        container.remove()
