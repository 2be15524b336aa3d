"""Actors of a dead node: which to restart elsewhere, which to declare dead.

Theory of operation
-------------------
A raylet manages the actors it placed and restarts them on its own node
when their process crashes. When the whole node dies nobody is left to do
that, so the surviving raylets share the job (Ray's GCS actor manager does it
centrally; Shoal has no actor manager in gcsd, so the raylets coordinate
through gcsd instead):

* A raylet that places an actor with ``max_restarts != 0`` first stores its
  *failover record* (:func:`failover_record`: the creation spec, resource
  demand, strategy, detached flag, owner's node) in gcsd's kv under the
  actor id. It is deleted when the actor is DEAD.
* When a raylet sees a node die (or joins a cluster that has dead nodes) it
  reads gcsd's ``actors`` table and gives the rows to :func:`plan_orphans`.
  An *orphan* is a row not DEAD whose node is dead, or a RESTARTING row that
  no node has taken yet (``node_id`` empty: *parked*).
* Every transition of an orphan is guarded by a *claim*: an insert-if-absent
  kv write keyed by the row's version (actor id, ``num_restarts``, node id;
  :func:`claim_key`). Only the raylet whose write adds the key acts, so a
  row is taken over, declared dead or parked exactly once however many
  raylets read it. It works like a compare-and-swap on the row.
* Decisions (:class:`Takeover`):
    - ``DECLARE_DEAD``: restarts used up, no record, the owner's node died
      (a non-detached actor shares its owner's fate), a hard node affinity
      to the dead node, or a ``kill`` that could not reach its raylet (the
      record then says ``killed``). Any raylet may claim it.
    - ``RESTART_HERE``: restartable and this node could hold it (its total
      resources fit the demand; the lease waits for free ones). The winner
      writes the row RESTARTING on its own node with ``num_restarts + 1``
      and places the actor through its normal actor lease path.
    - ``PLACE_HERE``: a parked row this node could hold (no restart is
      counted again).
    - ``PARK``: restartable but this node cannot hold it. Offered only on the
      delayed second look (``may_park``), so that nodes that fit get the
      first chance; the row becomes RESTARTING with no node, and a node that
      fits takes it when it joins (its start-up sweep).

Pure: no sockets, clocks or processes. The raylet's shell does the reads,
the claims and the writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from daemons.raylet.actors import DEAD, RESTARTING
from daemons.raylet.resources import ResourceSet

RECORDS_NS = "actor_failover"  # kv: actor id -> msgpack'd failover record
CLAIMS_NS = "actor_claims"  # kv: claim_key(row) -> claiming node id

DECLARE_DEAD = "DECLARE_DEAD"
RESTART_HERE = "RESTART_HERE"
PLACE_HERE = "PLACE_HERE"
PARK = "PARK"


def failover_record(spec: dict[str, Any], demand: dict[str, float], strategy: Any,
                    owner_node: bytes) -> dict[str, Any]:
    """What a raylet needs to recreate an actor elsewhere (msgpack-able)."""
    return {"spec": spec, "demand": demand, "strategy": strategy,
            "detached": bool(spec.get("detached")), "owner_node": owner_node}


def claim_key(row: Mapping[str, Any]) -> bytes:
    """The key whose insert-if-absent write lets one raylet act on this row version."""
    node = row.get("node_id") or b""
    return b"%s:%d:%s" % (bytes(row["actor_id"]).hex().encode(),
                          int(row.get("num_restarts") or 0), node.hex().encode())


def claims_prefix(actor_id: bytes) -> bytes:
    return actor_id.hex().encode() + b":"


def has_restart_left(row: Mapping[str, Any]) -> bool:
    """Whether the row may run again. A parked row already counted the
    restart it waits for; a row on a dead node would spend one more."""
    used, allowed = int(row.get("num_restarts") or 0), int(row.get("max_restarts") or 0)
    return used <= allowed if not row.get("node_id") else used < allowed


def is_orphan(row: Any, dead_nodes: set[bytes]) -> bool:
    """Not DEAD, and on a dead node or parked (RESTARTING on no node)."""
    if not isinstance(row, dict) or not isinstance(row.get("actor_id"), bytes):
        return False
    if row.get("state") == DEAD:
        return False
    node = row.get("node_id") or b""
    if not node:
        return row.get("state") == RESTARTING
    return node in dead_nodes


@dataclass(frozen=True)
class Takeover:
    """One action on an orphan row, to be done by the raylet that wins ``claim``."""

    action: str
    actor_id: bytes
    claim: bytes
    row: dict[str, Any]  # the row to write if the claim is won
    record: dict[str, Any] | None = None  # the failover record (restart/place)


def _fits(demand: Any, total: ResourceSet) -> bool:
    try:
        return ResourceSet.of(demand or {}).fits_in(total)
    except (TypeError, ValueError):
        return False


def _why_not_restartable(row: Mapping[str, Any], record: Mapping[str, Any] | None,
                         dead_nodes: set[bytes]) -> str:
    """Empty if the actor may run again, else why not (naming the dead node)."""
    node = row.get("node_id") or b""
    where = f"the actor's node {node.hex()} died" if node else "the actor was waiting for a node"
    max_restarts = int(row.get("max_restarts") or 0)
    if not has_restart_left(row):
        return f"{where} and it has no restarts left (max_restarts={max_restarts})"
    if isinstance(record, Mapping) and record.get("killed"):
        return f"{where}; it had been killed ({record['killed']})"
    if not isinstance(record, Mapping) or not isinstance(record.get("spec"), dict):
        return f"{where} and its creation spec was not recorded"
    owner = record.get("owner_node") or b""
    if not record.get("detached") and owner in dead_nodes:
        return f"{where}; its owner's node {owner.hex()} died too (the actor shares its fate)"
    strategy = record.get("strategy")
    if isinstance(strategy, dict) and strategy.get("node_id") and not strategy.get("soft"):
        return f"{where} and a hard node affinity pins it there"
    return ""


def plan_orphans(rows: Iterable[Any], *, dead_nodes: set[bytes], my_node: bytes,
                 my_total: ResourceSet, records: Mapping[bytes, Any],
                 may_park: bool) -> list[Takeover]:
    """Decide what this raylet should try to do with each orphan in ``rows``.

    ``records`` maps actor id to its failover record (absent: none stored).
    The result lists claims to attempt; an action is carried out only if
    its claim is won.
    """
    out: list[Takeover] = []
    for row in rows:
        if not is_orphan(row, dead_nodes):
            continue
        aid = row["actor_id"]
        record = records.get(aid)
        node = row.get("node_id") or b""
        why = _why_not_restartable(row, record, dead_nodes)
        if why:
            if node:  # a parked row is not dead because this node cannot hold it
                out.append(Takeover(DECLARE_DEAD, aid, claim_key(row), {
                    **row, "state": DEAD, "death_cause": why, "pid": 0, "socket": "",
                    "address": ""}))
            continue
        fits = _fits(record.get("demand"), my_total)  # type: ignore[union-attr]
        if not node:
            if fits:
                out.append(Takeover(PLACE_HERE, aid, claim_key(row),
                                    {**row, "node_id": my_node}, record))
            continue
        restarted = {**row, "state": RESTARTING, "pid": 0, "socket": "", "address": "",
                     "num_restarts": int(row.get("num_restarts") or 0) + 1}
        if fits:
            out.append(Takeover(RESTART_HERE, aid, claim_key(row),
                                {**restarted, "node_id": my_node}, record))
        elif may_park:
            out.append(Takeover(PARK, aid, claim_key(row), {**restarted, "node_id": b""}))
    return out

