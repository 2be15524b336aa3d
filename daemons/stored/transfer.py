"""The stored-to-stored transfer protocol over TCP: messages and a zero-copy reader. Pure.

Theory of operation
-------------------
Objects move between hosts only through the stores' TCP transfer ports. The
*puller* (the stored that wants a copy) opens one connection to each source
stored it uses and sends requests; the source answers them strictly in order.
Control messages are msgpack maps in :mod:`libclient.protocol` framing (a
4-byte little-endian length, then the body), at most :data:`MAX_FRAME` bytes;
a ``data`` reply is followed by exactly ``len`` raw payload bytes::

    puller -> source                    source -> puller
    {t: stat, r, oid}                   {t: stat, r, size}         sealed there
    {t: read, r, oid, off, len}         {t: data, r, len} + len raw bytes
    {t: free, r, oid}                   {t: freed, r}              (owner let go)
    either                              {t: error, r, error, msg}  not_found | bad_request
    unframeable bytes                   {t: error, r: nil, error: protocol, msg}, then close

The puller learns the size with ``stat``, reserves the object in its own
arena, then asks for the bytes in chunks of :data:`CHUNK` with a few ``read``
requests in flight, so the source always has the next chunk queued behind
the one on the wire. The source sends each chunk straight out of its arena
(a memoryview slice, the object pinned until the last byte left); the puller
receives it straight into the reserved range (``recv_into`` a memoryview).
Neither side ever holds a payload on the Python heap.

:class:`ReplyReader` is the puller's side of that stream. Like
:class:`libclient.protocol.FrameDecoder` it never touches a socket; unlike
it, it tells the shell *where* the next bytes must go (:meth:`buffer`), so
the shell can ``recv_into`` exactly the 4-byte length, exactly the body, and
then exactly the payload into its destination. Reading exactly never
over-reads a payload into a heap buffer.

Nothing is ever unpickled: bodies are msgpack maps and every field is
type-checked (:func:`libclient.protocol.field`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

from libclient.protocol import HEADER, ProtocolError, decode_body, field

# Requests and replies are maps of a few fields (~40-90 bytes); 4 KiB leaves
# room and means a hostile length prefix reserves nothing worth having.
MAX_FRAME = 4096
# Chunk size of a pull. Ray pushes 5 MiB chunks; 4 MiB is as big a send as
# the default loopback socket buffers (tcp_wmem max 4 MiB) accept in one go,
# and big enough that per-chunk work (a frame, a pin, a dispatch) is noise.
CHUNK = 4 * 1024 * 1024
# Reads in flight per pull: the source has the next ones queued while one is
# on the wire, so it never waits for a request round trip.
WINDOW = 4
# Largest ``len`` a read may ask for (a chunk, with room for other pullers'
# choices); bounds what one request can make the source queue.
MAX_READ = 64 * 1024 * 1024
MAX_OID_LEN = 64  # as the Unix protocol (messages.MAX_OID_LEN)
_SCRATCH = 256 * 1024  # where bytes of a cancelled read are dropped

PAYLOAD_DONE = "payload_done"


@dataclass(frozen=True, slots=True)
class StatRequest:
    """Puller asks: is ``oid`` sealed here, and how big is it?"""

    r: int
    oid: bytes


@dataclass(frozen=True, slots=True)
class FreeRequest:
    """The owner let go of ``oid``: delete this store's copy if nobody reads it."""

    r: int
    oid: bytes


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Puller asks for bytes ``[off, off + length)`` of ``oid``."""

    r: int
    oid: bytes
    off: int
    length: int


def parse_request(msg: dict[str, Any]) -> StatRequest | ReadRequest | FreeRequest:
    """A source's view of one decoded request frame.

    Raises:
        ProtocolError: unknown ``t`` or a missing or malformed field (the
            source answers ``bad_request`` and keeps the connection).
    """
    t = msg.get("t")
    r = field(msg, "r", int)
    oid = field(msg, "oid", bytes)
    if not 0 < len(oid) <= MAX_OID_LEN:
        raise ProtocolError(f"oid must be 1..{MAX_OID_LEN} bytes")
    if t == "stat":
        return StatRequest(r, oid)
    if t == "free":
        return FreeRequest(r, oid)
    if t == "read":
        off = field(msg, "off", int)
        length = field(msg, "len", int)
        if off < 0 or not 0 < length <= MAX_READ:
            raise ProtocolError(f"read needs off >= 0 and 0 < len <= {MAX_READ}")
        return ReadRequest(r, oid, off, length)
    raise ProtocolError(f"unknown message type {t!r}")


def stat_msg(r: int, oid: bytes) -> dict[str, Any]:
    return {"t": "stat", "r": r, "oid": oid}


def read_msg(r: int, oid: bytes, off: int, length: int) -> dict[str, Any]:
    return {"t": "read", "r": r, "oid": oid, "off": off, "len": length}


def error_msg(r: int | None, code: str, msg: str) -> dict[str, Any]:
    return {"t": "error", "r": r, "error": code, "msg": msg}


_HEAD, _BODY, _NEED_TARGET, _PAYLOAD, _BROKEN = range(5)


class ReplyReader:
    """Splits a source's reply stream into control messages and payloads. Pure.

    The shell loops::

        n = sock.recv_into(reader.buffer())
        event = reader.advance(n)

    ``advance`` returns a decoded control message, :data:`PAYLOAD_DONE` when
    the last byte of a payload landed, or None. After a ``data`` message the
    shell must say where its payload goes, :meth:`accept_payload` (a view of
    exactly ``len`` bytes) or :meth:`discard_payload`, before the next
    :meth:`buffer`. A ProtocolError leaves the reader broken: the stream has
    lost its framing and the connection must close. Not thread-safe.
    """

    __slots__ = ("_state", "_head", "_body", "_scratch", "_pos", "_need", "_target",
                 "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._head = memoryview(bytearray(HEADER.size))
        self._body = memoryview(bytearray(max_frame))
        self._scratch: memoryview | None = None
        self._state = _HEAD
        self._pos = 0
        self._need = HEADER.size
        self._target: memoryview | None = None

    @property
    def in_payload(self) -> bool:
        """True while payload bytes are due (accepted or being discarded)."""
        return self._state == _PAYLOAD

    def buffer(self) -> memoryview:
        """Where the next received bytes must be written (never past this piece)."""
        st = self._state
        if st == _HEAD:
            return self._head[self._pos:]
        if st == _BODY:
            return self._body[self._pos:self._need]
        if st == _PAYLOAD:
            if self._target is not None:
                return self._target[self._pos:]
            return self._scratch[:min(self._need - self._pos, _SCRATCH)]
        if st == _NEED_TARGET:
            raise RuntimeError("a data message's payload has no destination yet")
        raise ProtocolError("stream already failed")

    def advance(self, n: int) -> dict[str, Any] | str | None:
        """Account for ``n`` bytes written into :meth:`buffer`; return what completed.

        Raises:
            ProtocolError: a length over ``max_frame``, a body that is not a
                msgpack map with a string ``t``, or a malformed ``data`` length.
        """
        self._pos += n
        if self._pos < self._need:
            return None
        st = self._state
        if st == _HEAD:
            (size,) = HEADER.unpack(self._head)
            if not 0 < size <= self.max_frame:
                self._fail(f"frame of {size} bytes outside 1..{self.max_frame}")
            self._state, self._pos, self._need = _BODY, 0, size
            return None
        if st == _BODY:
            try:
                msg = decode_body(self._body[:self._need])
            except ProtocolError as exc:
                self._fail(str(exc))
            self._state, self._pos, self._need = _HEAD, 0, HEADER.size
            if msg["t"] == "data":
                length = msg.get("len")
                if type(length) is not int or not 0 < length <= MAX_READ:
                    self._fail(f"data length {length!r} outside 1..{MAX_READ}")
                self._state, self._need = _NEED_TARGET, length
            return msg
        # _PAYLOAD complete
        self._target = None
        self._state, self._pos, self._need = _HEAD, 0, HEADER.size
        return PAYLOAD_DONE

    def accept_payload(self, target: memoryview) -> None:
        """Receive the pending payload into ``target`` (exactly its length)."""
        if self._state != _NEED_TARGET or len(target) != self._need:
            raise RuntimeError("accept_payload without a matching data message")
        self._target = target
        self._state = _PAYLOAD

    def discard_payload(self) -> None:
        """Drop the rest of the current (or pending) payload: its read was cancelled.

        The bytes still arrive and are read into a small scratch buffer, so
        the stream keeps its framing; nothing reaches the old destination.
        """
        if self._state not in (_NEED_TARGET, _PAYLOAD):
            return
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        self._target = None
        self._state = _PAYLOAD

    def _fail(self, why: str) -> NoReturn:
        self._state = _BROKEN
        self._target = None
        raise ProtocolError(why)
