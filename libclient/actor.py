"""Actors on the client side: ``@remote`` classes, handles and method calls."""

from __future__ import annotations

import atexit
import inspect
import os
import time
from typing import Any

import cloudpickle

from libclient import api
from libclient import runtime_env as runtime_env_mod
from libclient.exceptions import ActorAlreadyExistsError
from libclient.object_ref import _released_actor_handles
from libclient.util.scheduling_strategies import to_wire

_ACTOR_OPTIONS = {"num_cpus", "num_gpus", "resources", "max_restarts", "max_task_retries",
                  "max_concurrency", "name", "namespace", "lifetime", "get_if_exists",
                  "memory", "scheduling_strategy", "runtime_env"}
_ACTOR_OPTIONS |= {"placement_group", "placement_group_bundle_index",  # placement_group options
                   "placement_group_capture_child_tasks"}
_ACTOR_OPTIONS |= {"concurrency_groups"}  # concurrency groups: {name: max calls at once}
_NAMES_NS = "actor_names:"
_ROW_WAIT_S = 2.0  # how long get_actor waits for a just-named actor's row


def method(*, num_returns: int | str | None = None, concurrency_group: str | None = None) -> Any:
    """``@method(num_returns=n, concurrency_group="io")`` on an actor method, as in Ray.
    ``num_returns="streaming"`` (the default for generator methods) makes calls
    return an ObjectRefGenerator."""
    if num_returns is not None and num_returns != "streaming" and (
            not isinstance(num_returns, int) or num_returns < 1):
        raise ValueError("num_returns must be a positive int or 'streaming'")
    if concurrency_group is not None and (not isinstance(concurrency_group, str)
                                          or not concurrency_group):
        raise ValueError("concurrency_group must be a non-empty string")

    def mark(fn: Any) -> Any:
        if num_returns is not None:
            fn.__shoal_num_returns__ = num_returns
        if concurrency_group is not None:
            fn.__shoal_concurrency_group__ = concurrency_group
        return fn

    return mark


def exit_actor() -> None:
    """End the actor this is called in, for good (Ray's ``ray.actor.exit_actor``).

    The raylet marks the actor DEAD with no restart and ends its process: the
    call that made this one, and every call still queued or sent later, fail
    with ActorDiedError (a RayActorError). Raises TypeError outside an actor.
    """
    core = api._core
    if core is None or core.kind != "worker" or core.current_actor_id is None:
        raise TypeError("exit_actor() can only be called inside an actor")
    # Exit handlers the actor's code installed run first, as in Ray; ours (the
    # API's shutdown) must not, or a call still running here could start a cluster.
    atexit.unregister(api.shutdown)
    atexit._run_exitfuncs()
    core.exit_actor("the actor exited intentionally: exit_actor() was called")


def _default_num_returns(fn: Any) -> int | str:
    """A method's num_returns: @method's, else "streaming" for a generator, else 1."""
    n = getattr(fn, "__shoal_num_returns__", None)
    if n is not None:
        return n
    return "streaming" if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn) \
        else 1


def _groups_meta(cls: type, opts: dict[str, Any]) -> dict[str, Any]:
    """The class's concurrency groups for its meta (the actor host reads them);
    every group a method names must be one of them."""
    groups = opts.get("concurrency_groups") or {}
    for name, fn in inspect.getmembers(cls, predicate=callable):
        group = getattr(fn, "__shoal_concurrency_group__", None)
        if group is not None and group not in groups:
            raise ValueError(f"method {name} of {cls.__name__} names concurrency group "
                             f"{group!r}, which the class does not define "
                             f"(concurrency_groups={groups!r})")
    return {"concurrency_groups": groups} if groups else {}


def _class_meta(cls: type) -> dict[str, Any]:
    methods: dict[str, int | str] = {}
    is_async = False
    for name, fn in inspect.getmembers(cls, predicate=callable):
        if name.startswith("__") and name != "__call__":
            continue
        methods[name] = _default_num_returns(fn)
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
    groups = options.get("concurrency_groups")  # concurrency groups
    if groups is not None and (not isinstance(groups, dict) or not all(
            isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in groups.items())):
        raise ValueError("concurrency_groups must map group names to positive ints")
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
                raise ActorAlreadyExistsError(f"the actor name {name!r} is already taken in namespace "
                                 f"{namespace!r}")
        demand = {"CPU": opts.get("num_cpus", 0), "GPU": opts.get("num_gpus", 0),
                  **(opts.get("resources") or {})}
        demand, strategy, pg = _placement(core, opts, demand)  # placement groups
        spec = {"class_name": meta["class_name"], "name": name or "", "namespace": namespace,
                "detached": opts.get("lifetime") == "detached",
                "max_restarts": opts.get("max_restarts", 0),
                "max_concurrency": opts.get("max_concurrency"), "is_async": meta["is_async"],
                "meta": {**meta, "max_task_retries": retries, **_groups_meta(self._cls, opts)},
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
        handle = ActorHandle(actor_id, spec["meta"], retries)  # with its concurrency groups
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

    __slots__ = ("_handle", "_name", "_nret", "_cg")

    def __init__(self, handle: ActorHandle, name: str, num_returns: int | str,
                 concurrency_group: str | None = None) -> None:
        self._handle = handle
        self._name = name
        self._nret = num_returns
        self._cg = concurrency_group

    def options(self, *, num_returns: int | str | None = None,
                concurrency_group: str | None = None, **_ignored: Any) -> ActorMethod:
        """This call with another num_returns or concurrency group (Ray's names)."""
        if num_returns is not None and num_returns != "streaming" and (
                not isinstance(num_returns, int) or num_returns < 1):
            raise ValueError("num_returns must be a positive int or 'streaming'")
        if concurrency_group is not None:
            groups = self._handle._meta.get("concurrency_groups") or {}
            if concurrency_group not in groups:
                raise ValueError(f"actor class {self._handle._meta['class_name']} has no "
                                 f"concurrency group {concurrency_group!r}")
        return ActorMethod(self._handle, self._name, num_returns or self._nret,
                           concurrency_group or self._cg)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        h = self._handle
        nret = self._nret
        refs = api._require().submit_actor_call(
            h._actor_id, self._name, f"{h._meta['class_name']}.{self._name}", args, kwargs,
            num_returns=nret, max_retries=h._retries,
            extra=None if self._cg is None else {"cg": self._cg})
        return refs[0] if nret == 1 or nret == "streaming" else refs

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
