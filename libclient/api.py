"""Ray's core API on top of the core worker: init, remote, get, put, wait, ..."""

from __future__ import annotations

import atexit
import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from libclient import runtime_env as runtime_env_mod
from libclient import security
from libclient.core import CoreWorker
from libclient.exceptions import RaySystemError
from libclient.object_ref import ObjectRef

_core: CoreWorker | None = None
_cluster: Any = None
_namespace: str | None = None
_printer: Any = None  # prints workers' output (log_to_driver)
_init_lock = threading.Lock()

_AUTO_PATHS = ("/run/shoal/raylet.sock",)


def _attach_worker(core: CoreWorker) -> None:
    """Called in worker processes: the API then submits through this core."""
    global _core
    _core = core


def _require() -> CoreWorker:
    if _core is None:
        init()
    assert _core is not None
    return _core


def is_initialized() -> bool:
    return _core is not None


def _resolve_address(address: str) -> str:
    if address == "auto":
        env = os.environ.get("SHOAL_ADDRESS") or os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            return env
        for path in _AUTO_PATHS:
            if os.path.exists(path):
                return path
        raise ConnectionError("init(address='auto') found no running raylet: set SHOAL_ADDRESS "
                              "to a raylet socket, or start one (systemctl start raylet)")
    if _is_gcs_address(address):
        return _local_raylet(address)
    return address


def _is_gcs_address(address: str) -> bool:
    """``host:port`` or ``tcp://host:port`` names gcsd; anything else is a socket path."""
    if address.startswith("tcp://"):
        return True
    host, _, port = address.rpartition(":")
    return bool(host) and "/" not in address and port.isdigit()


def _local_raylet(gcs_address: str) -> str:
    """This host's raylet, found through gcsd's node table (as Ray does).

    Only a node whose Unix socket exists here can be ours; the head wins
    when several nodes share this host (a test cluster on one machine).
    """
    from libclient.gcs_client import GcsClient

    url = gcs_address if gcs_address.startswith("tcp://") else f"tcp://{gcs_address}"
    with GcsClient(url, timeout=10.0) as gcs:
        nodes = gcs.get_nodes()
    here = os.uname().nodename
    mine = [n for n in nodes if n.get("state") == "ALIVE" and n.get("hostname") == here
            and isinstance(n.get("raylet_socket"), str) and os.path.exists(n["raylet_socket"])]
    if not mine:
        raise ConnectionError(f"gcsd at {gcs_address} knows no live raylet on this host "
                              f"({here}); start one with `shoal start --address {gcs_address}`")
    mine.sort(key=lambda n: (not n.get("head"), n.get("registered_at", 0)))
    return mine[0]["raylet_socket"]


def init(address: str | None = None, *, num_cpus: float | None = None,
         num_gpus: float | None = None, resources: dict[str, float] | None = None,
         namespace: str | None = None, object_store_memory: int | None = None,
         ignore_reinit_error: bool = False, runtime_env: dict[str, Any] | None = None,
         log_to_driver: bool = True, **_ignored: Any) -> dict[str, Any]:
    """Connect to a node, or start an embedded single-node cluster.

    Args:
        address: a raylet socket path, or "auto"; None starts an embedded cluster
            (unless SHOAL_ADDRESS is set).
        log_to_driver: print workers' stdout and stderr here, prefixed
            ``(name pid=..., ip=...)`` as Ray does (libclient/worker_output.py).
    Returns:
        A dict describing the connection (node id, session dir, gcs address).
    Raises:
        RuntimeError: if already initialized and ignore_reinit_error is False.
    """
    global _core, _cluster, _namespace, _printer
    with _init_lock:
        if _core is not None:
            if ignore_reinit_error:
                return _context_info()
            raise RuntimeError("libclient.init() was already called; pass "
                               "ignore_reinit_error=True or call shutdown() first")
        runtime_env_mod.validate(runtime_env)  # a bad runtime_env fails before anything starts
        if address is None and os.environ.get("SHOAL_ADDRESS"):
            address = os.environ["SHOAL_ADDRESS"]
        if resources is not None and not isinstance(resources, dict):
            raise TypeError("resources must be a dict of name -> amount")
        if address is None:
            from libclient.cluster import EmbeddedCluster

            _cluster = EmbeddedCluster(num_cpus=num_cpus, num_gpus=num_gpus,
                                       resources=resources,
                                       object_store_memory=object_store_memory)
            # Its gcsd speaks only CURVE with the key made for it at start.
            security.use(security.load(_cluster.keys_dir))
            sock = _cluster.raylet_socket
        else:
            sock = _resolve_address(address)
        try:
            _core = CoreWorker(sock, kind="driver")
        except BaseException:
            if _cluster is not None:
                _cluster.stop()
                _cluster = None
            raise
        _namespace = namespace
        if runtime_env:  # the job's runtime_env: zipped and stored now, as Ray does
            try:
                runtime_env_mod.set_current(runtime_env_mod.resolve(runtime_env, _core.gcs))
            except BaseException:
                _core.shutdown()
                _core = None
                if _cluster is not None:
                    _cluster.stop()
                    _cluster = None
                raise
        _core.gcs.table_put("jobs", _core.job_id.to_bytes(4, "big"),
                            {"job_id": _core.job_id, "driver_pid": os.getpid(),
                             "namespace": namespace or "", "node_id": _core.node_id,
                             "state": "RUNNING", "driver_store": _core.store_address,
                             "log_to_driver": bool(log_to_driver)})
        if log_to_driver:  # workers' output for this job (worker_output.py)
            from libclient.worker_output import DriverPrinter

            _printer = DriverPrinter()
            _core.log_sink = _printer.on_log
        return _context_info()


def _context_info() -> dict[str, Any]:
    core = _core
    assert core is not None
    return {"node_id": core.node_id.hex(), "gcs_address": core.gcs_address,
            "raylet_socket": core.raylet_socket,
            "session_dir": _cluster.session_dir if _cluster is not None else None,
            "job_id": core.job_id}


def shutdown() -> None:
    """Disconnect; stop the embedded cluster if this process started one."""
    global _core, _cluster, _printer
    with _init_lock:
        core, _core = _core, None
        printer, _printer = _printer, None
        if printer is not None:  # what arrived so far is printed
            printer.stop()
        if runtime_env_mod.current():
            runtime_env_mod.set_current({})  # the job's runtime_env ends with it
        if core is not None and core.kind == "driver":
            try:
                core.gcs.table_put("jobs", core.job_id.to_bytes(4, "big"),
                                   {"job_id": core.job_id, "driver_pid": os.getpid(),
                                    "state": "FINISHED", "node_id": core.node_id})
            except Exception:
                pass
            core.shutdown()
        cluster, _cluster = _cluster, None
        if cluster is not None:
            cluster.stop()
            security.reset()  # those keys went with the cluster


atexit.register(shutdown)


# ---------------------------------------------------------------- remote
_TASK_OPTIONS = {"num_cpus", "num_gpus", "resources", "num_returns", "max_retries",
                 "retry_exceptions", "name", "memory", "scheduling_strategy", "runtime_env"}
_TASK_OPTIONS |= {"placement_group", "placement_group_bundle_index",  # placement_group options
                  "placement_group_capture_child_tasks"}


def _check_options(opts: dict[str, Any]) -> None:
    unknown = set(opts) - _TASK_OPTIONS
    if unknown:
        raise ValueError(f"unknown task options: {sorted(unknown)}")
    for key in ("num_cpus", "num_gpus"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"{key} must be a non-negative number, got {v!r}")
    n = opts.get("num_returns")
    if n is not None and n != "streaming" and (not isinstance(n, int) or n < 1):
        raise ValueError(f"num_returns must be a positive int or 'streaming', got {n!r}")
    r = opts.get("max_retries")
    if r is not None and (not isinstance(r, int) or r < -1):
        raise ValueError(f"max_retries must be an int >= -1, got {r!r}")
    res = opts.get("resources")
    if res is not None:
        if not isinstance(res, dict):
            raise ValueError("resources must be a dict")
        for k, v in res.items():
            if k in ("CPU", "GPU"):
                raise ValueError("use num_cpus/num_gpus instead of resources['CPU'/'GPU']")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"resource {k} must be a non-negative number")
    if opts.get("runtime_env") is not None:  # checked now; uploaded at the first .remote()
        runtime_env_mod.validate(opts["runtime_env"])


class RemoteFunction:
    """What ``@remote`` makes of a function: call ``.remote()`` to submit it."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any],
                 shared: dict[str, Any] | None = None) -> None:
        _check_options(options)
        self._fn = fn
        self._options = options
        self._shared = shared if shared is not None else {}
        self._name = getattr(fn, "__qualname__", getattr(fn, "__name__", "task"))
        # runtime_env: (key, wire form) or None, resolved for this parent env generation
        self._renv: tuple[str, dict] | None = None
        self._renv_gen = -1
        num_cpus = options.get("num_cpus", 1)
        num_gpus = options.get("num_gpus", 0)
        demand = {"CPU": num_cpus, "GPU": num_gpus, **(options.get("resources") or {})}
        self._demand = {k: v for k, v in demand.items() if v}
        # A generator function streams its items by default (Ray 2): "streaming".
        self._nret = options.get("num_returns", _default_num_returns(fn))
        retries = options.get("max_retries", 3)
        self._retries = 1 << 30 if retries == -1 else retries
        self._rex = options.get("retry_exceptions", False)
        from libclient.util.placement_group import resolve_strategy  # placement groups
        from libclient.util.scheduling_strategies import to_wire

        self._demand, strategy, self._pg = resolve_strategy(options, self._demand)
        self._strategy = to_wire(strategy)
        self.__name__ = getattr(fn, "__name__", "task")
        self.__doc__ = fn.__doc__

    def __reduce__(self) -> Any:
        # Tasks that call other remote functions capture them: ship only the
        # function and options, never this process's cached export state.
        return (RemoteFunction, (self._fn, self._options))

    def options(self, **options: Any) -> RemoteFunction:
        merged = {**self._options, **options}
        return RemoteFunction(self._fn, merged, self._shared)

    def _key(self, core: CoreWorker) -> bytes:
        shared = self._shared
        pickled = shared.get("pickled")
        if pickled is None:
            pickled = shared["pickled"] = cloudpickle.dumps(self._fn)
        if shared.get("core") is not core:
            shared["key"] = core.export_function(pickled, self._name)
            shared["core"] = core
        return shared["key"]

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        core = _require()
        if self._renv_gen != runtime_env_mod.generation:  # runtime_env: once per parent env
            self._renv = runtime_env_mod.for_task(self._options.get("runtime_env"), core.gcs)
            self._renv_gen = runtime_env_mod.generation
        submit = core.submit if self._renv is None else \
            functools.partial(core.submit_in_runtime_env, self._renv)
        demand, pg = self._demand, self._pg
        if pg is None and self._strategy is None and core.current_pg is not None:
            demand, pg = _in_parent_placement_group(core, demand)
        refs = submit(self._key(core), self._name, args, kwargs,
                           num_returns=self._nret, demand=demand,
                           max_retries=self._retries, retry_exceptions=self._rex,
                           strategy=self._strategy, extra={"pg": pg} if pg else None)
        return refs[0] if self._nret == 1 or self._nret == "streaming" else refs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self._name} cannot be called directly; "
                        f"use {self.__name__}.remote()")


def _in_parent_placement_group(core: CoreWorker, demand: dict) -> tuple[dict, list | None]:
    """A task started by one that captures child tasks runs in its placement group."""
    from libclient.util.placement_group import captured, task_demand

    cur = captured(core)
    if cur is None:
        return demand, None
    return task_demand(demand, cur[0].hex(), -1), [cur[0], -1, True]


def _default_num_returns(fn: Any) -> int | str:
    """Ray 2's default: a generator function returns an ObjectRefGenerator
    ("streaming"); anything else one ObjectRef."""
    import inspect

    return "streaming" if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn) \
        else 1


def remote(*args: Any, **options: Any) -> Any:
    """``@remote`` or ``@remote(num_cpus=..., ...)`` on a function."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("remote() takes a function, or keyword options only")
    return lambda fn: _make_remote(fn, options)


def _make_remote(obj: Any, options: dict[str, Any]) -> Any:
    if isinstance(obj, type):
        from libclient.actor import ActorClass

        return ActorClass(obj, options)
    return RemoteFunction(obj, options)


def default_namespace() -> str:
    """The namespace named actors live in: init's, or one private to this job."""
    if _namespace:
        return _namespace
    core = _require()
    if core.kind == "worker":  # a worker serves its task's job: use that job's namespace
        record = core.gcs.table_get("jobs", core.job_id.to_bytes(4, "big")) or {}
        if record.get("namespace"):
            return record["namespace"]
    return f"anonymous-{core.job_id}"




# ---------------------------------------------------------------- objects
def put(value: Any) -> ObjectRef:
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed; pass the ref itself")
    return _require().put(value)


def get(refs: Any, *, timeout: float | None = None) -> Any:
    core = _require()
    if isinstance(refs, ObjectRef):
        return core.get([refs], timeout)[0]
    if isinstance(refs, (list, tuple)):
        return core.get(list(refs), timeout)
    raise TypeError(f"get() expects an ObjectRef or a list of them, got {type(refs).__name__}")


def wait(refs: list[ObjectRef], *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[ObjectRef], list[ObjectRef]]:
    if isinstance(refs, ObjectRef) or not isinstance(refs, (list, tuple)):
        raise TypeError("wait() expects a list of ObjectRefs")
    refs = list(refs)
    if not all(isinstance(r, ObjectRef) for r in refs):
        raise TypeError("wait() expects a list of ObjectRefs")
    if len(set(refs)) != len(refs):
        raise ValueError("wait() got duplicate ObjectRefs")
    if num_returns < 0 or num_returns > len(refs):
        raise ValueError(f"num_returns={num_returns} is out of range for {len(refs)} refs")
    return _require().wait(refs, num_returns, timeout, fetch_local=bool(fetch_local))


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    if type(ref).__name__ == "ObjectRefGenerator":  # a streaming task: cancel it
        ref = ref.completed()
    if not isinstance(ref, ObjectRef):
        raise TypeError("cancel() expects an ObjectRef or an ObjectRefGenerator")
    _require().cancel(ref, force)


# ---------------------------------------------------------------- cluster
def nodes() -> list[dict[str, Any]]:
    out = []
    for n in _require().gcs.get_nodes():
        out.append({"NodeID": n["node_id"].hex(), "Alive": n.get("state") == "ALIVE",
                    "NodeManagerAddress": n.get("address", "127.0.0.1"),
                    "NodeManagerHostname": n.get("hostname", ""),
                    "RayletSocketName": n.get("raylet_socket", ""),
                    "ObjectStoreSocketName": n.get("store_socket", ""),
                    "RayletAddress": n.get("raylet_address", ""),
                    "ObjectStoreAddress": n.get("store_address", ""),
                    "Resources": n.get("resources", {}), "GPUs": n.get("gpus", []),
                    "state": n.get("state"), "DeathReason": n.get("death_reason", "")})
    return out


def cluster_resources() -> dict[str, float]:
    total: dict[str, float] = {}
    for n in nodes():
        if n["Alive"]:
            for k, v in n["Resources"].items():
                total[k] = total.get(k, 0) + v
    return total


def available_resources() -> dict[str, float]:
    """Free resources over the live nodes: this node's from its raylet (fresh),
    the others' as they last reported to gcsd (on change, within ~0.1 s)."""
    core = _require()
    reply = core.raylet_call({"t": "resources"})
    if not reply.get("ok"):
        raise RaySystemError(f"raylet: {reply.get('error')}")
    total: dict[str, float] = dict(reply["available"])
    for n in core.gcs.get_nodes():
        if n.get("state") == "ALIVE" and n.get("node_id") != core.node_id:
            for k, v in (n.get("available") or {}).items():
                total[k] = total.get(k, 0) + v
    return {k: v for k, v in total.items() if v > 0}


class RuntimeContext:
    """Ids of the current job, node, worker and task (hex strings, as in Ray)."""

    def __init__(self, core: CoreWorker) -> None:
        self._core = core

    def get_job_id(self) -> str:
        return self._core.job_id.to_bytes(4, "big").hex()

    def get_node_id(self) -> str:
        return self._core.node_id.hex()

    def get_worker_id(self) -> str:
        return self._core.worker_id.hex()

    def get_actor_id(self) -> str | None:
        aid = self._core.current_actor_id
        return aid.hex() if aid is not None else None

    def get_task_id(self) -> str | None:
        tid = self._core.current_task_id
        return tid.hex() if tid is not None else None

    @property
    def job_id(self) -> str:
        return self.get_job_id()

    @property
    def node_id(self) -> str:
        return self.get_node_id()

    @property
    def task_id(self) -> str | None:
        return self.get_task_id()

    @property
    def namespace(self) -> str | None:
        return _namespace

    @property
    def runtime_env(self) -> dict[str, Any]:
        """The runtime env this process runs in (packages named by their URIs)."""
        return dict(runtime_env_mod.current())

    def get_runtime_env_string(self) -> str:
        import json

        return json.dumps(runtime_env_mod.current())

    def get_assigned_resources(self) -> dict[str, Any]:
        return {"GPU": list(self._core.current_gpus)} if self._core.current_gpus else {}


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext(_require())


def get_gpu_ids() -> list[int]:
    """GPU indices assigned to the current task (empty in a driver)."""
    core = _require()
    return list(core.current_gpus)
