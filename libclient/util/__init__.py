"""``ray.util`` counterparts: scheduling strategies, ActorPool, queue, ..."""

from libclient.util import queue  # ray.util.queue (Queue, Empty, Full)
from libclient.util.actor_pool import ActorPool
from libclient.util.node_ip import get_node_ip_address

# As in Ray, ``libclient.util.placement_group`` is the function (the module
# stays importable: ``from libclient.util.placement_group import ...``).
from libclient.util.placement_group import (  # noqa: E402  (placement groups)
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

__all__ = ["ActorPool", "get_node_ip_address", "queue"]
__all__ += ["get_current_placement_group", "get_placement_group", "placement_group",
            "placement_group_table", "remove_placement_group"]

# Ray 2's iteration helpers and named-actor listing (ray-compatibility.md)
from libclient.util.iterators import as_completed, map_unordered  # noqa: E402
from libclient.util.named_actors import list_named_actors  # noqa: E402

__all__ += ["as_completed", "list_named_actors", "map_unordered"]
