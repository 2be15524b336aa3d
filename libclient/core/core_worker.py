"""The core worker: what every driver and worker process runs inside libclient.

Theory of operation
-------------------
The core worker wires together the parts Ray's core worker is made of, and
holds the public methods the API (``api``, ``actor``, ``worker``) calls:

* :mod:`.references` — owned objects and their counts (pure);
* :mod:`.task_manager` — pending tasks, their rows for gcsd, retries (pure);
* :mod:`.task_submitter` — scheduling classes and worker leases;
* :mod:`.actor_submitter` — per-actor ordered queues and connections;
* :mod:`.io_loop` — the selector thread, buffered writes, the wake pipe.

What stays here is the glue that needs several parts at once: building a
task from a call, completing return values (pinning stored ones, promoting
escaped ones, releasing waiting tasks), and the object plane (``put`` writes
large values to stored; ``get`` reads owned values from memory or stored,
borrowed ones from stored).

*Threads.* The user's thread calls submit/get/put/wait. One I/O thread
reads replies and fires timers. All state is guarded by one lock; sockets
are non-blocking, writes go out at once when the socket takes them and
otherwise through the I/O thread. A synchronous ``get`` whose reply is in
flight on a known connection reads that socket itself (``_wait_entry``).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from typing import Any

from libclient import object_ref, serialization
from libclient.core import task_events, task_manager
from libclient.core.actor_submitter import ActorConn, ActorSubmitter
from libclient.core.errors import error_wire
from libclient.core.generators import GeneratorsAndWaits
from libclient.core.io_loop import Conn, IoLoop, RemoteRaylet
from libclient.core.owner_notices import OwnerNotices
from libclient.core.references import (
    NOT_READY,
    PENDING,
    READY,
    RELEASED,
    Entry,
    ReferenceTable,
)
from libclient.core.store_provider import StoreProvider
from libclient.core.task_manager import Task, TaskManager
from libclient.core.task_submitter import Lease, TaskSubmitter, strategy_key
from libclient.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectReconstructionFailedLineageEvictedError,
    ObjectReconstructionFailedMaxAttemptsExceededError,
    ObjectStoreFullError,
    RaySystemError,
    RayTaskError,
    TaskCancelledError,
)
from libclient.object_ref import ObjectRef
from libclient.protocol import Connection, ProtocolError

EVENT_FLUSH_S = 0.2
_TASK_TYPES = {"task": 0, "actor": 1, "create": 2}  # task_events.TYPES


class CoreWorker(GeneratorsAndWaits):
    """Per-process runtime: object ownership, task submission, get/put/wait."""

    def __init__(self, raylet_socket: str, *, kind: str, job_id: int = 0,
                 worker_id: bytes | None = None) -> None:
        self.kind = kind
        self.pid = os.getpid()
        self.worker_id = worker_id or os.urandom(8)
        self.raylet_socket = raylet_socket
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._rpc: dict[int, list] = {}  # raylet request id -> [reply or None]
        self._exported: set[bytes] = set()
        self._fn_cache: dict[bytes, Any] = {}
        # streaming generator tasks by task id, held by their ObjectRefGenerator
        self._streams: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.current_task_id: bytes | None = None
        self.current_gpus: list[int] = []
        self.current_pg: list | None = None  # [placement group id, bundle, capture] of this task
        self.current_actor_id: bytes | None = None
        self.job_id = job_id
        self._blocked_depth = 0
        # Set by the task runner: tells whoever leased us that our task waits,
        # so it stops queueing more tasks behind it (they might be what it waits for).
        self.tell_submitter: Any = None
        # A worker's lease tokens from the raylet (lease_gate.py): the last
        # one, and who wants each (the worker's gate).
        self._lease_token: Any = None
        self._on_lease_token: Any = None
        self._last_flush = time.monotonic()

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

        from libclient import security
        from libclient.gcs_client import GcsClient

        if reply.get("keys_dir") and security.current() is None:
            # A driver joining a keyed cluster on this host: use its keys
            # (the raylet tells only Unix-socket clients, i.e. this host's user).
            security.use(security.load(reply["keys_dir"],
                                       encrypt_bulk=bool(reply.get("encrypt_bulk", True))))
        self.gcs = GcsClient(self.gcs_address, timeout=10.0)
        self._refs = ReferenceTable(self.node_id, self.pid, self.store_address)
        self._me = [self.store_address, self.pid]  # our key as a borrower
        self._store = StoreProvider(self.store_socket, f"{kind}-{self.pid}", pid=self.pid,
                                    lock=self._lock, refs=self._refs, gcs=self.gcs,
                                    address=self.store_address, blocked=self._set_blocked)
        if kind == "driver" and not job_id:
            self.job_id = self.gcs.next_job_id()

        self._tasks = TaskManager(clock=time.time)
        # Task events (task_events.py): a worker's probe of the task it runs now.
        self.running_probe: Any = None
        self._running_reported: bytes | None = None
        self._next_running_check = 0.0
        self.log_sink: Any = None  # a driver's printer of workers' output (log_to_driver)
        self._io = IoLoop(self._lock, conn, {"t": "hello", "kind": "remote", "pid": self.pid,
                                             "r": 0, "worker_id": self.worker_id})
        self._io.exit_on_raylet_loss = kind == "worker"
        self._submitter = TaskSubmitter(self._io, self._refs, self._tasks, self._finish_error,
                                        self.gcs)
        self._actors = ActorSubmitter(self._io, self._refs, self._tasks, self.gcs, self.node_id,
                                      self._finish_error, self._task_done)
        self._notices = OwnerNotices(self._io, self.gcs, self.store_address, self.pid)
        self._asked: dict[tuple[str, int], bool | None] = {}  # process liveness asked
        self._store.owner_alive = self.process_alive
        object_ref._incref = self._refs.incref
        self._io.start(timeout=self._io_timeout, on_raylet=self._read_raylet,
                       on_readable=self._read_conn, tick=self._tick)

    # ------------------------------------------------------------------ refs
    def _drain_released(self) -> None:
        """Apply ObjectRef/ActorHandle ``__del__`` decrements (lock held)."""
        if self._actors.actors:
            self._actors.drain_released_handles()
        if object_ref._released:
            freed = self._refs.release(object_ref._released, self._tasks.pending)
            if freed:
                self._store.free(freed)
        if self._refs.dropped:
            self._settle_lineage()

    def _drop(self, oid: bytes, entry: Entry) -> None:
        if self._refs.drop(oid, entry):
            self._store.free([oid])
        if self._refs.dropped:
            self._settle_lineage()

    def task_reruns(self) -> int:
        """How many tasks this process sent again (retries and rebuilds)."""
        return self._tasks.reruns

    # --------------------------------------------------------------- lineage
    def _settle_lineage(self) -> None:
        """Forget kept task specs none of whose returns is owned any more, and
        with them the lineage holds on their arguments (lock held)."""
        refs, tasks = self._refs, self._tasks
        freed: list[bytes] = []
        while refs.dropped:
            dropped, refs.dropped = refs.dropped, []
            for oid in dropped:
                task = tasks.lineage.get(oid[:16])
                if task is None or any(r in refs.owned for r in task.return_ids):
                    continue
                tasks.forget(task.tid)
                freed += self._unhold(task)
        if freed:
            self._store.free(freed)

    def _unhold(self, task: Task) -> list[bytes]:
        deps, task.lineage_deps, task.args_hold = task.lineage_deps or [], None, None
        return self._refs.unhold_for_lineage([d[1] for d in deps if d[1] in self._refs.owned])

    def _keep_lineage(self, task: Task) -> None:
        """A finished task whose returns went to a store: keep its spec while they
        are owned, so a lost one can be rebuilt (lock held)."""
        owned = self._refs.owned
        deps = [(slot, r._id, r._owner_pid, r._owner_addr) for slot, r in task.deps]
        deps += [(None, r._id, r._owner_pid, r._owner_addr) for r in task.args_hold or ()]
        self._refs.hold_for_lineage([d[1] for d in deps if d[1] in owned])
        borrowed = [r for _, r in task.deps if r._id not in owned]
        borrowed += [r for r in task.args_hold or () if r._id not in owned]
        self._tasks.done(task, "FINISHED")
        task.args_hold = borrowed or None  # borrowed arguments: keep holding them
        freed: list[bytes] = []
        for old in self._tasks.keep(task, deps):
            freed += self._unhold(old)
        if freed:
            self._store.free(freed)

    def _rebuild(self, oid: bytes) -> str | None:
        """Every copy of owned ``oid`` is lost: run its task again (and first,
        recursively, the tasks of its arguments whose values were freed).
        None if the rebuild is under way; else why it cannot be (lock held)."""
        entry = self._refs.owned.get(oid)
        if entry is None:
            return "none"
        if entry.state == PENDING:
            return None  # being rebuilt already
        res = self._tasks.resubmit(oid[:16])
        if isinstance(res, str):
            return res
        task = res
        for rid in task.return_ids:
            self._refs.lost(rid)
        deps, nested = [], []
        for slot, d, opid, oaddr in task.lineage_deps or ():
            ref = ObjectRef(d, opid, oaddr)
            if slot is None:
                nested.append(ref)
            else:
                deps.append((slot, ref))
        freed = self._unhold(task)  # the refs above hold them now
        if freed:
            self._store.free(freed)
        task.deps, task.args_hold, task.unresolved = deps, nested, 0
        self._tasks.mark(task, "PENDING_ARGS_AVAIL")
        for ref in [r for _, r in deps] + nested:
            dep = self._refs.owned.get(ref._id)
            if dep is not None and dep.state == RELEASED:
                why = self._rebuild(ref._id)
                if why is not None:
                    self._finish_error(task, error_wire(_lost_error(ref._id, why)))
                    return None
        self._refs.wait_for_args(task)
        if task.unresolved == 0:
            self._enqueue(task)
        return None

    def _rebuild_or_raise(self, oid: bytes, cause: Exception | None = None) -> None:
        """Start rebuilding ``oid`` or raise the error saying why it cannot be."""
        with self._lock:
            why = self._rebuild(oid)
        if why is not None:
            raise _lost_error(oid, why) from cause

    # ------------------------------------------------------------- borrowers
    def borrow_report(self) -> list[list] | None:
        """At the end of a task here: the refs we still borrow (and our
        sub-tasks' borrows to pass up), for the reply to our caller."""
        with self._lock:
            self._drain_released()
            return self._refs.take_borrow_report(self._me)

    def returned_refs(self, refs: list[ObjectRef], caller: Any) -> list[list]:
        """Refs nested in a return value leave for ``caller`` ([store, pid]):
        register it as the borrower of those we own (it reports their removal)
        and describe them all, so the caller holds them while it holds the value."""
        out = []
        with self._lock:
            key_ok = isinstance(caller, list) and len(caller) == 2
            for ref in refs:
                owned = ref._id in self._refs.owned
                if owned and key_ok:
                    self._refs.add_borrower([ref._id, self.pid, self.store_address,
                                             caller[0], caller[1]], relay=False)
                out.append([ref._id, ref._owner_pid, ref._owner_addr, int(owned and key_ok)])
        return out

    def _on_borrows(self, items: Any) -> None:
        """A reply's list of borrowers (lock held): count ours, pass on the rest."""
        if not isinstance(items, list):
            return
        relay = self.kind == "worker" and (self.current_task_id is not None
                                           or self.current_actor_id is not None)
        send = []
        refs = self._refs
        for item in items:
            if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], bytes)):
                continue
            if refs.add_borrower(item, relay):
                send.append(item)
        if send:
            self._notices.borrows(send)

    def _on_nested(self, entry: Entry | None, items: Any) -> None:
        """Refs nested in a return value: hold them while its entry lives."""
        if not isinstance(items, list):
            return
        held = []
        for item in items:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], bytes)):
                continue
            oid, opid, oaddr, registered = item
            if registered:
                self._refs.registered_by_caller(oid, opid, oaddr)
            held.append(ObjectRef(oid, opid, oaddr))
        if entry is not None and held:
            entry.contained = (entry.contained or []) + held

    def _on_owner_notice(self, msg: dict) -> None:
        """A borrower's notice, handed to us by our raylet (lock held)."""
        t = msg.get("t")
        if t == "ref_removed":
            by = msg.get("by")
            if not (isinstance(by, list) and len(by) == 2):
                return
            key = (by[0], by[1])
            for item in msg.get("items") or ():
                if isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes):
                    if self._refs.remove_borrower(item[0], key, int(item[1])):
                        entry = self._refs.owned.get(item[0])
                        if entry is not None:
                            self._drop(item[0], entry)
        elif t == "add_borrower":
            self._on_borrows(msg.get("items"))
        elif t == "log":  # a worker's output for this driver (worker_output.py)
            if self.log_sink is not None:
                self.log_sink(msg)
        elif t == "pid_status":
            key = (msg.get("store"), msg.get("pid"))
            if not msg.get("alive"):
                self._forget_borrowers(lambda k: k == key)
            if key in self._asked:
                self._asked[key] = bool(msg.get("alive"))
                self._cv.notify_all()

    def send_notice(self, dest: Any, msg: dict) -> None:
        """Give ``msg`` to process ``dest`` = (store address, pid) on any node,
        through that node's raylet (worker output to a driver, say)."""
        with self._lock:
            self._notices.send((dest[0], dest[1]), msg)

    def process_alive(self, store_address: str, pid: int, timeout: float = 2.0) -> bool:
        """Is process ``pid`` on the node of ``store_address`` alive? Asks that
        node's raylet; True if no answer comes in time (cannot tell)."""
        key = (store_address, pid)
        deadline = time.monotonic() + timeout
        with self._lock:
            self._asked[key] = None
            try:
                if not self._notices.ask_alive(key):
                    return False
                self._io.wake(b"w")
                while self._asked.get(key) is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._io.closed:
                        return True
                    self._cv.wait(min(remaining, 0.1))
                return bool(self._asked[key])
            finally:
                self._asked.pop(key, None)

    def _forget_borrowers(self, dead: Any) -> None:
        for oid in self._refs.drop_borrowers_where(dead):
            entry = self._refs.owned.get(oid)
            if entry is not None:
                self._drop(oid, entry)

    # ------------------------------------------------------------------- put
    def put(self, value: Any) -> ObjectRef:
        """Own a new object: small values stay in memory, large ones go to stored."""
        ser = serialization.serialize(value)
        oid = os.urandom(16) + b"\xff\xff\xff\xff"
        with self._lock:
            self._drain_released()
            entry = self._refs.add(oid)
            ref = ObjectRef(oid, self.pid, self.store_address)
            if ser.refs:
                self.escape(ser.refs)
                entry.contained = list(ser.refs)  # nested refs live while the value does
        if ser.inline:
            entry.wire = ser.to_wire()
        else:
            entry.buf = self._store.write(oid, ser)
        with self._lock:
            entry.state = READY
        return ref

    def write_store(self, oid: bytes, ser: serialization.Serialized) -> Any:
        """Copy a serialized value into stored (a large return); return the hold on it."""
        return self._store.write(oid, ser, handoff=True)

    def escape(self, refs: list[ObjectRef]) -> None:
        """These refs leave the process inside a value: make what we own of
        them readable by other processes (now, or when it is ready)."""
        with self._lock:
            for oid, entry in self._refs.escape(refs):
                self._store.promote(oid, entry)

    # ------------------------------------------------------------------- get
    def get(self, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
        """Values of ``refs``, waiting for pending ones; raises a task's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Any] = []
        with self._lock:
            self._drain_released()
            owned = self._refs.owned
            for ref in refs:
                if not isinstance(ref, ObjectRef):
                    raise TypeError(f"get() expects ObjectRefs, got {type(ref).__name__}")
                entry = owned.get(ref._id)
                if entry is None:
                    out.append(None)
                    continue
                if entry.state == RELEASED:  # a handle made after its value went
                    self._rebuild_or_raise(ref._id)
                if entry.state != READY:
                    self._wait_entry(entry, deadline, ref._id)
                out.append(entry)
        if len(refs) > 1:  # several on other nodes: pull them side by side
            remote = [(ref._id, entry.loc) if entry is not None else (ref._id, ref._owner_addr)
                      for ref, entry in zip(refs, out, strict=False)
                      if (entry is None and ref._owner_addr != self.store_address)
                      or (entry is not None and entry.buf is None and entry.loc)]
            if len(remote) > 1:
                self._store.prefetch(remote)
        values = []
        for ref, entry in zip(refs, out, strict=False):
            if entry is None:
                kind, value = self._store.read_borrowed(ref, deadline)
            else:
                kind, value = self._read_owned(ref, entry, deadline)
            if kind == serialization.KIND_ERROR:
                if isinstance(value, RayTaskError):
                    raise value.as_instanceof_cause()
                raise value
            values.append(value)
        return values

    def _read_owned(self, ref: ObjectRef, entry: Entry, deadline: float | None
                    ) -> tuple[int, Any]:
        """An owned value; a remote copy is pulled here first, and rebuilt from
        lineage if every copy is gone (each rebuild spends a retry, so this ends)."""
        while True:
            if entry.state != READY:
                with self._lock:
                    self._wait_entry(entry, deadline, ref._id)
            if entry.buf is None and entry.loc:
                try:
                    entry.buf = self._store.pull_and_pin(ref._id, entry.loc, deadline)
                except ObjectLostError as exc:
                    self._rebuild_or_raise(ref._id, exc)
                    continue
            if entry.buf is not None:
                return self._store.read(entry.buf)
            return serialization.deserialize_wire(entry.wire)

    def _reply_conn(self, oid: bytes | None) -> Conn | None:
        """The connection the reply for ``oid`` will arrive on, if it is in flight."""
        if oid is None:
            return None
        task = self._tasks.pending.get(oid[:16])
        conn = task.lease if task is not None else None
        if conn is None or conn.dead or conn.sock is None or conn.claimed:
            return None
        return conn

    def _wait_entry(self, entry: Entry, deadline: float | None, oid: bytes | None = None) -> None:
        self._set_blocked(True)
        try:
            while entry.state != READY:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise GetTimeoutError("get timed out")
                conn = self._reply_conn(oid)
                if conn is not None:
                    # Read the reply in this thread rather than be woken by the
                    # I/O thread: one thread wake-up less per synchronous call.
                    step = 0.05 if remaining is None else min(remaining, 0.05)
                    if not self._io.read_directly(conn, step, self._read_conn):
                        self._cv.wait(step)
                else:
                    self._cv.wait(remaining if remaining is not None else 1.0)
                if self._io.closed:
                    raise RaySystemError("libclient was shut down")
        finally:
            self._set_blocked(False)

    def fetch_to_node(self, oid: bytes, source: str, deadline: float | None = None) -> None:
        """Bring an object held by another node's store (``source``) into ours."""
        self._store.fetch_to_node(oid, source, deadline)

    def _set_blocked(self, blocked: bool) -> None:
        """Tell the raylet this worker's task waits, so it lends the CPU out."""
        if self.kind != "worker" or self.current_task_id is None:
            return
        with self._lock:
            if blocked:
                self._blocked_depth += 1
                if self._blocked_depth == 1:
                    self._io.raylet_send({"t": "blocked"})
                    if self.tell_submitter is not None:
                        self.tell_submitter(True)
            else:
                self._blocked_depth -= 1
                if self._blocked_depth == 0:
                    self._io.raylet_send({"t": "unblocked"})
                    if self.tell_submitter is not None:
                        self.tell_submitter(False)

    # ------------------------------------------------------------------ wait
    def wait(self, refs: list[ObjectRef], num_returns: int, timeout: float | None,
             fetch_local: bool = True) -> tuple[list[ObjectRef], list[ObjectRef]]:
        """Split ``refs`` into (ready, not ready) once ``num_returns`` are ready.

        With ``fetch_local`` an object is ready once it is on this node, and
        the ones on other nodes are pulled here meanwhile (as Ray does). A
        borrowed ref counts when this node's store has it either way: it is
        pulled from its owner's node, so a wait on it never waits forever.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        next_prefetch = 0.0
        while True:
            with self._lock:
                self._drain_released()
                owned = self._refs.owned
                ready_flags = []
                local: list[tuple[int, str]] = []  # (index, where it is now) to check here
                for i, ref in enumerate(refs):
                    entry = owned.get(ref._id)
                    if entry is None:
                        ready_flags.append(False)
                        local.append((i, ref._owner_addr))
                    elif entry.state == READY and fetch_local and entry.buf is None \
                            and entry.loc:
                        ready_flags.append(False)
                        local.append((i, entry.loc))
                    else:
                        ready_flags.append(entry.state == READY)
            if local:
                present = self._store.contains([refs[i]._id for i, _ in local])
                missing = []
                for (i, source), p in zip(local, present, strict=False):
                    ready_flags[i] = p
                    if not p and source and source != self.store_address:
                        missing.append((refs[i]._id, source))
                now = time.monotonic()
                if missing and now >= next_prefetch:
                    next_prefetch = now + 0.5
                    self._store.prefetch(missing)
            if sum(ready_flags) >= num_returns:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            with self._lock:
                step = 0.01 if local else 1.0
                self._cv.wait(step if remaining is None else min(step, remaining))
        ready, not_ready = [], []
        for ref, flag in zip(refs, ready_flags, strict=False):
            if flag and len(ready) < num_returns:
                ready.append(ref)
            else:
                not_ready.append(ref)
        return ready, not_ready

    # ------------------------------------------------------------- functions
    def export_function(self, pickled: bytes, name: str) -> bytes:
        """Put a pickled function or class in gcsd (once); return its key."""
        key = hashlib.sha1(pickled).digest()[:16]
        if key not in self._exported:
            self.gcs.table_put("functions", key, {"name": name, "pickled": pickled,
                                                  "job": self.job_id})
            self._exported.add(key)
        return key

    def fetch_function(self, key: bytes) -> Any:
        """The function or class exported under ``key`` (cached after first use)."""
        fn = self._fn_cache.get(key)
        if fn is None:
            record = self.gcs.table_get("functions", key)
            if record is None:
                raise RaySystemError(f"function {key.hex()} is not in the control store")
            import pickle

            fn = pickle.loads(record["pickled"])
            self._fn_cache[key] = fn
        return fn

    # ---------------------------------------------------------------- submit
    def submit(self, fn_key: bytes, name: str, args: tuple, kwargs: dict, *,
               num_returns: int, demand: dict, max_retries: int, retry_exceptions: Any,
               strategy: Any = None, extra: dict | None = None) -> list[ObjectRef]:
        """Submit a normal task; returns its return refs at once. ``extra``: more
        fields for the task message (the placement group it runs in)."""
        # Tasks share leases only with tasks of the same demand and strategy.
        key = None if strategy is None else ("task", *sorted(demand.items()),
                                             ("strategy", strategy_key(strategy)))
        return self._build_call(fn_key, name, args, kwargs, num_returns=num_returns,
                                demand=demand, max_retries=max_retries,
                                retry_exceptions=retry_exceptions, key=key, spec=extra,
                                strategy=strategy)

    def create_actor(self, actor_id: bytes, cls_key: bytes, class_name: str, args: tuple,
                     kwargs: dict, *, demand: dict, spec: dict) -> None:
        """Ask the raylet for an actor; returns at once (creation is asynchronous)."""
        refs = self._build_call(cls_key, class_name, args, kwargs, num_returns=1,
                                demand=demand, max_retries=0, retry_exceptions=False,
                                key=("create", actor_id), spec=spec)
        del refs  # creation has no return value; errors surface at method calls

    def submit_actor_call(self, actor_id: bytes, method: str, name: str, args: tuple,
                          kwargs: dict, *, num_returns: int, max_retries: int,
                          extra: dict | None = None) -> list[ObjectRef]:
        """Queue a method call on an actor, after every earlier call from here.
        ``extra``: more message fields (generator kind ``gen``, concurrency group ``cg``)."""
        msg_extra = {"method": method, "t": "call"}
        if extra:
            msg_extra.update(extra)
        return self._build_call(b"", name, args, kwargs, num_returns=num_returns, demand={},
                                max_retries=max_retries, retry_exceptions=False,
                                key=("actor", actor_id), spec=msg_extra)

    def submit_in_runtime_env(self, renv: tuple[str, dict], fn_key: bytes, name: str,
                              args: tuple, kwargs: dict, *, num_returns: int, demand: dict,
                              max_retries: int, retry_exceptions: Any, strategy: Any = None,
                              extra: dict | None = None) -> list[ObjectRef]:
        """``submit`` for a task with a runtime env ``(key, wire form)``: its own
        scheduling class, whose leases ask for workers started in that env."""
        key = ("task", *sorted(demand.items()), ("strategy", strategy_key(strategy)),
               ("renv", renv[0]))
        self._submitter.runtime_envs[key] = renv[1]
        return self._build_call(fn_key, name, args, kwargs, num_returns=num_returns,
                                demand=demand, max_retries=max_retries,
                                retry_exceptions=retry_exceptions, key=key, spec=extra,
                                strategy=strategy)

    def _build_call(self, fn_key: bytes, name: str, args: tuple, kwargs: dict, *,
                    num_returns: int, demand: dict, max_retries: int, retry_exceptions: Any,
                    key: tuple | None, spec: dict | None, strategy: Any = None
                    ) -> list[ObjectRef]:
        """Make a task, actor call or actor creation; queue it; return its refs
        (``num_returns="streaming"``: one ObjectRefGenerator, see generators.py)."""
        tid = os.urandom(16)
        streaming = num_returns == "streaming"
        if streaming:
            num_returns, spec = 1, {**(spec or {}), "gen": 1}
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
               "nret": num_returns, "job": self.job_id, "ca": self._me}
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
                self.escape(refs)
            out = []
            for oid in return_ids:
                self._refs.add(oid)
                out.append(ObjectRef(oid, self.pid, self.store_address))
            event = {"name": name, "fn": fn_key, "job": self.job_id, "nret": num_returns,
                     "deps": [r._id for _, r in deps], "owner_pid": self.pid,
                     "owner_node": self.node_id, "ty": _TASK_TYPES.get(key[0], 0)}
            if key[0] != "task":
                event["actor_id"] = key[1]
            task = Task(tid, key, demand, msg, deps, return_ids, max_retries, name, refs, event)
            if payload is not _EMPTY_ARGS:  # inline arguments: what keeping the spec costs
                task.size += len(payload[1]) + sum(len(b) for b in payload[2])
            self._tasks.add(task)
            self._refs.wait_for_args(task)
            if key[0] == "actor":
                self._actors.submit(task)
            elif key[0] == "create":
                self._actors.creating(task)
                if task.unresolved == 0:
                    self._enqueue(task)
            elif task.unresolved == 0:
                self._enqueue(task, strategy)
            elif strategy is not None:
                self._submitter.remember_strategy(key, strategy)
            if streaming:
                return [self._new_stream(tid, out[0])]
        return out

    def _enqueue(self, task: Task, strategy: Any = None) -> None:
        """Every owned argument of ``task`` is ready: send it on (lock held)."""
        kind = task.key[0]
        if kind == "actor":
            self._actors.pump(self._actors.actor(task.key[1]))
            return
        failed = self._refs.resolve_args(task)
        if failed is NOT_READY:  # an argument is being rebuilt: wait for it again
            self._refs.wait_for_args(task)
            return
        if failed is not None:
            if kind == "create":
                self._actors.creation_failed(task, failed)
            self._finish_error(task, failed)
        elif kind == "create":
            self._actors.send_create(task, self.job_id)
        else:
            self._submitter.enqueue(task, strategy)

    def _requeue(self, task: Task) -> None:
        """Run a task again (a retry), at the head of its queue."""
        if task.key[0] == "actor":
            self._actors.requeue(task)
        else:
            self._submitter.requeue(task)

    # ---------------------------------------------------------------- actors
    def actor_handle_added(self, actor_id: bytes) -> None:
        """Count a new ActorHandle in this process."""
        with self._lock:
            self._actors.handle_added(actor_id)

    def actor_handle_escaped(self, actor_id: bytes) -> None:
        """A handle was pickled: other processes may call the actor now."""
        with self._lock:
            self._actors.handle_escaped(actor_id)

    def actor_scoped_to_handles(self, actor_id: bytes) -> None:
        """The actor ends when its last handle here goes (unless one escaped)."""
        with self._lock:
            self._actors.scoped_to_handles(actor_id)

    def kill_actor(self, actor_id: bytes, no_restart: bool) -> None:
        """Kill an actor; no call made from here after this reaches it."""
        with self._lock:
            self._actors.kill(actor_id, no_restart)

    def exit_actor(self, cause: str, wait_s: float = 10.0) -> None:
        """Inside an actor (``exit_actor()``): our raylet marks the actor DEAD,
        no restart, and ends this process; never returns."""
        with self._lock:
            self._flush_events()
            self._io.raylet_send({"t": "kill_actor", "actor_id": self.current_actor_id,
                                  "no_restart": True, "cause": cause})
        time.sleep(wait_s)  # the raylet ends us; if it never does, exit anyway
        os._exit(0)

    # ---------------------------------------------------------------- cancel
    def cancel(self, ref: ObjectRef, force: bool) -> None:
        """Cancel the task that produces ``ref`` (queued: dropped; running: interrupted)."""
        with self._lock:
            task = self._tasks.cancel(ref._id[:16])
            if task is None:
                return
            lease = task.lease
            if isinstance(lease, ActorConn):
                if force:
                    raise ValueError("force=True cannot cancel an actor call; use kill()")
                return  # a running actor call is not interrupted (as in Ray for sync actors)
            if lease is None:
                # Queued or waiting for arguments: it never ran.
                self._finish_error(task, error_wire(
                    TaskCancelledError(f"task {task.name} was cancelled")))
                return
            self._submitter.cancel_running(task, lease, force)

    # ---------------------------------------------------------------- raylet
    def raylet_call(self, msg: dict, timeout: float = 10.0) -> dict:
        """A request/reply exchange with the raylet, answered via the I/O thread."""
        with self._lock:
            rid = msg["r"] = self._io.next_raylet_id()
            slot: list = [None]
            self._rpc[rid] = slot
            self._io.raylet_send(msg)
            deadline = time.monotonic() + timeout
            while slot[0] is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._io.closed:
                    self._rpc.pop(rid, None)
                    raise RaySystemError(f"raylet did not answer {msg['t']!r}")
                self._cv.wait(remaining)
            return slot[0]

    def _read_raylet(self) -> None:
        msgs, lost = self._io.recv_raylet()
        self._on_raylet_msgs(msgs)
        if lost:
            self._closed_by_raylet()

    def _on_raylet_msgs(self, msgs: list[dict]) -> None:
        for msg in msgs:
            rid = msg.get("r")
            slot = self._rpc.pop(rid, None)
            if slot is not None:
                slot[0] = msg
                self._cv.notify_all()
            elif rid is None and msg.get("t") == "lease_token":  # only our raylet says this
                self._lease_token = msg.get("tok")
                if self._on_lease_token is not None:
                    self._on_lease_token(self._lease_token)
            elif rid is None and "t" in msg:
                self._on_owner_notice(msg)
            else:
                self._on_raylet_reply(rid, msg)

    def watch_lease_token(self, callback: Any) -> None:
        """Call ``callback(token)`` with the raylet's current lease token for us,
        and again (on the I/O thread) each time it changes (a worker's gate)."""
        with self._lock:
            self._on_lease_token = callback
            # What came behind the raylet's answer to our hello, read with it.
            try:
                self._on_raylet_msgs(self._io.raylet._decoder.drain())
            except ProtocolError:
                pass  # the I/O thread meets the same stream and ends
            callback(self._lease_token)

    def _on_raylet_reply(self, rid: Any, msg: dict, source: RemoteRaylet | None = None) -> None:
        """A reply to an actor creation or a lease request (from ``source`` if not ours)."""
        if "brw" in msg:  # refs an actor's __init__ kept: count them before the
            self._on_borrows(msg["brw"])  # creation task lets its arguments go
        if not self._actors.on_raylet_reply(rid, msg):
            self._submitter.on_lease_reply(rid, msg, source)

    def _read_remote_raylet(self, rr: RemoteRaylet, msgs: list[dict] | None,
                            failed: str | None) -> None:
        for m in msgs or ():
            if m.get("t") == "pid_status":
                self._on_owner_notice(m)
            elif m.get("r") != 0:  # 0 is our hello
                self._on_raylet_reply(m.get("r"), m, rr)
        if failed is not None and self._io.drop_remote_raylet(rr):
            self._submitter.remote_raylet_lost(rr)
            self._actors.remote_raylet_lost(rr)

    def _closed_by_raylet(self) -> None:
        self._io.raylet_closed()
        err = error_wire(RaySystemError("lost the connection to the raylet"))
        for task in list(self._tasks.pending.values()):
            self._finish_error(task, err)
        self._actors.raylet_lost()
        self._cv.notify_all()

    # --------------------------------------------------------------- replies
    def _read_conn(self, conn: Conn) -> None:
        """Read replies from a leased worker or an actor (lock held)."""
        msgs, failed = self._io.recv(conn)
        if type(conn) is RemoteRaylet:
            self._read_remote_raylet(conn, msgs, failed)
            return
        if failed is not None:
            self._conn_lost(conn, failed)
            return
        if msgs is None:
            return
        for msg in msgs:
            t = msg.get("t")
            if t == "blk" and isinstance(conn, Lease):
                conn.blocked = bool(msg.get("on"))
                if not conn.blocked:
                    self._submitter.task_done_on(conn)
                continue
            if t == "gi":  # an item a streaming generator yielded
                self._on_stream_item(conn, msg)
                continue
            self._on_task_reply(conn, msg)
        if not conn.inflight:
            if isinstance(conn, Lease):
                conn.idle_since = time.monotonic()
            else:
                self._actors.idle(conn)  # type: ignore[arg-type]

    def _conn_lost(self, conn: Conn, why: str) -> None:
        if isinstance(conn, ActorConn):
            self._actors.conn_lost(conn, why)
        else:
            self._submitter.lease_failed(conn, why)  # type: ignore[arg-type]

    def _on_task_reply(self, conn: Conn, msg: dict) -> None:
        task = conn.inflight.pop(msg.get("tid"), None)
        if task is None:
            return
        if isinstance(conn, Lease):
            self._submitter.record_duration(conn, task, msg.get("dur"))
        status = msg.get("err", 0)
        if status and "lost" in msg and self._retry_after_rebuild(task, msg["lost"]):
            return
        outcome = self._tasks.on_reply(task, status)
        if outcome == task_manager.RETRY:
            self._requeue(task)
            return
        if outcome == task_manager.CANCELLED:
            self._finish_error(task, error_wire(
                TaskCancelledError(f"task {task.name} was cancelled")))
            return
        owned = self._refs.owned
        if "brw" in msg:  # before the task's own hold on its arguments goes
            self._on_borrows(msg["brw"])
        if "pld" in msg and isinstance(msg["pld"], list) and isinstance(msg.get("at"), str):
            self._refs.pulled(msg["pld"], msg["at"])
        nested = msg.get("nst")
        if nested and isinstance(nested, list):
            for item in nested:
                if isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) \
                        and 0 <= item[0] < len(task.return_ids):
                    self._on_nested(owned.get(task.return_ids[item[0]]), item[1])
        if "t0" in msg:
            self._tasks.annotate(task, task_events.where_it_ran(msg, conn, self.node_id))
        rets = msg.get("rets") or []
        for oid, ret in zip(task.return_ids, rets, strict=False):
            entry = owned.get(oid)
            if entry is None or entry.state == READY:
                continue
            if ret[0] == "v":
                entry.wire = ret[1]
            elif len(ret) > 1 and ret[1] and ret[1] != self.store_address:
                entry.loc = ret[1]  # on the worker's node; pulled when someone gets it
                entry.loc_size = ret[2] if len(ret) > 2 and isinstance(ret[2], int) else 0
            else:
                entry.buf = self._store.pin(oid)
                if entry.buf is None:
                    entry.wire = error_wire(ObjectLostError(
                        f"return value of {task.name} was evicted before its owner pinned it"))
            self._complete(oid, entry)
        self._task_done(task, "FAILED" if outcome == task_manager.FAILED else "FINISHED")

    def _retry_after_rebuild(self, task: Task, lost: Any) -> bool:
        """The task's worker found an argument of ours lost: rebuild it and run
        the task again once it is back (no retry spent). False if it cannot
        be rebuilt, so the task fails with the worker's error."""
        kind = task.key[0]
        if kind not in ("task", "actor") or task.cancelled or not isinstance(lost, bytes):
            return False
        entry = self._refs.owned.get(lost)
        if entry is None or entry.buf is not None or self._rebuild(lost) is not None:
            return False  # not ours, here all along, or beyond rebuilding
        task.lease = None
        self._tasks.mark(task, "PENDING_ARGS_AVAIL")
        self._refs.wait_for_args(task)
        if kind == "actor":
            # Back at the head of the actor's queue: it (and the calls after
            # it, to keep their order) leaves once the argument is back.
            self._actors.requeue(task)
        elif task.unresolved == 0:
            self._enqueue(task)
        cls = self._submitter.classes.get(task.key)
        if cls is not None:
            self._submitter.pump(cls)  # the lease's slot may take the next one
        return True

    def _complete(self, oid: bytes, entry: Entry) -> None:
        """An owned value arrived: promote it if it escaped, release waiting tasks."""
        promote, waiters = self._refs.complete(entry)
        if promote:
            try:
                self._store.promote(oid, entry)
            except Exception as exc:
                entry.wire = error_wire(ObjectStoreFullError(str(exc)))
        if waiters:
            for task in waiters:
                if type(task) is not Task:  # a ready-watch (generators.py)
                    task(oid, entry)
                    continue
                if self._tasks.dependency_ready(task):
                    self._enqueue(task)
        if self._refs.unreferenced(oid, entry):
            self._drop(oid, entry)

    def _finish_error(self, task: Task, wire: list) -> None:
        """Fail every pending return value of ``task`` with ``wire``; end it."""
        owned = self._refs.owned
        for oid in task.return_ids:
            entry = owned.get(oid)
            if entry is not None and entry.state != READY:
                entry.wire = wire
                self._complete(oid, entry)
        self._task_done(task, "FAILED")

    def _task_done(self, task: Task, state: str) -> None:
        lease = task.lease
        if state == "FINISHED" and task.retryable and task.key[0] == "task" and any(
                e is not None and (e.buf is not None or e.loc)
                for e in map(self._refs.owned.get, task.return_ids)):
            self._keep_lineage(task)
        else:
            self._tasks.done(task, state)
        self._cv.notify_all()
        if isinstance(lease, Lease):
            self._submitter.task_done(task)

    # ---------------------------------------------------------- housekeeping
    def _io_timeout(self) -> float:
        """How long the I/O thread may sleep: shorter while leases or actors need timers."""
        timeout = 0.05 if self._submitter.has_leases() else 0.2
        if self._actors.needs_polling():
            timeout = 0.02
        return timeout

    def _tick(self) -> None:
        """Timers, run by the I/O thread after every turn (lock held)."""
        now = time.monotonic()
        self._drain_released()
        refs = self._refs
        if refs.removals:
            self._notices.removals(refs.take_removals())
        if refs.remote_frees:
            self._store.free_remote(refs.remote_frees)
            refs.remote_frees = {}
        if self._notices.probe_due(now):
            keys = refs.borrower_keys()
            if keys:
                dead = self._notices.probe(keys)
                if dead:
                    self._forget_borrowers(dead.__contains__)
        self._submitter.return_idle_leases(now)
        if self._actors.actors:
            self._actors.poll(now)
        self._submitter.resend_cancels(now)
        if now - self._last_flush >= EVENT_FLUSH_S:
            if self._tasks.events or self._refs.object_events:
                self._flush_events()
            self._last_flush = time.monotonic()
        if self.running_probe is not None and now >= self._next_running_check:
            self._next_running_check = now + task_events.RUNNING_CHECK_S
            self._report_running()
        self._store.flush_releases()

    def flush_task_events(self) -> None:
        """Send the task and object rows owed to gcsd now (the timeline and state
        API read them; normally they go every 200 ms)."""
        with self._lock:
            self._flush_events()

    def _report_running(self) -> None:
        """A task has run here for a while: write its RUNNING row (once per task),
        so the state API shows it before its owner hears it finished."""
        row = task_events.running_row(self.running_probe(), self._running_reported,
                                      time.time(), self.pid, self.worker_id, self.node_id)
        if row is None:
            return
        key, value = row
        self._running_reported = key[:16]
        try:
            self.gcs.put_batch("tasks", [[key, value]], wait=False)
        except Exception:
            pass  # best-effort, like every task event

    def _flush_events(self) -> None:
        """Send task states and object locations to gcsd in one batch each.

        Best-effort observability and lineage: a gcsd hiccup never fails a task.
        """
        for table, events in (("tasks", self._tasks.take_events()),
                              ("objects", self._refs.take_object_events())):
            if not events:
                continue
            try:
                self.gcs.put_batch(table, [[k, v] for k, v in events.items()], wait=False)
            except Exception:
                pass

    # -------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Return leases, close connections, flush what gcsd is owed, stop the thread."""
        with self._lock:
            if self._io.closed:
                return
            self._io.stop()
            self._cv.notify_all()
            self._submitter.shutdown()
            self._actors.shutdown()
        self._io.join(timeout=2)
        self._io.close_remote_raylets()
        self._actors.close()
        self._flush_events()
        self._io.close_raylet()
        self._store.close()
        self.gcs.close()
        self._io.close()
        if object_ref._incref == self._refs.incref:
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


_EMPTY_ARGS = serialization.serialize(((), {})).to_wire()


def _lost_error(oid: bytes, why: str) -> ObjectLostError:
    """The error for a lost object that cannot be rebuilt, by Ray's names."""
    if why == "exhausted":
        return ObjectReconstructionFailedMaxAttemptsExceededError(
            f"object {oid.hex()} was lost and its task has no retries left to rebuild it")
    if why == "evicted":
        return ObjectReconstructionFailedLineageEvictedError(
            f"object {oid.hex()} was lost and the spec of the task that made it was "
            "evicted to bound lineage memory")
    return ObjectLostError(f"object {oid.hex()} was lost: every copy is gone and it cannot "
                           "be rebuilt (made by put, or by a task with max_retries=0)")
