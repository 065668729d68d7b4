"""The manual pages in packaging/man/ keep up with the code they document.

The roff files are written by hand and shipped by the Debian package; these tests catch an
option or a configuration key that was added without being documented. (lintian, run by
packaging/dev/build-deb, checks that the pages render without warnings.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from epolld import config
from epolld.client import cli as client

MAN_DIR = Path(__file__).resolve().parents[1] / "packaging" / "man"


def _roff(text: str) -> str:
    """How text appears in roff source: hyphens escaped as \\-."""
    return text.replace("-", "\\-")


def _long_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", help_text))


def _keys(mapping: dict[str, object], prefix: str = "") -> list[str]:
    """Dotted option names of a configuration mapping, sections included only as prefixes."""
    keys = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            keys += _keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def test_epolld_page_documents_every_option() -> None:
    """Every long option `epolld --help` lists appears in epolld(8)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "epolld", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    page = (MAN_DIR / "epolld.8").read_text()
    options = _long_options(help_text)
    assert "--daemon" in options
    assert [o for o in sorted(options) if _roff(o) not in page] == []


def test_client_page_documents_every_option() -> None:
    """Every long option of epolld-client appears in epolld-client(1)."""
    options = _long_options(client.build_parser().format_help())
    page = (MAN_DIR / "epolld-client.1").read_text()
    assert "--check" in options
    assert [o for o in sorted(options) if _roff(o) not in page] == []


def test_config_page_documents_every_key() -> None:
    """Every configuration key, with its default, appears in epolld.yaml(5)."""
    defaults = yaml.safe_load(config.render_config(config.Config()))
    page = (MAN_DIR / "epolld.yaml.5").read_text()
    keys = _keys(defaults)
    assert "limits.idle_timeout" in keys
    assert [k for k in keys if f".B {k}\n" not in page] == []
