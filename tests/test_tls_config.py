"""The TLS options: `tls: true` or a listener's own files, the tls: section, and the
certificate checks that name the file at fault (issue 21)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epolld.config import Config, SniEntry, load_config, parse_config, render_config, tls_of
from epolld.errors import ConfigError
from tests import tls_support as tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Certs:
    return tls.make_certs(tmp_path_factory.mktemp("certs"))


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "epolld.yaml"
    path.write_text(text)
    return load_config(str(path))


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    return str(caught.value)


def test_listeners_section_and_overrides_are_read(tmp_path: Path, certs: tls.Certs) -> None:
    """tls: true takes the section's files; a listener's mapping overrides them; unquoted
    1.2 and 1.3 read as versions; --print-config's text reads back to the same Config."""
    text = f"""
listen:
  - "127.0.0.1:7080"
  - {{address: "127.0.0.1:7443", tls: true}}
  - {{address: "127.0.0.1:7444", tls: {{client_ca: {certs.ca.certificate}, min_version: 1.3}}}}
tls:
  certificate: {certs.server.certificate}
  key: {certs.server.key}
  min_version: 1.2
  handshake_timeout: 3s
  sni:
    - {{names: [Other.Example], certificate: {certs.other.certificate}, key: {certs.other.key}}}
"""
    config = _load(tmp_path, text)
    plain, default, mutual = config.listen
    assert tls_of(config, plain) is None
    first = tls_of(config, default)
    second = tls_of(config, mutual)
    assert first is not None
    assert second is not None
    assert first.certificate == second.certificate == str(certs.server.certificate)
    assert (first.client_ca, first.min_version) == (None, "1.2")
    assert (second.client_ca, second.min_version) == (str(certs.ca.certificate), "1.3")
    assert config.tls.handshake_timeout_s == 3.0
    assert config.tls.sni == (
        SniEntry(("other.example",), str(certs.other.certificate), str(certs.other.key)),
    )
    rendered = render_config(config)
    assert parse_config(rendered, config.source) == config
    assert yaml.safe_load(rendered)["listen"][2]["tls"]["min_version"] == "1.3"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'listen:\n  - {address: "udp:127.0.0.1:7", tls: true}\n',
            ":2: listen[0].tls: TLS runs over TCP streams (no DTLS)",
        ),
        (
            'listen:\n  - "127.0.0.1:1"\n  - {address: "127.0.0.1:7443", tls: true}\n',
            ":3: listen[1].tls: a TLS listener needs a certificate",
        ),
        ("tls:\n  min_version: 1.1\n", ':2: tls.min_version: expected "1.2" or "1.3"'),
        ("tls:\n  handshake_timeout: 0s\n", ":2: tls.handshake_timeout: must be more than 0s"),
        (
            'metrics:\n  listen: {address: "127.0.0.1:9707", tls: true}\n',
            ":2: metrics.listen.tls: the metrics endpoint serves plain HTTP",
        ),
    ],
)
def test_tls_mistakes_are_refused_at_their_line(tmp_path: Path, text: str, expected: str) -> None:
    """UDP with tls, a TLS listener without a certificate, a bad version or timeout, and
    TLS on the metrics endpoint are each refused at their line."""
    assert expected in _error(tmp_path, text)


def test_unusable_files_are_named(tmp_path: Path, certs: tls.Certs) -> None:
    """A missing, non-PEM or mismatched certificate or key is an error naming the file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    missing = tmp_path / "missing.pem"
    head = 'listen:\n  - {address: "127.0.0.1:7443", tls: true}\ntls:\n'
    cases = [
        (missing, certs.server.key, f"tls.certificate: {missing}: no such file"),
        (garbage, certs.server.key, f"tls.certificate: {garbage}: not a PEM certificate"),
        (certs.server.certificate, garbage, f"tls.key: {garbage}: not a PEM private key"),
        (
            certs.server.certificate,
            certs.other.key,
            f"tls.key: {certs.other.key}: does not match the certificate"
            f" {certs.server.certificate}",
        ),
    ]
    for certificate, key, expected in cases:
        message = _error(tmp_path, f"{head}  certificate: {certificate}\n  key: {key}\n")
        assert expected in message
        assert message.startswith(f"{tmp_path / 'epolld.yaml'}:")


def test_ssl_is_imported_only_with_tls(tmp_path: Path, certs: tls.Certs) -> None:
    """Loading a configuration without TLS does not import ssl; one with TLS does."""
    plain = tmp_path / "plain.yaml"
    plain.write_text('listen: ["127.0.0.1:7080"]\n')
    with_tls = tmp_path / "tls.yaml"
    with_tls.write_text(
        'listen: [{address: "127.0.0.1:7443", tls: true}]\n'
        f"tls: {{certificate: {certs.server.certificate}, key: {certs.server.key}}}\n"
    )
    probe = "import sys; from epolld.config import load_config; load_config(sys.argv[1]); "
    probe += "print('ssl' in sys.modules)"
    for path, expected in ((plain, "False"), (with_tls, "True")):
        out = subprocess.run(
            [sys.executable, "-c", probe, str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert out.stdout.strip() == expected


def test_credentials_are_found_in_the_credentials_directory(
    tmp_path: Path, certs: tls.Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """credential:NAME names $CREDENTIALS_DIRECTORY/NAME (systemd's LoadCredential=), in
    the tls: section, a listen entry's tls mapping and an SNI entry, checked like a path."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name, source in (
        ("cert", certs.server.certificate),
        ("key", certs.server.key),
        ("ca", certs.ca.certificate),
        ("other-cert", certs.other.certificate),
        ("other-key", certs.other.key),
    ):
        (credentials / name).write_bytes(source.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    text = """
listen:
  - {address: "127.0.0.1:7443", tls: true}
  - {address: "127.0.0.1:7444", tls: {client_ca: "credential:ca"}}
tls:
  certificate: credential:cert
  key: "credential:key"
  sni:
    - {names: [other.example], certificate: "credential:other-cert", key: "credential:other-key"}
"""
    config = _load(tmp_path, text)
    settings = tls_of(config, config.listen[1])
    assert settings is not None
    assert settings.certificate == str(credentials / "cert")
    assert settings.key == str(credentials / "key")
    assert settings.client_ca == str(credentials / "ca")
    assert config.tls.sni[0].certificate == str(credentials / "other-cert")
    (credentials / "key").write_bytes(certs.other.key.read_bytes())
    assert f"tls.key: {credentials / 'key'}: does not match" in _error(tmp_path, text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("credential:cert", "tls.certificate: a credential needs $CREDENTIALS_DIRECTORY"),
        ("credential:", "tls.certificate: expected credential:NAME with a credential name"),
        ("credential:../cert", "tls.certificate: expected credential:NAME with a credential"),
    ],
)
def test_credential_mistakes_are_refused_at_their_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    """credential:NAME outside a unit with LoadCredential= (no $CREDENTIALS_DIRECTORY),
    or with no name or a path for one, is an error at its line."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    if "needs" not in expected:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    message = _error(tmp_path, f'tls:\n  certificate: "{value}"\n  key: /k\n')
    assert f"epolld.yaml:2: {expected}" in message
