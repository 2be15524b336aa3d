"""Tasks this process submitted and has not seen finish: specs, retries, outcomes.

Theory of operation
-------------------
Every task, actor call and actor creation is a :class:`Task` from submission
until its return values are settled. The manager holds the pending ones by
task id (the first 16 bytes of each of its return ids), so a return ref leads
back to its task.

*Lineage record.* Each task keeps its spec (name, function, job, number of
returns, argument ids, owner) as ``event``. Every state change (PENDING,
RUNNING, FINISHED, FAILED) queues the whole row with the new state for
gcsd's ``tasks`` table; the core worker sends the queue in one batch every
200 ms. A batch entry replaces the row, so each carries the full spec: this
is the record later issues reconstruct lost objects from.

*Outcomes.* A worker's reply, or the loss of the connection a task ran on,
becomes one decision: RETRY (the caller requeues it), CANCELLED, FINISHED or
FAILED. ``max_retries`` counts down on crashes and, with
``retry_exceptions``, on exceptions the worker marked retryable. A cancelled
task is never retried.

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


class Task:
    """One submitted task, actor call or actor creation."""

    __slots__ = ("tid", "key", "demand", "msg", "deps", "unresolved", "return_ids",
                 "retries_left", "lease", "cancelled", "name", "args_hold", "event")

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


class TaskManager:
    """Pending tasks by id, and the task rows owed to gcsd."""

    def __init__(self) -> None:
        self.pending: dict[bytes, Task] = {}
        self.events: dict[bytes, dict] = {}  # task id -> latest row, for gcsd

    def add(self, task: Task) -> None:
        self.pending[task.tid] = task
        self.mark(task, "PENDING")

    def get(self, tid: bytes) -> Task | None:
        return self.pending.get(tid)

    def mark(self, task: Task, state: str) -> None:
        """Queue the task's full row with its new state for the next gcsd batch."""
        ev = self.events.get(task.tid)
        if ev is None:
            ev = self.events[task.tid] = dict(task.event)
        ev["state"] = state

    def take_events(self) -> dict[bytes, dict]:
        events, self.events = self.events, {}
        return events

    def dependency_ready(self, task: Task) -> bool:
        """One of the task's pending arguments is ready: may it go now?"""
        task.unresolved -= 1
        return task.unresolved == 0 and not task.cancelled

    def on_reply(self, task: Task, status: int) -> int:
        """The worker answered (``status`` is its ``err`` field): what now?"""
        if status == _RETRYABLE and task.retries_left > 0 and not task.cancelled:
            task.retries_left -= 1
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
        if task.retries_left > 0:
            task.retries_left -= 1
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
