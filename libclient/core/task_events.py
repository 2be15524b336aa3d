"""Task events: the rows of gcsd's ``tasks`` table, who writes them, how they merge.

Theory of operation
-------------------
Ray 2 has owners and executors send task state changes to the GCS in
batches. Shoal does the same with as little new traffic as it can:

* **The owner** already batches every task's row to gcsd every 200 ms (the
  lineage record, ``task_manager``), keyed by the 16-byte task id. Each row
  carries the spec, the state (Ray's PENDING_ARGS_AVAIL,
  PENDING_NODE_ASSIGNMENT, SUBMITTED_TO_WORKER, then FINISHED or FAILED),
  ``ts`` (when it first entered each state, wall clock) and, once the
  worker answered, ``x``: ``[t0, args_s, run_s, pid, worker id, node]`` —
  when the worker took the task, how long fetching its arguments took, how
  long the whole run took, and where (the owner knows the worker from the
  lease or the actor's row). Both are flat lists, so the rows stay cheap to
  encode and for gcsd to store; readers spell them out (:func:`expand`). The worker adds ``t0`` (and ``af`` when the task
  had arguments by reference) to its ``done`` reply: two floats, no new
  message, no gcsd write from the worker for a task that ends quickly.
* **The executor** writes one row of its own, key ``task id + b"R"``, only
  for a task that has been running for ``RUNNING_AFTER_S``: a worker's I/O
  thread looks at what it runs once per ``RUNNING_CHECK_S``. So a long task
  shows RUNNING within about a second, at a cost of at most one small write
  per second per busy worker.

A reader (the state API, the timeline) scans the table and merges the two
kinds of row per task (:func:`merge_rows`): the owner's terminal state wins;
an executor's RUNNING row makes a not-yet-finished task RUNNING.

Pure: no sockets, no clocks; callers pass times in.
"""

from __future__ import annotations

from typing import Any

from libclient.core.task_manager import TS_STATES

RUNNING_CHECK_S = 1.0
RUNNING_AFTER_S = 0.5
RUNNING_SUFFIX = b"R"

TERMINAL = ("FINISHED", "FAILED")
# Ray's task types, by the code owners store (``ty``).
TYPES = ("NORMAL_TASK", "ACTOR_TASK", "ACTOR_CREATION_TASK")
# Ray's task states, in the order a task goes through them.
STATES = ("PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT", "SUBMITTED_TO_WORKER", "RUNNING",
          "FINISHED", "FAILED")


def where_it_ran(reply: dict, conn: Any, here: bytes) -> dict:
    """The owner's note of a worker's ``done`` reply: when and where it ran, as
    one flat list ``x`` = [t0, args_s, run_s, worker pid, worker id, node id].

    ``conn`` is the lease (worker pid/id, and the remote raylet it came from)
    or the actor connection (pid and node from the actor's row)."""
    node = getattr(conn, "node_id", None)
    if not node:
        rr = getattr(conn, "raylet", None)
        node = getattr(rr, "node_id", None) or here
    return {"x": [reply.get("t0", 0.0), reply.get("af", 0.0), reply.get("dur", 0.0),
                  getattr(conn, "pid", 0) or 0, getattr(conn, "worker_id", b"") or b"", node]}


def expand(row: dict) -> dict:
    """An owner's stored row with its compact fields (``ts``, ``x``, ``ty``)
    spelled out: ``times`` by state name, ``exec``, worker pid/id, node, type."""
    out = dict(row)
    ts = out.pop("ts", None)
    if isinstance(ts, list) and len(ts) == len(TS_STATES):
        end = "FAILED" if out.get("state") == "FAILED" else "FINISHED"
        out["times"] = {(end if name == "END" else name): t
                        for name, t in zip(TS_STATES, ts, strict=True)
                        if isinstance(t, (int, float)) and t > 0}
    x = out.pop("x", None)
    if isinstance(x, list) and len(x) == 6:
        out["exec"] = [_num(x[0]), _num(x[1]), _num(x[2])]
        out["worker_pid"], out["worker_id"], out["node_id"] = x[3], x[4], x[5]
    ty = out.pop("ty", None)
    if isinstance(ty, int) and 0 <= ty < len(TYPES):
        out["type"] = TYPES[ty]
    return out


def running_row(info: tuple | None, reported: bytes | None, now: float, pid: int,
                worker_id: bytes, node_id: bytes) -> tuple[bytes, dict] | None:
    """The executor's RUNNING row for ``info`` = (task id, task message, start
    time, actor id), or None if there is nothing (new) to say yet."""
    if info is None:
        return None
    tid, msg, t0, actor_id = info
    if tid == reported or now - t0 < RUNNING_AFTER_S or not isinstance(tid, bytes):
        return None
    row = {"state": "RUNNING", "name": msg.get("name", "?"), "job": msg.get("job", 0),
           "worker_pid": pid, "worker_id": worker_id, "node_id": node_id, "start": t0}
    if actor_id:
        row["actor_id"] = actor_id
    return tid + RUNNING_SUFFIX, row


def merge_rows(items: list[tuple[bytes, Any]]) -> dict[bytes, dict]:
    """Scan results of the ``tasks`` table → one merged row per task id."""
    owners: dict[bytes, dict] = {}
    running: dict[bytes, dict] = {}
    for key, value in items:
        if not isinstance(value, dict) or not isinstance(key, bytes):
            continue
        if len(key) == 16:
            owners[key] = expand(value)
        elif len(key) == 17 and key.endswith(RUNNING_SUFFIX):
            running[key[:16]] = value
    out: dict[bytes, dict] = {}
    for tid, row in owners.items():
        merged = dict(row)
        ex = running.get(tid)
        if ex is not None and merged.get("state") not in TERMINAL:
            merged["state"] = "RUNNING"
            for k in ("worker_pid", "worker_id", "node_id"):
                merged.setdefault(k, ex.get(k))
            merged["times"] = {**(merged.get("times") or {}), "RUNNING": ex.get("start", 0.0)}
        out[tid] = merged
    for tid, ex in running.items():  # the owner's row has not arrived (or was lost)
        if tid not in out:
            out[tid] = {**ex, "times": {"RUNNING": ex.get("start", 0.0)}}
    return out


def phases(row: dict) -> list[tuple[str, float, float]]:
    """A finished task's phases as (name, start, end), wall clock: scheduling
    (from leaving the owner's queue for a worker to the worker taking it),
    argument fetch, execution. Empty if the worker never answered."""
    ex = row.get("exec")
    if not (isinstance(ex, list) and len(ex) == 3) or not ex[0]:
        return []
    t0, args_s, run_s = float(ex[0]), float(ex[1] or 0.0), float(ex[2] or 0.0)
    times = row.get("times") or {}
    sched_from = times.get("PENDING_NODE_ASSIGNMENT") or times.get("SUBMITTED_TO_WORKER")
    out = []
    if isinstance(sched_from, float) and 0 < sched_from < t0:
        out.append(("scheduling", sched_from, t0))
    if args_s > 0:
        out.append(("fetch_args", t0, t0 + args_s))
    out.append(("execute", t0 + args_s, t0 + max(run_s, args_s)))
    return out


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else 0.0
