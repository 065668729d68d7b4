"""epolld: an RFC 862 echo daemon written directly on select.epoll."""

__version__ = "0.1.0"
