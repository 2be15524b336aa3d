"""Object spilling with real daemons: a store smaller than what a driver keeps alive.

Standalone stored (StoreClient) for the store protocol; the embedded cluster
for puts, task returns and task arguments; cluster_utils for a pull served
from another node's spill file.
"""

import os
import sys
import time

import cloudpickle
import numpy as np
import pytest

from libclient.exceptions import ObjectStoreFullError
from libclient.store_client import StoreClient
from tests.test_stored import MiB, _spawn

cloudpickle.register_pickle_by_value(sys.modules[__name__])

OBJ = 10 * MiB


def _fill(i):
    return np.full(OBJ, i % 251, dtype=np.uint8)


def _spill_files(spill_dir):
    return sorted(n for n in os.listdir(spill_dir)) if os.path.isdir(spill_dir) else []


def _health(sock):
    with StoreClient(sock, "probe") as c:
        return c._call({"t": "health"})


# ---------------------------------------------------------------- standalone stored


def test_store_spills_held_objects_restores_them_and_cleans_up(tmp_path):
    spill_dir = tmp_path / "spill"
    os.makedirs(spill_dir)
    stale = spill_dir / "shoal-spill-999999999-3"  # a crashed earlier stored (no such pid)
    stale.write_bytes(b"old")
    s = _spawn(tmp_path, "--memory", str(64 * MiB))
    try:
        assert not stale.exists()
        held = []
        n, size = 200, MiB
        with StoreClient(s.sock, "owner") as c:
            for i in range(n):  # 200 MiB of held objects in a 64 MiB store
                data = np.full(size, i % 251, dtype=np.uint8)
                held.append(c.write(i.to_bytes(8, "little"), size,
                                    lambda v, d=data: v.__setitem__(slice(None), d.data)))
            st = c.stats()
            assert st["spilled_objects"] >= n - 64 and st["used"] <= 64 * MiB
            files = _spill_files(spill_dir)
            # Fused: 8 MiB files (a small store's share), not one file per object.
            assert 0 < len(files) <= st["spilled_objects"] // 6
            for i, obj in enumerate(held):
                v = np.frombuffer(obj.view(), dtype=np.uint8)
                assert v.size == size and v[0] == i % 251 and v[-1] == i % 251
                del v
            del obj
            assert c.stats()["restored_objects"] > 0
            held.clear()  # unhold and free: spilled copies and their files go
            c.free([i.to_bytes(8, "little") for i in range(n)])
            c.flush_releases()
            assert c.stats()["num_objects"] == 0
            assert _spill_files(spill_dir) == []
            assert c.stats()["spill_files"] == 0
    finally:
        s.stop()
    assert not spill_dir.exists()  # emptied (and removed) at stop


def test_pinned_objects_never_spill_and_full_remains_for_them(tmp_path):
    s = _spawn(tmp_path, "--memory", str(32 * MiB))
    try:
        with StoreClient(s.sock, "owner") as c:
            a = c.write(b"a", 20 * MiB, lambda v: None)
            view = a.view()  # a user value maps it: a read pin
            c._hot.clear()  # (only the user's view pins it now)
            with pytest.raises(ObjectStoreFullError):
                c.write(b"b", 20 * MiB, lambda v: None)
            del view
            a._view = None
            c.flush_releases()
            b = c.write(b"b", 20 * MiB, lambda v: None)  # now a can spill
            assert c.stats()["spilled_objects"] == 1
            del a, b
    finally:
        s.stop()


def test_spilling_off_gives_object_store_full(tmp_path):
    s = _spawn(tmp_path, "--memory", str(32 * MiB), "--set", "stored.spill=false")
    try:
        with StoreClient(s.sock, "owner") as c:
            a = c.write(b"a", 20 * MiB, lambda v: None)
            c._hot.clear()
            a._view = None
            with pytest.raises(ObjectStoreFullError, match="spilling is off"):
                c.write(b"b", 20 * MiB, lambda v: None)
            del a
    finally:
        s.stop()


# ---------------------------------------------------------------- embedded cluster


@pytest.fixture
def small_store():
    import libclient as ray

    info = ray.init(num_cpus=2, object_store_memory=100 * MiB)
    try:
        yield ray, os.path.join(info["session_dir"], "spill")
    finally:
        ray.shutdown()


def test_driver_keeps_three_times_the_store_alive_and_reads_it_back(small_store):
    ray, spill_dir = small_store
    refs = [ray.put(_fill(i)) for i in range(30)]  # 300 MiB in a 100 MiB store
    assert _spill_files(spill_dir)
    for _ in range(2):  # twice: restored objects spill again to let the next ones in
        for i, ref in enumerate(refs):
            a = ray.get(ref, timeout=60)
            assert a.size == OBJ and a[0] == i % 251 and a[-1] == i % 251 and a[OBJ // 2] == i % 251
            del a
    del refs, ref

    deadline = time.monotonic() + 10
    while _spill_files(spill_dir) and time.monotonic() < deadline:
        ray.put(np.zeros(200_000, np.uint8))
        time.sleep(0.05)
    assert _spill_files(spill_dir) == []


def test_task_returns_and_arguments_spill_and_restore(small_store):
    ray, spill_dir = small_store

    @ray.remote
    def make(i):
        return _fill(i)

    @ray.remote
    def check(a, i):
        return bool(a.size == OBJ and a[0] == i % 251 and a[-1] == i % 251)

    returns = [make.remote(i) for i in range(25)]  # 250 MiB of task returns, held by us
    ray.wait(returns, num_returns=len(returns), timeout=120)
    assert _spill_files(spill_dir)
    # Spilled returns as task arguments: the worker's get restores them.
    assert all(ray.get([check.remote(r, i) for i, r in enumerate(returns)], timeout=120))
    puts = [ray.put(_fill(i)) for i in range(12)]
    assert all(ray.get([check.remote(r, i) for i, r in enumerate(puts)], timeout=120))
    for i, r in enumerate(returns):
        assert ray.get(r, timeout=60)[7] == i % 251


# ---------------------------------------------------------------- two nodes


def test_a_spilled_object_is_pulled_by_another_node_from_the_spill_file():
    import libclient as ray
    from libclient.cluster_utils import Cluster
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                      "object_store_memory": 100 * MiB})
    try:
        other = c.add_node(num_cpus=1, object_store_memory=100 * MiB)
        c.wait_for_nodes()
        c.connect(namespace="spill")
        head_store = os.path.join(c.head_node.session_dir, "stored.sock")

        @ray.remote(num_cpus=1)
        def digest(a):
            return int(a[0]), int(a[-1]), a.nbytes

        refs = [ray.put(_fill(i)) for i in range(25)]  # the first ones are on disk now
        assert _spill_files(os.path.join(c.head_node.session_dir, "spill"))
        there = Affinity(other.node_id)
        got = ray.get([digest.options(scheduling_strategy=there).remote(r) for r in refs[:6]],
                      timeout=120)
        assert got == [(i % 251, i % 251, OBJ) for i in range(6)]
        served = _health(head_store)["transfer"]["served"]
        assert served.get("spilled_reads", 0) > 0  # streamed from the file, not restored
        # A task's big return on the other node, spilled there, read back here.
        @ray.remote(num_cpus=1)
        def make(i):
            return _fill(i)

        made = [make.options(scheduling_strategy=there).remote(i) for i in range(15)]
        for i, r in enumerate(made):
            a = ray.get(r, timeout=120)
            assert a[0] == i % 251 and a[-1] == i % 251
            del a
        del refs, made
    finally:
        c.shutdown()
