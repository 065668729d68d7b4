"""Fixtures for the image tests (see podman.py): epolld's image, built or loaded once.

They skip, saying why, when not run as root.
"""

from __future__ import annotations

import pytest

from tests.image.podman import ensure_tools, missing_privileges


@pytest.fixture(scope="session")
def image_prerequisites() -> None:
    """Skip without root: building the image and running containers need it. Otherwise
    install podman and the tools beside it."""
    reason = missing_privileges()
    if reason:
        pytest.skip(f"image test {reason}")
    ensure_tools()
