"""The I/O side of local access control: ``SO_PEERCRED``, modes, the allowed group.

Every Unix-socket server of a node (raylet, stored, each worker and actor)
calls :meth:`LocalGate.admit` once on each accepted connection: the kernel's
record of the connecting process (``SO_PEERCRED``) is checked against
:class:`libclient.peer_policy.LocalPeerPolicy`; a refused peer is closed and
logged (once per uid, then at the 10th, 100th... attempt) with its pid and uid.
The directory modes (0700, or 0750 with the group) are the first fence; this
check is the second, and holds even if a directory's mode is loosened.

The allowed group comes from ``[security] allowed_group``; daemons put it in
the environment (``SHOAL_SECURITY_ALLOWED_GROUP``) so workers they start
apply the same rule.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import struct
from typing import Any

from libclient.peer_policy import InputLimits, LocalPeerPolicy, LogOncePerPeer, PeerCred

__all__ = ["GROUP_ENV", "LocalGate", "configure", "configure_limits", "dir_mode", "limits",
           "peer_cred", "policy", "secure_dir", "secure_socket"]

GROUP_ENV = "SHOAL_SECURITY_ALLOWED_GROUP"
MAX_FRAME_ENV = "SHOAL_SECURITY_MAX_FRAME"
MAX_CONNECTIONS_ENV = "SHOAL_SECURITY_MAX_CONNECTIONS"
STALL_S_ENV = "SHOAL_SECURITY_STALL_S"
STALL_BYTES_ENV = "SHOAL_SECURITY_STALL_BYTES"
_UCRED = struct.Struct("3i")
_policy: LocalPeerPolicy | None = None
TCP_PEER = PeerCred(0, -1, -1)  # what LocalGate.admit says of a TCP peer


def peer_cred(sock: socket.socket) -> PeerCred:
    """The pid, uid and gid of the process that connected ``sock`` (AF_UNIX)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def resolve_group(name: str) -> tuple[int, frozenset[int]]:
    """A group's gid and the uids of its listed members.

    Raises:
        ValueError: no such group (naming it).
    """
    try:
        entry = grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
    except (KeyError, OverflowError):
        raise ValueError(f"[security] allowed_group: no group {name!r} on this host") from None
    uids = set()
    for member in entry.gr_mem:
        try:
            uids.add(pwd.getpwnam(member).pw_uid)
        except KeyError:
            continue
    return entry.gr_gid, frozenset(uids)


def configure(group: str | None) -> LocalPeerPolicy:
    """Put the local access rule in force here and in children we start.

    Raises:
        ValueError: the group does not exist.
    """
    global _policy
    if group:
        gid, uids = resolve_group(group)
        _policy = LocalPeerPolicy(os.getuid(), gid, uids)
        os.environ[GROUP_ENV] = group
    else:
        _policy = LocalPeerPolicy(os.getuid())
        os.environ.pop(GROUP_ENV, None)
    return _policy


def policy() -> LocalPeerPolicy:
    """The rule in force: as configured, else from the environment we were started with."""
    global _policy
    if _policy is None:
        group = os.environ.get(GROUP_ENV) or None
        try:
            return configure(group)
        except ValueError:
            _policy = LocalPeerPolicy(os.getuid())  # an unknown group admits nobody extra
    return _policy


def configure_limits(max_frame: int | None, max_connections: int | None,
                     stall_s: float | None = None, stall_bytes: int | None = None
                     ) -> InputLimits:
    """Put ``[security] max_frame`` / ``max_connections`` / ``stall_s`` /
    ``stall_bytes`` in force here and in children (None: the default)."""
    for name, value in ((MAX_FRAME_ENV, max_frame), (MAX_CONNECTIONS_ENV, max_connections),
                        (STALL_S_ENV, stall_s), (STALL_BYTES_ENV, stall_bytes)):
        if value is not None and (value or name == STALL_BYTES_ENV):
            os.environ[name] = repr(float(value)) if name == STALL_S_ENV else str(int(value))
        else:
            os.environ.pop(name, None)
    return limits()


def limits() -> InputLimits:
    """The input limits in force (defaults unless configured or inherited)."""
    default = InputLimits()
    frame = _env_int(MAX_FRAME_ENV) or default.max_frame
    conns = _env_int(MAX_CONNECTIONS_ENV) or default.max_connections
    stall_s = _env_float(STALL_S_ENV) or default.stall_s
    stall_bytes = _env_int(STALL_BYTES_ENV, allow_zero=True)
    return InputLimits(max_frame=frame, max_connections=conns, stall_s=stall_s,
                       stall_bytes=default.stall_bytes if stall_bytes is None else stall_bytes)


def _env_int(name: str, allow_zero: bool = False) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 or (allow_zero and value == 0) else None


def _env_float(name: str) -> float | None:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def dir_mode() -> int:
    """Mode of runtime directories: 0700, or 0750 when a group may connect."""
    return 0o750 if policy().group_gid is not None else 0o700


def _group_fix(path: str, mode: int, st: os.stat_result) -> None:
    gid = policy().group_gid
    if gid is not None and st.st_gid != gid:
        os.chown(path, -1, gid)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def secure_dir(path: str) -> None:
    """Create ``path`` or tighten it: 0700 (0750 and the group's, with a group).

    Raises:
        PermissionError: ``path`` is a shared directory (sticky, like /tmp) or
            belongs to another user: we refuse to change its mode.
    """
    mode = dir_mode()
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.stat(path)
    if st.st_mode & stat.S_ISVTX or st.st_uid != os.getuid():
        if stat.S_IMODE(st.st_mode) & 0o077 & ~mode:
            raise PermissionError(13, f"{path} is shared (mode {stat.S_IMODE(st.st_mode):o}, "
                                      f"owner uid {st.st_uid}); use a directory of its own")
        return
    _group_fix(path, mode, st)


def secure_socket(path: str) -> None:
    """Give a freshly bound socket file its mode: 0600, or 0660 for the group."""
    mode = 0o660 if policy().group_gid is not None else 0o600
    _group_fix(path, mode, os.stat(path))


class LocalGate:
    """Admits or refuses each accepted Unix-socket connection; one per server."""

    __slots__ = ("limiter", "log", "refused", "server")

    def __init__(self, log: Any, server: str) -> None:
        self.log = log
        self.server = server
        self.limiter = LogOncePerPeer()
        self.refused = 0

    def admit(self, sock: socket.socket) -> PeerCred | None:
        """The peer's credentials if it may use ``sock``; else close it, maybe log,
        and return None.

        TCP sockets are not judged here (TLS decides who they are): they get
        :data:`TCP_PEER`.
        """
        if sock.family != socket.AF_UNIX:
            return TCP_PEER
        rule = policy()
        try:
            cred = peer_cred(sock)
        except OSError as exc:  # the peer is already gone
            sock.close()
            self.refused += 1
            if self.limiter.should_log("?", "peercred_failed"):
                self.log.warning("peer_refused", server=self.server, error=str(exc))
            return None
        if rule.allows(cred):
            return cred
        sock.close()
        self.refused += 1
        if self.limiter.should_log(cred.uid, "uid"):
            self.log.warning("peer_refused", server=self.server, peer_pid=cred.pid,
                             peer_uid=cred.uid, peer_gid=cred.gid,
                             attempts=self.limiter.count(cred.uid, "uid"),
                             allowed=rule.describe())
        return None
