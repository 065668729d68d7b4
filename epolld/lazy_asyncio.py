"""Import structlog without loading asyncio.

structlog imports asyncio at the top of its modules, only for its async
logging methods (``ainfo()`` and friends), which epolld never calls. asyncio
pulls in ssl and OpenSSL: 10 MiB of resident memory, measured, doubling a bare
interpreter's 10 MiB, and most of the budget for 10,000 connections.

While structlog is imported, a stand-in module answers its ``import asyncio``;
the stand-in loads the real asyncio on first attribute use, so structlog's
async methods would still work. importlib.util.LazyLoader cannot do this: the
import statement itself reads ``__spec__`` from the module, which loads it.
"""

from __future__ import annotations

import importlib
import sys
import types


def _real_asyncio_attribute(name: str) -> object:
    return getattr(importlib.import_module("asyncio"), name)


def import_structlog() -> None:
    """Import structlog (once, first thing) with asyncio standing in."""
    if "structlog" in sys.modules or "asyncio" in sys.modules:
        return
    stand_in = types.ModuleType("asyncio", "loads the real asyncio on first attribute use")
    stand_in.__getattr__ = _real_asyncio_attribute  # type: ignore[method-assign]  # PEP 562
    sys.modules["asyncio"] = stand_in
    try:
        import structlog  # noqa: F401  # the import whose asyncio is the stand-in
    finally:
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]
