"""``ray.runtime_context``: where Ray programs import ``RuntimeContext`` from.

The class lives with the rest of the driver API (libclient/api.py); this
module only gives it Ray's import path.
"""

from libclient.api import RuntimeContext, get_runtime_context

__all__ = ["RuntimeContext", "get_runtime_context"]
