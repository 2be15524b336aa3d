"""Wire protocol shared by libclient and the daemons.

Theory of operation
-------------------
Every control message is a msgpack map with a string field ``"t"`` naming its
type. Replies to a request carry the request's ``"r"`` id back. On stream
sockets (AF_UNIX between a process and its node's daemons, and between a task
submitter and a leased worker) each message is framed by a 4-byte little-endian
length. Over ZeroMQ (gcsd) one ZeroMQ frame holds one msgpack map, unframed.

Control messages are never pickled: a daemon decodes them with msgpack and
checks field types with :func:`field`, so bytes from a socket are data, never
code. User payloads (functions, arguments, results) travel as opaque ``bytes``
fields that only libclient workers and drivers unpickle.

:class:`FrameDecoder` is a pure state machine in the style of h11: bytes go in
with :meth:`FrameDecoder.feed`, messages come out of :meth:`FrameDecoder.next`.
It never touches a socket, so the daemons' shells and the tests drive it
directly.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

HEADER = struct.Struct("<I")

# Largest frame a peer may send. Large user payloads go through stored, never
# inline (the inline threshold is 100 KiB), so a control frame this big is
# already a sign of a broken or hostile peer. Ray's gRPC default cap is 512 MiB;
# we are stricter because our frames are control messages only.
MAX_FRAME = 64 * 1024 * 1024

_packer = msgpack.Packer(use_bin_type=True)


class ProtocolError(Exception):
    """The remote peer sent bytes that are not a valid message."""


def pack(msg: dict[str, Any]) -> bytes:
    """Encode one message as a length-prefixed frame."""
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def pack_many(msgs: list[dict[str, Any]]) -> bytes:
    """Encode several messages into one buffer, for a single write."""
    out = bytearray()
    for msg in msgs:
        body = msgpack.packb(msg, use_bin_type=True)
        out += HEADER.pack(len(body))
        out += body
    return bytes(out)


def decode_body(body: bytes | memoryview) -> dict[str, Any]:
    """Decode one unframed message body (as carried in a ZeroMQ frame)."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable message: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError("message is not a map with a string 't' field")
    return msg


def encode_body(msg: dict[str, Any]) -> bytes:
    """Encode one message without a length prefix (for ZeroMQ)."""
    return msgpack.packb(msg, use_bin_type=True)


class FrameDecoder:
    """Splits a byte stream into messages. Pure: no I/O, not thread-safe.

    After a :class:`ProtocolError` the decoder is stuck: the stream has lost
    its framing and the only safe thing left is to close the connection.
    """

    __slots__ = ("_buf", "_broken", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._broken = False
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next(self) -> dict[str, Any] | None:
        """Return the next whole message, or None if more bytes are needed."""
        if self._broken:
            raise ProtocolError("stream already failed")
        buf = self._buf
        if len(buf) < 4:
            return None
        (size,) = HEADER.unpack_from(buf, 0)
        if size > self.max_frame:
            self._broken = True
            raise ProtocolError(f"frame of {size} bytes exceeds limit {self.max_frame}")
        end = 4 + size
        if len(buf) < end:
            return None
        body = bytes(buf[4:end])
        del buf[:end]
        try:
            return decode_body(body)
        except ProtocolError:
            self._broken = True
            raise

    def drain(self) -> list[dict[str, Any]]:
        """Return every whole message buffered so far."""
        out = []
        while True:
            msg = self.next()
            if msg is None:
                return out
            out.append(msg)


_MISSING = object()


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """Return ``msg[name]`` after checking its type; raise ProtocolError if wrong.

    Daemons read every field of a received message through this, so a
    malformed message becomes an error reply instead of a crash.
    """
    value = msg.get(name, _MISSING)
    if value is _MISSING:
        if default is not _MISSING:
            return default
        raise ProtocolError(f"message {msg.get('t')!r} lacks field {name!r}")
    if kind is int and isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be int")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} of {msg.get('t')!r} has type {type(value).__name__}")
    return value


class Connection:
    """A blocking, framed, request/reply client over a stream socket.

    Used by libclient for short control exchanges with a local daemon. Not
    thread-safe: callers hold their own lock.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._decoder = FrameDecoder()
        self._next_id = 0

    @classmethod
    def connect_unix(cls, path: str, timeout: float | None = 10.0) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return cls(sock)

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(pack(msg))

    def recv(self) -> dict[str, Any]:
        """Block until one message arrives. Raises ConnectionError on EOF."""
        while True:
            msg = self._decoder.next()
            if msg is not None:
                return msg
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("peer closed the connection")
            self._decoder.feed(data)

    def recv_with_fds(self, maxfds: int = 1) -> tuple[dict[str, Any], list[int]]:
        """Receive one message that may carry file descriptors (SCM_RIGHTS)."""
        fds: list[int] = []
        while True:
            msg = self._decoder.next()
            if msg is not None:
                return msg, fds
            data, got, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, maxfds)
            fds.extend(got)
            if not data:
                raise ConnectionError("peer closed the connection")
            self._decoder.feed(data)

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a request and wait for its reply (replies arrive in order)."""
        rid = self.new_id()
        msg["r"] = rid
        self.send(msg)
        reply = self.recv()
        if reply.get("r") != rid:
            raise ProtocolError(f"reply id {reply.get('r')} does not match request {rid}")
        return reply

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
