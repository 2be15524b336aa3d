"""User payloads: cloudpickle with pickle protocol 5 out-of-band buffers.

A value becomes a ``Serialized``: a pickle stream (``meta``) plus the raw
buffers pickle handed out of band (numpy and Arrow data). Small values travel
inline in control messages as ``[kind, meta, [buffer bytes...]]``; large ones
are laid out in one stored object::

    u32 kind | u32 nbuf | u64 meta_len | u64 len[nbuf] | meta | pad | buf0 | pad | buf1 ...

with every buffer 64-byte aligned, so reading back hands numpy and Arrow
slices of shared memory (zero copy).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import cloudpickle

from libclient import object_ref

KIND_VALUE = 0
KIND_ERROR = 1

# Ray's max_direct_call_object_size: below this, values travel in messages.
INLINE_LIMIT = 100 * 1024
_ALIGN = 64
_HEAD = struct.Struct("<IIQ")
_PLAIN = (int, float, str, bytes, bool, type(None))


class Serialized:
    __slots__ = ("kind", "meta", "buffers", "refs", "nbytes")

    def __init__(self, kind: int, meta: bytes, buffers: list[Any], refs: list[Any]) -> None:
        self.kind = kind
        self.meta = meta
        self.buffers = buffers
        self.refs = refs
        self.nbytes = len(meta) + sum(memoryview(b).nbytes for b in buffers)

    @property
    def inline(self) -> bool:
        return self.nbytes < INLINE_LIMIT

    def to_wire(self) -> list[Any]:
        return [self.kind, self.meta, [memoryview(b).tobytes() for b in self.buffers]]

    def store_size(self) -> int:
        return _layout(len(self.meta), [memoryview(b).nbytes for b in self.buffers])[-1]

    def write_into(self, dest: memoryview) -> None:
        lens = [memoryview(b).nbytes for b in self.buffers]
        offs = _layout(len(self.meta), lens)
        head = _HEAD.pack(self.kind, len(lens), len(self.meta)) + struct.pack(f"<{len(lens)}Q", *lens)
        dest[: len(head)] = head
        start = _HEAD.size + 8 * len(lens)
        dest[start:start + len(self.meta)] = self.meta
        for buf, off, n in zip(self.buffers, offs, lens, strict=False):
            dest[off:off + n] = memoryview(buf).cast("B")


def _layout(meta_len: int, lens: list[int]) -> list[int]:
    """Offsets of each buffer, followed by the total size."""
    pos = _HEAD.size + 8 * len(lens) + meta_len
    offs = []
    for n in lens:
        pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        offs.append(pos)
        pos += n
    offs.append(pos)
    return offs


def serialize(value: Any, kind: int = KIND_VALUE) -> Serialized:
    """Pickle ``value``; collect the ObjectRefs it contains into ``.refs``."""
    if type(value) in _PLAIN:
        return Serialized(kind, pickle.dumps(value, protocol=5), [], [])
    buffers: list[Any] = []
    prev = getattr(object_ref._collect, "refs", None)
    refs: list[Any] = []
    object_ref._collect.refs = refs
    try:
        meta = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    finally:
        object_ref._collect.refs = prev
    return Serialized(kind, meta, buffers, refs)


def deserialize_wire(wire: list[Any]) -> tuple[int, Any]:
    kind, meta, bufs = wire
    return kind, pickle.loads(meta, buffers=bufs)


def deserialize_buffer(buf: Any) -> tuple[int, Any]:
    """Read a stored object (a pyarrow Buffer over shared memory) without copying."""
    kind, nbuf, meta_len = _HEAD.unpack_from(buf, 0)
    lens = struct.unpack_from(f"<{nbuf}Q", buf, _HEAD.size)
    start = _HEAD.size + 8 * nbuf
    offs = _layout(meta_len, list(lens))
    meta = memoryview(buf)[start:start + meta_len]
    bufs = [buf.slice(off, n) for off, n in zip(offs, lens, strict=False)]
    return kind, pickle.loads(meta, buffers=bufs)


