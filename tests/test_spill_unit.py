"""Spilling, driven without processes: the pure SpillPolicy and the ObjectTable's
spill states (holds, SPILLED, RESTORING), with the shell's I/O played by hand."""

import pytest

from daemons.stored import messages
from daemons.stored.messages import Contains, Create, Delete, Free, Get, Release, Seal, Unhold
from daemons.stored.spill import SpillPolicy
from daemons.stored.store import SEALED, SPILLED, ObjectTable, SpillDelete, SpillOut, SpillRead

# ---------------------------------------------------------------- policy


def test_plan_fuses_small_objects_into_few_files():
    policy = SpillPolicy(fuse_bytes=1000, max_file_objects=100)
    cands = [(bytes([i]), 100, False) for i in range(50)]
    plan = policy.plan(cands, need=250)
    # 250 bytes were needed, but the file is filled up to fuse_bytes.
    assert len(plan.writes) == 1
    (w,) = plan.writes
    assert len(w.objects) == 10 and w.nbytes == 1000
    assert [off for _, off, _ in w.objects] == list(range(0, 1000, 100))
    assert policy.disk_bytes == 1000
    # Not readable until written.
    assert policy.location(bytes([0])) is None
    policy.written(w)
    assert policy.location(bytes([3])) == (w.file_id, 300, 100)


def test_plan_splits_by_object_count_and_takes_lru_order():
    policy = SpillPolicy(fuse_bytes=10**9, max_file_objects=3)
    cands = [(bytes([i]), 10, False) for i in range(7)]
    plan = policy.plan(cands, need=70)
    assert [len(w.objects) for w in plan.writes] == [3, 3, 1]
    assert [oid for w in plan.writes for oid, _, _ in w.objects] == [bytes([i]) for i in range(7)]


def test_plan_drops_disk_copies_first_without_writing():
    policy = SpillPolicy(fuse_bytes=100)
    plan = policy.plan([(b"a", 50, True), (b"b", 50, True), (b"c", 50, False)], need=80)
    assert plan.drop == [b"a", b"b"] and plan.writes == []


def test_plan_respects_disk_room():
    policy = SpillPolicy(fuse_bytes=1000, disk_room=250)
    plan = policy.plan([(b"a", 200, False), (b"b", 100, False), (b"c", 50, False)], need=1000)
    (w,) = plan.writes
    assert [oid for oid, _, _ in w.objects] == [b"a", b"c"]  # b does not fit any more
    assert policy.plan([(b"d", 1, False)], need=1).empty  # room used up


def test_file_is_deleted_when_its_last_object_goes_and_failures_forget_it():
    policy = SpillPolicy(fuse_bytes=10)
    (w,) = policy.plan([(b"a", 5, False), (b"b", 5, False)], need=10).writes
    policy.written(w)
    assert policy.forget(b"a") is None
    assert policy.forget(b"b") == w.file_id
    assert policy.disk_bytes == 0 and policy.num_files == 0
    (w2,) = policy.plan([(b"c", 5, False)], need=5).writes
    policy.failed(w2)
    assert policy.disk_bytes == 0 and policy.location(b"c") is None
    assert policy.forget(b"zzz") is None


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        SpillPolicy(fuse_bytes=0)


# ---------------------------------------------------------------- table


def _table(capacity=1024, fuse=64):
    t = ObjectTable(capacity, spill=SpillPolicy(fuse_bytes=fuse))
    for c in (1, 2):
        t.connect(c)
    return t


def _put_held(t, client, oid, size=256):
    """Create, seal with a hold, drop the pin: what an owner's put leaves behind."""
    (r,) = t.step(client, Create(1, oid, size, True), 0)
    assert r.msg["ok"], r.msg
    t.step(client, Seal(2, oid, hold=True), 0)
    t.step(client, Release((oid,)), 0)
    return r.msg["offset"]


def _do_io(t, arena=None, fail=False):
    """Play the shell: complete every I/O action, return the replies."""
    out = []
    for act in t.take_io():
        if isinstance(act, SpillOut):
            out += t.spill_done(act.file_id, not fail)
        elif isinstance(act, SpillRead):
            out += t.restore_done(act.oid, not fail)
    return out


def test_held_objects_spill_instead_of_full_and_come_back_on_get():
    t = _table()
    for i in range(4):
        _put_held(t, 1, bytes([i]))
    assert t.stats()["spillable_bytes"] == 1024
    # The arena is full of held objects: the create waits for a spill.
    assert t.step(2, Create(5, b"new", 256, True), 0) == []
    (write,) = t.take_io()
    assert isinstance(write, SpillOut)
    assert write.ranges == ((0, 256),)  # LRU first: object 0, at arena offset 0
    (reply,) = t.spill_done(write.file_id, True)
    assert reply.client == 2 and reply.msg["ok"] and reply.msg["offset"] == 0
    assert t.lookup(b"\x00") == (SEALED, 256)  # still here, only not in memory
    assert t.step(1, Contains(3, (b"\x00",)), 0)[0].msg["present"] == [True]
    st = t.stats()
    assert st["spilled_objects"] == 1 and st["spill_files"] == 1
    # Get with timeout 0 waits for the restore (it needs room: spills another).
    t.step(2, Seal(6, b"new", hold=True), 0)
    t.step(2, Release((b"new",)), 0)
    assert t.step(1, Get(7, (b"\x00",), 0), 0) == []
    assert t.take_io() == []
    assert t.tick(0) == []  # the restore waits for room: tick starts a spill
    (write2,) = t.take_io()
    replies = t.spill_done(write2.file_id, True)
    assert replies == []
    (read,) = t.take_io()
    assert isinstance(read, SpillRead) and read.size == 256
    (got,) = t.restore_done(b"\x00", True)
    assert got.client == 1 and got.msg["objs"] == [[read.offset, 256]]
    assert t.stats()["restored_objects"] == 1


def test_restored_object_spills_again_without_a_write():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(2, Create(1, b"c", 256, True), 0)
    _do_io(t)  # a spilled
    t.step(2, Seal(2, b"c", hold=True), 0)
    t.step(2, Release((b"c",)), 0)
    t.step(1, Get(3, (b"a",), 0), 0)
    t.tick(0)  # b spills to make room for a
    _do_io(t)
    (got,) = _do_io(t)
    assert got.msg["objs"][0] is not None
    t.step(1, Release((b"a",)), 0)  # a is now held, unpinned, with a disk copy
    t.step(1, Unhold((b"c",)), 0)
    t.step(1, Get(4, (b"c",), 0), 0)  # c pinned: a is the only candidate
    writes = t.stats()["spilled_bytes"]
    assert t.step(2, Create(5, b"d", 256, True), 0) == []
    assert t.take_io() == []  # a's memory is dropped without writing it again
    (r,) = t.tick(0)
    assert r.msg["ok"] and t._objects[b"a"].state == SPILLED
    assert t.stats()["spilled_bytes"] == writes + 256 and t.stats()["spill_files"] == 2


def test_pins_block_spilling_and_full_remains_when_nothing_can_move():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    t.step(1, Get(1, (b"a",), 0), 0)  # a read pin: a user value maps it
    (r,) = t.step(2, Create(2, b"b", 512, True), 0)
    assert r.msg["error"] == "full"
    assert t.take_io() == []


def test_spilling_off_gives_full_at_once():
    t = ObjectTable(512)
    t.connect(1)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    (r,) = t.step(1, Create(3, b"c", 256, True), 0)
    # Held objects are kept in memory (never evicted) when they cannot spill.
    assert r.msg["error"] == "full" and "spilling is off" in r.msg["msg"]
    t.step(1, Unhold((b"a",)), 0)
    (r,) = t.step(1, Create(4, b"c", 256, True), 0)
    assert r.msg["ok"] and t.lookup(b"a") is None


def test_unheld_objects_are_evicted_not_spilled():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(1, Unhold((b"a",)), 0)  # a is only cache now
    (r,) = t.step(2, Create(3, b"c", 256, True), 0)
    assert r.msg["ok"] and t.take_io() == []
    assert t.lookup(b"a") is None and t.num_evictions == 1


def test_pin_taken_while_writing_keeps_the_object_in_memory():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(2, Create(3, b"c", 256, True), 0)
    (write,) = t.take_io()
    (got,) = t.step(1, Get(4, (b"a",), 0), 0)  # a is still readable in memory
    assert got.msg["objs"][0] is not None
    replies = t.spill_done(write.file_id, True)
    # a stayed (pinned); the create is served by spilling b next.
    assert replies == [] and t.lookup(b"a") == (SEALED, 256)
    assert t._objects[b"a"].state == SEALED and t._objects[b"a"].on_disk
    _do_io(t)
    assert t._objects[b"b"].state == SPILLED


def test_free_during_write_and_file_deletion():
    t = _table(capacity=512, fuse=512)
    _put_held(t, 1, b"a", 128)
    _put_held(t, 1, b"b", 128)
    _put_held(t, 1, b"c", 256)
    t.step(2, Create(3, b"d", 512, True), 0)
    (write,) = t.take_io()
    assert len(write.ranges) == 3
    t.step(1, Free((b"a",)), 0)  # busy: freed when the write ends
    assert t.lookup(b"a") is not None
    (r,) = t.spill_done(write.file_id, True)
    assert r.msg["ok"]
    assert t.lookup(b"a") is None and t.take_io() == []
    t.step(1, Free((b"b",)), 0)
    assert t.take_io() == []
    t.step(1, Unhold((b"c",)), 0)  # the last live object: SPILLED and unheld goes
    assert t.take_io() == [SpillDelete(write.file_id)]
    assert t.stats()["spill_files"] == 0 and t.stats()["num_objects"] == 1


def test_failed_write_keeps_objects_and_answers_full():
    t = _table(capacity=512, fuse=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(2, Create(3, b"c", 512, True), 0)
    (r,) = _do_io(t, fail=True)
    assert r.msg["error"] == "full" and t.stats()["spill_failures"] == 1
    assert t.lookup(b"a") == (SEALED, 256) and t._objects[b"a"].state == SEALED


def test_get_deadline_waits_for_restore_and_missing_ones_time_out():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(2, Create(3, b"c", 256, True), 0)
    _do_io(t)
    assert t._objects[b"a"].state == SPILLED
    assert t.step(1, Get(4, (b"a", b"nope"), 100), 0) == []
    assert t.tick(1.0) == []  # deadline passed, but a restore is in flight
    (r,) = _do_io(t) or _do_io(t)
    assert r.msg["objs"][0] is not None and r.msg["objs"][1] is None


def test_disconnect_drops_holds_and_waiting_creates():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(2, Create(3, b"c", 512, True), 0)
    t.disconnect(2)
    assert _do_io(t) == []
    t.disconnect(1)  # a and b lose their holds: spilled ones go, the rest is cache
    assert t.stats()["spillable_bytes"] == 0


def test_delete_of_spilled_object():
    t = _table(capacity=512)
    _put_held(t, 1, b"a")
    _put_held(t, 1, b"b")
    t.step(2, Create(3, b"c", 256, True), 0)
    _do_io(t)
    (r,) = t.step(1, Delete(4, (b"a",)), 0)
    assert r.msg["deleted"] == 1
    assert [type(x) for x in t.take_io()] == [SpillDelete]


def test_messages_parse_hold_flags_and_unhold():
    assert messages.parse({"t": "seal", "r": 1, "oid": b"x", "hold": True}).hold
    assert not messages.parse({"t": "seal", "r": 1, "oid": b"x"}).hold
    assert messages.parse({"t": "get", "r": 1, "oids": [b"x"], "timeout_ms": 0,
                           "hold": True}).hold
    assert messages.parse({"t": "unhold", "oids": [b"x"]}) == Unhold((b"x",))
    assert messages.parse({"t": "create", "r": 1, "oid": b"x", "size": 3}).wait
    with pytest.raises(messages.ProtocolError):
        messages.parse({"t": "seal", "r": 1, "oid": b"x", "hold": 1})


def test_handoff_hold_passes_to_the_owner():
    t = _table(capacity=512)
    t.step(2, Create(1, b"ret", 256, True), 0)  # client 2: the worker
    t.step(2, Seal(2, b"ret", hold=True, handoff=True), 0)
    t.step(2, Release((b"ret",)), 0)
    assert t.stats()["spillable_bytes"] == 256  # held by the worker meanwhile
    t.step(1, Get(3, (b"ret",), 0, hold=True), 0)  # the owner holds it
    t.step(1, Release((b"ret",)), 0)
    assert t._objects[b"ret"].holds == {1: 1}
    t.disconnect(2)  # the worker going changes nothing
    t.step(1, Unhold((b"ret",)), 0)
    assert t.stats()["spillable_bytes"] == 0 and t.policy.evictable_bytes == 256


def test_spill_for_a_waiting_pull_starts_only_what_is_missing():
    t = _table(capacity=1024)
    for i in range(4):
        _put_held(t, 1, bytes([i]))
    assert t.room == 0
    t.spill_for(512)
    io = t.take_io()
    assert sum(w.nbytes for w in io) == 512
    t.spill_for(512)  # the writes in flight cover it: nothing more
    assert t.take_io() == []
    for w in io:
        t.spill_done(w.file_id, True)
    assert t.room == 512
