"""Certificate and key files: can each be used, and when is a certificate valid.

Every check returns None or a problem that names the file, for config.py's file:line
messages: a start or a reload must fail on a file that cannot serve, before any socket
or context changes. Importing this module imports ssl (config.py imports it only when
TLS is configured).
"""

from __future__ import annotations

import re
import ssl
import time

MAX_PEM_BYTES = 1024 * 1024  # a larger "certificate" is a mistake (a log file, /dev/zero)
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----")
_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


def _read(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PEM_BYTES + 1), None
    except FileNotFoundError:
        return None, f"{path}: no such file"
    except PermissionError:
        return None, f"{path}: permission denied"
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror}"


def check_certificate(path: str) -> str | None:
    """None if path holds a PEM certificate, else the problem."""
    data, problem = _read(path)
    if data is None:
        return problem
    if not _CERTIFICATE.search(data):
        return f"{path}: not a PEM certificate (no BEGIN CERTIFICATE line)"
    try:
        validity(path)
    except (ssl.SSLError, ValueError):
        return f"{path}: not a readable PEM certificate"
    return None


def check_key(path: str) -> str | None:
    """None if path holds a PEM private key, else the problem."""
    data, problem = _read(path)
    if data is None:
        return problem
    if not _KEY.search(data):
        return f"{path}: not a PEM private key (no BEGIN PRIVATE KEY line)"
    return None


def check_pair(certificate: str, key: str) -> str | None:
    """None if the key is the certificate's, else the problem (naming the key's file)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load_pair(context, certificate, key)
    except ssl.SSLError as e:
        if "PASSWORD" in str(e).upper() or "DECRYPT" in str(e).upper():
            return f"{key}: an encrypted key (epolld cannot prompt for a passphrase)"
        return f"{key}: does not match the certificate {certificate} ({e.reason or e})"
    except OSError as e:
        return f"{key}: cannot read: {e.strerror}"
    return None


def _no_passphrase() -> bytes:
    return b""  # never prompt on a terminal: an encrypted key fails to load instead


def load_pair(context: ssl.SSLContext, certificate: str, key: str) -> None:
    """Load a certificate chain and its key into context, never prompting for a passphrase.

    Raises:
        ssl.SSLError, OSError: as SSLContext.load_cert_chain.
    """
    context.load_cert_chain(certificate, key, password=_no_passphrase)


def check_ca(path: str) -> str | None:
    """None if path holds PEM CA certificates, else the problem."""
    problem = check_certificate(path)
    if problem is not None:
        return problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as e:
        return f"{path}: cannot be loaded as CA certificates ({e})"
    return None


def validity(path: str) -> tuple[float, float]:
    """(notBefore, notAfter) of the first certificate in path, as Unix times.

    The ssl module has no public way to parse a certificate that is not a peer's;
    _test_decode_cert is what its own tests use, present in every CPython 3.
    """
    decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    return (
        float(ssl.cert_time_to_seconds(decoded["notBefore"])),
        float(ssl.cert_time_to_seconds(decoded["notAfter"])),
    )


def expiry_problem(path: str, now: float | None = None) -> str | None:
    """ "expired" or "not_yet_valid" for a certificate served outside its dates, else None."""
    not_before, not_after = validity(path)
    now = time.time() if now is None else now
    if now > not_after:
        return "expired"
    if now < not_before:
        return "not_yet_valid"
    return None


def expiries(paths: list[str]) -> dict[str, float]:
    """Certificate file -> its notAfter (Unix time), for the files that can be read."""
    found: dict[str, float] = {}
    for path in paths:
        try:
            found[path] = validity(path)[1]
        except (OSError, ValueError, ssl.SSLError):
            continue
    return found
