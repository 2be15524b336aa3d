"""Worker stdout and stderr, routed to the driver of the job that printed them.

Theory of operation
-------------------
*Capture (worker).* At start a worker points its file descriptors 1 and 2
at pipes, so everything written there is caught: ``print``, C extensions,
child processes. ``sys.stdout``/``sys.stderr`` are wrapped so that the first
write after the running task changes writes a *context marker* first
(``\\x1e\\x1f<job>\\x1f<name>\\x1e``: the job id and the function or actor class
name). A task that prints nothing costs nothing; output that bypasses
Python (a C library, a subprocess) is credited to the last marker. The
worker's own JSON log keeps going to the original stderr (the raylet's log).

*Reading never blocks on anything but the pipe.* A reader thread drains both
pipes into a bounded buffer (``MAX_BUFFERED`` bytes; the oldest lines are
dropped and counted beyond it), so a task that prints a lot only ever waits
for that thread, never for the network, a lock or the driver. A sender
thread takes the buffer every ``SEND_S``, looks up each job's driver in
gcsd's ``jobs`` table (cached), and sends ``{t: log, pid, ip, lines, lost}``
to it like an owner notice: ``to_pid`` through the driver's raylet, over TCP
when the driver is on another node (owner_notices.py).

*Printing (driver).* The driver's core hands ``log`` notices to a
:class:`DriverPrinter`, whose thread writes each line to the driver's stdout
or stderr (the stream it was written to) with Ray's prefix,
``(name pid=1234, ip=10.0.0.2)``. ``init(log_to_driver=False)`` records the
choice in the job's row, so workers do not send at all.

Lost on purpose: what a worker writes in the last ``SEND_S`` before it is
killed, and lines beyond the bounds (counted, and said to the driver).
"""

from __future__ import annotations

import collections
import os
import selectors
import sys
import threading
import time
from typing import IO, Any

MARK = "\x1e\x1f"
_MARK_B = MARK.encode()
_SEP_B = b"\x1f"
_END_B = b"\x1e"
MAX_BUFFERED = 4 * 1024 * 1024
MAX_LINE = 64 * 1024
MAX_MESSAGE = 256 * 1024
SEND_S = 0.1
_JOB_RETRY_S = 2.0
STDOUT, STDERR = 1, 2


def marker(job: int, name: str) -> str:
    """The in-band note that what follows comes from ``name`` of job ``job``."""
    clean = name.replace("\x1e", "").replace("\x1f", "").replace("\n", " ")
    return f"{MARK}{job}\x1f{clean}\x1e"


class OutputSplitter:
    """Bytes of one stream → ``(job, name, line)`` tuples, markers taken out. Pure."""

    def __init__(self) -> None:
        self.job: int | None = None
        self.name = ""
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int | None, str, str]]:
        buf = self._buf + data
        out: list[tuple[int | None, str, str]] = []
        while buf:
            m = buf.find(_MARK_B)
            nl = buf.find(b"\n")
            if m == -1:
                # No marker: whole lines go out; keep a tail that may start one.
                keep = 1 if buf.endswith(_MARK_B[:1]) else 0
                if nl == -1:
                    if len(buf) - keep > MAX_LINE:
                        self._emit(out, buf[:len(buf) - keep])
                        buf = buf[len(buf) - keep:]
                    break
                self._emit(out, buf[:nl])
                buf = buf[nl + 1:]
                continue
            if nl != -1 and nl < m:
                self._emit(out, buf[:nl])
                buf = buf[nl + 1:]
                continue
            if m > 0:  # a partial line, then a new context: the line ends here
                self._emit(out, buf[:m])
                buf = buf[m:]
                continue
            end = buf.find(_END_B, len(_MARK_B))
            if end == -1:
                if len(buf) > 4096:  # not a marker after all
                    self._emit(out, buf[:len(_MARK_B)])
                    buf = buf[len(_MARK_B):]
                    continue
                break
            body = buf[len(_MARK_B):end]
            job, _, name = body.partition(_SEP_B)
            try:
                self.job = int(job)
            except ValueError:
                self.job = None
            self.name = name.decode("utf-8", "replace")
            buf = buf[end + 1:]
        self._buf = buf
        return out

    def _emit(self, out: list, raw: bytes) -> None:
        out.append((self.job, self.name, raw.decode("utf-8", "replace").rstrip("\r")))


def prefix(name: str, pid: int, ip: str) -> str:
    """Ray's prefix for a worker's line."""
    return f"({name} pid={pid}, ip={ip})"


# ------------------------------------------------------------------ worker side
class _Context:
    """The running task's marker; ``gen`` changes when it does."""

    __slots__ = ("key", "text", "gen")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.text = ""
        self.gen = 0


class _Tagged:
    """``sys.stdout``/``sys.stderr`` in a worker: writes the context marker
    before the first write of each new context, then passes writes on."""

    def __init__(self, stream: Any, ctx: _Context) -> None:
        self._stream = stream
        self._ctx = ctx
        self._gen = -1

    def write(self, s: str) -> int:
        ctx = self._ctx
        if ctx.gen != self._gen and ctx.key is not None and s:
            self._gen = ctx.gen
            self._stream.write(ctx.text)
        return self._stream.write(s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class OutputCapture:
    """Catches a worker's fds 1 and 2 and sends what they carry to the drivers."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.pid = os.getpid()
        self.ip = (core.store_address or "").rpartition(":")[0] or "127.0.0.1"
        self.ctx = _Context()
        self.lost = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._lines: collections.deque[tuple[int, int | None, str, str]] = collections.deque()
        self._bytes = 0
        self._jobs: dict[int, tuple[Any, float]] = {}  # job -> (driver key or None, when)
        self.log_stream: IO[str] = sys.stderr
        self._read_fds: dict[int, int] = {}

    def install(self) -> IO[str]:
        """Redirect fds 1 and 2; start the threads. Returns a stream on the
        original stderr, for the worker's own log lines."""
        saved = os.dup(2)
        self.log_stream = os.fdopen(saved, "w", buffering=1, encoding="utf-8",
                                    errors="replace")
        for fd, stream in ((1, STDOUT), (2, STDERR)):
            r, w = os.pipe()
            sys.stdout.flush() if fd == 1 else sys.stderr.flush()
            os.dup2(w, fd)
            os.close(w)
            self._read_fds[r] = stream
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stdout = _Tagged(sys.stdout, self.ctx)  # type: ignore[assignment]
        sys.stderr = _Tagged(sys.stderr, self.ctx)  # type: ignore[assignment]
        threading.Thread(target=self._read_loop, name="output-reader", daemon=True).start()
        threading.Thread(target=self._send_loop, name="output-sender", daemon=True).start()
        return self.log_stream

    def set_context(self, job: int, name: str) -> None:
        """The task about to run (called per task: a tuple compare when unchanged)."""
        key = (job, name)
        ctx = self.ctx
        if key != ctx.key:
            ctx.text = marker(job, name)
            ctx.key = key
            ctx.gen += 1

    # ---- reader thread: pipe → bounded buffer --------------------------------
    def _read_loop(self) -> None:
        sel = selectors.DefaultSelector()
        splitters = {}
        for r, stream in self._read_fds.items():
            sel.register(r, selectors.EVENT_READ, stream)
            splitters[r] = OutputSplitter()
        while self._read_fds:
            for key, _ in sel.select():
                try:
                    data = os.read(key.fd, 1 << 16)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fd)
                    self._read_fds.pop(key.fd, None)
                    continue
                lines = splitters[key.fd].feed(data)
                if lines:
                    self._buffer(key.data, lines)

    def _buffer(self, stream: int, lines: list[tuple[int | None, str, str]]) -> None:
        with self._lock:
            was_empty = not self._lines
            for job, name, text in lines:
                self._lines.append((stream, job, name, text))
                self._bytes += len(text) + 16
            while self._bytes > MAX_BUFFERED and self._lines:
                _, _, _, old = self._lines.popleft()
                self._bytes -= len(old) + 16
                self.lost += 1
            if was_empty:
                self._ready.notify()

    # ---- sender thread: buffer → drivers -----------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._lock:
                while not self._lines:
                    self._ready.wait()
                lines, self._lines, self._bytes = self._lines, collections.deque(), 0
                lost, self.lost = self.lost, 0
            try:
                self._send(lines, lost)
            except Exception as exc:  # never let the thread die; say it once in the log
                try:
                    self.log_stream.write(f"worker output not sent: {exc}\n")
                except Exception:
                    pass
            time.sleep(SEND_S)

    def _send(self, lines: collections.deque, lost: int) -> None:
        by_job: dict[int | None, list[list]] = {}
        for stream, job, name, text in lines:
            by_job.setdefault(job, []).append([stream, name, text])
        for job, items in by_job.items():
            dest = self._driver(job) if job else None
            if dest is None:
                if not job:  # before any task: keep it in the worker's log
                    for _, _, text in items:
                        self.log_stream.write(text + "\n")
                continue
            for batch in _batches(items):
                self.core.send_notice(dest, {"t": "log", "pid": self.pid, "ip": self.ip,
                                             "lines": batch, "lost": lost})
                lost = 0

    def _driver(self, job: int) -> Any:
        """``[store address, pid]`` of the job's driver, or None (not sending)."""
        known = self._jobs.get(job)
        now = time.monotonic()
        if known is not None and (known[0] is not None or now - known[1] < _JOB_RETRY_S):
            return known[0]
        dest = None
        try:
            row = self.core.gcs.table_get("jobs", job.to_bytes(4, "big"))
        except Exception:
            row = None
        if isinstance(row, dict) and row.get("log_to_driver", True) \
                and isinstance(row.get("driver_store"), str) \
                and isinstance(row.get("driver_pid"), int):
            dest = (row["driver_store"], row["driver_pid"])
        self._jobs[job] = (dest, now)
        return dest


def _batches(items: list[list]) -> list[list[list]]:
    out, cur, size = [], [], 0
    for item in items:
        if cur and size + len(item[2]) > MAX_MESSAGE:
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += len(item[2]) + 32
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------ driver side
class DriverPrinter:
    """Prints workers' lines in the driver, off the core's I/O thread."""

    MAX_QUEUED = 100_000

    def __init__(self) -> None:
        self._q: collections.deque[dict] = collections.deque(maxlen=self.MAX_QUEUED)
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="worker-output", daemon=True)
        self._thread.start()

    def on_log(self, msg: dict) -> None:
        """A ``log`` notice from a worker (called by the core with its lock held)."""
        with self._cv:
            self._q.append(msg)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stopped:
                    self._cv.wait()
                if not self._q:
                    return
                msgs = list(self._q)
                self._q.clear()
            for msg in msgs:
                self._print(msg)

    @staticmethod
    def _print(msg: dict) -> None:
        lines = msg.get("lines")
        pid, ip = msg.get("pid"), msg.get("ip")
        if not isinstance(lines, list) or not isinstance(pid, int):
            return
        out: dict[int, list[str]] = {STDOUT: [], STDERR: []}
        for item in lines:
            if isinstance(item, list) and len(item) == 3 and isinstance(item[2], str):
                stream = STDERR if item[0] == STDERR else STDOUT
                out[stream].append(f"{prefix(str(item[1]), pid, str(ip))} {item[2]}\n")
        lost = msg.get("lost")
        if isinstance(lost, int) and lost > 0:
            out[STDERR].append(f"{prefix('shoal', pid, str(ip))} {lost} lines of worker "
                               "output were dropped (the worker printed faster than they "
                               "could be sent)\n")
        for stream, text in ((STDOUT, out[STDOUT]), (STDERR, out[STDERR])):
            if text:
                f = sys.stdout if stream == STDOUT else sys.stderr
                try:
                    f.write("".join(text))
                    f.flush()
                except (OSError, ValueError):
                    pass

    def stop(self, timeout: float = 1.0) -> None:
        """Print what is queued, then end the thread."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)
