"""Actors on the client side: ``@remote`` classes, handles and method calls."""

from __future__ import annotations

import inspect
import os
import time
from typing import Any

import cloudpickle

from libclient import api
from libclient import runtime_env as runtime_env_mod
from libclient.object_ref import _released_actor_handles
from libclient.util.scheduling_strategies import to_wire

_ACTOR_OPTIONS = {"num_cpus", "num_gpus", "resources", "max_restarts", "max_task_retries",
                  "max_concurrency", "name", "namespace", "lifetime", "get_if_exists",
                  "memory", "scheduling_strategy", "runtime_env"}
_ACTOR_OPTIONS |= {"placement_group", "placement_group_bundle_index",  # placement_group options
                   "placement_group_capture_child_tasks"}
_NAMES_NS = "actor_names:"
_ROW_WAIT_S = 2.0  # how long get_actor waits for a just-named actor's row


def method(*, num_returns: int = 1) -> Any:
    """``@method(num_returns=n)`` on an actor method, as in Ray."""
    if not isinstance(num_returns, int) or num_returns < 1:
        raise ValueError("num_returns must be a positive int")

    def mark(fn: Any) -> Any:
        fn.__shoal_num_returns__ = num_returns
        return fn

    return mark


def _class_meta(cls: type) -> dict[str, Any]:
    methods: dict[str, int] = {}
    is_async = False
    for name, fn in inspect.getmembers(cls, predicate=callable):
        if name.startswith("__") and name != "__call__":
            continue
        methods[name] = getattr(fn, "__shoal_num_returns__", 1)
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            is_async = True
    return {"methods": methods, "class_name": cls.__name__, "is_async": is_async}


def _check(options: dict[str, Any]) -> None:
    unknown = set(options) - _ACTOR_OPTIONS
    if unknown:
        raise ValueError(f"unknown actor options: {sorted(unknown)}")
    api._check_options({k: v for k, v in options.items()
                        if k in ("num_cpus", "num_gpus", "resources")})
    for key in ("max_restarts", "max_task_retries"):
        v = options.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < -1):
            raise ValueError(f"{key} must be an int >= -1, got {v!r}")
    mc = options.get("max_concurrency")
    if mc is not None and (not isinstance(mc, int) or mc < 1):
        raise ValueError(f"max_concurrency must be a positive int, got {mc!r}")
    life = options.get("lifetime")
    if life not in (None, "detached", "non_detached"):
        raise ValueError(f"lifetime must be 'detached' or None, got {life!r}")
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError("name must be a non-empty string")
    if options.get("runtime_env") is not None:  # runtime_env: checked now, uploaded at creation
        runtime_env_mod.validate(options["runtime_env"])


class ActorClass:
    """What ``@remote`` makes of a class: ``Class.remote(...)`` creates an actor."""

    def __init__(self, cls: type, options: dict[str, Any],
                 shared: dict[str, Any] | None = None) -> None:
        _check(options)
        self._cls = cls
        self._options = options
        self._shared = shared if shared is not None else {"meta": _class_meta(cls)}
        self.__name__ = cls.__name__

    def __reduce__(self) -> Any:
        return (ActorClass, (self._cls, self._options))

    def options(self, **options: Any) -> ActorClass:
        return ActorClass(self._cls, {**self._options, **options}, self._shared)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self.__name__} cannot be instantiated directly; "
                        f"use {self.__name__}.remote()")

    def _key(self, core: Any) -> bytes:
        shared = self._shared
        if shared.get("core") is not core:
            pickled = shared.get("pickled") or cloudpickle.dumps(self._cls)
            shared["pickled"] = pickled
            shared["key"] = core.export_function(pickled, self.__name__)
            shared["core"] = core
        return shared["key"]

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        core = api._require()
        opts = self._options
        # runtime_env: zipped and stored before anything else is reserved
        renv = runtime_env_mod.for_task(opts.get("runtime_env"), core.gcs)
        meta = self._shared["meta"]
        retries = opts.get("max_task_retries", 0)
        actor_id = os.urandom(16)
        name = opts.get("name")
        namespace = opts.get("namespace") or api.default_namespace()
        if name:
            added = core.gcs.kv_put(_NAMES_NS + namespace, name.encode(), actor_id,
                                    overwrite=False)
            if not added:
                if opts.get("get_if_exists"):
                    return get_actor(name, namespace)
                raise ValueError(f"the actor name {name!r} is already taken in namespace "
                                 f"{namespace!r}")
        demand = {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0),
                  **(opts.get("resources") or {})}
        demand, strategy, pg = _placement(core, opts, demand)  # placement groups
        spec = {"class_name": meta["class_name"], "name": name or "", "namespace": namespace,
                "detached": opts.get("lifetime") == "detached",
                "max_restarts": opts.get("max_restarts", 0),
                "max_concurrency": opts.get("max_concurrency"), "is_async": meta["is_async"],
                "meta": {**meta, "max_task_retries": retries},
                "strategy": to_wire(strategy), "pg": pg}
        key = self._key(core)
        if name:
            # Once .remote() returns, the name resolves to this actor, which
            # may still be starting: its row exists before the raylet hears of it.
            core.gcs.table_put("actors", actor_id, {
                "actor_id": actor_id, "state": "PENDING_CREATION", "pid": 0, "socket": "",
                "num_restarts": 0, "max_restarts": spec["max_restarts"], "death_cause": "",
                "class_name": meta["class_name"], "job": core.job_id, "name": name,
                "namespace": namespace, "detached": spec["detached"], "meta": spec["meta"]})
        if renv is not None:  # its worker starts in it (merged over the job's, as in Ray)
            spec["renv"] = renv[1]
        core.create_actor(actor_id, key, meta["class_name"], args, kwargs,
                          demand={k: v for k, v in demand.items() if v}, spec=spec)
        handle = ActorHandle(actor_id, meta, retries)
        if not name and opts.get("lifetime") != "detached":
            core.actor_scoped_to_handles(actor_id)
        return handle


def _placement(core: Any, opts: dict[str, Any], demand: dict) -> tuple[dict, Any, list | None]:
    """Demand and strategy once a placement group (asked for, or captured) applies."""
    from libclient.util.placement_group import captured, resolve_strategy, task_demand

    demand, strategy, pg = resolve_strategy(opts, demand)
    if pg is None and strategy is None and captured(core) is not None:
        pg = [core.current_pg[0], -1, True]
        demand = task_demand(demand, pg[0].hex(), -1)
    return demand, strategy, pg


class ActorHandle:
    """A reference to an actor; pass it to tasks and other actors freely."""

    def __init__(self, actor_id: bytes, meta: dict[str, Any], max_task_retries: int = 0) -> None:
        self._actor_id = actor_id
        self._meta = meta
        self._retries = (1 << 30) if max_task_retries == -1 else max_task_retries
        core = api._core
        if core is not None:
            core.actor_handle_added(actor_id)

    def __del__(self) -> None:
        # Like ObjectRef.__del__: only queue; the core worker counts at safe points.
        _released_actor_handles.append(self._actor_id)

    def __reduce__(self) -> Any:
        core = api._core
        if core is not None:
            core.actor_handle_escaped(self._actor_id)
        return (ActorHandle, (self._actor_id, self._meta, self._retries))

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_") and name not in self.__dict__.get("_meta", {}).get("methods", {}):
            raise AttributeError(name)
        methods = self._meta["methods"]
        if name not in methods:
            raise AttributeError(f"actor class {self._meta['class_name']} has no method {name!r}")
        return ActorMethod(self, name, methods[name])

    def __repr__(self) -> str:
        return f"Actor({self._meta['class_name']}, {self._actor_id.hex()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._actor_id == self._actor_id

    def __hash__(self) -> int:
        return hash(self._actor_id)


class ActorMethod:
    """``handle.method``: call ``.remote(...)`` to run it on the actor."""

    __slots__ = ("_handle", "_name", "_nret")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int) -> None:
        self._handle = handle
        self._name = name
        self._nret = num_returns

    def options(self, *, num_returns: int | None = None, **_ignored: Any) -> ActorMethod:
        return ActorMethod(self._handle, self._name, num_returns or self._nret)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        h = self._handle
        refs = api._require().submit_actor_call(
            h._actor_id, self._name, f"{h._meta['class_name']}.{self._name}", args, kwargs,
            num_returns=self._nret, max_retries=h._retries)
        return refs[0] if self._nret == 1 else refs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor method {self._name} cannot be called directly; "
                        f"use .{self._name}.remote()")


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """Find a named actor; raises ValueError if there is none (as Ray does)."""
    core = api._require()
    ns = namespace or api.default_namespace()
    actor_id = core.gcs.kv_get(_NAMES_NS + ns, name.encode())
    if actor_id is None:
        raise ValueError(f"failed to look up actor {name!r} in namespace {ns!r}")
    record = core.gcs.table_get("actors", actor_id)
    deadline = time.monotonic() + _ROW_WAIT_S
    while record is None and time.monotonic() < deadline:
        # Another process reserved the name and is about to write the row.
        time.sleep(0.01)
        record = core.gcs.table_get("actors", actor_id)
    if record is None or record.get("state") == "DEAD":
        raise ValueError(f"actor {name!r} in namespace {ns!r} is dead")
    meta = record.get("meta") or {}
    return ActorHandle(actor_id, meta, meta.get("max_task_retries", 0))


def kill(handle: ActorHandle, *, no_restart: bool = True) -> None:
    """Kill an actor now; with no_restart=False it restarts if it has restarts left."""
    if not isinstance(handle, ActorHandle):
        raise TypeError("kill() expects an actor handle")
    api._require().kill_actor(handle._actor_id, no_restart)
