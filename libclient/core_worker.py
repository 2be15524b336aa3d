"""The core worker: what every driver and worker process runs inside libclient.

Theory of operation
-------------------
*Ownership.* The process that creates an ObjectRef (by ``put`` or by
submitting a task) owns it. Owned objects live in this process's memory
store (``_owned``): small values inline, large ones as a pinned, zero-copy
view of the node's shared-memory store. An ObjectRef that leaves the process
inside another value "escapes"; the owner then copies the value into stored
(``_promote``), where any process on the node can read it. Borrowers (processes
holding refs they do not own) read from stored, and give up with
ObjectLostError if the owner process dies first.

*Leases.* Tasks with the same resource demand share a scheduling class. For
each class the submitter asks the raylet for worker leases, connects straight
to each leased worker's socket, and pushes task messages to it; results come
straight back on that socket. The raylet schedules leases, never individual
tasks (Ray 2's design). A lease idle for ``_LEASE_IDLE_S`` goes back.

*Threads.* The user's thread calls submit/get/put/wait. One I/O thread reads
replies from leased workers and the raylet and fires timers. All state is
guarded by one lock; sockets are non-blocking, writes go out immediately when
the socket takes them and otherwise through the I/O thread.

*Dependencies.* Top-level ObjectRef arguments are resolved here, before a
task is pushed: an owned small value is inlined into the task message, a
stored or borrowed one is passed by id and the worker reads it from stored.
"""

from __future__ import annotations

import collections
import hashlib
import os
import selectors
import socket
import threading
import time
import traceback
from typing import Any

from libclient import object_ref, serialization, spin
from libclient.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectStoreFullError,
    OwnerDiedError,
    RaySystemError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from libclient.object_ref import ObjectRef
from libclient.protocol import Connection, FrameDecoder, ProtocolError, pack

_LEASE_IDLE_S = 0.005
_MAX_LEASE_REQUESTS = 16
_TARGET_PIPELINE_S = 0.002
_MAX_DEPTH = 16
_EVENT_FLUSH_S = 0.2
_SOCK_BUF = 4 * 1024 * 1024
_CANCEL_RESEND_S = 0.2

PENDING = 0
READY = 1


class _Entry:
    """An owned object: pending until its task replies, then inline or stored."""

    __slots__ = ("state", "wire", "buf", "escaped", "waiters", "count", "loc")

    def __init__(self) -> None:
        self.state = PENDING
        self.wire: list[Any] | None = None  # [kind, meta, [bufs]] when inline
        self.buf: Any = None  # pinned pyarrow Buffer when in stored
        self.loc = ""  # another node's store that holds it (a remote task's big return)
        self.escaped = False
        self.waiters: list[_Task] | None = None
        self.count = 0


class _Task:
    __slots__ = ("tid", "key", "demand", "msg", "deps", "unresolved", "return_ids",
                 "retries_left", "lease", "cancelled", "name", "args_hold",
                 "event")

    def __init__(self, tid: bytes, key: tuple, demand: dict, msg: dict, deps: list,
                 return_ids: list[bytes], retries: int, name: str, args_hold: Any) -> None:
        self.tid = tid
        self.key = key
        self.demand = demand
        self.msg = msg
        self.deps = deps  # [(slot, ObjectRef)]
        self.unresolved = 0
        self.return_ids = return_ids
        self.retries_left = retries
        self.lease: _Lease | None = None
        self.cancelled = False
        self.name = name
        self.args_hold = args_hold  # keeps arg refs alive until the task ends
        self.event: dict = {}  # the task's row in gcsd's tasks table, less its state


class _Lease:
    __slots__ = ("lease_id", "worker_id", "pid", "sock", "decoder", "out", "inflight",
                 "key", "gpus", "idle_since", "dead", "claimed", "raylet")

    def __init__(self, lease_id: int, worker_id: bytes, pid: int, sock: socket.socket,
                 key: tuple, gpus: list[int], raylet: _RemoteRaylet | None = None) -> None:
        self.raylet = raylet  # the raylet that granted it, if not ours
        self.lease_id = lease_id
        self.worker_id = worker_id
        self.pid = pid
        self.sock = sock
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.inflight: dict[bytes, _Task] = {}
        self.key = key
        self.gpus = gpus
        self.idle_since = time.monotonic()
        self.dead = False
        self.claimed = False  # a waiting user thread reads this socket itself


class _RemoteRaylet:
    """A TCP connection to another node's raylet, for leases it was spilled to.

    Quacks like a lease for the write path (``sock``, ``out``, ``dead``), so
    the I/O loop buffers and flushes it the same way.
    """

    __slots__ = ("address", "node_id", "sock", "decoder", "out", "dead", "claimed")

    def __init__(self, address: str, node_id: bytes, sock: socket.socket) -> None:
        self.address = address
        self.node_id = node_id
        self.sock = sock
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.dead = False
        self.claimed = False


class _Class:
    """Tasks of one scheduling class, and the leases that serve them."""

    __slots__ = ("demand", "queue", "leases", "requests", "task_time", "strategy")

    def __init__(self, demand: dict, strategy: Any = None) -> None:
        self.demand = demand
        self.strategy = strategy  # wire form (scheduling_strategies.to_wire), None: DEFAULT
        self.queue: collections.deque[_Task] = collections.deque()
        self.leases: list[_Lease] = []
        self.requests: set[int] = set()
        self.task_time = 0.01  # EWMA of execution seconds; starts pessimistic

    def depth(self) -> int:
        # Pipeline several tasks per worker only when tasks are short, so a
        # long task never hides more than ~2 ms of others behind it.
        return max(1, min(_MAX_DEPTH, int(_TARGET_PIPELINE_S / max(self.task_time, 1e-6))))


class _Actor:
    """A caller's view of one actor: its connection and the calls it owes.

    Calls queue here in submission order and go out strictly in that order,
    each once its arguments are ready, so one caller's calls run in order.
    """

    __slots__ = ("actor_id", "state", "sock", "decoder", "out", "inflight", "queue", "dead",
                 "pid", "socket_path", "lost_pid", "dead_wire", "create_task", "next_poll",
                 "key", "claimed", "handles", "scoped", "escaped", "released",
                 "node_id", "address", "raylet", "create_msg")

    def __init__(self, actor_id: bytes) -> None:
        self.actor_id = actor_id
        self.key = ("actor", actor_id)
        self.state = "UNKNOWN"
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.inflight: dict[bytes, _Task] = {}
        self.queue: collections.deque[_Task] = collections.deque()
        self.dead = False  # the current connection is closed (for the writer)
        self.pid = 0
        self.socket_path = ""
        self.lost_pid = 0  # a connection to this incarnation broke: wait for a new one
        self.dead_wire: list | None = None
        self.create_task: _Task | None = None
        self.next_poll = 0.0
        self.claimed = False
        self.handles = 0  # live ActorHandle objects in this process
        self.scoped = False  # created here, unnamed, not detached: dies with its handles
        self.escaped = False  # a handle was pickled: others may call it
        self.released = False
        self.node_id = b""  # the node it runs on; callers elsewhere use TCP
        self.address = ""  # its worker's "host:port"
        self.raylet: _RemoteRaylet | None = None  # the raylet managing it, if not ours
        self.create_msg: dict | None = None  # kept until placed (it may be spilled)


class CoreWorker:
    """Per-process runtime: object ownership, task submission, get/put/wait."""

    def __init__(self, raylet_socket: str, *, kind: str, job_id: int = 0,
                 worker_id: bytes | None = None) -> None:
        self.kind = kind
        self.pid = os.getpid()
        self.worker_id = worker_id or os.urandom(8)
        self.raylet_socket = raylet_socket
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._owned: dict[bytes, _Entry] = {}
        self._classes: dict[tuple, _Class] = {}
        self._tasks: dict[bytes, _Task] = {}  # submitted, not finished
        self._lease_reqs: dict[int, tuple] = {}  # raylet request id -> class key
        self._rpc: dict[int, list] = {}  # raylet request id -> [reply or None]
        self._events: dict[bytes, dict] = {}  # task id -> latest state, for gcsd
        self._object_events: dict[bytes, dict] = {}  # object id -> location, for gcsd
        self._exported: set[bytes] = set()
        self._fn_cache: dict[bytes, Any] = {}
        self._closed = False
        self._raylet_lost = False
        self.current_task_id: bytes | None = None
        self.current_gpus: list[int] = []
        self.current_actor_id: bytes | None = None
        self._actors: dict[bytes, _Actor] = {}
        self._actor_creates: dict[int, _Actor] = {}  # raylet request id -> actor
        self._actor_sub: Any = None  # gcsd subscription to the actors table
        self.job_id = job_id
        self._blocked_depth = 0
        self._cancelling: dict[bytes, tuple[_Task, float]] = {}  # tid -> (task, next SIGINT)
        self._strategies: dict[tuple, Any] = {}  # class key -> strategy, until it is made
        self._remote_raylets: dict[str, _RemoteRaylet] = {}  # "host:port" -> connection
        self._lease_at: dict[int, _RemoteRaylet] = {}  # request id -> raylet it went to

        conn = Connection.connect_unix(raylet_socket)
        hello = {"t": "hello", "kind": kind, "pid": self.pid, "worker_id": self.worker_id}
        reply = conn.call(hello)
        if not reply.get("ok"):
            raise RaySystemError(f"raylet refused hello: {reply.get('error')}")
        self.node_id: bytes = reply["node_id"]
        self.gcs_address: str = reply["gcs_address"]
        self.store_socket: str = reply["store_socket"]
        self.node_resources: dict = reply["resources"]
        self.store_address: str = reply.get("store_address", "")  # for other nodes' pulls
        self.node_gpus: list = reply.get("gpus", [])
        self._raylet = conn
        self._raylet_ids = conn._next_id
        conn.sock.setblocking(False)
        self._raylet_out = bytearray()

        from libclient.gcs_client import GcsClient
        from libclient.store_client import StoreClient

        self.gcs = GcsClient(self.gcs_address, timeout=10.0)
        self.store = StoreClient(self.store_socket, name=f"{kind}-{self.pid}")
        self._store_wait: Any = None  # second connection for long blocking waits
        if kind == "driver" and not job_id:
            self.job_id = self.gcs.next_job_id()

        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel.register(conn.sock, selectors.EVENT_READ, "raylet")
        self._write_interest: set[Any] = set()

        object_ref._incref = self._incref
        self._io = threading.Thread(target=self._io_loop, name="shoal-io", daemon=True)
        self._io.start()

    # ------------------------------------------------------------------ refs
    def _incref(self, oid: bytes) -> None:
        entry = self._owned.get(oid)
        if entry is not None:
            entry.count += 1

    def _drain_released(self) -> None:
        """Apply ObjectRef.__del__ decrements (called with the lock held)."""
        if self._actors:
            self._drain_released_handles()
        released = object_ref._released
        owned = self._owned
        while released:
            try:
                oid = released.popleft()
            except IndexError:
                return
            entry = owned.get(oid)
            if entry is None:
                continue
            entry.count -= 1
            if entry.count <= 0 and not (entry.state == PENDING and (entry.escaped or entry.waiters)):
                if entry.state == READY or oid[:16] not in self._tasks:
                    self._drop(oid, entry)

    def _drop(self, oid: bytes, entry: _Entry) -> None:
        """Forget an owned object nobody here references any more.

        A stored copy that never left this process is freed at once, so its
        (already faulted-in) memory is reused by the next large put; an
        escaped one may have borrowers, so it stays cached until evicted.
        """
        del self._owned[oid]
        if entry.buf is not None:
            entry.buf = None
            if not entry.escaped:
                self.store.free([oid])
                self._object_events[oid] = {"node_id": self.node_id, "state": "FREED"}

    def _new_owned(self, oid: bytes) -> ObjectRef:
        entry = _Entry()
        self._owned[oid] = entry
        return ObjectRef(oid, self.pid, self.store_address)

    # ------------------------------------------------------------------- put
    def put(self, value: Any) -> ObjectRef:
        ser = serialization.serialize(value)
        oid = os.urandom(16) + b"\xff\xff\xff\xff"
        with self._lock:
            self._drain_released()
            ref = self._new_owned(oid)
            entry = self._owned[oid]
            if ser.refs:
                self._escape(ser.refs)
        if ser.inline:
            entry.wire = ser.to_wire()
        else:
            entry.buf = self._write_store(oid, ser)
        with self._lock:
            entry.state = READY
        return ref

    def _write_store(self, oid: bytes, ser: serialization.Serialized) -> Any:
        """Copy a serialized value into stored; return a pinned view of it."""
        size = ser.store_size()
        view = self.store.create(oid, size)
        try:
            ser.write_into(view)
        except BaseException:
            self.store.abort(oid)
            raise
        finally:
            del view
        self.store.seal(oid)
        with self._lock:
            self._object_events[oid] = {"node_id": self.node_id, "size": size,
                                        "state": "IN_STORE", "owner_pid": self.pid}
        (buf,) = self.store.get([oid], timeout=0)
        self.store.release([oid])  # the creation pin; `buf` holds its own
        return buf

    def _promote(self, oid: bytes, entry: _Entry) -> None:
        """Make an owned object readable by other processes (copy it to stored)."""
        if entry.buf is None and entry.loc:
            # Borrowers look for it on the owner's node: bring it here first.
            # (Blocks this thread for the transfer; a later issue makes it async.)
            entry.buf = self._fetch(oid, entry.loc, None)
            return
        if entry.buf is not None or entry.wire is None:
            return
        kind, meta, bufs = entry.wire
        ser = serialization.Serialized(kind, meta, bufs, [])
        try:
            entry.buf = self._write_store(oid, ser)
        except ObjectStoreFullError:
            raise
        except Exception as exc:
            if "exists" not in str(exc):
                raise

    def _escape(self, refs: list[ObjectRef]) -> None:
        for ref in refs:
            entry = self._owned.get(ref._id)
            if entry is None:
                continue  # borrowed: already in stored
            entry.escaped = True
            if entry.state == READY:
                self._promote(ref._id, entry)

    # ------------------------------------------------------------------- get
    def get(self, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        with self._lock:
            self._drain_released()
            for ref in refs:
                if not isinstance(ref, ObjectRef):
                    raise TypeError(f"get() expects ObjectRefs, got {type(ref).__name__}")
                entry = self._owned.get(ref._id)
                if entry is None:
                    out.append(None)
                    continue
                if entry.state != READY:
                    self._wait_entry(entry, deadline, ref._id)
                out.append(entry)
        values = []
        for ref, entry in zip(refs, out, strict=False):
            if entry is None:
                kind, value = self._get_borrowed(ref, deadline)
            elif entry.buf is None and entry.loc:
                entry.buf = self._fetch(ref._id, entry.loc, deadline)
                kind, value = serialization.deserialize_buffer(entry.buf)
            elif entry.buf is not None:
                kind, value = serialization.deserialize_buffer(entry.buf)
            else:
                kind, value = serialization.deserialize_wire(entry.wire)
            if kind == serialization.KIND_ERROR:
                if isinstance(value, RayTaskError):
                    raise value.as_instanceof_cause()
                raise value
            values.append(value)
        return values

    def _reply_conn(self, oid: bytes | None) -> _Lease | _Actor | None:
        """The connection the reply for ``oid`` will arrive on, if it is in flight."""
        if oid is None:
            return None
        task = self._tasks.get(oid[:16])
        conn = task.lease if task is not None else None
        if conn is None or conn.dead or conn.sock is None or conn.claimed:
            return None
        return conn

    def _read_directly(self, conn: _Lease | _Actor, timeout: float) -> None:
        """Wait for a reply by reading its socket in this thread (lock held on entry).

        Handing each reply from the I/O thread to the waiting thread costs a
        thread wake-up per call; a synchronous get reads the socket itself.
        The socket leaves the I/O thread's selector meanwhile, and every read
        still goes through the same decoder under the lock, so a stale event
        seen by the I/O thread cannot split the stream.
        """
        sock = conn.sock
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            self._cv.wait(timeout)
            return
        conn.claimed = True
        try:
            if conn.out:
                self._flush_target(conn)
            saved = self._lock._release_save()  # type: ignore[attr-defined]
            try:
                readable = spin.readable(sock, timeout)
            finally:
                self._lock._acquire_restore(saved)  # type: ignore[attr-defined]
            if readable and conn.sock is sock:
                self._read_lease(conn)  # type: ignore[arg-type]
        finally:
            conn.claimed = False
            if conn.sock is sock and not conn.dead:
                mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
                try:
                    self._sel.register(sock, mask, conn)
                except (KeyError, ValueError):
                    pass

    def _wait_entry(self, entry: _Entry, deadline: float | None, oid: bytes | None = None) -> None:
        self._set_blocked(True)
        try:
            while entry.state != READY:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise GetTimeoutError("get timed out")
                conn = self._reply_conn(oid)
                if conn is not None:
                    self._read_directly(conn, 0.05 if remaining is None else min(remaining, 0.05))
                else:
                    self._cv.wait(remaining if remaining is not None else 1.0)
                if self._closed:
                    raise RaySystemError("libclient was shut down")
        finally:
            self._set_blocked(False)

    def fetch_to_node(self, oid: bytes, source: str, deadline: float | None = None) -> None:
        """Bring an object held by another node's store (``source``) into ours."""
        if not source or source == self.store_address:
            return
        if self.store.contains([oid])[0]:
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._set_blocked(True)
        try:
            self._pull_client().pull(oid, [source], timeout)
        finally:
            self._set_blocked(False)

    def _fetch(self, oid: bytes, source: str, deadline: float | None) -> Any:
        """Pull a remote copy here and pin it; the owner reads it like a local one."""
        self.fetch_to_node(oid, source, deadline)
        (buf,) = self.store.get([oid], timeout=0)
        if buf is None:
            raise ObjectLostError(f"object {oid.hex()} was evicted right after it was pulled")
        return buf

    def _pull_client(self) -> Any:
        # Pulls wait for a transfer; keep them off the store connection that
        # gets, puts and releases use.
        if self._store_wait is None:
            from libclient.store_client import StoreClient

            self._store_wait = StoreClient(self.store_socket, name=f"wait-{self.pid}")
        return self._store_wait

    def _get_borrowed(self, ref: ObjectRef, deadline: float | None) -> tuple[int, Any]:
        """Read an object someone else owns from stored, waiting for it to appear."""
        (buf,) = self.store.get([ref._id], timeout=0)
        if buf is None and ref.owner_addr and ref.owner_addr != self.store_address:
            self._pull_from_owner(ref, deadline)
            (buf,) = self.store.get([ref._id], timeout=0)
        if buf is None:
            buf = self._wait_store(ref, deadline)
        return serialization.deserialize_buffer(buf)

    def _pull_from_owner(self, ref: ObjectRef, deadline: float | None) -> None:
        """Pull a borrowed object from its owner's node, waiting until the owner
        has stored it; give up when gcsd says that node died."""
        next_check = time.monotonic() + 2.0
        while True:
            try:
                step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if step <= 0:
                    raise GetTimeoutError(f"get of {ref.hex()} timed out")
                self.fetch_to_node(ref._id, ref.owner_addr, time.monotonic() + step)
                return
            except (ObjectLostError, GetTimeoutError):
                if deadline is not None and time.monotonic() >= deadline:
                    raise GetTimeoutError(f"get of {ref.hex()} timed out") from None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 2.0
                if not self._store_address_alive(ref.owner_addr):
                    raise OwnerDiedError(f"object {ref.hex()} was lost: its owner's node "
                                         f"({ref.owner_addr}) died")
            time.sleep(0.05)

    def _store_address_alive(self, address: str) -> bool:
        try:
            nodes = self.gcs.get_nodes()
        except Exception:
            return True  # cannot tell: keep waiting
        return any(n.get("store_address") == address and n.get("state") == "ALIVE"
                   for n in nodes)

    def _wait_store(self, ref: ObjectRef, deadline: float | None) -> Any:
        if self._store_wait is None:
            from libclient.store_client import StoreClient

            self._store_wait = StoreClient(self.store_socket, name=f"wait-{self.pid}")
        self._set_blocked(True)
        try:
            while True:
                step = 0.2
                if deadline is not None:
                    step = min(step, deadline - time.monotonic())
                    if step <= 0:
                        raise GetTimeoutError(f"get of {ref.hex()} timed out")
                (buf,) = self._store_wait.get([ref._id], timeout=step)
                if buf is not None:
                    return buf
                local_owner = not ref.owner_addr or ref.owner_addr == self.store_address
                if ref.owner_pid and local_owner and not _pid_alive(ref.owner_pid):
                    (buf,) = self._store_wait.get([ref._id], timeout=0)
                    if buf is not None:
                        return buf
                    raise OwnerDiedError(
                        f"object {ref.hex()} was lost: its owner (pid {ref.owner_pid}) exited "
                        "before the object was stored")
        finally:
            self._set_blocked(False)

    def _set_blocked(self, blocked: bool) -> None:
        """Tell the raylet this worker's task waits, so it lends the CPU out."""
        if self.kind != "worker" or self.current_task_id is None:
            return
        with self._lock:
            if blocked:
                self._blocked_depth += 1
                if self._blocked_depth == 1:
                    self._raylet_send({"t": "blocked"})
            else:
                self._blocked_depth -= 1
                if self._blocked_depth == 0:
                    self._raylet_send({"t": "unblocked"})

    # ------------------------------------------------------------------ wait
    def wait(self, refs: list[ObjectRef], num_returns: int, timeout: float | None
             ) -> tuple[list[ObjectRef], list[ObjectRef]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._drain_released()
                ready_flags = []
                borrowed = []
                for i, ref in enumerate(refs):
                    entry = self._owned.get(ref._id)
                    if entry is None:
                        ready_flags.append(False)
                        borrowed.append(i)
                    else:
                        ready_flags.append(entry.state == READY)
            if borrowed:
                present = self.store.contains([refs[i]._id for i in borrowed])
                for i, p in zip(borrowed, present, strict=False):
                    ready_flags[i] = p
            if sum(ready_flags) >= num_returns:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            with self._lock:
                step = 0.01 if borrowed else 1.0
                self._cv.wait(step if remaining is None else min(step, remaining))
        ready, not_ready = [], []
        for ref, flag in zip(refs, ready_flags, strict=False):
            if flag and len(ready) < num_returns:
                ready.append(ref)
            else:
                not_ready.append(ref)
        return ready, not_ready

    # ---------------------------------------------------------------- submit
    def export_function(self, pickled: bytes, name: str) -> bytes:
        key = hashlib.sha1(pickled).digest()[:16]
        if key not in self._exported:
            self.gcs.table_put("functions", key, {"name": name, "pickled": pickled,
                                                  "job": self.job_id})
            self._exported.add(key)
        return key

    def fetch_function(self, key: bytes) -> Any:
        fn = self._fn_cache.get(key)
        if fn is None:
            record = self.gcs.table_get("functions", key)
            if record is None:
                raise RaySystemError(f"function {key.hex()} is not in the control store")
            import pickle

            fn = pickle.loads(record["pickled"])
            self._fn_cache[key] = fn
        return fn

    def submit(self, fn_key: bytes, name: str, args: tuple, kwargs: dict, *,
               num_returns: int, demand: dict, max_retries: int, retry_exceptions: Any,
               strategy: Any = None) -> list[ObjectRef]:
        # Tasks share leases only with tasks of the same demand and strategy.
        key = None if strategy is None else ("task", *sorted(demand.items()),
                                             ("strategy", _strategy_key(strategy)))
        return self._build_call(fn_key, name, args, kwargs, num_returns=num_returns,
                                demand=demand, max_retries=max_retries,
                                retry_exceptions=retry_exceptions, key=key, spec=None,
                                strategy=strategy)

    def _build_call(self, fn_key: bytes, name: str, args: tuple, kwargs: dict, *,
                    num_returns: int, demand: dict, max_retries: int, retry_exceptions: Any,
                    key: tuple | None, spec: dict | None, strategy: Any = None
                    ) -> list[ObjectRef]:
        """Make a task, actor call or actor creation; queue it; return its refs."""
        tid = os.urandom(16)
        deps = []
        if any(type(a) is ObjectRef for a in args):
            args = list(args)
            for i, a in enumerate(args):
                if type(a) is ObjectRef:
                    deps.append((i, a))
                    args[i] = None
        if any(type(v) is ObjectRef for v in kwargs.values()):
            kwargs = dict(kwargs)
            for k, v in kwargs.items():
                if type(v) is ObjectRef:
                    deps.append((k, v))
                    kwargs[k] = None
        if not args and not kwargs:
            payload = _EMPTY_ARGS
            refs: list = []
        else:
            try:
                ser = serialization.serialize((tuple(args), kwargs))
            except Exception as exc:
                raise TypeError(f"could not serialize the arguments of {name}: {exc}") from exc
            if not ser.inline:
                # Large arguments travel through stored as one put object.
                ref = self.put(_LargeArgs(ser.meta, ser.buffers))
                deps.append(("*", ref))
                payload = _EMPTY_ARGS
                refs = ser.refs
            else:
                payload = ser.to_wire()
                refs = ser.refs
        msg = {"t": "task", "tid": tid, "fn": fn_key, "name": name, "args": payload,
               "nret": num_returns, "job": self.job_id}
        if retry_exceptions:
            msg["rex"] = retry_exceptions if isinstance(retry_exceptions, bool) else \
                serialization.serialize(retry_exceptions).to_wire()
        if spec:
            msg.update(spec)
        if key is None:
            key = ("task", *sorted(demand.items()))
        elif key[0] == "create":
            num_returns = 0
        return_ids = [tid + i.to_bytes(4, "little") for i in range(num_returns)]
        with self._lock:
            self._drain_released()
            if refs:
                self._escape(refs)
            out = [self._new_owned(oid) for oid in return_ids]
            task = _Task(tid, key, demand, msg, deps, return_ids, max_retries, name, refs)
            self._tasks[tid] = task
            task.event = {"name": name, "fn": fn_key, "job": self.job_id, "nret": num_returns,
                          "deps": [r._id for _, r in deps], "owner_pid": self.pid}
            self._mark(task, "PENDING")
            for _slot, ref in deps:
                entry = self._owned.get(ref._id)
                if entry is not None and entry.state != READY:
                    if entry.waiters is None:
                        entry.waiters = []
                    entry.waiters.append(task)
                    task.unresolved += 1
            if key[0] == "actor":
                # Calls keep their order even while arguments are pending.
                a = self._actor(key[1])
                a.queue.append(task)
                self._pump_actor(a)
            elif key[0] == "create":
                a = self._actor(key[1])
                a.state = "PENDING_CREATION"
                a.create_task = task
                if task.unresolved == 0:
                    self._enqueue(task)
            elif task.unresolved == 0:
                self._enqueue(task, strategy)
            elif strategy is not None:
                self._strategies[key] = strategy
        return out

    # ---------------------------------------------------------------- actors
    def create_actor(self, actor_id: bytes, cls_key: bytes, class_name: str, args: tuple,
                     kwargs: dict, *, demand: dict, spec: dict) -> None:
        """Ask the raylet for an actor; returns at once (creation is asynchronous)."""
        refs = self._build_call(cls_key, class_name, args, kwargs, num_returns=1,
                                demand=demand, max_retries=0, retry_exceptions=False,
                                key=("create", actor_id), spec=spec)
        del refs  # creation has no return value; errors surface at method calls

    def submit_actor_call(self, actor_id: bytes, method: str, name: str, args: tuple,
                          kwargs: dict, *, num_returns: int, max_retries: int) -> list[ObjectRef]:
        msg_extra = {"method": method, "t": "call"}
        return self._build_call(b"", name, args, kwargs, num_returns=num_returns, demand={},
                                max_retries=max_retries, retry_exceptions=False,
                                key=("actor", actor_id), spec=msg_extra)

    def actor_handle_added(self, actor_id: bytes) -> None:
        with self._lock:
            self._actor(actor_id).handles += 1

    def actor_handle_escaped(self, actor_id: bytes) -> None:
        with self._lock:
            self._actor(actor_id).escaped = True

    def actor_scoped_to_handles(self, actor_id: bytes) -> None:
        with self._lock:
            self._actor(actor_id).scoped = True

    def _drain_released_handles(self) -> None:
        """When the last handle of an actor that never left this process goes,
        the actor ends once its queued calls are done (Ray's scoping rule,
        limited to handles that were never passed elsewhere)."""
        from libclient.actor import _released_handles

        while _released_handles:
            try:
                actor_id = _released_handles.popleft()
            except IndexError:
                return
            a = self._actors.get(actor_id)
            if a is None:
                continue
            a.handles -= 1
            if a.handles <= 0 and a.scoped and not a.escaped:
                a.released = True
                self._maybe_end_actor(a)

    def _maybe_end_actor(self, a: _Actor) -> None:
        if a.released and not a.queue and not a.inflight and a.state != "DEAD":
            a.released = False
            self._send_to(self._actor_raylet(a), {
                "t": "kill_actor", "actor_id": a.actor_id, "no_restart": True,
                "cause": "all handles to the actor went out of scope"})

    def _actor_raylet(self, a: _Actor | None) -> _RemoteRaylet | None:
        """The raylet that manages an actor: the one that placed it (None: ours)."""
        if a is None or not a.node_id or a.node_id == self.node_id:
            return a.raylet if a is not None else None
        if a.raylet is not None and not a.raylet.dead:
            return a.raylet
        try:
            rows = self.gcs.get_nodes()
        except Exception:
            return None
        row = next((r for r in rows if r.get("node_id") == a.node_id), None)
        if row is None or row.get("state") != "ALIVE":
            return None
        a.raylet = self._remote_raylet(row.get("raylet_address", ""), a.node_id)
        return a.raylet

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        """Kill an actor: the raylet ends its process, and from now on no call
        made here reaches the old incarnation.

        Calls go straight to the actor's socket while the kill goes through
        the raylet, so without the local step a call made after ``kill``
        could overtake it and run.
        """
        with self._lock:
            a = self._actors.get(actor_id)
            self._send_to(self._actor_raylet(a), {"t": "kill_actor", "actor_id": actor_id,
                                                  "no_restart": no_restart})
            if a is None or a.state == "DEAD":
                return
            create = a.create_task
            if create is not None and create.unresolved:
                # Its creation never reached the raylet: it never will.
                create.cancelled = True
                a.create_task = None
                self._task_done(create, "FAILED")
                no_restart = True
            if no_restart:
                a.state = "DEAD"
                a.dead_wire = _actor_died_wire(a, "the actor was killed by kill()")
                self._pump_actor(a)
            elif a.sock is not None:
                self._actor_conn_lost(a, "killed by kill() to restart")

    def _actor(self, actor_id: bytes) -> _Actor:
        a = self._actors.get(actor_id)
        if a is None:
            a = self._actors[actor_id] = _Actor(actor_id)
        return a

    def _pump_actor(self, a: _Actor) -> None:
        """Send queued calls in order, as far as arguments and the connection allow."""
        if a.state == "DEAD":
            while a.queue:
                self._finish_error(a.queue.popleft(), a.dead_wire or _actor_died_wire(a, ""))
            return
        if a.sock is None:
            if a.state == "ALIVE" and a.socket_path and a.pid != a.lost_pid:
                self._actor_connect(a)
            if a.sock is None:
                if a.queue:
                    self._watch_actor(a)
                return
        while a.queue:
            task = a.queue[0]
            if task.cancelled:
                a.queue.popleft()
                continue
            if task.unresolved:
                return
            a.queue.popleft()
            failed = self._resolve_args(task)
            if failed is not None:
                self._finish_error(task, failed)
                continue
            task.lease = a  # type: ignore[assignment]
            a.inflight[task.tid] = task
            self._mark(task, "RUNNING")
            self._write(a, pack(task.msg))  # type: ignore[arg-type]

    def _actor_connect(self, a: _Actor) -> None:
        remote = bool(a.node_id) and a.node_id != self.node_id and bool(a.address)
        try:
            sock = _connect_worker({"address": a.address, "socket": a.socket_path}, remote)
        except (OSError, ValueError):
            a.lost_pid = a.pid
            self._watch_actor(a)
            return
        a.sock, a.dead, a.decoder, a.out = sock, False, FrameDecoder(), bytearray()
        self._sel.register(sock, selectors.EVENT_READ, a)

    def _watch_actor(self, a: _Actor) -> None:
        """Follow this actor's row in gcsd until it is reachable or dead."""
        if self._actor_sub is None:
            try:
                from libclient.gcs_client import GcsSubscriber

                info = self.gcs.call("info")
                self._actor_sub = GcsSubscriber(info["pubsub"], ["actors"])
            except Exception:
                self._actor_sub = False  # polling alone still works
        if a.next_poll == 0.0:
            a.next_poll = time.monotonic()
            try:
                os.write(self._wake_w, b"p")
            except BlockingIOError:
                pass

    def _on_actor_record(self, rec: Any) -> None:
        if not isinstance(rec, dict):
            return
        a = self._actors.get(rec.get("actor_id", b""))
        if a is None or a.state == "DEAD":
            return
        state = rec.get("state")
        if state == "ALIVE" and rec.get("pid") != a.lost_pid:
            if a.sock is not None and a.pid != rec.get("pid"):
                self._actor_conn_lost(a, "the actor restarted")
            a.state, a.pid, a.socket_path = "ALIVE", rec.get("pid", 0), rec.get("socket", "")
            a.node_id, a.address = rec.get("node_id") or b"", rec.get("address") or ""
            a.next_poll = 0.0
            self._pump_actor(a)
        elif state == "DEAD":
            a.state = "DEAD"
            a.next_poll = 0.0
            if a.dead_wire is None:
                a.dead_wire = _actor_died_wire(a, rec.get("death_cause", ""))
            if a.sock is None:
                self._pump_actor(a)
        elif state in ("PENDING_CREATION", "RESTARTING"):
            a.state = state

    def _actor_conn_lost(self, a: _Actor, why: str) -> None:
        """The actor's process went away: retry or fail what was in flight."""
        if a.sock is not None:
            try:
                self._sel.unregister(a.sock)
            except (KeyError, ValueError):
                pass
            a.sock.close()
        a.sock, a.dead = None, True
        a.lost_pid = a.pid
        if a.state == "ALIVE":
            a.state = "UNKNOWN"
        retry = []
        for task in a.inflight.values():
            task.lease = None
            if task.retries_left > 0 and not task.cancelled:
                task.retries_left -= 1
                retry.append(task)
            else:
                self._finish_error(task, _actor_died_wire(
                    a, f"the actor died while running {task.name} ({why})"))
        a.inflight.clear()
        a.queue.extendleft(reversed(retry))
        self._pump_actor(a)

    def _poll_actors(self, now: float) -> None:
        sub = self._actor_sub
        if sub:
            for _ in range(1000):
                try:
                    note = sub.recv(0)
                except Exception:
                    break
                if note is None:
                    break
                self._on_actor_record(note.get("value"))
        dead_nodes: set[bytes] | None = None
        for a in list(self._actors.values()):
            if a.next_poll and now >= a.next_poll:
                a.next_poll = now + 0.25
                try:
                    rec = self.gcs.table_get("actors", a.actor_id)
                    if (isinstance(rec, dict) and rec.get("state") == "ALIVE"
                            and rec.get("pid") == a.lost_pid and rec.get("node_id")
                            and rec["node_id"] != self.node_id):
                        # Nobody is left to publish its death if its node died.
                        if dead_nodes is None:
                            dead_nodes = {n["node_id"] for n in self.gcs.get_nodes()
                                          if n.get("state") != "ALIVE"}
                        if rec["node_id"] in dead_nodes:
                            rec = {**rec, "state": "DEAD", "death_cause":
                                   f"the actor's node {rec['node_id'].hex()} died"}
                    self._on_actor_record(rec)
                except Exception:
                    pass

    def _on_actor_created(self, a: _Actor, msg: dict) -> None:
        if msg.get("error") == "spill" and a.state != "DEAD" and a.create_msg is not None:
            rr = self._remote_raylet(msg.get("raylet_address") or "", msg.get("node_id") or b"")
            if rr is not None:  # that node's raylet places and manages it
                self._raylet_ids += 1
                a.raylet = rr
                a.create_msg = {**a.create_msg, "r": self._raylet_ids, "grant_or_reject": True}
                self._actor_creates[self._raylet_ids] = a
                self._write(rr, pack(a.create_msg))  # type: ignore[arg-type]
                return
        a.create_msg = None
        task, a.create_task = a.create_task, None
        if a.state == "DEAD":
            pass  # killed here while its creation was in flight
        elif msg.get("ok"):
            a.state, a.pid, a.socket_path = "ALIVE", msg["pid"], msg["socket"]
            a.node_id, a.address = msg.get("node_id") or b"", msg.get("address") or ""
        else:
            a.state = "DEAD"
            a.dead_wire = _actor_died_wire(a, msg.get("msg", msg.get("error", "")),
                                           msg.get("wire"))
        if task is not None:
            self._task_done(task, "FINISHED" if msg.get("ok") else "FAILED")
        self._pump_actor(a)

    def _enqueue(self, task: _Task, strategy: Any = None) -> None:
        # Called with the lock held and every owned dependency READY.
        if task.key[0] == "actor":
            self._pump_actor(self._actor(task.key[1]))
            return
        failed = self._resolve_args(task)
        if failed is not None:
            if task.key[0] == "create":
                a = self._actor(task.key[1])
                a.state, a.dead_wire, a.create_task = "DEAD", failed, None
                self._pump_actor(a)
            self._finish_error(task, failed)
            return
        if task.key[0] == "create":
            a = self._actor(task.key[1])
            self._raylet_ids += 1
            self._actor_creates[self._raylet_ids] = a
            m = task.msg
            spec = {"cls": m["fn"], "args": m["args"], "deps": m.get("deps"),
                    "job": self.job_id, **{k: m[k] for k in _ACTOR_SPEC_KEYS if k in m}}
            a.create_msg = {"t": "create_actor", "r": self._raylet_ids, "actor_id": a.actor_id,
                            "res": task.demand, "spec": spec}
            if m.get("strategy") is not None:
                a.create_msg["strategy"] = m["strategy"]
            self._raylet_send(a.create_msg)
            return
        cls = self._classes.get(task.key)
        if cls is None:
            cls = self._classes[task.key] = _Class(
                task.demand, strategy or self._strategies.pop(task.key, None))
        cls.queue.append(task)
        self._pump(cls)

    def _resolve_args(self, task: _Task) -> list | None:
        """Put each dependency into the message; return an error wire if one failed."""
        if not task.deps:
            return None
        resolved = []
        for slot, ref in task.deps:
            entry = self._owned.get(ref._id)
            if entry is None or entry.buf is not None or entry.loc:
                # By id: the worker reads it from its store, pulling it from
                # the node named here first if it runs elsewhere.
                loc = entry.loc if entry is not None and entry.loc else self.store_address
                resolved.append([slot, "s", ref._id, ref.owner_pid, loc])
                continue
            if entry.wire[0] == serialization.KIND_ERROR:
                return entry.wire
            resolved.append([slot, "v", entry.wire])
        task.msg["deps"] = resolved
        return None

    def _pump(self, cls: _Class) -> None:
        """Push queued tasks to leased workers; ask for more leases if needed."""
        depth = cls.depth()
        while cls.queue:
            best = None
            for lease in cls.leases:
                if not lease.dead and len(lease.inflight) < depth and (
                        best is None or len(lease.inflight) < len(best.inflight)):
                    best = lease
            if best is None:
                break
            task = cls.queue.popleft()
            if task.cancelled:
                continue
            self._push(best, task)
        want = min(len(cls.queue), _MAX_LEASE_REQUESTS) - len(cls.requests)
        for _ in range(want):
            self._request_lease(cls)
        if not cls.queue and cls.requests:
            for rid in cls.requests:
                self._send_to(self._lease_at.get(rid), {"t": "cancel_lease", "lease_r": rid})
            cls.requests.clear()  # a grant that still arrives is handed back

    def _push(self, lease: _Lease, task: _Task) -> None:
        task.lease = lease
        lease.inflight[task.tid] = task
        if lease.gpus:
            task.msg["gpus"] = lease.gpus
        self._mark(task, "RUNNING")
        self._write(lease, pack(task.msg))

    def _write(self, lease: _Lease, data: bytes) -> None:
        if lease.dead:
            return
        if not lease.out:
            try:
                n = lease.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n = len(data)  # the reader will see the failure and fail the tasks
            if n == len(data):
                return
            data = data[n:]
        lease.out += data
        self._want_write(lease)

    def _want_write(self, target: Any) -> None:
        self._write_interest.add(target)
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass

    def _request_lease(self, cls: _Class) -> None:
        if self._raylet_lost:
            err = _error_wire(RaySystemError("lost the connection to the raylet"))
            while cls.queue:
                self._finish_error(cls.queue.popleft(), err)
            return
        self._raylet_ids += 1
        rid = self._raylet_ids
        cls.requests.add(rid)
        self._lease_reqs[rid] = cls
        msg = {"t": "lease", "r": rid, "res": cls.demand}
        if cls.strategy is not None:
            msg["strategy"] = cls.strategy
        self._raylet_send(msg)

    def _raylet_send(self, msg: dict) -> None:
        data = pack(msg)
        if not self._raylet_out:
            try:
                n = self._raylet.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return
            if n == len(data):
                return
            data = data[n:]
        self._raylet_out += data
        self._want_write("raylet")

    def raylet_call(self, msg: dict, timeout: float = 10.0) -> dict:
        """A request/reply exchange with the raylet, answered via the I/O thread."""
        with self._lock:
            self._raylet_ids += 1
            rid = msg["r"] = self._raylet_ids
            slot: list = [None]
            self._rpc[rid] = slot
            self._raylet_send(msg)
            deadline = time.monotonic() + timeout
            while slot[0] is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    self._rpc.pop(rid, None)
                    raise RaySystemError(f"raylet did not answer {msg['t']!r}")
                self._cv.wait(remaining)
            return slot[0]

    # ---------------------------------------------------------------- cancel
    def cancel(self, ref: ObjectRef, force: bool) -> None:
        tid = ref._id[:16]
        with self._lock:
            task = self._tasks.get(tid)
            if task is None:
                return
            task.cancelled = True
            task.retries_left = 0
            err = _error_wire(TaskCancelledError(f"task {task.name} was cancelled"))
            lease = task.lease
            if isinstance(lease, _Actor):
                if force:
                    raise ValueError("force=True cannot cancel an actor call; use kill()")
                return  # a running actor call is not interrupted (as in Ray for sync actors)
            if lease is None:
                # Queued or waiting for arguments: it never ran.
                self._finish_error(task, err)
                return
            if force:
                try:
                    os.kill(lease.pid, 9)
                except ProcessLookupError:
                    pass
            else:
                self._write(lease, pack({"t": "cancel", "tid": tid}))
                self._interrupt(lease)
                # The signal can outrun the message (still in our buffer) or
                # reach the worker before it starts the task: repeat it until
                # the task's reply comes back.
                self._cancelling[tid] = (task, time.monotonic() + _CANCEL_RESEND_S)

    @staticmethod
    def _interrupt(lease: _Lease) -> None:
        try:
            os.kill(lease.pid, 2)  # SIGINT: the worker checks which task it runs
        except ProcessLookupError:
            pass

    def _resend_cancels(self, now: float) -> None:
        for tid, (task, due) in list(self._cancelling.items()):
            lease = task.lease
            if not isinstance(lease, _Lease) or lease.dead or tid not in lease.inflight:
                del self._cancelling[tid]
            elif now >= due:
                self._interrupt(lease)
                self._cancelling[tid] = (task, now + _CANCEL_RESEND_S)

    # --------------------------------------------------------------- replies
    def _on_task_reply(self, lease: _Lease, msg: dict) -> None:
        task = lease.inflight.pop(msg.get("tid"), None)
        if task is None:
            return
        cls = self._classes.get(lease.key)
        dur = msg.get("dur")
        if cls is not None and isinstance(dur, float):
            cls.task_time = 0.8 * cls.task_time + 0.2 * dur
        status = msg.get("err", 0)
        if status == 2 and task.retries_left > 0 and not task.cancelled:
            task.retries_left -= 1
            task.lease = None
            self._requeue(task)
            return
        if task.cancelled and status:
            self._finish_error(task, _error_wire(TaskCancelledError(f"task {task.name} was cancelled")))
            return
        rets = msg.get("rets") or []
        for oid, ret in zip(task.return_ids, rets, strict=False):
            entry = self._owned.get(oid)
            if entry is None or entry.state == READY:
                continue
            if ret[0] == "v":
                entry.wire = ret[1]
            elif len(ret) > 1 and ret[1] and ret[1] != self.store_address:
                entry.loc = ret[1]  # on the worker's node; pulled when someone gets it
            else:
                try:
                    (entry.buf,) = self.store.get([oid], timeout=0)
                except (ConnectionError, OSError, ProtocolError):
                    entry.buf = None  # stored is gone: the value is lost
                if entry.buf is None:
                    entry.wire = _error_wire(ObjectLostError(
                        f"return value of {task.name} was evicted before its owner pinned it"))
            self._complete(oid, entry)
        self._task_done(task, "FAILED" if status else "FINISHED")

    def _complete(self, oid: bytes, entry: _Entry) -> None:
        entry.state = READY
        if entry.escaped:
            try:
                self._promote(oid, entry)
            except Exception as exc:
                entry.wire = _error_wire(ObjectStoreFullError(str(exc)))
        waiters = entry.waiters
        if waiters:
            entry.waiters = None
            for task in waiters:
                task.unresolved -= 1
                if task.unresolved == 0 and not task.cancelled:
                    self._enqueue(task)
        if entry.count <= 0 and not entry.escaped and oid in self._owned:
            self._drop(oid, entry)

    def _finish_error(self, task: _Task, wire: list) -> None:
        for oid in task.return_ids:
            entry = self._owned.get(oid)
            if entry is not None and entry.state != READY:
                entry.wire = wire
                self._complete(oid, entry)
        self._task_done(task, "FAILED")

    def _mark(self, task: _Task, state: str) -> None:
        """Queue the task's full row with its new state for the next gcsd batch.

        Each batch entry replaces the row, so every entry carries the whole
        spec (the lineage later issues reconstruct from), not just the state.
        """
        ev = self._events.get(task.tid)
        if ev is None:
            ev = self._events[task.tid] = dict(task.event)
        ev["state"] = state

    def _task_done(self, task: _Task, state: str) -> None:
        self._tasks.pop(task.tid, None)
        task.args_hold = None
        task.deps = []
        self._mark(task, state)
        self._cv.notify_all()
        if isinstance(task.lease, _Lease):
            cls = self._classes.get(task.key)
            if cls is not None:
                self._pump(cls)

    def _requeue(self, task: _Task) -> None:
        if task.key[0] == "actor":
            a = self._actor(task.key[1])
            a.inflight.pop(task.tid, None)
            a.queue.appendleft(task)
            self._pump_actor(a)
            return
        cls = self._classes.get(task.key)
        if cls is None:
            cls = self._classes[task.key] = _Class(task.demand)
        cls.queue.appendleft(task)
        self._pump(cls)

    def _on_lease_reply(self, msg: dict, source: _RemoteRaylet | None = None) -> None:
        rid = msg.get("r")
        actor = self._actor_creates.pop(rid, None)
        if actor is not None:
            self._on_actor_created(actor, msg)
            return
        cls = self._lease_reqs.pop(rid, None)
        self._lease_at.pop(rid, None)
        if cls is None:
            if msg.get("ok"):  # granted after we stopped wanting it
                self._send_to(source, {"t": "return_lease", "lease_id": msg["lease_id"],
                                       "kill": False})
            return
        cls.requests.discard(rid)
        if not msg.get("ok"):
            error = msg.get("error")
            if error == "spill" and cls.queue:
                self._spill(cls, msg)
            elif error == "rejected" and cls.queue:
                self._request_lease(cls)  # back to our own raylet, which knows more now
            elif error != "cancelled" and cls.queue:
                # Unschedulable (hard affinity to a dead node), workers that
                # cannot start, a bad request: fail what waits rather than hang.
                err = _error_wire(RaySystemError(
                    f"the raylet refused a lease ({error}): {msg.get('msg', '')}"))
                while cls.queue:
                    self._finish_error(cls.queue.popleft(), err)
            return
        if not cls.queue:
            self._send_to(source, {"t": "return_lease", "lease_id": msg["lease_id"],
                                   "kill": False})
            return
        try:
            sock = _connect_worker(msg, remote=source is not None)
        except OSError:
            self._send_to(source, {"t": "return_lease", "lease_id": msg["lease_id"],
                                   "kill": True})
            self._pump(cls)
            return
        key = next((k for k, c in self._classes.items() if c is cls), None)
        lease = _Lease(msg["lease_id"], msg["worker_id"], msg["pid"], sock, key,
                       msg.get("gpus") or [], source)
        cls.leases.append(lease)
        self._sel.register(sock, selectors.EVENT_READ, lease)
        self._pump(cls)

    # ------------------------------------------------------------ spillback
    def _spill(self, cls: _Class, msg: dict) -> None:
        """Ask the raylet our raylet named, which grants or queues (never spills again)."""
        address = msg.get("raylet_address") or ""
        rr = self._remote_raylet(address, msg.get("node_id") or b"")
        if rr is None:
            self._request_lease(cls)  # cannot reach it: our raylet decides again
            return
        self._raylet_ids += 1
        rid = self._raylet_ids
        cls.requests.add(rid)
        self._lease_reqs[rid] = cls
        self._lease_at[rid] = rr
        req = {"t": "lease", "r": rid, "res": cls.demand, "grant_or_reject": True}
        if cls.strategy is not None:
            req["strategy"] = cls.strategy
        self._write(rr, pack(req))  # type: ignore[arg-type]

    def _remote_raylet(self, address: str, node_id: bytes) -> _RemoteRaylet | None:
        rr = self._remote_raylets.get(address)
        if rr is not None and not rr.dead:
            return rr
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            return None
        try:
            sock = socket.create_connection((host, int(port)), timeout=5.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return None
        sock.setblocking(False)
        rr = self._remote_raylets[address] = _RemoteRaylet(address, node_id, sock)
        self._sel.register(sock, selectors.EVENT_READ, rr)
        self._write(rr, pack({"t": "hello", "kind": "remote", "pid": self.pid,  # type: ignore[arg-type]
                              "r": 0, "worker_id": self.worker_id}))
        return rr

    def _read_remote_raylet(self, rr: _RemoteRaylet) -> None:
        try:
            data = rr.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        msgs: list[dict] = []
        if data:
            rr.decoder.feed(data)
            try:
                msgs = rr.decoder.drain()
            except ProtocolError:
                data = b""
        for m in msgs:
            if m.get("r") != 0:  # 0 is our hello
                self._on_lease_reply(m, rr)
        if not data:
            self._remote_raylet_lost(rr)

    def _remote_raylet_lost(self, rr: _RemoteRaylet) -> None:
        """Its node is gone (or the link is): ask our own raylet again for what waited there.

        Leases it granted fail through their own worker connections.
        """
        if rr.dead:
            return
        rr.dead = True
        self._remote_raylets.pop(rr.address, None)
        try:
            self._sel.unregister(rr.sock)
        except (KeyError, ValueError):
            pass
        rr.sock.close()
        for rid, at in list(self._lease_at.items()):
            if at is rr:
                del self._lease_at[rid]
                cls = self._lease_reqs.pop(rid, None)
                if cls is not None:
                    cls.requests.discard(rid)
                    self._pump(cls)

    def _send_to(self, raylet: _RemoteRaylet | None, msg: dict) -> None:
        """Send to the raylet a lease or request belongs to (ours if None)."""
        if raylet is None:
            self._raylet_send(msg)
        elif not raylet.dead:
            self._write(raylet, pack(msg))  # type: ignore[arg-type]

    def _lease_failed(self, lease: _Lease, why: str) -> None:
        """The leased worker's socket closed: retry or fail what it was running."""
        if isinstance(lease, _Actor):
            self._actor_conn_lost(lease, why)
            return
        if lease.dead:
            return
        lease.dead = True
        try:
            self._sel.unregister(lease.sock)
        except (KeyError, ValueError):
            pass
        lease.sock.close()
        cls = self._classes.get(lease.key)
        if cls is not None and lease in cls.leases:
            cls.leases.remove(lease)
        self._send_to(lease.raylet, {"t": "return_lease", "lease_id": lease.lease_id,
                                     "kill": True})
        for task in list(lease.inflight.values()):
            task.lease = None
            if task.cancelled:
                self._finish_error(task, _error_wire(
                    TaskCancelledError(f"task {task.name} was cancelled")))
            elif task.retries_left > 0:
                task.retries_left -= 1
                self._requeue(task)
            else:
                self._finish_error(task, _error_wire(WorkerCrashedError(
                    f"the worker (pid {lease.pid}) running {task.name} died ({why}) "
                    "and no retries were left")))
        lease.inflight.clear()
        if cls is not None:
            self._pump(cls)

    def _return_idle_leases(self, now: float) -> None:
        for cls in self._classes.values():
            if cls.queue:
                continue
            for lease in list(cls.leases):
                if lease.inflight or lease.dead:
                    lease.idle_since = now
                    continue
                if now - lease.idle_since >= _LEASE_IDLE_S:
                    lease.dead = True
                    cls.leases.remove(lease)
                    try:
                        self._sel.unregister(lease.sock)
                    except (KeyError, ValueError):
                        pass
                    lease.sock.close()
                    self._send_to(lease.raylet, {"t": "return_lease",
                                                 "lease_id": lease.lease_id, "kill": False})

    # ------------------------------------------------------------- I/O loop
    def _io_loop(self) -> None:
        last_flush = time.monotonic()
        while not self._closed:
            timeout = 0.05 if any(c.leases for c in self._classes.values()) else 0.2
            if self._actors and (self._actor_sub or any(a.next_poll for a in self._actors.values())):
                timeout = 0.02
            try:
                events = self._sel.select(timeout=timeout)
            except (OSError, ValueError):
                if self._closed:
                    return
                raise
            with self._lock:
                try:
                    self._io_step(events, last_flush)
                except Exception:
                    # Never let the I/O thread die: every later get would hang.
                    traceback.print_exc()
                if time.monotonic() - last_flush >= _EVENT_FLUSH_S:
                    last_flush = time.monotonic()

    def _io_step(self, events: list, last_flush: float) -> None:
        """One turn of the I/O thread (lock held)."""
        for key, mask in events:
            target = key.data
            if target == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif target == "raylet":
                self._read_raylet()
            elif (isinstance(target, (_Lease, _Actor)) and mask & selectors.EVENT_READ
                  and not target.claimed):
                self._read_lease(target)
            elif isinstance(target, _RemoteRaylet) and mask & selectors.EVENT_READ:
                self._read_remote_raylet(target)
            if mask & selectors.EVENT_WRITE:
                self._flush_target(target)
        self._update_write_interest()
        now = time.monotonic()
        self._drain_released()
        self._return_idle_leases(now)
        if self._actors:
            self._poll_actors(now)
        if self._cancelling:
            self._resend_cancels(now)
        if now - last_flush >= _EVENT_FLUSH_S and (self._events or self._object_events):
            self._flush_events()
        self.store.flush_releases()

    def _update_write_interest(self) -> None:
        for target in list(self._write_interest):
            if target == "raylet":
                sock, pending = self._raylet.sock, bool(self._raylet_out)
            else:
                if target.dead:
                    self._write_interest.discard(target)
                    continue
                sock, pending = target.sock, bool(target.out)
            if pending:
                self._flush_target(target)
                pending = bool(self._raylet_out if target == "raylet" else target.out)
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
            try:
                self._sel.modify(sock, mask, target)
            except (KeyError, ValueError):
                pass
            if not pending:
                self._write_interest.discard(target)

    def _flush_target(self, target: Any) -> None:
        if target == "raylet":
            buf, sock = self._raylet_out, self._raylet.sock
        elif isinstance(target, (_Lease, _Actor, _RemoteRaylet)) and not target.dead:
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

    def _read_raylet(self) -> None:
        try:
            data = self._raylet.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._closed_by_raylet()
            return
        dec = self._raylet._decoder
        dec.feed(data)
        while True:
            try:
                msg = dec.next()
            except ProtocolError:
                self._closed_by_raylet()
                return
            if msg is None:
                return
            rid = msg.get("r")
            slot = self._rpc.pop(rid, None)
            if slot is not None:
                slot[0] = msg
                self._cv.notify_all()
            else:
                self._on_lease_reply(msg)

    def _closed_by_raylet(self) -> None:
        try:
            self._sel.unregister(self._raylet.sock)
        except (KeyError, ValueError):
            pass
        self._raylet_lost = True
        err = _error_wire(RaySystemError("lost the connection to the raylet"))
        for task in list(self._tasks.values()):
            self._finish_error(task, err)
        # Single node: the raylet's workers, actors included, die with it.
        for a in self._actors.values():
            a.state = "DEAD"
            a.dead_wire = _actor_died_wire(a, "lost the connection to the local raylet")
            self._pump_actor(a)
        self._cv.notify_all()

    def _read_lease(self, lease: _Lease) -> None:
        try:
            data = lease.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lease_failed(lease, str(exc))
            return
        if not data:
            self._lease_failed(lease, "connection closed")
            return
        lease.decoder.feed(data)
        try:
            msgs = lease.decoder.drain()
        except ProtocolError as exc:
            self._lease_failed(lease, f"protocol error: {exc}")
            return
        for msg in msgs:
            self._on_task_reply(lease, msg)
        if not lease.inflight:
            if isinstance(lease, _Lease):
                lease.idle_since = time.monotonic()
            elif lease.released:
                self._maybe_end_actor(lease)

    def _flush_events(self) -> None:
        """Send task states and object locations to gcsd in one batch each.

        Best-effort observability and lineage: a gcsd hiccup never fails a task.
        """
        for table, attr in (("tasks", "_events"), ("objects", "_object_events")):
            events = getattr(self, attr)
            if not events:
                continue
            setattr(self, attr, {})
            try:
                self.gcs.put_batch(table, [[k, v] for k, v in events.items()], wait=False)
            except Exception:
                pass

    # -------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
            for cls in self._classes.values():
                for lease in cls.leases:
                    lease.dead = True
                    try:
                        lease.sock.close()
                    except OSError:
                        pass
                    self._send_to(lease.raylet, {"t": "return_lease",
                                                 "lease_id": lease.lease_id,
                                                 "kill": bool(lease.inflight)})
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            for a in self._actors.values():
                if a.sock is not None:
                    a.sock.close()
                    a.sock, a.dead = None, True
        self._io.join(timeout=2)
        for rr in list(self._remote_raylets.values()):
            try:
                rr.sock.setblocking(True)
                rr.sock.settimeout(1.0)
                if rr.out:
                    rr.sock.sendall(rr.out)
            except OSError:
                pass
            rr.sock.close()
        if self._actor_sub:
            self._actor_sub.close()
        self._flush_events()
        try:
            self._raylet.sock.setblocking(True)
            if self._raylet_out:
                self._raylet.sock.sendall(self._raylet_out)
        except OSError:
            pass
        self._raylet.close()
        self.store.close()
        if self._store_wait is not None:
            self._store_wait.close()
        self.gcs.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if object_ref._incref == self._incref:
            object_ref._incref = None


class _LargeArgs:
    """Task arguments too big to inline: travel through stored as one object."""

    def __init__(self, meta: bytes, buffers: list) -> None:
        self.meta = meta
        self.buffers = buffers

    def __reduce__(self) -> Any:
        import pickle

        return (_rebuild_large_args, (pickle.PickleBuffer(self.meta),
                                      [pickle.PickleBuffer(b) for b in self.buffers]))


def _rebuild_large_args(meta: Any, buffers: list) -> Any:
    import pickle

    return pickle.loads(meta, buffers=buffers)


def _error_wire(exc: BaseException) -> list:
    return serialization.serialize(exc, serialization.KIND_ERROR).to_wire()


def error_wire_from(exc: BaseException, name: str) -> list:
    """Wrap an exception raised by user code for the trip back to the owner."""
    tb = traceback.format_exc()
    err = RayTaskError(name, tb, exc, os.getpid())
    try:
        return serialization.serialize(err, serialization.KIND_ERROR).to_wire()
    except Exception:
        from libclient.exceptions import RayError

        plain = RayTaskError(name, tb, RayError(f"{type(exc).__name__}: {exc}"), os.getpid())
        return serialization.serialize(plain, serialization.KIND_ERROR).to_wire()


_ACTOR_SPEC_KEYS = ("class_name", "name", "namespace", "detached", "max_restarts",
                    "max_concurrency", "is_async", "meta")


def _actor_died_wire(a: _Actor, cause: str, init_wire: list | None = None) -> list:
    from libclient.exceptions import ActorDiedError

    init_error = None
    if init_wire is not None:
        try:
            init_error = serialization.deserialize_wire(init_wire)[1]
        except Exception:
            init_error = None
    return _error_wire(ActorDiedError(a.actor_id.hex(), cause, init_error))


def _connect_worker(grant: dict, remote: bool) -> socket.socket:
    """Connect to a leased worker: its Unix socket on our node, TCP on another."""
    if remote:
        host, _, port = grant["address"].rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(grant["socket"])
        except OSError:
            sock.close()
            raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
    sock.setblocking(False)
    return sock


def _strategy_key(strategy: Any) -> Any:
    """A hashable form of a strategy's wire form, for scheduling-class keys."""
    if isinstance(strategy, dict):
        return tuple(sorted(strategy.items()))
    return strategy


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_EMPTY_ARGS = serialization.serialize(((), {})).to_wire()
