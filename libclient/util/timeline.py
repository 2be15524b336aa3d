"""``ray.timeline()``: the job's tasks as a Chrome trace (chrome://tracing, Perfetto).

Built from the task events in gcsd's ``tasks`` table (task_events.py): one
process row per node, one thread row per worker process, and per task up to
three slices — ``scheduling`` (from leaving the owner's queue to the worker
taking it, drawn only where the worker was not busy with an earlier task),
``fetch_args`` (pulling arguments passed by reference) and ``execute``.
Tasks that overlap on one worker (threaded or async actors) go to extra
lanes of that worker (``worker 1234 (2)``), because a trace row must nest.
Times are each host's wall clock, in microseconds.
"""

from __future__ import annotations

import json

from libclient.core import task_events

# Colours from the trace viewer's palette, per phase.
_COLOURS = {"scheduling": "thread_state_runnable", "fetch_args": "thread_state_iowait",
            "execute": "thread_state_running"}


def chrome_trace(rows: dict[bytes, dict], node_names: dict[bytes, str]) -> list[dict]:
    """Trace events for merged task rows (task id → row). Pure."""
    spans = []  # (node, worker pid, start, end, tid, row, phases)
    for tid, row in rows.items():
        ph = task_events.phases(row)
        if not ph:
            continue
        node = row.get("node_id") or b""
        spans.append((node, row.get("worker_pid") or 0, ph[0][1], ph[-1][2], tid, row, ph))
    spans.sort(key=lambda s: (s[0], s[1], _exec_start(s[6])))
    node_ids = {node: i + 1 for i, node in enumerate(sorted({s[0] for s in spans}))}
    events: list[dict] = []
    lanes: dict[tuple[bytes, int], list[float]] = {}  # (node, pid) -> each lane's last end
    for node, wpid, _start, end, tid, row, ph in spans:
        exec_start = _exec_start(ph)
        ends = lanes.setdefault((node, wpid), [])
        lane = next((i for i, e in enumerate(ends) if e <= exec_start + 1e-9), None)
        if lane is None:
            lane = len(ends)
            ends.append(0.0)
        busy_until = ends[lane]
        ends[lane] = end
        pid = node_ids[node]
        thread = wpid * 100 + lane
        name = row.get("name", "?")
        args = {"task_id": tid.hex(), "name": name, "state": row.get("state"),
                "worker_pid": wpid, "node_id": node.hex() if isinstance(node, bytes) else node,
                "type": row.get("type", "NORMAL_TASK")}
        for phase, s, e in ph:
            if phase == "scheduling":
                s = max(s, busy_until)
                if e - s <= 0:
                    continue
            events.append({"cat": f"task::{phase}", "name": name if phase == "execute"
                           else f"{name}:{phase}", "ph": "X", "pid": pid, "tid": thread,
                           "ts": s * 1e6, "dur": max(e - s, 0.0) * 1e6,
                           "cname": _COLOURS[phase], "args": args})
    meta = []
    for node, pid in node_ids.items():
        label = node_names.get(node) or (node.hex()[:12] if isinstance(node, bytes) else "?")
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"name": f"Node {label}"}})
    for (node, wpid), ends in lanes.items():
        for lane in range(len(ends)):
            suffix = f" ({lane + 1})" if lane else ""
            meta.append({"name": "thread_name", "ph": "M", "pid": node_ids[node],
                         "tid": wpid * 100 + lane, "args": {"name": f"worker {wpid}{suffix}"}})
    return meta + events


def _exec_start(phases: list[tuple[str, float, float]]) -> float:
    return next((s for name, s, _ in phases if name != "scheduling"), phases[0][1])


def timeline(filename: str | None = None, *, job_id: str | None = None) -> list[dict] | None:
    """Write this job's tasks as a Chrome trace to ``filename``, or return the
    events when it is None. ``job_id`` (hex) picks another job."""
    from libclient import api
    from libclient.util.state import _Gcs

    core = api._require()
    core.flush_task_events()  # our own rows, not 200 ms late
    job = int(job_id, 16) if job_id is not None else core.job_id
    with _Gcs(None, 30) as g:
        items = g.scan("tasks")
        names = {n.get("node_id"): f"{n.get('address', '?')} ({n['node_id'].hex()[:8]})"
                 for n in g.nodes() if isinstance(n.get("node_id"), bytes)}
    rows = {tid: row for tid, row in task_events.merge_rows(items).items()
            if row.get("job") == job}
    events = chrome_trace(rows, names)
    if filename is None:
        return events
    with open(filename, "w") as f:
        json.dump(events, f)
    return None
