"""Who may hand a leased worker its tasks: the holder of the current lease.

Security issue 11. The raylet makes a random token for every lease it
grants (``lease_token`` to the worker over the worker's raylet connection,
``tok`` in the grant to the holder). A connection to the worker's socket
must open with ``hi {tok}``, a msgpack frame (never pickled), whole within
:data:`HELLO_TIMEOUT_S` of being accepted; otherwise it is closed and
logged, and the worker never decodes a task from it, let alone unpickles
one. Until this gate, the worker served one admitted peer at a time until it
closed, so a same-uid connection that sent half a frame held the worker,
and the real holder's connect waited in the listen backlog forever.

The gate keeps every connection that has not yet shown the token in one
selector, each with its own decoder and deadline, so a silent or slow peer
costs the holder nothing: the first connection with the right token is
served. Token and hello may arrive in either order (two sockets): a hello
whose token is not the current one waits, until its deadline, for the
raylet's next word.

Actors do not use this: once a worker hosts an actor, every caller with
the actor's address may call it, and the actor's host already serves each
caller on its own decoder (actor_host.py); see docs/security.md.
"""

from __future__ import annotations

import hmac
import os
import selectors
import socket
import ssl
import threading
import time
from typing import Any

from libclient import peer_guard, security
from libclient.peer_policy import LogOncePerPeer
from libclient.protocol import FrameDecoder, ProtocolError

# A hello comes right behind the connect: as long as a TLS handshake may take.
HELLO_TIMEOUT_S = security.HANDSHAKE_TIMEOUT_S
TOKEN_BYTES = 16
_HELLO_MAX = 1024  # a hello frame is ~30 bytes; nothing bigger is read first
_PENDING_MAX = 64  # connections waiting to show a token; the oldest goes first

OK, WAIT = "ok", "wait"


def new_token() -> bytes:
    """A fresh lease token (the raylet's)."""
    return os.urandom(TOKEN_BYTES)


def judge_hello(msg: dict[str, Any], current: bytes | None) -> str:
    """:data:`OK`, :data:`WAIT` (a well-formed token that is not the current
    one: the raylet's word may still be on its way), or why to refuse."""
    if msg.get("t") != "hi":
        return f"first frame is {str(msg.get('t'))[:32]!r}, not a hello"
    tok = msg.get("tok")
    if type(tok) is not bytes or len(tok) != TOKEN_BYTES:
        return "hello carries no lease token"
    if current is not None and hmac.compare_digest(tok, current):
        return OK
    return WAIT


class LeaseToken:
    """The current lease's token, set by the I/O thread, read by the gate."""

    def __init__(self) -> None:
        self._token: bytes | None = None
        self._lock = threading.Lock()
        self.wake_r, self._wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self._wake_w, False)

    def set(self, token: Any) -> None:
        """The raylet's ``lease_token``: a new lease's token, or None (it ended)."""
        with self._lock:
            self._token = token if type(token) is bytes and len(token) == TOKEN_BYTES else None
        try:
            os.write(self._wake_w, b"t")
        except BlockingIOError:
            pass  # the gate has wake-ups unread already

    def current(self) -> bytes | None:
        with self._lock:
            return self._token

    def drain_wakes(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass


class _Pending:
    __slots__ = ("sock", "decoder", "deadline", "peer", "hello", "shaking")

    def __init__(self, sock: socket.socket, peer: Any, deadline: float) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(_HELLO_MAX)
        self.deadline = deadline
        self.peer = peer  # pid (local) or host (TCP), for the log
        self.hello: dict[str, Any] | None = None  # read, its token not (yet) current
        self.shaking = isinstance(sock, ssl.SSLSocket)  # TLS handshake still to finish


class HolderGate:
    """Accepts connections on a worker's sockets; hands out only the lease holder's."""

    def __init__(self, token: LeaseToken, log: Any, timeout: float = HELLO_TIMEOUT_S) -> None:
        self.token = token
        self.log = log
        self.timeout = timeout
        self.local = peer_guard.LocalGate(log, "worker")  # SO_PEERCRED on local peers
        self.limiter = LogOncePerPeer()
        self.refused = 0
        self._sel: selectors.BaseSelector | None = None  # kept: one per lease would cost

    def _selector(self, listeners: list[socket.socket]) -> selectors.BaseSelector:
        if self._sel is None:
            self._sel = selectors.DefaultSelector()
            for lsock in listeners:
                self._sel.register(lsock, selectors.EVENT_READ, None)
            self._sel.register(self.token.wake_r, selectors.EVENT_READ, "token")
        return self._sel

    def next_holder(self, listeners: list[socket.socket]) -> tuple[socket.socket, FrameDecoder]:
        """The next connection that opened with the current token (blocking, in
        the mode it was accepted in), and its decoder holding whatever the
        holder sent behind the hello (tasks, pipelined)."""
        pending: dict[socket.socket, _Pending] = {}
        sel = self._selector(listeners)
        try:
            while True:
                now = time.monotonic()
                timeout = min((p.deadline for p in pending.values()), default=now + 3600) - now
                for key, _ in sel.select(max(0.0, timeout)):
                    if key.data is None:
                        self._accept(key.fileobj, pending, sel)  # type: ignore[arg-type]
                    elif key.data == "token":
                        self.token.drain_wakes()
                        for p in [p for p in pending.values() if p.hello is not None]:
                            if self._judge(p, pending, sel):
                                return self._hand_over(p, pending, sel)
                    else:
                        p = key.data
                        if p.sock in pending and self._read(p, pending, sel):
                            return self._hand_over(p, pending, sel)
                now = time.monotonic()
                for p in [p for p in pending.values() if p.deadline <= now]:
                    why = ("its lease token is not the current one" if p.hello is not None
                           else f"no TLS handshake within {self.timeout:g} s" if p.shaking
                           else f"no hello within {self.timeout:g} s")
                    self._refuse(p, pending, sel, why)
        finally:  # the holder is served (or we are stopping): the rest are not it
            for p in list(pending.values()):
                self._refuse(p, pending, sel, "the lease holder connected meanwhile")

    def _accept(self, lsock: socket.socket, pending: dict, sel: selectors.BaseSelector) -> None:
        try:
            conn, addr = lsock.accept()
        except OSError:
            return
        cred = self.local.admit(conn)
        if cred is None:
            return
        conn.setblocking(False)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # TLS (with the cluster's keys): its handshake runs in this
            # selector too, within the hello's deadline, so a TCP peer that
            # stalls in it holds nobody else up either.
            conn = security.server_wrap(conn)
            peer: Any = addr[0] if isinstance(addr, tuple) else "?"
        else:
            peer = cred.pid
        if len(pending) >= _PENDING_MAX:
            oldest = min(pending.values(), key=lambda p: p.deadline)
            self._refuse(oldest, pending, sel, "too many connections without a hello")
        p = _Pending(conn, peer, time.monotonic() + self.timeout)
        pending[conn] = p
        sel.register(conn, selectors.EVENT_READ, p)

    def _read(self, p: _Pending, pending: dict, sel: selectors.BaseSelector) -> bool:
        """Take what ``p`` sent; True once it showed the current token."""
        if p.shaking and not self._handshake(p, pending, sel):
            return False
        while True:
            try:
                data = p.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return False
            except OSError:
                data = b""
            if not data:
                self._drop(p, pending, sel)  # gone before (or after) its hello: no log
                return False
            p.decoder.feed(data)
            if p.hello is None:
                try:
                    msg = p.decoder.next()
                except ProtocolError as exc:
                    self._refuse(p, pending, sel, f"bad first frame: {exc}")
                    return False
                if msg is None:
                    continue  # read on: a TLS socket may hold more than select saw
                p.hello = msg
                if self._judge(p, pending, sel):
                    return True
                if p.sock in pending:  # waits for the raylet's word: read no more meanwhile
                    sel.unregister(p.sock)
                return False

    def _handshake(self, p: _Pending, pending: dict, sel: selectors.BaseSelector) -> bool:
        """Advance ``p``'s TLS handshake; True once it is done."""
        try:
            events = security.handshake_step(p.sock)
        except (OSError, ValueError) as exc:
            if self.limiter.should_log(p.peer, "tls"):
                self.log.warning("auth_failed", peer=p.peer,
                                 error=f"TLS handshake from {p.peer} failed: {exc}",
                                 attempts=self.limiter.count(p.peer, "tls"))
            self._drop(p, pending, sel)
            return False
        sel.modify(p.sock, events or selectors.EVENT_READ, p)
        p.shaking = bool(events)
        return not events

    def _judge(self, p: _Pending, pending: dict, sel: selectors.BaseSelector) -> bool:
        verdict = judge_hello(p.hello or {}, self.token.current())
        if verdict == OK:
            return True
        if verdict != WAIT:
            self._refuse(p, pending, sel, verdict)
        return False

    def _hand_over(self, p: _Pending, pending: dict, sel: selectors.BaseSelector
                   ) -> tuple[socket.socket, FrameDecoder]:
        self._drop(p, pending, sel, close=False)
        p.sock.setblocking(True)
        p.decoder.max_frame = peer_guard.limits().max_frame  # tasks follow the hello
        return p.sock, p.decoder

    def _refuse(self, p: _Pending, pending: dict, sel: selectors.BaseSelector, why: str) -> None:
        self.refused += 1
        if self.limiter.should_log(p.peer, "hello"):
            key = "peer_pid" if isinstance(p.peer, int) else "peer"
            self.log.warning("holder_refused", server="worker", reason=why, **{key: p.peer},
                             attempts=self.limiter.count(p.peer, "hello"))
        self._drop(p, pending, sel)

    @staticmethod
    def _drop(p: _Pending, pending: dict, sel: selectors.BaseSelector, close: bool = True
              ) -> None:
        pending.pop(p.sock, None)
        try:
            sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        if close:
            p.sock.close()
