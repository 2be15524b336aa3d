"""The core worker's pure parts, driven directly: no process, no socket, no sleep.

``libclient.core.references`` decides which owned objects to keep, promote
or free; ``libclient.core.task_manager`` decides what a reply or a lost
connection means for a task. Both are fed events here and their decisions
checked.
"""

from __future__ import annotations

import collections
import os

import pytest

from libclient import serialization
from libclient.core import task_manager
from libclient.core.errors import error_wire
from libclient.core.references import PENDING, READY, ReferenceTable
from libclient.core.task_manager import Task, TaskManager
from libclient.exceptions import RaySystemError
from libclient.object_ref import ObjectRef

NODE = b"n" * 16
PID = 4242
HERE = "10.0.0.1:7000"  # our store's transfer address


def _ref(oid: bytes) -> ObjectRef:
    return ObjectRef(oid, PID, _count=False)


def _task(deps=(), nret=1, retries=3, tid=None) -> Task:
    tid = tid or os.urandom(16)
    return_ids = [tid + i.to_bytes(4, "little") for i in range(nret)]
    return Task(tid, ("task", ("CPU", 1)), {"CPU": 1}, {"t": "task", "tid": tid}, list(deps),
                return_ids, retries, "f", None,
                {"name": "f", "fn": b"k", "job": 1, "nret": nret,
                 "deps": [r._id for _, r in deps], "owner_pid": PID})


def _owned(table: ReferenceTable, state=READY, wire=None, buf=None, count=1) -> bytes:
    oid = os.urandom(20)
    entry = table.add(oid)
    for _ in range(count):
        table.incref(oid)
    entry.state = state
    entry.wire = wire
    entry.buf = buf
    return oid


_VALUE = serialization.serialize(41).to_wire()


# ------------------------------------------------------------ references
def test_counts_and_release_drop_a_ready_inline_object_without_freeing():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, wire=_VALUE, count=2)
    released = collections.deque([oid])
    assert t.release(released, {}) == []
    assert oid in t.owned and t.owned[oid].count == 1 and not released
    assert t.release(collections.deque([oid]), {}) == []
    assert oid not in t.owned
    assert t.object_events == {}  # it never was in stored


def test_release_frees_a_stored_copy_that_never_left_the_process():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, buf=object())
    assert t.release(collections.deque([oid, b"not-owned"]), {}) == [oid]
    assert oid not in t.owned
    assert t.take_object_events() == {oid: {"node_id": NODE, "state": "FREED"}}
    assert t.object_events == {}


def test_an_escaped_object_lives_while_borrowers_hold_it_then_every_copy_goes():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, buf=object())
    entry = t.owned[oid]
    entry.escaped = True
    entry.loc = "10.0.0.2:7000"  # its task ran there: a copy stays on that node
    w1, w2 = ["10.0.0.2:7000", 11], ["10.0.0.3:7000", 12]
    # Two workers reported (in their replies) that they kept the ref.
    assert not t.add_borrower([oid, PID, HERE, *w1], relay=False)
    assert not t.add_borrower([oid, PID, HERE, *w2], relay=False)
    assert not t.add_borrower([oid, PID, HERE, *w1], relay=False)  # w1 again, later task
    assert t.release(collections.deque([oid]), {}) == []  # our last handle goes
    assert oid in t.owned  # ... but borrowers hold it
    assert not t.remove_borrower(oid, tuple(w1), 1)  # one of w1's two registrations
    assert not t.remove_borrower(oid, tuple(w2), 1)
    assert t.remove_borrower(oid, tuple(w1), 1)  # the last one: drop it now
    assert t.drop(oid, entry)  # the caller drops it: our copy is freed ...
    assert t.remote_frees == {"10.0.0.2:7000": [oid]}  # ... and the remote one


def test_an_escaped_object_nobody_borrowed_is_freed_with_its_last_handle():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, buf=object())
    t.owned[oid].escaped = True
    assert t.release(collections.deque([oid]), {}) == [oid]
    assert oid not in t.owned


def test_dead_borrowers_are_forgotten():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, buf=object(), count=0)
    t.add_borrower([oid, PID, HERE, "10.0.0.9:1", 5], relay=False)
    assert t.borrower_keys() == {("10.0.0.9:1", 5)}
    assert t.drop_borrowers_where(lambda k: k[0] == "10.0.0.9:1") == [oid]


def test_a_borrower_reports_refs_it_kept_and_removes_them_once():
    me = ("10.0.0.2:7000", 77)
    t = ReferenceTable(NODE, 77, me[0])
    x, y = os.urandom(20), os.urandom(20)
    t.incref(x, PID, HERE)  # two refs deserialized from a task's arguments
    t.incref(y, PID, HERE)
    assert set(t.borrowed) == {x, y}
    t.release(collections.deque([y]), {})
    assert t.take_borrow_report(me) == [[x, PID, HERE, me[0], me[1]]]
    assert t.take_borrow_report(me) is None  # reported once
    assert t.take_removals() == {}  # y was never registered: nobody to tell
    t.release(collections.deque([x]), {})
    assert t.take_removals() == {(HERE, PID): [[x, 1]]}


def test_borrows_of_a_sub_task_are_relayed_up_or_sent_to_the_owner():
    t = ReferenceTable(NODE, 77, "10.0.0.2:7000")
    item = [os.urandom(20), PID, HERE, "10.0.0.3:7000", 9]
    assert not t.add_borrower(item, relay=True)  # inside a task: in our reply
    assert t.take_borrow_report(("10.0.0.2:7000", 77)) == [item]
    assert t.add_borrower(item, relay=False)  # a driver: the caller sends it


def test_a_caller_registered_for_a_returned_ref_reports_its_removal():
    t = ReferenceTable(NODE, 77, "10.0.0.2:7000")
    x = os.urandom(20)
    t.registered_by_caller(x, PID, HERE)
    t.incref(x, PID, HERE)  # the handle the caller holds for the return value
    t.release(collections.deque([x]), {})
    assert t.take_removals() == {(HERE, PID): [[x, 1]]}


def test_release_keeps_a_pending_object_while_its_task_runs():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, state=PENDING)
    running = {oid[:16]: object()}
    assert t.release(collections.deque([oid]), running) == []
    assert oid in t.owned  # the reply must still find its entry
    t.incref(oid)
    t.release(collections.deque([oid]), {})  # its task is gone: nothing will complete it
    assert oid not in t.owned


@pytest.mark.parametrize("why", ["escaped", "waiters"])
def test_release_keeps_a_pending_object_someone_outside_needs(why):
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, state=PENDING)
    if why == "escaped":
        t.owned[oid].escaped = True
    else:
        t.owned[oid].waiters = [_task()]
    t.release(collections.deque([oid]), {})
    assert oid in t.owned and t.owned[oid].count == 0


def test_escape_promotes_only_owned_ready_values_not_yet_in_our_store():
    t = ReferenceTable(NODE, PID, HERE)
    inline = _owned(t, wire=_VALUE)
    stored = _owned(t, buf=object())
    pending = _owned(t, state=PENDING, wire=_VALUE)  # promoted when it completes
    remote = _owned(t)
    t.owned[remote].loc = "10.0.0.2:7000"  # pulled to the owner's node
    borrowed = os.urandom(20)
    decided = t.escape([_ref(inline), _ref(stored), _ref(pending), _ref(remote),
                        _ref(borrowed)])
    assert [oid for oid, _ in decided] == [inline, remote]
    assert decided[0][1] is t.owned[inline]
    assert all(t.owned[o].escaped for o in (inline, stored, pending, remote))
    assert borrowed not in t.owned


def test_completion_releases_waiting_tasks_only_at_their_last_argument():
    t = ReferenceTable(NODE, PID, HERE)
    m = TaskManager()
    a, b = _owned(t, state=PENDING), _owned(t, state=PENDING)
    ready = _owned(t, wire=_VALUE)
    both = _task([(0, _ref(a)), (1, _ref(b)), (2, _ref(ready))])
    only_a = _task([(0, _ref(a))])
    assert t.wait_for_args(both) == 2 and both.unresolved == 2
    assert t.wait_for_args(only_a) == 1
    promote, waiters = t.complete(t.owned[a])
    assert promote is False and t.owned[a].state == READY
    assert waiters == [both, only_a] and t.owned[a].waiters is None
    assert [m.dependency_ready(w) for w in waiters] == [False, True]
    t.owned[b].escaped = True
    promote, waiters = t.complete(t.owned[b])
    assert promote is True  # promoted before the waiter is sent on
    both.cancelled = True
    assert not m.dependency_ready(waiters[0])  # its last argument, but cancelled


def test_resolve_args_inlines_small_owned_values_and_passes_the_rest_by_id():
    t = ReferenceTable(NODE, PID, HERE)
    inline = _owned(t, wire=_VALUE)
    stored = _owned(t, buf=object())
    borrowed = os.urandom(20)
    elsewhere = _owned(t)
    t.owned[elsewhere].loc = "10.0.0.2:7000"  # a remote task's big return, not pulled yet
    task = _task([(0, _ref(inline)), ("k", _ref(stored)), (2, _ref(borrowed)),
                  (3, _ref(elsewhere))])
    assert t.resolve_args(task) is None
    assert task.msg["deps"] == [[0, "v", _VALUE], ["k", "s", stored, PID, HERE],
                                [2, "s", borrowed, PID, HERE],
                                [3, "s", elsewhere, PID, "10.0.0.2:7000"]]


def test_resolve_args_fails_a_task_whose_argument_failed():
    t = ReferenceTable(NODE, PID, HERE)
    err = error_wire(RaySystemError("boom"))
    failed = _owned(t, wire=err)
    task = _task([(0, _ref(_owned(t, wire=_VALUE))), (1, _ref(failed))])
    assert t.resolve_args(task) is err
    assert "deps" not in task.msg


def test_unreferenced_after_completion():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t, count=0)
    assert t.unreferenced(oid, t.owned[oid])
    t.add_borrower([oid, PID, HERE, "10.0.0.2:1", 3], relay=False)
    assert not t.unreferenced(oid, t.owned[oid])  # a borrower holds it
    other = _owned(t, count=1)
    assert not t.unreferenced(other, t.owned[other])


def test_stored_records_the_location_for_gcsd():
    t = ReferenceTable(NODE, PID, HERE)
    t.stored(b"o" * 20, 123)
    assert t.take_object_events() == {b"o" * 20: {"node_id": NODE, "size": 123,
                                                  "state": "IN_STORE", "owner_pid": PID}}


# ---------------------------------------------------------- task manager
def test_task_rows_carry_the_whole_spec_with_each_state():
    m = TaskManager()
    task = _task()
    m.add(task)
    assert m.get(task.tid) is task
    first = m.take_events()
    assert first == {task.tid: {**task.event, "state": "PENDING_ARGS_AVAIL"}}
    m.mark(task, "RUNNING")
    m.done(task, "FINISHED")
    (row,) = m.take_events().values()
    assert row == {**task.event, "state": "FINISHED"}  # lineage: spec, not just state
    assert m.events == {} and m.get(task.tid) is None
    assert "state" not in task.event


def test_done_lets_the_arguments_go():
    m = TaskManager()
    task = _task([(0, _ref(os.urandom(20)))])
    task.args_hold = [object()]
    m.add(task)
    m.done(task, "FAILED")
    assert task.args_hold is None and task.deps == []
    assert task.tid not in m.pending


def test_reply_outcomes():
    m = TaskManager()
    task = _task(retries=1)
    task.lease = object()
    assert m.on_reply(task, 2) == task_manager.RETRY  # retryable exception
    assert task.retries_left == 0 and task.lease is None
    assert m.on_reply(task, 2) == task_manager.FAILED  # no retries left
    assert m.on_reply(_task(retries=5), 1) == task_manager.FAILED  # plain exceptions never retry
    assert m.on_reply(_task(), 0) == task_manager.FINISHED


def test_a_cancelled_task_is_never_retried():
    m = TaskManager()
    task = _task(retries=3)
    m.add(task)
    assert m.cancel(task.tid) is task
    assert task.cancelled and task.retries_left == 0
    assert m.on_reply(task, 2) == task_manager.CANCELLED
    assert m.on_connection_lost(task) == task_manager.CANCELLED
    assert m.on_reply(task, 0) == task_manager.FINISHED  # it finished before the cancel landed
    assert m.cancel(os.urandom(16)) is None


def test_a_lost_connection_retries_until_the_budget_is_spent():
    m = TaskManager()
    task = _task(retries=2)
    outcomes = []
    for _ in range(3):
        task.lease = object()
        outcomes.append(m.on_connection_lost(task))
        assert task.lease is None
    assert outcomes == [task_manager.RETRY, task_manager.RETRY, task_manager.FAILED]


def test_import_libclient_leaves_pyarrow_for_later():
    # pyarrow (via store_client) costs ~100 ms: importing libclient must not
    # pay it, so a worker registers with its raylet first, as before the split.
    import subprocess
    import sys

    code = "import sys, libclient; assert 'pyarrow' not in sys.modules, 'pyarrow imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]


# ---------------------------------------------------------------- lineage
def test_lineage_keeps_specs_within_a_bound_and_spends_retries_on_rebuilds():
    tm = TaskManager()
    tm.max_lineage_bytes = 3000
    tasks = [_task(retries=1) for _ in range(5)]
    for t in tasks:
        t.size = 1000
        tm.add(t)
    evicted = []
    for t in tasks:
        tm.done(t, "FINISHED")
        evicted += tm.keep(t, [])
    # Past 3000 bytes the oldest go until half the bound remains.
    assert [t.tid for t in evicted] == [t.tid for t in tasks[:3]]
    assert tm.lineage_bytes == 2000 and set(tm.lineage) == {t.tid for t in tasks[3:]}
    assert tm.resubmit(tasks[0].tid) == "evicted"
    assert tm.resubmit(os.urandom(16)) == "none"
    again = tm.resubmit(tasks[4].tid)
    assert again is tasks[4] and again.retries_left == 0 and tasks[4].tid in tm.pending
    tm.done(again, "FINISHED")
    tm.keep(again, [])
    assert tm.resubmit(tasks[4].tid) == "exhausted"  # its one retry went on the rebuild


def test_minus_one_retries_never_run_out():
    tm = TaskManager()
    t = _task(retries=-1)
    tm.add(t)
    assert tm.on_connection_lost(t) == task_manager.RETRY and t.retries_left == -1


def test_an_argument_held_only_by_lineage_frees_its_value_but_keeps_its_entry():
    from libclient.core.references import RELEASED

    t = ReferenceTable(NODE, PID, HERE)
    arg = _owned(t, buf=object())
    t.hold_for_lineage([arg])  # a kept spec names it
    assert t.release(collections.deque([arg]), {}) == [arg]  # the value goes ...
    assert t.owned[arg].state == RELEASED  # ... the entry stays, to be rebuilt
    assert t.dropped == []
    assert t.unhold_for_lineage([arg]) == []  # the spec went: so does the entry
    assert arg not in t.owned and t.dropped == [arg]


def test_a_lost_object_becomes_pending_again():
    t = ReferenceTable(NODE, PID, HERE)
    oid = _owned(t)
    t.owned[oid].loc = "10.0.0.9:1"
    entry = t.lost(oid)
    assert entry.state == PENDING and entry.loc == "" and entry.buf is None
    assert t.lost(os.urandom(20)) is None


# ------------------------------------------------------------ pipelining
def _lease():
    from libclient.core.task_submitter import Lease

    return Lease(1, b"w", 1, None, ("task",), [])


def _fn_task(fn):
    t = _task()
    t.msg["fn"] = fn
    return t


def test_tasks_queue_behind_a_running_one_only_if_it_is_known_to_be_short():
    from libclient.core.task_submitter import SchedulingClass

    cls = SchedulingClass(("task",), {"CPU": 1})
    lease = _lease()
    short, tiny, long_ = _fn_task(b"short"), _fn_task(b"tiny"), _fn_task(b"long")
    assert cls.room(lease, short)  # an idle worker takes anything
    lease.inflight[b"1"] = long_
    lease.slowest = float("inf")  # nothing known about its function yet
    assert not cls.room(lease, short)
    cls.fn_time.update({b"short": 0.01, b"tiny": 0.0001, b"long": 1.0})
    lease.slowest = 1.0
    assert not cls.room(lease, short)  # never behind a long task
    lease.slowest = 0.01
    assert cls.room(lease, short)  # one behind a 10 ms task hides the round trip
    lease.inflight[b"2"] = short
    assert not cls.room(lease, short)
    lease.inflight.clear()
    lease.inflight.update({bytes([i]): tiny for i in range(10)})
    lease.slowest = 0.0001
    assert cls.room(lease, tiny)  # 2 ms worth of 0.1 ms tasks
    lease.blocked = True
    assert not cls.room(lease, tiny)  # its task waits in get: maybe for this one
