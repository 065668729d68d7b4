"""The Debian package of this checkout, built as `make deb` builds it, and newer-looking copies."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nspawn import REPO

BUILD_TIMEOUT_S = 600.0  # build-deb may first install debhelper, dh-python and lintian


def build_deb(out: Path) -> Path:
    """packaging/dev/build-deb into out; returns the .deb."""
    result = subprocess.run(
        [str(REPO / "packaging" / "dev" / "build-deb"), str(out)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise AssertionError(f"build-deb failed:\n{result.stderr[-6000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def repack_with_version(deb: Path, version: str, out: Path) -> Path:
    """A copy of deb whose control file says version: what an upgrade looks like to dpkg."""
    tree = out / f"tree-{version}"
    subprocess.run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], check=True, timeout=60)
    control = tree / "DEBIAN" / "control"
    lines = control.read_text().splitlines()
    control.write_text(
        "".join(f"Version: {version}\n" if ln.startswith("Version:") else ln + "\n" for ln in lines)
    )
    newer = out / f"epolld_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(newer)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return newer
