"""``ray.util.list_named_actors``: the named actors that are alive, read from
gcsd's actors table (the raylets keep each row's name, namespace and state)."""

from __future__ import annotations

from typing import Any

from libclient import api


def list_named_actors(all_namespaces: bool = False) -> list[Any]:
    """Names of live named actors in this job's namespace; with
    ``all_namespaces``, ``{"name": ..., "namespace": ...}`` for every namespace."""
    core = api._require()
    here = None if all_namespaces else api.default_namespace()
    out: list[Any] = []
    for _key, row in core.gcs.table_scan("actors"):
        name = row.get("name") if isinstance(row, dict) else None
        if not name or row.get("state") == "DEAD":
            continue
        namespace = row.get("namespace", "")
        if here is None:
            out.append({"name": name, "namespace": namespace})
        elif namespace == here:
            out.append(name)
    return out
