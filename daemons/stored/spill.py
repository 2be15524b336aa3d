"""Spill policy: which held objects go to disk, into which file, and when a file goes.

Theory of operation
-------------------
An object in stored is held in one of three ways (see ``store.py``): *pins*
(some process has it mapped: never move it), *holds* (its owner wants it
kept, but does not read it now) or nothing (a cache entry, evicted LRU).
Objects with holds and no pins are spill candidates. When a create or a
restore does not fit even after evicting the cache, the store asks this
policy to free ``need`` bytes:

* Candidates arrive least recently used first. One that already has a disk
  copy (it was spilled, restored and not changed since; objects are
  immutable) costs nothing: its memory is dropped at once (``drop``).
* The others are written. Writing is fused: objects go into one file until
  it holds at least ``fuse_bytes`` (or ``max_file_objects`` objects), as
  Ray's spill fusion does, so ten thousand 100 KiB objects become a few
  files, not ten thousand. The planner keeps adding candidates past ``need``
  until the last file is full enough, so the next creates find room too.
  A plan never uses more than ``disk_room`` bytes of disk.
* A file's objects are readable only after :meth:`SpillPolicy.written`:
  locations of a file still being written are not handed out, so no half
  written spill is ever read. A failed write forgets the file.
* Each on-disk object is *live* in its file until it is freed
  (:meth:`forget`); a file with no live object left is deleted.

Pure: no files, no clock. The shell (``spill_io.py``) does the writes,
reads and deletes this module's decisions name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

FUSE_BYTES = 64 << 20  # Ray's min_spilling_size is 100 MB; 64 MiB fits small stores better
MAX_FILE_OBJECTS = 4096  # Ray fuses at most 2000 objects; any bound keeps a file's index small


@dataclass(frozen=True, slots=True)
class SpillWrite:
    """Write these objects, in order, into file ``file_id`` (``(oid, offset in file, size)``)."""

    file_id: int
    objects: tuple[tuple[bytes, int, int], ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class SpillPlan:
    """``drop``: in-memory copies to free now (already on disk); ``writes``: files to write."""

    drop: list[bytes]
    writes: list[SpillWrite]

    @property
    def empty(self) -> bool:
        return not self.drop and not self.writes


@dataclass(slots=True)
class _File:
    nbytes: int
    live: set[bytes] = field(default_factory=set)
    written: bool = False


class SpillPolicy:
    """Spill decisions and the spill files' bookkeeping. Not thread-safe.

    Args:
        fuse_bytes: a file being planned takes objects until it holds this many bytes.
        max_file_objects: ... or this many objects.
        disk_room: bytes of disk plans may use; the shell keeps it current.
    """

    def __init__(self, fuse_bytes: int = FUSE_BYTES, max_file_objects: int = MAX_FILE_OBJECTS,
                 disk_room: int = 1 << 62) -> None:
        if fuse_bytes < 1 or max_file_objects < 1:
            raise ValueError("fuse_bytes and max_file_objects must be >= 1")
        self.fuse_bytes = fuse_bytes
        self.max_file_objects = max_file_objects
        self.disk_room = disk_room
        self.disk_bytes = 0  # bytes of files that exist (or are being written)
        self._files: dict[int, _File] = {}
        self._where: dict[bytes, tuple[int, int, int]] = {}  # oid -> (file, offset, size)
        self._next_file = 0

    @property
    def num_files(self) -> int:
        return len(self._files)

    @property
    def num_objects(self) -> int:
        """Objects with a readable disk copy."""
        return len(self._where)

    def plan(self, candidates: Iterable[tuple[bytes, int, bool]], need: int) -> SpillPlan:
        """Free ``need`` bytes of memory from ``candidates``.

        Args:
            candidates: ``(oid, size, on_disk)``, least recently used first.
            need: bytes of memory to free; <= 0 plans nothing.

        Returns:
            What to drop and what to write. Writes may go past ``need`` to
            fill their file (fusion); the plan may fall short of ``need`` when
            candidates or disk room run out.
        """
        drop: list[bytes] = []
        writes: list[SpillWrite] = []
        if need <= 0:
            return SpillPlan(drop, writes)
        freed = 0
        room = self.disk_room - self.disk_bytes
        batch: list[tuple[bytes, int, int]] = []
        batch_bytes = 0
        for oid, size, on_disk in candidates:
            if freed >= need and not batch:
                break
            if on_disk:
                if freed < need:
                    drop.append(oid)
                    freed += size
                continue
            if size > room - batch_bytes:
                continue  # does not fit on disk; a smaller one may
            batch.append((oid, batch_bytes, size))
            batch_bytes += size
            freed += size
            if batch_bytes >= self.fuse_bytes or len(batch) >= self.max_file_objects:
                writes.append(self._new_file(batch, batch_bytes))
                room -= batch_bytes
                batch, batch_bytes = [], 0
        if batch:
            writes.append(self._new_file(batch, batch_bytes))
        return SpillPlan(drop, writes)

    def _new_file(self, batch: list[tuple[bytes, int, int]], nbytes: int) -> SpillWrite:
        self._next_file += 1
        fid = self._next_file
        self._files[fid] = _File(nbytes, {oid for oid, _, _ in batch})
        self.disk_bytes += nbytes
        return SpillWrite(fid, tuple(batch), nbytes)

    def written(self, write: SpillWrite) -> None:
        """The file is complete on disk: its objects may now be read from it."""
        f = self._files[write.file_id]
        f.written = True
        for oid, off, size in write.objects:
            self._where[oid] = (write.file_id, off, size)

    def failed(self, write: SpillWrite) -> None:
        """Writing the file failed: forget it (the shell removes what was written)."""
        f = self._files.pop(write.file_id, None)
        if f is not None:
            self.disk_bytes -= f.nbytes

    def location(self, oid: bytes) -> tuple[int, int, int] | None:
        """``(file_id, offset, size)`` of a readable disk copy, or None."""
        return self._where.get(oid)

    def forget(self, oid: bytes) -> int | None:
        """``oid`` was freed: drop its disk copy; return a file id to delete, if one emptied."""
        where = self._where.pop(oid, None)
        if where is None:
            return None
        fid = where[0]
        f = self._files[fid]
        f.live.discard(oid)
        if f.live:
            return None
        del self._files[fid]
        self.disk_bytes -= f.nbytes
        return fid

    def file_ids(self) -> list[int]:
        return list(self._files)
