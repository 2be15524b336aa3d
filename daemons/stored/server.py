"""stored's I/O shell: one selector loop over the Unix socket, its clients and transfers.

The shell owns sockets, the clock and the arena fd; every decision is made
by :class:`daemons.stored.store.ObjectTable`. Per connection it keeps a
:class:`FrameDecoder` (bytes in) and a queue of outgoing chunks (bytes out),
so a slow or stuck client only ever fills its own buffer: sockets are
non-blocking and a client whose unread replies pass ``PAUSE_OUT_BYTES`` is
not read from until it catches up (back-pressure instead of unbounded
memory). A client that leaves more than ``[security] stall_bytes`` unread and
reads none of it for ``stall_s`` is cut off, as the raylet does
(:func:`libclient.peer_policy.overdue`, checked once a second), so a stuck
reader cannot hold its pins and buffer for ever.

Errors are translated at the edge: a frame that cannot be decoded closes
that connection (its framing is lost), a well-framed request with a bad
field gets an ``ok: False`` reply, and a vanished client is disconnected
from the core, which frees whatever it held.

The TCP side (serving objects to other stores and pulling from them) lives
in :mod:`daemons.stored.peers`; its sockets share this loop's selector, and
``pull`` requests from Unix clients are handed to it.
"""

from __future__ import annotations

import array
import collections
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from daemons.shell import StopFlag
from daemons.stored import messages
from daemons.stored.peers import TransferShell
from daemons.stored.spill_io import SpillFiles
from daemons.stored.store import ObjectTable, Reply
from libclient import peer_guard, peer_policy
from libclient.protocol import FrameDecoder, ProtocolError, pack

# Control frames to stored are tiny (a get of 10k ids is ~300 KiB); 16 MiB is
# already absurd and keeps a hostile length prefix from reserving memory.
MAX_FRAME = 16 * 1024 * 1024
RECV_BYTES = 256 * 1024
# Stop reading a client that has this much unread output. Replies are small;
# only a client that pipelines thousands of requests without reading gets near
# it (uvicorn pauses its transport at 64 KiB high water; we are generous
# because our replies are bounded by our requests).
PAUSE_OUT_BYTES = 4 * 1024 * 1024

_LISTEN = "listen"
_WAKE = "wake"
_SPILL = "spill"
# Disk the spill planner leaves free for everything else on the file system.
SPILL_DISK_RESERVE = 256 << 20
_DISK_CHECK_S = 1.0


class _Conn:
    """One client connection: its decoder and its unsent output."""

    __slots__ = ("sock", "cid", "decoder", "out", "out_bytes", "mask", "pid", "name", "peer_pid",
                 "peer_uid", "born", "progress_at")

    def __init__(self, sock: socket.socket, cid: int, max_frame: int = MAX_FRAME) -> None:
        self.sock = sock
        self.cid = cid
        self.decoder = FrameDecoder(max_frame)
        self.peer_pid = 0  # SO_PEERCRED's pid (hello's pid may say anything)
        self.peer_uid = -1  # SO_PEERCRED's uid: cut-offs are logged once per uid
        self.born = 0.0  # accepted at (loop time)
        self.progress_at = 0.0  # the client last took output, or output was queued to none
        # Chunks of [bytearray, fds]; fds ride on the first byte of their chunk.
        self.out: collections.deque[list[Any]] = collections.deque()
        self.out_bytes = 0
        self.mask = 0
        self.pid = 0
        self.name = ""


class StoreServer:
    """Serve stored's protocol on ``listen`` until a StopFlag is set.

    Args:
        listen: a bound, listening, non-blocking AF_UNIX socket.
        table: the store core.
        arena_fd: memfd of the arena, passed to every client in the hello reply.
        log: structlog logger.
        selector: injectable for tests; defaults to the platform's best.
        clock: monotonic clock; injectable for tests.
        node_id: hex node id, reported by the health reply.
        transfer: builds the TCP transfer shell on this server's selector and
            reply path (see ``__main__``); None serves the Unix socket only.
        spill: runs the spill files' I/O (the table must have a spill policy);
            None when spilling is off.
    """

    def __init__(self, listen: socket.socket, table: ObjectTable, arena_fd: int, log: Any,
                 selector: selectors.BaseSelector | None = None,
                 clock: Callable[[], float] = time.monotonic, node_id: str = "",
                 transfer: Callable[[selectors.BaseSelector, Callable[[list[Reply]], None]],
                                    TransferShell] | None = None,
                 spill: SpillFiles | None = None) -> None:
        self.listen = listen
        self.table = table
        self.arena_fd = arena_fd
        self.log = log
        self.sel = selector or selectors.DefaultSelector()
        self.clock = clock
        self.conns: dict[int, _Conn] = {}
        self._next_cid = 0
        # Who may connect (SO_PEERCRED), how many at once, how big a frame.
        self.gate = peer_guard.LocalGate(log, "stored")
        self.limits = peer_guard.limits()
        self.max_frame = min(MAX_FRAME, self.limits.max_frame)
        self._limit_log = peer_policy.LogOncePerPeer()
        self._swept = 0.0
        self._cut: dict[int, str] = {}  # over max_out_bytes: closed at this turn's sweep
        self._dirty: set[_Conn] = set()
        self.sel.register(listen, selectors.EVENT_READ, _LISTEN)
        self.node_id = node_id
        self.started = clock()
        # The loop wakes at least this often even when idle, and stamps
        # last_loop each turn, so a watchdog can tell turning from wedged.
        self.max_wait_s = 1.0
        self.last_loop = clock()
        self.transfer = transfer(self.sel, self._deliver) if transfer is not None else None
        self.spill = spill
        self._disk_checked = -_DISK_CHECK_S
        if spill is not None:
            self.sel.register(spill.wake_r, selectors.EVENT_READ, _SPILL)

    # ------------------------------------------------------------ lifecycle
    def run(self, stop: StopFlag) -> None:
        """Main loop: accept, read, dispatch, write, expire gets; until stopped."""
        self.sel.register(stop.wake_fd_r, selectors.EVENT_READ, _WAKE)
        transfer = self.transfer
        while not stop.stopping:
            now = self.last_loop = self.clock()
            deadline = self.table.next_deadline()
            if transfer is not None:
                other = transfer.next_deadline()
                if other is not None and (deadline is None or other < deadline):
                    deadline = other
            timeout = self.max_wait_s if deadline is None else max(
                0.0, min(self.max_wait_s, deadline - now))
            for key, mask in self.sel.select(timeout):
                data = key.data
                if type(data) is _Conn:
                    if mask & selectors.EVENT_READ:
                        self._on_readable(data)
                    if mask & selectors.EVENT_WRITE and data.cid in self.conns:
                        self._dirty.add(data)
                elif data is _LISTEN:
                    self._accept()
                elif data is _WAKE:
                    try:
                        os.read(stop.wake_fd_r, 64)
                    except OSError:
                        pass
                elif data is _SPILL:
                    self._on_spill_done()
                elif transfer is not None:
                    transfer.on_io(data, mask, self.clock())
            now = self.clock()
            if self.spill is not None and now - self._disk_checked >= _DISK_CHECK_S:
                self._disk_checked = now
                policy = self.table.spill
                policy.disk_room = policy.disk_bytes + max(
                    0, self.spill.disk_free() - SPILL_DISK_RESERVE)
            self._deliver(self.table.tick(now))
            if transfer is not None:
                transfer.turn(now)
            if self.spill is not None:
                io = self.table.take_io()
                if io:
                    self.spill.submit(io)
            self._flush_dirty()
            self._sweep_limits(now)
            self._log_events()

    def _on_spill_done(self) -> None:
        """Tell the table which spill writes and restores the I/O threads finished."""
        table = self.table
        for kind, job, ok in self.spill.take_done():
            if kind == "write":
                self._deliver(table.spill_done(job.file_id, ok))
                self.log.info("spill_written" if ok else "spill_write_failed",
                              file_id=job.file_id, objects=len(job.ranges), bytes=job.nbytes)
            else:
                self._deliver(table.restore_done(job.oid, ok))

    def close(self) -> None:
        """Close every client and the listening socket (the caller unlinks the path)."""
        for conn in list(self.conns.values()):
            self._drop(conn, "shutdown")
        if self.transfer is not None:
            self.transfer.close()
        if self.spill is not None:
            try:
                self.sel.unregister(self.spill.wake_r)
            except (KeyError, ValueError):
                pass
            self.spill.close()
        try:
            self.sel.unregister(self.listen)
        except (KeyError, ValueError):
            pass
        self.listen.close()
        self.sel.close()

    # ------------------------------------------------------------ connections
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                self.log.warning("accept_failed", error=str(exc))
                return
            cred = self.gate.admit(sock)
            if cred is None:
                continue
            if not self.limits.admit(len(self.conns)):
                sock.close()
                if self._limit_log.should_log(cred.uid, "cap"):
                    self.log.warning("connection_refused", peer_pid=cred.pid, peer_uid=cred.uid,
                                     reason=f"at the cap of {self.limits.max_connections} "
                                            "connections",
                                     times=self._limit_log.count(cred.uid, "cap"))
                continue
            sock.setblocking(False)
            self._next_cid += 1
            conn = _Conn(sock, self._next_cid, self.max_frame)
            conn.peer_pid, conn.peer_uid = cred.pid, cred.uid
            conn.born = conn.progress_at = self.last_loop
            self.conns[conn.cid] = conn
            self.table.connect(conn.cid)
            conn.mask = selectors.EVENT_READ
            self.sel.register(sock, conn.mask, conn)
            self.log.debug("client_connected", client=conn.cid)

    def _drop(self, conn: _Conn, reason: str) -> None:
        if self.conns.pop(conn.cid, None) is None:
            return
        dropped = self.table.disconnect(conn.cid)
        self._dirty.discard(conn)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.log.info("client_disconnected", client=conn.cid, client_pid=conn.pid,
                      name=conn.name, reason=reason, pins_dropped=dropped.pins,
                      aborted=dropped.aborted, gets_cancelled=dropped.gets)
        if self.transfer is not None:
            self.transfer.drop_client(conn.cid, self.clock())

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(conn, f"recv failed: {exc}")
            return
        if not data:
            self._drop(conn, "eof")
            return
        conn.decoder.feed(data)
        now = self.clock()
        while conn.cid in self.conns:
            try:
                msg = conn.decoder.next()
            except ProtocolError as exc:
                self._protocol_failure(conn, str(exc))
                return
            if msg is None:
                break
            self._dispatch(conn, msg, now)

    def _dispatch(self, conn: _Conn, msg: dict[str, Any], now: float) -> None:
        if msg.get("t") in ("ping", "health"):
            self._on_health(conn, msg, now)
            return
        try:
            req = messages.parse(msg)
        except ProtocolError as exc:
            r = messages.request_id(msg)
            self.log.warning("bad_request", client=conn.cid, client_pid=conn.pid,
                             t=str(msg.get("t")), error=str(exc))
            if r is not None:
                self._queue(conn, {"r": r, "ok": False, "error": "bad_request",
                                   "msg": str(exc)})
            return
        if isinstance(req, messages.Pull):
            if self.transfer is None:
                self._queue(conn, {"r": req.r, "ok": False, "error": "bad_request",
                                   "msg": "this stored has no transfer address"})
            else:
                self.transfer.on_pull(conn.cid, req, now)
            return
        if isinstance(req, messages.Hello):
            conn.pid, conn.name = req.pid, req.name
            self.log.info("client_hello", client=conn.cid, client_pid=req.pid, name=req.name)
        self._deliver(self.table.step(conn.cid, req, now))

    def _on_health(self, conn: _Conn, msg: dict[str, Any], now: float) -> None:
        """Answer a health probe from the shell: no core state is touched.

        Any client may ask, before or without ``hello``; a reply at all means
        "serving", the fields are for ``shoal status``.
        """
        r = messages.request_id(msg)
        if r is None:
            return
        reply = {"r": r, "ok": True, "daemon": "stored", "status": "serving",
                 "pid": os.getpid(), "node_id": self.node_id,
                 "uptime_s": round(now - self.started, 3),
                 "clients": len(self.conns), "stats": self.table.stats()}
        if self.transfer is not None:
            reply["transfer_address"] = self.transfer.address
            reply["transfer"] = self.transfer.stats()
        self._queue(conn, reply)

    def _protocol_failure(self, conn: _Conn, error: str) -> None:
        """The stream lost its framing: say why (best effort) and close it."""
        if self._limit_log.should_log(conn.peer_pid, "protocol"):  # once per peer process
            self.log.warning("protocol_error", client=conn.cid, client_pid=conn.peer_pid,
                             error=error, times=self._limit_log.count(conn.peer_pid, "protocol"))
        try:
            conn.sock.send(pack({"t": "reply", "r": None, "ok": False, "error": "protocol",
                                 "msg": error}))
        except OSError:
            pass
        self._drop(conn, "protocol error")

    # ------------------------------------------------------------ output
    def _deliver(self, replies: list[Reply]) -> None:
        for reply in replies:
            conn = self.conns.get(reply.client)
            if conn is not None:
                self._queue(conn, reply.msg, [self.arena_fd] if reply.arena_fd else None)

    def _queue(self, conn: _Conn, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        # protocol.decode_body insists on a string "t" in every message, replies too.
        data = pack({"t": "reply", **msg})
        if not conn.out:
            conn.progress_at = self.last_loop  # the stall clock starts with the backlog
        if fds is None and conn.out and conn.out[-1][1] is None:
            conn.out[-1][0] += data  # coalesce small replies into one send
        else:
            conn.out.append([bytearray(data), fds])
        conn.out_bytes += len(data)
        if conn.out_bytes > self.limits.max_out_bytes:  # cut off at this turn's sweep
            self._cut.setdefault(conn.cid, f"{conn.out_bytes} bytes unread "
                                           f"(limit {self.limits.max_out_bytes})")
            conn.out.clear()
            conn.out_bytes = 0
            return
        self._dirty.add(conn)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for conn in dirty:
            if conn.cid in self.conns:
                self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            chunk = conn.out[0]
            data, fds = chunk
            try:
                if fds:
                    n = conn.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", fds))])
                else:
                    n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(conn, f"send failed: {exc}")
                return
            conn.out_bytes -= n
            if n:
                conn.progress_at = self.last_loop
            chunk[1] = None  # the kernel took the fds with the first byte
            if n < len(data):
                del data[:n]
                break
            conn.out.popleft()
        self._update_mask(conn)

    def _update_mask(self, conn: _Conn) -> None:
        mask = 0 if conn.out_bytes > PAUSE_OUT_BYTES else selectors.EVENT_READ
        if conn.out:
            mask |= selectors.EVENT_WRITE
        # mask is never 0: a paused client has output pending, hence EVENT_WRITE.
        if mask != conn.mask:
            conn.mask = mask
            self.sel.modify(conn.sock, mask, conn)

    def _sweep_limits(self, now: float) -> None:
        """Once a second: cut off clients that stopped reading a sizeable backlog.

        Local clients may stay silent for ever (a driver that only waits), so
        only unread output counts; the rule is the raylet's
        (:func:`peer_policy.overdue`). Logged once per uid, then at the
        10th, 100th... cut-off.
        """
        if now - self._swept < 1.0 and not self._cut:
            return
        self._swept = now
        states = [peer_policy.ConnState(c.cid, now - c.born, True, c.out_bytes,
                                        now - c.progress_at, False)
                  for c in self.conns.values() if c.out_bytes]
        cut = dict(peer_policy.overdue(self.limits, states))
        cut.update(self._cut)
        self._cut = {}
        for cid, why in cut.items():
            conn = self.conns.get(cid)
            if conn is None:
                continue
            if self._limit_log.should_log(conn.peer_uid, "cut"):
                self.log.warning("peer_cut_off", client=cid, peer_pid=conn.peer_pid,
                                 peer_uid=conn.peer_uid, name=conn.name, reason=why,
                                 times=self._limit_log.count(conn.peer_uid, "cut"))
            self._drop(conn, f"cut off: {why}")

    def _log_events(self) -> None:
        for event, fields in self.table.take_events():
            if event == "bad_release":
                self.log.warning(event, **fields)
            else:
                self.log.info(event, **fields)
