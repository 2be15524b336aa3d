"""Races between a message to the raylet and a direct message to a worker (issue 13).

Each test repeats its race many times, with and without short pauses
between the two messages, on its own embedded cluster (a hung round leaves
workers busy, which must not poison other modules). Before the fixes, the
cancel race hung within the first few rounds, a call after kill ran in about
13 rounds of 30, and get_actor after a named creation failed in 29 of 30.

``SHOAL_RACE_ROUNDS`` scales the loops (default 200). The suite's older
cancel, kill and named-actor tests repeat too (``@pytest.mark.repeat``).
"""

import json
import os
import time

import pytest

from libclient import exceptions as exc

ROUNDS = int(os.environ.get("SHOAL_RACE_ROUNDS", "200"))
# An actor round starts a worker process (~0.25 s here), so actor races loop
# half as often in the default suite: still 100 kill rounds and 2 x 50 name
# rounds, against failure rates of 13/30 and 29/30 before the fixes.
ACTOR_ROUNDS = ROUNDS // 2
_SESSION: dict = {}
PAUSES = (0.0, 0.0, 0.0002, 0.002)  # most rounds with no pause at all


@pytest.fixture(scope="module")
def ray():
    import libclient

    info = libclient.init(num_cpus=2, namespace="race-tests")
    _SESSION["dir"] = info["session_dir"]
    try:
        yield libclient
    finally:
        libclient.shutdown()


@pytest.fixture(scope="module")
def Counter(ray):
    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def incr(self):
            self.n += 1
            return self.n

    return Counter


def _pause(i):
    p = PAUSES[i % len(PAUSES)]
    if p:
        time.sleep(p)


def test_cancel_right_after_submit_never_hangs(ray):
    """Ray's documented cancel example, in every state the task can be in."""

    @ray.remote
    def blocking_operation():
        time.sleep(10e6)

    @ray.remote
    def noop():
        return 1

    for i in range(ROUNDS):
        if i % 2:
            # A warm lease: the task goes straight to a worker that is idle,
            # reading its socket, or still finishing the previous task.
            ray.get(noop.remote(), timeout=30)
        ref = blocking_operation.remote()
        _pause(i)
        ray.cancel(ref)
        with pytest.raises(exc.TaskCancelledError):
            ray.get(ref, timeout=15)
    # A plain cancel interrupts the task, never the worker: none died (a
    # signal that lands while a worker starts up used to kill it).
    with open(os.path.join(_SESSION["dir"], "logs", "raylet.log")) as f:
        exits = [json.loads(line) for line in f if '"worker_exited"' in line]
    assert exits == []


def test_cancel_of_a_finished_task_keeps_its_result(ray):
    @ray.remote
    def quick(x):
        return x

    for i in range(ROUNDS // 4):
        ref = quick.remote(i)
        ray.get(ref, timeout=30)
        ray.cancel(ref)
        assert ray.get(ref, timeout=30) == i


def test_call_after_kill_never_runs(ray, Counter):
    for i in range(ACTOR_ROUNDS):
        c = Counter.remote()
        assert ray.get(c.incr.remote(), timeout=30) == 1
        if i % 3 == 2:
            pending = c.incr.remote()  # in flight when kill is called
        ray.kill(c)
        _pause(i)
        with pytest.raises(exc.RayActorError):
            ray.get(c.incr.remote(), timeout=30)
        if i % 3 == 2:
            try:  # may have run before the kill: then it saw the actor's state
                assert ray.get(pending, timeout=30) == 2
            except exc.RayActorError:
                pass


def test_kill_before_creation_reaches_the_raylet(ray, Counter):
    @ray.remote
    def slow_arg():
        time.sleep(0.05)
        return 0

    @ray.remote
    class Holder:
        def __init__(self, x):
            self.x = x

        def get(self):
            return self.x

    for _ in range(max(5, ACTOR_ROUNDS // 10)):
        h = Holder.remote(slow_arg.remote())  # creation waits for its argument
        ray.kill(h)
        with pytest.raises(exc.RayActorError):
            ray.get(h.get.remote(), timeout=30)


@pytest.mark.parametrize("lifetime", [None, "detached"])
def test_named_actor_resolves_right_after_creation(ray, Counter, lifetime):
    for i in range(ACTOR_ROUNDS // 2):
        name = f"race-{lifetime}-{i}"
        c = Counter.options(name=name, lifetime=lifetime).remote()
        _pause(i)
        h = ray.get_actor(name)
        assert ray.get(h.incr.remote(), timeout=30) == 1
        ray.kill(c)
