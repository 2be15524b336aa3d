"""``ray.util.get_node_ip_address``: the address this process's node is reached at."""

from __future__ import annotations

import socket

_known: list = [None, ""]  # [node id, its address]: one gcsd read per node


def get_node_ip_address() -> str:
    """The IP address of the node this process runs on.

    Connected (driver or worker): the address the node registered in gcsd
    (``[node] address``), which is what other nodes use. Not connected: this
    host's address from its name, or 127.0.0.1.
    """
    from libclient import api

    core = api._core
    if core is not None:
        if _known[0] == core.node_id:
            return _known[1]
        for row in core.gcs.get_nodes():
            if row.get("node_id") == core.node_id and row.get("address"):
                _known[:] = [core.node_id, row["address"]]
                return row["address"]
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
