"""What a listener serves besides echo (a listen entry's `service:`).

- pattern.py: RFC 864's rotating lines, without sockets (chargen's bytes);
- info.py: what the server saw of a client, as one JSON line (TCP) or a compact form
  of at most 512 bytes (UDP);
- stream.py: the TCP connection kinds (discard, chargen, info) and their handoff;
- udp.py: the UDP endpoint kinds (discard, info); UDP chargen is refused by config.py;
- tls.py: the same services over TLS (imported only with a TLS listener).

Echo connections never come here: admission picks a service's class once, at accept,
so echo keeps its own path and cost.
"""
