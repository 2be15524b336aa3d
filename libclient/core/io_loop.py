"""The I/O thread: one selector over the raylet, leased workers and actors.

Theory of operation
-------------------
Every socket the core worker talks on after start-up is non-blocking and
registered in one selector, served by one thread (``shoal-io``). A turn of
that thread reads whatever is readable, flushes what waits to be written,
and then runs the owner's housekeeping (timers: idle leases, actor polling,
cancel resends, gcsd batches), all under the core worker's one lock.

*Writes* go straight to the socket from the thread that makes them; only
what the socket does not take is buffered on the connection (``out``) and
the selector watches it for writability until it drains. The wake pipe
makes the I/O thread notice new write interest, new timers and shutdown.
Encrypted (TLS) connections with calls already in flight are the
exception: their writes are buffered and flushed by the I/O thread's next
turn (or by a ``get`` that claims the socket), so a burst of calls becomes
one ``SSL_write``, not one TLS record per call.

*Raylets.* Our own raylet is a Unix socket opened at start-up. Other
nodes' raylets (for spilled leases and actors placed there) are TCP
connections opened on first use, one per address, shared by both
submitters (:class:`RemoteRaylet`).

*Direct reads.* A user thread blocked in ``get`` on a reply in flight on a
known connection takes that socket out of the selector and reads it itself
(:meth:`IoLoop.read_directly`), through the same decoder and under the same
lock, then hands it back. That saves a thread wake-up per synchronous call;
the wait spins briefly before sleeping (``libclient.spin``).
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any

from libclient import security, spin
from libclient.protocol import Connection, FrameDecoder, ProtocolError, pack

SOCK_BUF = 4 * 1024 * 1024


class Conn:
    """A non-blocking stream to a leased worker or an actor, and the tasks it runs."""

    __slots__ = ("sock", "decoder", "out", "inflight", "dead", "claimed")

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.out = bytearray()  # what the socket has not taken yet
        self.inflight: dict[bytes, Any] = {}  # task id -> Task sent, not answered
        self.dead = False  # closed: nothing more is written
        self.claimed = False  # a waiting user thread reads this socket itself


class RemoteRaylet(Conn):
    """A TCP connection to another node's raylet (spilled leases, actors placed there).

    A connection like a lease's for the write path, so the loop buffers and
    flushes it the same way; it carries raylet replies, not task replies.
    """

    __slots__ = ("address", "node_id")

    def __init__(self, address: str, node_id: bytes, sock: socket.socket) -> None:
        super().__init__(sock)
        self.address = address
        self.node_id = node_id


class IoLoop:
    """The selector, its thread, the wake pipe, and the connections to raylets."""

    def __init__(self, lock: threading.RLock, raylet: Connection, hello: dict) -> None:
        self.lock = lock
        self.raylet = raylet
        self._hello = hello  # what we tell another node's raylet on connecting
        self.remote_raylets: dict[str, RemoteRaylet] = {}  # "host:port" -> connection
        self.raylet_out = bytearray()
        self.raylet_ids = raylet._next_id  # request ids on the raylet stream
        self.raylet_lost = False
        # A worker has no use without its raylet (which leased it out and
        # accounts for it): it exits when that connection closes, even if
        # the kernel's parent-death signal did not reach it.
        self.exit_on_raylet_loss = False
        self.closed = False
        raylet.sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(raylet.sock, selectors.EVENT_READ, "raylet")
        self._write_interest: set[Any] = set()
        self._thread: threading.Thread | None = None
        self._timeout: Callable[[], float] = lambda: 0.2
        self._on_raylet: Callable[[], None] = lambda: None
        self._on_readable: Callable[[Any], None] = lambda conn: None
        self._tick: Callable[[], None] = lambda: None

    def start(self, *, timeout: Callable[[], float], on_raylet: Callable[[], None],
              on_readable: Callable[[Any], None], tick: Callable[[], None]) -> None:
        """Start the thread: ``on_raylet``/``on_readable(conn)`` read, ``tick``
        runs after every turn, ``timeout()`` bounds the wait between turns."""
        self._timeout, self._on_raylet = timeout, on_raylet
        self._on_readable, self._tick = on_readable, tick
        self._thread = threading.Thread(target=self._run, name="shoal-io", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- thread
    def _run(self) -> None:
        while not self.closed:
            try:
                events = self.sel.select(timeout=self._timeout())
            except (OSError, ValueError):
                if self.closed:
                    return
                raise
            with self.lock:
                try:
                    self._step(events)
                except Exception:
                    # Never let the I/O thread die: every later get would hang.
                    traceback.print_exc()

    def _step(self, events: list) -> None:
        """One turn (lock held)."""
        for key, mask in events:
            target = key.data
            if target == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif target == "raylet":
                self._on_raylet()
            elif isinstance(target, Conn) and mask & selectors.EVENT_READ and not target.claimed:
                self._on_readable(target)
            if mask & selectors.EVENT_WRITE:
                self.flush_target(target)
        self._update_write_interest()
        self._tick()

    def wake(self, why: bytes = b"p") -> None:
        """Make the thread take a turn now (new timers, new write interest)."""
        try:
            os.write(self._wake_w, why)
        except BlockingIOError:
            pass

    # ------------------------------------------------------------ registration
    def register(self, conn: Conn) -> None:
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def unregister(self, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def close_conn(self, conn: Conn) -> None:
        """Stop watching ``conn`` and close its socket (lock held)."""
        self.unregister(conn.sock)
        if isinstance(conn.sock, security.TlsSocket):
            security.remember_session(conn.sock)  # the next lease there resumes it
        conn.sock.close()

    # ----------------------------------------------------------------- writes
    def write(self, conn: Conn, data: bytes) -> None:
        """Send now if the socket takes it all, else buffer for the I/O thread."""
        if conn.dead:
            return
        if len(conn.inflight) > 1 and isinstance(conn.sock, security.TlsSocket):
            # Encrypted, and calls already in flight (a burst): leave it to the
            # I/O thread (or a get that claims the socket), so the calls made
            # meanwhile go out as one TLS record rather than one SSL_write and
            # one record each. A lone call (sync) still goes out at once.
            conn.out += data
            if conn not in self._write_interest:
                self._want_write(conn)
            return
        if not conn.out:
            try:
                n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n = len(data)  # the reader will see the failure and fail the tasks
            if n == len(data):
                return
            data = data[n:]
        conn.out += data
        self._want_write(conn)

    def raylet_send(self, msg: dict) -> None:
        data = pack(msg)
        if not self.raylet_out:
            try:
                n = self.raylet.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return
            if n == len(data):
                return
            data = data[n:]
        self.raylet_out += data
        self._want_write("raylet")

    def send_to(self, raylet: RemoteRaylet | None, msg: dict) -> None:
        """Send to the raylet a lease, request or actor belongs to (ours if None)."""
        if raylet is None:
            self.raylet_send(msg)
        elif not raylet.dead:
            self.write(raylet, pack(msg))

    def remote_raylet(self, address: str, node_id: bytes) -> RemoteRaylet | None:
        """The connection to the raylet at ``address`` ("host:port"), opened on
        first use; None if it cannot be reached."""
        rr = self.remote_raylets.get(address)
        if rr is not None and not rr.dead:
            return rr
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            return None
        try:
            sock = security.connect((host, int(port)), timeout=5.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return None
        sock.setblocking(False)
        rr = self.remote_raylets[address] = RemoteRaylet(address, node_id, sock)
        self.register(rr)
        self.write(rr, pack(self._hello))
        return rr

    def drop_remote_raylet(self, rr: RemoteRaylet) -> bool:
        """Close a remote raylet's connection; False if it was closed already."""
        if rr.dead:
            return False
        rr.dead = True
        self.remote_raylets.pop(rr.address, None)
        self.close_conn(rr)
        return True

    def next_raylet_id(self) -> int:
        self.raylet_ids += 1
        return self.raylet_ids

    def _want_write(self, target: Any) -> None:
        self._write_interest.add(target)
        self.wake(b"w")

    def _update_write_interest(self) -> None:
        for target in list(self._write_interest):
            if target == "raylet":
                sock, pending = self.raylet.sock, bool(self.raylet_out)
            else:
                if target.dead:
                    self._write_interest.discard(target)
                    continue
                sock, pending = target.sock, bool(target.out)
            if pending:
                self.flush_target(target)
                pending = bool(self.raylet_out if target == "raylet" else target.out)
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
            try:
                self.sel.modify(sock, mask, target)
            except (KeyError, ValueError):
                pass
            if not pending:
                self._write_interest.discard(target)

    def flush_target(self, target: Any) -> None:
        if target == "raylet":
            buf, sock = self.raylet_out, self.raylet.sock
        elif isinstance(target, Conn) and not target.dead:
            buf, sock = target.out, target.sock
        else:
            return
        if not buf:
            return
        try:
            n = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            buf.clear()
            return
        del buf[:n]

    # ------------------------------------------------------------------ reads
    def recv(self, conn: Conn) -> tuple[list[dict] | None, str | None]:
        """Read what ``conn`` has: (whole messages, or None if it had nothing;
        why the connection failed, or None)."""
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return None, None
        except OSError as exc:
            return [], str(exc)
        if not data:
            return [], "connection closed"
        conn.decoder.feed(data)
        try:
            return conn.decoder.drain(), None
        except ProtocolError as exc:
            return [], f"protocol error: {exc}"

    def recv_raylet(self) -> tuple[list[dict], bool]:
        """Read what the raylet sent: (messages, whether the connection is lost).

        The messages decoded before a protocol error still count.
        """
        try:
            data = self.raylet.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return [], False
        except OSError:
            data = b""
        if not data:
            return [], True
        dec = self.raylet._decoder
        dec.feed(data)
        msgs = []
        while True:
            try:
                msg = dec.next()
            except ProtocolError:
                return msgs, True
            if msg is None:
                return msgs, False
            msgs.append(msg)

    def raylet_closed(self) -> None:
        """Stop watching the raylet's socket; remember it is gone."""
        self.unregister(self.raylet.sock)
        self.raylet_lost = True
        if self.exit_on_raylet_loss and not self.closed:
            os._exit(1)

    def read_directly(self, conn: Conn, timeout: float, read: Callable[[Any], None]) -> bool:
        """Wait for ``conn`` to be readable in this thread, then ``read(conn)``.

        Called with the lock held; releases it while waiting. The socket
        leaves the I/O thread's selector meanwhile, and every read still goes
        through the same decoder under the lock, so a stale event seen by the
        I/O thread cannot split the stream. False if the socket could not be
        claimed (the caller waits another way).
        """
        sock = conn.sock
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            return False
        conn.claimed = True
        lock = self.lock
        try:
            if conn.out:
                self.flush_target(conn)
            saved = lock._release_save()  # type: ignore[attr-defined]
            try:
                readable = spin.readable(sock, timeout)
            finally:
                lock._acquire_restore(saved)  # type: ignore[attr-defined]
            if readable and conn.sock is sock:
                read(conn)
        finally:
            conn.claimed = False
            if conn.sock is sock and not conn.dead:
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
                try:
                    self.sel.register(sock, mask, conn)
                except (KeyError, ValueError):
                    pass
        return True

    # --------------------------------------------------------------- shutdown
    def stop(self) -> None:
        """Ask the thread to end (lock held); :meth:`close` after joining it."""
        self.closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def close_raylet(self) -> None:
        """Send what is still buffered for the raylet (blocking), then close."""
        try:
            self.raylet.sock.setblocking(True)
            if self.raylet_out:
                self.raylet.sock.sendall(self.raylet_out)
        except OSError:
            pass
        self.raylet.close()

    def close_remote_raylets(self) -> None:
        """Send what is still buffered for remote raylets, then close (after the thread)."""
        for rr in list(self.remote_raylets.values()):
            try:
                rr.sock.setblocking(True)
                rr.sock.settimeout(1.0)
                if rr.out:
                    rr.sock.sendall(rr.out)
            except OSError:
                pass
            rr.sock.close()

    def close(self) -> None:
        self.sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def connect_worker(grant: dict, remote: bool) -> socket.socket:
    """Connect to a leased or actor worker: its Unix socket on our node, TCP on another."""
    if remote:
        host, _, port = grant["address"].rpartition(":")
        sock = security.connect((host, int(port)), timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(grant["socket"])
        except OSError:
            sock.close()
            raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    sock.setblocking(False)
    return sock
