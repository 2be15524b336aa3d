"""Placement groups without processes: the planner, the coordinator's two-phase
state machine, a node's bundle reservations and the scheduler's resource changes."""

import pytest

from daemons.raylet.placement_bundles import BundleHost
from daemons.raylet.placement_groups import (
    CREATED,
    PENDING,
    REMOVED,
    RESCHEDULING,
    Commit,
    Group,
    Persist,
    PlacementCoordinator,
    Prepare,
    Return,
    plan_bundles,
)
from daemons.raylet.resources import ResourceSet
from daemons.raylet.scheduler import Grant, LeaseRequest, LeaseScheduler
from libclient.util.placement_group import group_of_resource, group_resources, task_demand

A, B, C = b"a" * 4, b"b" * 4, b"c" * 4


def rs(**kw):
    return ResourceSet.of(kw)


def cpu(n):
    return rs(CPU=n)


# ---- planner --------------------------------------------------------------------------------
def test_strict_pack_puts_every_bundle_on_one_node_or_nowhere():
    free = {A: cpu(2), B: cpu(4)}
    assert plan_bundles([cpu(1)] * 3, "STRICT_PACK", free) == {0: B, 1: B, 2: B}
    assert plan_bundles([cpu(1)] * 5, "STRICT_PACK", free) is None


def test_strict_pack_prefers_the_coordinators_node_when_it_fits():
    free = {A: cpu(4), B: cpu(4)}
    assert set(plan_bundles([cpu(1)] * 2, "STRICT_PACK", free, prefer=B).values()) == {B}


def test_pack_packs_on_one_node_if_it_can_else_as_few_as_it_can():
    free = {A: cpu(2), B: cpu(2), C: cpu(2)}
    assert len(set(plan_bundles([cpu(1)] * 2, "PACK", free).values())) == 1
    plan = plan_bundles([cpu(1)] * 4, "PACK", free)
    assert len(set(plan.values())) == 2 and sorted(plan) == [0, 1, 2, 3]
    assert plan_bundles([cpu(1)] * 7, "PACK", free) is None


def test_strict_spread_uses_distinct_nodes_and_searches_for_a_fit():
    free = {A: cpu(1), B: cpu(2), C: cpu(1)}
    plan = plan_bundles([cpu(1), cpu(1), cpu(2)], "STRICT_SPREAD", free)
    assert len(set(plan.values())) == 3 and plan[2] == B
    assert plan_bundles([cpu(1)] * 4, "STRICT_SPREAD", free) is None
    # the node of an already placed bundle is not reused
    assert plan_bundles([cpu(1)] * 3, "STRICT_SPREAD", free, placed={0: A, 1: B}) == {2: C}
    assert plan_bundles([cpu(1)] * 3, "STRICT_SPREAD", {A: cpu(5), B: cpu(5)},
                        placed={0: A}) is None


def test_spread_prefers_unused_nodes_then_doubles_up():
    free = {A: cpu(4), B: cpu(4)}
    plan = plan_bundles([cpu(1)] * 3, "SPREAD", free)
    assert sorted(list(plan.values()).count(n) for n in (A, B)) == [1, 2]
    assert plan_bundles([cpu(1)] * 2, "SPREAD", {A: cpu(4), B: cpu(0.5)}) == {0: A, 1: A}


def test_planner_rejects_unknown_strategy_and_respects_other_resources():
    with pytest.raises(ValueError):
        plan_bundles([cpu(1)], "BEST", {A: cpu(1)})
    assert plan_bundles([rs(GPU=1)], "PACK", {A: cpu(8), B: rs(CPU=1, GPU=1)}) == {0: B}


# ---- coordinator: two-phase commit ----------------------------------------------------------
def _group(n=2, strategy="STRICT_SPREAD", **kw):
    return Group(b"g" * 16, [cpu(1)] * n, strategy, **kw)


def _by_type(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_create_prepare_commit_created():
    c = PlacementCoordinator(A)
    out = c.create(_group())
    assert _by_type(out, Persist)[0].group.state == PENDING
    prep = _by_type(c.step({A: cpu(1), B: cpu(1)}, 0.0, 1), Prepare)
    assert sorted((p.index, p.node) for p in prep) == [(0, A), (1, B)]
    assert c.busy and c.step({A: cpu(1), B: cpu(1)}, 0.0, 2) == []  # one attempt at a time
    assert c.prepared(b"g" * 16, 0, A, True, 0.0) == []
    commits = _by_type(c.prepared(b"g" * 16, 1, B, True, 0.0), Commit)
    assert sorted((x.index, x.node) for x in commits) == [(0, A), (1, B)]
    assert c.committed(b"g" * 16, 0, A, True, 0.0) == []
    done = c.committed(b"g" * 16, 1, B, True, 0.0)
    g = _by_type(done, Persist)[0].group
    assert g.state == CREATED and g.nodes == [A, B] and not c.busy


def test_a_refused_prepare_rolls_back_and_retries_after_backoff():
    c = PlacementCoordinator(A)
    pg = b"g" * 16
    c.create(_group())
    c.step({A: cpu(1), B: cpu(1)}, 0.0, 1)
    assert c.prepared(pg, 0, A, True, 0.0) == []
    out = c.prepared(pg, 1, B, False, 0.0)
    returns = sorted((r.index, r.node) for r in _by_type(out, Return))
    assert (0, A) in returns  # the prepared bundle is given back
    assert not _by_type(out, Commit) and not c.busy
    assert c.groups[pg].state == PENDING
    assert c.step({A: cpu(1), B: cpu(1)}, 0.05, 2) == []  # backoff (0.1 s) not over
    assert len(_by_type(c.step({A: cpu(1), B: cpu(1)}, 0.2, 3), Prepare)) == 2
    assert c.groups[pg].attempts == 2


def test_late_yes_after_failure_is_returned_and_a_failed_commit_rolls_back():
    c = PlacementCoordinator(A)
    pg = b"g" * 16
    c.create(_group(3, "SPREAD"))
    c.step({A: cpu(1), B: cpu(1), C: cpu(1)}, 0.0, 1)
    c.prepared(pg, 0, A, False, 0.0)            # first answer: no
    late = c.prepared(pg, 1, B, True, 0.0)      # a yes that arrives after the no
    assert [(r.index, r.node) for r in _by_type(late, Return)] == [(1, B)]
    c.prepared(pg, 2, C, True, 0.0)
    # second attempt gets to commit; one commit fails (node died between phases)
    c.step({A: cpu(1), B: cpu(1), C: cpu(1)}, 1.0, 2)
    for i, n in enumerate((A, B, C)):
        c.prepared(pg, i, n, True, 1.0)
    c.committed(pg, 0, A, True, 1.0)
    out = c.committed(pg, 1, B, False, 1.0)
    assert {(r.index, r.node) for r in _by_type(out, Return)} >= {(0, A), (2, C)}
    c.committed(pg, 2, C, True, 1.0)
    assert c.groups[pg].state == PENDING and not c.busy


def test_infeasible_group_waits_for_a_view_change_then_places():
    c = PlacementCoordinator(A)
    c.create(_group(2, "STRICT_SPREAD"))
    assert c.step({A: cpu(1)}, 0.0, 7) == []
    assert c.step({A: cpu(1)}, 5.0, 7) == []      # same view: not planned again
    prep = c.step({A: cpu(1), B: cpu(1)}, 5.0, 8)  # a node joined
    assert len(_by_type(prep, Prepare)) == 2


def test_infeasible_group_does_not_block_the_next_one():
    c = PlacementCoordinator(A)
    c.create(Group(b"1" * 16, [cpu(8)], "PACK"))
    c.create(Group(b"2" * 16, [cpu(1)], "PACK"))
    prep = _by_type(c.step({A: cpu(2)}, 0.0, 1), Prepare)
    assert [p.pg_id for p in prep] == [b"2" * 16]


def test_remove_returns_bundles_and_late_replies_of_removed_group():
    c = PlacementCoordinator(A)
    pg = b"g" * 16
    c.create(_group())
    c.step({A: cpu(1), B: cpu(1)}, 0.0, 1)
    c.prepared(pg, 0, A, True, 0.0)
    out = c.remove(pg)
    assert [(r.index, r.node) for r in _by_type(out, Return)] == [(0, A)]
    assert _by_type(out, Persist)[0].group.state == REMOVED
    assert not c.busy
    late = c.prepared(pg, 1, B, True, 0.0)
    assert [(r.index, r.node) for r in _by_type(late, Return)] == [(1, B)]
    assert c.remove(pg) == []


def test_remove_created_group_and_owner_gone_spares_detached():
    c = PlacementCoordinator(A)
    for pid, detached in ((b"1" * 16, False), (b"2" * 16, True)):
        c.create(Group(pid, [cpu(1)], "PACK", owner=5, detached=detached))
        for a in _by_type(c.step({A: cpu(4)}, 0.0, 1), Prepare):
            for cm in c.prepared(a.pg_id, a.index, a.node, True, 0.0):
                c.committed(cm.pg_id, cm.index, cm.node, True, 0.0)
    assert {g.state for g in c.groups.values()} == {CREATED}
    out = c.owner_gone(5)
    assert [(r.pg_id, r.node) for r in _by_type(out, Return)] == [(b"1" * 16, A)]
    assert list(c.groups) == [b"2" * 16]


def test_node_death_reschedules_only_its_bundles_first():
    c = PlacementCoordinator(A)
    pg = b"g" * 16
    c.create(_group(2, "SPREAD"))
    for a in _by_type(c.step({A: cpu(1), B: cpu(1)}, 0.0, 1), Prepare):
        for cm in c.prepared(a.pg_id, a.index, a.node, True, 0.0):
            c.committed(cm.pg_id, cm.index, cm.node, True, 0.0)
    assert c.groups[pg].nodes == [A, B]
    out = c.node_dead(B, 1.0)
    assert _by_type(out, Persist)[0].group.state == RESCHEDULING
    assert c.groups[pg].nodes == [A, None]
    prep = _by_type(c.step({A: cpu(1), C: cpu(1)}, 1.0, 2), Prepare)
    assert [(p.index, p.node) for p in prep] == [(1, C)]
    for cm in c.prepared(pg, 1, C, True, 1.0):
        c.committed(cm.pg_id, cm.index, cm.node, True, 1.0)
    assert c.groups[pg].state == CREATED and c.groups[pg].nodes == [A, C]


def test_node_death_during_prepare_fails_the_attempt():
    c = PlacementCoordinator(A)
    pg = b"g" * 16
    c.create(_group())
    c.step({A: cpu(1), B: cpu(1)}, 0.0, 1)
    c.prepared(pg, 0, A, True, 0.0)
    out = c.node_dead(B, 0.0)
    assert (0, A) in [(r.index, r.node) for r in _by_type(out, Return)]
    assert not c.busy and c.groups[pg].state == PENDING


def test_create_rejects_bad_groups():
    c = PlacementCoordinator(A)
    with pytest.raises(ValueError):
        c.create(Group(b"x" * 16, [], "PACK"))
    with pytest.raises(ValueError):
        c.create(Group(b"x" * 16, [cpu(1)], "NOPE"))
    with pytest.raises(ValueError):
        c.create(Group(b"x" * 16, [ResourceSet()], "PACK"))


# ---- a node's bundles and the scheduler -------------------------------------------------------
def test_bundle_host_prepare_commit_return_with_the_scheduler():
    pg = bytes(range(16))
    sched = LeaseScheduler(rs(CPU=4))
    host = BundleHost()
    assert host.prepare(pg, 0, cpu(5), sched.available) is None  # does not fit: refused
    ch = host.prepare(pg, 0, cpu(3), sched.available)
    sched.acquire(ch.acquire)
    assert sched.available == cpu(1)
    assert host.prepare(pg, 0, cpu(3), sched.available).acquire == ResourceSet()  # idempotent
    ch = host.commit(pg, 0)
    sched.add_resources(ch.add)
    h = pg.hex()
    assert sched.total.get(f"CPU_group_0_{h}") == 30_000
    assert sched.total.get("CPU") == 40_000  # physical total unchanged, as in Ray
    # a task in bundle 0 is granted from the bundle's resources, not plain CPU
    demand = ResourceSet.of(task_demand({"CPU": 2}, h, 0))
    assert sched.submit(LeaseRequest(1, 1, demand)).__class__.__name__ == "Queued"
    grants = [d for d in sched.decide(0.0) if isinstance(d, Grant)]
    assert len(grants) == 1 and sched.available.get("CPU") == 10_000
    # return: the group resources leave; a late release of the lease adds nothing back
    ch = host.give_back(pg, 0)
    sched.remove_resources(ch.remove)
    sched.release(ch.release)
    sched.release(demand)
    assert sched.available == cpu(4) and sched.total == cpu(4)
    assert host.commit(pg, 0) is None and host.give_back(pg, 0).release == ResourceSet()


def test_resource_names_follow_ray():
    h = "ab" * 16
    names = group_resources(h, 1, {"CPU": 2})
    assert names == {f"CPU_group_1_{h}": 2, f"CPU_group_{h}": 2,
                     f"bundle_group_1_{h}": 1000, f"bundle_group_{h}": 1000}
    assert task_demand({"CPU": 1}, h, -1) == {f"CPU_group_{h}": 1, f"bundle_group_{h}": 0.001}
    assert group_of_resource(f"CPU_group_1_{h}") == h and group_of_resource("CPU") is None
