"""Classic daemon mode with python-daemon, for hosts without systemd.

Stub: the systemd issue implements this.
"""
