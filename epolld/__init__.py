"""epolld: an RFC 862 echo daemon written directly on select.epoll."""

from epolld import lazy_asyncio

__version__ = "0.1.0"

# Before any other module imports structlog (see lazy_asyncio).
lazy_asyncio.import_structlog()
