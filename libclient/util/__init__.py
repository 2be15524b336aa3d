"""``ray.util`` counterparts: scheduling strategies, ActorPool, queue, ..."""

from libclient.util import queue  # ray.util.queue (Queue, Empty, Full)
from libclient.util.actor_pool import ActorPool
from libclient.util.node_ip import get_node_ip_address

__all__ = ["ActorPool", "get_node_ip_address", "queue"]
