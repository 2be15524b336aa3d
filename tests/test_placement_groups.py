"""Placement groups on a real multi-node cluster (``cluster_utils``): every strategy,
groups that cannot be placed yet, tasks and actors in bundles, removal, the table,
job end, and a node that dies under a group."""

import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

from libclient.cluster_utils import Cluster
from libclient.util.placement_group import (
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from libclient.util.scheduling_strategies import PlacementGroupSchedulingStrategy as PGS

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    # head: 1 CPU; two workers with 2 CPUs each -> 5 CPUs on 3 nodes
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_timeout_s": 2.0})
    try:
        c.add_node(num_cpus=2)
        c.add_node(num_cpus=2)
        c.wait_for_nodes()
        c.connect(namespace="pg")
        yield c
    finally:
        c.shutdown()


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _node():
    import libclient as ray

    return ray.get_runtime_context().get_node_id()


def _nodes_of_bundles(pg, n):
    """Run one task in each bundle; return the node each ran on."""
    import libclient as ray

    f = ray.remote(num_cpus=1)(_node)
    return ray.get([f.options(scheduling_strategy=PGS(pg, i)).remote() for i in range(n)],
                   timeout=30)


def _check_and_remove(pg, n):
    import libclient as ray

    assert ray.get(pg.ready(), timeout=30) == pg
    table = placement_group_table(pg)
    assert table["state"] == "CREATED"
    ran = _nodes_of_bundles(pg, n)
    assert ran == [table["bundles_to_node_id"][i] for i in range(n)]
    remove_placement_group(pg)
    return ran


def _cpus_free():
    import libclient as ray

    return ray.available_resources().get("CPU", 0)


def test_strict_spread_puts_each_bundle_on_its_own_node(cluster):
    ran = _check_and_remove(placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD"), 3)
    assert set(ran) == {n.node_id for n in cluster.list_all_nodes()}


def test_strict_pack_puts_every_bundle_on_one_node(cluster):
    ran = _check_and_remove(placement_group([{"CPU": 1}] * 2, strategy="STRICT_PACK"), 2)
    assert len(set(ran)) == 1 and ran[0] != cluster.head_node.node_id  # head has 1 CPU


def test_pack_and_spread(cluster):
    ran = _check_and_remove(placement_group([{"CPU": 1}] * 2, strategy="PACK"), 2)
    assert len(set(ran)) == 1
    ran = _check_and_remove(placement_group([{"CPU": 1}] * 2, strategy="SPREAD"), 2)
    assert len(set(ran)) == 2
    ran = _check_and_remove(placement_group([{"CPU": 1}] * 4, strategy="PACK"), 4)
    assert len(set(ran)) >= 2  # does not fit one node: packed onto as few as it can
    _wait(lambda: _cpus_free() == 5, 10, "every CPU back after removals")


def test_reserved_resources_are_taken_and_given_back(cluster):
    import libclient as ray

    _wait(lambda: _cpus_free() == 5, 10, "a quiet cluster")
    pg = placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=30)
    h = pg.id.hex()
    _wait(lambda: _cpus_free() == 3, 10, "the bundle's CPUs to be taken")
    total = ray.cluster_resources()
    assert total["CPU"] == 5 and total[f"CPU_group_0_{h}"] == 2 and total[f"CPU_group_{h}"] == 2
    # a task that needs more than the bundle holds never runs in it
    big = ray.remote(num_cpus=3)(_node).options(scheduling_strategy=PGS(pg, 0)).remote()
    assert ray.wait([big], timeout=1.0)[0] == []
    ray.cancel(big)
    remove_placement_group(pg)
    _wait(lambda: _cpus_free() == 5, 10, "the CPUs to come back")
    assert not any(h in k for k in ray.cluster_resources())


def test_actor_in_a_bundle_and_removal_kills_it(cluster):
    import libclient as ray
    from libclient.exceptions import RayActorError

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", name="actors")
    assert pg.wait(30)

    @ray.remote(num_cpus=1)
    class Where:
        def node(self):
            return _node()

        def group(self):
            g = get_current_placement_group()
            return g.id.hex() if g else None

        def child_group(self):
            f = ray.remote(num_cpus=0)(_child_group)
            return ray.get(f.remote(), timeout=30)

    table = placement_group_table(pg)
    a = Where.options(scheduling_strategy=PGS(pg, 1, True)).remote()
    assert ray.get(a.node.remote(), timeout=30) == table["bundles_to_node_id"][1]
    assert ray.get(a.group.remote(), timeout=30) == pg.id.hex()
    assert ray.get(a.child_group.remote(), timeout=30) == pg.id.hex()  # captured child task
    assert get_placement_group("actors") == pg
    remove_placement_group(pg)
    with pytest.raises(RayActorError):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ray.get(a.node.remote(), timeout=15)
            time.sleep(0.1)
    assert placement_group_table(pg)["state"] == "REMOVED"
    with pytest.raises(ValueError):
        get_placement_group("actors")
    again = placement_group([{"CPU": 0.5}], name="actors")  # the name is free again
    assert again.wait(30)
    remove_placement_group(again)


def _child_group():
    g = get_current_placement_group()
    return g.id.hex() if g else None


def test_placement_group_table_contents(cluster):
    import libclient as ray

    pg = placement_group([{"CPU": 1}, {"CPU": 0.5, "memory": 1000}], strategy="PACK",
                         name="tabled")
    ray.get(pg.ready(), timeout=30)
    entry = placement_group_table(pg)
    assert entry["placement_group_id"] == pg.id.hex()
    assert entry["name"] == "tabled" and entry["strategy"] == "PACK"
    assert entry["bundles"] == {0: {"CPU": 1}, 1: {"CPU": 0.5, "memory": 1000}}
    assert set(entry["bundles_to_node_id"]) == {0, 1} and entry["state"] == "CREATED"
    assert pg.bundle_specs == [{"CPU": 1}, {"CPU": 0.5, "memory": 1000}]
    assert placement_group_table()[pg.id.hex()] == entry
    remove_placement_group(pg)
    _wait(lambda: placement_group_table(pg)["state"] == "REMOVED", 5, "REMOVED")


def test_bad_arguments_are_clear_errors(cluster):
    import libclient as ray

    assert ray.util.placement_group is placement_group  # Ray's spelling works too
    one = placement_group([{"CPU": 0.1}])
    try:
        with pytest.raises(ValueError):
            ray.remote(_node).options(scheduling_strategy=PGS(one, 3))  # it has one bundle
    finally:
        remove_placement_group(one)
    with pytest.raises(ValueError):
        placement_group([], strategy="PACK")
    with pytest.raises(ValueError):
        placement_group([{"CPU": 1}], strategy="TIGHT")
    with pytest.raises(ValueError):
        placement_group([{"CPU": -1}])
    with pytest.raises(ValueError):
        placement_group([{"CPU": 0}])
    with pytest.raises(ValueError):
        placement_group([{"CPU": 1}], lifetime="forever")


_DRIVER = textwrap.dedent("""
    import sys
    import libclient as ray
    from libclient.util.placement_group import placement_group
    ray.init(address=sys.argv[1], namespace="pg-driver")
    mine = placement_group([{"CPU": 0.25}])
    kept = placement_group([{"CPU": 0.25}], lifetime="detached")
    ray.get([mine.ready(), kept.ready()], timeout=30)
    print(mine.id.hex(), kept.id.hex(), flush=True)
""")


def test_job_end_removes_its_groups_but_not_detached_ones(cluster, tmp_path):
    import libclient as ray

    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, str(script), cluster.address], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mine, kept = out.stdout.split()
    table = placement_group_table()
    _wait(lambda: placement_group_table()[mine]["state"] == "REMOVED", 10, "job's group removed")
    assert table[kept]["state"] == "CREATED" and table[kept]["is_detached"]
    from libclient.util.placement_group import PlacementGroup

    remove_placement_group(PlacementGroup(bytes.fromhex(kept)))
    _wait(lambda: placement_group_table()[kept]["state"] == "REMOVED", 10, "detached removed")
    _wait(lambda: ray.available_resources().get("CPU", 0) == 5, 10, "CPUs back")


def test_pending_group_is_placed_when_a_node_joins(cluster):
    """Last: it adds a node. STRICT_SPREAD over 4 nodes cannot fit on 3, and
    a bundle no node has cannot either, until a node that has it joins."""
    import libclient as ray

    pg = placement_group([{"CPU": 1}] * 4, strategy="STRICT_SPREAD")
    odd = placement_group([{"CPU": 1, "widget": 1}])
    assert not pg.wait(0.5) and not odd.wait(0.1)
    assert placement_group_table(pg)["state"] == "PENDING"
    new = cluster.add_node(num_cpus=2, resources={"widget": 1})
    assert ray.get(pg.ready(), timeout=30) == pg
    assert odd.wait(30)
    assert placement_group_table(odd)["bundles_to_node_id"][0] == new.node_id
    ran = _nodes_of_bundles(pg, 4)
    assert len(set(ran)) == 4 and new.node_id in ran
    remove_placement_group(pg)
    remove_placement_group(odd)


def test_bundles_of_a_dead_node_are_rescheduled(cluster):
    """Ray's rule: the lost bundle is placed again (here once a node that fits
    joins); the other bundle stays where it is, and what runs there goes on."""
    import libclient as ray

    doomed = cluster.add_node(num_cpus=1, resources={"spot": 1})
    pg = placement_group([{"CPU": 1}, {"spot": 1}], strategy="STRICT_SPREAD")
    assert pg.wait(30)
    before = placement_group_table(pg)["bundles_to_node_id"]
    assert before[1] == doomed.node_id
    cluster.remove_node(doomed, allow_graceful=False)
    _wait(lambda: placement_group_table(pg)["state"] == "RESCHEDULING", 15,
          "the group to notice its lost bundle")
    spare = cluster.add_node(num_cpus=1, resources={"spot": 1})
    after = _wait(lambda: (t := placement_group_table(pg))["state"] == "CREATED" and t, 30,
                  "the lost bundle to be placed again")
    assert after["bundles_to_node_id"] == {0: before[0], 1: spare.node_id}
    f = ray.remote(num_cpus=0)(_node)
    assert ray.get(f.options(scheduling_strategy=PGS(pg, 1)).remote(),
                   timeout=30) == spare.node_id
    remove_placement_group(pg)
