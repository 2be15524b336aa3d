"""Scheduling strategies for ``.options(scheduling_strategy=...)``, with Ray's names.

A strategy is data: it travels with the lease request to the raylets, whose
policy (daemons/raylet/scheduler.py) gives it meaning. Besides these
classes, the strings ``"DEFAULT"`` and ``"SPREAD"`` are strategies too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeAffinitySchedulingStrategy:
    """Run on the node ``node_id`` (hex, as ``get_runtime_context().get_node_id()``).

    With ``soft=False`` the work fails (TaskUnschedulableError) if that node
    is dead or can never fit it; with ``soft=True`` it then runs elsewhere.
    A busy target is waited for either way (Ray's ``_spill_on_unavailable``
    is not supported).
    """

    node_id: str
    soft: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str):
            raise TypeError("node_id must be a hex string")
        try:
            bytes.fromhex(self.node_id)
        except ValueError:
            raise ValueError(f"node_id {self.node_id!r} is not a hex node id") from None


def to_wire(strategy: Any) -> Any:
    """The msgpack form a lease request carries (None for the default)."""
    if strategy is None or strategy == "DEFAULT":
        return None
    if strategy == "SPREAD":
        return "SPREAD"
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return {"node_id": bytes.fromhex(strategy.node_id), "soft": bool(strategy.soft)}
    raise ValueError(f"unknown scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD' or "
                     "NodeAffinitySchedulingStrategy")
