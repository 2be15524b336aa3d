"""exit_actor() and concurrency groups, against real daemons."""

import asyncio
import sys
import threading
import time

import cloudpickle
import psutil
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _pid_gone(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------- exit_actor
def test_exit_actor_ends_the_actor_for_good(ray):
    @ray.remote(max_restarts=2)
    class Quitter:
        def pid(self):
            return __import__("os").getpid()

        def quit(self):
            ray.actor.exit_actor()
            return "never returned"

    a = Quitter.remote()
    pid = ray.get(a.pid.remote())
    exiting = a.quit.remote()
    queued = [a.pid.remote() for _ in range(3)]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(exiting, timeout=30)
    for ref in queued:
        with pytest.raises(ray.exceptions.ActorDiedError):
            ray.get(ref, timeout=30)
    assert _pid_gone(pid)
    time.sleep(0.5)  # no restart, though max_restarts=2 allows two
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor"):
        ray.get(a.pid.remote(), timeout=30)


def test_exit_actor_in_an_async_actor(ray):
    @ray.remote
    class AsyncQuitter:
        async def quit(self):
            await asyncio.sleep(0.01)
            ray.actor.exit_actor()

        async def ping(self):
            return "pong"

    a = AsyncQuitter.remote()
    assert ray.get(a.ping.remote()) == "pong"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.quit.remote(), timeout=30)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(a.ping.remote(), timeout=30)


def test_exit_actor_outside_an_actor_is_a_type_error(ray):
    from libclient.actor import exit_actor

    with pytest.raises(TypeError, match="inside an actor"):
        exit_actor()

    @ray.remote
    def in_a_task():
        try:
            ray.actor.exit_actor()
        except TypeError:
            return "refused"

    assert ray.get(in_a_task.remote()) == "refused"


# ------------------------------------------------------------ concurrency groups
@pytest.fixture(scope="module")
def Grouped(ray):
    @ray.remote(concurrency_groups={"io": 2, "compute": 1})
    class Grouped:
        def __init__(self):
            self.lock = threading.Lock()
            self.running = {"io": 0, "compute": 0, "default": 0}
            self.peak = {"io": 0, "compute": 0, "default": 0}

        def _run(self, group, seconds):
            with self.lock:
                self.running[group] += 1
                self.peak[group] = max(self.peak[group], self.running[group])
            time.sleep(seconds)
            with self.lock:
                self.running[group] -= 1
            return group

        @ray.method(concurrency_group="io")
        def io(self, seconds, label="io"):
            return self._run(label, seconds)

        @ray.method(concurrency_group="compute")
        def compute(self, seconds):
            return self._run("compute", seconds)

        def plain(self, seconds):
            return self._run("default", seconds)

        @ray.method(concurrency_group="io")
        def peaks(self):
            return dict(self.peak)

    return Grouped


def test_threaded_concurrency_groups_limit_each_group(ray, Grouped):
    a = Grouped.remote()
    ray.get(a.peaks.remote())
    start = time.monotonic()
    refs = [a.io.remote(0.3) for _ in range(4)] + [a.compute.remote(0.3) for _ in range(2)]
    refs += [a.plain.remote(0.3) for _ in range(2)]
    ray.get(refs, timeout=30)
    took = time.monotonic() - start
    peaks = ray.get(a.peaks.remote())
    assert peaks == {"io": 2, "compute": 1, "default": 1}
    # Groups run side by side: io 2 rounds, compute 2, default 2 (not 8 in a row).
    assert took < 1.6


def test_a_long_call_in_one_group_does_not_block_another(ray, Grouped):
    a = Grouped.remote()
    ray.get(a.peaks.remote())
    blocker = a.compute.remote(1.5)
    time.sleep(0.1)
    start = time.monotonic()
    assert ray.get(a.io.remote(0.0), timeout=10) == "io"
    assert time.monotonic() - start < 0.8
    ray.get(blocker, timeout=10)


def test_options_concurrency_group_on_a_call(ray, Grouped):
    a = Grouped.remote()
    ray.get(a.peaks.remote())
    # io calls moved into "compute" (size 1) run one at a time.
    refs = [a.io.options(concurrency_group="compute").remote(0.2, "compute")
            for _ in range(3)]
    ray.get(refs, timeout=30)
    assert ray.get(a.peaks.remote())["compute"] == 1
    with pytest.raises(ValueError, match="no concurrency group"):
        a.io.options(concurrency_group="nope")


def test_async_actor_concurrency_groups(ray):
    @ray.remote(concurrency_groups={"io": 3, "compute": 1})
    class AsyncGrouped:
        def __init__(self):
            self.running = {"io": 0, "compute": 0}
            self.peak = {"io": 0, "compute": 0}

        async def _run(self, group):
            self.running[group] += 1
            self.peak[group] = max(self.peak[group], self.running[group])
            await asyncio.sleep(0.2)
            self.running[group] -= 1

        @ray.method(concurrency_group="io")
        async def io(self):
            await self._run("io")

        @ray.method(concurrency_group="compute")
        async def compute(self):
            await self._run("compute")

        async def peaks(self):
            return self.peak

    a = AsyncGrouped.remote()
    ray.get(a.peaks.remote())
    ray.get([a.io.remote() for _ in range(6)] + [a.compute.remote() for _ in range(3)],
            timeout=30)
    assert ray.get(a.peaks.remote()) == {"io": 3, "compute": 1}


def test_undefined_concurrency_group_is_refused(ray):
    @ray.remote(concurrency_groups={"io": 1})
    class Bad:
        @ray.method(concurrency_group="gpu")
        def f(self):
            return 1

    with pytest.raises(ValueError, match="gpu"):
        Bad.remote()
    with pytest.raises(ValueError, match="concurrency_groups"):
        ray.remote(concurrency_groups={"io": 0})(type("C", (), {}))


def test_exit_actor_runs_the_actors_exit_handlers(ray, tmp_path):
    marker = str(tmp_path / "atexit-ran")

    @ray.remote
    class WithHandler:
        def __init__(self, path):
            import atexit

            atexit.register(lambda: open(path, "w").write("ran"))

        def quit(self):
            ray.actor.exit_actor()

    a = WithHandler.remote(marker)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(a.quit.remote(), timeout=30)
    assert open(marker).read() == "ran"
