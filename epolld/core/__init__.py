"""The bottom layer: the epoll reactor, idle timeouts and the totals."""
