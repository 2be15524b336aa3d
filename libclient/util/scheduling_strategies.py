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


@dataclass(frozen=True)
class PlacementGroupSchedulingStrategy:
    """Run in a placement group: in bundle ``placement_group_bundle_index``, or in
    any of its bundles (-1). With ``placement_group_capture_child_tasks`` the
    tasks and actors this one starts run in the group too (any bundle).

    Not a wire strategy: the client rewrites the demand onto the bundle's own
    resources (libclient.util.placement_group.resolve_strategy), and the
    ordinary policy then finds the one node that has them.
    """

    placement_group: Any
    placement_group_bundle_index: int = -1
    placement_group_capture_child_tasks: bool | None = None

    def __post_init__(self) -> None:
        from libclient.util.placement_group import PlacementGroup

        if self.placement_group is not None and not isinstance(self.placement_group,
                                                               PlacementGroup):
            raise TypeError("placement_group must be a PlacementGroup (or None)")
        index = self.placement_group_bundle_index
        if isinstance(index, bool) or not isinstance(index, int) or index < -1:
            raise ValueError(f"placement_group_bundle_index must be an int >= -1, got {index!r}")


def to_wire(strategy: Any) -> Any:
    """The msgpack form a lease request carries (None for the default)."""
    if strategy is None or strategy == "DEFAULT":
        return None
    if strategy == "SPREAD":
        return "SPREAD"
    if isinstance(strategy, NodeAffinitySchedulingStrategy):
        return {"node_id": bytes.fromhex(strategy.node_id), "soft": bool(strategy.soft)}
    if isinstance(strategy, PlacementGroupSchedulingStrategy):
        raise ValueError("a PlacementGroupSchedulingStrategy is applied by the client "
                         "(placement_group.resolve_strategy), not sent as is")
    raise ValueError(f"unknown scheduling_strategy {strategy!r}: use 'DEFAULT', 'SPREAD', "
                     "NodeAffinitySchedulingStrategy or PlacementGroupSchedulingStrategy")
