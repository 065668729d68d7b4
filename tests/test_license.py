"""The license is declared in a form that Debian 12's setuptools 66 (which `make deb` builds
with) and current setuptools (which `pip install .` fetches) both accept without a
deprecation: the LICENSE file, found by its name, shipped as the metadata's License-File.

Current setuptools deprecates the `project.license` table and license classifiers; the SPDX
string that replaces them needs setuptools 77. debian/copyright stays the package's record.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_SETUPTOOLS = "66.1.1"  # bookworm's python3-setuptools
DEBIAN_WHEEL = "0.38.4"  # bookworm's python3-wheel (setuptools 66 needs it for bdist_wheel)
BUILD_TIMEOUT_S = 300


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_license_file_is_the_mit_text_of_debian_copyright() -> None:
    """LICENSE holds the same MIT terms as debian/copyright, and pyproject.toml declares
    no deprecated form (no license table or string, no license classifier)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "license" not in project
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    copyright_text = (ROOT / "debian" / "copyright").read_text()
    terms = copyright_text.split("License: MIT\n", 2)[-1]
    assert "Permission is hereby granted" in terms
    license_words = _words((ROOT / "LICENSE").read_text())
    assert _words(terms) == license_words[license_words.index("permission") :]


def _metadata_of_wheel(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return archive.read(name).decode()


def test_current_setuptools_builds_without_deprecation(tmp_path: Path) -> None:
    """pip's isolated build (the newest setuptools) warns of nothing deprecated and ships
    LICENSE in the wheel."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "deprecat" not in output.lower(), output[-6000:]
    (wheel,) = tmp_path.glob("epolld-*.whl")
    assert "License-File: LICENSE" in _metadata_of_wheel(wheel)
    assert any(n.endswith("/LICENSE") for n in zipfile.ZipFile(wheel).namelist())


def test_debian_setuptools_takes_the_license_file(tmp_path: Path) -> None:
    """setuptools 66 (Debian 12's) reads the same pyproject.toml with no deprecation warning
    and writes License-File: LICENSE (built on a copy: it writes egg-info beside it)."""
    target = tmp_path / "setuptools"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
         f"setuptools=={DEBIAN_SETUPTOOLS}", f"wheel=={DEBIAN_WHEEL}"],
        check=True,
        timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "epolld", tree / "epolld", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "metadata"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import sys, setuptools; from setuptools import build_meta;"
         "assert setuptools.__version__ == sys.argv[2], setuptools.__version__;"
         "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))",
         str(out), DEBIAN_SETUPTOOLS],
        cwd=tree,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecat" not in (result.stdout + result.stderr).lower(), result.stderr[-3000:]
    metadata = (out / result.stdout.split()[-1] / "METADATA").read_text()
    assert "License-File: LICENSE" in metadata
