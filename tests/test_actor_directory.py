"""The raylet's pure actor lifecycle decisions (no processes)."""

import pytest

from daemons.raylet.actors import ALIVE, DEAD, PENDING, RESTARTING, ActorDirectory, Dead, Restart


def _make(d, aid=b"a", **spec):
    return d.create(aid, spec, {"CPU": 1}, owner_conn=7, create_r=3)


def test_restart_until_budget_then_dead():
    d = ActorDirectory()
    rec = _make(d, max_restarts=1)
    assert rec.state == PENDING
    d.ready(b"a", 100, "/s")
    assert rec.state == ALIVE and rec.pid == 100
    decision = d.process_died(b"a", "crash 1")
    assert isinstance(decision, Restart) and rec.state == RESTARTING and rec.num_restarts == 1
    assert rec.pid == 0 and rec.socket == ""
    d.ready(b"a", 101, "/s2")
    decision = d.process_died(b"a", "crash 2")
    assert isinstance(decision, Dead) and rec.state == DEAD and rec.death_cause == "crash 2"
    # DEAD is final: later events change nothing.
    assert d.process_died(b"a", "again") is None
    assert d.ready(b"a", 5, "/x") is None and rec.state == DEAD


def test_kill_without_restart_wins_over_budget():
    d = ActorDirectory()
    rec = _make(d, max_restarts=-1)
    d.ready(b"a", 1, "/s")
    d.kill(b"a", no_restart=True)
    assert isinstance(d.process_died(b"a", "SIGKILL"), Dead)
    assert rec.death_cause == "killed by kill()"


def test_kill_with_restart_restarts():
    d = ActorDirectory()
    _make(d, max_restarts=2)
    d.ready(b"a", 1, "/s")
    d.kill(b"a", no_restart=False)
    assert isinstance(d.process_died(b"a", "SIGKILL"), Restart)


def test_owner_gone_ends_only_its_non_detached_actors():
    d = ActorDirectory()
    _make(d, b"mine", max_restarts=5)
    _make(d, b"kept", detached=True)
    d.create(b"other", {}, {}, owner_conn=8, create_r=1)
    gone = d.owner_gone(7)
    assert [r.actor_id for r in gone] == [b"mine"]
    assert isinstance(d.process_died(b"mine", "SIGKILL"), Dead)
    assert "owner" in d.actors[b"mine"].death_cause


def test_init_failure_is_final_and_bad_specs_are_refused():
    d = ActorDirectory()
    rec = _make(d, max_restarts=3)
    d.init_failed(b"a", "ValueError: bad")
    assert rec.state == DEAD and d.process_died(b"a", "exit") is None
    with pytest.raises(ValueError):
        _make(d)  # the id exists
    with pytest.raises(ValueError):
        _make(d, b"b", max_restarts="many")


def test_public_row_has_the_lifecycle_fields():
    d = ActorDirectory()
    rec = _make(d, class_name="Counter", name="c", namespace="ns", max_restarts=1)
    row = rec.public(b"node")
    assert row["state"] == PENDING and row["class_name"] == "Counter"
    assert row["name"] == "c" and row["namespace"] == "ns" and row["node_id"] == b"node"
    assert {"num_restarts", "max_restarts", "death_cause", "pid", "socket"} <= set(row)
