"""stored's transfer cores, driven directly: the pull manager, the TCP reply reader, parsing.

No processes, sockets or clocks: the shell's part is played by the test,
time is a number passed in.
"""

import struct

import msgpack
import pytest

from daemons.stored import messages, transfer
from daemons.stored.messages import Abort, Create, Delete, Release, Seal
from daemons.stored.pull import (
    CREATING,
    LOCAL,
    LOCATING,
    RECEIVING,
    WAITING,
    AbortLocal,
    CancelAttempt,
    CreateLocal,
    PullManager,
    SealLocal,
    SendRead,
    SendStat,
    WatchLocal,
)
from daemons.stored.store import ObjectTable, Reply
from libclient.protocol import ProtocolError, pack

OID = b"obj"
A, B, C = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"
MB = 1 << 20


def _pm(capacity=64 * MB, chunk=MB, window=2, stall=5.0):
    return PullManager(capacity, chunk=chunk, window=window, stall_timeout=stall)


def _only(actions, kind):
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def _replies(actions):
    return {a.client: a.msg for a in actions if isinstance(a, Reply)}


def _to_receiving(pm, size, client=1, sources=(A, B), now=0.0):
    """request -> stat ok -> admitted -> created; returns the reads asked for."""
    pm.request(client, 10 + client, OID, list(sources), None, now)
    stat = _only(pm.take_actions(), SendStat)
    pm.stat_done(OID, stat.tag, size, now)
    assert pm.state(OID) == WAITING and pm.take_actions() == []
    pm.admit(1 << 40)
    assert _only(pm.take_actions(), CreateLocal) == CreateLocal(OID, size)
    pm.created(OID, True, now)
    return pm.take_actions()


# ---------------------------------------------------------------- the happy path


def test_pull_stats_then_reads_a_window_of_chunks_then_seals():
    pm = _pm()
    reads = _to_receiving(pm, 3 * MB + 5)
    assert reads == [SendRead(OID, A, reads[0].tag, 0, MB), SendRead(OID, A, reads[0].tag, MB, MB)]
    tag = reads[0].tag
    pm.read_done(OID, tag, 0, 0.1)
    assert pm.take_actions() == [SendRead(OID, A, tag, 2 * MB, MB)]
    pm.read_done(OID, tag, MB, 0.2)
    assert pm.take_actions() == [SendRead(OID, A, tag, 3 * MB, 5)]
    pm.read_done(OID, tag, 2 * MB, 0.3)
    assert pm.take_actions() == []
    pm.read_done(OID, tag, 3 * MB, 0.4)
    out = pm.take_actions()
    assert out[0] == SealLocal(OID)  # sealed before anyone is told
    assert _replies(out) == {1: {"r": 11, "ok": True, "size": 3 * MB + 5}}
    assert OID not in pm and pm.stats()["bytes"] == 3 * MB + 5
    assert pm.next_deadline() is None


def test_zero_byte_object_is_created_and_sealed_without_reads():
    pm = _pm()
    out = _to_receiving(pm, 0)
    assert out[0] == SealLocal(OID) and _replies(out) == {1: {"r": 11, "ok": True, "size": 0}}


def test_requests_for_one_object_share_one_pull_and_merge_sources():
    pm = _pm()
    pm.request(1, 11, OID, [A], None, 0.0)
    stat = _only(pm.take_actions(), SendStat)
    pm.request(2, 22, OID, [A, B], None, 0.0)
    pm.request(3, 33, OID, [C], None, 0.0)
    assert pm.take_actions() == []  # no second transfer
    assert pm.stats()["joined"] == 2 and pm.stats()["started"] == 1
    pm.stat_missing(OID, stat.tag, "not found", 0.0)
    stat = _only(pm.take_actions(), SendStat)
    assert stat.source == B  # a source a joiner brought
    pm.stat_missing(OID, stat.tag, "not found", 0.0)
    assert _only(pm.take_actions(), SendStat).source == C


def test_stale_replies_of_an_abandoned_attempt_are_ignored():
    pm = _pm()
    reads = _to_receiving(pm, 2 * MB)
    old = reads[0].tag
    pm.source_failed(OID, old, "connection reset", 1.0)
    out = pm.take_actions()
    assert out[0] == CancelAttempt(OID, A, old, False)
    new = _only(out, SendStat)
    assert new.source == B and new.tag != old
    pm.read_done(OID, old, 0, 1.1)  # a late chunk from A
    pm.stat_done(OID, old, 2 * MB, 1.1)
    pm.source_failed(OID, old, "again", 1.1)
    assert pm.take_actions() == [] and pm.state(OID) == LOCATING


# ---------------------------------------------------------------- failover


def test_failover_mid_object_keeps_landed_chunks_and_rereads_the_rest():
    pm = _pm(window=2)
    reads = _to_receiving(pm, 4 * MB)
    tag = reads[0].tag
    pm.read_done(OID, tag, 0, 0.5)  # chunk 0 landed
    pm.take_actions()  # asks for chunk 2; chunks 1 and 2 are in flight
    pm.source_failed(OID, tag, "connection closed by the source", 0.6)
    out = pm.take_actions()
    assert out[0] == CancelAttempt(OID, A, tag, False)
    assert not any(isinstance(a, AbortLocal) for a in out)  # the range is reused
    stat = _only(out, SendStat)
    pm.stat_done(OID, stat.tag, 4 * MB, 0.7)  # B confirms the size
    out = pm.take_actions()
    assert [(a.source, a.off) for a in out] == [(B, MB), (B, 2 * MB)]
    for off in (MB, 2 * MB, 3 * MB):
        pm.read_done(OID, stat.tag, off, 0.8)
    out = pm.take_actions()
    assert SealLocal(OID) in out and _replies(out)[1]["ok"] is True
    assert pm.stats()["failovers"] == 1 and pm.stats()["bytes"] == 4 * MB


def test_a_source_with_another_size_is_dropped():
    pm = _pm()
    reads = _to_receiving(pm, 2 * MB, sources=(A, B, C))
    pm.source_failed(OID, reads[0].tag, "reset", 1.0)
    stat = _only(pm.take_actions(), SendStat)
    pm.stat_done(OID, stat.tag, 3 * MB, 1.0)
    out = pm.take_actions()
    assert out[0] == CancelAttempt(OID, B, stat.tag, False)
    assert _only(out, SendStat).source == C


def test_every_source_failing_aborts_the_partial_object_and_answers_lost_to_all():
    pm = _pm()
    reads = _to_receiving(pm, 2 * MB, client=1, sources=(A, B))
    pm.request(2, 22, OID, [A], None, 0.0)
    pm.source_failed(OID, reads[0].tag, "reset", 1.0)
    stat = _only(pm.take_actions(), SendStat)
    pm.stat_missing(OID, stat.tag, "not found", 1.0)
    out = pm.take_actions()
    cancel = out.index(CancelAttempt(OID, B, stat.tag, False))
    assert out.index(AbortLocal(OID)) > cancel  # never free a range a read may land in
    replies = _replies(out)
    assert set(replies) == {1, 2}
    for msg in replies.values():
        assert msg["ok"] is False and msg["error"] == "lost"
        assert f"{A}: reset" in msg["msg"] and f"{B}: not found" in msg["msg"]
    assert OID not in pm and pm.stats()["lost"] == 1


def test_no_sources_is_lost_at_once():
    pm = _pm()
    pm.request(1, 11, OID, [], None, 0.0)
    assert _replies(pm.take_actions())[1]["error"] == "lost"


def test_an_object_bigger_than_the_store_is_full_at_once():
    pm = _pm(capacity=4 * MB)
    pm.request(1, 11, OID, [A], None, 0.0)
    stat = _only(pm.take_actions(), SendStat)
    pm.stat_done(OID, stat.tag, 4 * MB + 1, 0.0)
    msg = _replies(pm.take_actions())[1]
    assert msg["error"] == "full" and "capacity" in msg["msg"]


# ---------------------------------------------------------------- admission


def _located(pm, oid, size, client):
    pm.request(client, client, oid, [A], None, 0.0)
    stat = _only(pm.take_actions(), SendStat)
    pm.stat_done(oid, stat.tag, size, 0.0)


def test_admission_starts_pulls_in_order_while_room_lasts():
    pm = _pm()
    _located(pm, b"x", 3 * MB, 1)
    _located(pm, b"y", 2 * MB, 2)
    _located(pm, b"z", 1 * MB, 3)
    pm.admit(4 * MB)  # x fits; y does not; z would, but waits its turn
    assert pm.take_actions() == [CreateLocal(b"x", 3 * MB)]
    assert pm.state(b"y") == WAITING and pm.state(b"z") == WAITING
    pm.created(b"x", True, 0.0)
    pm.take_actions()
    pm.admit(3 * MB)
    assert pm.take_actions() == [CreateLocal(b"y", 2 * MB), CreateLocal(b"z", MB)]
    assert pm.stats()["queued"] == 0


def test_a_create_that_fails_for_fragmentation_waits_for_more_room():
    pm = _pm()
    _located(pm, b"x", 2 * MB, 1)
    pm.admit(3 * MB)
    assert pm.take_actions() == [CreateLocal(b"x", 2 * MB)]
    assert pm.state(b"x") == CREATING
    pm.created(b"x", False, 0.0)
    assert pm.state(b"x") == WAITING
    pm.admit(3 * MB)  # same room: no point in trying again
    assert pm.take_actions() == []
    pm.admit(3 * MB + 64)
    assert pm.take_actions() == [CreateLocal(b"x", 2 * MB)]


# ---------------------------------------------------------------- time


def test_waiter_timeout_answers_timeout_and_cancels_a_pull_nobody_wants():
    pm = _pm()
    pm.request(1, 11, OID, [A], 2.0, 0.0)
    pm.request(2, 22, OID, [A], 3.0, 0.0)
    stat = _only(pm.take_actions(), SendStat)
    pm.stat_done(OID, stat.tag, 2 * MB, 0.5)
    pm.admit(4 * MB)
    pm.take_actions()
    pm.created(OID, True, 0.5)
    reads = pm.take_actions()
    assert pm.next_deadline() == 2.0
    pm.tick(1.9)
    assert pm.take_actions() == []
    pm.tick(2.0)
    out = pm.take_actions()
    assert _replies(out) == {1: {"r": 11, "ok": False, "error": "timeout",
                                 "msg": f"pull of object {OID.hex()} did not finish in time"}}
    assert pm.state(OID) == RECEIVING  # client 2 still waits
    pm.tick(3.0)
    out = pm.take_actions()
    assert [a for a in out if not isinstance(a, Reply)] == [
        CancelAttempt(OID, A, reads[0].tag, False), AbortLocal(OID)]
    assert _replies(out)[2]["error"] == "timeout"
    assert OID not in pm and pm.stats()["cancelled"] == 1


def test_a_source_that_stops_answering_is_dropped_and_its_link_closed():
    pm = _pm(stall=5.0)
    reads = _to_receiving(pm, 2 * MB, now=10.0)
    assert pm.next_deadline() == 15.0
    pm.read_done(OID, reads[0].tag, 0, 12.0)  # progress moves the stall check
    pm.take_actions()
    pm.tick(16.9)
    assert pm.take_actions() == []
    pm.tick(17.0)
    out = pm.take_actions()
    assert out[0] == CancelAttempt(OID, A, reads[0].tag, True)
    assert _only(out, SendStat).source == B


def test_a_client_that_leaves_cancels_only_pulls_nobody_else_waits_for():
    pm = _pm()
    pm.request(1, 11, b"x", [A], None, 0.0)
    pm.request(1, 12, b"y", [A], None, 0.0)
    pm.request(2, 21, b"y", [A], None, 0.0)
    stats = pm.take_actions()
    pm.drop_client(1)
    out = pm.take_actions()
    assert out == [CancelAttempt(b"x", A, stats[0].tag, False)]
    assert b"x" not in pm and b"y" in pm


# ---------------------------------------------------------------- local writers


def test_object_being_written_locally_is_waited_for_not_pulled():
    pm = _pm()
    pm.request(1, 11, OID, [A], None, 0.0, local_busy=True)
    assert pm.take_actions() == [WatchLocal(OID)] and pm.state(OID) == LOCAL
    pm.local_sealed(OID, 77)
    assert _replies(pm.take_actions()) == {1: {"r": 11, "ok": True, "size": 77}}


def test_local_writer_that_aborts_makes_the_pull_go_to_the_sources():
    pm = _pm()
    pm.request(1, 11, OID, [A], None, 0.0, local_busy=True)
    pm.take_actions()
    pm.local_freed(OID, 1.0)
    assert _only(pm.take_actions(), SendStat).source == A


def test_create_finding_a_local_writer_switches_to_waiting_for_it():
    pm = _pm()
    _located(pm, OID, MB, 1)
    pm.admit(4 * MB)
    pm.take_actions()
    pm.local_busy(OID)
    assert pm.take_actions() == [WatchLocal(OID)] and pm.state(OID) == LOCAL


def test_local_seal_does_not_touch_our_own_reservation():
    pm = _pm()
    _to_receiving(pm, 2 * MB)
    pm.local_sealed(OID, 2 * MB)
    assert pm.take_actions() == [] and pm.state(OID) == RECEIVING


# ---------------------------------------------------------------- reply reader


def _feed(reader, data, cap=None):
    """Play the shell: copy ``data`` into reader.buffer() piece by piece."""
    events, pos = [], 0
    while pos < len(data):
        view = reader.buffer()
        n = min(len(view), len(data) - pos, cap or len(view))
        view[:n] = data[pos:pos + n]
        pos += n
        ev = reader.advance(n)
        if ev is not None:
            events.append(ev)
            if isinstance(ev, dict) and ev["t"] == "data":
                return events, data[pos:]
    return events, b""


def test_reader_reads_frames_exactly_and_payloads_into_their_destination():
    reader = transfer.ReplyReader()
    payload = bytes(range(256)) * 40
    stream = (pack({"t": "stat", "r": 1, "size": 5}) + pack({"t": "data", "r": 2,
                                                             "len": len(payload)})
              + payload + pack({"t": "error", "r": 3, "error": "not_found", "msg": "x"}))
    events, rest = _feed(reader, stream, cap=7)
    assert events == [{"t": "stat", "r": 1, "size": 5}, {"t": "data", "r": 2, "len": 10240}]
    with pytest.raises(RuntimeError):
        reader.buffer()  # nowhere to put the payload yet
    dest = bytearray(len(payload))
    reader.accept_payload(memoryview(dest))
    view = reader.buffer()
    assert len(view) == len(payload)  # the payload is read straight into dest
    events, rest = _feed(reader, rest, cap=1000)
    assert events[0] is transfer.PAYLOAD_DONE and bytes(dest) == payload
    assert events[1]["error"] == "not_found" and rest == b""


def test_reader_discards_a_cancelled_payload_and_keeps_its_framing():
    reader = transfer.ReplyReader()
    payload = b"\xab" * 600_000
    stream = pack({"t": "data", "r": 1, "len": len(payload)}) + payload + pack(
        {"t": "stat", "r": 2, "size": 1})
    _, rest = _feed(reader, stream)
    dest = bytearray(len(payload))
    reader.accept_payload(memoryview(dest))
    assert _feed(reader, rest[:1000]) == ([], b"")
    reader.discard_payload()  # cancelled half way: nothing more lands in dest
    assert reader.in_payload
    events, _ = _feed(reader, rest[1000:])
    assert events == [transfer.PAYLOAD_DONE, {"t": "stat", "r": 2, "size": 1}]
    assert dest[:1000] == payload[:1000] and dest[1000:] == bytes(len(payload) - 1000)


@pytest.mark.parametrize("stream, error", [
    (struct.pack("<I", 0xFFFFFFF0), "outside 1..4096"),
    (struct.pack("<I", 0), "outside 1..4096"),
    (struct.pack("<I", 3) + b"\xc1\xc1\xc1", "undecodable"),
    (struct.pack("<I", 4) + msgpack.packb([1, 2, 3]), "not a map"),
    (pack({"t": "data", "r": 1, "len": -1}), "data length"),
    (pack({"t": "data", "r": 1, "len": 1 << 40}), "data length"),
])
def test_reader_rejects_bad_frames_and_stays_broken(stream, error):
    reader = transfer.ReplyReader()
    with pytest.raises(ProtocolError, match=error):
        _feed(reader, stream)
    with pytest.raises(ProtocolError):
        reader.buffer()


# ---------------------------------------------------------------- parsing


def test_parse_request_accepts_stat_and_read():
    assert transfer.parse_request(transfer.stat_msg(1, b"o")) == transfer.StatRequest(1, b"o")
    assert transfer.parse_request(transfer.read_msg(2, b"o", 8, 16)) == transfer.ReadRequest(
        2, b"o", 8, 16)


@pytest.mark.parametrize("msg", [
    {"t": "fetch", "r": 1, "oid": b"o"},
    {"t": "stat", "oid": b"o"},
    {"t": "stat", "r": 1, "oid": "o"},
    {"t": "stat", "r": 1, "oid": b""},
    {"t": "stat", "r": 1, "oid": b"o" * 65},
    {"t": "read", "r": 1, "oid": b"o", "off": -1, "len": 5},
    {"t": "read", "r": 1, "oid": b"o", "off": 0, "len": 0},
    {"t": "read", "r": 1, "oid": b"o", "off": 0, "len": transfer.MAX_READ + 1},
    {"t": "read", "r": True, "oid": b"o", "off": 0, "len": 1},
])
def test_parse_request_rejects_malformed(msg):
    with pytest.raises(ProtocolError):
        transfer.parse_request(msg)


def test_unix_pull_message_parses_and_checks_sources_and_timeout():
    req = messages.parse({"t": "pull", "r": 1, "oid": b"o",
                          "sources": ["10.0.0.1:7000", "[::1]:7000"], "timeout": 0.25})
    assert req == messages.Pull(1, b"o", ("10.0.0.1:7000", "[::1]:7000"), 250)
    assert messages.parse({"t": "pull", "r": 1, "oid": b"o", "sources": []}).timeout_ms == -1
    for bad in (["nohost"], ["h:0"], ["h:70000"], [7], ["h:1"] * 65):
        with pytest.raises(ProtocolError):
            messages.parse({"t": "pull", "r": 1, "oid": b"o", "sources": bad})
    for bad in (-1, True, "1", float("inf")):
        with pytest.raises(ProtocolError):
            messages.parse({"t": "pull", "r": 1, "oid": b"o", "sources": [], "timeout": bad})


# ---------------------------------------------------------------- object table hooks


def test_table_pins_sealed_objects_for_a_sender_and_reports_room():
    t = ObjectTable(4096)
    t.connect(1)
    t.connect(-2)
    off = t.step(1, Create(1, OID, 100), 0.0)[0].msg["offset"]
    assert t.pin_sealed(-2, OID) is None  # not sealed yet: nothing to send
    assert t.lookup(OID) == ("UNSEALED", 100) and t.lookup(b"none") is None
    t.step(1, Seal(2, OID), 0.0)
    t.step(1, Release((OID,)), 0.0)
    assert t.room == 4096  # free plus evictable
    assert t.pin_sealed(-2, OID) == (off, 100)
    assert t.room == 4096 - 128 and t.step(1, Delete(3, (OID,)), 0.0)[0].msg["deleted"] == 0
    assert t.disconnect(-2).pins == 1 and t.room == 4096  # a vanished peer's pins go


def test_table_reports_a_watched_seal_or_free_once():
    t = ObjectTable(4096)
    t.connect(1)
    t.step(1, Create(1, b"s", 10), 0.0)
    t.step(1, Create(2, b"f", 10), 0.0)
    t.watch(b"s")
    t.watch(b"f")
    t.step(1, Seal(3, b"s"), 0.0)
    t.step(1, Abort(4, b"f"), 0.0)
    assert t.take_notices() == [("sealed", b"s", 10), ("freed", b"f", 0)]
    t.step(1, Release((b"s",)), 0.0)
    t.step(1, Delete(5, (b"s",)), 0.0)
    assert t.take_notices() == []  # watches are one-shot
