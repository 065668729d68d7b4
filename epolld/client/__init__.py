"""epolld-client: talk to any echo server by hand, or measure one end to end.

One module per responsibility: cli.py (arguments, what runs, exit codes), connect.py
(address, family, TOS, PROXY header, TLS), proxy_header.py, engine.py (the poll()
loop that sends while it reads), payload.py, check.py (--check), udp.py (--udp),
services.py (discard, chargen, info), interactive.py, report.py (text and --json),
errors.py (exit codes and their meanings).
"""
