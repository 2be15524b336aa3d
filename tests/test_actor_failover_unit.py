"""The pure parts of actor failover: the orphan planner and the directory's takeover events."""

import msgpack
import pytest

from daemons.raylet import actor_failover as af
from daemons.raylet.actors import DEAD, RESTARTING, ActorDirectory
from daemons.raylet.resources import ResourceSet

DEAD_NODE, ME, OTHER = b"\x01" * 4, b"\x02" * 4, b"\x03" * 4
BIG = ResourceSet.of({"CPU": 4, "GPU": 1})
SMALL = ResourceSet.of({"CPU": 1})


def _row(aid=b"a1", state="ALIVE", node=DEAD_NODE, n=0, max_restarts=1, **extra):
    return {"actor_id": aid, "state": state, "node_id": node, "pid": 42, "socket": "/s",
            "address": "h:1", "num_restarts": n, "max_restarts": max_restarts,
            "death_cause": "", "name": "", "namespace": "", **extra}


def _record(demand=None, strategy=None, detached=False, owner=OTHER):
    spec = {"cls": b"k", "args": [], "detached": detached}
    return af.failover_record(spec, demand or {}, strategy, owner)


def _plan(rows, records, total=BIG, may_park=False, dead=frozenset({DEAD_NODE})):
    return af.plan_orphans(rows, dead_nodes=set(dead), my_node=ME, my_total=total,
                           records=records, may_park=may_park)


def test_record_is_msgpack_able_and_round_trips():
    rec = _record({"CPU": 1.0}, {"node_id": DEAD_NODE, "soft": True})
    assert msgpack.unpackb(msgpack.packb(rec, use_bin_type=True), raw=False) == rec


def test_only_rows_on_dead_nodes_or_parked_are_orphans():
    dead = {DEAD_NODE}
    assert af.is_orphan(_row(), dead)
    assert not af.is_orphan(_row(node=OTHER), dead)
    assert not af.is_orphan(_row(state=DEAD), dead)
    assert af.is_orphan(_row(state=RESTARTING, node=b""), dead)
    assert not af.is_orphan(_row(state="PENDING_CREATION", node=b""), dead)
    assert not af.is_orphan("garbage", dead) and not af.is_orphan({"state": "ALIVE"}, dead)


def test_restartable_actor_that_fits_is_restarted_here_with_one_more_restart():
    [t] = _plan([_row(n=0, max_restarts=2)], {b"a1": _record({"CPU": 2})})
    assert t.action == af.RESTART_HERE
    assert t.row["state"] == RESTARTING and t.row["node_id"] == ME
    assert t.row["num_restarts"] == 1 and t.row["pid"] == 0 and t.row["address"] == ""
    assert t.record["spec"]["cls"] == b"k"
    assert t.claim == af.claim_key(_row(n=0, max_restarts=2))


@pytest.mark.parametrize("row,record,why", [
    (_row(n=1, max_restarts=1), _record(), "no restarts left"),
    (_row(max_restarts=0), None, "no restarts left"),
    (_row(), None, "not recorded"),
    (_row(), _record(owner=DEAD_NODE), "owner's node"),
    (_row(), _record(strategy={"node_id": DEAD_NODE, "soft": False}), "hard node affinity"),
    (_row(), {"killed": "killed by kill()"}, "killed by kill()"),
])
def test_actors_that_cannot_restart_are_declared_dead_naming_the_node(row, record, why):
    records = {b"a1": record} if record is not None else {}
    [t] = _plan([row], records)
    assert t.action == af.DECLARE_DEAD and t.row["state"] == DEAD
    assert DEAD_NODE.hex() in t.row["death_cause"] and why in t.row["death_cause"]
    assert t.row["pid"] == 0 and t.row["socket"] == ""


def test_detached_actor_outlives_its_owners_node():
    [t] = _plan([_row()], {b"a1": _record(detached=True, owner=DEAD_NODE)})
    assert t.action == af.RESTART_HERE


def test_soft_affinity_to_the_dead_node_restarts_anywhere():
    [t] = _plan([_row()], {b"a1": _record(strategy={"node_id": DEAD_NODE, "soft": True})})
    assert t.action == af.RESTART_HERE


def test_a_node_that_cannot_hold_it_parks_it_only_on_the_second_look():
    rows, records = [_row()], {b"a1": _record({"GPU": 1})}
    assert _plan(rows, records, total=SMALL) == []
    [t] = _plan(rows, records, total=SMALL, may_park=True)
    assert t.action == af.PARK and t.row["node_id"] == b"" and t.row["num_restarts"] == 1
    assert t.row["state"] == RESTARTING


def test_a_parked_actor_is_placed_by_a_node_that_fits_without_another_restart():
    parked = _row(state=RESTARTING, node=b"", n=1, max_restarts=3)
    records = {b"a1": _record({"GPU": 1})}
    assert _plan([parked], records, total=SMALL, may_park=True) == []
    [t] = _plan([parked], records, dead=set())
    assert t.action == af.PLACE_HERE and t.row["node_id"] == ME and t.row["num_restarts"] == 1
    # Its claim differs from the claim that parked it: one transition per row version.
    assert t.claim != af.claim_key(_row(n=0))


def test_a_parked_actor_already_counted_its_restart():
    parked = _row(state=RESTARTING, node=b"", n=1, max_restarts=1)
    assert af.has_restart_left(parked) and not af.has_restart_left(_row(n=1, max_restarts=1))
    records = {b"a1": _record({"GPU": 1})}
    assert _plan([parked], records, total=SMALL, may_park=True) == []
    [t] = _plan([parked], records)
    assert t.action == af.PLACE_HERE and t.row["num_restarts"] == 1


def test_a_parked_actor_without_a_record_is_left_alone():
    # Only a raylet that can place it acts on it; nothing to declare dead on no node.
    assert _plan([_row(state=RESTARTING, node=b"", n=1, max_restarts=1)], {}) == []


def test_claim_keys_name_the_row_version_and_group_by_actor():
    a = af.claim_key(_row(n=0))
    b = af.claim_key(_row(n=1))
    c = af.claim_key(_row(n=0, node=OTHER))
    assert len({a, b, c}) == 3
    assert all(k.startswith(af.claims_prefix(b"a1")) for k in (a, b, c))
    assert not af.claim_key(_row(aid=b"a2")).startswith(af.claims_prefix(b"a1"))


def test_plan_ignores_live_and_dead_rows_and_bad_demands():
    rows = [_row(aid=b"x", node=OTHER), _row(aid=b"y", state=DEAD), _row(aid=b"z")]
    assert _plan(rows, {b"z": _record({"CPU": -1})}, may_park=True)[0].action == af.PARK


def test_directory_adopts_and_re_registers_the_owner():
    d = ActorDirectory()
    rec = d.adopt(b"a1", {"cls": b"k"}, {}, max_restarts=2, num_restarts=1, strategy=None,
                  owner_node=OTHER)
    assert rec.state == RESTARTING and rec.owner_conn is None and rec.num_restarts == 1
    with pytest.raises(ValueError):
        d.adopt(b"a1", {}, {}, 1, 1, None, OTHER)
    assert d.reown(b"a1", 7) and rec.owner_conn == 7
    assert not d.reown(b"a1", 8)  # only a creator that lost its link registers
    assert [r.actor_id for r in d.owner_gone(7)] == [b"a1"]
    detached = d.adopt(b"a2", {"detached": True}, {}, 1, 1, None, OTHER)
    assert not d.reown(b"a2", 9) and detached.owner_conn is None


def test_directory_ends_actors_whose_owners_node_died_except_detached():
    d = ActorDirectory()
    mine = d.create(b"a1", {}, {}, 1, 1)
    mine.owner_node = OTHER
    kept = d.create(b"a2", {"detached": True}, {}, 1, 1)
    kept.owner_node = OTHER
    elsewhere = d.create(b"a3", {}, {}, 1, 1)
    elsewhere.owner_node = ME
    died = d.owner_node_died(OTHER)
    assert died == [mine] and mine.no_restart and OTHER.hex() in mine.death_cause
