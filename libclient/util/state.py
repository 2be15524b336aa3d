"""``ray.util.state``: list and summarize what the cluster runs, from gcsd's tables.

    from libclient.util.state import list_actors, list_tasks, summarize_tasks
    list_actors(filters=[("state", "=", "ALIVE")])
    list_tasks(filters=[("name", "!=", "f")], limit=10, detail=True)

Every call reads gcsd (ZeroMQ over TCP), so it works from any host: from a
connected driver (``address=None``) or from anywhere with ``address=
"host:port"`` of gcsd. Where each answer comes from:

* nodes: the ``nodes`` table (registrations and liveness);
* actors: the ``actors`` table the raylets keep;
* tasks: the ``tasks`` table: owners' rows, batched every 200 ms, merged
  with workers' RUNNING rows (libclient/core/task_events.py);
* objects: the ``objects`` table: objects in a node's store, as their owners
  recorded them (batched). Small values that live only in their owner's
  memory are not listed: asking every process for its reference table would
  cost a call per process, and Ray's own listing is a best-effort snapshot too;
* placement groups: the rows their coordinating raylets keep in gcsd's kv
  (libclient/util/placement_group.py).

Rows are :class:`~libclient.util.state_rows.StateRow` dicts with Ray's field
names, also readable as attributes. ``filters`` are ``(column, "=" | "!=",
value)``; ``limit`` caps the rows returned (default 100, as Ray).
"""

from __future__ import annotations

from typing import Any

from libclient.core import task_events
from libclient.util import state_rows
from libclient.util.state_rows import DEFAULT_LIMIT, RayStateApiException, StateRow

__all__ = ["RayStateApiException", "StateRow", "get_actor", "get_node", "get_task",
           "list_actors", "list_jobs", "list_nodes", "list_objects", "list_placement_groups",
           "list_tasks", "summarize_actors", "summarize_tasks"]

# The tasks table grows with every task; a listing reads at most this many rows.
MAX_TASK_ROWS = 200_000


class _Gcs:
    """The gcsd client for one query: the driver's, or one opened for ``address``."""

    def __init__(self, address: str | None, timeout: float) -> None:
        from libclient import api

        self._own = None
        if address is None or address == "auto":
            core = api._core
            if core is None:
                raise RayStateApiException(
                    "not connected: call init() first or pass address='host:port' of gcsd")
            self.gcs = core.gcs
            return
        from libclient.gcs_client import GcsClient

        url = address if address.startswith("tcp://") else f"tcp://{address}"
        self._own = self.gcs = GcsClient(url, timeout=timeout)

    def scan(self, table: str, limit: int | None = None, prefix: bytes = b""
             ) -> list[tuple[bytes, Any]]:
        try:
            return self.gcs.table_scan(table, prefix=prefix, limit=limit)
        except Exception as exc:
            raise RayStateApiException(f"cannot read gcsd's {table} table: {exc}") from exc

    def nodes(self) -> list[dict]:
        try:
            return self.gcs.get_nodes()
        except Exception as exc:
            raise RayStateApiException(f"cannot read gcsd's node table: {exc}") from exc

    def __enter__(self) -> _Gcs:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            self._own.close()


def _finish(rows: list[StateRow], filters: Any, limit: int | None,
            sample: StateRow) -> list[StateRow]:
    """Filter on the list columns (those of ``sample``, a row without detail), then limit."""
    return state_rows.apply(rows, state_rows.check_filters(filters), limit, sample.keys())


# ----------------------------------------------------------------- nodes
def list_nodes(address: str | None = None, filters: list | None = None,
               limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True, _explain: bool = False) -> list[StateRow]:
    """Every node gcsd knows, alive or dead (node_id, node_ip, state, ...)."""
    with _Gcs(address, timeout) as g:
        rows = [state_rows.node_state(n, detail) for n in g.nodes()]
    return _finish(rows, filters, limit, state_rows.node_state({}, False))


def get_node(id: str, address: str | None = None, timeout: int = 30) -> StateRow | None:
    rows = list_nodes(address, filters=[("node_id", "=", id)], limit=1, timeout=timeout,
                      detail=True)
    return rows[0] if rows else None


# ---------------------------------------------------------------- actors
def list_actors(address: str | None = None, filters: list | None = None,
                limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
                raise_on_missing_output: bool = True, _explain: bool = False
                ) -> list[StateRow]:
    """Every actor of the cluster (actor_id, class_name, state, name, pid, ...)."""
    with _Gcs(address, timeout) as g:
        rows = [state_rows.actor_state(a, detail) for _, a in g.scan("actors")
                if isinstance(a, dict)]
    return _finish(rows, filters, limit, state_rows.actor_state({}, False))


def get_actor(id: str, address: str | None = None, timeout: int = 30,
              _explain: bool = False) -> StateRow | None:
    """One actor by its hex id (all columns), or None."""
    try:
        key = bytes.fromhex(id)
    except (TypeError, ValueError):
        raise RayStateApiException(f"not an actor id: {id!r}") from None
    with _Gcs(address, timeout) as g:
        try:
            row = g.gcs.table_get("actors", key)
        except Exception as exc:
            raise RayStateApiException(f"cannot read gcsd's actors table: {exc}") from exc
    return state_rows.actor_state(row, True) if isinstance(row, dict) else None


def summarize_actors(address: str | None = None, timeout: int = 30,
                     raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Actors by class name and state, as Ray's summarize_actors."""
    summary: dict[str, dict] = {}
    actors = list_actors(address, limit=None, timeout=timeout)  # type: ignore[arg-type]
    for a in actors:
        s = summary.setdefault(a["class_name"], {"class_name": a["class_name"],
                                                 "state_counts": {}})
        s["state_counts"][a["state"]] = s["state_counts"].get(a["state"], 0) + 1
    return {"cluster": {"summary": summary, "total_actors": len(actors),
                        "summary_by": "class"}}


# ----------------------------------------------------------------- tasks
def _task_rows(g: _Gcs, detail: bool) -> list[StateRow]:
    merged = task_events.merge_rows(g.scan("tasks", limit=MAX_TASK_ROWS))
    return [state_rows.task_state(tid, row, detail) for tid, row in merged.items()]


def list_tasks(address: str | None = None, filters: list | None = None,
               limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
               raise_on_missing_output: bool = True, _explain: bool = False
               ) -> list[StateRow]:
    """Tasks, actor calls and actor creations of every job (task_id, name,
    state, job_id, func_or_class_name, node_id, worker_pid, ...).

    States lag by up to ~0.2 s (owners batch their rows); a task running
    for over half a second shows RUNNING within about a second."""
    with _Gcs(address, timeout) as g:
        rows = _task_rows(g, detail)
    return _finish(rows, filters, limit, state_rows.task_state(b"", {}, False))


def get_task(id: str, address: str | None = None, timeout: int = 30,
             _explain: bool = False) -> StateRow | None:
    rows = list_tasks(address, filters=[("task_id", "=", id)], limit=1, timeout=timeout,
                      detail=True)
    return rows[0] if rows else None


def summarize_tasks(address: str | None = None, timeout: int = 30,
                    raise_on_missing_output: bool = True, _explain: bool = False) -> dict:
    """Tasks by function name and state, as Ray's summarize_tasks."""
    with _Gcs(address, timeout) as g:
        rows = _task_rows(g, False)
    return state_rows.summarize(rows)


# --------------------------------------------------------------- objects
def list_objects(address: str | None = None, filters: list | None = None,
                 limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
                 raise_on_missing_output: bool = True, _explain: bool = False
                 ) -> list[StateRow]:
    """Objects held in the nodes' stores (object_id, object_size, pid, ip).

    Values small enough to live in their owner's memory are not listed."""
    with _Gcs(address, timeout) as g:
        ips = {n.get("node_id"): n.get("address") for n in g.nodes()}
        rows = [state_rows.object_state(oid, o, ips.get(o.get("node_id")), detail)
                for oid, o in g.scan("objects")
                if isinstance(o, dict) and o.get("state") != "FREED"]
    return _finish(rows, filters, limit, state_rows.object_state(b"", {}, None, False))


# ------------------------------------------------------ placement groups
def list_placement_groups(address: str | None = None, filters: list | None = None,
                          limit: int = DEFAULT_LIMIT, timeout: int = 30,
                          detail: bool = False, raise_on_missing_output: bool = True,
                          _explain: bool = False) -> list[StateRow]:
    """Placement groups (placement_group_id, name, state, strategy; with
    ``detail`` their bundles and the node of each)."""
    import msgpack

    from libclient.util.placement_group import ROWS_NS

    prefix = ROWS_NS.encode() + b"\x00"  # the coordinating raylets' rows in gcsd's kv
    rows = []
    with _Gcs(address, timeout) as g:
        for key, raw in g.scan("kv", prefix=prefix):
            try:
                row = msgpack.unpackb(raw, raw=False)
            except Exception:
                continue
            if isinstance(row, dict):
                rows.append(state_rows.placement_group_state(key[len(prefix):], row, detail))
    return _finish(rows, filters, limit, state_rows.placement_group_state(b"", {}, False))


# ------------------------------------------------------------------ jobs
def list_jobs(address: str | None = None, filters: list | None = None,
              limit: int = DEFAULT_LIMIT, timeout: int = 30, detail: bool = False,
              raise_on_missing_output: bool = True, _explain: bool = False) -> list[StateRow]:
    """Drivers that connected (job_id, status, driver pid and node)."""
    with _Gcs(address, timeout) as g:
        rows = [StateRow({"job_id": state_rows.job_hex(j.get("job_id")),
                          "status": "SUCCEEDED" if j.get("state") == "FINISHED" else
                          j.get("state"), "driver_pid": j.get("driver_pid"),
                          "driver_node_id": (j.get("node_id") or b"").hex() or None,
                          "namespace": j.get("namespace")})
                for _, j in g.scan("jobs") if isinstance(j, dict)]
    sample = StateRow({"job_id": None, "status": None, "driver_pid": None,
                       "driver_node_id": None, "namespace": None})
    return _finish(rows, filters, limit, sample)
