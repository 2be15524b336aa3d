"""Pure raylet policy: fixed-point resources, GPU instances and lease scheduling."""

import pytest

from daemons.raylet.resources import GpuInstances, ResourceSet
from daemons.raylet.scheduler import Infeasible, LeaseRequest, LeaseScheduler, Queued


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
