"""Placement groups, with Ray's names: reserve bundles of resources across nodes, then
schedule tasks and actors into them.

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready())
    f.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
    remove_placement_group(pg)

How it works (docs/architecture.md, *Placement groups*): the raylet of the
creating process coordinates the group. It reserves every bundle with a
two-phase prepare/commit on the chosen nodes and keeps the group's row in
gcsd's kv (``placement_groups`` namespace), which any process reads. A
committed bundle shows up on its node as resources named after the group
(``CPU_group_<i>_<id>``, ``CPU_group_<id>``, ``bundle_group_...``); a task in
the group asks for those instead of plain ``CPU``, so the ordinary scheduler
sends it to the bundle's node and nowhere else (Ray does the same rewrite).
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack

ROWS_NS = "placement_groups"
NAMES_NS = "placement_group_names:"
BUNDLE_UNITS = 1000      # a bundle's ``bundle_group_*`` amount
BUNDLE_TASK_SHARE = 0.001  # what each task or actor in the group takes of it
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_READY_WAIT_S = 30.0


# ---- resource names (shared with the raylets) ----------------------------------------
def group_resources(pg_hex: str, index: int, bundle: dict[str, float]) -> dict[str, float]:
    """The resources a committed bundle adds to its node."""
    out: dict[str, float] = {}
    for name, amount in bundle.items():
        if amount:
            out[f"{name}_group_{index}_{pg_hex}"] = amount
            out[f"{name}_group_{pg_hex}"] = amount
    out[f"bundle_group_{index}_{pg_hex}"] = BUNDLE_UNITS
    out[f"bundle_group_{pg_hex}"] = BUNDLE_UNITS
    return out


def task_demand(demand: dict[str, float], pg_hex: str, index: int) -> dict[str, float]:
    """A task's demand rewritten onto bundle ``index`` of the group (-1: any bundle)."""
    tag = f"group_{pg_hex}" if index < 0 else f"group_{index}_{pg_hex}"
    out = {f"{name}_{tag}": amount for name, amount in demand.items() if amount}
    out[f"bundle_{tag}"] = BUNDLE_TASK_SHARE
    return out


def group_of_resource(name: str) -> str | None:
    """The group id (hex) a rewritten resource name belongs to, else None."""
    if "_group_" not in name:
        return None
    tail = name.rsplit("_", 1)[-1]
    return tail if len(tail) == 32 else None


# ---- the handle ----------------------------------------------------------------------------
class PlacementGroupID:
    """A placement group's id (``.hex()``, ``.binary()``), as in Ray."""

    __slots__ = ("_id",)

    def __init__(self, raw: bytes) -> None:
        self._id = raw

    def hex(self) -> str:
        return self._id.hex()

    def binary(self) -> bytes:
        return self._id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroupID) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __repr__(self) -> str:
        return f"PlacementGroupID({self.hex()})"


class PlacementGroup:
    """A handle to a placement group; picklable, so tasks and actors can use it too."""

    def __init__(self, pg_id: bytes, bundles: list[dict[str, float]] | None = None,
                 strategy: str = "PACK") -> None:
        self._raw = pg_id
        self._bundles = bundles
        self._strategy = strategy

    @property
    def id(self) -> PlacementGroupID:
        return PlacementGroupID(self._raw)

    @property
    def bundle_specs(self) -> list[dict[str, float]]:
        if self._bundles is None:
            row = _row(self._raw)
            self._bundles = list(row["bundles"]) if row else []
        return [dict(b) for b in self._bundles]

    @property
    def bundle_count(self) -> int:
        return len(self.bundle_specs)

    @property
    def strategy(self) -> str:
        return self._strategy

    def ready(self) -> Any:
        """An ObjectRef that resolves (to this group) once every bundle is reserved.

        As in Ray, it is a tiny task scheduled into bundle 0, so it runs only
        once the group's resources exist; it then checks the row says CREATED.
        """
        from libclient.api import remote
        from libclient.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        fn = _CHECK.get("fn")
        if fn is None:
            fn = _CHECK["fn"] = remote(num_cpus=0, max_retries=0)(_bundle_reservation_check)
        return fn.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self, 0)).remote(
            self._raw, self._bundles, self._strategy)

    def wait(self, timeout_seconds: float = 30) -> bool:
        """True once the group is placed; False if it is not within ``timeout_seconds``.

        Reads the group's row in gcsd (Ray asks its GCS too), so it costs no
        task and no worker; ``ready()`` is the ObjectRef form.
        """
        deadline = time.monotonic() + timeout_seconds
        delay = 0.0005
        while True:
            row = _row(self._raw)
            if row is not None and row.get("state") == "CREATED":
                return True
            if row is not None and row.get("state") == "REMOVED":
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(0.05, delay * 2)

    def __reduce__(self) -> Any:
        return (PlacementGroup, (self._raw, self._bundles, self._strategy))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PlacementGroup({self._raw.hex()})"


_CHECK: dict[str, Any] = {}


def _bundle_reservation_check(pg_id: bytes, bundles: Any, strategy: str) -> PlacementGroup:
    """Runs inside bundle 0: the group's resources exist on this node. The
    other nodes commit in the same round; wait for the coordinator's row."""
    from libclient.exceptions import RaySystemError

    deadline = time.monotonic() + _READY_WAIT_S
    delay = 0.001
    while True:
        row = _row(pg_id)
        state = row.get("state") if row else None
        if state == "CREATED":
            return PlacementGroup(pg_id, bundles, strategy)
        if state in ("REMOVED", None) or time.monotonic() > deadline:
            raise RaySystemError(f"placement group {pg_id.hex()} is {state or 'unknown'}")
        time.sleep(delay)
        delay = min(0.05, delay * 2)


# ---- the API -------------------------------------------------------------------------------
def placement_group(bundles: list[dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: str | None = None, _max_cpu_fraction_per_node: Any = None,
                    ) -> PlacementGroup:
    """Reserve ``bundles`` with ``strategy``; returns at once (``ready()`` says when placed).

    Raises:
        ValueError: bad bundles, strategy, lifetime, or a name already taken.
    """
    from libclient.api import _require, default_namespace
    from libclient.exceptions import RaySystemError

    bundles = _check_bundles(bundles)
    if strategy not in STRATEGIES:
        raise ValueError(f"invalid placement group strategy {strategy!r}: "
                         f"use one of {', '.join(STRATEGIES)}")
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be None or 'detached', got {lifetime!r}")
    if not isinstance(name, str):
        raise TypeError("name must be a string")
    core = _require()
    pg_id = os.urandom(16)
    namespace = default_namespace()
    if name and not core.gcs.kv_put(NAMES_NS + namespace, name.encode(), pg_id,
                                    overwrite=False):
        raise ValueError(f"a placement group named {name!r} already exists in namespace "
                         f"{namespace!r}")
    reply = core.raylet_call({"t": "pg_create", "pg_id": pg_id, "bundles": bundles,
                              "strategy": strategy, "name": name, "namespace": namespace,
                              "detached": lifetime == "detached", "job": core.job_id})
    if not reply.get("ok"):
        if name:
            core.gcs.kv_del(NAMES_NS + namespace, name.encode())
        raise RaySystemError(f"could not create the placement group: {reply.get('error')}")
    return PlacementGroup(pg_id, bundles, strategy)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Return the group's resources; tasks and actors running in it are killed."""
    from libclient.api import _require
    from libclient.exceptions import RaySystemError

    if not isinstance(placement_group, PlacementGroup):
        raise TypeError("remove_placement_group expects a PlacementGroup")
    core = _require()
    _return_idle_leases(core, placement_group.id.hex())
    reply = core.raylet_call({"t": "pg_remove", "pg_id": placement_group._raw})
    if not reply.get("ok"):
        raise RaySystemError(f"could not remove the placement group: {reply.get('error')}")


def get_placement_group(placement_group_name: str) -> PlacementGroup:
    """The live group with that name in this namespace; ValueError if none."""
    from libclient.api import _require, default_namespace

    core = _require()
    raw = core.gcs.kv_get(NAMES_NS + default_namespace(), placement_group_name.encode())
    row = _row(raw) if raw else None
    if row is None or row.get("state") == "REMOVED":
        raise ValueError(f"no placement group named {placement_group_name!r}")
    return PlacementGroup(raw, list(row["bundles"]), row["strategy"])


def get_current_placement_group() -> PlacementGroup | None:
    """The group the current task or actor runs in (None in a driver or outside one)."""
    from libclient.api import _require

    cur = getattr(_require(), "current_pg", None)
    if not cur:
        return None
    return PlacementGroup(cur[0])


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict[str, Any]:
    """Ray's table: one group's entry, or every group's keyed by hex id."""
    from libclient.api import _require

    if placement_group is not None:
        row = _row(placement_group._raw)
        return _public(row) if row else {}
    core = _require()
    out = {}
    prefix = ROWS_NS.encode() + b"\x00"
    for key, value in core.gcs.table_scan("kv", prefix=prefix):
        try:
            row = msgpack.unpackb(value, raw=False)
        except Exception:
            continue
        out[key[len(prefix):].hex()] = _public(row)
    return out


# ---- helpers ---------------------------------------------------------------------------------
def _row(pg_id: bytes) -> dict[str, Any] | None:
    from libclient.api import _require

    raw = _require().gcs.kv_get(ROWS_NS, pg_id)
    return msgpack.unpackb(raw, raw=False) if raw else None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    nodes = row.get("nodes") or []
    return {"placement_group_id": row["pg_id"].hex(), "name": row.get("name", ""),
            "bundles": {i: dict(b) for i, b in enumerate(row.get("bundles") or [])},
            "bundles_to_node_id": {i: n.hex() for i, n in enumerate(nodes) if n},
            "strategy": row.get("strategy"), "state": row.get("state"),
            "is_detached": bool(row.get("detached")),
            "stats": {"scheduling_attempt": row.get("attempts", 0)}}


def _check_bundles(bundles: Any) -> list[dict[str, float]]:
    if not isinstance(bundles, (list, tuple)) or not bundles:
        raise ValueError("bundles must be a non-empty list of resource dicts")
    out = []
    for b in bundles:
        if not isinstance(b, dict) or not b:
            raise ValueError(f"bundle {b!r} must be a non-empty dict of resources")
        for k, v in b.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"bundle resource name {k!r} must be a non-empty string")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"bundle resource {k} amount {v!r} must be a number >= 0")
        if not any(b.values()):
            raise ValueError(f"bundle {b!r} asks for nothing: every bundle needs some resource")
        out.append({k: v for k, v in b.items()})
    return out


def _return_idle_leases(core: Any, pg_hex: str) -> None:
    """Hand back our idle leases on the group's resources before it goes, so the
    raylet has no worker of ours to kill (a killed worker costs a restart)."""
    submitter = getattr(core, "_submitter", None)
    fn = getattr(submitter, "return_idle_leases_of", None)
    if fn is None:
        return
    with core._lock:
        fn(lambda demand: any(group_of_resource(k) == pg_hex for k in demand))


def resolve_strategy(options: dict[str, Any], demand: dict[str, float]
                     ) -> tuple[dict[str, float], Any, list | None]:
    """Apply a placement-group strategy (or the older ``placement_group=`` options).

    Returns:
        (demand, strategy for ``to_wire``, ``[pg id, bundle index, capture]`` or None).
    Raises:
        ValueError: a bundle index out of range, or a bad combination.
    """
    from libclient.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = options.get("scheduling_strategy")
    pg = options.get("placement_group")
    if pg is not None and pg != "default":
        if strategy is not None:
            raise ValueError("use either scheduling_strategy or placement_group, not both")
        strategy = PlacementGroupSchedulingStrategy(
            pg, options.get("placement_group_bundle_index", -1),
            options.get("placement_group_capture_child_tasks"))
    if not isinstance(strategy, PlacementGroupSchedulingStrategy):
        return demand, strategy, None
    group = strategy.placement_group
    index = strategy.placement_group_bundle_index
    if group is None:
        return demand, None, None
    if group._bundles is not None and index >= len(group._bundles):
        raise ValueError(f"placement_group_bundle_index {index} is out of range: the group has "
                         f"{len(group._bundles)} bundles")
    return (task_demand(demand, group.id.hex(), index), None,
            [group._raw, index, bool(strategy.placement_group_capture_child_tasks)])


def captured(core: Any) -> list | None:
    """The current task's group if it captures child tasks (Ray's rule), else None."""
    cur = getattr(core, "current_pg", None)
    return cur if cur and cur[2] else None
