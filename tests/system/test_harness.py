"""The container harness itself: boot, commands, files, bind mounts, own network, power-off."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from nspawn import CGROUP_HIERARCHIES, Container, ContainerError

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


def test_files_binds_and_private_network(
    container_factory: Callable[..., Container], tmp_path: Path
) -> None:
    """Files go in, host directories are bind-mounted, and the network is the container's own."""
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

    # The same loopback port is held on the host and, separately, in the container.
    with socket.create_server(("127.0.0.1", 0)) as host_server:
        port = host_server.getsockname()[1]
        with container.network():
            guest_server = socket.create_server(("127.0.0.1", port))
        with guest_server:
            guest_server.settimeout(30)
            connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 10)"
            container.run("python3", "-c", connect + ".sendall(b'hi')")
            conn, _ = guest_server.accept()
            with conn:
                conn.settimeout(30)
                assert conn.recv(10) == b"hi"
        # apt-get's way out: a host_network command reaches the host's listener.
        container.run("python3", "-c", connect, host_network=True)
        conn, _ = host_server.accept()
        conn.close()
    # The container's only network interface is its loopback.
    dev = container.read_file("/proc/net/dev").splitlines()[2:]  # two header lines
    assert [line.split(":")[0].strip() for line in dev] == ["lo"]


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
