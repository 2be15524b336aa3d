"""Daemons killed with SIGKILL by pid, with real processes: what clients see.

* raylet: its workers die with it (no orphans); a driver attached to it gets
  a clear error at once; tasks it had leased to other submitters run again
  on another node.
* stored: the node goes down with it (its raylet exits, so it cannot keep
  serving objects that are gone); clients get a clear error, never a hang;
  under a supervisor both come back and the node serves again.
* gcsd: a chain member killed mid-run costs tasks and actor calls a short
  pause; every member down for a while costs nothing already leased or
  exported, calls that need gcsd fail after a bounded wait, and when gcsd is
  back on its data directory no node was declared dead meanwhile.

See "When daemons die" in docs/architecture.md. Each test prints its
measured times (run with -s to see them).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import psutil
import pytest

from libclient.cluster_utils import Cluster

# Workers cannot import this test module: ship its helpers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait(predicate, timeout=20.0, what="condition", interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _workers_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


# ------------------------------------------------------------------ raylet
def test_killed_raylet_takes_its_workers_and_fails_its_driver_fast():
    import libclient as ray
    from libclient.exceptions import RayError

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        c.connect()

        @ray.remote
        def slow():
            time.sleep(60)

        @ray.remote
        class Holder:
            def ping(self):
                return "pong"

        holder = Holder.remote()
        assert ray.get(holder.ping.remote(), timeout=20) == "pong"
        running = slow.remote()
        raylet = c.head_node.daemon_pid("raylet")
        _wait(lambda: len(_workers_of(raylet)) >= 2, what="workers started")
        workers = _workers_of(raylet)
        time.sleep(0.3)  # the slow task is running on its worker
        start = time.monotonic()
        os.kill(raylet, signal.SIGKILL)
        with pytest.raises(RayError) as info:
            ray.get(running, timeout=20)
        seen = time.monotonic() - start
        assert "raylet" in str(info.value)
        # New work fails at once too, instead of waiting for a raylet that is gone.
        t0 = time.monotonic()
        with pytest.raises(RayError):
            ray.get(slow.remote(), timeout=20)
        with pytest.raises(RayError):
            ray.get(holder.ping.remote(), timeout=20)
        later = time.monotonic() - t0
        _, alive = psutil.wait_procs(workers, timeout=10)
        gone = time.monotonic() - start
        assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
        print(f"\nraylet killed: driver saw the error after {seen * 1000:.0f} ms, "
              f"new calls failed in {later * 1000:.0f} ms, {len(workers)} workers gone "
              f"after {gone * 1000:.0f} ms")
        assert seen < 5 and later < 5
    finally:
        c.shutdown()


# ------------------------------------------------------------------ stored
def test_killed_stored_takes_its_node_down_with_clear_errors():
    import numpy as np

    import libclient as ray
    from libclient.exceptions import RayError

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.connect()

        @ray.remote
        def big(n):
            return np.ones(n, dtype=np.uint8)

        ref = big.remote(1 << 20)
        assert int(ray.get(ref, timeout=20).sum()) == 1 << 20
        stored, raylet = c.head_node.daemon_pid("stored"), c.head_node.daemon_pid("raylet")
        workers = _workers_of(raylet)
        start = time.monotonic()
        os.kill(stored, signal.SIGKILL)
        # Every object on the node is gone: the raylet leaves the cluster with
        # its workers rather than lease them out with no store behind them.
        _wait(lambda: not _alive(raylet), timeout=10, what="the raylet to exit")
        down = time.monotonic() - start
        with pytest.raises(RayError):
            ray.get(big.remote(1 << 20), timeout=20)
        with pytest.raises(RayError):
            ray.put(np.ones(1 << 20, dtype=np.uint8))
        seen = time.monotonic() - start
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
        print(f"\nstored killed: raylet left after {down * 1000:.0f} ms, driver saw "
              f"errors after {seen * 1000:.0f} ms")
        assert seen < 10
    finally:
        c.shutdown()
