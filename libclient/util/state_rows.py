"""gcsd rows → Ray's state API rows, and Ray's filters, limits and summaries.

Each ``*_state`` function turns one stored row into a :class:`StateRow` with
Ray's field names (``ray.util.state.common``: ActorState, TaskState, ...),
list columns always and the rest only with ``detail``. Pure: the reading is
done by :mod:`libclient.util.state`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from libclient.core import task_events

DEFAULT_LIMIT = 100
_PREDICATES = ("=", "!=")


class RayStateApiException(Exception):
    """A state query could not be answered (bad filter, gcsd unreachable)."""


class StateRow(dict):
    """A Ray state row: a dict that also reads as attributes (``row.state``),
    like Ray's dataclass rows (``ActorState``, ``TaskState``...)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _hex(v: Any) -> str | None:
    return v.hex() if isinstance(v, bytes) and v else None


def _ms(t: Any) -> int | None:
    return int(t * 1000) if isinstance(t, (int, float)) and t > 0 else None


def job_hex(job: Any) -> str | None:
    """Ray's job id: 4 bytes, big-endian, hex (as get_runtime_context().get_job_id())."""
    return job.to_bytes(4, "big").hex() if isinstance(job, int) and job >= 0 else None


def _row(fields: dict, detail_fields: dict, detail: bool) -> StateRow:
    return StateRow({**fields, **detail_fields} if detail else fields)


# ------------------------------------------------------------------- nodes
def node_state(n: dict, detail: bool) -> StateRow:
    alive = n.get("state") == "ALIVE"
    return _row({"node_id": _hex(n.get("node_id")), "node_ip": n.get("address"),
                 "is_head_node": bool(n.get("head")), "state": "ALIVE" if alive else "DEAD",
                 "state_message": None if alive else (n.get("death_reason") or None),
                 "node_name": n.get("hostname") or n.get("address"),
                 "resources_total": dict(n.get("resources") or {}), "labels": {}},
                {"start_time_ms": _ms(n.get("registered_at")),
                 "end_time_ms": None if alive else _ms(n.get("last_heartbeat")),
                 "resources_available": dict(n.get("available") or {}) if alive else {},
                 "raylet_address": n.get("raylet_address"),
                 "object_store_address": n.get("store_address")}, detail)


# ------------------------------------------------------------------ actors
def actor_state(a: dict, detail: bool) -> StateRow:
    meta = a.get("meta") if isinstance(a.get("meta"), dict) else {}
    return _row({"actor_id": _hex(a.get("actor_id")), "class_name": a.get("class_name", ""),
                 "state": a.get("state"), "job_id": job_hex(a.get("job")),
                 "name": a.get("name") or "", "node_id": _hex(a.get("node_id")),
                 "pid": a.get("pid") or None, "ray_namespace": a.get("namespace", ""),
                 "placement_group_id": _hex(a.get("pg_id"))},
                {"death_cause": a.get("death_cause") or None,
                 "is_detached": bool(a.get("detached")),
                 "num_restarts": a.get("num_restarts", 0),
                 "max_restarts": a.get("max_restarts", 0),
                 "required_resources": meta.get("resources") or {},
                 "repr_name": "", "address": a.get("address") or None}, detail)


# ------------------------------------------------------------------- tasks
def task_state(tid: bytes, t: dict, detail: bool) -> StateRow:
    times = t.get("times") if isinstance(t.get("times"), dict) else {}
    ex = t.get("exec") if isinstance(t.get("exec"), list) and len(t["exec"]) == 3 else None
    start = ex[0] if ex and ex[0] else times.get("RUNNING")
    end = times.get("FINISHED") or times.get("FAILED")
    if ex and ex[0]:
        end = ex[0] + (ex[2] or 0.0)
    name = t.get("name", "")
    fields = {"task_id": tid.hex(), "attempt_number": 0, "name": name,
              "state": t.get("state"), "job_id": job_hex(t.get("job")),
              "actor_id": _hex(t.get("actor_id")), "type": t.get("type", "NORMAL_TASK"),
              "func_or_class_name": name, "parent_task_id": None,
              "node_id": _hex(t.get("node_id")), "worker_id": _hex(t.get("worker_id")),
              "worker_pid": t.get("worker_pid") or None,
              "error_type": "TASK_EXECUTION_EXCEPTION" if t.get("state") == "FAILED" else None}
    events = sorted(({"state": s, "created_ms": _ms(v)} for s, v in times.items()
                     if isinstance(v, (int, float)) and v > 0),
                    key=lambda e: (e["created_ms"] or 0,
                                   _state_order(e["state"])))
    more = {"language": "PYTHON", "required_resources": {}, "runtime_env_info": None,
            "placement_group_id": None, "events": events,
            "profiling_data": _profiling(t),
            "creation_time_ms": _ms(times.get("PENDING_ARGS_AVAIL")),
            "start_time_ms": _ms(start), "end_time_ms": _ms(end) if t.get("state") in
            task_events.TERMINAL else None,
            "owner_pid": t.get("owner_pid"), "owner_node_id": _hex(t.get("owner_node")),
            "num_returns": t.get("nret")}
    return _row(fields, more, detail)


def _state_order(state: str) -> int:
    try:
        return task_events.STATES.index(state)
    except ValueError:
        return len(task_events.STATES)


def _profiling(t: dict) -> dict:
    return {"events": [{"event_name": name, "start_time": start, "end_time": end}
                       for name, start, end in task_events.phases(t)]}


def summarize(tasks: Iterable[StateRow]) -> dict:
    """Ray's summarize_tasks shape: counts by function name, per state."""
    summary: dict[str, dict] = {}
    total = actor_tasks = actor_creations = 0
    for t in tasks:
        total += 1
        kind = t.get("type")
        if kind == "ACTOR_TASK":
            actor_tasks += 1
        elif kind == "ACTOR_CREATION_TASK":
            actor_creations += 1
        name = t.get("func_or_class_name") or "?"
        s = summary.setdefault(name, {"func_or_class_name": name, "type": kind,
                                      "state_counts": {}})
        counts = s["state_counts"]
        counts[t.get("state")] = counts.get(t.get("state"), 0) + 1
    return {"cluster": {"summary": summary, "total_tasks": total,
                        "total_actor_tasks": actor_tasks,
                        "total_actor_scheduled": actor_creations,
                        "summary_by": "func_name"}}


# ----------------------------------------------------------------- objects
def object_state(oid: bytes, o: dict, ip: str | None, detail: bool) -> StateRow:
    return _row({"object_id": oid.hex(), "object_size": o.get("size"),
                 "task_status": "FINISHED", "reference_type": "PINNED_IN_MEMORY",
                 "call_site": "disabled", "type": None,
                 "pid": o.get("owner_pid"), "ip": ip},
                {"node_id": _hex(o.get("node_id")), "state": o.get("state")}, detail)


# -------------------------------------------------------- placement groups
def placement_group_state(pg_id: bytes, g: dict, detail: bool) -> StateRow:
    bundles = []
    for i, b in enumerate(g.get("bundles") or ()):
        nodes = g.get("nodes") or []
        node = nodes[i] if i < len(nodes) else None
        bundles.append({"bundle_id": i, "node_id": _hex(node), "unit_resources": b})
    return _row({"placement_group_id": pg_id.hex(), "name": g.get("name") or "",
                 "creator_job_id": job_hex(g.get("job")), "state": g.get("state"),
                 "strategy": g.get("strategy")},
                {"bundles": bundles, "is_detached": bool(g.get("detached")),
                 "stats": {"scheduling_attempt": g.get("attempts", 0)}}, detail)


# ----------------------------------------------------------------- filters
def check_filters(filters: Any) -> list[tuple[str, str, Any]]:
    """Ray's ``filters``: a list of (column, "=" or "!=", value)."""
    if filters is None:
        return []
    out = []
    for f in filters:
        if not (isinstance(f, (tuple, list)) and len(f) == 3):
            raise RayStateApiException(f"a filter is (column, predicate, value), got {f!r}")
        key, pred, value = f
        if pred not in _PREDICATES:
            raise RayStateApiException(f"unsupported predicate {pred!r}: use '=' or '!='")
        out.append((str(key), pred, value))
    return out


def apply(rows: Iterable[StateRow], filters: list[tuple[str, str, Any]], limit: int | None,
          columns: Iterable[str]) -> list[StateRow]:
    """Keep the rows every filter admits, at most ``limit`` of them.

    Values compare as strings (Ray's filters come from the command line);
    ``state`` and other enum columns compare case-insensitively."""
    known = set(columns)
    for key, _, _ in filters:
        if key not in known:
            raise RayStateApiException(
                f"cannot filter on {key!r}: filterable columns are {sorted(known)}")
    out: list[StateRow] = []
    for row in rows:
        if all(_match(row.get(k), p, v) for k, p, v in filters):
            out.append(row)
            if limit is not None and len(out) >= limit:
                break
    return out


def _match(actual: Any, pred: str, wanted: Any) -> bool:
    equal = _norm(actual) == _norm(wanted)
    return equal if pred == "=" else not equal


def _norm(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, bytes):
        return v.hex()
    return str(v).lower()
