"""Listening sockets: bind, adopt from systemd, close (sockets.py); LISTEN_FDS (activation.py)."""
