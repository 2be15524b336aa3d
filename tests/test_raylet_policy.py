"""Pure raylet policy: fixed-point resources, GPU instances and lease scheduling."""

import random

import pytest

from daemons.raylet.cluster_view import ClusterView
from daemons.raylet.resources import GpuInstances, ResourceSet
from daemons.raylet.scheduler import (
    SPREAD,
    Grant,
    Infeasible,
    InfeasibleQueued,
    LeaseRequest,
    LeaseScheduler,
    NodeAffinity,
    Queued,
    Rejected,
    Spill,
    Unschedulable,
)


def test_fractions_do_not_drift():
    total = ResourceSet.of({"CPU": 1})
    used = ResourceSet()
    for _ in range(10):
        used = used + ResourceSet.of({"CPU": 0.1})
    assert used == total
    assert (total - used).to_dict() == {}


def test_resource_set_rejects_bad_amounts():
    with pytest.raises(ValueError):
        ResourceSet.of({"CPU": -1})
    with pytest.raises(ValueError):
        ResourceSet.of({"CPU": "two"})
    with pytest.raises(ValueError):
        ResourceSet.of({"": 1})


def _req(i, client=1, **res):
    return LeaseRequest(i, client, ResourceSet.of(res))


def test_grants_in_order_while_resources_last():
    s = LeaseScheduler(ResourceSet.of({"CPU": 2}))
    for i in range(3):
        assert isinstance(s.submit(_req(i, CPU=1)), Queued)
    granted = s.schedule()
    assert [r.request_id for r in granted] == [0, 1]
    assert s.queued == 1
    s.release(ResourceSet.of({"CPU": 1}))
    assert [r.request_id for r in s.schedule()] == [2]


def test_small_demand_passes_a_big_one():
    s = LeaseScheduler(ResourceSet.of({"CPU": 2}))
    s.submit(_req(1, CPU=1))
    s.schedule()
    s.submit(_req(2, CPU=2))
    s.submit(_req(3, CPU=0.5))
    assert [r.request_id for r in s.schedule()] == [3]
    assert s.queued == 1


def test_infeasible_is_rejected_at_submit_and_state_unchanged():
    s = LeaseScheduler(ResourceSet.of({"CPU": 2}))
    result = s.submit(_req(1, GPU=1))
    assert isinstance(result, Infeasible)
    assert "GPU" in result.reason
    assert s.queued == 0
    assert s.available == ResourceSet.of({"CPU": 2})


def test_custom_resources_and_cancel():
    s = LeaseScheduler(ResourceSet.of({"CPU": 4, "accel": 1}))
    s.submit(_req(1, client=7, CPU=1, accel=1))
    s.submit(_req(2, client=7, CPU=1, accel=1))
    assert [r.request_id for r in s.schedule()] == [1]
    assert [r.request_id for r in s.cancel(7)] == [2]
    assert s.schedule() == []


def test_blocked_worker_lends_cpu_and_may_overcommit_on_return():
    s = LeaseScheduler(ResourceSet.of({"CPU": 1}))
    s.submit(_req(1, CPU=1))
    s.schedule()
    s.release(ResourceSet.of({"CPU": 1}))  # the task blocks in get
    s.submit(_req(2, CPU=1))
    assert [r.request_id for r in s.schedule()] == [2]
    s.acquire(ResourceSet.of({"CPU": 1}))  # it wakes while the child still runs
    assert s.available.get("CPU") < 0


def test_gpu_instances_whole_and_fractional():
    g = GpuInstances(2)
    assert g.acquire(10_000) == [0]
    assert g.acquire(5_000) == [1]
    assert g.acquire(5_000) == [1]
    assert g.acquire(5_000) is None
    assert g.acquire(10_000) is None
    g.release([0], 10_000)
    assert g.acquire(20_000) is None
    assert g.acquire(10_000) == [0]


def test_arrival_order_holds_across_demand_shapes():
    s = LeaseScheduler(ResourceSet.of({"CPU": 3}))
    s.submit(_req(1, CPU=1))
    s.submit(_req(2, CPU=2))
    s.submit(_req(3, CPU=1))
    assert [r.request_id for r in s.schedule()] == [1, 2]
    assert s.queued == 1


# ---- cluster view -----------------------------------------------------------
# Scenarios follow multinode-brief.md §2 (RaySyncer view) and §3 (Ray 2 policy).

R = ResourceSet.of
LOCAL = b"L"


def _view(**nodes):
    """Build a view from name=(total, available) pairs (dicts of amounts)."""
    v = ClusterView()
    for name, (total, avail) in nodes.items():
        v.update(name.encode(), R(total), R(avail), 1)
    return v


def _cluster(local_cpus=4, rng_seed=0, **nodes):
    """A scheduler on node LOCAL inside a view of other nodes, Ray 2 mode."""
    view = _view(**nodes)
    s = LeaseScheduler(R({"CPU": local_cpus}), node_id=LOCAL, view=view,
                       rng=random.Random(rng_seed), queue_infeasible=True)
    return s, view


def _state(view):
    return [view.node(n) for n in sorted(view)] + [view.cursor]


def test_view_drops_versions_not_newer():
    v = ClusterView()
    assert v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), 5)
    assert not v.update(b"a", R({"CPU": 4}), R({"CPU": 0}), 5)
    assert not v.update(b"a", R({"CPU": 4}), R({"CPU": 0}), 4)
    assert v.node(b"a").available == R({"CPU": 4})
    assert v.update(b"a", R({"CPU": 4}), R({"CPU": 1}), 6, labels={"zone": "z1"})
    assert v.node(b"a").available == R({"CPU": 1})
    assert v.node(b"a").labels == {"zone": "z1"}


def test_view_dead_is_forever():
    v = _view(a=({"CPU": 4}, {"CPU": 4}), b=({"CPU": 4}, {"CPU": 4}))
    assert v.mark_dead(b"a")
    assert not v.mark_dead(b"a")
    assert not v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), 99)
    assert v.alive_nodes() == [b"b"]
    assert v.mark_dead(b"ghost")  # an unknown node's death is remembered too
    assert not v.update(b"ghost", R({"CPU": 1}), R({"CPU": 1}), 1)
    assert v.update(b"b", R({"CPU": 4}), R({"CPU": 4}), 2, alive=False)
    assert v.alive_nodes() == [] and v.alive_count == 0


def test_view_optimism_is_replaced_by_a_snapshot_or_expires():
    v = ClusterView(optimism_timeout=3.0)
    v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), 1)
    v.subtract(b"a", R({"CPU": 1}), now=10.0)
    v.subtract(b"a", R({"CPU": 1}), now=12.0)
    assert v.node(b"a").available == R({"CPU": 2})
    assert v.expire_optimism(12.9) == []          # 3 s counts from the first guess
    assert v.expire_optimism(13.0) == [b"a"]
    assert v.node(b"a").available == R({"CPU": 4})
    v.subtract(b"a", R({"CPU": 3}), now=20.0)
    v.update(b"a", R({"CPU": 4}), R({"CPU": 3}), 2)   # the real state wins
    assert v.node(b"a").available == R({"CPU": 3})
    assert v.expire_optimism(100.0) == []


def test_view_feasibility_queries():
    v = _view(b=({"CPU": 2}, {"CPU": 0}), a=({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}))
    assert v.alive_nodes() == [b"a", b"b"]
    assert v.feasible_nodes(R({"CPU": 2})) == [b"a", b"b"]
    assert v.feasible_nodes(R({"GPU": 1})) == [b"a"]
    assert v.is_feasible(b"b", R({"CPU": 1})) and not v.is_available(b"b", R({"CPU": 1}))
    assert not v.any_feasible(R({"CPU": 16}))
    assert not v.is_feasible(b"zz", R({"CPU": 1}))


def test_view_illegal_inputs_raise_and_change_nothing():
    v = _view(a=({"CPU": 4}, {"CPU": 4}))
    v.mark_dead(b"d")
    before = _state(v)
    bad_calls = [
        lambda: v.update(b"a", {"CPU": 4}, R({"CPU": 4}), 2),
        lambda: v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), -1),
        lambda: v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), True),
        lambda: v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), 2, labels={"k": 1}),
        lambda: v.update("a", R({"CPU": 4}), R({"CPU": 4}), 2),
        lambda: v.subtract(b"zz", R({"CPU": 1}), 0.0),
        lambda: v.subtract(b"d", R({"CPU": 1}), 0.0),
        lambda: v.subtract(b"a", {"CPU": 1}, 0.0),
    ]
    for call in bad_calls:
        with pytest.raises((TypeError, ValueError, KeyError)):
            call()
        assert _state(v) == before


def test_view_change_log_tells_readers_to_rebuild_when_trimmed():
    v = _view(a=({"CPU": 4}, {"CPU": 4}))
    c = v.cursor
    v.subtract(b"a", R({"CPU": 1}), 0.0)
    assert v.changed_since(c) == [b"a"]
    for i in range(10_000):
        v.update(b"a", R({"CPU": 4}), R({"CPU": 4}), 10 + i)
    assert v.changed_since(c) is None
    assert v.changed_since(v.cursor) == []


# ---- DEFAULT (hybrid) -------------------------------------------------------
def test_local_node_keeps_work_until_busy_then_spills():
    s, view = _cluster(local_cpus=4, n1=({"CPU": 4}, {"CPU": 4}))
    for i in range(4):
        s.submit(_req(i, CPU=1))
    out = s.decide(0.0)
    # util 0, .25, .5 are not busy (threshold 0.5 is inclusive); at .75 work moves on
    assert out == [Grant(_req(0, CPU=1)), Grant(_req(1, CPU=1)), Grant(_req(2, CPU=1)),
                   Spill(_req(3, CPU=1), b"n1")]
    assert s.available == R({"CPU": 1})
    assert view.node(b"n1").available == R({"CPU": 3})  # optimistic


def test_nodes_with_room_now_rank_before_less_utilised_ones():
    # n1 is idle-looking but its 2 CPUs are taken; n2 is 75% used but has room.
    s, _ = _cluster(local_cpus=1, n1=({"CPU": 2}, {"CPU": 0}),
                    n2=({"CPU": 8}, {"CPU": 2}))
    s.acquire(R({"CPU": 1}))
    s.submit(_req(1, CPU=2))
    assert s.decide(0.0) == [Spill(_req(1, CPU=2), b"n2")]


def test_lowest_critical_utilisation_wins_when_k_is_one():
    # 4 nodes -> k = max(1, int(0.8)) = 1: the single best node is chosen.
    s, _ = _cluster(local_cpus=1, a=({"CPU": 8, "memory": 8}, {"CPU": 1, "memory": 8}),
                    b=({"CPU": 8, "memory": 8}, {"CPU": 8, "memory": 1}),
                    c=({"CPU": 8, "memory": 8}, {"CPU": 3, "memory": 4}))
    s.acquire(R({"CPU": 1}))
    s.submit(_req(1, CPU=1))
    # a: .875 (CPU), b: .875 (memory), c: .625 -> c
    assert s.decide(0.0) == [Spill(_req(1, CPU=1), b"c")]


def test_top_k_draw_is_seeded_and_limited_to_the_best_k():
    nodes = {f"n{i}": ({"CPU": 100}, {"CPU": 100 - i}) for i in range(10)}
    # 11 live nodes -> k = 2; all are under the threshold, so ties go by id.
    picks = []
    for seed in range(20):
        s, _ = _cluster(local_cpus=1, rng_seed=seed, **nodes)
        s.acquire(R({"CPU": 1}))
        s.submit(_req(1, CPU=1))
        [d] = s.decide(0.0)
        picks.append(d.node_id)
    assert set(picks) == {b"n0", b"n1"}
    again, _ = _cluster(local_cpus=1, rng_seed=3, **nodes)
    again.acquire(R({"CPU": 1}))
    again.submit(_req(1, CPU=1))
    assert again.decide(0.0)[0].node_id == picks[3]


def test_optimistic_subtraction_moves_the_next_spill_elsewhere():
    # 3 live nodes -> k = 1. a is at .6, b at .65: without the optimistic
    # subtraction every request of the burst would go to a.
    s, view = _cluster(local_cpus=1, a=({"CPU": 10}, {"CPU": 4}), b=({"CPU": 10}, {"CPU": 3.5}))
    s.acquire(R({"CPU": 1}))
    for i in range(3):
        s.submit(_req(i, CPU=1))
    out = s.decide(0.0)
    assert [d.node_id for d in out] == [b"a", b"b", b"a"]
    assert view.node(b"a").available == R({"CPU": 2})


def test_cpu_work_avoids_gpu_nodes_while_others_have_room():
    s, view = _cluster(local_cpus=1, g=({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}),
                       c=({"CPU": 8}, {"CPU": 3}))
    s.acquire(R({"CPU": 1}))
    s.submit(_req(1, CPU=1))
    assert s.decide(0.0) == [Spill(_req(1, CPU=1), b"c")]   # c at .625 beats an idle GPU node
    view.update(b"c", R({"CPU": 8}), R({"CPU": 0}), 2)
    s.submit(_req(2, CPU=1))
    assert s.decide(0.0) == [Spill(_req(2, CPU=1), b"g")]   # room now beats avoiding GPUs
    s.submit(_req(3, GPU=1))
    assert s.decide(0.0) == [Spill(_req(3, GPU=1), b"g")]


def test_nothing_free_anywhere_stays_queued_here_until_a_node_frees():
    s, view = _cluster(local_cpus=1, a=({"CPU": 2}, {"CPU": 0}))
    s.acquire(R({"CPU": 1}))
    s.submit(_req(1, CPU=1))
    s.submit(_req(2, CPU=1))
    assert s.decide(0.0) == []
    assert s.queued == 2 and s.infeasible == []
    view.update(b"a", R({"CPU": 2}), R({"CPU": 1}), 2)
    assert s.decide(1.0) == [Spill(_req(1, CPU=1), b"a")]
    s.release(R({"CPU": 1}))
    assert s.decide(2.0) == [Grant(_req(2, CPU=1))]


def test_locality_prefers_the_node_with_most_argument_bytes():
    s, _ = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 3}), b=({"CPU": 4}, {"CPU": 4}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), locality={b"a": 10 << 20, b"b": 1 << 20, LOCAL: 5})
    s.submit(r)
    assert s.decide(0.0) == [Spill(r, b"a")]   # a is busier than here, but holds the data
    # ties: the local node first
    r2 = LeaseRequest(2, 1, R({"CPU": 1}), locality={b"b": 7, LOCAL: 7})
    s.submit(r2)
    assert s.decide(0.0) == [Grant(r2)]


def test_locality_node_that_is_busy_or_dead_is_not_preferred():
    s, view = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 1}), b=({"CPU": 4}, {"CPU": 4}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), locality={b"a": 1 << 30})
    s.submit(r)
    assert s.decide(0.0) == [Grant(r)]        # a is at .75: busy, the idle local node wins
    view.mark_dead(b"b")
    r2 = LeaseRequest(2, 1, R({"CPU": 1}), locality={b"b": 1 << 30})
    s.submit(r2)
    assert s.decide(0.0) == [Grant(r2)]


def test_locality_is_ignored_by_other_strategies():
    s, _ = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 4}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), strategy=NodeAffinity(b"zz", soft=True),
                     locality={b"a": 1 << 30})
    s.submit(r)
    assert s.decide(0.0) == [Grant(r)]


# ---- SPREAD -----------------------------------------------------------------
def test_spread_round_robins_over_nodes_with_room_then_feasible_ones():
    s, view = _cluster(local_cpus=1, a=({"CPU": 2}, {"CPU": 2}), c=({"CPU": 2}, {"CPU": 0}),
                       b=({"CPU": 2}, {"CPU": 2}))
    reqs = [LeaseRequest(i, 1, R({"CPU": 1}), strategy=SPREAD) for i in range(6)]
    for r in reqs:
        s.submit(r)
    out = s.decide(0.0)
    # Sorted ids L, a, b, c; c is full. The turn passes L, a, b (room now), skips c,
    # then a, b (L is full now); once no node has room, the next feasible one: c.
    assert [(type(d).__name__, getattr(d, "node_id", LOCAL)) for d in out] == [
        ("Grant", LOCAL), ("Spill", b"a"), ("Spill", b"b"), ("Spill", b"a"),
        ("Spill", b"b"), ("Spill", b"c")]


# ---- NodeAffinity -----------------------------------------------------------
def test_node_affinity_goes_to_target_even_when_busy():
    s, _ = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 0}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), strategy=NodeAffinity(b"a"))
    s.submit(r)
    assert s.decide(0.0) == [Spill(r, b"a")]


def test_node_affinity_to_the_busy_local_node_waits_here():
    s, view = _cluster(local_cpus=1, a=({"CPU": 4}, {"CPU": 4}))
    s.acquire(R({"CPU": 1}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), strategy=NodeAffinity(LOCAL))
    s.submit(r)
    assert s.decide(0.0) == []
    s.release(R({"CPU": 1}))
    assert s.decide(0.0) == [Grant(r)]


def test_hard_affinity_to_dead_unknown_or_small_node_is_unschedulable():
    s, view = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 4}), b=({"CPU": 1}, {"CPU": 1}))
    view.mark_dead(b"a")
    dead = LeaseRequest(1, 1, R({"CPU": 1}), strategy=NodeAffinity(b"a"))
    unknown = LeaseRequest(2, 1, R({"CPU": 1}), strategy=NodeAffinity(b"zz"))
    small = LeaseRequest(3, 1, R({"CPU": 2}), strategy=NodeAffinity(b"b"))
    for r in (dead, unknown, small):
        s.submit(r)
    out = s.decide(0.0)
    assert [type(d) for d in out] == [Unschedulable] * 3
    assert ["dead" in out[0].reason, "unknown" in out[1].reason, "fit" in out[2].reason] == [
        True, True, True]
    assert s.queued == 0


def test_soft_affinity_to_dead_node_falls_back_to_default():
    s, view = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 4}))
    view.mark_dead(b"a")
    r = LeaseRequest(1, 1, R({"CPU": 1}), strategy=NodeAffinity(b"a", soft=True))
    s.submit(r)
    assert s.decide(0.0) == [Grant(r)]


def test_hard_affinity_fails_if_its_node_dies_before_the_pass():
    s, view = _cluster(local_cpus=1, x=({"CPU": 1}, {"CPU": 1}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), strategy=NodeAffinity(b"x"))
    s.submit(r)
    view.mark_dead(b"x")
    [d] = s.decide(0.0)
    assert isinstance(d, Unschedulable) and "dead" in d.reason


# ---- grant_or_reject: spillback is one hop ----------------------------------
def test_spilled_request_is_granted_or_queued_here_never_spilled_again():
    s, _ = _cluster(local_cpus=1, a=({"CPU": 8}, {"CPU": 8}))
    s.acquire(R({"CPU": 1}))
    r = LeaseRequest(1, 1, R({"CPU": 1}), grant_or_reject=True)
    s.submit(r)
    assert s.decide(0.0) == []       # an idle node elsewhere does not matter
    s.release(R({"CPU": 1}))
    assert s.decide(0.0) == [Grant(r)]


def test_spilled_request_that_cannot_fit_here_is_rejected():
    s, _ = _cluster(local_cpus=1, a=({"CPU": 8}, {"CPU": 8}))
    big = LeaseRequest(1, 1, R({"CPU": 4}), grant_or_reject=True)
    pinned = LeaseRequest(2, 1, R({"CPU": 1}), strategy=NodeAffinity(b"a"),
                          grant_or_reject=True)
    s.submit(big)
    s.submit(pinned)
    out = s.decide(0.0)
    assert [type(d) for d in out] == [Rejected, Rejected]
    assert s.queued == 0


# ---- infeasible demands wait ------------------------------------------------
def test_infeasible_demand_waits_is_reported_once_and_runs_when_a_node_joins():
    s, view = _cluster(local_cpus=4, a=({"CPU": 4}, {"CPU": 4}))
    r = _req(1, GPU=1)
    assert s.submit(r) == Queued(r)
    out = s.decide(0.0)
    assert [type(d) for d in out] == [InfeasibleQueued] and out[0].request == r
    assert "GPU" in out[0].reason
    assert s.infeasible == [r]
    r2 = _req(2, GPU=1)
    s.submit(r2)
    assert s.decide(1.0) == [InfeasibleQueued(r2, out[0].reason)]
    assert s.decide(2.0) == []          # each request is reported once
    assert s.infeasible == [r, r2]
    view.update(b"g", R({"CPU": 4, "GPU": 1}), R({"CPU": 4, "GPU": 1}), 1)
    out = s.decide(3.0)
    assert out[0] == Spill(r, b"g")
    assert s.infeasible == []


def test_single_node_mode_still_rejects_infeasible_at_submit():
    legacy = LeaseScheduler(R({"CPU": 4}), node_id=b"x", view=ClusterView())
    result = legacy.submit(_req(1, CPU=8))
    assert isinstance(result, Infeasible) and legacy.queued == 0


# ---- local accounting and the shell's interface -----------------------------
def test_local_version_grows_and_echoes_of_our_own_snapshot_are_ignored():
    s, view = _cluster(local_cpus=2)
    v0 = s.version
    old = view.node(LOCAL)
    s.submit(_req(1, CPU=1))
    s.decide(0.0)
    assert s.version == v0 + 1 and view.node(LOCAL).available == R({"CPU": 1})
    assert not view.update(LOCAL, old.total, old.available, old.version)
    s.release(R({"CPU": 1}))
    assert s.version == v0 + 2 and view.node(LOCAL).available == R({"CPU": 2})


def test_cancel_in_cluster_mode():
    s, _ = _cluster(local_cpus=1, a=({"CPU": 1}, {"CPU": 0}))
    s.acquire(R({"CPU": 1}))
    for i in range(3):
        s.submit(_req(i, client=9, CPU=1))
    assert s.decide(0.0) == []
    assert [r.request_id for r in s.cancel(9, 1)] == [1]
    assert [r.request_id for r in s.cancel(9)] == [0, 2]
    s.release(R({"CPU": 1}))
    assert s.decide(0.0) == [] and s.queued == 0


def _sched_state(s):
    return (s.queued, s.available, s.version, s.infeasible, _state(s.view))


def test_illegal_requests_raise_and_change_nothing():
    s, _ = _cluster(local_cpus=2, a=({"CPU": 2}, {"CPU": 2}))
    s.submit(_req(1, CPU=1))
    before = _sched_state(s)
    bad = [
        LeaseRequest(2, 1, R({"CPU": 1}), strategy="PACK"),
        LeaseRequest(2, 1, R({"CPU": 1}), locality={b"a": -5}),
        LeaseRequest(2, 1, R({"CPU": 1}), locality={"a": 5}),
        LeaseRequest(2, 1, R({"CPU": 1}), grant_or_reject=1),
        LeaseRequest(2, 1, ResourceSet({"CPU": -10_000})),
        LeaseRequest(2, "c", R({"CPU": 1})),
        LeaseRequest(2, 1, {"CPU": 1}),
        "not a request",
    ]
    for r in bad:
        with pytest.raises((TypeError, ValueError)):
            s.submit(r)
        assert _sched_state(s) == before
    with pytest.raises(TypeError):
        NodeAffinity("a")
    with pytest.raises(RuntimeError):
        s.schedule()            # another live node: the shell must use decide
    assert _sched_state(s) == before


def test_decide_applies_optimism_expiry_itself():
    s, view = _cluster(local_cpus=2, a=({"CPU": 2}, {"CPU": 2}))
    s.acquire(R({"CPU": 2}))
    s.submit(_req(1, CPU=2))
    assert s.decide(10.0) == [Spill(_req(1, CPU=2), b"a")]
    s.submit(_req(2, CPU=2))
    assert s.decide(12.0) == []              # a looks full (our own guess): wait here
    assert s.decide(13.0) == [Spill(_req(2, CPU=2), b"a")]   # guess expired, no snapshot came


def _expected_default(view, local, demand, rng):
    """Hybrid rule (no locality) written out from the docstring, over the public view."""
    def key(n):
        info = view.node(n)
        util = max([(info.total.get(r) - info.available.get(r)) / info.total.get(r)
                    for r in ("CPU", "memory", "object_store_memory")
                    if info.total.get(r) > 0] or [0.0])
        return (0 if demand.fits_in(info.available) else 1,
                1 if demand.get("GPU") == 0 and info.total.get("GPU") > 0 else 0,
                util if util > 0.5 else 0.0, n)
    keys = sorted(key(n) for n in view.feasible_nodes(demand))
    if not keys:
        return "infeasible"
    best = keys[0]
    local_ok = view.is_feasible(local, demand)
    if best[0] == 1 and local_ok:
        return "stay"
    if local_ok and key(local)[:3] <= best[:3]:
        return local
    tier = [k for k in keys if k[:2] == best[:2]]
    k = max(1, int(view.alive_count * 0.2))
    return tier[rng.randrange(min(k, len(tier)))][3]


def test_incremental_rankings_match_the_rule_over_random_histories():
    """Differential check: the scheduler keeps per-demand rankings up to date from
    the view's change log; every decision must equal the rule applied afresh."""
    rng = random.Random(42)
    shapes = [R({"CPU": 1}), R({"CPU": 2}), R({"CPU": 1, "GPU": 1}), R({"CPU": 3}),
              R({"CPU": 1, "GPU": 2})]
    view = ClusterView(optimism_timeout=2.0)
    versions = {}
    for i in range(30):
        nid = b"n%02d" % i
        total = R({"CPU": 4, "GPU": 1} if i % 7 == 0 else {"CPU": 4})
        versions[nid] = 1
        view.update(nid, total, total, 1)
    s = LeaseScheduler(R({"CPU": 4}), node_id=LOCAL, view=view, rng=random.Random(0),
                       queue_infeasible=True)
    granted = []
    kinds = {"Grant": 0, "Spill": 0, "stay": 0, "infeasible": 0}
    for step in range(400):
        now = step * 0.1
        for _ in range(rng.randrange(4)):
            op = rng.random()
            nid = rng.choice(sorted(versions))
            if op < 0.04:
                view.mark_dead(nid)
            elif op < 0.06:
                new = b"m%03d" % step
                versions[new] = 1
                view.update(new, R({"CPU": 4, "GPU": 2}), R({"CPU": 4, "GPU": 2}), 1)
            elif view.is_alive(nid):
                versions[nid] += rng.choice([1, -2])   # some deliveries are stale
                total = view.node(nid).total
                free = R({"CPU": rng.choice([0, 0, 0, 0, 1, 2, 4]),
                          "GPU": min(rng.randrange(2), total.get("GPU") // 10_000)})
                view.update(nid, total, free, max(0, versions[nid]))
        if granted and rng.random() < 0.3:
            s.release(granted.pop())
        demand = rng.choice(shapes)
        view.expire_optimism(now)
        seed = rng.randrange(1 << 30)
        expected = _expected_default(view, LOCAL, demand, random.Random(seed))
        s.rng.seed(seed)
        r = LeaseRequest(step, 1, demand)
        s.submit(r)
        out = [d for d in s.decide(now) if not isinstance(d, InfeasibleQueued)]
        if expected == "stay" or expected == "infeasible":
            assert out == [], step
            assert s.infeasible == ([r] if expected == "infeasible" else []), step
            s.cancel(1)
            kinds[expected] += 1
        elif expected == LOCAL:
            assert out == [Grant(r)], step
            granted.append(demand)
            kinds["Grant"] += 1
        else:
            assert out == [Spill(r, expected)], step
            kinds["Spill"] += 1
    assert all(n >= 5 for n in kinds.values()), kinds
