"""The Ray core API against a real embedded cluster (real gcsd, stored, raylet)."""

import os
import time

import numpy as np
import pytest

from libclient import exceptions as exc


def test_remote_get_and_options(ray):
    @ray.remote
    def add(a, b=10):
        return a + b

    assert ray.get(add.remote(1)) == 11
    assert ray.get(add.remote(1, b=2)) == 3
    assert ray.get([add.remote(i, i) for i in range(5)]) == [0, 2, 4, 6, 8]
    assert ray.get(add.options(num_cpus=0.5).remote(5)) == 15
    with pytest.raises(TypeError):
        add(1, 2)


def test_remote_with_options_decorator_and_num_returns(ray):
    @ray.remote(num_returns=3, num_cpus=0.25)
    def three():
        return 1, "two", [3]

    a, b, c = three.remote()
    assert ray.get([a, b, c]) == [1, "two", [3]]

    @ray.remote
    def one():
        return (1, 2)

    two = one.options(num_returns=2).remote()
    assert ray.get(two) == [1, 2]


def test_zero_cpu_and_fractional_tasks(ray):
    @ray.remote(num_cpus=0)
    def free():
        return "no cpu needed"

    @ray.remote(num_cpus=0.5)
    def half():
        return ray.get(free.remote())

    assert ray.get([half.remote() for _ in range(4)]) == ["no cpu needed"] * 4


def test_bad_options_are_rejected(ray):
    @ray.remote
    def f():
        return 1

    with pytest.raises(ValueError):
        f.options(num_cpus=-1)
    with pytest.raises(ValueError):
        f.options(num_returns=0)
    with pytest.raises(ValueError):
        f.options(bogus=1)


def test_put_get_small_and_containers(ray):
    ref = ray.put({"a": [1, 2, 3]})
    assert ray.get(ref) == {"a": [1, 2, 3]}
    assert ray.get(ray.put(None)) is None
    with pytest.raises(TypeError):
        ray.get("not a ref")


def test_large_numpy_roundtrip_is_identical_and_zero_copy(ray):
    arr = np.random.default_rng(0).integers(0, 255, size=200 * 1024 * 1024, dtype=np.uint8)
    ref = ray.put(arr)
    t0 = time.perf_counter()
    out = ray.get(ref)
    elapsed = time.perf_counter() - t0
    assert np.array_equal(out, arr)
    assert not out.flags.writeable  # a view of immutable shared memory
    assert not out.flags.owndata
    assert elapsed < 0.05, f"get of 200 MB took {elapsed:.3f}s: not zero-copy"

    @ray.remote
    def total(a):
        return int(a.sum(dtype=np.int64))

    assert ray.get(total.remote(ref)) == int(arr.sum(dtype=np.int64))


def test_large_task_return_and_large_args(ray):
    @ray.remote
    def make(n):
        return np.arange(n, dtype=np.int64)

    @ray.remote
    def length(a, extra):
        return len(a) + len(extra)

    ref = make.remote(1_000_000)
    assert ray.get(ref)[-1] == 999_999
    big = np.ones(500_000)  # 4 MB argument, passed by value
    assert ray.get(length.remote(ref, big)) == 1_500_000


def test_refs_top_level_resolved_nested_stay_refs(ray):
    @ray.remote
    def inspect(x, box):
        return type(x).__name__, type(box[0]).__name__, ray.get(box[0])

    a = ray.put(41)
    b = ray.put("nested")
    assert ray.get(inspect.remote(a, [b])) == ("int", "ObjectRef", "nested")


def test_dependent_task_graph(ray):
    @ray.remote
    def inc(x):
        return x + 1

    ref = ray.put(0)
    for _ in range(20):
        ref = inc.remote(ref)
    assert ray.get(ref) == 20


def test_pending_ref_escaping_into_a_container(ray):
    @ray.remote
    def slow(x):
        time.sleep(0.3)
        return x * 2

    @ray.remote
    def reader(box):
        return ray.get(box[0]) + 1

    assert ray.get(reader.remote([slow.remote(5)])) == 11


def test_nested_tasks_do_not_deadlock_a_full_node(ray):
    @ray.remote
    def leaf(i):
        return i

    @ray.remote
    def parent(i):
        return sum(ray.get([leaf.remote(i * 10 + j) for j in range(3)]))

    # Four parents on two CPUs, each blocked in get on its children.
    assert ray.get([parent.remote(i) for i in range(4)], timeout=60) == [
        sum(i * 10 + j for j in range(3)) for i in range(4)]


def test_task_error_is_instance_of_cause_with_traceback(ray):
    class CustomError(ValueError):
        pass

    @ray.remote
    def boom():
        raise CustomError("bad thing")

    with pytest.raises(CustomError) as info:
        ray.get(boom.remote())
    err = info.value
    assert isinstance(err, exc.RayTaskError)
    assert "bad thing" in str(err) and "boom" in err.traceback_str

    @ray.remote
    def downstream(x):
        return x

    with pytest.raises(exc.RayTaskError):
        ray.get(downstream.remote(boom.remote()))


def test_get_timeout(ray):
    @ray.remote
    def sleepy():
        time.sleep(5)

    ref = sleepy.remote()
    t0 = time.perf_counter()
    with pytest.raises(exc.GetTimeoutError):
        ray.get(ref, timeout=0.2)
    assert time.perf_counter() - t0 < 2
    ray.cancel(ref, force=True)


def test_wait(ray):
    @ray.remote
    def delay(s):
        time.sleep(s)
        return s

    fast, slow = delay.remote(0), delay.remote(2)
    ready, not_ready = ray.wait([slow, fast], num_returns=1, timeout=1.5)
    assert ready == [fast] and not_ready == [slow]
    ready, not_ready = ray.wait([slow, fast], num_returns=2, timeout=0.01)
    assert ready == [fast] and not_ready == [slow]
    ready, _ = ray.wait([slow, fast], num_returns=2)
    assert set(ready) == {slow, fast}
    with pytest.raises(ValueError):
        ray.wait([fast], num_returns=2)


def test_worker_crash_is_retried(ray, tmp_path):
    marker = tmp_path / "crashed-once"

    @ray.remote
    def crash_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return "survived"

    assert ray.get(crash_once.remote(str(marker)), timeout=60) == "survived"

    @ray.remote(max_retries=0)
    def always_crash():
        os._exit(1)

    with pytest.raises(exc.WorkerCrashedError):
        ray.get(always_crash.remote(), timeout=60)


def test_retry_exceptions(ray, tmp_path):
    counter = tmp_path / "count"
    counter.write_text("0")

    @ray.remote(max_retries=3, retry_exceptions=[KeyError])
    def flaky(path):
        n = int(open(path).read()) + 1
        open(path, "w").write(str(n))
        if n < 3:
            raise KeyError(n)
        return n

    assert ray.get(flaky.remote(str(counter))) == 3

    @ray.remote(max_retries=3, retry_exceptions=[KeyError])
    def other():
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        ray.get(other.remote())


@pytest.mark.repeat(10)  # issue 13: races show up on repetition
def test_cancel(ray):
    @ray.remote
    def forever():
        while True:
            time.sleep(0.01)

    ref = forever.remote()
    time.sleep(0.3)
    ray.cancel(ref)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=30)

    ref = forever.remote()
    time.sleep(0.3)
    ray.cancel(ref, force=True)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=30)


def test_unpicklable_argument_and_return(ray):
    import threading

    @ray.remote
    def ident(x):
        return x

    with pytest.raises(TypeError):
        ident.remote(threading.Lock())

    @ray.remote
    def bad_return():
        return threading.Lock()

    with pytest.raises(exc.RayTaskError) as info:
        ray.get(bad_return.remote(), timeout=30)
    assert "serialize" in str(info.value)


def test_function_missing_on_worker(ray, tmp_path, monkeypatch):
    # A function defined in a module that only the driver can import: the
    # worker cannot load it and the error surfaces at get.
    mod = tmp_path / "driver_only_mod.py"
    mod.write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import driver_only_mod

    f = ray.remote(driver_only_mod.f)
    with pytest.raises(exc.RayTaskError) as info:
        ray.get(f.remote(), timeout=30)
    assert "driver_only_mod" in str(info.value)


def test_ten_thousand_small_tasks(ray):
    @ray.remote
    def sq(x):
        return x * x

    refs = [sq.remote(i) for i in range(10_000)]
    assert sum(ray.get(refs, timeout=120)) == sum(i * i for i in range(10_000))


def test_cluster_info(ray):
    nodes = ray.nodes()
    assert len(nodes) == 1 and nodes[0]["Alive"]
    assert ray.cluster_resources()["CPU"] == 2
    avail = ray.available_resources()
    assert 0 <= avail.get("CPU", 0) <= 2
    ctx = ray.get_runtime_context()
    assert ctx.get_node_id() == nodes[0]["NodeID"]
    assert ctx.get_task_id() is None
    assert ray.get_gpu_ids() == []

    @ray.remote
    def where():
        c = ray.get_runtime_context()
        return c.get_job_id(), c.get_node_id(), c.get_task_id()

    job, node, task = ray.get(where.remote())
    assert job == ctx.get_job_id() and node == ctx.get_node_id()
    assert task and len(task) == 32


def test_infeasible_task_stays_pending_with_a_warning(ray):
    """As in Ray: no live node fits it now, but one may join (tests/test_multinode.py)."""
    @ray.remote(resources={"unicorn": 1})
    def f():
        return 1

    ref = f.remote()
    with pytest.raises(exc.GetTimeoutError):
        ray.get(ref, timeout=1.0)
    ray.cancel(ref)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=10)


def test_reinit(ray):
    with pytest.raises(RuntimeError):
        ray.init()
    ray.init(ignore_reinit_error=True)
    assert ray.is_initialized()


def test_task_states_and_object_locations_reach_gcsd(ray):
    import numpy as np

    @ray.remote
    def lineage_probe(x):
        return x

    arg = ray.put(np.ones(1 << 20))  # 8 MB: a stored object, held while we look
    ref = lineage_probe.remote(arg)
    ray.get(ref)
    core = ray.api._core
    tid = ref.binary()[:16]
    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:
        row = core.gcs.table_get("tasks", tid)
        if row and row.get("state") == "FINISHED":
            break
        time.sleep(0.1)
    assert row and row["state"] == "FINISHED" and "lineage_probe" in row["name"]
    assert len(row["deps"]) == 1
    located = core.gcs.table_get("objects", row["deps"][0])
    assert located and located["state"] == "IN_STORE" and located["size"] >= 8 << 20
    del arg  # the owner frees an object nobody else saw; gcsd hears of it
    ray.put(None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        located = core.gcs.table_get("objects", row["deps"][0])
        if located["state"] == "FREED":
            break
        time.sleep(0.1)
    assert located["state"] == "FREED"
