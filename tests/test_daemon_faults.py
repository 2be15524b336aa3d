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
import subprocess
import sys
import threading
import time

import cloudpickle
import psutil
import pytest
from test_ops_supervisord import _serving, supervised  # noqa: F401 (a fixture)

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


def test_tasks_leased_from_a_killed_raylet_run_again_on_another_node(tmp_path):
    import libclient as ray

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_timeout_s": 2.0})
    try:
        victim = c.add_node(num_cpus=2)
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        c.connect()
        marks = tmp_path / "started"
        marks.mkdir()

        @ray.remote(max_retries=3)
        def work(i, marks):
            node = ray.get_runtime_context().get_node_id()
            with open(os.path.join(marks, f"{i}-{node}-{os.getpid()}"), "w"):
                pass
            time.sleep(1.5)
            return node

        refs = [work.remote(i, str(marks)) for i in range(5)]
        on_victim = _wait(lambda: [m for m in os.listdir(marks) if victim.node_id in m],
                          timeout=20, what="a task to start on the victim node")
        raylet = victim.daemon_pid("raylet")
        workers = _workers_of(raylet)
        start = time.monotonic()
        os.kill(raylet, signal.SIGKILL)
        nodes = ray.get(refs, timeout=25)
        took = time.monotonic() - start
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
        hit = {int(m.split("-")[0]) for m in on_victim}
        # The tasks that were running there ran again, on a node that lives.
        for i in hit:
            assert nodes[i] != victim.node_id
            assert len([m for m in os.listdir(marks) if m.startswith(f"{i}-")]) >= 2
        print(f"\nraylet of a worker node killed with {len(hit)} of its tasks running: all "
              f"5 tasks done {took * 1000:.0f} ms later")
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


# ------------------------------------------------------------------ gcsd
class _Traffic:
    """A driver thread running tasks and actor calls back to back, timing the
    longest wait for one and keeping every error."""

    def __init__(self, fn, actor) -> None:
        self.fn, self.actor = fn, actor
        self.longest = 0.0
        self.calls = 0
        self.done_at: list[float] = []  # when each round ended
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import libclient as ray

        i = 0
        while not self._stop.is_set():
            i += 1
            start = time.monotonic()
            try:
                assert ray.get(self.fn.remote(i), timeout=30) == i + 1
                assert ray.get(self.actor.add.remote(1), timeout=30) == i
            except Exception as exc:
                self.errors.append(repr(exc))
            end = time.monotonic()
            self.longest = max(self.longest, end - start)
            self.done_at.append(end)
            self.calls += 1

    def longest_gap(self, since: float, until: float) -> float:
        """The longest time in [since, until] without a round ending."""
        marks = [since, *(t for t in self.done_at if since < t < until), until]
        return max(b - a for a, b in zip(marks, marks[1:], strict=False))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(40)


def _counter_and_inc():
    import libclient as ray

    @ray.remote
    def inc(x):
        return x + 1

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k):
            self.n += k
            return self.n

    return inc, Counter


def _new_function(tag: str):
    """``x -> x + 1`` as a function gcsd has not seen: its bytes carry ``tag``."""
    import libclient as ray

    @ray.remote
    def plus_one(x):
        assert tag
        return x + 1

    return plus_one


def test_tasks_and_actor_calls_ride_through_a_killed_gcsd_member(tmp_path):
    from test_chain_faults import Cluster as GcsChain

    import libclient as ray

    chain = GcsChain(tmp_path)
    c = traffic = None
    try:
        for name in ("master", "m0", "m1", "m2"):
            chain.start(name)
        chain.wait_full()
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2},
                    gcs_address=",".join(chain.members))
        c.connect()
        inc, Counter = _counter_and_inc()
        counter = Counter.remote()
        assert ray.get(counter.add.remote(0), timeout=20) == 0
        traffic = _Traffic(inc, counter)
        time.sleep(1.0)
        quiet = traffic.longest
        traffic.longest = 0.0
        writes = []
        for victim in ("m0", "m1"):  # m0 heads shards 0 and 3, m1 is a middle and a tail
            chain.kill(victim)
            t0 = time.monotonic()  # a new function and actor: writes to gcsd
            f, Cls = _counter_and_inc()
            assert ray.get(f.remote(1), timeout=20) == 2
            assert ray.get(Cls.remote().add.remote(3), timeout=20) == 3
            writes.append(time.monotonic() - t0)
            time.sleep(1.0)
            chain.start(victim)  # back on its data directory; it rejoins as a tail
            chain.wait_full()
            time.sleep(0.5)
        traffic.stop()
        assert traffic.errors == []
        assert traffic.calls > 10
        # New functions and actors (gcsd writes) work on the healed chains.
        inc2, Counter2 = _counter_and_inc()
        assert ray.get(inc2.remote(41), timeout=20) == 42
        assert ray.get(Counter2.remote().add.remote(2), timeout=20) == 2
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 1
        print(f"\ngcsd members killed twice: {traffic.calls} task+actor rounds, longest "
              f"{traffic.longest * 1000:.0f} ms (quiet: {quiet * 1000:.0f} ms); a new "
              f"function + actor right after each kill: "
              f"{', '.join(f'{w * 1000:.0f}' for w in writes)} ms")
        assert traffic.longest < 5.0
    finally:
        if traffic is not None:
            traffic.stop()  # before shutdown: a call after it would start a new cluster
        if c is not None:
            c.shutdown()
        chain.stop()


def _start_gcsd(tmp_path, port: int, node_timeout_s: float) -> subprocess.Popen:
    """One gcsd on a fixed port pair and data directory, so it can come back as itself."""
    ready_r, ready_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CONFIG"] = "none"
    with open(tmp_path / "gcsd.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemons.gcsd", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(tmp_path / "gcs"), "--node-timeout-s", str(node_timeout_s),
             "--ready-fd", str(ready_w)],
            pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as f:
        assert f.readline().startswith(b"{"), "gcsd did not start"
    return proc


def test_every_gcsd_member_down_a_while_then_back(tmp_path):
    from test_chain_faults import _free_port_pair

    import libclient as ray
    from libclient.gcs_client import GcsClient, GcsUnavailableError

    port = _free_port_pair()
    address = f"tcp://127.0.0.1:{port}"
    gcsd = _start_gcsd(tmp_path, port, node_timeout_s=2.0)
    c = traffic = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1}, gcs_address=address)
        other = c.add_node(num_cpus=1)
        c.connect()
        inc, Counter = _counter_and_inc()
        counter = Counter.remote()
        assert ray.get(counter.add.remote(0), timeout=20) == 0
        from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Each node's worker has run (so fetched) the function: a worker that
        # has not would wait for gcsd to fetch it (see docs/architecture.md).
        for node in (c.head_node, other):
            pin = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
            assert ray.get([inc.options(scheduling_strategy=pin).remote(i) for i in range(3)],
                           timeout=20) == [1, 2, 3]
        traffic = _Traffic(inc, counter)
        time.sleep(0.5)
        gcsd.send_signal(signal.SIGKILL)
        gcsd.wait(10)
        down_at = time.monotonic()
        traffic.longest, before = 0.0, traffic.calls
        # A call that needs gcsd (a new function) waits for it, within a deadline.
        later: list = []
        f = _new_function("exported while gcsd is down")
        waiter = threading.Thread(target=lambda: later.append(
            (ray.get(f.remote(6), timeout=30), time.monotonic() - down_at)), daemon=True)
        waiter.start()
        with GcsClient(address, timeout=1.0) as probe, pytest.raises(GcsUnavailableError):
            probe.get_nodes()  # with a short deadline: a clear error
        time.sleep(4.5)  # more than twice the node timeout
        during = traffic.calls - before
        longest_down = traffic.longest_gap(down_at, time.monotonic())
        assert during > 10, "tasks and actor calls stopped while gcsd was down"
        assert longest_down < 1.0, f"tasks stalled {longest_down:.1f} s while gcsd was down"
        gcsd = _start_gcsd(tmp_path, port, node_timeout_s=2.0)  # same port and data dir
        back_at = time.monotonic()
        waiter.join(20)
        assert later and later[0][0] == 7
        time.sleep(3.0)  # past the node timeout: nobody was declared dead for the outage
        traffic.stop()
        assert traffic.errors == []
        with GcsClient(address, timeout=5.0) as gcs:
            states = {n["node_id"].hex(): n["state"] for n in gcs.get_nodes()}
        assert states == {c.head_node.node_id: "ALIVE", other.node_id: "ALIVE"}
        g, Counter2 = _counter_and_inc()
        assert ray.get(g.remote(1), timeout=20) == 2
        assert ray.get(Counter2.remote().add.remote(5), timeout=20) == 5
        # Pinned to the other node: its raylet still follows gcsd and takes leases.
        pinned = g.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            other.node_id, soft=False)).remote(2)
        assert ray.get(pinned, timeout=20) == 3
        print(f"\nevery gcsd down {back_at - down_at:.1f} s: {during} task+actor rounds went "
              f"on (longest {longest_down * 1000:.0f} ms); a new function waited and ran "
              f"{later[0][1]:.1f} s after the kill; both nodes ALIVE after")
    finally:
        if traffic is not None:
            traffic.stop()
        if c is not None:
            c.shutdown()
        if gcsd.poll() is None:
            gcsd.terminate()
            gcsd.wait(10)


def test_stored_killed_under_supervisord_comes_back_with_its_node(supervised):  # noqa: F811
    from test_ops_support import run_driver, wait_for

    ctl = supervised["ctl"]

    def pid(program: str) -> int:
        out = ctl("pid", f"shoal:{program}").strip()
        return int(out) if out.isdigit() else 0

    wait_for(lambda: _serving(supervised), timeout=90, interval=0.3)
    wait_for(lambda: ctl("status").count("RUNNING") == 3, timeout=60, interval=0.5)
    stored, raylet = pid("stored"), pid("raylet")
    workers = _workers_of(raylet)
    start = time.monotonic()
    os.kill(stored, signal.SIGKILL)
    # The raylet leaves with its store; supervisord brings both back.
    wait_for(lambda: pid("stored") not in (0, stored) and pid("raylet") not in (0, raylet),
             timeout=60, interval=0.1)
    wait_for(lambda: _serving(supervised), timeout=60, interval=0.1)
    usable = time.monotonic() - start
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    res = run_driver(supervised["raylet"], supervised["tmp"])
    assert res.returncode == 0 and "RESULT [0, 1, 4, 9]" in res.stdout, res.stderr[-3000:]
    print(f"\nstored killed under supervisord: node serving again after {usable:.1f} s")
