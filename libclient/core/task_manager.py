"""Tasks this process submitted and has not seen finish: specs, retries, outcomes.

Theory of operation
-------------------
Every task, actor call and actor creation is a :class:`Task` from submission
until its return values are settled. The manager holds the pending ones by
task id (the first 16 bytes of each of its return ids), so a return ref leads
back to its task.

*Lineage record.* Each task keeps its spec (name, function, job, number of
returns, argument ids, owner) as ``event``. Every state change (Ray's
PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT, SUBMITTED_TO_WORKER, FINISHED,
FAILED) queues the whole row with the new state for gcsd's ``tasks`` table;
the core worker sends the queue in one batch every 200 ms. A batch entry
replaces the row, so each carries the full spec: this is the record later
issues reconstruct lost objects from. The row also keeps when it first
entered each state (``ts``, from the injected clock) and, once a worker
answered, where and when it ran (``x``): the state API and the timeline
read these (task_events.py).

*Outcomes.* A worker's reply, or the loss of the connection a task ran on,
becomes one decision: RETRY (the caller requeues it), CANCELLED, FINISHED or
FAILED. ``max_retries`` counts down on crashes and, with
``retry_exceptions``, on exceptions the worker marked retryable. A cancelled
task is never retried.

*Lineage (Ray 2's owner-driven recovery).* A finished normal task whose
returns went to a store and that may still be retried (``max_retries`` left,
-1 meaning no limit) is kept in ``lineage`` while any of its returns is
owned, so a lost return can be rebuilt by running it again. Its owned
arguments are held by lineage counts (``Entry.lineage``, see references.py):
their values may be freed once nothing else holds them, but their entries
and their own lineage stay, so a chain can be rebuilt from its start. The
total is bounded: past ``MAX_LINEAGE_BYTES`` (estimated spec sizes) the
oldest specs are dropped until half remains, and their returns can no
longer be rebuilt (ObjectReconstructionFailedLineageEvictedError).

Pure: no sockets, no threads; the core worker calls in under its lock.
"""

from __future__ import annotations

from typing import Any

RETRY = 0
CANCELLED = 1
FINISHED = 2
FAILED = 3

# The worker's "err" field: 0 ok, 1 raised, 2 raised and retryable.
_RETRYABLE = 2

# When a row first entered each state: ``ts[i]`` for TS_STATES[i] (FINISHED and
# FAILED share the last slot). task_events.merge_rows turns it into ``times``.
TS_STATES = ("PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER", "END")
_TS_INDEX = {"PENDING_ARGS_AVAIL": 0, "PENDING_NODE_ASSIGNMENT": 1, "SUBMITTED_TO_WORKER": 2,
             "FINISHED": 3, "FAILED": 3}

MAX_LINEAGE_BYTES = 256 * 1024 * 1024
_SPEC_OVERHEAD = 512  # bytes a kept spec costs beyond its inline arguments
_EVICTED_MEMORY = 100_000  # evicted task ids remembered, for the error's name


class Task:
    """One submitted task, actor call or actor creation."""

    __slots__ = ("tid", "key", "demand", "msg", "deps", "unresolved", "return_ids",
                 "retries_left", "lease", "cancelled", "name", "args_hold", "event",
                 "lineage_deps", "size", "retryable")

    def __init__(self, tid: bytes, key: tuple, demand: dict, msg: dict, deps: list,
                 return_ids: list[bytes], retries: int, name: str, args_hold: Any,
                 event: dict | None = None) -> None:
        self.tid = tid
        self.key = key  # ("task", *demand) | ("actor", actor_id) | ("create", actor_id)
        self.demand = demand
        self.msg = msg  # the message pushed to the worker
        self.deps = deps  # [(slot, ObjectRef)]
        self.unresolved = 0  # owned arguments still pending
        self.return_ids = return_ids
        self.retries_left = retries
        self.lease: Any = None  # the connection it runs on (a lease or an actor)
        self.cancelled = False
        self.name = name
        self.args_hold = args_hold  # keeps arg refs alive until the task ends
        self.event: dict = event or {}  # the task's row in gcsd's tasks table, less its state
        # while kept for lineage: [(slot or None if nested, oid, owner pid, owner store)]
        self.lineage_deps: list[tuple] | None = None
        self.size = _SPEC_OVERHEAD  # estimated bytes, for the lineage bound
        self.retryable = retries != 0  # may ever run again (kept for lineage if so)


class TaskManager:
    """Pending tasks by id, and the task rows owed to gcsd."""

    def __init__(self, clock: Any = None) -> None:
        # Wall clock for the rows' state times (injected: this module reads no clock).
        self.clock = clock if clock is not None else _no_clock
        self.pending: dict[bytes, Task] = {}
        self.events: dict[bytes, dict] = {}  # task id -> latest row, for gcsd
        self.lineage: dict[bytes, Task] = {}  # finished tasks kept to rebuild returns
        self.lineage_bytes = 0
        self.max_lineage_bytes = MAX_LINEAGE_BYTES
        self.evicted: dict[bytes, None] = {}  # recently evicted lineage (ordered set)
        self.reruns = 0  # tasks sent again: retries after a crash or error, and rebuilds

    def add(self, task: Task) -> None:
        self.pending[task.tid] = task
        self.mark(task, "PENDING_ARGS_AVAIL")

    def get(self, tid: bytes) -> Task | None:
        return self.pending.get(tid)

    def mark(self, task: Task, state: str) -> None:
        """Queue the task's full row with its new state for the next gcsd batch."""
        ev = self.events.get(task.tid)
        if ev is None:
            ev = self.events[task.tid] = dict(task.event)
        ev["state"] = state
        ts = task.event.get("ts")
        if ts is None:  # a flat list: cheap to encode here and to store in gcsd
            ts = task.event["ts"] = ev["ts"] = [0.0, 0.0, 0.0, 0.0]
        i = _TS_INDEX.get(state)
        if i is not None and not ts[i]:  # first entry into a state (a retry keeps the first)
            ts[i] = self.clock()

    def annotate(self, task: Task, fields: dict) -> None:
        """Add fields to the task's row (where it ran, say), queued or not."""
        task.event.update(fields)
        ev = self.events.get(task.tid)
        if ev is not None:
            ev.update(fields)

    def take_events(self) -> dict[bytes, dict]:
        events, self.events = self.events, {}
        return events

    def dependency_ready(self, task: Task) -> bool:
        """One of the task's pending arguments is ready: may it go now?"""
        task.unresolved -= 1
        return task.unresolved == 0 and not task.cancelled

    def on_reply(self, task: Task, status: int) -> int:
        """The worker answered (``status`` is its ``err`` field): what now?"""
        if status == _RETRYABLE and task.retries_left != 0 and not task.cancelled:
            _spend(task)
            self.reruns += 1
            task.lease = None
            return RETRY
        if status:
            return CANCELLED if task.cancelled else FAILED
        return FINISHED

    def on_connection_lost(self, task: Task) -> int:
        """The worker or actor running ``task`` went away: RETRY, CANCELLED or FAILED."""
        task.lease = None
        if task.cancelled:
            return CANCELLED
        if task.retries_left != 0:
            _spend(task)
            self.reruns += 1
            return RETRY
        return FAILED

    def cancel(self, tid: bytes) -> Task | None:
        """Mark a pending task cancelled (it will not retry); None if it is not pending."""
        task = self.pending.get(tid)
        if task is None:
            return None
        task.cancelled = True
        task.retries_left = 0
        return task

    def done(self, task: Task, state: str) -> None:
        """The task's return values are settled: forget it and let its arguments go."""
        self.pending.pop(task.tid, None)
        task.args_hold = None
        task.deps = []
        self.mark(task, state)

    # --------------------------------------------------------------- lineage
    def keep(self, task: Task, deps: list[tuple]) -> list[Task]:
        """Keep a finished task to rebuild its returns (``deps`` as in
        ``lineage_deps``). Returns the older specs evicted to stay in bounds;
        the caller releases their lineage holds."""
        task.lineage_deps = deps
        task.lease = None
        self.lineage[task.tid] = task
        self.lineage_bytes += task.size
        evicted = []
        if self.lineage_bytes > self.max_lineage_bytes:
            for tid in list(self.lineage):
                if self.lineage_bytes <= self.max_lineage_bytes // 2:
                    break
                old = self.forget(tid)
                if old is not None:
                    evicted.append(old)
                    self.evicted[tid] = None
            while len(self.evicted) > _EVICTED_MEMORY:
                del self.evicted[next(iter(self.evicted))]
        return evicted

    def forget(self, tid: bytes) -> Task | None:
        """Drop a kept task (none of its returns is owned any more)."""
        task = self.lineage.pop(tid, None)
        if task is not None:
            self.lineage_bytes -= task.size
        return task

    def resubmit(self, tid: bytes) -> Task | str:
        """A return of kept task ``tid`` was lost: take the task to run again,
        spending one retry. Otherwise say why not: "evicted", "exhausted" or
        "none" (a put, an actor call, or a task with max_retries=0)."""
        task = self.lineage.get(tid)
        if task is None:
            return "evicted" if tid in self.evicted else "none"
        if task.retries_left == 0:
            return "exhausted"
        _spend(task)
        self.reruns += 1
        self.forget(tid)
        task.cancelled = False
        self.pending[tid] = task
        self.mark(task, "PENDING_ARGS_AVAIL")
        return task


def _no_clock() -> float:
    return 0.0


def _spend(task: Task) -> None:
    """One more run of ``task`` (a retry or a rebuild); -1 means no limit."""
    if task.retries_left > 0:
        task.retries_left -= 1
