"""The soak's client side: a mix of echo clients on one selectors loop, every byte verified.

Each client is a small state machine on a non-blocking socket. What it sends is a window
into one shared random block, from a random start, so that the echo can be checked at
every offset without keeping a copy of what was sent. A client that resets its own
connection is owed nothing after the reset; every other one must get back exactly what it
sent, in order, and (if it half-closed) then EOF.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RECV_SIZE = 1 << 16
SEND_SIZE = 1 << 16
# Odd-sized, so that the block's boundaries fall at a different offset in every stream.
PERIOD = (1 << 20) + 4099
CONNECT_TIMEOUT_S = 10.0
STALL_S = 30.0  # a live client without a byte of progress this long is stuck
DRAIN_S = 30.0  # after the deadline, how long clients may take to finish what they started
STREAM_RATE = 8 << 20  # bytes/s per streaming client: a soak, not a benchmark
SLOW_READ_RATE = 1 << 20  # bytes/s the slow reader reads (it writes as fast as it may)
CHURN_RATE = 40.0  # connect-and-leave connections per second
RESET_WHEN_STUCK_S = 0.5
MAX_ERRORS_KEPT = 50


class SoakError(Exception):
    """What a client saw that an exact echo server never does."""


class Pace:
    """A token bucket: at most rate units per second, bursts of at most one second's worth."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._at = now

    def allowance(self, now: float) -> int:
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return int(self._tokens)

    def spend(self, n: int) -> None:
        self._tokens -= n


class Tally:
    """Bytes verified so far, over all connections (written by one thread, read by any)."""

    def __init__(self) -> None:
        self.verified = 0


class Stream:
    """The bytes of one connection: sent from, and echoes checked against, the shared block."""

    def __init__(self, doubled: memoryview, start: int, tally: Tally) -> None:
        self._doubled = doubled  # the block twice: any window up to PERIOD long is contiguous
        self._start = start
        self._tally = tally
        self.sent = 0
        self.echoed = 0

    def next_chunk(self, n: int) -> memoryview:
        pos = (self._start + self.sent) % PERIOD
        return self._doubled[pos : pos + min(n, PERIOD)]

    def check(self, data: bytes) -> None:
        """Raises SoakError unless data is exactly the next unechoed bytes."""
        if self.echoed + len(data) > self.sent:
            raise SoakError(f"{self.echoed + len(data)} bytes echoed but only {self.sent} sent")
        pos = (self._start + self.echoed) % PERIOD
        expected = self._doubled[pos : pos + len(data)]
        if expected != data:
            first = next(i for i in range(len(data)) if expected[i] != data[i])
            raise SoakError(f"echo differs at byte {self.echoed + first} of {self.sent} sent")
        self.echoed += len(data)
        self._tally.verified += len(data)


class Client:
    """One connection; subclasses decide what to send, when to read, and when it is done."""

    kind = "client"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        self.sock = sock
        self.stream = stream
        self.rng = rng
        self.last_progress = now
        self.finishing = False
        self.registered = 0  # the selector mask it is registered with, 0 for none
        self.local_port = sock.getsockname()[1]

    def interest(self, now: float) -> int:
        raise NotImplementedError

    def on_ready(self, events: int, now: float) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError

    def finish(self) -> None:
        """The soak is ending: complete what is in flight and start nothing new."""
        self.finishing = True

    def close(self) -> None:
        self.sock.close()

    def describe(self) -> str:
        stream = self.stream
        return (
            f"{self.kind} from port {self.local_port}: {stream.sent} sent, {stream.echoed} echoed"
        )

    def send_some(self, limit: int, now: float) -> int:
        try:
            n = self.sock.send(self.stream.next_chunk(min(limit, SEND_SIZE)))
        except BlockingIOError:
            return 0
        self.stream.sent += n
        self.last_progress = now
        return n

    def recv_some(self, now: float, limit: int = RECV_SIZE) -> bytes | None:
        """The next echoed bytes (checked), b"" at EOF, None if nothing is there yet."""
        try:
            data = self.sock.recv(limit)
        except BlockingIOError:
            return None
        self.stream.check(data)
        self.last_progress = now
        return data


class PingPong(Client):
    """One message (1 B to 4 KiB) at a time, waiting for its echo; reconnects after a while."""

    kind = "pingpong"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        super().__init__(sock, stream, rng, now)
        self.rounds = rng.randint(20, 300)
        self.message_end = stream.sent + rng.randint(1, 4096)

    def interest(self, now: float) -> int:
        return WRITE if self.stream.sent < self.message_end else READ

    def on_ready(self, events: int, now: float) -> None:
        if events & WRITE and self.stream.sent < self.message_end:
            self.send_some(self.message_end - self.stream.sent, now)
        elif events & READ:
            if self.recv_some(now) == b"":
                raise SoakError(f"EOF while waiting for an echo: {self.describe()}")
            if self.stream.echoed == self.message_end:
                self.rounds -= 1
                if self.rounds > 0 and not self.finishing:
                    self.message_end += self.rng.randint(1, 4096)

    def done(self) -> bool:
        return self.stream.echoed == self.message_end


class Streaming(Client):
    """Writes 4-32 MiB at a steady rate while reading the echo, then closes."""

    kind = "streaming"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        super().__init__(sock, stream, rng, now)
        self.total = rng.randint(4, 32) << 20
        self.pace = Pace(STREAM_RATE, now)

    def interest(self, now: float) -> int:
        writing = self.stream.sent < self.total and self.pace.allowance(now) > 0
        return READ | (WRITE if writing else 0)

    def on_ready(self, events: int, now: float) -> None:
        if events & WRITE and self.stream.sent < self.total:
            limit = min(self.total - self.stream.sent, self.pace.allowance(now))
            self.pace.spend(self.send_some(limit, now))
        if events & READ and self.recv_some(now) == b"":
            raise SoakError(f"EOF before the whole echo: {self.describe()}")

    def finish(self) -> None:
        super().finish()
        self.total = self.stream.sent

    def done(self) -> bool:
        return self.stream.echoed == self.stream.sent == self.total


class HalfClosing(Client):
    """Writes all it has without waiting, half-closes, and reads the echo up to EOF."""

    kind = "half-closing"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        super().__init__(sock, stream, rng, now)
        self.total = 0
        self.shut = False
        self.eof = False

    def _shut_if_sent(self) -> None:
        if not self.shut and self.stream.sent == self.total:
            self.sock.shutdown(socket.SHUT_WR)
            self.shut = True

    def on_eof(self) -> None:
        if self.stream.echoed != self.stream.sent:
            raise SoakError(f"EOF before the whole echo: {self.describe()}")
        self.eof = True

    def done(self) -> bool:
        return self.eof


class Pipelining(HalfClosing):
    """20-200 messages of 1 B to 2 KiB written back to back, one send each, then half-close."""

    kind = "pipelining"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        super().__init__(sock, stream, rng, now)
        self.sizes = [rng.randint(1, 2048) for _ in range(rng.randint(20, 200))]
        self.total = sum(self.sizes)
        self.boundary = self.sizes.pop()

    def interest(self, now: float) -> int:
        return READ | (0 if self.shut else WRITE)

    def on_ready(self, events: int, now: float) -> None:
        if events & WRITE and not self.shut:
            self.send_some(self.boundary - self.stream.sent, now)
            if self.stream.sent == self.boundary and self.sizes:
                self.boundary += self.sizes.pop()
            self._shut_if_sent()
        if events & READ and self.recv_some(now) == b"":
            self.on_eof()


class SlowReader(HalfClosing):
    """Writes 4-8 MiB as fast as the daemon takes it but reads at 1 MiB/s: backpressure."""

    kind = "slow-reader"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        super().__init__(sock, stream, rng, now)
        self.total = rng.randint(4, 8) << 20
        self.pace = Pace(SLOW_READ_RATE, now)

    def interest(self, now: float) -> int:
        reading = self.pace.allowance(now) > 0
        return (READ if reading else 0) | (0 if self.shut else WRITE)

    def on_ready(self, events: int, now: float) -> None:
        if events & WRITE and not self.shut:
            self.send_some(self.total - self.stream.sent, now)
            self._shut_if_sent()
        if events & READ and (allowance := self.pace.allowance(now)) > 0:
            data = self.recv_some(now, min(RECV_SIZE, allowance))
            if data == b"":
                self.on_eof()
            elif data:
                self.pace.spend(len(data))

    def finish(self) -> None:
        super().finish()
        self.total = self.stream.sent
        self._shut_if_sent()
        self.pace.rate = float(1 << 30)  # drain what is left quickly


class Resetting(Client):
    """Writes 16 KiB-2 MiB at a steady rate, reading the echo or not, then resets (SO_LINGER 0)
    with the echo still in flight."""

    kind = "resetting"

    def __init__(self, sock: socket.socket, stream: Stream, rng: random.Random, now: float):
        super().__init__(sock, stream, rng, now)
        self.target = rng.randint(16 << 10, 2 << 20)
        self.reads = rng.random() < 0.5
        self.pace = Pace(STREAM_RATE, now)

    def interest(self, now: float) -> int:
        writing = self.stream.sent < self.target and self.pace.allowance(now) > 0
        return (WRITE if writing else 0) | (READ if self.reads else 0)

    def on_ready(self, events: int, now: float) -> None:
        if events & WRITE and self.stream.sent < self.target:
            limit = min(self.target - self.stream.sent, self.pace.allowance(now))
            self.pace.spend(self.send_some(limit, now))
        if events & READ and self.recv_some(now) == b"":
            raise SoakError(f"EOF before the client reset: {self.describe()}")

    def done(self) -> bool:
        # Not reading, it may fill every buffer on the way before its target: reset then.
        stuck = time.monotonic() - self.last_progress > RESET_WHEN_STUCK_S
        return self.finishing or self.stream.sent >= self.target or stuck

    def close(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# How many of each run at once; each reconnects when it is done.
MIX: dict[type[Client], int] = {
    PingPong: 6,
    Streaming: 2,
    Pipelining: 3,
    Resetting: 2,
    SlowReader: 1,
}


class Traffic:
    """Runs the mix against host:port (127.0.0.1 unless told) until a deadline, then lets every
    client finish.

    run() is meant for a thread of its own; the counters may be read from another thread.
    """

    def __init__(
        self,
        port: int,
        seed: int,
        *,
        host: str = "127.0.0.1",
        stall_s: float = STALL_S,
        drain_s: float = DRAIN_S,
    ) -> None:
        self.host = host
        self.port = port
        self.stall_s = stall_s
        self.drain_s = drain_s
        self.rng = random.Random(seed)
        self._doubled = memoryview(os.urandom(PERIOD) * 2)
        self.clients: set[Client] = set()
        self.opened: Counter[str] = Counter()
        self.tally = Tally()
        self.error_count = 0
        self.errors: list[str] = []
        self.finished = threading.Event()
        self._abort = threading.Event()
        self._sel = selectors.DefaultSelector()

    @property
    def verified(self) -> int:
        return self.tally.verified

    @property
    def connections(self) -> int:
        return sum(self.opened.values())

    def abort(self) -> None:
        self._abort.set()

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

    def run(self, stop_at: float) -> None:
        try:
            self._run(stop_at)
        except Exception as e:  # a bug here must fail the soak, not vanish with the thread
            self.error(f"traffic loop crashed: {e!r}")
        finally:
            for client in list(self.clients):
                self._close(client)
            self._sel.close()
            self.finished.set()

    def _run(self, stop_at: float) -> None:
        churn = Pace(CHURN_RATE, time.monotonic())
        stopping = False
        next_stall_check = 0.0
        while not self._abort.is_set():
            now = time.monotonic()
            if now >= stop_at and not stopping:
                stopping = True
                for client in list(self.clients):
                    with self._guard(client):
                        client.finish()
            if stopping:
                if not self.clients:
                    return
                if now > stop_at + self.drain_s:
                    for client in self.clients:
                        self.error(
                            f"did not finish within {self.drain_s:.0f} s: {client.describe()}"
                        )
                    return
            else:
                self._spawn(now, churn)
            for client in list(self.clients):
                if client.done():
                    self._close(client)
                else:
                    with self._guard(client):
                        self._register(client, client.interest(now))
            for key, events in self._sel.select(0.01):
                client = key.data
                if client in self.clients:
                    with self._guard(client):
                        client.on_ready(events, now)
            if now >= next_stall_check:
                next_stall_check = now + 1.0
                for client in list(self.clients):
                    if now - client.last_progress > self.stall_s:
                        self.error(f"no progress for {self.stall_s:.0f} s: {client.describe()}")
                        self._close(client)

    def _spawn(self, now: float, churn: Pace) -> None:
        running = Counter(c.kind for c in self.clients)
        for cls, count in MIX.items():
            if running[cls.kind] < count:  # one new connection per kind per turn at most
                sock = self._connect(cls.kind)
                if sock is not None:
                    start = self.rng.randrange(PERIOD)
                    stream = Stream(self._doubled, start, self.tally)
                    rng = random.Random(self.rng.getrandbits(64))
                    self.clients.add(cls(sock, stream, rng, now))
        if churn.allowance(now) >= 1:
            churn.spend(1)
            self._churn()

    def _churn(self) -> None:
        """Connect and leave at once, half of the time after sending a few bytes."""
        sock = self._connect("churn")
        if sock is not None:
            try:
                if self.rng.random() < 0.5:
                    sock.send(os.urandom(self.rng.randint(1, 100)))
            except OSError as e:
                self.error(f"churn: send failed: {e!r}")
            finally:
                sock.close()

    def _connect(self, kind: str) -> socket.socket | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            self.error(f"{kind}: connect failed: {e!r}")
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.opened[kind] += 1
        return sock

    def _register(self, client: Client, mask: int) -> None:
        if mask == client.registered:
            return
        if not mask:
            self._sel.unregister(client.sock)
        elif client.registered:
            self._sel.modify(client.sock, mask, client)
        else:
            self._sel.register(client.sock, mask, client)
        client.registered = mask

    @contextlib.contextmanager
    def _guard(self, client: Client) -> Iterator[None]:
        """One step of a client: what goes wrong in it is an error and ends that client."""
        try:
            yield
        except (SoakError, OSError) as e:
            self.error(f"{client.kind}: {e}")
            self._close(client)

    def _close(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        if client.registered:
            self._sel.unregister(client.sock)
            client.registered = 0
        try:
            client.close()
        except OSError as e:
            self.error(f"{client.kind}: close failed: {e!r}")
