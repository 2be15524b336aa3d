"""stored's spill files: the writes, reads and deletes the spill policy decides.

Two threads keep file I/O off the event loop: a *writer* that writes fused
spill files straight from the arena (``os.writev`` of arena slices, so
nothing is copied in Python), and a *reader* that restores objects by
``os.preadv`` straight into their new arena range. Each finished job goes on
a queue and a byte on a pipe the loop's selector watches, so the loop learns
of it in its next turn and tells the table (``spill_done`` /
``restore_done``). The arena ranges involved are *busy* in the table, so
nothing else touches them while a thread does.

A file is written under a temporary name and renamed when complete; only
then does the table hand out its locations, so a half-written spill is never
read. Files are named ``shoal-spill-<pid>-<n>``: at start, files of stored
processes that no longer run (a crash) are removed, and at stop every file
of ours is, with the directory if it is left empty.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import threading
import time
from typing import Any

from daemons.stored.store import SpillDelete, SpillOut, SpillRead

_NAME = re.compile(r"shoal-spill-(\d+)-\d+(\.tmp)?")
_IOV_MAX = 1024


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SpillFiles:
    """Run spill I/O for one stored.

    The directory is created (0700) by the first write, so a stored that
    never spills leaves nothing on disk.

    Args:
        directory: the spill directory.
        arena: stored's arena mapping.
        log: structlog logger.
    """

    def __init__(self, directory: str, arena: Any, log: Any) -> None:
        self.dir = directory
        self.log = log
        self._arena = memoryview(arena)
        self._prefix = f"shoal-spill-{os.getpid()}-"
        if os.path.isdir(directory):
            self._remove_stale()
        self._done: queue.SimpleQueue[tuple[str, Any, bool]] = queue.SimpleQueue()
        self._writes: queue.SimpleQueue[SpillOut | None] = queue.SimpleQueue()
        self._reads: queue.SimpleQueue[SpillRead | None] = queue.SimpleQueue()
        self.wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.counters = {"write_s": 0.0, "read_s": 0.0}
        self._threads = [threading.Thread(target=self._writer, name="spill-writer", daemon=True),
                         threading.Thread(target=self._reader, name="spill-reader", daemon=True)]
        for t in self._threads:
            t.start()

    def path(self, file_id: int) -> str:
        return os.path.join(self.dir, f"{self._prefix}{file_id}")

    def disk_free(self) -> int:
        """Bytes free for us on the spill directory's file system."""
        path = self.dir
        while not os.path.isdir(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)  # not created yet: the file system it would be on
        try:
            return shutil.disk_usage(path).free
        except OSError:
            return 0

    # ------------------------------------------------------------ loop side
    def submit(self, actions: list[SpillOut | SpillRead | SpillDelete]) -> None:
        """Start the table's I/O actions (deletes are done here, at once)."""
        for act in actions:
            if isinstance(act, SpillOut):
                self._writes.put(act)
            elif isinstance(act, SpillRead):
                self._reads.put(act)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(act.file_id))

    def take_done(self) -> list[tuple[str, Any, bool]]:
        """Finished jobs since the last call: ``("write", SpillOut, ok)`` or
        ``("read", SpillRead, ok)``; drains the wake pipe."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def read_range(self, file_id: int, offset: int, length: int) -> bytes:
        """Bytes of a written spill file (for serving a pull of a spilled object)."""
        fd = os.open(self.path(file_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop the threads and remove every file of ours (at shutdown)."""
        for q in (self._writes, self._reads):
            q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        names = os.listdir(self.dir) if os.path.isdir(self.dir) else []
        for name in names:
            if name.startswith(self._prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)  # only if empty: another stored may share it
        os.close(self.wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------ threads
    def _remove_stale(self) -> None:
        removed = 0
        for name in os.listdir(self.dir):
            m = _NAME.fullmatch(name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))
                    removed += 1
        if removed:
            self.log.info("spill_stale_removed", files=removed, dir=self.dir)

    def _finish(self, kind: str, job: Any, ok: bool) -> None:
        self._done.put((kind, job, ok))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _writer(self) -> None:
        arena = self._arena
        while True:
            job = self._writes.get()
            if job is None:
                return
            start = time.monotonic()
            path = self.path(job.file_id)
            tmp = path + ".tmp"
            ok = True
            try:
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    views = [arena[off:off + size] for off, size in job.ranges]
                    _write_all(fd, views)
                finally:
                    os.close(fd)
                os.rename(tmp, path)
            except OSError as exc:
                ok = False
                self.log.warning("spill_write_failed", file=path, error=str(exc))
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            self.counters["write_s"] += time.monotonic() - start
            self._finish("write", job, ok)

    def _reader(self) -> None:
        arena = self._arena
        while True:
            job = self._reads.get()
            if job is None:
                return
            start = time.monotonic()
            ok = True
            try:
                fd = os.open(self.path(job.file_id), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    view = arena[job.offset:job.offset + job.size]
                    done = 0
                    while done < job.size:
                        n = os.preadv(fd, [view[done:]], job.file_off + done)
                        if n <= 0:
                            raise OSError(f"spill file ends {job.size - done} bytes short")
                        done += n
                finally:
                    os.close(fd)
            except OSError as exc:
                ok = False
                self.log.warning("spill_read_failed", file_id=job.file_id, error=str(exc))
            self.counters["read_s"] += time.monotonic() - start
            self._finish("read", job, ok)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """writev every view, in order, resuming after short writes."""
    i = 0
    while i < len(views):
        batch = views[i:i + _IOV_MAX]
        n = os.writev(fd, batch)
        for v in batch:
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break
