"""Normal tasks: scheduling classes, worker leases, pipelining, cancel.

Theory of operation
-------------------
Tasks with the same resource demand share a scheduling class
(:class:`SchedulingClass`). For a class with queued tasks the submitter asks
the raylet for worker leases (``lease {res}``, at most 16 requests in
flight per class), connects straight to each leased worker's socket and
pushes task messages to it; replies come straight back on that socket. The
raylet schedules leases, never individual tasks (Ray 2's design).

*Pipelining.* When a class's tasks are short (an EWMA of their execution
time), several go to one worker at once, so that at most ~2 ms of work
waits behind another task; long tasks go one at a time.

*Idle leases* go back to the raylet after 5 ms, so a tight loop of
synchronous tasks keeps reusing one lease.

*Spillback.* A class may carry a scheduling strategy (part of its key). Our
raylet may answer a lease request with ``spill`` and another node's raylet
address; the submitter then asks that raylet over TCP (``grant_or_reject``),
and serves a grant from it over TCP to the worker's port. Returns and
cancels go to the raylet that granted or holds the request; a lost remote
raylet sends its waiting requests back to ours.

*Failures.* A leased worker's socket closing fails or retries what it was
running (per the task manager's decision) and hands the lease back with
``kill``. A refused lease (infeasible demand, no worker could start) fails
the class's queue instead of letting it hang.

*Cancel.* A queued task is dropped when it reaches the head of the queue.
A running one gets a ``cancel`` message, then SIGINT, repeated every 200 ms
until its reply comes back (the signal can outrun the message, or reach the
worker before it starts the task); ``force`` kills the worker.
"""

from __future__ import annotations

import collections
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from libclient.core import task_manager
from libclient.core.errors import error_wire
from libclient.core.io_loop import Conn, IoLoop, RemoteRaylet, connect_worker
from libclient.core.references import ReferenceTable
from libclient.core.task_manager import Task, TaskManager
from libclient.exceptions import (
    RaySystemError,
    RuntimeEnvSetupError,
    TaskCancelledError,
    WorkerCrashedError,
)
from libclient.protocol import pack

LEASE_IDLE_S = 0.005
MAX_LEASE_REQUESTS = 16
TARGET_PIPELINE_S = 0.002
# Tasks this short still get a second one queued behind them, so the worker
# never waits a round trip for its next task; a longer one runs alone.
PIPELINE_TWO_S = 0.05
MAX_DEPTH = 16
CANCEL_RESEND_S = 0.2
_LOCALITY_MIN_BYTES = 1 << 20
_UNKNOWN = float("inf")  # expected run time of a function not seen yet


class Lease(Conn):
    """A worker leased from a raylet, and the connection straight to it."""

    __slots__ = ("lease_id", "worker_id", "pid", "key", "gpus", "idle_since", "raylet",
                 "blocked", "slowest")

    def __init__(self, lease_id: int, worker_id: bytes, pid: int, sock: socket.socket,
                 key: tuple, gpus: list[int], raylet: RemoteRaylet | None = None) -> None:
        super().__init__(sock)
        self.raylet = raylet  # the raylet that granted it, if not ours
        self.lease_id = lease_id
        self.worker_id = worker_id
        self.pid = pid
        self.key = key
        self.gpus = gpus
        self.idle_since = time.monotonic()
        self.blocked = False  # its running task waits in get: queue nothing behind it
        self.slowest = 0.0  # longest expected run among tasks pushed since it was idle


class SchedulingClass:
    """Tasks of one resource demand, and the leases that serve them."""

    __slots__ = ("key", "demand", "queue", "leases", "requests", "fn_time", "strategy")

    def __init__(self, key: tuple, demand: dict, strategy: Any = None) -> None:
        self.key = key
        self.demand = demand
        self.strategy = strategy  # wire form (scheduling_strategies.to_wire), None: DEFAULT
        self.queue: collections.deque[Task] = collections.deque()
        self.leases: list[Lease] = []
        self.requests: set[int] = set()  # raylet request ids of lease requests in flight
        self.fn_time: dict[bytes, float] = {}  # function -> EWMA of execution seconds

    def room(self, lease: Lease, task: Task) -> bool:
        """May ``task`` be queued on ``lease`` now?

        An idle worker always takes it. Behind running tasks only if every
        one of them is of a function known to be short, so a task never
        waits behind a long or unknown one: up to 50 ms tasks get one queued
        behind (hiding the reply's round trip), and tasks of ~2 ms or less
        as many as fill 2 ms. Never behind a task that waits in ``get``: it
        may wait for exactly the task we would queue.
        """
        n = len(lease.inflight)
        if n == 0:
            return True
        if lease.blocked or n >= MAX_DEPTH:
            return False
        slowest = lease.slowest
        if slowest > PIPELINE_TWO_S:
            return False
        own = self.fn_time.get(task.msg.get("fn", b""))
        if own is None:
            return n < 2
        return n < max(2, int(TARGET_PIPELINE_S / max(slowest, own, 1e-6)))


class TaskSubmitter:
    """Queues normal tasks per scheduling class and runs them on leased workers."""

    def __init__(self, io: IoLoop, refs: ReferenceTable, tasks: TaskManager,
                 finish_error: Callable[[Task, list], None], gcs: Any = None) -> None:
        self._io = io
        self._gcs = gcs  # node table, to name the nodes that hold arguments
        self._store_nodes: dict[str, bytes] = {}  # store address -> node id
        self._refs = refs
        self._tasks = tasks
        self._finish_error = finish_error  # fail a task's returns and end it
        self.classes: dict[tuple, SchedulingClass] = {}
        self._lease_reqs: dict[int, SchedulingClass] = {}  # raylet request id -> class
        self._cancelling: dict[bytes, tuple[Task, float]] = {}  # tid -> (task, next SIGINT)
        self._strategies: dict[tuple, Any] = {}  # class key -> strategy, until it is made
        self._lease_at: dict[int, RemoteRaylet] = {}  # request id -> raylet it went to
        # Runtime envs (renv) of classes that have one: their leases ask for
        # workers started in that env (wire form, libclient.runtime_env.spec).
        self.runtime_envs: dict[tuple, dict] = {}

    def has_leases(self) -> bool:
        return any(c.leases for c in self.classes.values())

    # ---------------------------------------------------------------- queue
    def remember_strategy(self, key: tuple, strategy: Any) -> None:
        """A task of a new class waits for arguments: its class, once made, uses ``strategy``."""
        self._strategies[key] = strategy

    def enqueue(self, task: Task, strategy: Any = None) -> None:
        """A task whose arguments are resolved joins its class's queue."""
        cls = self.classes.get(task.key)
        if cls is None:
            cls = self.classes[task.key] = SchedulingClass(
                task.key, task.demand, strategy or self._strategies.pop(task.key, None))
        self._tasks.mark(task, "PENDING_NODE_ASSIGNMENT")
        cls.queue.append(task)
        self.pump(cls)

    def requeue(self, task: Task) -> None:
        """A task to retry goes to the head of its class's queue."""
        cls = self.classes.get(task.key)
        if cls is None:
            cls = self.classes[task.key] = SchedulingClass(task.key, task.demand)
        cls.queue.appendleft(task)
        self.pump(cls)

    def task_done_on(self, lease: Lease) -> None:
        """A lease's task stopped waiting: it may take queued tasks again."""
        cls = self.classes.get(lease.key)
        if cls is not None:
            self.pump(cls)

    def task_done(self, task: Task) -> None:
        """A task that ran on a lease ended: its slot may take the next one."""
        cls = self.classes.get(task.key)
        if cls is not None:
            self.pump(cls)

    def pump(self, cls: SchedulingClass) -> None:
        """Push queued tasks to leased workers; ask for more leases if needed."""
        while cls.queue:
            task = cls.queue[0]
            if task.cancelled:
                cls.queue.popleft()
                continue
            best = None
            for lease in cls.leases:
                if not lease.dead and (best is None or len(lease.inflight) < len(best.inflight)) \
                        and cls.room(lease, task):
                    best = lease
            if best is None:
                break
            cls.queue.popleft()
            expected = cls.fn_time.get(task.msg.get("fn", b""), _UNKNOWN)
            best.slowest = max(best.slowest, expected) if best.inflight else expected
            self._push(best, task)
        want = min(len(cls.queue), MAX_LEASE_REQUESTS) - len(cls.requests)
        for _ in range(want):
            self._request_lease(cls)
        if not cls.queue and cls.requests:
            for rid in cls.requests:
                self._io.send_to(self._lease_at.get(rid), {"t": "cancel_lease", "lease_r": rid})
            cls.requests.clear()  # a grant that still arrives is handed back

    def _push(self, lease: Lease, task: Task) -> None:
        task.lease = lease
        lease.inflight[task.tid] = task
        if lease.gpus:
            task.msg["gpus"] = lease.gpus
        self._tasks.mark(task, "SUBMITTED_TO_WORKER")
        self._io.write(lease, pack(task.msg))

    def _request_lease(self, cls: SchedulingClass) -> None:
        if self._io.raylet_lost:
            err = error_wire(RaySystemError("lost the connection to the raylet"))
            while cls.queue:
                self._finish_error(cls.queue.popleft(), err)
            return
        rid = self._io.next_raylet_id()
        cls.requests.add(rid)
        self._lease_reqs[rid] = cls
        msg = {"t": "lease", "r": rid, "res": cls.demand}
        if self.runtime_envs and cls.key in self.runtime_envs:  # renv: workers of its env
            msg["renv"] = self.runtime_envs[cls.key]
        if cls.strategy is not None:
            msg["strategy"] = cls.strategy
        elif cls.queue and cls.queue[0].deps:
            locality = self._locality(cls.queue[0])
            if locality:
                msg["locality"] = locality
        self._io.raylet_send(msg)

    def _locality(self, task: Task) -> dict[bytes, int]:
        """Argument bytes per node id for the raylet's policy, which prefers the
        node holding most of them (the Ray paper's locality-aware placement).
        Only sizeable arguments (>= 1 MiB) are worth moving the task for."""
        by_store = self._refs.arg_bytes(task)
        if not by_store or max(by_store.values()) < _LOCALITY_MIN_BYTES:
            return {}
        nodes = self._store_nodes
        if any(addr not in nodes for addr in by_store):
            try:
                nodes.update({n["store_address"]: n["node_id"] for n in self._gcs.get_nodes()
                              if n.get("store_address") and n.get("state") == "ALIVE"})
            except Exception:
                return {}
        return {nodes[a]: b for a, b in by_store.items() if a in nodes and b}

    # --------------------------------------------------------------- leases
    def on_lease_reply(self, rid: int, msg: dict, source: RemoteRaylet | None = None) -> None:
        """A raylet (ours, or ``source``) answered a lease request: connect,
        ask elsewhere, or fail the queue."""
        cls = self._lease_reqs.pop(rid, None)
        self._lease_at.pop(rid, None)
        if cls is None:
            if msg.get("ok"):  # granted after we stopped wanting it
                self._io.send_to(source, {"t": "return_lease", "lease_id": msg["lease_id"],
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
                err = error_wire(RuntimeEnvSetupError(  # renv: the env could not be set up
                    f"the runtime_env could not be set up: {msg.get('msg', '')}")
                    if error == "runtime_env_setup_failed" else RaySystemError(
                    f"the raylet refused a lease ({error}): {msg.get('msg', '')}"))
                while cls.queue:
                    self._finish_error(cls.queue.popleft(), err)
            return
        if not cls.queue:
            self._io.send_to(source, {"t": "return_lease", "lease_id": msg["lease_id"],
                                   "kill": False})
            return
        try:
            sock = connect_worker(msg, remote=source is not None)
        except OSError:
            self._io.send_to(source, {"t": "return_lease", "lease_id": msg["lease_id"],
                                   "kill": True})
            self.pump(cls)
            return
        lease = Lease(msg["lease_id"], msg["worker_id"], msg["pid"], sock, cls.key,
                      msg.get("gpus") or [], source)
        cls.leases.append(lease)
        self._io.register(lease)
        # The worker serves only a connection that opens with the grant's token
        # (lease_gate.py); the first tasks follow it at once, unanswered.
        self._io.write(lease, pack({"t": "hi", "tok": msg.get("tok") or b""}))
        self.pump(cls)

    # ------------------------------------------------------------ spillback
    def _spill(self, cls: SchedulingClass, msg: dict) -> None:
        """Ask the raylet our raylet named, which grants or queues (never spills again)."""
        address = msg.get("raylet_address") or ""
        rr = self._io.remote_raylet(address, msg.get("node_id") or b"")
        if rr is None:
            self._request_lease(cls)  # cannot reach it: our raylet decides again
            return
        rid = self._io.next_raylet_id()
        cls.requests.add(rid)
        self._lease_reqs[rid] = cls
        self._lease_at[rid] = rr
        req = {"t": "lease", "r": rid, "res": cls.demand, "grant_or_reject": True}
        if self.runtime_envs and cls.key in self.runtime_envs:  # renv: workers of its env
            req["renv"] = self.runtime_envs[cls.key]
        if cls.strategy is not None:
            req["strategy"] = cls.strategy
        self._io.write(rr, pack(req))

    def remote_raylet_lost(self, rr: RemoteRaylet) -> None:
        """Its node is gone (or the link is): ask our own raylet again for what waited there.

        Leases it granted fail through their own worker connections.
        """
        for rid, at in list(self._lease_at.items()):
            if at is rr:
                del self._lease_at[rid]
                cls = self._lease_reqs.pop(rid, None)
                if cls is not None:
                    cls.requests.discard(rid)
                    self.pump(cls)

    def record_duration(self, lease: Lease, task: Task, dur: object) -> None:
        """Feed a reply's execution time into its function's pipelining estimate."""
        cls = self.classes.get(lease.key)
        if cls is not None and isinstance(dur, float):
            fn = task.msg.get("fn", b"")
            old = cls.fn_time.get(fn)
            cls.fn_time[fn] = dur if old is None else 0.8 * old + 0.2 * dur

    def lease_failed(self, lease: Lease, why: str) -> None:
        """The leased worker's socket closed: retry or fail what it was running."""
        if lease.dead:
            return
        lease.dead = True
        self._io.close_conn(lease)
        cls = self.classes.get(lease.key)
        if cls is not None and lease in cls.leases:
            cls.leases.remove(lease)
        self._io.send_to(lease.raylet, {"t": "return_lease", "lease_id": lease.lease_id,
                                     "kill": True})
        for task in list(lease.inflight.values()):
            outcome = self._tasks.on_connection_lost(task)
            if outcome == task_manager.RETRY:
                self.requeue(task)
            elif outcome == task_manager.CANCELLED:
                self._finish_error(task, error_wire(
                    TaskCancelledError(f"task {task.name} was cancelled")))
            else:
                self._finish_error(task, error_wire(WorkerCrashedError(
                    f"the worker (pid {lease.pid}) running {task.name} died ({why}) "
                    "and no retries were left")))
        lease.inflight.clear()
        if cls is not None:
            self.pump(cls)

    def return_idle_leases(self, now: float) -> None:
        for cls in self.classes.values():
            if cls.queue:
                continue
            for lease in list(cls.leases):
                if lease.inflight or lease.dead:
                    lease.idle_since = now
                    continue
                if now - lease.idle_since >= LEASE_IDLE_S:
                    lease.dead = True
                    cls.leases.remove(lease)
                    self._io.close_conn(lease)
                    self._io.send_to(lease.raylet, {"t": "return_lease",
                                                 "lease_id": lease.lease_id, "kill": False})

    def return_idle_leases_of(self, wanted: Callable[[dict], bool]) -> None:
        """Return at once the idle leases of classes whose demand ``wanted`` picks
        (a placement group about to be removed: its raylet would kill them).
        Classes left with nothing go too: each group makes its own."""
        for key, cls in list(self.classes.items()):
            if cls.queue or not wanted(cls.demand):
                continue
            for lease in list(cls.leases):
                if not lease.inflight and not lease.dead:
                    lease.dead = True
                    cls.leases.remove(lease)
                    self._io.close_conn(lease)
                    self._io.send_to(lease.raylet, {"t": "return_lease",
                                                 "lease_id": lease.lease_id, "kill": False})
            if not cls.leases and not cls.requests:
                del self.classes[key]

    # --------------------------------------------------------------- cancel
    def cancel_running(self, task: Task, lease: Lease, force: bool) -> None:
        """Interrupt a task running on ``lease`` (already marked cancelled)."""
        if force:
            try:
                os.kill(lease.pid, 9)
            except ProcessLookupError:
                pass
            return
        self._io.write(lease, pack({"t": "cancel", "tid": task.tid}))
        _interrupt(lease)
        # The signal can outrun the message (still in our buffer) or reach
        # the worker before it starts the task: repeat it until the task's
        # reply comes back.
        self._cancelling[task.tid] = (task, time.monotonic() + CANCEL_RESEND_S)

    def resend_cancels(self, now: float) -> None:
        if not self._cancelling:
            return
        for tid, (task, due) in list(self._cancelling.items()):
            lease = task.lease
            if not isinstance(lease, Lease) or lease.dead or tid not in lease.inflight:
                del self._cancelling[tid]
            elif now >= due:
                _interrupt(lease)
                self._cancelling[tid] = (task, now + CANCEL_RESEND_S)

    # ------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Close every lease and hand it back (killing workers still busy)."""
        for cls in self.classes.values():
            for lease in cls.leases:
                lease.dead = True
                try:
                    lease.sock.close()
                except OSError:
                    pass
                self._io.send_to(lease.raylet, {"t": "return_lease",
                                             "lease_id": lease.lease_id,
                                             "kill": bool(lease.inflight)})


def strategy_key(strategy: Any) -> Any:
    """A hashable form of a strategy's wire form, for scheduling-class keys."""
    if isinstance(strategy, dict):
        return tuple(sorted(strategy.items()))
    return strategy


def _interrupt(lease: Lease) -> None:
    try:
        os.kill(lease.pid, 2)  # SIGINT: the worker checks which task it runs
    except ProcessLookupError:
        pass
