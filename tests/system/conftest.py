"""Fixtures for the system tests: booted systemd-nspawn containers (see nspawn.py).

- container_factory (module scope): boot(binds_ro=..., binds=...) -> Container, powered off
  at the end of the module. For tests that need a bare Debian 12 with systemd, e.g. to dpkg -i
  a package.
- epolld_container (module scope): a container with epolld installed from this checkout
  (install_checkout()) and the units from packaging/systemd; one boot serves a whole module.
- debs (session scope): the .deb built from this checkout, and a copy repacked as a newer
  version, for the tests that install the package with apt.

Both skip, saying why, when not run as root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from debs import build_deb, repack_with_version
from nspawn import REPO, Container, ensure_tools, missing_privileges, rootfs

GUEST_REPO = "/opt/epolld"
UNIT_DIR = "/lib/systemd/system"  # where the Debian package puts them
UPGRADE_VERSION = "0.1.0+upgradetest1"

# Runs the checkout on Debian 12's own python3 and libraries (python3-structlog 22.3.0, ...),
# so the container tests prove the code works on the versions the package depends on.
WRAPPER = f"""#!/bin/sh
# epolld from the test checkout bind-mounted at {GUEST_REPO}, on Debian's python3.
export PYTHONPATH={GUEST_REPO} PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -m epolld "$@"
"""


def install_checkout(container: Container) -> None:
    """Install /usr/bin/epolld (running the bind-mounted checkout) and the systemd units."""
    container.write_file("/usr/bin/epolld", WRAPPER, mode=0o755)
    # The unit's SupplementaryGroups=ssl-cert needs the group (the package depends on
    # ssl-cert, which creates it); without it systemd refuses to start the unit (216/GROUP).
    container.sh("getent group ssl-cert >/dev/null || groupadd --system ssl-cert")
    for unit in ("epolld.service", "epolld.socket"):
        container.copy_in(REPO / "packaging" / "systemd" / unit, f"{UNIT_DIR}/{unit}", 0o644)
    container.systemctl("daemon-reload")


@pytest.fixture(scope="session")
def system_prerequisites() -> None:
    """Skip without root; otherwise install the tools and build the root file system once."""
    reason = missing_privileges()
    if reason:
        pytest.skip(f"container test {reason}")
    ensure_tools()
    rootfs()


@pytest.fixture(scope="module")
def container_factory(system_prerequisites: None) -> Iterator[Callable[..., Container]]:
    """Boot containers on demand; all are powered off after the module's tests."""
    booted: list[Container] = []

    def boot(
        binds_ro: dict[str | Path, str] | None = None,
        binds: dict[str | Path, str] | None = None,
    ) -> Container:
        container = Container(binds_ro=binds_ro, binds=binds)
        booted.append(container)
        return container.start()

    yield boot
    for container in booted:
        container.stop()


@pytest.fixture(scope="module")
def epolld_container(container_factory: Callable[..., Container]) -> Container:
    """A booted container with epolld from this checkout and its units installed."""
    container = container_factory(binds_ro={REPO: GUEST_REPO})
    install_checkout(container)
    return container


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory, system_prerequisites: None) -> dict[str, Path]:
    """The package built from this checkout, and a copy repacked as a newer version."""
    out = tmp_path_factory.mktemp("debs")
    built = build_deb(out)
    return {"current": built, "newer": repack_with_version(built, UPGRADE_VERSION, out)}
