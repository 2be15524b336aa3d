"""Client of the node's object store daemon (stored): zero-copy puts and gets.

On connect, stored passes the arena's memfd once (SCM_RIGHTS with the hello
reply); the client maps the whole arena and from then on objects are just
``(offset, size)`` pairs inside that mapping. ``create`` hands out a writable
view for the caller to fill, ``get`` returns ``pyarrow.Buffer`` objects that
point straight into the mapping, so reading an object copies nothing.

Every buffer ``get`` returns holds one pin on its object in stored (the
object cannot be evicted or deleted while it is pinned). The pin is released
when the buffer and every view of it (numpy arrays, slices) are garbage: a
finalizer queues the object id, and queued releases go out in one message
before the next request or on :meth:`StoreClient.flush_releases`. Finalizers
can run on any thread, at any moment, so they only append to a deque.

An owner does not keep its objects pinned: it *holds* them (``seal`` or
``get`` with ``hold``), which keeps them alive but lets stored spill them to
disk while nothing maps them. A :class:`StoredObject` is that hold: it maps
the object on demand (:meth:`StoredObject.view`, restoring it from disk if
it was spilled) and keeps the last view weakly, so user values made from
it keep it pinned while they live and no longer. To keep repeated gets free
of round trips, each client also keeps strong views of the objects it read
most recently, up to a quarter of the store (:data:`VIEW_CACHE_SHARE`):
that much may stay pinned by a process that is done with it.

The arena mapping is never unmapped: ``mmap.close`` raises BufferError while
numpy or Arrow views exist, and unmapping under a live view would crash the
process. Clients of the same stored in one process share one mapping.
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import threading
import weakref
from typing import Any

import pyarrow as pa

from libclient.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectStoreFullError,
    RaySystemError,
)
from libclient.protocol import Connection, ProtocolError, pack_many

# Same bound as stored's messages.MAX_OIDS: longer release batches are split.
_MAX_OIDS = 100_000
# Share of the store's capacity a client may keep pinned by cached views.
VIEW_CACHE_SHARE = 4
_FREE = 1
_UNHOLD = 2

# (st_dev, st_ino, size) of an arena memfd -> [mmap, base address]; kept for
# the life of the process (see module docstring).
_ARENAS: dict[tuple[int, int, int], tuple[mmap.mmap, int]] = {}
_ARENAS_LOCK = threading.Lock()


class StoreError(Exception):
    """stored refused a request (for example ``exists`` or ``not_found``).

    Attributes:
        code: stored's error code string.
    """

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code


class _Pin:
    """Base object of a buffer from ``get``; queues the pin's release when collected."""

    __slots__ = ("oid", "queue", "__weakref__")

    def __init__(self, oid: bytes, queue: collections.deque[bytes]) -> None:
        self.oid = oid
        self.queue = queue

    def __del__(self) -> None:
        self.queue.append(self.oid)  # deque.append is atomic; safe from any thread


class StoredObject:
    """A hold on an object in stored: it stays alive (in memory or spilled)
    until this handle is collected, and is mapped when read.

    Attributes:
        oid: the object id.
        size: its size in bytes.
    """

    __slots__ = ("oid", "size", "_client", "_view", "_weak", "_handoff", "__weakref__")

    def __init__(self, client: StoreClient, oid: bytes, size: int,
                 view: pa.Buffer | None, handoff: bool = False) -> None:
        self.oid = oid
        self.size = size
        self._client = client
        self._handoff = handoff  # the hold passes to the owner in stored: never unhold
        self._view: pa.Buffer | None = None  # strong, while in the client's view cache
        self._weak: weakref.ref[pa.Buffer] | None = None
        if view is not None:
            client._remember(self, view)

    def view(self) -> pa.Buffer:
        """A pinned, zero-copy view of the bytes (restored from disk if spilled).

        Raises:
            ObjectLostError: stored no longer has the object.
        """
        view = self._view
        if view is not None:
            return view
        if self._weak is not None:
            view = self._weak()
            if view is not None:
                self._client._remember(self, view)
                return view
        (view,) = self._client.get([self.oid], timeout=0)
        if view is None:
            raise ObjectLostError(f"object {self.oid.hex()} is no longer in the object store")
        self._client._remember(self, view)
        return view

    def __del__(self) -> None:
        if not self._handoff:
            self._client._releases.append((self.oid, _UNHOLD))  # atomic; safe from any thread


def _map_arena(fd: int, size: int) -> tuple[mmap.mmap, int]:
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, size)
    with _ARENAS_LOCK:
        found = _ARENAS.get(key)
        if found is None:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            found = (mm, pa.py_buffer(mm).address)
            _ARENAS[key] = found
        return found


class StoreLostError(RaySystemError, ConnectionError):
    """The connection to this node's stored broke: it died or was restarted,
    and every object it held is gone. (A ConnectionError too, for callers
    that already handle a closed store.)"""


class StoreClient:
    """A connection to stored. Thread-safe: one lock serialises requests.

    A ``get`` that waits holds the lock, so threads that must not block behind
    it should use their own client.

    Args:
        socket_path: stored's Unix socket.
        name: shown in stored's logs.
        connect_timeout: seconds to wait for the connection itself.

    Raises:
        OSError: stored is not listening at ``socket_path``.
        ProtocolError: the peer is not stored.
    """

    def __init__(self, socket_path: str, name: str = "client",
                 connect_timeout: float = 10.0) -> None:
        self._lock = threading.RLock()
        # oid to release, or (oid, _FREE | _UNHOLD)
        self._releases: collections.deque[bytes | tuple[bytes, int]] = collections.deque()
        self._hot: collections.OrderedDict[bytes, tuple[weakref.ref[StoredObject], int]] = \
            collections.OrderedDict()
        self._hot_bytes = 0
        self._hot_lock = threading.Lock()
        self._closed = False
        self._lost = False  # the connection broke under us: stored died or restarted
        self.socket_path = socket_path
        self._pid = os.getpid()
        self._conn = Connection.connect_unix(socket_path, timeout=connect_timeout)
        try:
            rid = self._conn.new_id()
            self._conn.send({"t": "hello", "r": rid, "pid": self._pid, "name": name})
            reply, fds = self._conn.recv_with_fds(maxfds=1)
            try:
                if reply.get("r") != rid or not reply.get("ok") or len(fds) != 1:
                    raise ProtocolError(f"bad hello reply from {socket_path}: {reply}")
                self.capacity: int = int(reply["capacity"])
                self.arena_size: int = int(reply["arena_size"])
                self._mmap, self._base = _map_arena(fds[0], self.arena_size)
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            self._conn.close()
            raise
        self._view = memoryview(self._mmap)
        self._hot_limit = self.capacity // VIEW_CACHE_SHARE

    @property
    def arena_address(self) -> int:
        """Address of the arena mapping in this process (every object lies inside it)."""
        return self._base

    # ------------------------------------------------------------ writing
    def create(self, oid: bytes, size: int) -> memoryview:
        """Reserve an unsealed object and return a writable view of its bytes.

        The object stays invisible to ``get`` until :meth:`seal`; this client
        holds a pin on it until it calls :meth:`release` (or disconnects).
        When the store is full of held objects, the reply waits while stored
        spills some of them to disk.

        Raises:
            ObjectStoreFullError: no room even after evicting unpinned objects
                and spilling held ones (or spilling is off).
            StoreError: ``exists`` if ``oid`` is already in the store.
        """
        off = self._create(oid, size)
        return self._view[off:off + size]

    def _create(self, oid: bytes, size: int) -> int:
        offset = self._call({"t": "create", "oid": oid, "size": size})["offset"]
        if offset < 0 or offset + size > self.arena_size:
            raise ProtocolError(f"stored returned offset {offset} outside the arena")
        return offset

    def seal(self, oid: bytes) -> None:
        """Make a created object immutable and visible; wakes waiting gets."""
        self._call({"t": "seal", "oid": oid})

    def write(self, oid: bytes, size: int, fill: Any, handoff: bool = False) -> StoredObject:
        """Create, ``fill(view)``, seal, and hold an object: an owner's write.

        Returns the hold, with a pinned view of the bytes already cached
        (the creation pin becomes that view's pin: no extra round trip).
        ``handoff``: a worker writing a task's return for its owner; stored
        drops this hold when the owner takes its own (:meth:`hold`).
        """
        off = self._create(oid, size)
        view = self._view[off:off + size]
        try:
            fill(view)
        except BaseException:
            view.release()
            self.abort(oid)
            raise
        view.release()
        self._call({"t": "seal", "oid": oid, "handoff" if handoff else "hold": True})
        buf = pa.foreign_buffer(self._base + off, size, base=_Pin(oid, self._releases))
        return StoredObject(self, oid, size, buf, handoff)

    def hold(self, oid: bytes) -> StoredObject | None:
        """Hold a sealed object (a task return its owner now keeps); None if absent."""
        (buf,) = self.get([oid], timeout=0, hold=True)
        return None if buf is None else StoredObject(self, oid, buf.size, buf)

    def abort(self, oid: bytes) -> None:
        """Free an object this client created but has not sealed."""
        self._call({"t": "abort", "oid": oid})

    def put(self, oid: bytes, data: Any) -> None:
        """Store ``data`` (any contiguous buffer) as a sealed object, unpinned.

        The object stays cached until deleted or evicted; use ``create``/``seal``
        directly to keep it pinned.
        """
        src = memoryview(data).cast("B")
        view = self.create(oid, src.nbytes)
        try:
            view[:] = src
        except BaseException:
            view.release()
            self.abort(oid)
            raise
        view.release()
        self.seal(oid)
        self._releases.append(oid)  # the creation pin; goes out with the next request

    # ------------------------------------------------------------ reading
    def get(self, oids: list[bytes], timeout: float | None = None,
            hold: bool = False) -> list[pa.Buffer | None]:
        """Return zero-copy buffers of sealed objects, waiting up to ``timeout`` seconds.

        Args:
            oids: object ids.
            timeout: None waits for every object; 0 does not wait for objects
                that are not there (spilled ones are restored first).
            hold: also take a hold on each object returned (see :meth:`hold`).

        Returns:
            One pinned, read-only buffer per id, or None where the object was
            not sealed in time.

        Raises:
            ConnectionError: stored went away.
        """
        timeout_ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        msg = {"t": "get", "oids": list(oids), "timeout_ms": timeout_ms}
        if hold:
            msg["hold"] = True
        reply = self._call(msg)
        out: list[pa.Buffer | None] = []
        objs = reply["objs"]
        for oid, obj in zip(oids, objs, strict=True):
            if obj is None:
                out.append(None)
                continue
            off, size = obj
            if off < 0 or size < 0 or off + size > self.arena_size:
                raise ProtocolError(f"stored returned range {obj} outside the arena")
            out.append(pa.foreign_buffer(self._base + off, size,
                                         base=_Pin(oid, self._releases)))
        return out

    def pull(self, oid: bytes, sources: list[str], timeout: float | None = None) -> int:
        """Have stored copy ``oid`` here from other nodes' stores; return its size.

        stored fetches it over TCP from the first of ``sources`` (transfer
        addresses, ``"host:port"``, best first) that has it, moving to the
        next if one fails, and answers once the copy is sealed here (at once
        if it already is). Requests for the same object share one transfer.
        The copy is not pinned: ``get`` it to read it, and LRU may evict it
        once nobody holds it. Holds this client's lock while waiting.

        Args:
            timeout: seconds to wait; None waits as long as sources make progress.

        Raises:
            ObjectLostError: no source had the object, or every source failed.
            ObjectStoreFullError: the object is bigger than this store.
            GetTimeoutError: ``timeout`` passed first (the pull is cancelled if
                nobody else waits for it).
            StoreError: ``bad_request`` (a malformed source address, ...).
        """
        msg: dict[str, Any] = {"t": "pull", "oid": oid, "sources": list(sources)}
        if timeout is not None:
            msg["timeout"] = max(0.0, float(timeout))
        try:
            return int(self._call(msg)["size"])
        except StoreError as exc:
            if exc.code == "lost":
                raise ObjectLostError(str(exc)) from None
            if exc.code == "timeout":
                raise GetTimeoutError(str(exc)) from None
            raise

    def release(self, oids: list[bytes]) -> None:
        """Drop one pin per id (the creation pin, typically); sent with the next request."""
        self._releases.extend(oids)

    def free(self, oids: list[bytes]) -> None:
        """Delete these objects if unpinned (one-way, queued after pending releases)."""
        self._releases.extend((oid, _FREE) for oid in oids)

    def _remember(self, obj: StoredObject, view: pa.Buffer) -> None:
        """Keep ``view`` as ``obj``'s last view: strongly while it is among the
        most recently read (the view cache), weakly after that."""
        obj._weak = weakref.ref(view)
        size = obj.size
        if size > self._hot_limit:
            return
        obj._view = view
        with self._hot_lock:
            hot = self._hot
            old = hot.pop(obj.oid, None)
            if old is not None:
                self._hot_bytes -= old[1]
            hot[obj.oid] = (weakref.ref(obj), size)
            self._hot_bytes += size
            while self._hot_bytes > self._hot_limit:
                _, (ref, nbytes) = hot.popitem(last=False)
                self._hot_bytes -= nbytes
                victim = ref()
                if victim is not None:
                    victim._view = None

    def flush_releases(self) -> None:
        """Send queued releases now (buffers collected since the last request)."""
        with self._lock:
            if self._closed or not self._releases:
                return
            try:
                self._conn.sock.sendall(pack_many(self._take_releases()))
            except BaseException:
                self._closed = True  # a partial frame went out: the stream is unusable
                self._conn.close()
                raise

    def contains(self, oids: list[bytes]) -> list[bool]:
        """Which of ``oids`` are sealed in the store."""
        return list(self._call({"t": "contains", "oids": list(oids)})["present"])

    def delete(self, oids: list[bytes]) -> int:
        """Free the unpinned objects among ``oids``; return how many were freed."""
        return int(self._call({"t": "delete", "oids": list(oids)})["deleted"])

    def stats(self) -> dict[str, int]:
        """capacity, used, pinned_bytes, num_objects, num_evictions."""
        reply = self._call({"t": "stats"})
        return {k: v for k, v in reply.items() if k not in ("t", "r", "ok")}

    def close(self) -> None:
        """Send queued releases and disconnect; stored drops this client's pins.

        The arena stays mapped (buffers from ``get`` keep working until the
        process exits, but they are no longer pinned).
        """
        with self._lock:
            if self._closed:
                return
            try:
                self.flush_releases()
            except OSError:
                pass
            self._closed = True
            self._conn.close()
            self._releases.clear()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _take_releases(self) -> list[dict[str, Any]]:
        # The deque holds oids to release and (oid, _FREE | _UNHOLD) pairs,
        # in order; runs of each kind become one message, so a free follows
        # the releases and unholds queued before it.
        frames: list[dict[str, Any]] = []
        kind, oids = "", []
        try:
            while True:
                item = self._releases.popleft()
                if type(item) is tuple:
                    this = "free" if item[1] == _FREE else "unhold"
                    item = item[0]
                else:
                    this = "release"
                if this != kind or len(oids) >= _MAX_OIDS:
                    if oids:
                        frames.append({"t": kind, "oids": oids})
                    kind, oids = this, []
                oids.append(item)
        except IndexError:
            pass
        if oids:
            frames.append({"t": kind, "oids": oids})
        return frames

    def _lost_message(self) -> str:
        return (f"lost the connection to this node's object store (stored at "
                f"{self.socket_path}): it died or was restarted, and the objects it "
                f"held are gone")

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                if self._lost:
                    raise StoreLostError(self._lost_message())
                raise ConnectionError("store client is closed")
            if os.getpid() != self._pid:
                raise RuntimeError("a StoreClient cannot be used across fork; connect anew")
            rid = self._conn.new_id()
            msg["r"] = rid
            frames = self._take_releases() if self._releases else []
            frames.append(msg)
            try:
                self._conn.sock.sendall(pack_many(frames))
                reply = self._conn.recv()
            except BaseException as exc:
                # Half a request or reply (EOF, Ctrl-C): the stream is in an
                # unknown state and no later request could trust it.
                self._closed = True
                self._conn.close()
                if isinstance(exc, OSError):  # ConnectionError too: stored is gone
                    self._lost = True
                    raise StoreLostError(self._lost_message()) from exc
                raise
            if reply.get("r") != rid:
                self._closed = True
                self._conn.close()
                raise ProtocolError(f"stored reply {reply.get('r')} does not match {rid}")
        if not reply.get("ok"):
            code = str(reply.get("error"))
            text = str(reply.get("msg", ""))
            if code == "full":
                raise ObjectStoreFullError(text)
            raise StoreError(code, text)
        return reply
