"""Who may use a local socket, how many may connect, and when to cut one off.

Pure decisions, no I/O (the shell is :mod:`libclient.peer_guard`):

* :class:`LocalPeerPolicy` says whether a peer's credentials (``SO_PEERCRED``:
  pid, uid, gid, read by the kernel at ``connect``) may use a Unix socket: the
  daemon's own uid, root (who can read any process's memory anyway), or a
  member of one configured group (``[security] allowed_group``).
* :class:`LogOncePerPeer` keeps a refused or misbehaving peer from filling the
  log: the first event of a kind is logged, then only the 10th, 100th, ...
  It remembers a bounded number of peers, so a flood of fresh addresses cannot
  grow it without limit.
* :class:`InputLimits` holds the caps every server applies: frame size,
  number of connections, unsent output, and how long a connection may sit
  without sending a first whole message or reading what it is sent.

Decided once per connection (at accept) or when a buffer grows, never per
message: the local hot paths pay nothing for this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["ConnState", "InputLimits", "LocalPeerPolicy", "LogOncePerPeer", "PeerCred", "overdue"]


@dataclass(frozen=True, slots=True)
class PeerCred:
    """What the kernel says about the process at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class LocalPeerPolicy:
    """Which local users may talk to a daemon's Unix sockets.

    ``group_gid``/``group_uids``: the configured group and the uids of its
    listed members (resolved once, when the daemon starts). A peer whose
    primary gid is the group's is a member too.
    """

    own_uid: int
    group_gid: int | None = None
    group_uids: frozenset[int] = frozenset()

    def allows(self, cred: PeerCred) -> bool:
        uid = cred.uid
        if uid == self.own_uid or uid == 0:
            return True
        if self.group_gid is None:
            return False
        return cred.gid == self.group_gid or uid in self.group_uids

    def describe(self) -> str:
        """For log lines: who is let in."""
        who = f"uid {self.own_uid} and root"
        if self.group_gid is not None:
            who += f" and group {self.group_gid}"
        return who


class LogOncePerPeer:
    """Decides which of a peer's repeated events deserve a log line.

    :meth:`should_log` answers True for the 1st, 10th, 100th, ... event of a
    (peer, kind) pair, so a peer that repeats a fault a million times makes
    seven lines, each saying how many happened so far. At most ``capacity``
    pairs are remembered; the least recently seen is forgotten first.
    """

    __slots__ = ("_counts", "capacity")

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._counts: OrderedDict[tuple[Hashable, str], int] = OrderedDict()

    def should_log(self, peer: Hashable, kind: str) -> bool:
        key = (peer, kind)
        n = self._counts.pop(key, 0) + 1
        self._counts[key] = n
        if len(self._counts) > self.capacity:
            self._counts.popitem(last=False)
        return _is_power_of_ten(n)

    def count(self, peer: Hashable, kind: str) -> int:
        """How many events of ``kind`` this peer had (while remembered)."""
        return self._counts.get((peer, kind), 0)

    def __len__(self) -> int:
        return len(self._counts)


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The caps one server applies to its peers.

    ``max_connections``: per listening socket; one more is accepted and
    closed at once (so the backlog drains). ``max_out_bytes``: unsent output
    a peer may leave queued before it is cut off. ``first_message_s``: a
    connection (or TLS handshake) that has sent no whole message by then is
    closed, so idle half-open connections cannot hold the slots.
    ``stall_s``: a peer with queued output it has not read from for this long
    (while more than ``stall_bytes`` wait) is cut off.
    """

    max_frame: int = 64 * 1024 * 1024
    max_connections: int = 4096
    max_out_bytes: int = 256 * 1024 * 1024
    first_message_s: float = 30.0
    stall_s: float = 60.0
    stall_bytes: int = 4 * 1024 * 1024

    def admit(self, open_connections: int) -> bool:
        """May one more connection be served, with ``open_connections`` open already?"""
        return open_connections < self.max_connections

    def out_overflow(self, out_bytes: int) -> bool:
        """Has a peer left more output unread than it may?"""
        return out_bytes > self.max_out_bytes

    def stalled(self, out_bytes: int, since_progress_s: float) -> bool:
        """Has a peer stopped reading a sizeable backlog for too long?"""
        return out_bytes > self.stall_bytes and since_progress_s > self.stall_s

    def silent_too_long(self, got_message: bool, age_s: float) -> bool:
        """Has a connection gone too long without one whole message?"""
        return not got_message and age_s > self.first_message_s


@dataclass(frozen=True, slots=True)
class ConnState:
    """What :func:`overdue` needs to know about one open connection."""

    key: object
    age_s: float  # since accept
    got_message: bool  # a whole message (so a finished handshake) arrived
    out_bytes: int  # output queued, not yet taken by the peer
    since_progress_s: float  # since the peer last took output (or since accept)
    untrusted: bool  # TCP: must prove itself within first_message_s


def overdue(limits: InputLimits, conns: list[ConnState]) -> list[tuple[object, str]]:
    """Connections to cut off now, each with the reason to log.

    A local connection may stay silent for ever (a driver that only waits);
    a TCP one must complete its handshake and send a message in time.
    """
    out = []
    for c in conns:
        if c.untrusted and limits.silent_too_long(c.got_message, c.age_s):
            out.append((c.key, f"no whole message within {limits.first_message_s:g} s"))
        elif limits.out_overflow(c.out_bytes):
            out.append((c.key, f"{c.out_bytes} bytes unread (limit {limits.max_out_bytes})"))
        elif limits.stalled(c.out_bytes, c.since_progress_s):
            out.append((c.key, f"read nothing of {c.out_bytes} queued bytes for "
                               f"{c.since_progress_s:.0f} s"))
    return out
