"""Chain and master messages to and from msgpack maps, checking every field.

Messages between gcsd members travel on the same ROUTER as client
requests, as maps with ``"t": "chain"`` and a kind ``"k"``. Everything a
peer sends is untrusted input: :func:`decode_chain` turns a map into one of
the dataclasses of :mod:`daemons.gcsd.chain` or raises
:class:`~libclient.protocol.ProtocolError`, never anything else.

Entries are ``[seq, epoch, ops, cid, rid, result, marks]``, with an eighth
element ``reply_to`` when the tail is to answer the client; an op is
``[table, key, data, 1]`` (put, ``data`` the msgpack-encoded value),
``[table, [key0, data0, key1, data1, ...], 2]`` (many puts, see PutMany),
``[table, key, value]`` (put, the older plain form, still read) or
``[table, key]`` (delete). Forward and CatchUp carry each entry as its
msgpack *blob*, which is also what the replica logs, so an entry is encoded
once, at the head, and every later hop passes the same bytes on.
"""

from __future__ import annotations

from typing import Any

import msgpack

from daemons.gcsd.chain import Ack, CatchUp, ChainMessage, Entry, Forward, SyncRequest
from daemons.gcsd.tables import (
    META,
    PUBLIC_TABLES,
    Delete,
    EncodedPut,
    Op,
    Put,
    PutMany,
    encode_value,
)
from libclient.protocol import ProtocolError
from libclient.protocol import field as _field

_pack = msgpack.Packer(use_bin_type=True).pack  # gcsd's loop is its only user

_TABLES = frozenset((*PUBLIC_TABLES, META))  # a peer may never write log or dedup


def encode_op(op: Op) -> list[Any]:
    if isinstance(op, EncodedPut):
        return [op.table, op.key, op.data, 1]
    if isinstance(op, PutMany):
        return [op.table, list(op.items), 2]
    if isinstance(op, Put):
        return [op.table, op.key, encode_value(op.value), 1]
    return [op.table, op.key]


def decode_op(raw: Any) -> Op:
    if not isinstance(raw, list) or len(raw) not in (2, 3, 4):
        raise ProtocolError("an op must be [table, key], [table, key, value] "
                            "or [table, key, data, 1]")
    table, key = raw[0], raw[1]
    if len(raw) == 3 and type(key) is list and raw[2] == 2:
        return _decode_put_many(table, key)
    if type(table) is not str or table not in _TABLES or not isinstance(key, bytes) or not key:
        raise ProtocolError(f"bad op table/key: {table!r}")
    if len(raw) == 4:
        if raw[3] != 1 or not isinstance(raw[2], bytes):
            raise ProtocolError("an encoded put must be [table, key, data, 1]")
        return EncodedPut(table, key, raw[2])
    return EncodedPut(table, key, encode_value(raw[2])) if len(raw) == 3 else Delete(table, key)


def _decode_put_many(table: Any, items: list[Any]) -> PutMany:
    if type(table) is not str or table not in PUBLIC_TABLES:  # a list would not hash
        raise ProtocolError(f"many puts into table {table!r}")
    # Whole-list checks, so a thousand-key op costs a few C loops.
    if (not items or len(items) % 2 or not all(type(x) is bytes for x in items)
            or not all(items[0::2])):
        raise ProtocolError("many puts need [key, data, ...] of non-empty keys and bytes")
    return PutMany(table, tuple(items))


def entry_blob(e: Entry) -> bytes:
    """The entry's msgpack bytes, made once per entry and kept on it.

    Entry is frozen; ``wire`` is a cache outside its equality, so filling it
    in changes nothing anyone can observe.
    """
    if not e.wire:
        blob = _pack(encode_entry(e))
        object.__setattr__(e, "wire", blob)
    return e.wire


def decode_blob(blob: Any) -> Entry:
    """An entry from its blob (as carried by Forward/CatchUp and kept in the log)."""
    if not isinstance(blob, bytes):
        raise ProtocolError("an entry blob must be bytes")
    try:
        raw = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"entry blob is not msgpack: {exc}") from None
    entry = decode_entry(raw)
    object.__setattr__(entry, "wire", blob)
    return entry


def encode_entry(e: Entry) -> list[Any]:
    out = [e.seq, e.epoch, [encode_op(op) for op in e.ops], e.cid, e.rid, e.result,
           list(e.marks)]
    if e.reply_to:
        out.append(e.reply_to)
    return out


def decode_entry(raw: Any) -> Entry:
    if not isinstance(raw, list) or len(raw) not in (7, 8):
        raise ProtocolError("an entry must be a list of 7 or 8")
    seq, epoch, ops, cid, rid, result, marks = raw[:7]
    reply_to = raw[7] if len(raw) == 8 else b""
    if not isinstance(reply_to, bytes):
        raise ProtocolError("entry reply_to must be bytes")
    if not all(_is_int(x) for x in (seq, epoch, rid)) or seq < 1 or epoch < 0:
        raise ProtocolError("entry seq/epoch/rid must be integers")
    if not isinstance(ops, list) or not isinstance(cid, bytes) or not isinstance(marks, list):
        raise ProtocolError("entry ops/cid/marks have the wrong type")
    if len(marks) != len(ops) or not all(_is_int(m) for m in marks):
        raise ProtocolError("entry marks must be one integer per op")
    out: list[Op] = []
    for o in ops:  # the common case inline: every replica runs this for every op
        if (type(o) is list and len(o) == 4 and o[3] == 1 and type(o[0]) is str
                and o[0] in _TABLES
                and type(o[1]) is bytes and o[1] and type(o[2]) is bytes):
            out.append(EncodedPut(o[0], o[1], o[2]))
        else:
            out.append(decode_op(o))
    return Entry(seq, epoch, tuple(out), cid, rid, result, tuple(marks), reply_to)


def _entries(msg: dict[str, Any]) -> tuple[Entry, ...]:
    return tuple(decode_blob(e) for e in _field(msg, "entries", list))


def encode_chain(msg: Forward | Ack | SyncRequest | CatchUp) -> dict[str, Any]:
    """The map for a chain message (the shell msgpacks it)."""
    base: dict[str, Any] = {"t": "chain", "s": msg.shard, "e": msg.epoch, "src": msg.src}
    if isinstance(msg, Forward):
        return {**base, "k": "fwd", "entries": [entry_blob(e) for e in msg.entries],
                "c": msg.committed}
    if isinstance(msg, Ack):
        ack = {**base, "k": "ack", "a": msg.applied, "c": msg.committed}
        if msg.need_floor:
            ack["nf"] = True
        return ack
    if isinstance(msg, SyncRequest):
        return {**base, "k": "sync", "a": msg.applied, "le": msg.last_epoch}
    return {**base, "k": "catch", "entries": [entry_blob(e) for e in msg.entries],
            "ta": msg.tail_applied}


def chain_header(msg: dict[str, Any]) -> tuple[str, int, int, int]:
    """Return ``(kind, shard, epoch, src)`` of a chain map, checked."""
    kind = _field(msg, "k", str)
    shard = _int(msg, "s")
    epoch = _int(msg, "e")
    src = _int(msg, "src")
    return kind, shard, epoch, src


def decode_chain(msg: dict[str, Any]) -> ChainMessage:
    """Turn a ``"t": "chain"`` map into a message. Raises ProtocolError."""
    kind, shard, epoch, src = chain_header(msg)
    if kind == "fwd":
        return Forward(shard, epoch, src, _entries(msg), _int(msg, "c"))
    if kind == "ack":
        return Ack(shard, epoch, src, _int(msg, "a"), _int(msg, "c"), msg.get("nf") is True)
    if kind == "sync":
        return SyncRequest(shard, epoch, src, _int(msg, "a"), _int(msg, "le"))
    if kind == "catch":
        return CatchUp(shard, epoch, src, _entries(msg), _int(msg, "ta"))
    raise ProtocolError(f"unknown chain message kind {kind!r}")


def decode_configs(raw: Any) -> list[tuple[int, int, tuple[int, ...]]]:
    """Check ``[[shard, epoch, [member, ...]], ...]`` as sent by the master."""
    if not isinstance(raw, list):
        raise ProtocolError("configs must be a list")
    out = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 3 or not _is_int(item[0])
                or not _is_int(item[1]) or not isinstance(item[2], list)
                or not all(_is_int(m) for m in item[2])):
            raise ProtocolError("each config must be [shard, epoch, [members]]")
        out.append((item[0], item[1], tuple(item[2])))
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(msg: dict[str, Any], name: str) -> int:
    value = _field(msg, name, int)
    if value < 0:
        raise ProtocolError(f"field {name!r} must be >= 0")
    return value
