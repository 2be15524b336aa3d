"""One replica's disk: its LMDB environment, its entry log, and snapshots.

This is the storage half of the shell around :class:`~daemons.gcsd.chain.ChainReplica`.
Each replica of each shard has its own LMDB environment (``DATA/shard-N``),
so a replica can be wiped and reinstalled from a snapshot without touching
its neighbours on the same member.

Persisting an entry is one LMDB transaction holding the entry's ops, the
entry itself in the ``log`` table (for resends and catch-up), its request
id in ``dedup`` (so a restarted replica still recognises retries), and the
replica's position (seq, epoch tag, publication marks) in ``meta``. So a
crash leaves the tables and the position consistent, and a restart resumes
from exactly where the disk is.

The log keeps the newest ``log_keep`` entries; a joiner further behind than
that gets a snapshot instead of entries.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from daemons.gcsd.chain import Entry
from daemons.gcsd.tables import (
    DEDUP,
    LOG,
    META,
    PUBLIC_TABLES,
    Delete,
    EncodedPut,
    LmdbTableStore,
    Op,
    Put,
    op_count,
)
from daemons.gcsd.wire import decode_blob, entry_blob

_SEQ = struct.Struct(">Q")
_META_SEQ, _META_EPOCH, _META_MARKS = b"seq", b"last_epoch", b"marks"
# Entries kept for resends and catch-up. At ~2k entries/s of a busy chain
# that is several seconds of history: a replica restarted within that time
# catches up from the log; one down for longer gets a snapshot.
LOG_KEEP = 20_000
# Trim in small steps: one transaction deleting thousands of entries stalls
# the loop for milliseconds (measured 4-8 ms per 1024-entry trim), a step of
# 64 costs a fraction of one.
_TRIM_EVERY = 64
# Pairs per snapshot message: keeps each ZeroMQ frame well under MAX_FRAME
# for the values the control store holds (records of a few hundred bytes).
SNAPSHOT_CHUNK = 2000
# Tables a snapshot copies; the log is not copied (the joiner starts its own).
SNAPSHOT_TABLES = (*PUBLIC_TABLES, META)


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


class ShardStore:
    """The persisted state of one replica. Not thread-safe; never across fork.

    Args:
        path: the environment's directory.
        sync: fsync every commit (see LmdbTableStore).
        log_keep: entries to keep in the log.
    """

    def __init__(self, path: str, sync: bool = False, log_keep: int = LOG_KEEP,
                 map_size: int | None = None) -> None:
        kwargs: dict[str, Any] = {} if map_size is None else {"map_size": map_size}
        self.tables = LmdbTableStore(path, sync=sync, **kwargs)
        self.log_keep = log_keep
        self._trim_from: int | None = None  # lowest seq that may still be logged
        self.applied: int = self.tables.get(META, _META_SEQ) or 0
        self.last_epoch: int = self.tables.get(META, _META_EPOCH) or 0
        self.marks: dict[str, int] = dict(self.tables.get(META, _META_MARKS) or {})

    # ------------------------------------------------------------ restore
    def dedup_items(self) -> list[tuple[bytes, int, int, Any]]:
        """``(cid, rid, seq, result)`` of the logged entries, oldest first."""
        out = []
        for key, (cid, rid, result) in self.tables.scan(DEDUP):
            out.append((cid, rid, _SEQ.unpack(key)[0], result))
        return out

    # ------------------------------------------------------------ entries
    def persist(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Apply entries, in order, in one transaction. Raises StorageError."""
        if not entries:
            return
        ops: list[Op] = []
        marks = self.marks
        for e in entries:
            ops.extend(e.ops)
            key = seq_key(e.seq)
            ops.append(EncodedPut(LOG, key, entry_blob(e)))
            if e.cid:
                ops.append(Put(DEDUP, key, [e.cid, e.rid, e.result]))
            for op, mark in zip(e.ops, e.marks, strict=False):
                if mark:
                    last = mark + op_count(op) - 1
                    if last > marks.get(op.table, 0):
                        marks[op.table] = last
        last = entries[-1]
        ops += [Put(META, _META_SEQ, last.seq), Put(META, _META_EPOCH, last.epoch),
                Put(META, _META_MARKS, marks)]
        first_seq = entries[0].seq
        if last.seq // _TRIM_EVERY != (first_seq - 1) // _TRIM_EVERY and last.seq > self.log_keep:
            # Trim what fell out of the window since the last trim, in this same txn.
            hi = last.seq - self.log_keep
            if self._trim_from is None:
                self._trim_from = self.log_first()
            for q in range(max(1, self._trim_from), hi + 1):
                ops += [Delete(LOG, seq_key(q)), Delete(DEDUP, seq_key(q))]
            self._trim_from = max(self._trim_from, hi + 1)
        self.tables.write_batch(ops)
        self.applied, self.last_epoch = last.seq, last.epoch

    def entries(self, first: int, last: int) -> list[Entry]:
        """Logged entries ``first..last`` (fewer if some were trimmed)."""
        if first > last:
            return []
        return [decode_blob(bytes(raw)) for _k, raw in
                self.tables.range_raw(LOG, seq_key(first), seq_key(last))]

    def log_first(self) -> int:
        key = self.tables.first_key(LOG)
        return _SEQ.unpack(key)[0] if key else self.applied + 1

    def epoch_at(self, seq: int) -> int | None:
        raw = self.tables.get(LOG, seq_key(seq))
        return raw[1] if isinstance(raw, list) and len(raw) in (7, 8) else None

    # ------------------------------------------------------------ snapshots
    def snapshot_chunks(self) -> Iterator[list[list[Any]]]:
        """Everything a joiner needs, as lists of ``[table, key, value]``.

        The shell is single-threaded, so nothing is written while this runs
        and the chunks describe one point: ``self.applied``.
        """
        chunk: list[list[Any]] = []
        for table in SNAPSHOT_TABLES:
            for key, value in self.tables.scan(table):
                chunk.append([table, key, value])
                if len(chunk) >= SNAPSHOT_CHUNK:
                    yield chunk
                    chunk = []
        yield chunk

    def begin_install(self) -> None:
        """Wipe the replica before the first chunk of a snapshot."""
        self.tables.clear()
        self._trim_from = None
        self.applied, self.last_epoch, self.marks = 0, 0, {}

    def install_chunk(self, items: list[list[Any]]) -> None:
        ops: list[Op] = []
        for item in items:
            table, key, value = item
            ops.append(Put(table, key, value))
        self.tables.write_batch(ops)

    def finish_install(self, applied: int, last_epoch: int, marks: dict[str, int],
                       dedup: list[tuple[bytes, int, int, Any]]) -> None:
        ops: list[Op] = [Put(META, _META_SEQ, applied), Put(META, _META_EPOCH, last_epoch),
                         Put(META, _META_MARKS, marks)]
        for cid, rid, seq, result in dedup:
            ops.append(Put(DEDUP, seq_key(seq), [cid, rid, result]))
        self.tables.write_batch(ops)
        self.applied, self.last_epoch, self.marks = applied, last_epoch, dict(marks)

    def close(self) -> None:
        self.tables.close()
