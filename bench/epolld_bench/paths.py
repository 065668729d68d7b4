"""Where the bench finds its programs and writes its results."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent  # bench/
ROOT = BENCH.parent
OUT = BENCH / "out"
BIN = OUT / "bin"  # the compiled C and Go programs
GO_BUILD = OUT / "go"  # GOCACHE and GOPATH of the Go builds (nothing is downloaded)
RUST_BUILD = OUT / "rust"  # cargo's home (Debian's crates as its only source) and target
TLS_DIR = OUT / "tls"  # the servers' certificate and key (bootstrap makes them)
TLS_CERT = TLS_DIR / "cert.pem"
TLS_KEY = TLS_DIR / "key.pem"
VENV = BENCH / ".venv"  # uvloop and py-spy (bench/requirements.txt)
VENV_PY = VENV / "bin" / "python"
EPOLLD = ROOT / ".venv" / "bin" / "epolld"  # the worktree's epolld (make test-fast creates it)
DOCS = ROOT / "docs"
REASONS = BENCH / "reasons.json"  # why a target is missed, by target id
ANALYSIS = BENCH / "analysis.md"  # notes included in the report


def relative(arg: str) -> str:
    """An argument with the repository's path stripped, for the report (also inside an
    argument: socat's address options name the certificate)."""
    if arg.startswith(str(ROOT)):
        return str(Path(arg).relative_to(ROOT))
    return arg.replace(f"{ROOT}/", "")
