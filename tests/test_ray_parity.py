"""docs/ray-compatibility.md stays true: every row it calls supported or partly
resolves in libclient, every test it names exists, it lists all of Ray core's
public names, and rows with no other test are exercised here on real daemons."""

import ast
import importlib
import inspect
import os
import re
import sys
import time

import cloudpickle
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "ray-compatibility.md")
STATUSES = {"supported", "partly", "not supported"}
TEST_REF = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")


def _rows():
    """(name, status, notes, [(file, test)]) for each table row."""
    out = []
    for line in open(TABLE).read().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`")
        out.append((name, cells[1], cells[2], TEST_REF.findall(cells[3])))
    return out


def _resolve(name):
    """The libclient object a ``ray.``-dotted name stands for (AttributeError if none)."""
    parts = name.split(".")
    assert parts[0] == "ray", name
    obj, path = importlib.import_module("libclient"), "libclient"
    for part in parts[1:]:
        for module in (f"{path}.{part}", path):  # not imported yet, or shadowed by a
            if hasattr(obj, part):               # same-named function (util.placement_group)
                break
            try:
                importlib.import_module(module)
                obj = obj if module != path else importlib.import_module(path)
            except ImportError:
                pass
        if not hasattr(obj, part):
            raise AttributeError(f"{name}: libclient has no {path}.{part}")
        obj, path = getattr(obj, part), f"{path}.{part}"
    return obj


def _option_exists(kind, option):
    import libclient
    from libclient import actor, api
    from libclient.util.scheduling_strategies import to_wire

    if kind == "task":
        return option in api._TASK_OPTIONS
    if kind == "actor":
        return option in actor._ACTOR_OPTIONS
    if kind == "method":
        return (option in inspect.signature(libclient.method).parameters
                and option in inspect.signature(libclient.actor.ActorMethod.options).parameters)
    if kind == "init":
        p = inspect.signature(libclient.init).parameters.get(option)
        return p is not None and p.kind is not inspect.Parameter.VAR_KEYWORD
    if kind == "strategy":
        to_wire(option)  # raises ValueError for an unknown strategy
        return True
    raise AssertionError(f"unknown row kind {kind!r}")


def _test_functions(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


# ------------------------------------------------------------ the table itself
def test_every_row_has_a_status_and_supported_rows_name_existing_tests():
    rows = _rows()
    assert len(rows) > 200
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)), "a name has two rows"
    cache = {}
    for name, status, notes, tests in rows:
        assert status in STATUSES, (name, status)
        if status == "supported":
            assert tests, f"{name} is supported but names no test"
        if status != "supported":
            assert notes, f"{name} is {status} but does not say how or why"
        for path, fn in tests:
            if path not in cache:
                cache[path] = _test_functions(path)
            assert fn in cache[path], f"{name}: {path}::{fn} does not exist"


def test_supported_and_partly_rows_resolve_in_libclient():
    for name, status, _notes, _tests in _rows():
        if status == "not supported":
            continue
        if ":" in name:
            kind, option = name.split(":", 1)
            assert _option_exists(kind, option), f"{name} is {status} but not accepted"
        else:
            _resolve(name)  # raises if libclient lacks it


def test_not_supported_options_are_refused_or_named_as_ignored():
    """An option the table calls unsupported is refused, unless its row says
    it is accepted and ignored (init's keywords)."""
    for name, status, notes, _tests in _rows():
        if status != "not supported" or ":" not in name:
            continue
        kind, option = name.split(":", 1)
        if kind == "init":
            assert "ignored" in notes, name
        elif kind in ("task", "actor"):
            assert not _option_exists(kind, option), f"{name}: accepted after all"


def test_table_lists_all_of_ray_core():
    """Every public name of the installed Ray's core is a row."""
    pytest.importorskip("ray")
    import ray
    import ray.exceptions
    import ray.runtime_context
    import ray.util.queue
    import ray.util.state
    from ray._common import ray_option_utils as opts

    have = {r[0] for r in _rows()}
    want = {f"ray.{n}" for n in ray.__all__ if n != "_config"}
    want |= {f"task:{n}" for n in opts.task_options}
    want |= {f"actor:{n}" for n in opts.actor_options}
    want |= {f"ray.exceptions.{n}" for n, v in vars(ray.exceptions).items()
             if inspect.isclass(v) and issubclass(v, BaseException)
             and v.__module__.startswith("ray")}
    want |= {f"ray.runtime_context.RuntimeContext.{n}"
             for n in dir(ray.runtime_context.RuntimeContext) if not n.startswith("_")}
    want |= {f"ray.util.{n}" for n in ray.util.__all__}
    want |= {f"ray.util.state.{n}" for n in ray.util.state.__all__}
    want |= {f"ray.util.queue.Queue.{n}" for n in dir(ray.util.queue.Queue)
             if not n.startswith("_")}
    want |= {f"ray.util.ActorPool.{n}" for n in dir(ray.util.ActorPool) if not n.startswith("_")}
    want |= {f"ray.ObjectRefGenerator.{n}" for n in dir(ray.ObjectRefGenerator)
             if not n.startswith("_")}
    missing = sorted(want - have)
    assert not missing, f"rows missing from docs/ray-compatibility.md: {missing}"


# ------------------------------------------------------- supported, tested here
def test_init_namespace_resources_and_named_actors():
    """Runs before the module's shared cluster starts: init's own keywords."""
    import libclient as ray
    from libclient import exceptions as exc
    from libclient.util import list_named_actors

    assert not ray.is_initialized()
    ray.init(num_cpus=1, resources={"parity_res": 2}, namespace="parity-ns")
    try:
        assert ray.is_initialized()
        assert ray.cluster_resources()["parity_res"] == 2
        assert ray.get_runtime_context().namespace == "parity-ns"

        @ray.remote
        class Named:
            def ping(self):
                return "pong"

        a = Named.options(name="alpha").remote()
        b = Named.options(name="beta", namespace="elsewhere").remote()
        assert ray.get([a.ping.remote(), b.ping.remote()]) == ["pong", "pong"]
        with pytest.raises(exc.ActorAlreadyExistsError):
            Named.options(name="alpha").remote()
        same = Named.options(name="alpha", get_if_exists=True).remote()
        assert same == a
        assert ray.get_actor("beta", namespace="elsewhere") == b
        with pytest.raises(ValueError):
            ray.get_actor("beta")  # not in this job's namespace
        assert list_named_actors() == ["alpha"]
        both = list_named_actors(all_namespaces=True)
        assert sorted((d["namespace"], d["name"]) for d in both) == [
            ("elsewhere", "beta"), ("parity-ns", "alpha")]
        ray.kill(a)
        deadline = time.monotonic() + 10
        while "alpha" in list_named_actors() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list_named_actors() == []
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def test_shutdown_and_is_initialized():
    import libclient as ray

    assert not ray.is_initialized()
    ray.shutdown()  # a second shutdown is harmless, as in Ray
    with pytest.raises(TypeError):
        ray.shutdown(wait_for_processes=True)  # the table says: not accepted


def test_runtime_context_in_tasks_and_actors(ray):
    import json

    import libclient.runtime_context as rc

    ctx = ray.runtime_context.get_runtime_context()
    assert isinstance(ctx, rc.RuntimeContext)
    assert ctx.get_actor_id() is None and ctx.task_id is None
    assert ctx.job_id == ctx.get_job_id() and ctx.node_id == ctx.get_node_id()
    assert len(ctx.get_worker_id()) > 0

    @ray.remote
    def in_task():
        c = ray.get_runtime_context()
        return (c.get_actor_id(), c.get_task_id(), c.task_id, c.get_worker_id(),
                c.get_runtime_env_string(), c.get_assigned_resources(), c.namespace)

    actor_id, task_id, task_prop, worker, renv, assigned, ns = ray.get(
        in_task.options(runtime_env={"env_vars": {"PARITY": "1"}}).remote())
    assert actor_id is None and task_id == task_prop and len(task_id) == 32
    assert worker != ctx.get_worker_id()
    assert json.loads(renv)["env_vars"] == {"PARITY": "1"}
    assert assigned == {}  # partly: Ray would say {"CPU": 1.0}
    assert ns is None  # partly: Ray gives the job's namespace

    @ray.remote
    class Where:
        def ids(self):
            c = ray.get_runtime_context()
            return c.get_actor_id(), c.get_worker_id()

    w = Where.remote()
    aid, worker = ray.get(w.ids.remote())
    assert aid == w._actor_id.hex() and worker != ctx.get_worker_id()


def test_kill_with_restart_and_actor_method_options(ray):
    from libclient.actor import ActorMethod

    @ray.remote(max_restarts=1)
    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n

        def pair(self):
            return self.n, -self.n

    c = Counter.remote()
    assert ray.get([c.inc.remote(), c.inc.remote()]) == [1, 2]
    assert isinstance(c.pair, ActorMethod)
    a, b = c.pair.options(num_returns=2).remote()
    assert ray.get([a, b]) == [2, -2]
    ray.kill(c, no_restart=False)  # restarts with fresh state
    assert ray.get(c.inc.remote(), timeout=30) == 1
    ray.kill(c)


def test_remote_function_and_actor_class_objects(ray):
    from libclient.actor import ActorClass
    from libclient.remote_function import RemoteFunction

    @ray.remote
    def double(x):
        return 2 * x

    @ray.remote
    class Box:
        def get(self):
            return "box"

    assert isinstance(double, RemoteFunction) and isinstance(double.options(num_cpus=0.5),
                                                             RemoteFunction)
    assert isinstance(Box, ActorClass) and isinstance(Box.options(num_cpus=0), ActorClass)
    assert ray.get(double.options(num_cpus=0.5).remote(4)) == 8
    assert ray.get(Box.options(max_concurrency=2).remote().get.remote()) == "box"
    with pytest.raises(TypeError):
        double(1)  # as Ray: remote functions are not called directly


def test_task_options_accepted_as_ray(ray):
    @ray.remote(memory=100 << 20, name="parity_task", scheduling_strategy="DEFAULT")
    def f():
        return "ran"

    assert ray.get(f.remote()) == "ran"
    assert ray.get(f.options(memory=1, name="other").remote()) == "ran"
    for unsupported in ({"accelerator_type": "A100"}, {"label_selector": {"a": "b"}},
                        {"max_calls": 1}):
        with pytest.raises(ValueError):
            f.options(**unsupported)


def test_actor_options_accepted_as_ray(ray):
    @ray.remote(memory=100 << 20)
    class A:
        def ok(self):
            return True

    assert ray.get(A.remote().ok.remote())
    with pytest.raises(ValueError):
        A.options(max_pending_calls=10)


def test_object_ref_methods(ray):
    ref = ray.put("value")
    assert isinstance(ref, ray.ObjectRef)
    assert bytes.fromhex(ref.hex()) == ref.binary() and len(ref.binary()) > 0
    assert ray.get(ref) == "value"


def test_summarize_actors(ray):
    from libclient.util import state

    @ray.remote
    class ParitySummary:
        def up(self):
            return True

    actors = [ParitySummary.remote() for _ in range(2)]
    assert all(ray.get([a.up.remote() for a in actors]))
    deadline = time.monotonic() + 10
    while True:
        summary = state.summarize_actors()["cluster"]["summary"].get("ParitySummary")
        if summary and summary["state_counts"].get("ALIVE") == 2:
            break
        assert time.monotonic() < deadline, f"summary never counted 2 ALIVE: {summary}"
        time.sleep(0.05)
    assert summary["class_name"] == "ParitySummary"
    for a in actors:
        ray.kill(a)


def test_as_completed_and_map_unordered(ray):
    from libclient.util import as_completed, map_unordered

    @ray.remote(num_cpus=0)
    def nap(x):
        time.sleep(x)
        return x

    # Gaps of seconds, so a loaded machine's worker start-ups cannot reorder them.
    refs = [nap.remote(d) for d in (3.0, 0.0, 1.5)]
    assert list(as_completed(refs, chunk_size=3)) == [0.0, 1.5, 3.0]
    assert set(as_completed(refs, chunk_size=1, yield_obj_refs=True)) == set(refs)
    out = list(map_unordered(nap, [2.0, 0.0, 0.1, 0.0], backpressure_size=4))
    assert sorted(out) == [0.0, 0.0, 0.1, 2.0] and out[-1] == 2.0
    # Backpressure: never more than 2 in flight, so 4 naps of 0.2 s take >= 0.4 s.
    t0 = time.monotonic()
    assert sorted(map_unordered(nap, [0.2] * 4, backpressure_size=2, chunk_size=1)) == [0.2] * 4
    assert time.monotonic() - t0 >= 0.4
    with pytest.raises(ValueError):
        list(as_completed(refs, chunk_size=0))

    @ray.remote
    def boom(_):
        raise KeyError("x")

    with pytest.raises(KeyError):
        list(map_unordered(boom, [1]))


def test_placement_group_bundle_index_and_capture(ray):
    from libclient.util import (
        get_current_placement_group,
        placement_group,
        remove_placement_group,
    )
    from libclient.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote
    def current():
        pg = get_current_placement_group()
        return pg.id.hex() if pg is not None else None

    @ray.remote
    def parent():
        pg = get_current_placement_group()
        return (pg.id.hex() if pg is not None else None), ray.get(current.remote(), timeout=20)

    @ray.remote(num_cpus=0)
    class Spawner:
        def spawn(self):
            return ray.get(current.remote(), timeout=20)

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    try:
        assert pg.wait(20) and pg.bundle_count == 2
        assert get_current_placement_group() is None  # a driver is in no group
        me = pg.id.hex()
        captured = PlacementGroupSchedulingStrategy(pg, 1, placement_group_capture_child_tasks=True)
        assert ray.get(parent.options(scheduling_strategy=captured).remote(), timeout=30) == \
            (me, me)
        # Ray's older spelling: placement_group= and placement_group_bundle_index=
        assert ray.get(current.options(placement_group=pg, placement_group_bundle_index=0)
                       .remote(), timeout=30) == me
        s = Spawner.options(placement_group=pg,
                            placement_group_capture_child_tasks=True).remote()
        assert ray.get(s.spawn.remote(), timeout=30) == me
        ray.kill(s)
    finally:
        remove_placement_group(pg)
    assert ray.get(current.remote(), timeout=30) is None  # outside any group
