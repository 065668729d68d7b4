"""Run in a network namespace of its own (unshare --net): one batch meets a full send buffer.

Used by tests/test_udp_batch.py. Loopback only, in the new namespace: 40 datagrams of
1,000 bytes wait on an endpoint's socket; then a tbf qdisc on lo (8 kbit/s after a 1,600
byte burst) starts holding what is sent, and the endpoint's SO_SNDBUF is small, so its one
sendmmsg of 40 replies fits a dozen or so and meets EAGAIN. Prints the counts and which
replies the client got (it waits for the qdisc to let the held ones through) as JSON.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time

from epolld.config import UdpConfig, parse_address
from epolld.listening import sockets as listeners
from epolld.udp.endpoint import UdpEndpoint, UdpStats
from epolld.udp.ratelimit import UdpLimiter

COUNT = 40
SIZE = 1000  # bytes per datagram
RATE = "200kbit"  # the held replies (about 15 KB) pass in well under a second


class Clock:
    now = time.monotonic()

    def reschedule(self, item: tuple[int, int]) -> None:
        pass


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)
    settings = UdpConfig(rate=0, byte_rate_bytes=0, total_rate=0, refuse_source_ports=(0,))
    stats = UdpStats()
    listener = listeners.bind(parse_address("udp:127.0.0.1:0"), 0)
    listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # 32 KiB in effect
    endpoint = UdpEndpoint(listener, Clock(), UdpLimiter(settings, Clock.now), stats,
                           edge=False, max_datagram=settings.max_datagram_bytes)  # fmt: skip
    address = listener.sock.getsockname()
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for i in range(COUNT):
        c.sendto(i.to_bytes(4, "big") * (SIZE // 4), address)
    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", RATE,
                    "burst", "1600", "limit", "10000000"], check=True)  # fmt: skip
    mask = endpoint.on_event(select.EPOLLIN)  # ONE event: one recvmmsg, one batch of replies
    replies: list[int] = []
    c.settimeout(1.0)  # the qdisc lets one through every 40 ms
    try:
        while len(replies) < COUNT:
            data = c.recv(65536)
            replies.append(int.from_bytes(data[:4], "big"))
    except TimeoutError:
        pass
    print(json.dumps({
        "batched": endpoint.batched,
        "received": stats.received,
        "echoed": stats.echoed,
        "send_buffer": stats.dropped["send_buffer"],
        "mask_is_epollin": mask == select.EPOLLIN,
        "replies": replies,
    }))  # fmt: skip
    endpoint.close()
    c.close()


if __name__ == "__main__":
    main()
