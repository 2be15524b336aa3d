"""The core worker, split the way Ray's is (see ``core_worker`` for the map).

Import order is one-way: ``api``, ``actor`` and ``worker`` import this
package; it imports only protocol, serialization, ids and the daemon
clients, never the API modules built on top of it.
"""

from libclient.core.core_worker import CoreWorker
from libclient.core.errors import error_wire_from

__all__ = ["CoreWorker", "error_wire_from"]
