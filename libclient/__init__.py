"""libclient: Shoal's client library, a drop-in for Ray's core API.

    import libclient as ray
    ray.init()

    @ray.remote
    def f(x):
        return x * 2

    print(ray.get([f.remote(i) for i in range(4)]))
"""

from libclient import exceptions
from libclient.actor import ActorClass, ActorHandle, get_actor, kill, method
from libclient.api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_gpu_ids,
    get_runtime_context,
    init,
    is_initialized,
    nodes,
    put,
    remote,
    shutdown,
    wait,
)
from libclient.object_ref import ObjectRef
from libclient.object_ref_generator import ObjectRefGenerator
from libclient.util.timeline import timeline

__all__ = [
    "ActorClass", "ActorHandle", "ObjectRef", "get_actor", "kill", "method", "available_resources", "cancel", "cluster_resources", "exceptions", "get",
    "get_gpu_ids", "get_runtime_context", "init", "is_initialized", "nodes", "put", "remote",
    "shutdown", "wait", "ObjectRefGenerator", "timeline",
]
__version__ = "0.1.0"

# Ray's module paths ray.runtime_context and ray.remote_function
from libclient import remote_function, runtime_context  # noqa: E402

__all__ += ["remote_function", "runtime_context"]
