"""Unit tests of the chain replica and the chain master, driven directly (no I/O, no sleeps).

Each test names the sentence of van Renesse & Schneider (OSDI'04) it checks,
in init / test / check form, as raft's paper tests do.
"""

from __future__ import annotations

import msgpack
import pytest

from daemons.gcsd.chain import (
    HEAD,
    IDLE,
    MIDDLE,
    SOLE,
    TAIL,
    Ack,
    CatchUp,
    ChainReplica,
    Config,
    Dropped,
    Entry,
    Forward,
    Incremental,
    Proposed,
    Resend,
    Send,
    ServeSync,
    Snapshot,
    SyncRequest,
    plan_catchup,
)
from daemons.gcsd.master import ChainMaster, Heartbeat, ShardReport, placement
from daemons.gcsd.tables import EncodedPut, Put, PutMany
from daemons.gcsd.wire import decode_chain, encode_chain
from libclient.protocol import ProtocolError

OP = (Put("kv", b"k", 1),)


def chain3(epoch: int = 1) -> tuple[ChainReplica, ChainReplica, ChainReplica]:
    reps = tuple(ChainReplica(0, m) for m in range(3))
    for r in reps:
        r.step(Config(0, epoch, (0, 1, 2)))
        r.advance(r.ready())
    return reps


def deliver(reps, rounds: int = 10) -> list:
    """Pass Send messages between replicas until quiet; return what left the chain."""
    out = []
    for _ in range(rounds):
        moved = False
        for r in reps:
            rd = r.ready()
            r.advance(rd)
            out.append(rd)
            for m in rd.messages:
                if isinstance(m, Send):
                    reps[m.dest].step(m.msg)
                    moved = True
        if not moved:
            break
    return out


def test_roles_follow_position_in_the_chain():
    h, m, t = chain3()
    assert (h.role, m.role, t.role) == (HEAD, MIDDLE, TAIL)
    solo = ChainReplica(0, 7)
    solo.step(Config(0, 1, (7,)))
    assert solo.role == SOLE and solo.readable


def test_update_goes_head_to_tail_and_reply_comes_from_commit():
    # §2: "update requests are directed to the head ... forwarded along the chain
    # ... the reply is sent by the tail". init: a chain of three.
    h, m, t = chain3()
    # test
    assert h.propose(OP, b"c", 1, {"ok": 1}) == Proposed(1)
    rd = h.ready()
    assert [e.seq for e in rd.persist] == [1] and not rd.committed  # not yet committed
    h.advance(rd)
    m.step(rd.messages[0].msg)
    rdm = m.ready()
    m.advance(rdm)
    t.step(next(x.msg for x in rdm.messages
               if isinstance(x, Send) and isinstance(x.msg, Forward)))
    rdt = t.ready()
    t.advance(rdt)
    # check: the tail publishes; acks flow back and the head may now answer
    assert [e.seq for e in rdt.publish] == [1] and t.committed == 1
    m.step(next(x.msg for x in rdt.messages
               if isinstance(x, Send) and isinstance(x.msg, Ack)))
    rdm = m.ready()
    m.advance(rdm)
    h.step(next(x.msg for x in rdm.messages
               if isinstance(x, Send) and isinstance(x.msg, Ack)))
    rdh = h.ready()
    assert [e.seq for e in rdh.committed] == [1] and not rdh.publish
    assert h.committed == m.committed == t.committed == 1


def _sends(rd, kind):
    return [x for x in rd.messages if isinstance(x, Send) and isinstance(x.msg, kind)]


def test_tail_answers_when_asked_and_acks_wait_for_the_ack_tick():
    # §2: the tail replies to the client. An entry tagged reply_to reaches
    # the tail's publish list (the shell answers from there) and nobody at
    # the head waits, so no Ack travels until the next tick.
    h, m, t = chain3()
    h.propose(OP, b"c", 1, {"ok": 1}, reply_to=b"c")
    rd = h.ready()
    h.advance(rd)
    m.step(_sends(rd, Forward)[0].msg)
    rdm = m.ready()
    m.advance(rdm)
    assert not _sends(rdm, Ack)
    t.step(_sends(rdm, Forward)[0].msg)
    rdt = t.ready()
    t.advance(rdt)
    assert [e.reply_to for e in rdt.publish] == [b"c"] and not _sends(rdt, Ack)
    acks, ticks = [], 0
    while not acks and ticks < t.ack_ticks:
        t.tick()
        ticks += 1
        rdt = t.ready()
        t.advance(rdt)
        acks = _sends(rdt, Ack)
    assert [(a.msg.applied, a.msg.committed) for a in acks] == [(1, 1)]


def test_an_entry_the_head_answers_makes_its_commit_ack_urgent():
    h, m, t = chain3()
    h.propose(OP, b"c", 1, {"ok": 1})  # no reply_to: the head answers
    rd = h.ready()
    h.advance(rd)
    m.step(_sends(rd, Forward)[0].msg)
    rdm = m.ready()
    m.advance(rdm)
    t.step(_sends(rdm, Forward)[0].msg)
    rdt = t.ready()
    t.advance(rdt)
    m.step(_sends(rdt, Ack)[0].msg)  # sent at once, no tick needed
    rdm = m.ready()
    m.advance(rdm)
    h.step(_sends(rdm, Ack)[0].msg)
    assert [e.seq for e in h.ready().committed] == [1]


def test_a_chain_of_one_never_tags_reply_to():
    solo = ChainReplica(0, 0)
    solo.step(Config(0, 1, (0,)))
    solo.advance(solo.ready())
    solo.propose(OP, b"c", 1, {}, reply_to=b"c")
    assert [e.reply_to for e in solo.ready().publish] == [b""]


def test_only_the_head_accepts_updates():
    h, m, t = chain3()
    for r in (m, t):
        before = (r.applied, r.committed)
        assert isinstance(r.propose(OP), Dropped)
        assert (r.applied, r.committed) == before and not r.ready().persist


def test_a_retried_request_id_is_recognised():
    h, m, t = chain3()
    h.propose(OP, b"client", 7, {"added": True})
    deliver((h, m, t))
    dup = h.duplicate(b"client", 7)
    assert dup is not None and dup.seq == 1 and dup.committed and dup.result == {"added": True}
    assert h.duplicate(b"client", 8) is None


def test_head_failure_successor_becomes_head():
    # §3: "the master ... informs the successor of the head that it is now the head".
    h, m, t = chain3()
    h.propose(OP)
    deliver((h, m, t))
    m.step(Config(0, 2, (1, 2)))
    assert m.role == HEAD and isinstance(m.propose(OP), Proposed)


def test_tail_failure_predecessor_commits_its_sent_list():
    # §3: "the master ... informs the predecessor of the tail that it is now the tail";
    # what it has applied (Sent) is now committed, and it publishes it.
    h, m, t = chain3()
    h.propose(OP)
    rd = h.ready()
    h.advance(rd)
    m.step(rd.messages[0].msg)
    m.advance(m.ready())  # the forward to t is lost with t
    assert m.committed == 0
    m.step(Config(0, 2, (0, 1)))
    rd = m.ready()
    assert m.role == TAIL and [e.seq for e in rd.publish] == [1]
    assert any(isinstance(x, Send) and isinstance(x.msg, Ack) for x in rd.messages)


def test_middle_failure_predecessor_resends_what_successor_lacks():
    # §3: "S- ... sends S+ the updates in Sent that S+ has not received".
    h, m, t = chain3()
    for _ in range(3):
        h.propose(OP)
    rd = h.ready()
    h.advance(rd)  # m dies before passing anything on
    h.step(Config(0, 2, (0, 2)))
    t.step(Config(0, 2, (0, 2)))
    h.advance(h.ready())
    rdt = t.ready()
    ack = next(x.msg for x in rdt.messages
               if isinstance(x, Send) and isinstance(x.msg, Ack))
    assert ack.applied == 0  # the successor reports how far it got
    h.step(ack)
    resend = [x for x in h.ready().messages if isinstance(x, Resend)]
    assert resend == [Resend(2, 2, 1, 3, 0)]


def test_a_new_tail_asks_for_the_commit_point_until_it_arrives():
    # A fresh chain with nothing written yet: the tail may serve reads only
    # once its predecessor has told it the commit point. If the one Forward
    # that carries it is lost, the tail's periodic Ack asks for it again.
    reps = tuple(ChainReplica(0, m, resend_ticks=4) for m in range(3))
    for r in reps:
        r.step(Config(0, 1, (0, 1, 2)))
    tail = reps[2]
    assert not tail.readable
    first = tail.ready()
    tail.advance(first)
    (ack,) = [m.msg for m in first.messages if isinstance(m, Send)]
    assert ack.need_floor and decode_chain(encode_chain(ack)).need_floor
    reps[1].step(ack)
    lost = reps[1].ready()
    reps[1].advance(lost)
    assert [m for m in lost.messages if isinstance(m, Resend) and m.dest == 2]  # dropped
    for _ in range(4):
        tail.tick()
    rd = tail.ready()
    tail.advance(rd)
    again = [m.msg for m in rd.messages if isinstance(m, Send)]
    assert again and again[0].need_floor
    reps[1].step(again[0])
    resend = [m for m in reps[1].ready().messages if isinstance(m, Resend) and m.dest == 2]
    assert resend
    tail.step(Forward(0, 1, 1, (), resend[0].committed))
    assert tail.readable
    rd = tail.ready()
    assert not any(isinstance(m, Send) and m.msg.need_floor for m in rd.messages)


def test_messages_from_another_epoch_change_nothing():
    # §3 (and Shoal's fencing): stale chain messages are dropped.
    h, m, t = chain3(epoch=5)
    before = (m.applied, m.committed, m.role)
    fwd = Forward(0, 4, 0, (), 0)
    for msg in (fwd, Ack(0, 4, 2, 0, 0), Ack(0, 6, 2, 0, 0), SyncRequest(0, 4, 2, 0, 0)):
        m.step(msg)
    rd = m.ready()
    assert (m.applied, m.committed, m.role) == before and not rd.persist and not rd.messages
    assert {n.event for n in rd.notices} == {"chain_stale_epoch"}


def test_config_from_an_older_epoch_is_ignored():
    h, m, t = chain3(epoch=3)
    m.step(Config(0, 2, (1,)))
    assert m.role == MIDDLE and m.epoch == 3


def test_illegal_transition_steps_out_of_the_chain():
    # Newcomers join at the tail, so a head can never be demoted to middle.
    h, m, t = chain3()
    h.step(Config(0, 2, (1, 0, 2)))
    rd = h.ready()
    assert h.role == IDLE and any(n.event == "chain_illegal_transition" for n in rd.notices)


def test_joiner_catches_up_from_the_tail_then_reports_ready():
    # §3 "extending a chain": the new replica gets the tail's state first.
    solo = ChainReplica(0, 0)
    solo.step(Config(0, 1, (0,)))
    for _ in range(5):
        solo.propose(OP)
    solo.advance(solo.ready())
    joiner = ChainReplica(0, 1, join_lag=0)
    joiner.step(Config(0, 1, (0,)))
    req = joiner.ready().messages[0]
    assert isinstance(req.msg, SyncRequest) and req.dest == 0
    solo.step(req.msg)
    serve = solo.ready().messages[0]
    assert isinstance(serve, ServeSync) and serve.applied == 0
    joiner.advance(joiner.ready())
    assert joiner.ready_epoch == 0
    joiner.step(CatchUp(0, 1, 0, (), 5))
    assert joiner.ready_epoch == 0  # still 5 behind
    # A newly appended tail is not readable until its predecessor tells it the floor.
    j2 = ChainReplica(0, 1)
    j2.step(Config(0, 2, (0, 1)))
    assert j2.role == TAIL and not j2.readable
    j2.step(Forward(0, 2, 0, (), 0))
    assert j2.readable


@pytest.mark.parametrize("applied, last_epoch, expect", [
    (0, 0, Snapshot()),          # log no longer starts at 1
    (120, 3, Incremental(121, 150)),
    (120, 2, Snapshot()),        # same seq, other epoch: a divergent suffix
    (160, 3, Snapshot()),        # ahead of the tail: an old head's writes
    (50, 1, Snapshot()),         # trimmed from the log
])
def test_plan_catchup(applied, last_epoch, expect):
    got = plan_catchup(applied, last_epoch, tail_applied=150, log_first=100,
                       epoch_at=lambda q: 3 if q >= 100 else None)
    assert got == expect


def test_an_op_writing_many_keys_takes_one_mark_per_key():
    h, m, t = chain3()
    many = PutMany("kv", (b"a", b"\x01", b"b", b"\x02", b"c", b"\x03"))
    h.propose((many,), b"c", 1, {})
    h.propose((Put("kv", b"d", 4),), b"c", 2, {})
    deliver((h, m, t))
    for r in (h, m, t):
        assert r.marks["kv"] == 4  # a, b, c took 1..3; d took 4
    fwd = Forward(0, 1, 0, (Entry(1, 1, (many,), marks=(1,)),))
    assert decode_chain(encode_chain(fwd)).entries[0].ops == (many,)


def test_wire_round_trip_and_rejects_junk():
    h, m, t = chain3()
    enc = (EncodedPut("kv", b"k", msgpack.packb(1)),)
    h.propose(enc, b"c", 1, {"ok": 1})
    fwd = h.ready().messages[0].msg
    assert decode_chain(encode_chain(fwd)) == fwd
    # A plain Put crosses the wire as the encoded form of its value.
    h.propose(OP, b"c", 2, {"ok": 1}, reply_to=b"c")
    tagged = decode_chain(encode_chain(h.ready().messages[-1].msg)).entries[0]
    assert tagged.reply_to == b"c" and tagged.ops == (EncodedPut("kv", b"k", msgpack.packb(1)),)

    def fwd_of(*entries):
        return {"t": "chain", "k": "fwd", "s": 0, "e": 1, "src": 0, "c": 0,
                "entries": [msgpack.packb(e) if not isinstance(e, bytes) else e
                            for e in entries]}

    for bad in ({"t": "chain"},
                fwd_of([1, 1, [["kv", b"k", 1]], b"", 0, None, [1], 5]),  # reply_to not bytes
                fwd_of([1]),
                fwd_of([1, 1, [["log", b"k", 1]], b"", 0, None, [1]]),  # a private table
                fwd_of([1, 1, [["kv", b"k", "x", 1]], b"", 0, None, [1]]),  # data not bytes
                fwd_of(b"\xc1 not msgpack"),
                fwd_of([1, 1, [["kv", [b"k"], 2]], b"", 0, None, [1]]),  # odd many-put list
                fwd_of([1, 1, [["kv", [b"", b"d"], 2]], b"", 0, None, [1]]),  # empty key
                fwd_of([1, 1, [["meta", [b"k", b"d"], 2]], b"", 0, None, [1]]),  # private
                {"t": "chain", "k": "fwd", "s": 0, "e": 1, "src": 0, "c": 0,
                 "entries": [[1, 1, [], b"", 0, None, []]]},  # not a blob
                {"t": "chain", "k": "ack", "s": -1, "e": 1, "src": 0, "a": 0, "c": 0}):
        with pytest.raises(ProtocolError):
            decode_chain(bad)


# ---------------------------------------------------------------- master
def test_placement_rotates_heads_over_members():
    assert placement(3, 4, 3) == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert placement(1, 4, 3) == [[0]] * 4


def beat(master: ChainMaster, m: int, inc: int = 1, **reports) -> None:
    master.step(Heartbeat(m, inc, {s: r for s, r in reports.items()}))


def test_master_removes_a_silent_member_and_raises_the_epoch():
    ms = ChainMaster(3, 2, 3, dead_ticks=3)
    for _ in range(3):
        ms.tick()
        beat(ms, 0)
        beat(ms, 1)
    ms.tick()
    assert ms.chain(0) == (2, (0, 1)) and ms.chain(1) == (2, (1, 0))
    assert ms.ready().state["epochs"] == [2, 2]


def test_master_appends_a_caught_up_joiner_as_tail_then_waits_for_it():
    ms = ChainMaster(3, 1, 3, dead_ticks=100)
    for m in range(3):
        beat(ms, m, inc=1)
    beat(ms, 2, inc=2)  # member 2 restarted: removed at once
    assert ms.chain(0) == (2, (0, 1))
    ms.step(Heartbeat(2, 2, {0: ShardReport(2, 0, 2)}))
    assert ms.chain(0) == (3, (0, 1, 2))
    # While 2 is provisional, the head is not removed from [.., 2]-style chains
    # where it alone holds commits; and a second join waits.
    ms.step(Heartbeat(2, 2, {0: ShardReport(3, 0, 0, caught_up=True)}))
    assert any(n.event == "master_join_complete" for n in ms.ready().notices)


def test_master_moves_heads_off_a_member_that_heads_too_many():
    # Member 0 restarted and rejoined every chain as the tail: 1 and 2 now
    # head all four shards between them (3 and 1). Rule 6 moves one head
    # per quiet period until no member heads two more than a successor.
    ms = ChainMaster(3, 4, 3, dead_ticks=1000, rebalance_ticks=5)
    for m in range(3):
        beat(ms, m, inc=1)
    ms._s.chains = [[1, 2, 0], [1, 2, 0], [2, 1, 0], [1, 2, 0]]
    for _ in range(5):
        ms.tick()
    heads = [c[0] for _s, _e, c in ms.configs()]
    assert sorted(heads) == [1, 1, 2, 2]  # one shard of 1's went to its successor 2
    moved = next(s for s, (_e, c) in enumerate(map(ms.chain, range(4))) if len(c) == 2)
    assert ms.chain(moved)[1] == (2, 0)
    ms.tick()  # nothing more while that chain is short
    assert sum(len(c) == 2 for _s, _e, c in ms.configs()) == 1
    epoch = ms.chain(moved)[0]
    ms.step(Heartbeat(1, 1, {moved: ShardReport(epoch, 0, epoch)}))  # 1 caught up
    assert ms.chain(moved)[1] == (2, 0, 1)
    ms.step(Heartbeat(1, 1, {moved: ShardReport(epoch + 1, 0, 0, caught_up=True)}))
    for _ in range(20):
        ms.tick()
    heads = [c[0] for _s, _e, c in ms.configs()]
    assert max(heads.count(m) for m in range(3)) - min(heads.count(m) for m in range(3)) <= 1


def test_master_removes_a_suspected_member_that_does_not_beat_in_time():
    # Rule 1, fast path: member 0 reports its connection to 2 dropped.
    ms = ChainMaster(3, 1, 3, dead_ticks=100, suspect_ticks=2)
    for m in range(3):
        beat(ms, m)
    ms.suspect(2, by=0)
    ms.tick()
    assert 2 in ms.chain(0)[1]  # not yet: it may still beat
    ms.tick()
    assert ms.chain(0)[1] == (0, 1)
    assert any(n.fields.get("reason") == "connection_lost" for n in ms.ready().notices)


def test_a_heartbeat_clears_a_suspicion():
    ms = ChainMaster(3, 1, 3, dead_ticks=100, suspect_ticks=2)
    for m in range(3):
        beat(ms, m)
    ms.suspect(2, by=0)
    ms.tick()
    beat(ms, 2)  # alive after all (a connection blip)
    for _ in range(5):
        ms.tick()
    assert ms.chain(0)[1] == (0, 1, 2)
    # Reports are ignored when suspicion is off, and about oneself.
    off = ChainMaster(3, 1, 3, dead_ticks=100)
    off.suspect(2, by=0)
    ms.suspect(1, by=1)
    for _ in range(5):
        off.tick()
        ms.tick()
    assert off.chain(0)[1] == (0, 1, 2) and 1 in ms.chain(0)[1]


def test_master_does_not_rebalance_unless_asked():
    ms = ChainMaster(3, 4, 3, dead_ticks=1000)
    ms._s.chains = [[1, 2, 0], [1, 2, 0], [2, 1, 0], [1, 2, 0]]
    for _ in range(50):
        for m in range(3):
            beat(ms, m, inc=1)
        ms.tick()
    assert [c for _s, _e, c in ms.configs()] == [[1, 2, 0], [1, 2, 0], [2, 1, 0], [1, 2, 0]]


def test_master_never_removes_the_last_replica_and_fences_its_restart():
    ms = ChainMaster(1, 1, 1, dead_ticks=2)
    beat(ms, 0, inc=1)
    for _ in range(5):
        ms.tick()
    assert ms.chain(0) == (1, (0,))
    beat(ms, 0, inc=2)
    assert ms.chain(0) == (2, (0,))


def test_master_state_survives_a_restart():
    ms = ChainMaster(3, 2, 3, dead_ticks=1)
    ms.tick()
    ms.tick()
    state = ms.ready().state
    again = ChainMaster(3, 2, 3, dead_ticks=1, state=state)
    assert again.configs() == ms.configs()
    with pytest.raises(ValueError):
        ChainMaster(3, 5, 3, dead_ticks=1, state=state)


def test_master_waits_longer_for_a_member_it_never_heard_from_on_first_start():
    ms = ChainMaster(3, 3, 3, dead_ticks=2, bootstrap_ticks=10)
    for _ in range(5):  # members 0 and 1 are up; 2 boots slowly
        ms.tick()
        for m in (0, 1):
            ms.step(Heartbeat(m, 1, {}))
    assert [c for _s, _e, c in ms.configs()] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    for _ in range(6):
        ms.tick()
        for m in (0, 1):
            ms.step(Heartbeat(m, 1, {}))
    assert all(2 not in c for _s, _e, c in ms.configs())  # it never came: removed
    # Once heard from, a member gets only dead_ticks.
    again = ChainMaster(3, 1, 3, dead_ticks=2, bootstrap_ticks=10)
    again.step(Heartbeat(2, 1, {}))
    for _ in range(3):
        again.tick()
        for m in (0, 1):
            again.step(Heartbeat(m, 1, {}))
    assert again.configs()[0][2] == [0, 1]
