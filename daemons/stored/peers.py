"""stored's transfer shell: the TCP half of the I/O loop, serving and pulling objects.

Theory of operation
-------------------
Two kinds of TCP connection share :class:`~daemons.stored.server.StoreServer`'s
selector loop (non-blocking sockets, no threads):

* *served* connections: another stored pulls from us. Each is a client of
  the object table (a negative client id), so the pins it takes while its
  chunks are on the wire are dropped with it if it vanishes. Requests are
  decoded with a :class:`FrameDecoder` of 4 KiB frames; each ``data`` reply
  is a frame plus a memoryview slice of the arena, written together with
  ``sendmsg`` (no copy on our side), and the pin is released when the slice's
  last byte has left.
* *links*: our connections to sources, one per source address, shared by
  every pull from that source. Requests go out as frames; replies are read
  exactly (:class:`ReplyReader`), payloads by ``recv_into`` straight into the
  object's reserved range of our arena.

Every decision about pulls is made by :class:`PullManager`; this module runs
its actions and feeds back what the sockets did. Errors are translated at
the edge, with one log line each: a request that is framed but wrong gets an
``error`` reply and the connection stays; bytes that cannot be framed, a
silent stranger, or a reader that stops reading lose the connection, and a
source that misbehaves loses its link, so its pulls move to the next source.
Buffers are bounded per connection: serving (and reading) pauses while a
served connection has ``MAX_QUEUED`` replies or ``PAUSE_OUT_BYTES`` unsent --
requests already received wait in the decoder, so one receive full of reads
of spilled objects cannot fill the heap -- and the decoders never hold more
than one receive plus one frame. A puller that reads none of its queued
replies for the transfer timeout (at most ``[security] stall_s``) is cut off
by the same rule as the raylet's and the Unix side's
(:func:`libclient.peer_policy.overdue`); one that reads, however slowly, is not.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
import mmap
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

from daemons.stored import transfer
from daemons.stored.messages import (
    Abort,
    Create,
    Free,
    Pull,
    Release,
    Seal,
    host_port,
    request_id,
)
from daemons.stored.pull import (
    AbortLocal,
    CancelAttempt,
    CreateLocal,
    PullManager,
    SealLocal,
    SendRead,
    SendStat,
    WatchLocal,
)
from daemons.stored.store import SEALED, ObjectTable, Reply
from libclient import peer_guard, peer_policy, security
from libclient.protocol import FrameDecoder, ProtocolError, pack

LISTEN_KEY = "transfer_listen"
PULLER = -1  # the object-table client that creates, seals and aborts pulled objects
RECV_BYTES = 64 * 1024  # requests are tiny: one receive holds hundreds of them
# A served connection stops being read while this much is queued for it. The
# payload is arena memory, not heap, so the bound is about pins and fairness:
# 16 chunk replies are 64 MiB, four pulls' windows.
MAX_QUEUED = 32
PAUSE_OUT_BYTES = 64 * 1024 * 1024
MAX_SERVED = 1024  # simultaneous connections from pullers; more are refused
READ_BUDGET = 32 * 1024 * 1024  # bytes read from one link per wake-up, for fairness
_IOV = 64  # buffers per sendmsg (IOV_MAX is 1024; a few suffice to fill the socket)
_HOUSEKEEPING_S = 0.5


def _peer_name(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


_NO_DIGITS = str.maketrans("", "", "0123456789")


def _host(peer: str) -> str:
    """The host part of a ``_peer_name``: the key peers are logged by."""
    return peer.rpartition(":")[0] or peer


def _pending(sock: Any) -> int:
    """Received bytes a secured socket holds already opened (0 for a plain socket)."""
    pending = getattr(sock, "pending", None)
    return pending() if pending is not None else 0


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    # Control frames are small and latency-bound; payloads go out in big
    # sendmsg calls, so Nagle would only ever delay the frames.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Served:
    """A puller's connection to us: its decoder, its queued replies, its table client."""

    __slots__ = ("sock", "cid", "peer", "decoder", "out", "out_bytes", "mask", "spoke",
                 "born", "since", "progress_at", "wire_seen")

    def __init__(self, sock: socket.socket, cid: int, peer: str, now: float) -> None:
        self.sock = sock
        self.cid = cid
        self.peer = peer
        self.decoder = FrameDecoder(transfer.MAX_FRAME)
        # [buffer, oid]: an oid means "release one pin on it once this buffer is sent"
        self.out: collections.deque[list[Any]] = collections.deque()
        self.out_bytes = 0
        self.mask = selectors.EVENT_READ
        self.spoke = False  # sent at least one well-formed request
        self.born = now  # accepted
        self.since = now  # last request received
        self.progress_at = now  # last byte sent, or output queued to none
        self.wire_seen = 0  # the bulk link's wire_sent when progress_at was last moved


class _Req:
    """A request of ours outstanding at a source."""

    __slots__ = ("r", "kind", "oid", "tag", "off", "length", "cancelled")

    def __init__(self, r: int, kind: str, oid: bytes, tag: int, off: int = 0,
                 length: int = 0) -> None:
        self.r = r
        self.kind = kind
        self.oid = oid
        self.tag = tag
        self.off = off
        self.length = length
        self.cancelled = False


class _Link:
    """Our connection to one source: requests out, replies read exactly."""

    __slots__ = ("addr", "sock", "connected", "reader", "out", "pending", "current", "mask",
                 "since", "next_r")

    def __init__(self, addr: str, sock: socket.socket, now: float) -> None:
        self.addr = addr
        self.sock = sock
        self.connected = False
        self.reader = transfer.ReplyReader()
        self.out = bytearray()
        self.pending: collections.deque[_Req] = collections.deque()
        self.current: _Req | None = None  # the read whose payload is arriving
        self.mask = selectors.EVENT_WRITE  # connect completion
        self.since = now  # last request or reply
        self.next_r = 0


class TransferShell:
    """Serves our objects to other stores and runs our pulls, inside the store's loop.

    Args:
        listen: bound, listening TCP socket (made non-blocking here).
        address: the ``host:port`` other stores reach ``listen`` at.
        table: the store core (shared with the Unix side).
        arena: the arena mapping; payloads are sent from and received into it.
        sel: the store's selector; our sockets are registered in it.
        log: structlog logger.
        deliver: sends replies to Unix clients (the store shell's ``_deliver``).
        pulls: the pull policy.
        timeout: seconds a peer may stay silent (a stranger that never sends a
            request, a source that stops answering, a puller that stops reading).
        spill_read: reads a range of a spill file (``SpillFiles.read_range``):
            a spilled object is served from its file, not restored first.
    """

    def __init__(self, listen: socket.socket, address: str, table: ObjectTable,
                 arena: mmap.mmap, sel: selectors.BaseSelector, log: Any,
                 deliver: Callable[[list[Reply]], None], pulls: PullManager,
                 timeout: float = 10.0,
                 spill_read: Callable[[int, int, int], bytes] | None = None) -> None:
        self.listen = listen
        self.spill_read = spill_read
        self.address = address
        self.table = table
        self.arena = memoryview(arena)
        self.sel = sel
        self.log = log
        self.deliver = deliver
        self.pulls = pulls
        self.timeout = timeout
        # The shared rule (peer_policy.overdue) with the transfer port's numbers:
        # a stranger must speak, and a puller read any queued reply, within the
        # timeout (pullers fail over after the same time, so no legitimate
        # reader waits longer).
        base = peer_guard.limits()
        self.limits = dataclasses.replace(base, first_message_s=timeout,
                                          stall_s=min(timeout, base.stall_s), stall_bytes=0)
        self.max_served = min(MAX_SERVED, base.max_connections)
        self._served: dict[int, _Served] = {}
        self._links: dict[str, _Link] = {}
        self._dirty: set[_Link] = set()
        self._local: dict[bytes, int] = {}  # oid -> arena offset of a pull's reserved range
        self._next_cid = PULLER
        self._housekeeping_at = 0.0
        # No later than the pull manager's next deadline (recomputed whenever
        # it may have moved earlier), so turns that have nothing due skip tick.
        self._tick_at: float | None = None
        self.counters = {"stats": 0, "reads": 0, "bytes": 0, "not_found": 0, "refused": 0}
        # Refusals, bad requests and cut-offs: logged once per peer host (then
        # at its 10th, 100th, ...), so a hostile peer cannot flood the log.
        self._limit_log = peer_policy.LogOncePerPeer()
        listen.setblocking(False)
        table.connect(PULLER)
        sel.register(listen, selectors.EVENT_READ, LISTEN_KEY)

    # ------------------------------------------------------------ entry points
    def on_io(self, data: Any, mask: int, now: float) -> None:
        """A selector event on one of our sockets."""
        # An earlier event of the same select() may have closed this socket.
        if data is LISTEN_KEY:
            self._accept(now)
        elif isinstance(data, _Served):
            if mask & selectors.EVENT_READ and data.cid in self._served:
                self._served_readable(data, now)
            if mask & selectors.EVENT_WRITE and data.cid in self._served:
                self._served_flush(data, now)
        elif isinstance(data, _Link):
            if self._alive(data):
                self._link_io(data, mask, now)
        self._run(now)

    def on_pull(self, client: int, req: Pull, now: float) -> None:
        """A Unix client's ``pull``: answer from here, join a pull, or start one."""
        found = None if req.oid in self.pulls else self.table.lookup(req.oid)
        if found is not None and found[0] == SEALED:
            self.deliver([Reply(client, {"r": req.r, "ok": True, "size": found[1]})])
            return
        deadline = None if req.timeout_ms < 0 else now + req.timeout_ms / 1000.0
        # found: unsealed here, written by a local client (our own are in self.pulls)
        self.pulls.request(client, req.r, req.oid, req.sources, deadline, now,
                           local_busy=found is not None)
        self._run(now)
        self._tick_at = self.pulls.next_deadline()  # a joiner adds a deadline, no action

    def drop_client(self, client: int, now: float) -> None:
        """A Unix client disconnected: its pulls lose a waiter."""
        self.pulls.drop_client(client)
        self._run(now)

    def turn(self, now: float) -> None:
        """Once per loop turn: notices from the table, deadlines, admission, housekeeping."""
        for kind, oid, size in self.table.take_notices():
            if kind == "sealed":
                self.pulls.local_sealed(oid, size)
            else:
                self.pulls.local_freed(oid, now)
        if self._tick_at is not None and now >= self._tick_at:
            self.pulls.tick(now)
            self._tick_at = self.pulls.next_deadline()
        if self.pulls.waiting:
            need = self.pulls.first_waiting_size()
            if need > self.table.room:
                # The store is full of held objects: spill some so the pull fits.
                self.table.spill_for(need)
            self.pulls.admit(self.table.room)
        self._run(now)
        if now >= self._housekeeping_at:
            self._housekeeping_at = now + _HOUSEKEEPING_S
            self._housekeeping(now)

    def next_deadline(self) -> float | None:
        """When :meth:`turn` next has a waiter deadline or stall check due."""
        return self._tick_at

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters for the health reply: our pulls, and what we served to others."""
        return {"pulls": {**self.pulls.stats(), "links": len(self._links)},
                "served": {**self.counters, "peers": len(self._served)}}

    def close(self) -> None:
        """Close every connection and the listener (at shutdown)."""
        for link in list(self._links.values()):
            self._close_link(link)
        for s in list(self._served.values()):
            self._close_served(s, "shutdown", quiet=True)
        try:
            self.sel.unregister(self.listen)
        except (KeyError, ValueError):
            pass
        self.listen.close()
        self._local.clear()
        self.arena.release()

    # ------------------------------------------------------------ running actions
    def _run(self, now: float) -> None:
        """Carry out the pull manager's actions until it has none left."""
        acted = False
        while True:
            actions = self.pulls.take_actions()
            if not actions:
                break
            acted = True
            for act in actions:
                if isinstance(act, Reply):
                    self.deliver([act])
                elif isinstance(act, SendRead):
                    self._send(act.source, _Req(0, "read", act.oid, act.tag, act.off, act.length),
                               now)
                elif isinstance(act, SendStat):
                    self._send(act.source, _Req(0, "stat", act.oid, act.tag), now)
                elif isinstance(act, CancelAttempt):
                    self._cancel(act, now)
                elif isinstance(act, CreateLocal):
                    self._create_local(act, now)
                elif isinstance(act, SealLocal):
                    self._seal_local(act.oid, now)
                elif isinstance(act, AbortLocal):
                    self.table.step(PULLER, Abort(0, act.oid), now)
                    self._local.pop(act.oid, None)
                elif isinstance(act, WatchLocal):
                    self.table.watch(act.oid)
        if acted:  # a state change may have brought a deadline or stall check nearer
            self._tick_at = self.pulls.next_deadline()
        for event, fields in self.pulls.take_events():
            if event in ("pull_failed", "pull_source_dropped"):
                self.log.warning(event, **fields)
            else:
                self.log.info(event, **fields)
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            for link in dirty:
                if link.connected and self._alive(link):
                    self._link_flush(link, now)

    def _create_local(self, act: CreateLocal, now: float) -> None:
        (reply,) = self.table.step(PULLER, Create(0, act.oid, act.size), now)
        if reply.msg["ok"]:
            self._local[act.oid] = reply.msg["offset"]
            self.pulls.created(act.oid, True, now)
        elif reply.msg["error"] == "exists":
            found = self.table.lookup(act.oid)
            if found is not None and found[0] == SEALED:
                self.pulls.local_sealed(act.oid, found[1])
            else:
                self.pulls.local_busy(act.oid)
        else:  # full: no hole big enough once pinned objects are counted
            self.pulls.created(act.oid, False, now)

    def _seal_local(self, oid: bytes, now: float) -> None:
        replies = self.table.step(PULLER, Seal(0, oid), now)
        # Our own reply first; the rest complete other clients' gets.
        self.deliver([r for r in replies if r.client != PULLER])
        # A pulled copy is secondary: unpinned, so LRU may evict it.
        self.table.step(PULLER, Release((oid,)), now)
        self._local.pop(oid, None)

    # ------------------------------------------------------------ pulling (links)
    def _send(self, addr: str, req: _Req, now: float) -> None:
        link = self._links.get(addr)
        if link is None:
            link, error = self._connect(addr, now)
            if link is None:
                self.pulls.source_failed(req.oid, req.tag, f"connect failed: {error}", now)
                return
        link.next_r += 1
        req.r = link.next_r
        link.pending.append(req)
        if req.kind == "read":
            link.out += pack(transfer.read_msg(req.r, req.oid, req.off, req.length))
        else:
            link.out += pack(transfer.stat_msg(req.r, req.oid))
        link.since = now
        self._dirty.add(link)

    def _connect(self, addr: str, now: float) -> tuple[_Link | None, str]:
        """A new link to ``addr`` (connecting in the background), or why not."""
        try:
            host, port = host_port(addr)
            # Numeric addresses resolve without a lookup; a name may block the
            # loop on DNS, so sources should be given as addresses.
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except (ProtocolError, OSError) as exc:
            return None, str(exc)
        _tune(sock)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return None, os.strerror(err)
        link = _Link(addr, sock, now)
        self._links[addr] = link
        self.sel.register(sock, link.mask, link)
        return link, ""

    def _link_io(self, link: _Link, mask: int, now: float) -> None:
        if not link.connected:
            if not mask & (selectors.EVENT_WRITE | selectors.EVENT_READ):
                return
            err = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail_link(link, f"connect failed: {os.strerror(err)}", now)
                return
            link.connected = True
            # Wrapped once connected: TLS (or the HMAC handshake) sees an
            # unconnected socket as one to send in clear.
            self.sel.unregister(link.sock)
            try:
                link.sock = security.client_wrap(link.sock, bulk=True, handshake=False)
            finally:
                self.sel.register(link.sock, link.mask, link)
            self._link_flush(link, now)
            if not self._alive(link):
                return
        if mask & selectors.EVENT_READ:
            self._link_readable(link, now)
        if mask & selectors.EVENT_WRITE and self._alive(link):
            self._link_flush(link, now)

    def _alive(self, link: _Link) -> bool:
        return self._links.get(link.addr) is link

    def _link_flush(self, link: _Link, now: float) -> None:
        if link.out:
            try:
                n = link.sock.send(link.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fail_link(link, f"send failed: {exc}", now)
                return
            del link.out[:n]
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0)
        if mask != link.mask:
            link.mask = mask
            self.sel.modify(link.sock, mask, link)

    def _link_readable(self, link: _Link, now: float) -> None:
        reader = link.reader
        got = 0
        # Opened-but-unread plaintext (a bulk record bigger than the piece the
        # reader asked for) is invisible to the selector: read it before leaving.
        while got < READ_BUDGET or _pending(link.sock):
            try:
                n = link.sock.recv_into(reader.buffer())
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail_link(link, f"recv failed: {exc}", now)
                return
            if n == 0:
                self._fail_link(link, "connection closed by the source", now)
                return
            got += n
            try:
                event = reader.advance(n)
            except ProtocolError as exc:
                self._fail_link(link, f"protocol error: {exc}", now)
                return
            if event is None:
                continue
            link.since = now
            if event is transfer.PAYLOAD_DONE:
                req = link.pending.popleft()
                link.current = None
                if not req.cancelled:
                    self.pulls.read_done(req.oid, req.tag, req.off, now)
                    self._run(now)  # ask for the next chunk before reading on
            elif not self._on_reply(link, event, now):
                return
            if not self._alive(link):  # a pull's action dropped it meanwhile
                return
        if not link.pending and not reader.in_payload:
            link.since = now

    def _on_reply(self, link: _Link, msg: dict[str, Any], now: float) -> bool:
        """Match one control reply to the oldest request; False if the link was failed."""
        req = link.pending[0] if link.pending else None
        if req is None or msg.get("r") != req.r:
            self._fail_link(link, f"reply {msg.get('r')!r} does not match a request", now)
            return False
        t = msg["t"]
        if t == "data" and req.kind == "read":
            if msg["len"] != req.length:
                self._fail_link(link, f"data of {msg['len']} bytes for a read of {req.length}",
                                now)
                return False
            base = self._local.get(req.oid)
            if req.cancelled or base is None:
                link.reader.discard_payload()
            else:
                start = base + req.off
                link.reader.accept_payload(self.arena[start:start + req.length])
            link.current = req
            return True
        if t == "stat" and req.kind == "stat":
            size = msg.get("size")
            if type(size) is not int or size < 0:
                self._fail_link(link, f"stat reply with size {size!r}", now)
                return False
            link.pending.popleft()
            if not req.cancelled:
                self.pulls.stat_done(req.oid, req.tag, size, now)
            return True
        if t == "error":
            link.pending.popleft()
            if not req.cancelled:
                code, text = str(msg.get("error")), str(msg.get("msg", ""))[:200]
                if code == "not_found" and req.kind == "stat":
                    self.pulls.stat_missing(req.oid, req.tag, "not found", now)
                elif code == "not_found":  # evicted or deleted there mid-transfer
                    self.pulls.source_failed(req.oid, req.tag, "gone mid-transfer", now)
                else:
                    self.pulls.source_failed(req.oid, req.tag, f"{code}: {text}", now)
            return True
        self._fail_link(link, f"unexpected {t!r} reply to a {req.kind}", now)
        return False

    def _cancel(self, act: CancelAttempt, now: float) -> None:
        link = self._links.get(act.source)
        if link is None:
            return
        for req in link.pending:
            if req.oid == act.oid and req.tag == act.tag:
                req.cancelled = True
                if link.current is req:
                    link.reader.discard_payload()  # the range is about to be freed
        if act.close:
            self._fail_link(link, "stopped answering", now)

    def _fail_link(self, link: _Link, reason: str, now: float) -> None:
        """Drop a link; every live request on it fails, so its pulls move on."""
        live = [req for req in link.pending if not req.cancelled]
        self._close_link(link)
        # With requests outstanding, each pull logs the reason as it moves on;
        # a source closing an idle link is routine.
        if live or reason.startswith("connection closed"):
            self.log.debug("transfer_link_failed", peer=link.addr, reason=reason,
                           requests=len(live))
        else:
            self.log.warning("transfer_link_failed", peer=link.addr, reason=reason)
        failed: set[tuple[bytes, int]] = set()
        for req in live:
            if (req.oid, req.tag) not in failed:
                failed.add((req.oid, req.tag))
                self.pulls.source_failed(req.oid, req.tag, reason, now)

    def _close_link(self, link: _Link) -> None:
        if self._links.get(link.addr) is link:
            del self._links[link.addr]
        self._dirty.discard(link)
        try:
            self.sel.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        link.sock.close()
        link.current = None
        link.reader = transfer.ReplyReader()  # drops any view of the arena

    # ------------------------------------------------------------ serving
    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, addr = self.listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                self.log.warning("transfer_accept_failed", error=str(exc))
                return
            peer = _peer_name(addr)
            if len(self._served) >= self.max_served:
                self.counters["refused"] += 1
                if self._limit_log.should_log(_host(peer), "refused"):
                    self.log.warning("transfer_peer_refused", peer=peer, served=len(self._served),
                                     times=self._limit_log.count(_host(peer), "refused"))
                sock.close()
                continue
            _tune(sock)
            sock = security.server_wrap(sock, bulk=True)  # the handshake runs in the reads
            self._next_cid -= 1
            s = _Served(sock, self._next_cid, peer, now)
            self._served[s.cid] = s
            self.table.connect(s.cid)
            self.sel.register(sock, s.mask, s)
            self.log.debug("transfer_peer_connected", peer=peer)

    def _served_readable(self, s: _Served, now: float) -> None:
        if self._served_recv(s):
            self._served_flush(s, now)

    def _served_recv(self, s: _Served) -> bool:
        """One receive into the decoder; False if there was nothing (or it closed)."""
        try:
            data = s.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._close_served(s, f"recv failed: {exc}")
            return False
        if not data:
            # A puller that vanishes mid-transfer leaves replies unsent; its
            # pins go with its table client.
            self._close_served(s, "eof", quiet=not s.out and s.decoder.buffered == 0)
            return False
        s.decoder.feed(data)
        return True

    @staticmethod
    def _served_paused(s: _Served) -> bool:
        return len(s.out) >= MAX_QUEUED or s.out_bytes >= PAUSE_OUT_BYTES

    def _served_take(self, s: _Served, now: float) -> bool:
        """Serve the requests received so far until the connection's output is
        full; if none is whole, open the next request record TLS already holds
        (invisible to the selector). False when there was nothing to do."""
        served = False
        while not self._served_paused(s):
            try:
                msg = s.decoder.next()
            except ProtocolError as exc:
                self._served_protocol_error(s, str(exc))
                return False
            if msg is None:
                break
            self._serve(s, msg, now)
            served = True
        if served or self._served_paused(s) or not _pending(s.sock):
            return served
        return self._served_recv(s)

    def _serve(self, s: _Served, msg: dict[str, Any], now: float) -> None:
        if not s.out:
            s.progress_at = now  # every reply is queued here: the stall clock starts
        try:
            req = transfer.parse_request(msg)
        except ProtocolError as exc:
            if self._limit_log.should_log(_host(s.peer), "bad_request"):
                self.log.warning("transfer_bad_request", peer=s.peer, t=str(msg.get("t")),
                                 error=str(exc),
                                 times=self._limit_log.count(_host(s.peer), "bad_request"))
            self._queue(s, transfer.error_msg(request_id(msg), "bad_request", str(exc)))
            return
        s.spoke = True
        s.since = now
        if isinstance(req, transfer.StatRequest):
            found = self.table.lookup(req.oid)
            if found is not None and found[0] == SEALED:
                self.counters["stats"] += 1
                self._queue(s, {"t": "stat", "r": req.r, "size": found[1]})
            else:
                self._not_found(s, req.r, req.oid)
            return
        if isinstance(req, transfer.FreeRequest):
            # An owner on another node let go: a copy nobody reads goes now
            # (one being read stays, evictable, as after any free).
            self.deliver(self.table.step(s.cid, Free((req.oid,)), now))
            self._queue(s, {"t": "freed", "r": req.r})
            return
        pinned = self.table.pin_sealed(s.cid, req.oid)
        if pinned is None:
            self._serve_spilled(s, req)
            return
        base, size = pinned
        if req.off + req.length > size:
            self.table.step(s.cid, Release((req.oid,)), now)
            self.log.warning("transfer_bad_request", peer=s.peer, t="read",
                             error=f"range past the end of a {size}-byte object")
            self._queue(s, transfer.error_msg(req.r, "bad_request",
                                              f"object {req.oid.hex()} has {size} bytes"))
            return
        self.counters["reads"] += 1
        self.counters["bytes"] += req.length
        self._queue(s, {"t": "data", "r": req.r, "len": req.length})
        start = base + req.off
        s.out.append([self.arena[start:start + req.length], req.oid])
        s.out_bytes += req.length

    def _serve_spilled(self, s: _Served, req: transfer.ReadRequest) -> None:
        """Serve a read of a spilled object from its spill file (no restore, no pin).

        The file cannot go while we read it: the table deletes files only
        when their objects are freed, which cannot happen inside this call.
        A chunk is at most the puller's chunk size, from the page cache most
        of the time.
        """
        where = self.table.spill_location(req.oid) if self.spill_read is not None else None
        if where is None:
            self._not_found(s, req.r, req.oid)
            return
        file_id, file_off, size = where
        if req.off + req.length > size:
            self._queue(s, transfer.error_msg(req.r, "bad_request",
                                              f"object {req.oid.hex()} has {size} bytes"))
            return
        try:
            data = self.spill_read(file_id, file_off + req.off, req.length)
        except OSError as exc:
            self.log.warning("transfer_spill_read_failed", object_id=req.oid.hex(),
                             error=str(exc))
            self._not_found(s, req.r, req.oid)
            return
        if len(data) != req.length:
            self._not_found(s, req.r, req.oid)
            return
        self.counters["reads"] += 1
        self.counters["bytes"] += req.length
        self.counters["spilled_reads"] = self.counters.get("spilled_reads", 0) + 1
        self._queue(s, {"t": "data", "r": req.r, "len": req.length})
        s.out.append([memoryview(data), None])
        s.out_bytes += req.length

    def _not_found(self, s: _Served, r: int, oid: bytes) -> None:
        self.counters["not_found"] += 1
        self.log.info("transfer_not_found", peer=s.peer, object_id=oid.hex())
        self._queue(s, transfer.error_msg(r, "not_found",
                                          f"object {oid.hex()} is not sealed here"))

    def _queue(self, s: _Served, msg: dict[str, Any]) -> None:
        data = pack(msg)
        s.out.append([memoryview(data), None])
        s.out_bytes += len(data)

    def _served_flush(self, s: _Served, now: float) -> None:
        """Send what is queued; while there is room, serve the requests that wait."""
        self._served_send(s, now)
        while s.cid in self._served and not self._served_paused(s) and self._served_take(s, now):
            self._served_send(s, now)
        if s.cid not in self._served:
            return
        mask = ((0 if self._served_paused(s) else selectors.EVENT_READ)
                | (selectors.EVENT_WRITE if s.out else 0))
        if mask != s.mask:
            s.mask = mask
            self.sel.modify(s.sock, mask, s)

    def _served_send(self, s: _Served, now: float) -> None:
        out = s.out
        while out:
            bufs = [item[0] for item in itertools.islice(out, _IOV)]
            try:
                n = s.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                wire = getattr(s.sock, "wire_sent", None)  # bulk link: part of a record
                if wire is not None and wire != s.wire_seen:
                    s.wire_seen, s.progress_at = wire, now
                break
            except OSError as exc:
                self._close_served(s, f"send failed: {exc}")
                return
            s.progress_at = now
            s.out_bytes -= n
            full = n == sum(len(b) for b in bufs)
            while n:
                item = out[0]
                size = len(item[0])
                if n < size:
                    item[0] = item[0][n:]
                    break
                n -= size
                out.popleft()
                if item[1] is not None:  # the chunk has left: drop its pin
                    self.table.step(s.cid, Release((item[1],)), now)
            while out and len(out[0][0]) == 0:  # zero-length buffers (none today)
                out.popleft()
            if not full:
                break

    def _served_protocol_error(self, s: _Served, error: str) -> None:
        """The stream lost its framing: say why (best effort) and close it."""
        try:
            s.sock.send(pack(transfer.error_msg(None, "protocol", error)))
        except OSError:
            pass
        self._close_served(s, f"protocol error: {error}")

    def _close_served(self, s: _Served, reason: str, quiet: bool = False) -> None:
        if self._served.pop(s.cid, None) is None:
            return
        try:
            self.sel.unregister(s.sock)
        except (KeyError, ValueError):
            pass
        s.sock.close()
        unsent = s.out_bytes
        s.out.clear()  # drops the views of the arena
        dropped = self.table.disconnect(s.cid)
        # Once per peer host and kind of reason (digits aside): a flood of
        # one fault makes one line, different faults each make theirs.
        kind = "closed:" + reason.translate(_NO_DIGITS)[:48]
        if quiet or not self._limit_log.should_log(_host(s.peer), kind):
            self.log.debug("transfer_peer_closed", peer=s.peer, reason=reason)
        else:
            self.log.warning("transfer_peer_closed", peer=s.peer, reason=reason,
                             unsent_bytes=unsent, pins_dropped=dropped.pins)

    # ------------------------------------------------------------ housekeeping
    def _housekeeping(self, now: float) -> None:
        """Close silent strangers, stuck readers and idle links (shell-side polling)."""
        states = [peer_policy.ConnState(s.cid, now - s.born, s.spoke, s.out_bytes,
                                        now - s.progress_at, True)
                  for s in self._served.values()]
        for cid, why in peer_policy.overdue(self.limits, states):
            self._close_served(self._served[cid], f"cut off: {why}")
        for s in list(self._served.values()):
            if not s.out and now - s.since > 6 * self.timeout:
                self._close_served(s, "idle", quiet=True)
        for link in list(self._links.values()):
            # Close idle links well before the source would (6 x timeout), so a
            # request never races the source closing an idle connection.
            if not link.pending and now - link.since > 3 * self.timeout:
                self._close_link(link)
