"""``shoal status``: nodes, resources, workers, actors, tasks and gcsd's shards.

Everything comes from gcsd's tables plus pings of this host's daemons; the
command never registers a job. Tables that do not exist yet (actors and
shards are newer than nodes) show as "none reported" rather than failing.
"""

from __future__ import annotations

import argparse
import collections
import json
from dataclasses import asdict
from typing import Any

import psutil

from libclient.cli import common, health
from libclient.gcs_client import GcsClient, GcsError

# A status scan reads at most this many task records, so `shoal status` on a
# busy cluster stays a quick look (the tasks table grows with every task).
MAX_TASK_RECORDS = 100_000


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="nodes, resources, workers, actors, tasks, gcsd shards")
    common.add_config_flags(p)
    p.add_argument("--address", help="raylet socket or gcs address "
                                     "(default: $SHOAL_ADDRESS, then the config's raylet)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _node(record: dict[str, Any]) -> dict[str, Any]:
    # The same keys as libclient.nodes() (Ray's ray.nodes()), plus what ops wants.
    node_id = record.get("node_id", b"")
    return {"NodeID": node_id.hex() if isinstance(node_id, bytes) else str(node_id),
            "Alive": record.get("state") == "ALIVE", "state": record.get("state"),
            "NodeManagerAddress": record.get("address", ""),
            "NodeManagerHostname": record.get("hostname", ""),
            "RayletSocketName": record.get("raylet_socket", ""),
            "ObjectStoreSocketName": record.get("store_socket", ""),
            "Resources": record.get("resources", {}), "Available": record.get("available", {}),
            "pid": record.get("pid"), "GPUs": len(record.get("gpus", []) or [])}


def _count_states(gcs: GcsClient, table: str, limit: int | None = None) -> dict[str, int] | None:
    """Records of ``table`` by their ``state``; None if gcsd has no such table."""
    try:
        items = gcs.table_scan(table, limit=limit)
    except GcsError:
        return None
    counts: collections.Counter[str] = collections.Counter()
    for key, value in items:
        if table == "tasks" and len(key) != 16:
            continue  # a worker's RUNNING row (task_events.py): the owner's row counts
        state = value.get("state") if isinstance(value, dict) else None
        counts[str(state or "UNKNOWN")] += 1
    return dict(sorted(counts.items()))


def _workers(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """Worker processes per local raylet (children of its pid); remote ones are not seen."""
    out = {}
    for n in nodes:
        if not n["Alive"] or not n.get("pid"):
            continue
        try:
            out[n["NodeID"]] = len(psutil.Process(n["pid"]).children())
        except (psutil.Error, ValueError):
            continue
    return out


def _shards(layout: dict[str, Any] | None) -> dict[str, Any] | None:
    """gcsd's ``config`` reply: members, and each shard's epoch and chain (head first)."""
    if not layout or "configs" not in layout:
        return None
    return {"members": layout.get("members", []), "shards": layout.get("shards"),
            "chains": [{"shard": s, "epoch": e, "chain": list(chain)}
                       for s, e, chain in layout["configs"]]}


def collect(ns: argparse.Namespace) -> dict[str, Any]:
    """Gather the status as one JSON-able dict.

    Raises:
        CliError: neither the raylet nor gcsd answers.
    """
    conf = common.host_config(ns)
    raylet, gcs_address = common.locate(ns, conf)
    store_socket = common.raylet_hello(raylet).get("store_socket") if raylet else None
    with GcsClient(gcs_address, timeout=5.0) as gcs:
        try:
            nodes = [_node(r) for r in gcs.get_nodes()]
            info = gcs.info()
            try:
                layout = gcs.call("config")
            except GcsError:
                layout = None  # an older gcsd without the config method
        except GcsError as exc:
            raise common.CliError(f"cannot reach gcsd at {gcs_address}: {exc}") from None
        actors = _count_states(gcs, "actors")
        tasks = _count_states(gcs, "tasks", MAX_TASK_RECORDS)
        jobs = _count_states(gcs, "jobs")
    total: dict[str, float] = collections.defaultdict(float)
    available: dict[str, float] = collections.defaultdict(float)
    for n in nodes:
        if n["Alive"]:
            for k, v in n["Resources"].items():
                total[k] += v
            for k, v in n["Available"].items():
                available[k] += v
    probes = health.local_probes(conf, raylet, gcs_address, store_socket) if raylet else [
        health.probe_gcs(gcs_address)]
    return {"gcs_address": gcs_address, "daemons": [asdict(p) for p in probes],
            "nodes": nodes, "cluster_resources": dict(total),
            "available_resources": {k: v for k, v in available.items() if v > 0},
            "used_resources": {k: round(v - available.get(k, 0.0), 6)
                               for k, v in total.items()},
            "workers": _workers(nodes), "actors": actors, "tasks": tasks, "jobs": jobs,
            "gcs": {"version": info.get("version"), "seq": info.get("seq"),
                    "shards": _shards(layout)}}


def run(ns: argparse.Namespace) -> int:
    status = collect(ns)
    if ns.json:
        print(json.dumps(status, indent=2, sort_keys=True, default=_jsonable))
    else:
        print(render(status))
    return 0


def _jsonable(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else str(value)


def _amount(name: str, value: float) -> str:
    if name in ("memory", "object_store_memory"):
        return f"{value / (1 << 30):.1f}G"
    return f"{value:g}"


def _states(counts: dict[str, int] | None, what: str) -> str:
    if counts is None:
        return f"none reported (gcsd has no {what} table yet)"
    if not counts:
        return "none"
    return ", ".join(f"{state} {n}" for state, n in counts.items())


def render(status: dict[str, Any]) -> str:
    """The status as text for a terminal."""
    lines = [f"gcsd {status['gcs_address']}", "", "Daemons (this host)"]
    for d in status["daemons"]:
        extra = f"{d['latency_ms']} ms" if d["latency_ms"] is not None else d["error"]
        lines.append(f"  {d['daemon']:<7} {d['state']:<8} {extra:<10} {d['endpoint']}")
    lines += ["", f"Nodes ({sum(n['Alive'] for n in status['nodes'])} alive, "
                  f"{len(status['nodes'])} known)"]
    lines.append(f"  {'NODE':<14}{'STATE':<7}{'ADDRESS':<17}{'HOSTNAME':<20}{'WORKERS':>7}")
    for n in status["nodes"]:
        workers = status["workers"].get(n["NodeID"], "-")
        lines.append(f"  {n['NodeID'][:12]:<14}{str(n['state']):<7}"
                     f"{n['NodeManagerAddress']:<17}{n['NodeManagerHostname'][:19]:<20}"
                     f"{workers:>7}")
    lines += ["", "Resources (used / total)"]
    for name, total in sorted(status["cluster_resources"].items()):
        used = status["used_resources"].get(name, 0.0)
        lines.append(f"  {name:<22}{_amount(name, used):>10} / {_amount(name, total)}")
    shards = status["gcs"]["shards"]
    lines += ["", f"Actors  {_states(status['actors'], 'actors')}",
              f"Tasks   {_states(status['tasks'], 'tasks')}",
              f"Jobs    {_states(status['jobs'], 'jobs')}", ""]
    if not shards:
        lines.append("gcsd reports no shards or chains")
    else:
        lines.append(f"gcsd: {shards['shards']} shards over {len(shards['members'])} "
                     f"member(s)")
        for c in shards["chains"]:
            chain = " -> ".join(f"member {m}" for m in c["chain"]) or "(no live replica)"
            lines.append(f"  shard {c['shard']:<3} epoch {c['epoch']:<4} {chain}")
    return "\n".join(lines)
