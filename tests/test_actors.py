"""Actors on a real embedded cluster: state, ordering, handles, names, failures, concurrency."""

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from libclient import exceptions as exc


@pytest.fixture(scope="module")
def ray():
    import libclient

    libclient.init(num_cpus=2, namespace="actor-tests")
    try:
        yield libclient
    finally:
        libclient.shutdown()


def _pid_gone(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def _driver(ray, code, timeout=120):
    """Run a second driver process against this module's cluster."""
    sock = ray.api._core.raylet_socket
    script = textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, sock], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def Counter(ray):
    @ray.remote
    class Counter:
        def __init__(self, start=0):
            self.n = start
            self.log = []

        def inc(self, k=1):
            self.n += k
            self.log.append(k)
            return self.n

        def history(self):
            return self.log

        def pid(self):
            return os.getpid()

        @ray.method(num_returns=2)
        def pair(self):
            return self.n, -self.n

        def fail(self):
            raise KeyError("no such thing")

        def exit(self):
            os._exit(1)

    return Counter


def test_state_and_order_across_1000_calls(ray, Counter):
    c = Counter.remote(5)
    refs = [c.inc.remote(i) for i in range(1000)]
    assert ray.get(refs) == [5 + sum(range(i + 1)) for i in range(1000)]
    assert ray.get(c.history.remote()) == list(range(1000))
    a, b = c.pair.remote()
    assert ray.get([a, b]) == [5 + sum(range(1000)), -(5 + sum(range(1000)))]
    ray.kill(c)


def test_ref_arguments_are_resolved_in_order(ray, Counter):
    @ray.remote
    def slow(x):
        time.sleep(0.3)
        return x

    c = Counter.remote()
    first = c.inc.remote(slow.remote(10))  # waits for its argument
    second = c.inc.remote(1)  # must not overtake the first call
    assert ray.get([first, second]) == [10, 11]
    ray.kill(c)


def test_handles_in_tasks_and_other_actors(ray, Counter):
    c = Counter.remote()

    @ray.remote
    def bump(handle, k):
        return ray.get(handle.inc.remote(k))

    @ray.remote
    class Forwarder:
        def __init__(self, target):
            self.target = target

        def go(self, k):
            return ray.get(self.target.inc.remote(k))

    assert ray.get(bump.remote(c, 2)) == 2
    f = Forwarder.remote(c)
    assert ray.get(f.go.remote(3)) == 5
    assert ray.get(c.inc.remote(0)) == 5
    ray.kill(c)
    ray.kill(f)


def test_hundred_zero_cpu_actors(ray):
    @ray.remote(num_cpus=0)
    class Cell:
        def __init__(self, i):
            self.i = i

        def get(self):
            return self.i

    cells = [Cell.remote(i) for i in range(100)]
    assert ray.get([c.get.remote() for c in cells], timeout=180) == list(range(100))
    for c in cells:
        ray.kill(c)


def test_method_exception_keeps_actor_alive(ray, Counter):
    c = Counter.remote()
    with pytest.raises(KeyError) as info:
        ray.get(c.fail.remote())
    assert isinstance(info.value, exc.RayTaskError)
    assert ray.get(c.inc.remote()) == 1
    ray.kill(c)


@pytest.mark.repeat(10)  # issue 13: races show up on repetition
def test_kill_and_dead_handle(ray, Counter):
    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    ray.kill(c)
    assert _pid_gone(pid)
    with pytest.raises(exc.ActorDiedError):
        ray.get(c.inc.remote(), timeout=30)
    assert issubclass(exc.ActorDiedError, exc.RayActorError)  # Ray 2: RayActorError is the base


def test_restart_with_fresh_state_then_dead(ray, Counter):
    c = Counter.options(max_restarts=1).remote()
    assert ray.get(c.inc.remote()) == 1
    with pytest.raises(exc.ActorDiedError):
        ray.get(c.exit.remote(), timeout=30)
    # The restarted instance ran __init__ again.
    assert ray.get(c.inc.remote(), timeout=30) == 1
    with pytest.raises(exc.ActorDiedError):
        ray.get(c.exit.remote(), timeout=30)
    with pytest.raises(exc.ActorDiedError):
        ray.get(c.inc.remote(), timeout=30)


def test_task_retries_across_a_restart(ray, tmp_path):
    marker = tmp_path / "crashed"

    @ray.remote(max_restarts=1, max_task_retries=1)
    class Fragile:
        def once(self, path):
            if not os.path.exists(path):
                open(path, "w").close()
                os._exit(1)
            return "second instance answered"

    f = Fragile.remote()
    assert ray.get(f.once.remote(str(marker)), timeout=60) == "second instance answered"
    ray.kill(f)


def test_init_failure_surfaces_as_actor_died(ray):
    @ray.remote
    class Broken:
        def __init__(self):
            raise ValueError("bad init")

        def f(self):
            return 1

    b = Broken.remote()
    with pytest.raises(exc.ActorDiedError) as info:
        ray.get(b.f.remote(), timeout=30)
    assert "bad init" in str(info.value)


def test_bad_inputs(ray, Counter):
    c = Counter.remote()
    with pytest.raises(AttributeError):
        c.no_such_method.remote()
    with pytest.raises(TypeError):
        c.inc.remote(threading.Lock())
    with pytest.raises(TypeError):
        Counter(1)

    @ray.remote
    class BadReturn:
        def lock(self):
            return threading.Lock()

    b = BadReturn.remote()
    with pytest.raises(exc.RayTaskError, match="serialize"):
        ray.get(b.lock.remote(), timeout=30)
    with pytest.raises(ValueError):
        Counter.options(max_concurrency=0)
    ray.kill(c)
    ray.kill(b)


def test_async_actor_overlaps_up_to_max_concurrency(ray):
    @ray.remote(max_concurrency=4)
    class Sleeper:
        async def nap(self, s):
            await asyncio.sleep(s)
            return s

    s = Sleeper.remote()
    ray.get(s.nap.remote(0))
    t0 = time.perf_counter()
    ray.get([s.nap.remote(0.5) for _ in range(8)], timeout=30)
    elapsed = time.perf_counter() - t0
    # 8 naps of 0.5 s, 4 at a time: about 1 s; serial would be 4 s.
    assert 0.9 < elapsed < 2.5, elapsed
    ray.kill(s)


def test_threaded_actor_runs_calls_concurrently(ray):
    @ray.remote(max_concurrency=3)
    class Pool:
        def work(self, s):
            time.sleep(s)
            return threading.get_ident()

    p = Pool.remote()
    t0 = time.perf_counter()
    idents = ray.get([p.work.remote(0.5) for _ in range(3)], timeout=30)
    assert time.perf_counter() - t0 < 1.4
    assert len(set(idents)) == 3
    ray.kill(p)


@pytest.mark.repeat(5)  # issue 13: races show up on repetition
def test_named_actor_from_a_second_driver(ray, Counter):
    c = Counter.options(name="shared-counter").remote(100)
    assert ray.get(c.inc.remote()) == 101
    res = _driver(ray, """
        import sys
        import libclient as ray
        ray.init(address=sys.argv[1], namespace="actor-tests")
        h = ray.get_actor("shared-counter")
        print("GOT", ray.get(h.inc.remote()))
        try:
            ray.get_actor("shared-counter", namespace="elsewhere")
        except ValueError:
            print("NOT IN OTHER NAMESPACE")
        ray.shutdown()
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GOT 102" in res.stdout and "NOT IN OTHER NAMESPACE" in res.stdout
    with pytest.raises(ValueError):
        Counter.options(name="shared-counter").remote()
    same = Counter.options(name="shared-counter", get_if_exists=True).remote()
    assert ray.get(same.inc.remote()) == 103
    ray.kill(c)
    _wait_name_freed(ray, "shared-counter")  # the next repetition takes it again


def _wait_name_freed(ray, name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the raylet frees the name once it sees the exit
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the name {name!r} was never freed")


@pytest.mark.repeat(3)  # issue 13: races show up on repetition
def test_detached_actor_outlives_its_driver_and_normal_one_does_not(ray):
    res = _driver(ray, """
        import os, sys
        import libclient as ray
        ray.init(address=sys.argv[1], namespace="actor-tests")

        @ray.remote
        class Keeper:
            def __init__(self):
                self.v = "kept"
            def get(self):
                return self.v
            def pid(self):
                return os.getpid()

        d = Keeper.options(name="keeper", lifetime="detached").remote()
        n = Keeper.remote()
        print("PIDS", ray.get(d.pid.remote()), ray.get(n.pid.remote()), flush=True)
        ray.shutdown()
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    detached_pid, normal_pid = map(int, res.stdout.split("PIDS")[1].split())
    assert _pid_gone(normal_pid), "a non-detached actor outlived its driver"
    assert psutil.pid_exists(detached_pid)
    keeper = ray.get_actor("keeper")
    assert ray.get(keeper.get.remote(), timeout=30) == "kept"
    ray.kill(keeper)
    assert _pid_gone(detached_pid)
    _wait_name_freed(ray, "keeper")


def test_actor_table_records_lifecycle(ray, Counter):
    c = Counter.options(name="recorded").remote()
    ray.get(c.inc.remote())
    core = ray.api._core
    row = core.gcs.table_get("actors", c._actor_id)
    assert row["state"] == "ALIVE" and row["class_name"] == "Counter"
    assert row["name"] == "recorded" and row["pid"] > 0
    ray.kill(c)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = core.gcs.table_get("actors", c._actor_id)
        if row["state"] == "DEAD":
            break
        time.sleep(0.05)
    assert row["state"] == "DEAD" and "kill" in row["death_cause"]


def test_actor_ends_when_its_last_handle_goes(ray, Counter):
    import gc

    c = Counter.remote()
    pid = ray.get(c.pid.remote())
    last = c.inc.remote(7)
    del c
    gc.collect()
    assert ray.get(last) == 7  # queued calls still finish
    ray.put(None)  # any API call drains released handles
    assert _pid_gone(pid)
