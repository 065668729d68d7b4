"""The container harness itself: boot, commands, files, bind mounts, shared network, power-off."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from nspawn import CGROUP_HIERARCHIES, Container, ContainerError, loopback_address

pytestmark = pytest.mark.system


def test_boots_a_real_systemd_with_debians_libraries(
    container_factory: Callable[..., Container],
) -> None:
    """The container runs systemd 252 as PID 1 with Debian 12's epolld dependencies baked in."""
    container = container_factory()
    assert container.read_file("/proc/1/comm").strip() == "systemd"
    assert container.run("systemctl", "--version").stdout.startswith("systemd 252 ")
    versions = container.run(
        "python3", "-c",
        "import importlib.metadata as m; "
        "print(*(m.version(p) for p in ('structlog', 'sdnotify', 'python-daemon', 'PyYAML')))",
    ).stdout.split()  # fmt: skip
    assert versions == ["22.3.0", "0.3.1", "2.3.2", "6.0"]
    with pytest.raises(ContainerError, match="exited 3"):
        container.run("sh", "-c", "exit 3")


def test_files_binds_and_network(
    container_factory: Callable[..., Container], tmp_path: Path
) -> None:
    """Files are written in, host directories are bind-mounted, and ports reach the host."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "hello").write_text("from the host\n")
    (tmp_path / "rw").mkdir()
    container = container_factory(
        binds_ro={tmp_path / "ro": "/mnt/ro"}, binds={tmp_path / "rw": "/mnt/rw"}
    )
    container.write_file("/etc/greeting", "grüß dich\n")
    assert container.read_file("/etc/greeting") == "grüß dich\n"
    assert container.read_file("/mnt/ro/hello") == "from the host\n"
    assert container.sh("echo x > /mnt/ro/hello", check=False).returncode != 0
    container.sh("echo from the guest > /mnt/rw/out")
    assert (tmp_path / "rw" / "out").read_text() == "from the guest\n"

    host = loopback_address()
    with socket.create_server((host, 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(30)
        container.run(
            "python3", "-c",
            f"import socket; socket.create_connection(('{host}', {port}), 10).sendall(b'hi')",
        )  # fmt: skip
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            assert conn.recv(10) == b"hi"


def test_power_off_removes_cgroups(system_prerequisites: None) -> None:
    """Stopping a container ends nspawn and removes the cgroups it was started in."""
    container = Container().start()
    try:
        assert all(
            Path(f"/sys/fs/cgroup/{h}/{container.name}").is_dir() for h in CGROUP_HIERARCHIES
        )
    finally:
        container.stop()
    assert not any(
        Path(f"/sys/fs/cgroup/{h}/{container.name}").exists() for h in CGROUP_HIERARCHIES
    )
    with pytest.raises(ContainerError, match="not running"):
        container.run("true")
