"""Where gcsd's tables live: a narrow key/value interface and its LMDB backing.

Every table maps ``bytes`` keys to msgpack-able values. The core and the
replication layer only see :class:`TableStore`, so the sharded store of a
later issue can put a different engine (or a remote shard) behind it.

Writes are expressed as :class:`Put` / :class:`Delete` ops so that a batch
can be applied atomically here, and shipped as-is down a replication chain.
:class:`EncodedPut` carries a value already msgpack-encoded: the chain head
encodes each value once, and every replica stores and forwards those bytes
without decoding them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import lmdb
import msgpack

# Tables clients may name. ``kv`` keys are ``namespace + b"\\x00" + key``.
PUBLIC_TABLES = ("nodes", "jobs", "functions", "actors", "objects", "tasks", "lineage", "kv")
# Internal bookkeeping (job counter, chain position); never exposed.
META = "meta"
# A replica's recent entries (for resending and catch-up) and request ids (for
# dedup after a restart), keyed by 8-byte big-endian seq. Never exposed.
LOG = "log"
DEDUP = "dedup"
ALL_TABLES = (*PUBLIC_TABLES, META, LOG, DEDUP)

# Address space, not disk: LMDB maps the file and grows it on demand. 16 GiB
# is far more than a control store needs, and a full map is a clean error
# (MapFullError), never a crash.
DEFAULT_MAP_SIZE = 1 << 34


@dataclass(frozen=True, slots=True)
class Put:
    """Set ``table[key] = value``."""

    table: str
    key: bytes
    value: Any


@dataclass(frozen=True, slots=True)
class EncodedPut:
    """Set ``table[key]`` to the value whose msgpack encoding is ``data``."""

    table: str
    key: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class PutMany:
    """Set many keys of one table: ``items`` is ``(key0, data0, key1, data1, ...)``.

    The values are msgpack-encoded, as in EncodedPut. A batch write of n
    keys is one op instead of n, so every replica checks, stores (LMDB
    ``putmulti``) and forwards it in loops that run in C. It takes n
    consecutive publication marks, one per key, in order.
    """

    table: str
    items: tuple[bytes, ...]

    @property
    def count(self) -> int:
        return len(self.items) // 2

    def pairs(self) -> Iterator[tuple[bytes, bytes]]:
        return zip(self.items[0::2], self.items[1::2], strict=True)


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove ``table[key]`` (no error if absent)."""

    table: str
    key: bytes


Op = Put | EncodedPut | PutMany | Delete


def op_count(op: Op) -> int:
    """How many keys an op writes (and publication marks it takes)."""
    return op.count if isinstance(op, PutMany) else 1


def encode_value(value: Any) -> bytes:
    """The stored form of a value (what EncodedPut.data holds)."""
    return _encode(value)


def decode_value(data: bytes | memoryview) -> Any:
    return _decode(data)


class StorageError(Exception):
    """The storage engine failed (disk full, map full, I/O error): a local fault."""


class TableStore(Protocol):
    """Key/value tables with atomic batches. Implementations are not thread-safe."""

    def get(self, table: str, key: bytes) -> Any | None:
        """Return the stored value, or None if the key is absent."""
        ...

    def scan(self, table: str, prefix: bytes = b"", limit: int | None = None
             ) -> list[tuple[bytes, Any]]:
        """Return ``(key, value)`` pairs whose key starts with ``prefix``, in key order."""
        ...

    def write_batch(self, ops: Sequence[Op]) -> None:
        """Apply every op or none of them. Raises StorageError."""
        ...

    def put(self, table: str, key: bytes, value: Any) -> None:
        ...

    def delete(self, table: str, key: bytes) -> bool:
        """Remove a key; return whether it existed."""
        ...

    def close(self) -> None:
        ...


class LmdbTableStore:
    """A :class:`TableStore` on one LMDB environment, one named sub-database per table.

    Args:
        path: directory for the environment (created 0700 if missing).
        tables: table names to open.
        map_size: LMDB map size in bytes (address space reserved).
        sync: fsync every commit. Off by default: a process crash loses
            nothing (the pages are in the OS cache), only a machine crash
            can, and the chain-replicated store is the intended answer to
            that. ``close()`` always syncs.

    Raises:
        StorageError: the directory cannot be created, opened or locked.

    Not thread-safe, and never use it across fork (an LMDB rule).
    """

    def __init__(self, path: str, tables: Iterable[str] = ALL_TABLES,
                 map_size: int = DEFAULT_MAP_SIZE, sync: bool = False) -> None:
        names = tuple(tables)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            self._env = lmdb.open(path, map_size=map_size, max_dbs=len(names) + 1,
                                  subdir=True, sync=sync, metasync=sync, readahead=False)
        except (OSError, lmdb.Error) as exc:
            raise StorageError(f"cannot open data dir {path}: {exc}") from None
        self._dbs = {name: self._env.open_db(name.encode()) for name in names}
        self.path = path

    def _db(self, table: str) -> Any:
        try:
            return self._dbs[table]
        except KeyError:
            raise KeyError(f"no table {table!r}") from None

    def get(self, table: str, key: bytes) -> Any | None:
        db = self._db(table)
        with self._env.begin(db=db, buffers=True) as txn:
            raw = txn.get(key)
            return None if raw is None else _decode(raw)

    def scan(self, table: str, prefix: bytes = b"", limit: int | None = None
             ) -> list[tuple[bytes, Any]]:
        db = self._db(table)
        out: list[tuple[bytes, Any]] = []
        # Short read transaction: long ones pin pages and stop LMDB reusing them.
        with self._env.begin(db=db) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return out
            for key, raw in cur:
                if not key.startswith(prefix) or (limit is not None and len(out) >= limit):
                    break
                out.append((key, _decode(raw)))
        return out

    def write_batch(self, ops: Sequence[Op]) -> None:
        if not ops:
            return
        dbs = [self._db(op.table) for op in ops]  # unknown table fails before writing
        try:
            with self._env.begin(write=True) as txn:
                for op, db in zip(ops, dbs, strict=True):
                    if isinstance(op, EncodedPut):
                        txn.put(op.key, op.data, db=db)
                    elif isinstance(op, PutMany):
                        txn.cursor(db=db).putmulti(op.pairs())
                    elif isinstance(op, Put):
                        txn.put(op.key, _encode(op.value), db=db)
                    else:
                        txn.delete(op.key, db=db)
        except lmdb.Error as exc:
            raise StorageError(f"write failed: {exc}") from None

    def put(self, table: str, key: bytes, value: Any) -> None:
        self.write_batch([Put(table, key, value)])

    def delete(self, table: str, key: bytes) -> bool:
        db = self._db(table)
        try:
            with self._env.begin(write=True, db=db) as txn:
                return bool(txn.delete(key))
        except lmdb.Error as exc:
            raise StorageError(f"delete failed: {exc}") from None

    def clear(self) -> None:
        """Empty every table in one transaction (before installing a snapshot)."""
        try:
            with self._env.begin(write=True) as txn:
                for db in self._dbs.values():
                    txn.drop(db, delete=False)
        except lmdb.Error as exc:
            raise StorageError(f"clear failed: {exc}") from None

    def first_key(self, table: str) -> bytes | None:
        """The smallest key of a table, or None if it is empty."""
        with self._env.begin(db=self._db(table)) as txn:
            cur = txn.cursor()
            return bytes(cur.key()) if cur.first() else None

    def range_raw(self, table: str, first: bytes, last: bytes) -> list[tuple[bytes, bytes]]:
        """Like :meth:`range`, with the stored bytes undecoded."""
        out: list[tuple[bytes, bytes]] = []
        with self._env.begin(db=self._db(table)) as txn:
            cur = txn.cursor()
            if not cur.set_range(first):
                return out
            for key, raw in cur:
                if key > last:
                    break
                out.append((key, raw))
        return out

    def range(self, table: str, first: bytes, last: bytes) -> list[tuple[bytes, Any]]:
        """``(key, value)`` pairs with ``first <= key <= last``, in key order."""
        return [(key, _decode(raw)) for key, raw in self.range_raw(table, first, last)]

    def close(self) -> None:
        """Flush to disk and release the environment (idempotent)."""
        env = getattr(self, "_env", None)
        if env is None:
            return
        self._env = None  # type: ignore[assignment]
        try:
            env.sync(True)
        finally:
            env.close()


# One Packer for the process: three times cheaper per small value than
# msgpack.packb, which builds a Packer per call. Not thread-safe; gcsd
# touches its tables from one thread only.
_packer = msgpack.Packer(use_bin_type=True)


def _encode(value: Any) -> bytes:
    return _packer.pack(value)


def _decode(raw: bytes | memoryview) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)
