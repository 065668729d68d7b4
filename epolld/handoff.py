"""Hand every descriptor and its state to the next process: restart and upgrade without
dropping a connection.

What travels, and how:

- **The state** is one memfd: a fixed header (magic, format version, lengths), then JSON,
  then a blob of raw bytes (pending output) that JSON records point into, then an
  optional JSON trailer (the steps' times, written last). Version 2 writes the records
  as rows under shared key lists (`tabulate`): at 100,000 connections, the same 14 keys
  spelt out in every record cost 4 µs each to write and 2.5 µs to read, a row a third
  of that; version 1 (a dict per record) is still read. Each kind of
  handler contributes its own record through ``handoff_state(out)`` and is rebuilt by
  the restorer its owner registers for that kind; this module knows no handler class.
  A reader that does not know the format version closes what it received and says why.
- **The descriptors** (listeners, connections, splice pipes, a pidfile's lock) are sent
  with SCM_RIGHTS into one end of an AF_UNIX SOCK_SEQPACKET pair, 253 per message
  (SCM_MAX_FD). In flight inside the pair's queue they stay open, listening sockets keep
  their backlog, and a flock(2) lock stays held. When a pair's send buffer is full,
  another pair takes the rest. Records name descriptors by their index in that stream.
- **The transport** (the memfd and both ends of each pair: a handful of descriptors) is
  named ``epolld-handoff-GEN-*``, GEN a random token per handoff that the state repeats,
  and goes either into systemd's file descriptor store (a
  restart: the next process gets it as LISTEN_FDS) or, without systemd, stays open across
  execv() of the same command line (re-exec in place, same PID). Storing every
  connection in systemd's store instead costs PID 1 time that grows faster than linearly
  (58 s for 9,900, ../NOTES.md): a few descriptors keep its share constant.
- **Leftovers.** A process killed while storing leaves part of a transport in the store,
  and systemd passes it again with the next one. FDSTOREREMOVE removes by name, so only a
  generation in every name tells one handoff's descriptors from another's: the reader
  takes the newest complete generation (its state reads, every pair it lists came) and
  drains, closes and removes the rest. The release before generations named its
  transport ``epolld-handoff-state`` and ``epolld-handoff-pairN-a/-b``: still read, as
  generation "".

The sending side is failure-atomic up to the point of no return (the store acknowledged,
or execv): until then it only *copies* descriptors into the pair, so a failure closes the
pair and the service goes on serving as before.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

log = structlog.get_logger("epolld")

FORMAT: Final = "epolld-handoff"
FORMAT_VERSION: Final = 2
READABLE_VERSIONS: Final = (1, 2)  # 1: a dict per record (before tabulate)
MAGIC: Final = b"EPOLLDHO"
# magic, format version, flags (none yet), JSON bytes, blob bytes
HEADER: Final = struct.Struct("<8sIIQQ")
NAME_PREFIX: Final = "epolld-handoff-"
STATE_NAME: Final = NAME_PREFIX + "state"
SCM_MAX_FD: Final = 253  # descriptors per SCM_RIGHTS message (Linux's SCM_MAX_FD)
BATCH: Final = struct.Struct("<II")  # index of the first descriptor, how many
PAIR_SNDBUF_BYTES: Final = 4 * 1024 * 1024  # asked for; the kernel caps it at wmem_max
MAX_PAIRS: Final = 16  # 70,000 descriptors each at the default 208 KiB send buffer


class HandoffError(Exception):
    """The state could not be written, sent or read; str() says why."""


class InFlightLimit(HandoffError):
    """ETOOMANYREFS: the kernel refused more descriptors in flight for this user."""


# epolld-handoff-[GEN-](state|pairN-a|pairN-b); no GEN: written before generations.
_NAME = re.compile(r"(?:([0-9a-f]{8})-)?(state|pair\d+-[ab])")


def new_generation() -> str:
    """A token for one handoff's names: leftovers of another can never share them."""
    return secrets.token_hex(4)


def state_name(generation: str = "") -> str:
    return f"{NAME_PREFIX}{generation}-state" if generation else STATE_NAME


def pair_names(index: int, generation: str = "") -> tuple[str, str]:
    base = f"{NAME_PREFIX}{generation}-" if generation else NAME_PREFIX
    return f"{base}pair{index}-a", f"{base}pair{index}-b"


def is_handoff_name(name: str) -> bool:
    return name.startswith(NAME_PREFIX)


def _generation_of(name: str) -> tuple[str, str] | None:
    """(generation, "state" or "pair") of a transport name; None if it is not one."""
    match = _NAME.fullmatch(name[len(NAME_PREFIX) :]) if is_handoff_name(name) else None
    if match is None:
        return None
    return match.group(1) or "", "state" if match.group(2) == "state" else "pair"


class StateWriter:
    """What a handler's ``handoff_state(out)`` writes to.

    ``fd(n)`` hands a descriptor over and returns the index its record keeps; ``data(b)``
    stores bytes and returns [offset, length] into the blob. ``systemd_keeps_inherited``
    is True when the service manager will pass socket-activated listeners again itself.
    """

    def __init__(self, *, systemd_keeps_inherited: bool) -> None:
        self.systemd_keeps_inherited = systemd_keeps_inherited
        self.fds: list[int] = []
        self.records: list[dict[str, Any]] = []
        self._blob = bytearray()
        # The records from this descriptor index on may stay behind (client connections:
        # see OVER THE LIMIT below); the ones before must all travel. len(fds) until set.
        self.optional_from: int | None = None
        self._spans: list[tuple[int, int]] = []  # per record: its descriptors' [start, end)
        self._mark = 0  # len(fds) when the last record was added

    def fd(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    def data(self, data: bytes | bytearray | memoryview) -> list[int]:
        offset = len(self._blob)
        self._blob += data
        return [offset, len(data)]

    def add(self, record: Mapping[str, Any] | None) -> None:
        """Keep a handler's record (a dict it made for this: kept as it is); the
        descriptors handed over since the previous record are its own."""
        end = len(self.fds)
        if record is not None:
            self.records.append(record if type(record) is dict else dict(record))
            self._spans.append((self._mark, end))
        self._mark = end

    def mark(self) -> int:
        """Where the next record's descriptors start (for rewind)."""
        return len(self.fds)

    def rewind(self, mark: int) -> None:
        """Forget the descriptors handed over since mark (a record that stays behind)."""
        del self.fds[mark:]
        self._mark = mark

    @property
    def required(self) -> int:
        """How many descriptors, from the first, must all travel."""
        return len(self.fds) if self.optional_from is None else self.optional_from

    def keep_first(self, count: int) -> list[dict[str, Any]]:
        """Keep only the records whose descriptors are all among the first count (those
        that went); returns the others, which stay behind. Records without descriptors
        stay in."""
        kept: list[dict[str, Any]] = []
        spans: list[tuple[int, int]] = []
        left: list[dict[str, Any]] = []
        for record, (start, end) in zip(self.records, self._spans, strict=True):
            if end <= count or start == end:
                kept.append(record)
                spans.append((start, end))
            else:
                left.append(record)
        self.records, self._spans = kept, spans
        return left

    def drop_batch(self, start: int, count: int) -> list[dict[str, Any]]:
        """Forget the records with a descriptor in [start, start + count) (a batch taken
        back out of its pair); returns them."""
        kept: list[dict[str, Any]] = []
        spans: list[tuple[int, int]] = []
        left: list[dict[str, Any]] = []
        for record, (first, end) in zip(self.records, self._spans, strict=True):
            if first < start + count and end > start:
                left.append(record)
            else:
                kept.append(record)
                spans.append((first, end))
        self.records, self._spans = kept, spans
        return left

    def counts(self) -> dict[str, int]:
        """How many records of each kind (for the log lines)."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record["kind"]] = counts.get(record["kind"], 0) + 1
        return counts

    def to_memfd(self, meta: Mapping[str, Any]) -> int:
        """Write header, JSON and blob into a new memfd; returns its descriptor (CLOEXEC).

        Raises:
            HandoffError: memfd_create or the write failed.
        """
        try:
            # Named as stored (visible in /proc/PID/fd): which generation it is.
            fd = os.memfd_create(state_name(str(meta.get("generation") or "")), os.MFD_CLOEXEC)
        except OSError as e:
            raise HandoffError(f"memfd_create: {e.strerror}") from None
        try:
            self.rewrite(fd, meta)
        except HandoffError:
            os.close(fd)
            raise
        return fd

    def rewrite(self, fd: int, meta: Mapping[str, Any]) -> None:
        """Replace the memfd's content (it is shared with systemd's stored copy).

        Raises:
            HandoffError: the write failed.
        """
        keys, rows = tabulate(self.records)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **meta,
            "descriptors": len(self.fds),
            "keys": keys,
            "records": rows,
        }
        text = json.dumps(document, separators=(",", ":")).encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(text), len(self._blob)))
            _write_all(fd, text)
            _write_all(fd, self._blob)
        except OSError as e:
            raise HandoffError(f"writing the state: {e.strerror}") from None

    def append_trailer(self, fd: int, trailer: Mapping[str, Any]) -> None:
        """Add a JSON object after the blob (the steps' times, known only once the state
        was written and stored): cheaper than writing the records again.

        Raises:
            HandoffError: the write failed.
        """
        try:
            os.lseek(fd, 0, os.SEEK_END)
            _write_all(fd, json.dumps(trailer, separators=(",", ":")).encode("utf-8"))
        except OSError as e:
            raise HandoffError(f"writing the state: {e.strerror}") from None


def tabulate(records: list[dict[str, Any]]) -> tuple[list[list[str]], list[list[Any]]]:
    """Records as rows: (the distinct key lists, one row per record: the index of its key
    list, then its values in that order). Most records share one key list (every copy
    connection's), so it is written once instead of once per record."""
    index: dict[tuple[str, ...], int] = {}
    rows: list[list[Any]] = []
    for record in records:
        names = tuple(record)
        number = index.get(names)
        if number is None:
            number = index[names] = len(index)
        rows.append([number, *record.values()])
    return [list(names) for names in index], rows


def untabulate(keys: list[list[str]], rows: list[list[Any]]) -> list[dict[str, Any]]:
    """The records tabulate() wrote, as dicts again.

    Raises:
        HandoffError: a row names a key list that is not there, or does not fit it.
    """
    # A placeholder name for the row's first item (the key list's index), dropped after.
    named = [["", *names] for names in keys]
    records: list[dict[str, Any]] = []
    try:
        for row in rows:
            names = named[row[0]]
            if len(row) != len(names):  # (cheaper than zip's strict=True)
                raise ValueError(f"{len(row) - 1} values for {len(names) - 1} keys")
            record = dict(zip(names, row))  # noqa: B905  # lengths checked above
            del record[""]
            records.append(record)
    except (IndexError, TypeError, KeyError, ValueError):
        raise HandoffError("the state's records do not match its key lists") from None
    return records


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass
class State:
    """A handoff as the next process reads it: the document, the blob, the descriptors."""

    document: dict[str, Any]
    blob: bytes
    fds: dict[int, int]  # index in the stream -> the descriptor received
    transport: list[str] = field(default_factory=list)  # names to remove from the store
    leftovers: list[str] = field(default_factory=list)  # other handoffs' names, to remove
    leftovers_closed: int = 0  # descriptors that were in flight in the leftovers
    used: set[int] = field(default_factory=set)
    problem: str | None = None  # why the state could not be read (its fds are closed)
    closed: int = 0  # descriptors closed for that reason

    @property
    def records(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.document.get("records", [])
        return records

    def take_fd(self, index: int) -> int:
        """The descriptor a record names; it is the caller's from now on.

        Raises:
            HandoffError: it did not arrive (a pair emptied by a process that died).
        """
        fd = self.fds.pop(index, None)
        if fd is None:
            raise HandoffError(f"descriptor {index} did not arrive")
        self.used.add(index)
        return fd

    def data(self, ref: list[int] | None) -> bytes:
        if not ref:
            return b""
        offset, length = ref
        return self.blob[offset : offset + length]

    def close_unused(self) -> int:
        """Close what no record took (unknown kinds, a state that could not be read)."""
        left = len(self.fds)
        for fd in self.fds.values():
            _close_gracefully(fd)
        self.fds.clear()
        return left


def _close_gracefully(fd: int) -> None:
    """Close a descriptor nobody can serve: a FIN for a connection rather than nothing."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
        return
    with contextlib.suppress(OSError):
        os.close(fd)


# -- sending -------------------------------------------------------------------------


@dataclass
class Transport:
    """The descriptors that carry a handoff: the state memfd and the pairs."""

    memfd: int
    pairs: list[tuple[socket.socket, socket.socket]]
    generation: str = ""  # in every name, and in the state ("" only in tests of the past)
    # The records that could not go (the user's descriptors in flight were at their
    # limit): their handlers are the sender's to close.
    left_behind: list[dict[str, Any]] = field(default_factory=list)

    def named(self) -> list[tuple[str, int]]:
        """(FDNAME, fd) in the order they are stored: pairs first, the state last, so that
        a store that overflowed loses the state (the next process then starts fresh and
        closes what it received) rather than one end of a pair."""
        named: list[tuple[str, int]] = []
        for index, (a, b) in enumerate(self.pairs):
            name_a, name_b = pair_names(index, self.generation)
            named += [(name_a, a.fileno()), (name_b, b.fileno())]
        named.append((state_name(self.generation), self.memfd))
        return named

    def close(self) -> None:
        """Close the transport; what is in flight inside a pair is dropped with it."""
        for a, b in self.pairs:
            a.close()
            b.close()
        with contextlib.suppress(OSError):
            os.close(self.memfd)


def _new_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with contextlib.suppress(OSError):
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAIR_SNDBUF_BYTES)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def send_descriptors(fds: list[int]) -> list[tuple[socket.socket, socket.socket]]:
    """Copy fds into socket pairs, SCM_MAX_FD per message; a full pair gets a successor.

    Raises:
        HandoffError: a send failed (ETOOMANYREFS: more in flight than RLIMIT_NOFILE
            allows a user without CAP_SYS_RESOURCE); nothing is kept in flight then.
    """
    return send_descriptors_upto(fds, len(fds))[0]


def send_descriptors_upto(
    fds: list[int], required: int
) -> tuple[list[tuple[socket.socket, socket.socket]], int, int]:
    """send_descriptors(), where only the first `required` must go: those travel in
    the first pair, and the rest from a pair of their own on (so that take_back() can
    give some of them up), until the kernel refuses more in flight (ETOOMANYREFS).
    Returns the pairs, how many descriptors went, and the index of the first pair
    that holds only optional ones (len(pairs) if none went).

    Raises:
        HandoffError: a send failed before the required ones were all sent, or for
            another reason than ETOOMANYREFS; nothing is kept in flight then.
    """
    pairs = [_new_pair()]
    sent = 0
    optional_pair = 0 if not required else MAX_PAIRS  # none yet: nothing to take back
    try:
        while sent < len(fds):
            if sent == required and sent:  # the optional ones start a pair of their own
                pairs.append(_new_pair())
                optional_pair = len(pairs) - 1
            end = min(sent + SCM_MAX_FD, required if sent < required else len(fds))
            batch = fds[sent:end]
            message = [BATCH.pack(sent, len(batch))]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch))]
            while True:
                try:
                    pairs[-1][0].sendmsg(message, rights)
                    break
                except BlockingIOError:
                    if len(pairs) >= MAX_PAIRS:
                        raise HandoffError(
                            f"more than {MAX_PAIRS} pairs would be needed for {len(fds)} "
                            "descriptors"
                        ) from None
                    pairs.append(_new_pair())
                except OSError as e:
                    if e.errno == errno.ETOOMANYREFS and sent >= required:
                        return pairs, sent, optional_pair
                    raise
            sent = end
    except OSError as e:
        _close_pairs(pairs)
        raise HandoffError(f"sending descriptors: {e.strerror or e}") from None
    except HandoffError:
        _close_pairs(pairs)
        raise
    return pairs, sent, optional_pair


def _close_pairs(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for a, b in pairs:
        a.close()
        b.close()


def take_back(pairs: list[tuple[socket.socket, socket.socket]], first: int) -> tuple[int, int]:
    """Receive the oldest batch still in flight in pairs[first:] and close its
    descriptors (our originals stay open): room in the user's in-flight count.
    Returns (index of its first descriptor, how many); (0, 0) if none is left."""
    ancillary = socket.CMSG_SPACE(SCM_MAX_FD * 4)
    for _, b in pairs[first:]:
        try:
            data, cmsgs, _flags, _ = b.recvmsg(BATCH.size, ancillary, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            continue
        got = array.array("i")
        for level, kind, payload in cmsgs:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
        for fd in got:
            os.close(fd)
        if len(data) == BATCH.size:
            start, count = BATCH.unpack(data)
            return start, count
    return 0, 0


def receive_descriptors(pair_fds: Iterable[int]) -> dict[int, int]:
    """Read every batch waiting in the pairs' receiving ends; returns index -> fd.

    The fds arrive close-on-exec (MSG_CMSG_CLOEXEC). A batch that does not parse is
    closed (and counted as missing by its records).
    """
    received: dict[int, int] = {}
    ancillary = socket.CMSG_SPACE(SCM_MAX_FD * 4)
    for fd in pair_fds:
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        try:
            while True:
                try:
                    data, cmsgs, _flags, _ = sock.recvmsg(
                        BATCH.size, ancillary, socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    break
                if not data and not cmsgs:
                    break  # the other end is gone and the queue is empty
                got = array.array("i")
                for level, kind, payload in cmsgs:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                if len(data) != BATCH.size:
                    for extra in got:
                        os.close(extra)
                    continue
                start, count = BATCH.unpack(data)
                for offset, extra in enumerate(got):
                    if offset < count and start + offset not in received:
                        received[start + offset] = extra
                    else:
                        os.close(extra)
        finally:
            sock.close()
    return received


# -- reading -------------------------------------------------------------------------


def read_state(memfd: int) -> tuple[dict[str, Any], bytes]:
    """Parse the memfd from its start.

    Raises:
        HandoffError: not a handoff state, or a format version this code cannot read.
    """
    try:
        size = os.fstat(memfd).st_size
        raw = os.pread(memfd, size, 0)
    except OSError as e:
        raise HandoffError(f"reading the state: {e.strerror}") from None
    if len(raw) < HEADER.size:
        raise HandoffError("the state is shorter than its header")
    magic, version, _flags, text_len, blob_len = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise HandoffError("the state does not start with the handoff magic")
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise HandoffError(f"state format version {version}; this epolld reads versions {readable}")
    end = HEADER.size + text_len
    if end + blob_len > len(raw):
        raise HandoffError("the state is truncated")
    try:
        document = json.loads(raw[HEADER.size : end])
        trailer = json.loads(raw[end + blob_len :] or b"{}")
    except ValueError as e:
        raise HandoffError(f"the state's JSON does not parse: {e}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise HandoffError("the state's document is not a handoff")
    if version >= 2:
        document["records"] = untabulate(document.pop("keys", []), document.get("records", []))
    if isinstance(trailer, dict):
        document.update(trailer)  # written after the records: it wins
    return document, raw[end : end + blob_len]


def take_state(passed: list[tuple[str, int]]) -> tuple[State | None, list[tuple[str, int]]]:
    """Split what LISTEN_FDS passed into a handoff (if any) and everything else.

    Returns (state or None, the descriptors that are not the handoff's). The handoff is
    the newest complete generation (LISTEN_FDNAMES lists the store newest first); every
    other handoff name is a leftover: what is in flight in its pairs is received and
    closed (a FIN for a connection, a listener's address free again), and State.leftovers
    names them for FDSTOREREMOVE. Without a complete generation the state is empty and
    State.problem says why (logged by the caller once logging is set up).
    """
    groups: dict[str, list[tuple[str, str, int]]] = {}  # generation -> (part, name, fd)
    rest: list[tuple[str, int]] = []
    for name, fd in passed:
        parsed = _generation_of(name)
        if parsed is None and not is_handoff_name(name):
            rest.append((name, fd))
            continue
        generation, part = parsed or ("?", "unknown")
        groups.setdefault(generation, []).append((part, name, fd))
    if not groups:
        return None, rest
    chosen: tuple[str, dict[str, Any], bytes] | None = None
    problems: list[str] = []
    for generation, members in groups.items():
        try:
            document, blob = _read_generation(generation, members)
        except HandoffError as e:
            problems.append(str(e))
            continue
        chosen = (generation, document, blob)
        break
    state = State({"records": []}, b"", {})
    leftover_pairs: list[int] = []
    for generation, members in groups.items():
        names = list(dict.fromkeys(name for _, name, _ in members))
        pairs = [fd for part, _, fd in members if part == "pair"]
        if chosen is not None and generation == chosen[0]:
            state.document, state.blob = chosen[1], chosen[2]
            state.fds = receive_descriptors(pairs)
            state.transport = names
        else:
            state.leftovers += names
            leftover_pairs += pairs
    stale = receive_descriptors(leftover_pairs)
    for fd in stale.values():
        _close_gracefully(fd)
    state.leftovers_closed = len(stale)
    for members in groups.values():
        for _, _, fd in members:
            os.close(fd)
    if chosen is None:
        state.problem = problems[0] if problems else "no handoff state"
        state.closed = state.leftovers_closed
    return state, rest


def _read_generation(
    generation: str, members: list[tuple[str, str, int]]
) -> tuple[dict[str, Any], bytes]:
    """The state of one generation, if it is complete: its memfd reads, it is the state
    of this generation, and every pair it lists was passed.

    Raises:
        HandoffError: why this generation cannot be taken over.
    """
    memfd = next((fd for part, _, fd in members if part == "state"), None)
    if memfd is None:
        raise HandoffError("the state memfd is missing")
    document, blob = read_state(memfd)
    if not generation:  # written before generations: no count of pairs to check
        return document, blob
    if document.get("generation") != generation:
        raise HandoffError(f"the state of {generation} names {document.get('generation')!r}")
    names = {name for _, name, _ in members}
    count = document.get("pairs")
    if not isinstance(count, int):
        raise HandoffError(f"the state of {generation} does not count its pairs")
    for index in range(count):
        if not set(pair_names(index, generation)) <= names:
            raise HandoffError(f"pair {index} of the state's transport is missing")
    return document, blob


def pending(environ: Mapping[str, str]) -> bool:
    """Whether LISTEN_FDNAMES (meant for this process) carries a handoff."""
    return environ.get("LISTEN_PID") == str(os.getpid()) and any(
        is_handoff_name(name) for name in environ.get("LISTEN_FDNAMES", "").split(":")
    )


# -- restoring -----------------------------------------------------------------------

Restorer = Callable[[dict[str, Any], State], None]


def restore(state: State, restorers: Mapping[str, Restorer]) -> dict[str, int]:
    """Give each record to its kind's restorer; returns the counts restored per kind.

    A record of an unknown kind, or one whose restorer fails, is logged; its
    descriptors are closed with the rest of what nobody took.
    """
    counts: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for record in state.records:
        kind = str(record.get("kind"))
        restorer = restorers.get(kind)
        if restorer is None:
            unknown[kind] = unknown.get(kind, 0) + 1
            continue
        try:
            restorer(record, state)
        except (HandoffError, OSError, KeyError, TypeError, ValueError) as e:
            log.warning("handoff_record_dropped", kind=kind, error=str(e))
            continue
        counts[kind] = counts.get(kind, 0) + 1
    if unknown:
        log.warning("handoff_kinds_unknown", kinds=unknown, reason="closed: no restorer")
    closed = state.close_unused()
    if closed:
        log.warning("handoff_descriptors_closed", count=closed)
    return counts


# -- re-exec in place ----------------------------------------------------------------


def reexec_command() -> tuple[str, list[str]]:
    """The interpreter and the command line this process was started with.

    Raises:
        HandoffError: the interpreter or the script is no longer there (checked before
            anything is handed over: after execv() fails there is no way back).
    """
    argv = list(sys.orig_argv)
    executable = sys.executable
    if not executable or not os.access(executable, os.X_OK):
        raise HandoffError(f"cannot re-execute: interpreter {executable!r} is not executable")
    script = next((a for a in argv[1:] if not a.startswith("-")), None)
    if "-m" not in argv[1:3] and script is not None and not os.path.exists(script):
        raise HandoffError(f"cannot re-execute: {script} is gone")
    return executable, argv


def reexec(
    named: list[tuple[str, int]],
    executable: str,
    argv: list[str],
    environ: MutableMapping[str, str] | None = None,
) -> None:
    """execv() the same command line with named as LISTEN_FDS (from fd 3, inheritable).

    Everything else is close-on-exec and vanishes with the old image. Never returns.

    Raises:
        OSError: execv failed (after the checks of reexec_command, only a race).
    """
    environ = os.environ if environ is None else environ
    first = 3
    # Via fresh high numbers first: a target may be another one's source.
    top = max([first + len(named), *(fd for _, fd in named)]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for _, fd in named]
    for offset, fd in enumerate(high):
        os.dup2(fd, first + offset, inheritable=True)
    environ["LISTEN_FDS"] = str(len(named))
    environ["LISTEN_PID"] = str(os.getpid())
    environ["LISTEN_FDNAMES"] = ":".join(name for name, _ in named)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(executable, argv, dict(environ))


# -- where a handoff goes --------------------------------------------------------------


class Destination(Protocol):
    """Where a written state and its descriptors go: systemd's store, a re-exec of this
    program, or (a worker) the supervisor. ``deliver`` is the point of no return; it
    raises HandoffError (and nothing is lost) if it cannot take the transport."""

    keeps_inherited: bool  # the next process gets socket-activated listeners from systemd

    def deliver(self, transport: Transport, out: StateWriter, steps: dict[str, float]) -> None: ...


class Notify(Protocol):
    """What FdStore needs of systemd.Notifier."""

    def store_fd(self, name: str, fd: int) -> None: ...
    def remove_fd(self, name: str) -> None: ...
    def barrier(self, timeout_s: float) -> bool: ...


class FdStore:
    """A restart under systemd: the transport goes into the service's fd store."""

    keeps_inherited = True

    def __init__(self, notifier: Notify, barrier_timeout_s: float) -> None:
        self._notifier = notifier
        self._timeout_s = barrier_timeout_s

    def deliver(self, transport: Transport, out: StateWriter, steps: dict[str, float]) -> None:
        """Each descriptor under its FDNAME (one per message), then BARRIER=1: stored.

        Raises:
            HandoffError: systemd did not acknowledge; what was stored is removed again.
        """
        mark = now_monotonic()
        names = transport.named()
        for stored, (name, fd) in enumerate(names):
            try:
                self._notifier.store_fd(name, fd)
            except OSError as e:
                for removed, _ in names[:stored]:  # none of this attempt stays stored
                    self._notifier.remove_fd(removed)
                if e.errno == errno.ETOOMANYREFS:
                    raise InFlightLimit(f"storing {name}: {e.strerror}") from None
                raise
        if not self._notifier.barrier(self._timeout_s):
            for name, _ in names:
                self._notifier.remove_fd(name)
            raise HandoffError(f"systemd did not acknowledge in {self._timeout_s} s")
        steps["store"] = round(now_monotonic() - mark, 4)
        # The memfd is shared with systemd's stored copy: what is appended now still
        # reaches the next process.
        out.append_trailer(transport.memfd, {"steps": steps})


class Reexec:
    """No systemd: execv() the same command line, the transport as LISTEN_FDS.

    Raises (at construction, before anything is handed over):
        HandoffError: the interpreter or the script is gone.
    """

    keeps_inherited = False

    def __init__(self) -> None:
        self.executable, self.argv = reexec_command()

    def deliver(self, transport: Transport, out: StateWriter, steps: dict[str, float]) -> None:
        out.append_trailer(transport.memfd, {"steps": steps})
        log.info("handoff_reexec", command=self.argv, steps=steps)
        try:
            reexec(transport.named(), self.executable, self.argv)
        except OSError as e:
            raise HandoffError(f"execv: {e.strerror}") from None


def send(
    out: StateWriter,
    meta: Mapping[str, Any],
    destination: Destination,
    steps: dict[str, float],
    cpu_at: float | None = None,
) -> Transport:
    """Copy out's descriptors into pairs, write the state, deliver both. With cpu_at
    (time.process_time() at the signal), steps get "handoff_cpu": this process's CPU
    time up to the delivery.

    Raises:
        HandoffError: any step failed; the transport is closed, and since only copies
            were sent, the sender still holds everything and can serve on.
    """
    mark = now_monotonic()
    required = out.required
    pairs, sent, optional_pair = send_descriptors_upto(out.fds, required)
    left_behind = out.keep_first(sent)
    steps["send"] = round(now_monotonic() - mark, 4)
    mark = now_monotonic()
    transport: Transport | None = None
    generation = new_generation()
    try:
        document = {**meta, "generation": generation, "pairs": len(pairs)}
        memfd = out.to_memfd(document)
        transport = Transport(memfd, pairs, generation, left_behind)
        steps["state"] = round(now_monotonic() - mark, 4)
        if cpu_at is not None:
            steps["handoff_cpu"] = round(time.process_time() - cpu_at, 4)
        while True:
            try:
                destination.deliver(transport, out, steps)
                break
            except InFlightLimit:
                # Someone's batch took the user past the limit after ours went: give up
                # our oldest optional batch until the transport itself can go.
                start, count = take_back(pairs, optional_pair)
                if not count:
                    raise
                transport.left_behind += out.drop_batch(start, count)
                out.rewrite(memfd, document)
    except (HandoffError, OSError) as e:
        if transport is not None:
            transport.close()
        else:
            for a, b in pairs:
                a.close()
                b.close()
        if isinstance(e, HandoffError):
            raise
        raise HandoffError(str(e.strerror or e)) from None
    return transport


class HandoffSource(Protocol):
    """Anything that contributes a record to the state."""

    def handoff_state(self, out: StateWriter) -> dict[str, Any] | None: ...


def wall_time(steps: Mapping[str, float]) -> float:
    """The wall clock's steps added up (not the *_cpu ones: CPU time, within them)."""
    return sum(seconds for name, seconds in steps.items() if not name.endswith("_cpu"))


def now_monotonic() -> float:
    """CLOCK_MONOTONIC is one clock for every process of a boot: durations and start
    times carry over from the old process to the new one."""
    return time.monotonic()
