"""Property-based fuzzing of every decoder a socket feeds (hypothesis).

Each decoder gets valid messages of every type it knows, the same messages
with fields replaced, dropped or added, and raw bytes (flipped, truncated,
oversized length prefixes). The property: it returns a typed result or
raises the project's error type (ProtocolError; gcsd answers an error
reply), never anything else, never hangs, and never buffers past its limit.
The raylet and workers parse inline in their shells; their framing is
:class:`FrameDecoder` (fuzzed here) and their messages are fuzzed against
real processes by ``tests/fuzz_ports.py``.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.gcsd import wire
from daemons.gcsd.chain import Ack, CatchUp, Entry, Forward, SyncRequest
from daemons.gcsd.core import ControlStore, Outcome
from daemons.gcsd.master_server import _heartbeat
from daemons.gcsd.replication import SingleReplica
from daemons.gcsd.tables import LmdbTableStore, Put
from daemons.stored import messages, transfer
from libclient.protocol import (
    HEADER,
    FrameDecoder,
    ProtocolError,
    decode_body,
    encode_body,
    pack,
)

FAST = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

OID = b"\x01" * 28
# Valid messages of every type each daemon decodes (what real clients send).
STORED = [
    {"t": "hello", "r": 1, "pid": 42, "name": "driver"},
    {"t": "create", "r": 2, "oid": OID, "size": 100},
    {"t": "seal", "r": 3, "oid": OID, "hold": True, "handoff": False},
    {"t": "abort", "r": 4, "oid": OID},
    {"t": "get", "r": 5, "oids": [OID, OID], "timeout_ms": 10, "hold": False},
    {"t": "release", "oids": [OID]},
    {"t": "unhold", "oids": [OID]},
    {"t": "free", "oids": [OID]},
    {"t": "delete", "r": 6, "oids": [OID]},
    {"t": "contains", "r": 7, "oids": [OID]},
    {"t": "stats", "r": 8},
    {"t": "pull", "r": 9, "oid": OID, "sources": ["127.0.0.1:4000", "[::1]:5"], "timeout": 1.5},
]
TRANSFER = [
    {"t": "stat", "r": 1, "oid": OID},
    {"t": "read", "r": 2, "oid": OID, "off": 0, "len": 4096},
    {"t": "free", "r": 3, "oid": OID},
]
GCSD = [
    {"t": "ping", "r": 1},
    {"t": "info", "r": 2},
    {"t": "kv_put", "r": 3, "ns": "n", "key": b"k", "value": b"v", "overwrite": True},
    {"t": "kv_get", "r": 4, "ns": "n", "key": b"k"},
    {"t": "kv_del", "r": 5, "ns": "n", "key": b"k"},
    {"t": "kv_keys", "r": 6, "ns": "n", "prefix": b""},
    {"t": "kv_exists", "r": 7, "ns": "n", "key": b"k"},
    {"t": "put", "r": 8, "table": "actors", "key": b"a", "value": {"x": 1}},
    {"t": "get", "r": 9, "table": "actors", "key": b"a"},
    {"t": "delete", "r": 10, "table": "actors", "key": b"a"},
    {"t": "scan", "r": 11, "table": "actors", "prefix": b"", "limit": 10},
    {"t": "put_batch", "r": 12, "table": "actors", "items": [[b"b", {"y": 2}]]},
    {"t": "next_job_id", "r": 13},
    {"t": "register_node", "r": 14, "node_id": b"\x02" * 16, "info": {"address": "h"}},
    {"t": "heartbeat", "r": 15, "node_id": b"\x02" * 16, "available": {"CPU": 1.0}, "v": 1},
    {"t": "unregister_node", "r": 16, "node_id": b"\x02" * 16},
    {"t": "get_nodes", "r": 17},
]
_ENTRY = Entry(3, 1, (Put("actors", b"a", {"x": 1}),), b"cid", 7, None, (1,))
CHAIN = [wire.encode_chain(m) for m in (
    Forward(0, 1, 0, (_ENTRY,), 2),
    Ack(0, 1, 1, 3, 3, True),
    SyncRequest(0, 1, 1, 2, 1),
    CatchUp(0, 1, 0, (_ENTRY,), 3),
)]
HEARTBEAT = {"t": "hb", "m": 0, "inc": 1, "shards": {0: [1, 2, 2, True, True]}}

# Any value msgpack can carry, nested a little.
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=40))
VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5) | st.integers(-(2**63), 2**64 - 1), inner,
                                      max_size=4),
                      max_leaves=12)


@st.composite
def mutated(draw: Any, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A valid message with some fields replaced, dropped or added."""
    msg = dict(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "type"]))
        keys = sorted(msg, key=str)
        if action == "replace" and keys:
            msg[draw(st.sampled_from(keys))] = draw(VALUES)
        elif action == "drop" and keys:
            msg.pop(draw(st.sampled_from(keys)))
        elif action == "add":
            msg[draw(st.text(max_size=6))] = draw(VALUES)
        else:
            msg["t"] = draw(st.sampled_from([m["t"] for m in samples]) | st.text(max_size=8))
    return msg


@st.composite
def mangled_bytes(draw: Any, samples: list[dict[str, Any]]) -> bytes:
    """A valid message's msgpack bytes, flipped, truncated, spliced or random."""
    body = bytearray(encode_body(draw(st.sampled_from(samples))))
    how = draw(st.sampled_from(["flip", "truncate", "splice", "random"]))
    if how == "flip" and body:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(body) - 1))
            body[i] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        del body[draw(st.integers(0, len(body))):]
    elif how == "splice":
        i = draw(st.integers(0, len(body)))
        body[i:i] = draw(st.binary(max_size=16))
    else:
        body = bytearray(draw(st.binary(max_size=64)))
    return bytes(body)


def _decodable(data: bytes) -> dict[str, Any] | None:
    try:
        return decode_body(data)
    except ProtocolError:
        return None


# --------------------------------------------------------------- framing
@FAST
@given(st.lists(st.sampled_from(STORED + TRANSFER + GCSD + CHAIN), max_size=6), st.data())
def test_frame_decoder_splits_any_chunking_of_valid_frames(msgs, data):
    stream = b"".join(pack(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec, got, last = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        dec.feed(stream[last:cut])
        last = cut
        got += dec.drain()
    assert len(got) == len(msgs) and dec.buffered == 0


@FAST
@given(st.binary(max_size=300), st.integers(1, 64))
def test_frame_decoder_on_random_bytes_only_raises_protocol_error(data, chunk):
    dec = FrameDecoder(max_frame=128)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
            dec.drain()
            assert dec.buffered <= 4 + 128 + chunk  # never holds past one frame's worth
    except ProtocolError:
        with pytest.raises(ProtocolError):  # stuck: the caller must close
            dec.next()


@FAST
@given(st.integers(65, 2**32 - 1))
def test_an_oversized_length_prefix_fails_on_its_four_bytes(size):
    dec = FrameDecoder(max_frame=64)
    dec.feed(HEADER.pack(size))  # no body at all: nothing must wait for (or reserve) it
    with pytest.raises(ProtocolError, match="exceeds limit"):
        dec.next()
    assert dec.buffered == 4
    reader = transfer.ReplyReader(max_frame=64)
    view = reader.buffer()
    view[:4] = HEADER.pack(size)
    with pytest.raises(ProtocolError):
        reader.advance(4)


@FAST
@given(mangled_bytes(STORED + TRANSFER + GCSD + CHAIN))
def test_decode_body_on_mangled_bytes_only_raises_protocol_error(data):
    msg = _decodable(data)
    assert msg is None or isinstance(msg.get("t"), str)


# --------------------------------------------------------------- stored
@FAST
@given(mutated(STORED) | st.sampled_from(STORED))
def test_stored_parse_returns_a_request_or_protocol_error(msg):
    try:
        req = messages.parse(msg)
    except ProtocolError:
        return
    assert type(req).__module__ == messages.__name__


@FAST
@given(mutated(TRANSFER) | st.sampled_from(TRANSFER))
def test_transfer_parse_request_returns_a_request_or_protocol_error(msg):
    try:
        req = transfer.parse_request(msg)
    except ProtocolError:
        return
    assert isinstance(req, transfer.StatRequest | transfer.ReadRequest | transfer.FreeRequest)


_REPLIES = [{"t": "stat", "r": 1, "ok": True, "size": 10}, {"t": "data", "r": 2, "len": 8},
            {"t": "error", "r": 3, "code": "not_found", "msg": "x"}]


@FAST
@given(st.lists(st.sampled_from(_REPLIES) | mutated(_REPLIES), max_size=5),
       st.binary(max_size=40), st.integers(1, 50))
def test_transfer_reply_reader_on_mutated_streams(msgs, junk, chunk):
    stream = b"".join(pack(m) + (b"\x00" * 8 if m.get("t") == "data" else b"")
                      for m in msgs) + junk
    reader = transfer.ReplyReader(max_frame=4096)
    pos, turns = 0, 0
    try:
        while pos < len(stream):
            turns += 1
            assert turns < 10_000  # never loops without consuming
            buf = reader.buffer()
            n = min(len(buf), chunk, len(stream) - pos)
            buf[:n] = stream[pos:pos + n]
            pos += n
            event = reader.advance(n)
            if isinstance(event, dict) and event.get("t") == "data":
                reader.discard_payload()
    except ProtocolError:
        pass


# --------------------------------------------------------------- gcsd
@pytest.fixture(scope="module")
def gcs_core(tmp_path_factory):
    store = LmdbTableStore(str(tmp_path_factory.mktemp("fuzz-gcs") / "gcs"), map_size=1 << 26)
    yield ControlStore(SingleReplica(store), node_timeout_s=10.0,
                       pubsub_address="tcp://127.0.0.1:1", version="fuzz", now=0.0)
    store.close()


@FAST
@given(mutated(GCSD) | st.sampled_from(GCSD))
def test_gcsd_answers_every_mutated_request(gcs_core, msg):
    try:
        frame = encode_body(msg)
    except (TypeError, ValueError, OverflowError):
        return  # not encodable: no client could send it
    out = gcs_core.receive(frame, 1.0, 1e9)
    assert isinstance(out, Outcome)
    if isinstance(msg.get("r"), int) and not isinstance(msg.get("r"), bool):
        assert out.reply is not None and out.reply["r"] == msg["r"]


@FAST
@given(mangled_bytes(GCSD))
def test_gcsd_receive_on_mangled_bytes_never_raises(gcs_core, data):
    assert isinstance(gcs_core.receive(data, 1.0, 1e9), Outcome)


@FAST
@given(mutated(CHAIN) | st.sampled_from(CHAIN))
def test_gcsd_chain_decoder_returns_a_message_or_protocol_error(msg):
    try:
        wire.decode_chain(msg)
    except ProtocolError:
        pass


@FAST
@given(VALUES)
def test_gcsd_entry_and_config_decoders_on_any_value(value):
    for decode in (wire.decode_blob, wire.decode_entry, wire.decode_op, wire.decode_configs):
        try:
            decode(value)
        except ProtocolError:
            pass


@FAST
@given(mangled_bytes(CHAIN))
def test_gcsd_entry_blob_decoder_on_mangled_bytes(data):
    try:
        wire.decode_blob(data)
    except ProtocolError:
        pass


@FAST
@given(mutated([HEARTBEAT]) | st.just(HEARTBEAT))
def test_chain_master_heartbeat_decoder(msg):
    try:
        _heartbeat(msg)
    except ProtocolError:
        pass


def test_the_valid_samples_are_valid(gcs_core):
    """The seeds above are real messages: each decodes cleanly."""
    for msg in STORED:
        messages.parse(msg)
    for msg in TRANSFER:
        transfer.parse_request(msg)
    for msg in CHAIN:
        wire.decode_chain(msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False,
                                          strict_map_key=False))
    _heartbeat(HEARTBEAT)
    for msg in GCSD:
        out = gcs_core.receive(encode_body(msg), 1.0, 1e9)
        assert out.reply is not None and out.reply.get("ok"), (msg, out.reply)
    assert struct.calcsize("<I") == HEADER.size
