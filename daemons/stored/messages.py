"""stored's request messages: wire maps in, typed, validated nouns out.

Every field a client sends goes through :func:`libclient.protocol.field` and
a range check here, so the store core only ever sees well-formed requests
and a malformed one becomes a :class:`ProtocolError` (an error reply) instead
of an exception deep inside the store.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from libclient.protocol import ProtocolError, field

# Ray's ObjectID is 28 bytes; 64 leaves room for other id schemes while keeping
# a hostile client from making the table hold megabyte-long keys.
MAX_OID_LEN = 64
# One get/delete/contains names at most this many objects. A frame is capped at
# MAX_FRAME anyway; this keeps one request's work (and its reply) bounded.
MAX_OIDS = 100_000
MAX_NAME_LEN = 256
# A pull names the few nodes that hold a copy; 64 is more than any placement
# keeps, and bounds the work of one request.
MAX_SOURCES = 64
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]{1,253}):([0-9]{1,5})")


@dataclass(frozen=True, slots=True)
class Hello:
    r: int
    pid: int
    name: str


@dataclass(frozen=True, slots=True)
class Create:
    r: int
    oid: bytes
    size: int
    wait: bool = False  # may the reply wait for spilling to make room (clients: yes)


@dataclass(frozen=True, slots=True)
class Seal:
    r: int
    oid: bytes
    hold: bool = False  # the creator keeps a hold (may spill, never lost) besides its pin
    handoff: bool = False  # ... until another client holds it (a worker's task return)


@dataclass(frozen=True, slots=True)
class Abort:
    r: int
    oid: bytes


@dataclass(frozen=True, slots=True)
class Get:
    r: int
    oids: tuple[bytes, ...]
    timeout_ms: int  # -1 waits forever, 0 does not wait (but waits for restores)
    hold: bool = False  # also take a hold on each object returned


@dataclass(frozen=True, slots=True)
class Release:
    oids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Unhold:
    """One-way: drop one hold per object (the owner no longer needs it kept)."""

    oids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Free:
    """One-way delete: the owner dropped its last reference to these objects."""

    oids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    r: int
    oids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Contains:
    r: int
    oids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Stats:
    r: int


@dataclass(frozen=True, slots=True)
class Pull:
    """Fetch ``oid`` from another node's stored; handled by the transfer shell, not the table."""

    r: int
    oid: bytes
    sources: tuple[str, ...]  # transfer addresses, "host:port", best first
    timeout_ms: int  # -1 waits as long as sources make progress


Request = (Hello | Create | Seal | Abort | Get | Release | Unhold | Free | Delete | Contains
           | Stats)


def request_id(msg: Any) -> int | None:
    """The ``r`` of a message if it has a usable one, for error replies."""
    if isinstance(msg, dict):
        r = msg.get("r")
        if isinstance(r, int) and not isinstance(r, bool):
            return r
    return None


def _oid(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_OID_LEN:
        raise ProtocolError(f"{what} must be 1..{MAX_OID_LEN} bytes")
    return value


def _oids(msg: dict[str, Any]) -> tuple[bytes, ...]:
    raw = field(msg, "oids", list)
    if len(raw) > MAX_OIDS:
        raise ProtocolError(f"at most {MAX_OIDS} oids per request")
    return tuple(_oid(v, "each of oids") for v in raw)


def _flag(msg: dict[str, Any], name: str) -> bool:
    return bool(field(msg, name, bool, False))


def _r(msg: dict[str, Any]) -> int:
    return field(msg, "r", int)


def host_port(value: Any) -> tuple[str, int]:
    """Split a transfer address ``host:port`` (``[v6]:port`` too).

    Raises:
        ProtocolError: not a string of that form, or a port outside 1..65535.
    """
    m = _HOST_PORT.fullmatch(value) if isinstance(value, str) else None
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ProtocolError(f"source {value!r} is not host:port")
    return m.group(1).strip("[]"), int(m.group(2))


def _pull(msg: dict[str, Any]) -> Pull:
    sources = field(msg, "sources", list)
    if len(sources) > MAX_SOURCES:
        raise ProtocolError(f"at most {MAX_SOURCES} sources per pull")
    for source in sources:
        host_port(source)
    timeout = field(msg, "timeout", (int, float, type(None)), None)
    if timeout is None:
        timeout_ms = -1
    elif isinstance(timeout, bool) or not math.isfinite(timeout) or timeout < 0:
        raise ProtocolError("timeout must be a number of seconds >= 0, or nil")
    else:
        timeout_ms = math.ceil(timeout * 1000)
    return Pull(_r(msg), _oid(field(msg, "oid", bytes), "oid"), tuple(sources), timeout_ms)


def parse(msg: dict[str, Any]) -> Request | Pull:
    """Turn a decoded wire map into a request.

    Raises:
        ProtocolError: unknown ``t``, a missing field, or a field of the wrong
            type or range.
    """
    t = msg.get("t")
    if t == "get":
        timeout_ms = field(msg, "timeout_ms", int)
        if timeout_ms < -1:
            raise ProtocolError("timeout_ms must be -1, 0 or positive")
        return Get(_r(msg), _oids(msg), timeout_ms, _flag(msg, "hold"))
    if t == "release":
        return Release(_oids(msg))
    if t == "unhold":
        return Unhold(_oids(msg))
    if t == "free":
        return Free(_oids(msg))
    if t == "create":
        size = field(msg, "size", int)
        if size < 0:
            raise ProtocolError("size must be >= 0")
        return Create(_r(msg), _oid(field(msg, "oid", bytes), "oid"), size, True)
    if t == "seal":
        handoff = _flag(msg, "handoff")
        return Seal(_r(msg), _oid(field(msg, "oid", bytes), "oid"),
                    _flag(msg, "hold") or handoff, handoff)
    if t == "abort":
        return Abort(_r(msg), _oid(field(msg, "oid", bytes), "oid"))
    if t == "delete":
        return Delete(_r(msg), _oids(msg))
    if t == "contains":
        return Contains(_r(msg), _oids(msg))
    if t == "stats":
        return Stats(_r(msg))
    if t == "pull":
        return _pull(msg)
    if t == "hello":
        name = field(msg, "name", str, "")
        return Hello(_r(msg), field(msg, "pid", int), name[:MAX_NAME_LEN])
    raise ProtocolError(f"unknown message type {t!r}")
