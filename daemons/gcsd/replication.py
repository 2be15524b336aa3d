"""How a write becomes committed: the seam for chain replication.

The core never writes to a :class:`~daemons.gcsd.tables.TableStore` itself.
It hands a batch of ops to a :class:`Replication`, which decides when they
are committed and gives each op the sequence number under which it is
published. Today there is one replica, so commit means "applied to the
local store". The chain-replicated store (van Renesse & Schneider, OSDI'04)
will implement the same interface: the head assigns sequence numbers, ops
flow down the chain, and a batch is committed once the tail has applied it.

Ordering contract (kept by every implementation): a batch is durable in the
local store, and its sequence numbers are persisted with it, *before*
``commit`` returns; publications and replies are only sent after that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemons.gcsd.tables import META, EncodedPut, Op, Put, PutMany, TableStore

_SEQ_KEY = b"seq"


@dataclass(frozen=True, slots=True)
class Committed:
    """One op after commit, with the publication sequence number it was given."""

    op: Op
    seq: int


class Replication(Protocol):
    """Reads and committed writes for one shard of the control store."""

    def read(self, table: str, key: bytes) -> Any | None:
        """Read a committed value (the tail's, in a chain)."""
        ...

    def scan(self, table: str, prefix: bytes = b"", limit: int | None = None
             ) -> list[tuple[bytes, Any]]:
        ...

    def commit(self, ops: Sequence[Op]) -> list[Committed]:
        """Commit a batch atomically. Raises StorageError and then commits nothing."""
        ...

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest committed op (0 before any)."""
        ...


class SingleReplica:
    """A shard with exactly one replica: commit is a local atomic write.

    The publication sequence counter is stored in the same LMDB transaction
    as the data, so after a restart it continues where it stopped and a
    subscriber can tell a restart from a gap.
    """

    def __init__(self, store: TableStore) -> None:
        self.store = store
        self._seq: int = store.get(META, _SEQ_KEY) or 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def read(self, table: str, key: bytes) -> Any | None:
        return self.store.get(table, key)

    def scan(self, table: str, prefix: bytes = b"", limit: int | None = None
             ) -> list[tuple[bytes, Any]]:
        return self.store.scan(table, prefix, limit)

    def commit(self, ops: Sequence[Op]) -> list[Committed]:
        # One publication number per key: a PutMany is committed as its keys.
        ops = [one for op in ops for one in (
            [EncodedPut(op.table, k, d) for k, d in op.pairs()] if isinstance(op, PutMany)
            else [op])]
        if not ops:
            return []
        first = self._seq + 1
        last = self._seq + len(ops)
        self.store.write_batch([*ops, Put(META, _SEQ_KEY, last)])
        self._seq = last  # only after the write succeeded
        return [Committed(op, seq) for seq, op in enumerate(ops, first)]


class LocalReads:
    """The :class:`Replication` a chain replica's ControlStore sees: its own store.

    At the head this includes entries not yet committed, which is what the
    head must plan read-modify-write requests against (it orders them).
    Writes never go through here: the chain shell proposes them instead.
    """

    def __init__(self, store: TableStore, position: Any) -> None:
        self.store = store
        self._position = position  # anything with an ``applied`` attribute

    @property
    def last_seq(self) -> int:
        return int(self._position.applied)

    def read(self, table: str, key: bytes) -> Any | None:
        return self.store.get(table, key)

    def scan(self, table: str, prefix: bytes = b"", limit: int | None = None
             ) -> list[tuple[bytes, Any]]:
        return self.store.scan(table, prefix, limit)

    def commit(self, ops: Sequence[Op]) -> list[Committed]:
        raise RuntimeError("a chain replica commits by proposing, not through LocalReads")
