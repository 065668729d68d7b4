"""Where and how to connect: the address, IPv4 or IPv6, the TOS byte, a PROXY header
first, then TLS. Every socket handed on is non-blocking."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
from typing import Any

from epolld.client.errors import (
    ClientError,
    Refused,
    Reset,
    ResolveFailed,
    TimedOut,
    TlsFailed,
)
from epolld.client.proxy_header import build as build_proxy_header


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: a host and port, or a Unix stream socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """How to connect, beyond where."""

    family: int = socket.AF_UNSPEC  # -4: AF_INET, -6: AF_INET6
    tos: int | None = None  # IP TOS / IPv6 traffic class byte
    proxy_header: str | None = None  # "v1" or "v2"
    proxy_source: tuple[str, int] | None = None  # None: the socket's own address
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None  # SNI and the name the certificate must carry


def tls_context(
    ca: str | None, cert: str | None, key: str | None, insecure: bool
) -> ssl.SSLContext:
    """A client context: the system's CAs or ca, our certificate if given, or no checks.

    Raises:
        ClientError: a file cannot be read or the key does not match the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif ca:
            context.load_verify_locations(cafile=ca)
        else:
            context.load_default_certs()
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"cannot load TLS files: {exc}") from None
    return context


def resolve(target: Target, kind: int, family: int) -> list[tuple[int, Any]]:
    """(family, sockaddr) candidates for target, in getaddrinfo's order."""
    if target.unix_path:
        return [(socket.AF_UNIX, target.unix_path)]
    try:
        infos = socket.getaddrinfo(target.host, target.port, family, kind)
    except socket.gaierror as exc:
        raise ResolveFailed(f"cannot resolve host {target.host!r}: {exc.strerror}") from None
    except UnicodeError as exc:  # the idna codec rejects, e.g., a label over 63 chars
        raise ResolveFailed(f"cannot resolve host {target.host!r}: {exc}") from None
    return [(info[0], info[4]) for info in infos]


def set_tos(sock: socket.socket, family: int, tos: int) -> None:
    """Mark every packet of sock with the TOS (IPv4) or traffic class (IPv6) byte."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)


def connect(target: Target, timeout: float | None, options: Options = Options()) -> socket.socket:
    """Open a non-blocking stream to target: connected, PROXY header sent, TLS handshake done.

    Args:
        target: the TCP address or Unix socket path.
        timeout: seconds to wait for each connection attempt and the handshake; None: forever.
        options: family, TOS, PROXY header and TLS.

    Raises:
        ResolveFailed, Refused, TimedOut, TlsFailed, ClientError: with a one-line reason.
    """
    error: OSError | None = None
    for family, address in resolve(target, socket.SOCK_STREAM, options.family):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if options.tos is not None:
                set_tos(sock, family, options.tos)
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:  # like socket.create_connection: the first one that works
            sock.close()
            error = exc
            continue
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small echoes at once
        try:
            if options.proxy_header:
                sock.sendall(_proxy_header(sock, family, options))
            if options.tls is not None:
                sock = _handshake(sock, target, options)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    assert error is not None  # getaddrinfo never returns an empty list
    raise connect_error(error, target, timeout)


def _proxy_header(sock: socket.socket, family: int, options: Options) -> bytes:
    assert options.proxy_header is not None
    if family == socket.AF_UNIX:
        destination: tuple[str, int] = ("0.0.0.0", 0)
        source = options.proxy_source or ("0.0.0.0", 0)
    else:
        destination = sock.getpeername()[:2]
        source = options.proxy_source or sock.getsockname()[:2]
    return build_proxy_header(options.proxy_header, source, destination)


def _handshake(sock: socket.socket, target: Target, options: Options) -> ssl.SSLSocket:
    """Wrap sock in TLS and finish the handshake (blocking, within the socket's timeout)."""
    assert options.tls is not None
    hostname = options.server_hostname
    if hostname is None and not target.unix_path:
        hostname = target.host
    if options.tls.check_hostname and hostname is None:
        raise TlsFailed(f"no name to verify {target}'s certificate against: give --sni")
    try:
        return options.tls.wrap_socket(sock, server_hostname=hostname)
    except ssl.SSLCertVerificationError as exc:
        raise TlsFailed(f"TLS handshake with {target} failed: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise TlsFailed(f"TLS handshake with {target} failed: {exc.reason or exc}") from None
    except TimeoutError:
        raise TimedOut(f"timed out in the TLS handshake with {target}") from None
    except OSError as exc:
        raise TlsFailed(f"TLS handshake with {target} failed: {exc.strerror or exc}") from None


def open_datagram(target: Target, options: Options) -> socket.socket:
    """A non-blocking UDP socket connected to target (so ICMP errors come back as errors)."""
    error: OSError | None = None
    for family, address in resolve(target, socket.SOCK_DGRAM, options.family):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if options.tos is not None:
                set_tos(sock, family, options.tos)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setblocking(False)
        return sock
    assert error is not None
    raise connect_error(error, target, None)


def connect_error(exc: OSError, target: Target, timeout: float | None) -> ClientError:
    """Turn a failed connect() into the ClientError that names its cause."""
    if isinstance(exc, ConnectionRefusedError):
        return Refused(f"connection refused by {target} (is the server running?)")
    if isinstance(exc, FileNotFoundError) and target.unix_path:
        return Refused(f"no socket at {target.unix_path} (is the server running?)")
    if isinstance(exc, ConnectionResetError):  # accepted and reset before connect() returned
        return Reset(f"connection reset by {target} while connecting")
    if isinstance(exc, TimeoutError):
        return TimedOut(f"timed out after {timeout:g} s connecting to {target}")
    return ClientError(f"cannot connect to {target}: {exc.strerror or exc}")


def finish(sock: socket.socket) -> None:
    """End a stream cleanly, so the server sees an end, not a reset: TLS's close_notify
    (waiting at most a second for the server's), then FIN."""
    with contextlib.suppress(OSError, ValueError):
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(1.0)
            sock = sock.unwrap()
        sock.shutdown(socket.SHUT_WR)
