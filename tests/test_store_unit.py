"""stored's pure cores, driven directly: allocator, LRU policy, object table, messages.

No processes, sockets or clocks: time is a number passed in.
"""

import pytest

from daemons.stored import messages
from daemons.stored.allocator import ALIGN, Allocation, Allocator
from daemons.stored.eviction import LruPolicy
from daemons.stored.messages import (
    Abort,
    Contains,
    Create,
    Delete,
    Free,
    Get,
    Hello,
    Release,
    Seal,
    Stats,
)
from daemons.stored.store import ObjectTable
from libclient.protocol import ProtocolError

# ---------------------------------------------------------------- allocator


def test_allocator_worked_example_from_docstring():
    a = Allocator(1024)
    x = a.allocate(100)
    y = a.allocate(64)
    z = a.allocate(200)
    assert (x, y, z) == (Allocation(0, 128), Allocation(128, 64), Allocation(192, 256))
    assert a.holes == [(448, 576)]
    a.free(x)
    assert a.holes == [(0, 128), (448, 576)]
    w = a.allocate(50)
    assert w == Allocation(0, 64)
    assert a.holes == [(64, 64), (448, 576)]
    a.free(z)
    assert a.holes == [(64, 64), (192, 832)]
    a.free(y)
    assert a.holes == [(64, 960)]
    assert a.allocate(1000) is None
    assert a.allocated == 64 and a.free_bytes == 960


def test_allocator_reuses_lowest_freed_range_first():
    a = Allocator(10 * ALIGN)
    blocks = [a.allocate(ALIGN) for _ in range(6)]
    a.free(blocks[4])
    a.free(blocks[1])
    # Lowest address wins even though fresh space lies beyond block 5.
    assert a.allocate(ALIGN).offset == blocks[1].offset
    assert a.allocate(ALIGN).offset == blocks[4].offset
    assert a.allocate(ALIGN).offset == 6 * ALIGN


def test_allocator_full_is_a_normal_return_and_frees_restore_everything():
    a = Allocator(4096)
    allocs = [a.allocate(1000) for _ in range(4)]
    assert all(allocs) and a.allocate(1) is None
    for al in reversed(allocs):
        a.free(al)
    assert a.allocated == 0 and a.holes == [(0, 4096)]


def test_allocator_zero_size_and_alignment():
    a = Allocator(1000)  # rounded down to 960
    assert a.limit == 960
    z = a.allocate(0)
    assert z.size == ALIGN and z.offset % ALIGN == 0
    assert a.allocate(65).size == 128


def test_allocator_double_free_raises_and_leaves_state():
    a = Allocator(1024)
    x = a.allocate(64)
    a.free(x)
    before = (a.holes, a.allocated)
    with pytest.raises(ValueError):
        a.free(x)
    with pytest.raises(ValueError):
        a.free(Allocation(512, 64))
    assert (a.holes, a.allocated) == before


# ---------------------------------------------------------------- eviction policy


def test_lru_chooses_oldest_until_covered():
    p = LruPolicy()
    for name, size in [(b"a", 100), (b"b", 200), (b"c", 300)]:
        p.add(name, size)
    c = p.choose(250)
    assert c.oids == [b"a", b"b"] and c.short == 0
    p.add(b"a", 100)  # re-used: now newest
    assert p.choose(250).oids == [b"b", b"c"]
    c = p.choose(10_000)
    assert c.oids == [b"b", b"c", b"a"] and c.short == 10_000 - 600
    assert p.choose(0).oids == []
    p.remove(b"b")
    p.remove(b"zz")  # absent: no-op
    assert p.evictable_bytes == 400 and len(p) == 2


# ---------------------------------------------------------------- object table

A, B, C = 1, 2, 3
OID1, OID2, OID3 = b"o1", b"o2", b"o3"


def _table(capacity=4096):
    t = ObjectTable(capacity)
    for c in (A, B, C):
        t.connect(c)
    return t


def _ok(replies, client=None):
    assert len(replies) == 1, replies
    (rep,) = replies
    assert rep.msg["ok"], rep.msg
    if client is not None:
        assert rep.client == client
    return rep.msg


def _err(replies):
    (rep,) = replies
    assert rep.msg["ok"] is False
    return rep.msg["error"]


def _put(t, client, oid, size, release=True):
    off = _ok(t.step(client, Create(1, oid, size), 0.0))["offset"]
    _ok(t.step(client, Seal(2, oid), 0.0))
    if release:
        t.step(client, Release((oid,)), 0.0)
    return off


def test_hello_asks_for_the_arena_fd():
    t = _table()
    (rep,) = t.step(A, Hello(7, 123, "x"), 0.0)
    assert rep.arena_fd and rep.msg == {"r": 7, "ok": True, "capacity": 4096, "arena_size": 4096}


def test_create_seal_get_release_cycle_and_pins():
    t = _table()
    off = _ok(t.step(A, Create(1, OID1, 100), 0.0))["offset"]
    assert t.stats()["pinned_bytes"] == 128
    # Unsealed objects are invisible.
    assert _ok(t.step(B, Get(2, (OID1,), 0), 0.0))["objs"] == [None]
    assert _ok(t.step(B, Contains(3, (OID1,)), 0.0))["present"] == [False]
    _ok(t.step(A, Seal(4, OID1), 0.0))
    assert _ok(t.step(B, Get(5, (OID1,), 0), 0.0))["objs"] == [[off, 100]]
    t.step(A, Release((OID1,)), 0.0)  # creator's pin
    # B still pins it: delete refuses, eviction cannot pick it.
    assert _ok(t.step(C, Delete(6, (OID1,)), 0.0))["deleted"] == 0
    assert OID1 not in t.policy
    t.step(B, Release((OID1,)), 0.0)
    assert t.stats()["pinned_bytes"] == 0 and OID1 in t.policy
    assert _ok(t.step(C, Delete(7, (OID1,)), 0.0))["deleted"] == 1
    assert t.stats()["num_objects"] == 0 and t.stats()["used"] == 0


def test_free_after_release_reuses_the_same_memory():
    t = _table()
    off = _put(t, A, OID1, 1000, release=False)
    assert t.step(A, Free((OID1,)), 0.0) == []  # still pinned: stays
    assert t.stats()["num_objects"] == 1
    t.step(A, Release((OID1,)), 0.0)
    t.step(A, Free((OID1,)), 0.0)
    assert t.stats()["num_objects"] == 0
    # The next object lands on the freed (already faulted-in) range.
    assert _ok(t.step(B, Create(3, OID2, 1000), 0.0))["offset"] == off
    assert messages.parse({"t": "free", "oids": [OID2]}) == Free((OID2,))


def test_release_by_another_client_does_not_drop_my_pin():
    t = _table()
    _put(t, A, OID1, 10)
    _ok(t.step(B, Get(1, (OID1,), 0), 0.0))
    events_before = t.take_events()
    t.step(C, Release((OID1,)), 0.0)  # C holds no pin: ignored, reported
    assert [e for e, _ in t.take_events()] == ["bad_release"]
    assert not events_before
    assert _ok(t.step(C, Delete(2, (OID1,)), 0.0))["deleted"] == 0


def test_duplicate_create_is_refused_and_leaves_state():
    t = _table()
    _put(t, A, OID1, 10)
    before = t.stats()
    assert _err(t.step(B, Create(2, OID1, 10), 0.0)) == "exists"
    assert t.stats() == before


def test_seal_and_abort_errors():
    t = _table()
    assert _err(t.step(A, Seal(1, OID1), 0.0)) == "not_found"
    _ok(t.step(A, Create(2, OID1, 10), 0.0))
    assert _err(t.step(B, Seal(3, OID1), 0.0)) == "not_creator"
    assert _err(t.step(B, Abort(4, OID1), 0.0)) == "not_creator"
    _ok(t.step(A, Seal(5, OID1), 0.0))
    assert _err(t.step(A, Seal(6, OID1), 0.0)) == "sealed"
    assert _err(t.step(A, Abort(7, OID1), 0.0)) == "sealed"


def test_abort_frees_unsealed_object():
    t = _table()
    _ok(t.step(A, Create(1, OID1, 1000), 0.0))
    _ok(t.step(A, Abort(2, OID1), 0.0))
    assert t.stats() == {"capacity": 4096, "used": 0, "pinned_bytes": 0, "num_objects": 0,
                         "num_evictions": 0}
    _ok(t.step(A, Create(3, OID1, 10), 0.0))  # the id is free again


def test_zero_size_object():
    t = _table()
    _put(t, A, OID1, 0)
    (obj,) = _ok(t.step(B, Get(1, (OID1,), 0), 0.0))["objs"]
    assert obj[1] == 0


def test_get_waits_for_seal_and_wakes_only_when_all_present():
    t = _table()
    assert t.step(B, Get(9, (OID1, OID2), -1), 0.0) == []
    assert t.pending_gets == 1 and t.next_deadline() is None
    _ok(t.step(A, Create(1, OID1, 10), 1.0))
    _ok(t.step(A, Create(2, OID2, 10), 1.0))
    assert len(t.step(A, Seal(3, OID1), 1.0)) == 1  # only A's seal reply
    replies = t.step(A, Seal(4, OID2), 2.0)
    assert [r.client for r in replies] == [A, B]
    msg = replies[1].msg
    assert msg["r"] == 9 and all(o is not None for o in msg["objs"])
    assert t.pending_gets == 0
    t.step(B, Release((OID1, OID2)), 2.0)
    t.step(A, Release((OID1, OID2)), 2.0)
    assert t.stats()["pinned_bytes"] == 0


def test_get_deadline_returns_partial_results_and_pins_only_those():
    t = _table()
    _put(t, A, OID1, 10)
    assert t.step(B, Get(5, (OID1, OID2), 250), 10.0) == []
    assert t.next_deadline() == pytest.approx(10.25)
    assert t.tick(10.2) == []
    (rep,) = t.tick(10.25)
    assert rep.client == B and rep.msg["objs"][1] is None and rep.msg["objs"][0] is not None
    assert t.stats()["pinned_bytes"] == 64
    assert t.next_deadline() is None
    # A seal after the deadline wakes nobody.
    _put(t, A, OID2, 10)
    assert t.tick(100.0) == []


def test_eviction_is_lru_and_skips_pinned():
    t = _table(capacity=4 * 1024)
    _put(t, A, OID1, 1024)
    _put(t, A, OID2, 1024)
    _put(t, A, OID3, 1024)
    _ok(t.step(B, Get(1, (OID1,), 0), 0.0))   # OID1 pinned by B
    # Use OID2 again so OID3 is now least recently used among unpinned ones.
    _ok(t.step(C, Get(2, (OID2,), 0), 0.0))
    t.step(C, Release((OID2,)), 0.0)
    _ok(t.step(A, Create(3, b"big", 2048), 0.0))
    assert t.stats()["num_evictions"] == 1
    present = _ok(t.step(C, Contains(4, (OID1, OID2, OID3)), 0.0))["present"]
    assert present == [True, True, False]
    assert [e for e, _ in t.take_events()] == ["evicted"]


def test_full_when_pinned_and_nothing_evicted():
    t = _table(capacity=4096)
    _put(t, A, OID1, 2048, release=False)  # still pinned by its creator
    _put(t, A, OID2, 1024)                 # evictable
    before = t.stats()
    rep = t.step(B, Create(1, b"big", 3072), 0.0)[0].msg
    assert rep["error"] == "full"
    assert "needs 3072 bytes" in rep["msg"] and "capacity 4096" in rep["msg"]
    assert t.stats() == before  # no pointless eviction
    assert _err(t.step(B, Create(2, b"huge", 1 << 40), 0.0)) == "full"


def test_eviction_handles_fragmentation():
    t = _table(capacity=4 * 1024)
    _put(t, A, b"a", 1024)
    _put(t, A, b"b", 1024, release=False)
    _put(t, A, b"c", 1024)
    _put(t, A, b"d", 1024, release=False)
    # 2048 evictable bytes, but a and c are not adjacent: full, and nothing is
    # evicted for nothing.
    before = t.stats()
    assert _err(t.step(B, Create(1, b"x", 2048), 0.0)) == "full"
    assert t.stats() == before
    t.step(A, Release((b"b",)), 0.0)
    _ok(t.step(B, Create(2, b"x", 2048), 0.0))
    # Strict LRU order: a and c first (still no 2048 hole), then b.
    assert t.stats()["num_evictions"] == 3


def test_disconnect_drops_pins_aborts_unsealed_and_cancels_gets():
    t = _table()
    _put(t, A, OID1, 10)
    _ok(t.step(B, Get(1, (OID1,), 0), 0.0))
    _ok(t.step(B, Get(2, (OID1,), 0), 0.0))
    _ok(t.step(B, Create(3, OID2, 100), 0.0))
    assert t.step(B, Get(4, (OID3,), 5000), 0.0) == []
    dropped = t.disconnect(B)
    assert (dropped.pins, dropped.aborted, dropped.gets) == (3, 1, 1)
    assert t.stats()["pinned_bytes"] == 0 and t.stats()["num_objects"] == 1
    assert t.pending_gets == 0 and t.next_deadline() is None
    # Sealing OID3 later sends nothing to the vanished client.
    _ok(t.step(A, Create(5, OID3, 1), 0.0))
    assert [r.client for r in t.step(A, Seal(6, OID3), 0.0)] == [A]
    assert t.tick(1e9) == []


def test_disconnect_keeps_sealed_objects_of_the_client():
    t = _table()
    _put(t, B, OID1, 10, release=False)
    t.disconnect(B)
    assert _ok(t.step(A, Contains(1, (OID1,)), 0.0))["present"] == [True]
    assert OID1 in t.policy


def test_stats_reply():
    t = _table()
    msg = _ok(t.step(A, Stats(3), 0.0))
    assert msg == {"r": 3, "ok": True, "capacity": 4096, "used": 0, "pinned_bytes": 0,
                   "num_objects": 0, "num_evictions": 0}


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize("msg", [
    {"t": "nope", "r": 1},
    {"t": "create", "r": 1, "oid": "text", "size": 1},
    {"t": "create", "r": 1, "oid": b"x", "size": -1},
    {"t": "create", "r": 1, "oid": b"x", "size": True},
    {"t": "create", "r": 1, "oid": b"", "size": 1},
    {"t": "create", "r": 1, "oid": b"x" * 65, "size": 1},
    {"t": "create", "oid": b"x", "size": 1},
    {"t": "get", "r": 1, "oids": b"x", "timeout_ms": 0},
    {"t": "get", "r": 1, "oids": [b"x", 3], "timeout_ms": 0},
    {"t": "get", "r": 1, "oids": [b"x"], "timeout_ms": -2},
    {"t": "get", "r": 1, "oids": [b"x"], "timeout_ms": 1.5},
    {"t": "release", "oids": None},
    {"t": "hello", "r": 1, "pid": "1"},
    {"t": "stats", "r": "1"},
])
def test_parse_rejects_malformed(msg):
    with pytest.raises(ProtocolError):
        messages.parse(msg)


def test_parse_accepts_each_type():
    assert messages.parse({"t": "hello", "r": 1, "pid": 5, "name": "n"}) == Hello(1, 5, "n")
    assert messages.parse({"t": "get", "r": 2, "oids": [b"a"], "timeout_ms": -1}) == \
        Get(2, (b"a",), -1)
    assert messages.parse({"t": "release", "oids": [b"a", b"a"]}) == Release((b"a", b"a"))
    assert messages.parse({"t": "abort", "r": 3, "oid": b"a"}) == Abort(3, b"a")
    assert messages.request_id({"r": 4}) == 4
    assert messages.request_id({"r": True}) is None
    assert messages.request_id([1]) is None
